"""A pure refactor must not change what is learned (torchtitan's rule): the same runs from two
source trees, compared bit for bit.

    git worktree add /tmp/before <commit before the refactor>
    python benchmarks/refactor_check.py /tmp/before/src src

Runs, from each tree in turn (PYTHONPATH set to it): `configs/tiny.toml` for its 150 steps and
the default recipe for 3 steps, each in one process and with `--nproc 2`, and a classification
and a LoRA run of 3 steps of 32 SST-2 sentences, in one process and with `--nproc 2`. Compares
every metrics.jsonl row (the timings tokens_per_s, step_seconds and peak_memory_bytes left out)
and the bytes of every final *.safetensors file. Exits 1 on any difference. About 10 minutes
per tree on a 2-core CPU. Not a benchmark (`make bench` runs bench_*.py only).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
TIMINGS = {"tokens_per_s", "step_seconds", "peak_memory_bytes"}
SST2 = ["--train.max_steps=3", "--batch.global_sequences=32", "--batch.micro_batch_tokens=1024",
        "--train.eval_tokens=2048", "--train.eval_every=2"]
RUNS = {
    "tiny": ["configs/tiny.toml", f"--data.path={SHARED / 'tinyshakespeare' / 'input.txt'}"],
    "default": ["--train.max_steps=3"],
    "classify": ["configs/sst2-minilm.toml", *SST2],
    "lora": ["configs/sst2-minilm-lora.toml", *SST2],
}


def run_all(src: Path, out: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(src.resolve())}
    for name, args in RUNS.items():
        for ranks in (1, 2):
            run_dir = out / f"{name}-{ranks}"
            command = [sys.executable, "-m", "bigbatch", "train", *args, "--out", str(run_dir),
                       "--overwrite", "--checkpoint.every_steps=0"]
            if ranks > 1:
                command += ["--nproc", str(ranks)]
            print(f"{src}: {run_dir.name}", flush=True)
            done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
            if done.returncode != 0:
                sys.exit(f"{run_dir.name} failed from {src}:\n{done.stderr[-2000:]}")


def rows(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMINGS} for line in lines]


def weights(run_dir: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run_dir.glob("*.safetensors"))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path, help="the src/ directory of the tree before")
    parser.add_argument("after", type=Path, help="the src/ directory of the tree after")
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        outs = [Path(scratch) / "before", Path(scratch) / "after"]
        for src, out in zip((opts.before, opts.after), outs, strict=True):
            run_all(src, out)
        same = True
        for run_dir in sorted(outs[0].iterdir()):
            other = outs[1] / run_dir.name
            equal_rows, equal_weights = rows(run_dir) == rows(other), weights(run_dir) == weights(other)
            same &= equal_rows and equal_weights and bool(weights(run_dir))
            print(f"{run_dir.name}: {len(rows(run_dir))} metrics rows "
                  f"{'equal' if equal_rows else 'DIFFER'}; weights "
                  f"{'equal' if equal_weights else 'DIFFER'}")
    print("bitwise equal" if same else "DIFFERENT")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
