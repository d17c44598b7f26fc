"""SFT packed (`data.packing = true`) against padded (`false`) on configs/sft-sst2.toml's data: the
share of computed positions that are real tokens, and real tokens/s of `bigbatch train` on a tiny
GPT-2, and each run's peak RSS; table into BENCHMARKS.md.

    python benchmarks/bench_sft_padding.py              # 8 steps each way, 2-layer 64-wide GPT-2
    python benchmarks/bench_sft_padding.py --steps 18 --rounds 2

Fill: the recipe's SST-2 rows (GPT-2 BPE; data.seq_len 128, micro_batch_size 16, global batch
16,384 tokens) packed best-fit into rows, against one epoch of padded steps (each micro-batch
padded to its longest example). tokens/s: each variant a fresh `bigbatch train` child on the
recipe with a `--n-layer`/`--d-model` GPT-2 (make_sft_data.py), the first step left out; the
packed run's logged tokens/s counts its rows' positions, so its real tokens/s is that times the
fill.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from bench_train import command_line
from common import ROOT, machine_description, run_child, today, write_section

SECTION = "bench_sft_padding"
SEQ_LEN, MICRO_BATCH_SIZE, GLOBAL_TOKENS = 128, 16, 16384


def fills(data: Path) -> dict[str, float]:
    """Real tokens / computed positions, packed and padded, and micro-steps per step."""
    import numpy as np
    from transformers import AutoTokenizer

    from bigbatch.batch import split_batch
    from bigbatch.tasks.sft.examples import Fields, read_rows, tokenize_rows
    from bigbatch.tasks.sft.packing import pack_examples
    from bigbatch.tasks.sft.padding import PaddedLoader, pad_examples

    tokenizer = AutoTokenizer.from_pretrained(str(data / "model"))
    examples = tokenize_rows(read_rows(data / "train.jsonl"), Fields(), tokenizer, shape="pair",
                             eot_id=tokenizer.eos_token_id)
    pairs = [(e.ids, e.loss) for e in examples]
    packed = pack_examples(pairs, SEQ_LEN, tokenizer.eos_token_id, seed=0)
    padded = pad_examples(pairs, SEQ_LEN, tokenizer.eos_token_id)
    loader = PaddedLoader(padded, split_batch(GLOBAL_TOKENS, SEQ_LEN, MICRO_BATCH_SIZE), 0, 0)
    real = positions = steps = micro_steps = 0
    while loader.sampler.epoch == 0:
        micro_batches = loader.next_step()
        real += loader.last_step_tokens
        positions += sum(mb.inputs.numel() for mb in micro_batches)
        steps, micro_steps = steps + 1, micro_steps + len(micro_batches)
    return {"examples": len(pairs), "mean_length": float(np.mean(padded.lengths)),
            "packed_fill": packed.fill, "padded_fill": real / positions,
            "packed_micro_steps": GLOBAL_TOKENS // (SEQ_LEN * MICRO_BATCH_SIZE),
            "padded_micro_steps": micro_steps / steps, "padded_step_tokens": real / steps}


def tokens_per_s(out: Path) -> tuple[float, float]:
    """(logged tokens/s over the timed steps, mean micro-steps), the first step left out."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in rows if "tokens_per_s" in r][1:]
    return (sum(r["tokens_per_s"] * r["step_seconds"] for r in timed)
            / sum(r["step_seconds"] for r in timed),
            statistics.mean(r["num_micro_steps"] for r in timed))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=8, help="train.max_steps per run")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--n-layer", type=int, default=2)
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    runs: dict[str, list[dict[str, float]]] = {"true": [], "false": []}
    with tempfile.TemporaryDirectory(prefix="bench-sft-padding-") as scratch:
        data = Path(scratch) / "sft-sst2"
        made = run_child([sys.executable, str(ROOT / "benchmarks" / "make_sft_data.py"), "--out",
                          str(data), "--n-layer", str(args.n_layer), "--d-model",
                          str(args.d_model)], Path(scratch) / "make.log")
        if made.returncode != 0:
            sys.exit(f"make_sft_data.py failed:\n{made.log[-3000:]}")
        fill = fills(data)
        print(fill, flush=True)
        for round_index in range(args.rounds):
            order = ("true", "false") if round_index % 2 == 0 else ("false", "true")
            for packing in order:
                out = Path(scratch) / f"r{round_index}-{packing}"
                child = run_child([
                    sys.executable, "-m", "bigbatch", "train", "configs/sft-sst2.toml",
                    "--out", str(out), f"--data.path={data / 'train.jsonl'}",
                    f"--data.val_path={data / 'val.jsonl'}", f"--data.tokenizer={data / 'model'}",
                    f"--model.source=hf-config:{data / 'model' / 'config.json'}",
                    f"--train.max_steps={args.steps}", "--train.eval_every=0",
                    "--train.eval_tokens=2048", "--data.eval_generations=0",
                    "--train.trackers=[]", "--checkpoint.every_minutes=0",
                    "--checkpoint.every_steps=0", "--train.device=cpu",
                    f"--data.packing={packing}"], Path(scratch) / f"{out.name}.log")
                if child.returncode != 0:
                    sys.exit(f"data.packing={packing} failed:\n{child.log[-3000:]}")
                logged, micro_steps = tokens_per_s(out)
                real = logged * (fill["packed_fill"] if packing == "true" else 1.0)
                row = {"real_tokens_per_s": real, "micro_steps": micro_steps,
                       "other_cores": child.other_cores, "peak_rss_mib": child.peak_rss_mib,
                       "cpu_s": child.cpu_s}
                runs[packing].append(row)
                print(f"round {round_index + 1} data.packing={packing}: {row}", flush=True)
    markdown = render(args, fill, runs)
    print(markdown)
    if not args.no_write:
        write_section(SECTION, markdown)
    return 0


def each(rows: list[dict[str, float]], key: str) -> str:
    return ", ".join(f"{row[key]:,.0f}" for row in rows)


def render(args: argparse.Namespace, fill: dict[str, float],
           runs: dict[str, list[dict[str, float]]]) -> str:
    worst = max(r["other_cores"] for rows in runs.values() for r in rows)
    ratios = [pad["real_tokens_per_s"] / pack["real_tokens_per_s"]
              for pack, pad in zip(runs["true"], runs["false"], strict=True)]
    lines = [
        "## SFT: packed rows against padded micro-batches",
        "",
        f"`{command_line()}` ({today()}; CPU; {machine_description()}). "
        f"{fill['examples']:,} SST-2 training rows (GPT-2 BPE, {fill['mean_length']:.1f} tokens "
        f"on average), data.seq_len {SEQ_LEN}, micro_batch_size {MICRO_BATCH_SIZE}, global batch "
        f"{GLOBAL_TOKENS:,} tokens (configs/sft-sst2.toml); `bigbatch train` of a "
        f"{args.n_layer}-layer, {args.d_model}-wide GPT-2 for {args.steps} steps, the first "
        f"left out; {args.rounds} round(s); other processes used up to {worst:.2f} cores.",
        "",
        "| data.packing | real tokens / computed positions | micro-steps per step | "
        "real tokens/s (each round) | peak RSS, MiB (each round) |",
        "|---|---|---|---|---|",
        f"| true (packed) | {100 * fill['packed_fill']:.1f}% | {fill['packed_micro_steps']} | "
        + each(runs["true"], "real_tokens_per_s") + " | " + each(runs["true"], "peak_rss_mib")
        + " |",
        f"| false (padded) | {100 * fill['padded_fill']:.1f}% | "
        f"{fill['padded_micro_steps']:.1f} | " + each(runs["false"], "real_tokens_per_s")
        + " | " + each(runs["false"], "peak_rss_mib") + " |",
        "",
        f"Real tokens/s, padded / packed, median of the rounds: {statistics.median(ratios):.3f}. "
        f"A padded step holds {fill['padded_step_tokens']:,.0f} real tokens on average (whole "
        f"examples up to the {GLOBAL_TOKENS:,}-token budget). Peak RSS is the run's whole "
        "process under the default `train.allocator = \"tuned\"` (glibc keeps freed memory): "
        "padded shapes change every micro-step and fragment that heap (README, SFT).",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
