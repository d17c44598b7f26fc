"""LoRA (`configs/sst2-minilm-lora.toml`) against full fine-tuning (`configs/sst2-minilm.toml`)
of all-MiniLM-L6-v2 on SST-2 at the same batch and steps: test accuracy, trainable parameters,
peak memory, tokens/s; and the memory planner's prediction for a LoRA run against its measured
peak. Table into BENCHMARKS.md (section bench_lora).

1. The long runs: `bigbatch train RECIPE --train.max_steps=STEPS` in fresh child processes,
   LoRA and full fine-tuning side by side (so they share the machine's load alike; each one's
   "other processes" then includes the other arm), unless `--reuse-full-ft`, which takes the
   full run's numbers from BENCHMARKS.md's bench_finetune section instead (the same recipe,
   batch and steps: 240). Each run's
   model is scored on test.tsv (the GLUE dev set) by bigbatch's own evaluation; the LoRA run's
   through `bigbatch export --merge`, so the score is also a check that the export is the model
   the run trained.
2. The step's cost: one micro-batch's forward and backward (64 sentences of 64 tokens, the
   recipes' 4,096 tokens) for full fine-tuning, LoRA, and LoRA without its dropout, interleaved
   in one process (`--step-rounds`), as ratios to full fine-tuning: what the adapters save in
   weight gradients against what their dropouts and thin matmuls add.
3. The planner: a short LoRA run with `batch.micro_batch_size = "auto"` gives plan.json (its
   choice and predicted peak). That run's own peak RSS is the largest probe's, not its
   training's (the probes run in its process), so the prediction is checked against a second
   run in a fresh process, with the chosen micro-batch fixed, on texts that each fill a whole
   64-token window (the planner plans full windows; SST-2's sentences are mostly far shorter).

Runs live in `--work DIR` (kept), so phase 1 may run on its own in the background:

    python benchmarks/bench_lora.py --reuse-full-ft --steps 240      # against bench_finetune's
    python benchmarks/bench_lora.py --steps 60                       # both arms, side by side
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

from bench_finetune import bigbatch_steps, classifier_test_metrics, tokens_per_s
from common import (
    BENCHMARKS_MD,
    ROOT,
    ChildRun,
    machine_description,
    others_during,
    run_child,
    today,
    write_section,
)

SECTION = "bench_lora"
LORA, FULL = "configs/sst2-minilm-lora.toml", "configs/sst2-minilm.toml"


def train(recipe: str, steps: int, out: Path, *extra: str) -> ChildRun:
    """One `bigbatch train` in a fresh process; its facts are kept beside the run (out.json)."""
    facts = out.with_suffix(".json")
    if facts.is_file():  # finished before (written only after a run succeeds): reuse it
        return ChildRun(**json.loads(facts.read_text()))
    child = run_child([sys.executable, "-m", "bigbatch", "train", recipe,
                       f"--train.max_steps={steps}", "--out", str(out), "--overwrite", *extra],
                      out.with_suffix(".log"))
    if child.returncode != 0:
        raise SystemExit(f"{recipe} failed:\n{child.log[-3000:]}")
    facts.write_text(json.dumps(asdict(child)))
    return child


def test_accuracy(model_dir: Path, recipe: str) -> float:
    """Accuracy on test.tsv of the plain Hugging Face classifier in `model_dir` (kept beside it,
    so that a rerun of the script does not score it again)."""
    kept = model_dir.parent / f"{model_dir.name}.test-accuracy.json"
    if kept.is_file():
        return json.loads(kept.read_text())["accuracy"]
    accuracy = score_on_test(model_dir, recipe)
    kept.write_text(json.dumps({"accuracy": accuracy}))
    return accuracy


def score_on_test(model_dir: Path, recipe: str) -> float:
    from bigbatch.config.files import load_config

    return classifier_test_metrics(model_dir, load_config(ROOT / recipe))[0]


def parameter_counts(recipe: str) -> tuple[int, int]:
    """(trainable, total) of the recipe's model, built as training builds it."""
    from bigbatch.config.files import load_config
    from bigbatch.model.adapters import apply_adapter, parameter_counts
    from bigbatch.model.hf import build_hf_model, parse_source

    cfg = load_config(ROOT / recipe)
    model = build_hf_model(parse_source(cfg.model.source), "sequence-classification", trust_remote_code=False,
                           labels=["0", "1"])
    return parameter_counts(apply_adapter(model, cfg.model, "sequence-classification"))


def step_costs(rounds: int) -> dict[str, float]:
    """Median seconds of one micro-batch's forward and backward per arm, the arms interleaved in
    each round so that they share the machine's load alike."""
    import statistics
    import time
    from dataclasses import replace

    import torch

    from bigbatch.config.files import load_config
    from bigbatch.engine.precision import make_precision
    from bigbatch.model.adapters import apply_adapter
    from bigbatch.model.hf import build_hf_model, parse_source

    def build(recipe: str, **model_overrides) -> torch.nn.Module:
        cfg = load_config(ROOT / recipe)
        model = build_hf_model(parse_source(cfg.model.source), "sequence-classification",
                               trust_remote_code=False, labels=["0", "1"])
        return apply_adapter(model, replace(cfg.model, **model_overrides), "sequence-classification").train()

    torch.manual_seed(0)
    arms = {"full fine-tuning": build(FULL), "LoRA": build(LORA),
            "LoRA, lora_dropout = 0": build(LORA, lora_dropout=0.0)}
    # The recipes' precision ("auto": bf16 where native), as their runs trained.
    precision = make_precision(load_config(ROOT / LORA).precision, torch.device("cpu"))
    input_ids = torch.randint(1000, 20000, (64, 64))
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
             "labels": torch.randint(0, 2, (64,))}
    seconds: dict[str, list[float]] = {name: [] for name in arms}
    for round_index in range(rounds + 1):  # round 0 warms up (allocator, kernel choice)
        for name, model in arms.items():
            began = time.perf_counter()
            with precision.autocast():
                loss = model(**batch).loss
            loss.backward()
            model.zero_grad(set_to_none=True)
            if round_index:
                seconds[name].append(time.perf_counter() - began)
    return {name: statistics.median(times) for name, times in seconds.items()}


def full_window_texts(path: Path, recipe: str, count: int) -> Path:
    """A TSV of `count` texts made of SST-2 training sentences, each exactly one full window of
    the recipe's max_length tokens (special tokens included), with SST-2's labels."""
    if path.is_file():
        return path
    from bigbatch.config.files import load_config
    from bigbatch.model.hf import load_tokenizer, parse_source

    cfg = load_config(ROOT / recipe)
    tokenizer = load_tokenizer(parse_source(cfg.model.source), cfg.data.tokenizer, False)
    content = cfg.data.max_length - tokenizer.num_special_tokens_to_add()
    rows = [line.split("\t") for line in
            (ROOT / cfg.data.path).read_text().splitlines()[1:] if line.strip()]
    texts, pending = [], []
    for sentence, label in rows:
        pending += tokenizer(sentence, add_special_tokens=False)["input_ids"]
        if len(pending) < content:
            continue
        text = tokenizer.decode(pending[:content]).replace("\t", " ")
        pending = []
        # Decoding and encoding again can merge or split a word-piece: keep exact fits only.
        if len(tokenizer(text)["input_ids"]) == cfg.data.max_length:
            texts.append(f"{text}\t{label.strip()}")
        if len(texts) == count:
            break
    path.write_text("sentence\tlabel\n" + "\n".join(texts) + "\n")
    return path


def ran_dtype(run_dir: Path) -> str:
    """The dtype a run trained in: its config.toml records what `precision.dtype = "auto"` chose."""
    import tomllib

    return tomllib.loads((run_dir / "config.toml").read_text())["precision"]["dtype"]


def recorded_full_ft() -> dict[str, float]:
    """bench_finetune's recorded full fine-tuning: test accuracy, tokens/s, peak RSS, steps."""
    text = BENCHMARKS_MD.read_text()
    section = text[text.index("<!-- bench_finetune:start -->"):
                   text.index("<!-- bench_finetune:end -->")]

    def number(pattern: str) -> float:
        return float(re.search(pattern, section).group(1).replace(",", ""))

    return {"accuracy": number(r"accuracy on test\.tsv\*\*.*\*\*([\d.]+) %\*\*") / 100,
            "tokens_per_s": number(r"training tokens/s[^|]*\| ([\d,]+) \|"),
            "peak_rss_mib": number(r"peak RSS \| ([\d,]+) MiB"),
            "steps": number(r"optimizer steps \(sentences seen\) \| (\d+)"),
            "wall_s": number(r"save included\) \| ([\d,]+) s")}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=240)
    parser.add_argument("--global-sequences", type=int, default=256,
                        help="sentences per optimizer step, both arms (the recipes say 256)")
    parser.add_argument("--eval-tokens", type=int, default=16384,
                        help="the runs' own validation set (the recipes say 16,384 tokens)")
    parser.add_argument("--step-rounds", type=int, default=5, help="0: no step-cost check")
    parser.add_argument("--plan-steps", type=int, default=4, help="0: no planner check")
    parser.add_argument("--reuse-full-ft", action="store_true",
                        help="take full fine-tuning's numbers from bench_finetune's section")
    parser.add_argument("--work", type=Path, default=Path("/tmp/bigbatch-bench-lora"))
    parser.add_argument("--no-write", action="store_true")
    opts = parser.parse_args(argv)
    command = "python benchmarks/bench_lora.py" + (" " + " ".join(argv) if argv else "")
    opts.work.mkdir(parents=True, exist_ok=True)
    python = sys.executable

    name = f"{opts.steps}x{opts.global_sequences}"
    lora_dir, full_dir = opts.work / f"lora-{name}", opts.work / f"full-{name}"
    schedule = [f"--batch.global_sequences={opts.global_sequences}",
                f"--train.eval_tokens={opts.eval_tokens}", "--train.eval_every=0"]
    # Side by side, so that both arms share the machine's load alike.
    with ThreadPoolExecutor(2) as pool:
        lora_run = pool.submit(train, LORA, opts.steps, lora_dir, *schedule)
        full_run = None if opts.reuse_full_ft else pool.submit(train, FULL, opts.steps, full_dir,
                                                               *schedule)
        lora = lora_run.result()
    merged = opts.work / f"lora-{name}-merged"
    if not (merged / "config.json").is_file():
        subprocess.run([python, "-m", "bigbatch", "export", str(lora_dir), "--format", "hf",
                        "--merge", "--out", str(merged)], check=True, cwd=ROOT)
    arms = {"LoRA": {"accuracy": test_accuracy(merged, LORA), "peak_rss_mib": lora.peak_rss_mib,
                     "tokens_per_s": tokens_per_s(*bigbatch_steps(lora_dir)),
                     "wall_s": lora.wall_s, "others": lora.other_cores}}
    if opts.reuse_full_ft:
        full = recorded_full_ft()
        if (full["steps"], opts.global_sequences) != (opts.steps, 256):
            raise SystemExit(f"the recorded full fine-tuning ran {full['steps']:.0f} steps of "
                             "256 sentences: run without --reuse-full-ft")
        arms["full fine-tuning (recorded, bench_finetune)"] = {**full, "others": None}
    else:
        child = full_run.result()
        arms["full fine-tuning"] = {"accuracy": test_accuracy(full_dir, FULL),
                                    "peak_rss_mib": child.peak_rss_mib,
                                    "tokens_per_s": tokens_per_s(*bigbatch_steps(full_dir)),
                                    "wall_s": child.wall_s, "others": child.other_cores}
    counts = {"LoRA": parameter_counts(LORA), "full": parameter_counts(FULL)}

    planner = ["Planner: not checked (--plan-steps 0)."]
    if opts.plan_steps:
        plan_dir = opts.work / f"plan-{opts.global_sequences}"
        planned = train(LORA, opts.plan_steps, plan_dir, *schedule,
                        "--batch.micro_batch_size=auto", "--batch.micro_batch_tokens=0")
        plan = json.loads((plan_dir / "plan.json").read_text())
        predicted = plan["predicted_peak_bytes"] / 2**20
        full_windows = full_window_texts(opts.work / "full-windows.tsv", LORA,
                                         opts.plan_steps * opts.global_sequences)
        checked = train(LORA, opts.plan_steps, opts.work / f"plan-{opts.global_sequences}-check",
                        *schedule, f"--data.path={full_windows}",
                        f"--batch.micro_batch_size={plan['micro_batch_size']}",
                        "--batch.micro_batch_tokens=0")
        error = predicted / checked.peak_rss_mib - 1
        planner = [
            f"Planner: a {opts.plan_steps}-step LoRA run with `batch.micro_batch_size = \"auto\"` "
            f"chose {plan['micro_batch_size']} windows x {plan['num_micro_steps']} micro-steps "
            f"and predicted a peak of {predicted:,.0f} MiB. A {opts.plan_steps}-step run with "
            f"that micro-batch fixed, in a fresh process, on texts that each fill one "
            f"64-token window, peaked at {checked.peak_rss_mib:,.0f} MiB RSS: prediction "
            f"**{100 * error:+.1f} %** (target: within 10 %). (The planning run's own peak, "
            f"{planned.peak_rss_mib:,.0f} MiB, is its largest probe's.)"]

    costs = ["Step cost: not measured (--step-rounds 0)."]
    if opts.step_rounds:
        medians, others = others_during(lambda: step_costs(opts.step_rounds))
        reference = medians["full fine-tuning"]
        costs = [f"Step cost: one micro-batch of 64 x 64 tokens, forward and backward, median "
                 f"of {opts.step_rounds} interleaved rounds in one process (other processes: "
                 f"{others:.2f} cores):", "",
                 "| arm | seconds | against full fine-tuning |", "|---|---:|---:|",
                 *(f"| {name} | {median:.2f} s | {median / reference:.2f}x |"
                   for name, median in medians.items())]

    full_name = next(name for name in arms if name != "LoRA")
    dtype = ran_dtype(lora_dir)
    rows = []
    for name, arm in arms.items():
        trainable, total = counts["LoRA" if name == "LoRA" else "full"]
        rows.append(f"| {name} | {trainable:,} of {total:,} ({100 * trainable / total:.2f} %) | "
                    f"**{100 * arm['accuracy']:.2f} %** | {arm['peak_rss_mib']:,.0f} MiB | "
                    f"{arm['tokens_per_s']:,.0f} | {arm['wall_s']:,.0f} s | "
                    + ("see bench_finetune" if arm["others"] is None else f"{arm['others']:.2f}")
                    + " |")
    gap = 100 * (arms["LoRA"]["accuracy"] - arms[full_name]["accuracy"])
    table = "\n".join([
        f"## LoRA against full fine-tuning: all-MiniLM-L6-v2 on SST-2 (`{LORA}`)",
        "",
        f"Command: `{command}` ({today()})  ",
        f"Machine: {machine_description()}  ",
        f"Both arms: {opts.steps} optimizer steps of {opts.global_sequences} sentences "
        f"(micro-batches of up to 4,096 padded tokens), {dtype}, AdamW with linear decay, the runs' "
        f"validation set {opts.eval_tokens:,} tokens of dev.tsv; full fine-tuning at lr 3e-4 "
        f"(`{FULL}`), LoRA at the lr its recipe gives. Accuracy on test.tsv (872 sentences, "
        "the GLUE dev set), the LoRA model scored as `bigbatch export --merge` wrote it.",
        "",
        "| arm | trainable parameters | test accuracy | peak RSS | training tokens/s | wall "
        "time | other processes (cores) |",
        "|---|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
        f"LoRA's accuracy minus full fine-tuning's: **{gap:+.2f} points** (target: within 1.5).",
        "",
        *costs,
        "",
        *planner,
        "",
        "Load: the machine's 2 cores are shared with other agents' work; tokens/s and wall "
        "times are load-sensitive (the last column is what other processes used during each "
        "run, from /proc/stat), accuracy, parameter counts and memory are not.",
    ])
    print(table)
    if not opts.no_write:
        write_section(SECTION, table)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
