"""bigbatch's SFT (`train.task = "sft"`) side by side with TRL's `SFTTrainer` on the same model,
data, batch and steps; and the accumulation check at k = 1 and k = 8 on both. Table into
BENCHMARKS.md.

    python benchmarks/bench_sft_trl.py                      # 2-layer, 128-wide GPT-2; 60 steps
    python benchmarks/bench_sft_trl.py --steps 300 --n-layer 4 --d-model 256 --device cuda

Needs TRL (`pip install -e ".[bench]"`, which `make bench` does); without it, it says so and
exits 0. The data is configs/sft-sst2.toml's: SST-2 reviews from ../shared as {"prompt":
"Review: ...\\nSentiment:", "response": " positive" | " negative"}, with the GPT-2 tokenizer. One
GPT-2 is built from a config at a fixed seed and saved; both arms start from it (bigbatch by
`model.source = "hf:DIR"`). Both pack examples best-fit decreasing into rows of `--seq-len`
tokens with positions restarting per example (TRL: `packing=True`, bfd, padding-free) and take
the loss on the responses and their end of text only, over the same global batch of rows,
micro-batch, steps and AdamW + warmup + cosine schedule. Each arm is its own child process, so
its peak memory (CPU: peak RSS; GPU: max allocated) is its own; afterwards one child scores both
final models with the same two functions (benchmarks/sft_trl_shared.py): the exact mean of the
response-token cross-entropy over the validation reviews, and exact match of greedy answers.
tokens/s counts real (not padding) tokens over the optimizer steps after the first. The gradient
check is benchmarks/sft_trl_gradients.py's.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import sys
import tempfile
from pathlib import Path

from common import ROOT, machine_description, run_child, today, write_section

SECTION = "bench_sft_trl"
SHARED = ROOT.parent / "shared"
SST2, BPE = SHARED / "data" / "sst2", SHARED / "models" / "gpt2-bpe"
HERE = Path(__file__).resolve().parent


def build_start(args: argparse.Namespace, scratch: Path) -> dict:
    """The data, the initial model and the spec both arms read."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    import sft_trl_shared as shared

    model_dir = scratch / "initial"
    tokenizer = AutoTokenizer.from_pretrained(str(BPE))
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=max(256, args.seq_len),
                        n_embd=args.d_model, n_layer=args.n_layer, n_head=max(1, args.d_model // 32),
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(args.seed)
    GPT2LMHeadModel(config).save_pretrained(str(model_dir))
    tokenizer.save_pretrained(str(model_dir))
    files = {}
    for name, rows in (("train", shared.sst2_rows(SST2 / "train.tsv", args.train_rows)),
                       ("val", shared.sst2_rows(SST2 / "dev.tsv", args.val_rows))):
        files[name] = scratch / f"{name}.jsonl"
        files[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"scratch": str(scratch), "model_dir": str(model_dir),
            "train_jsonl": str(files["train"]), "val_jsonl": str(files["val"]),
            "sst2_train": str(SST2 / "train.tsv"), "grad_offset": args.train_rows,
            "seq_len": args.seq_len, "global_rows": args.global_rows,
            "micro_rows": args.micro_rows, "steps": args.steps, "lr": args.lr,
            "warmup": args.warmup, "weight_decay": 0.1, "beta1": 0.9, "beta2": 0.95,
            "eps": 1e-8, "clip": 1.0, "device": args.device, "seed": args.seed}


def run_arm(arm: str, spec: dict, scratch: Path) -> dict:
    spec_path, result_path = scratch / "spec.json", scratch / f"{arm}.json"
    spec_path.write_text(json.dumps(spec))
    pythonpath = os.pathsep.join(p for p in (str(HERE), os.environ.get("PYTHONPATH")) if p)
    child = run_child([sys.executable, str(HERE / "sft_trl_arms.py"), arm, str(spec_path),
                       str(result_path)], scratch / f"{arm}.log", env={"PYTHONPATH": pythonpath})
    if child.returncode != 0:
        sys.exit(f"bench_sft_trl: the {arm} arm failed:\n{child.log[-4000:]}")
    result = json.loads(result_path.read_text())
    print(f"{arm}: {child.wall_s:.0f}s, peak RSS {child.peak_rss_mib:.0f} MiB", flush=True)
    return {**result, "wall_s": child.wall_s, "peak_rss_mib": child.peak_rss_mib,
            "other_cores": child.other_cores}


def versions() -> str:
    return ", ".join(f"{name} {importlib.metadata.version(name)}"
                     for name in ("torch", "transformers", "trl", "accelerate", "datasets"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--n-layer", type=int, default=2)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--global-rows", type=int, default=16, help="packed rows per step")
    parser.add_argument("--micro-rows", type=int, default=4, help="rows per micro-batch")
    parser.add_argument("--train-rows", type=int, default=2400, help="SST-2 training reviews")
    parser.add_argument("--val-rows", type=int, default=200, help="SST-2 dev reviews scored")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=int, default=6)
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--no-gradients", action="store_true", help="skip the accumulation check")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    if importlib.util.find_spec("trl") is None:
        print("bench_sft_trl: skipped: TRL is not installed (pip install -e '.[bench]', which "
              "`make bench` does)")
        return 0
    if not (SST2 / "train.tsv").is_file() or not (BPE / "vocab.json").is_file():
        sys.exit(f"bench_sft_trl: {SST2} or {BPE} is missing: it needs ../shared beside the project")
    if args.global_rows % args.micro_rows:
        sys.exit(f"--global-rows {args.global_rows} is not a multiple of --micro-rows "
                 f"{args.micro_rows}")
    with tempfile.TemporaryDirectory(prefix="bench-sft-trl-") as tmp:
        scratch = Path(tmp)
        spec = build_start(args, scratch)
        arms = {arm: run_arm(arm, spec, scratch) for arm in ("bigbatch", "trl")}
        evaluation = run_arm("evaluate", {**spec, "finals": {
            arm: result["final_dir"] for arm, result in arms.items()}}, scratch)
        checked = None if args.no_gradients else run_arm("gradients", spec, scratch)
    from sft_trl_report import render

    markdown = render(args, spec, arms, evaluation, checked, command_line(argv),
                      f"{today()}; {machine_description()}; {versions()}")
    print(markdown)
    if not args.no_write:
        write_section(SECTION + ("_cuda" if args.device == "cuda" else ""), markdown)
    return 0


def command_line(argv: list[str] | None) -> str:
    return " ".join(["python benchmarks/bench_sft_trl.py", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
