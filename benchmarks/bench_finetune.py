"""Fine-tuning all-MiniLM-L6-v2 on SST-2 with `configs/sst2-minilm.toml`: accuracy on test.tsv,
wall time, and tokens/s against the Hugging Face `Trainer` (same model, data, 256-sentence global
batch, bf16, optimizer); table into BENCHMARKS.md.

1. One `bigbatch train configs/sst2-minilm.toml` run through the CLI in a fresh child process
   (`--steps` optimizer steps). Its model (saved in Hugging Face format in the run directory) is
   then scored on SST-2's test.tsv (the GLUE dev set, seen by nothing before) with bigbatch's own
   evaluation.
2. Throughput: `--rounds` rounds of a short bigbatch run and a short Trainer run
   (benchmarks/hf_trainer_sst2.py), `--compare-steps` optimizer steps each, in fresh child
   processes, the order reversed every other round. tokens/s = real (unpadded) tokens / wall
   time of the optimizer steps after the first (start-up, tokenisation, evaluation and saving
   excluded on both sides); the ratio is the median of the per-round ratios.

    python benchmarks/bench_finetune.py                    # what `make bench` runs
    python benchmarks/bench_finetune.py --steps 10 --compare-steps 3 --no-write   # a quick look
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from common import ROOT, machine_description, run_child, today, write_section

SECTION = "bench_finetune"
RECIPE = "configs/sst2-minilm.toml"
TEST = ROOT.parent / "shared" / "data" / "sst2" / "test.tsv"


def bigbatch_steps(run_dir: Path) -> tuple[list[float], list[int]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    steps = [r for r in rows if "loss" in r]
    # fit() counts texts in "tokens" for classification; tokens_per_s holds the real tokens.
    tokens = [round(r["tokens_per_s"] * r["step_seconds"]) for r in steps]
    return [r["step_seconds"] for r in steps], tokens


def tokens_per_s(seconds: list[float], tokens: list[int]) -> float:
    """After the first step (warm-up: allocation, first-touch, optimizer state)."""
    return sum(tokens[1:]) / sum(seconds[1:])


def test_accuracy(run_dir: Path) -> tuple[float, float, int]:
    """Accuracy and macro-F1 on test.tsv of the model the run saved, by bigbatch's evaluation."""
    from bigbatch.config.files import load_config

    return classifier_test_metrics(run_dir, load_config(run_dir / "config.toml"))


def classifier_test_metrics(model_dir: Path, cfg) -> tuple[float, float, int]:
    """Accuracy, macro-F1 and texts on test.tsv of the Hugging Face classifier in `model_dir`,
    windowed as `cfg` says, by bigbatch's evaluation."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from bigbatch.engine.precision import make_precision
    from bigbatch.parallel.process_group import SINGLE_PROCESS
    from bigbatch.tasks.classify.data import (
        eval_batches,
        label_ids,
        read_labelled_file,
        tokenize_windows,
    )
    from bigbatch.tasks.classify.loss import evaluate_classifier

    model = AutoModelForSequenceClassification.from_pretrained(model_dir, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    names = [model.config.id2label[i] for i in range(model.config.num_labels)]
    texts, raw = read_labelled_file(TEST, cfg.data.text_field, cfg.data.label_field)
    windows = tokenize_windows(tokenizer, texts, label_ids(raw, names, TEST), cfg.data.max_length,
                               cfg.data.stride)
    batches = eval_batches(windows, 64, cfg.batch.micro_batch_tokens, 0, 1)
    cpu = torch.device("cpu")
    metrics = evaluate_classifier(model, batches, doc_labels=torch.from_numpy(windows.labels),
                                  num_labels=len(names), aggregate=cfg.data.aggregate,
                                  precision=make_precision(cfg.precision, cpu),
                                  dist=SINGLE_PROCESS, device=cpu)
    return metrics["val_accuracy"], metrics["val_macro_f1"], len(texts)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=0,
                        help="optimizer steps of the long run (default: the recipe's)")
    parser.add_argument("--compare-steps", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--no-write", action="store_true")
    opts = parser.parse_args(argv)
    python = sys.executable
    if not opts.steps:
        from bigbatch.config.files import load_config

        opts.steps = load_config(ROOT / RECIPE).train.max_steps
    command = "python benchmarks/bench_finetune.py" + (" " + " ".join(argv) if argv else "")
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        long_dir = tmp / "long"
        long = run_child([python, "-m", "bigbatch", "train", RECIPE,
                          f"--train.max_steps={opts.steps}", "--out", str(long_dir)],
                         tmp / "long.log")
        if long.returncode != 0:
            print(long.log[-3000:])
            return 1
        seconds, tokens = bigbatch_steps(long_dir)
        rows = [json.loads(line) for line in (long_dir / "metrics.jsonl").open()]
        dev = [r for r in rows if "val_accuracy" in r][-1]
        accuracy, macro_f1, num_test = test_accuracy(long_dir)
        print(f"long run: {long.wall_s:.0f}s, test accuracy {accuracy:.4f}", flush=True)

        rounds = []
        for i in range(opts.rounds):
            runs = {}
            order = ["bigbatch", "trainer"] if i % 2 == 0 else ["trainer", "bigbatch"]
            for side in order:
                if side == "bigbatch":
                    out = tmp / f"short{i}"
                    child = run_child([python, "-m", "bigbatch", "train", RECIPE,
                                       f"--train.max_steps={opts.compare_steps}",
                                       "--train.eval_every=0", "--train.eval_tokens=64",
                                       "--out", str(out)], tmp / f"short{i}.log")
                    runs[side] = (tokens_per_s(*bigbatch_steps(out)), child)
                else:
                    result = tmp / f"trainer{i}.json"
                    child = run_child([python, "benchmarks/hf_trainer_sst2.py", "--steps",
                                       str(opts.compare_steps), "--out", str(result)],
                                      tmp / f"trainer{i}.log")
                    if child.returncode != 0:
                        print(child.log[-3000:])
                        return 1
                    data = json.loads(result.read_text())
                    runs[side] = (tokens_per_s(data["step_seconds"], data["step_tokens"]), child,
                                  sum(data["step_tokens"]) / sum(data["step_padded_tokens"]))
                print(f"round {i + 1} {side}: {runs[side][0]:,.0f} tokens/s", flush=True)
            rounds.append(runs)

    from bigbatch.config.files import load_config

    cfg = load_config(ROOT / RECIPE)
    ratios = [r["bigbatch"][0] / r["trainer"][0] for r in rounds]
    others = max([long.other_cores] + [run[1].other_cores for r in rounds for run in r.values()])
    table = "\n".join([
        f"## Fine-tuning: all-MiniLM-L6-v2 on SST-2 (`{RECIPE}`)",
        "",
        f"Command: `{command}` ({today()})  ",
        f"Machine: {machine_description()}  ",
        f"Run: {cfg.batch.global_sequences} sentences per optimizer step (micro-batches of up to "
        f"{cfg.batch.micro_batch_tokens:,} padded tokens, grouped by length), "
        f"{cfg.precision.dtype}, AdamW lr {cfg.optim.lr:g} ({cfg.optim.warmup_steps} warmup "
        f"steps, {cfg.optim.decay} decay), max_length {cfg.data.max_length}.",
        "",
        "| measure | value |",
        "|---|---:|",
        f"| optimizer steps (sentences seen) | {opts.steps} "
        f"({opts.steps * cfg.batch.global_sequences:,}, "
        f"{opts.steps * cfg.batch.global_sequences / 60614:.2f} epochs) |",
        f"| wall time of `bigbatch train` (start-up, data, evaluations, save included) | "
        f"{long.wall_s:.0f} s |",
        f"| training tokens/s (real tokens, steps 2..{opts.steps}) | "
        f"{tokens_per_s(seconds, tokens):,.0f} |",
        f"| **accuracy on test.tsv** ({num_test} sentences; target ≥ 88 %, published 91.5) | "
        f"**{100 * accuracy:.2f} %** |",
        f"| macro-F1 on test.tsv | {100 * macro_f1:.2f} % |",
        f"| dev.tsv accuracy at the end (the run's validation set: the first sentences within "
        f"train.eval_tokens = {cfg.train.eval_tokens:,} tokens) | {100 * dev['val_accuracy']:.2f} % |",
        f"| peak RSS | {long.peak_rss_mib:,.0f} MiB |",
        "",
        f"Throughput against the Hugging Face `Trainer` ({opts.compare_steps} optimizer steps "
        f"each, {opts.rounds} round(s), fresh processes; Trainer: 4 x 64 random sentences per "
        "step, each micro-batch padded to its longest, bf16, same optimizer settings):",
        "",
        "| round | bigbatch tokens/s | Trainer tokens/s | Trainer real/padded tokens | ratio |",
        "|---|---:|---:|---:|---:|",
        *[f"| {i + 1} | {r['bigbatch'][0]:,.0f} | {r['trainer'][0]:,.0f} | "
          f"{100 * r['trainer'][2]:.0f} % | {ratio:.2f}x |"
          for i, (r, ratio) in enumerate(zip(rounds, ratios, strict=True))],
        f"| **median** | | | | **{statistics.median(ratios):.2f}x** |",
        "",
        f"Load: other processes used up to {others:.2f} cores during these runs (/proc/stat, as "
        "in bench_train). The machine's 2 cores are shared with other agents' work: absolute "
        "times and tokens/s are noisy and lower than on a quiet machine; the interleaved ratio "
        "is the comparable number.",
    ])
    print(table)
    if not opts.no_write:
        write_section(SECTION, table)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
