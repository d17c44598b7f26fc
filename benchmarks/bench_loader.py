"""The training loader's cost per micro-batch against the size of the corpus it reads.

    .venv/bin/python benchmarks/bench_loader.py [--text-gb 0.2,1,3,10] [--no-write]

`TokenLoader` gathers random windows from the memory-mapped token file (data/loader.py), so its
cost should not grow with the corpus. Building a 3 or 10 GB text corpus takes hours on this
machine (bench_data), and what the loader reads is only the token file: so the files here are
token files of the size those corpora tokenize to (3.35 bytes of text per token, bench_data's
1 GB row), of seeded random token ids in uint16 (the loader's cost does not depend on their
values), written once into BENCH_TMP (default /tmp) and kept in the page cache as a trained-on
corpus would be. All loaders run interleaved in one process, step by step (16 x 256-token
micro-batches, 4 per step), so drift and other processes hit every size alike; each is timed
over its first steps (first touches of a fresh mapping) and over the steps after; minor page
faults are counted per micro-batch (getrusage), and the loader's start (the epoch's window
order: data/window_order.py) is timed once.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bigbatch.batch import split_batch
from bigbatch.data.loader import TokenLoader
from common import machine_description, others_during, timed_lines, today, write_section

VOCAB = 8192
DOC_TOKENS = 2048
TEXT_BYTES_PER_TOKEN = 3.35  # bench_data: 1.00 GB of site-packages text -> 298M tokens
FIRST_STEPS, LATER_STEPS = 40, 160


def token_file(text_gb: float, directory: Path, eot: int | None = None) -> Path:
    """A uint16 token file of seeded random ids as long as `text_gb` GB of text tokenizes to,
    written once; with `eot`, a nanoGPT-style corpus: end-of-text every DOC_TOKENS ids."""
    length = int(text_gb * 1e9 / TEXT_BYTES_PER_TOKEN)
    path = directory / f"bench_loader_{'corpus_' if eot is not None else ''}{length}.bin"
    if not path.exists() or path.stat().st_size != 2 * length:
        rng = np.random.default_rng(0)
        out = np.memmap(path, dtype=np.uint16, mode="w+", shape=(length,))
        for start in range(0, length, 50_000_000):
            end = min(length, start + 50_000_000)
            ids = rng.integers(0, VOCAB, end - start, dtype=np.uint16)
            if eot is not None:
                ids[(np.arange(start, end) % DOC_TOKENS) == DOC_TOKENS - 1] = eot
            out[start:end] = ids
        out.flush()
        del out
    return path


def measure(sizes: list[float], directory: Path) -> list[str]:
    plan = split_batch(global_tokens=256 * 16 * 4, seq_len=256, micro_batch_size=16,
                      world_size=1)
    loaders, starts = {}, {}
    for size in sizes:
        tokens = np.memmap(token_file(size, directory), dtype=np.uint16, mode="r")
        began = time.perf_counter()
        loaders[size] = TokenLoader(tokens, 0, plan, 0, 1)
        starts[size] = time.perf_counter() - began
    rows = []
    stats: dict[float, dict[str, list]] = {s: {"first": [], "later": [], "faults": []}
                                           for s in sizes}

    def run() -> None:
        for step in range(FIRST_STEPS + LATER_STEPS):
            for size, loader in loaders.items():
                faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                began = time.perf_counter()
                loader.next_step()
                seconds = (time.perf_counter() - began) / plan.num_micro_steps
                stats[size]["first" if step < FIRST_STEPS else "later"].append(seconds)
                stats[size]["faults"].append(
                    (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults)
                    / plan.num_micro_steps)

    _, others = others_during(run)
    base = min(sizes)
    base_first = float(np.median(stats[base]["first"]))
    base_later = float(np.median(stats[base]["later"]))
    for size in sizes:
        first, later = (float(np.median(stats[size][k])) for k in ("first", "later"))
        rows.append(f"| {size:g} GB | {len(loaders[size].tokens) / 1e6:,.0f}M | "
                    f"{2 * len(loaders[size].tokens) / 1e9:.2f} GB | {starts[size]:.2f} s | "
                    f"{1e3 * first:.3f} ms ({first / base_first:.2f}x) | "
                    f"{1e3 * later:.3f} ms (**{later / base_later:.2f}x**) | "
                    f"{np.mean(stats[size]['faults']):.1f} |")
    return rows + ["", f"Other processes used {others:.2f} cores meanwhile."]


def warm_start_rows(sizes: list[float], directory: Path) -> list[str]:
    """`bigbatch train` on a warm cache of each size: seconds to its corpus line and first step."""
    from bigbatch.data.tokenizer import eot_id, save_atomically, train_bpe

    work = Path(tempfile.mkdtemp(prefix="bench_loader_", dir=directory))
    try:
        sample = [p.read_text(errors="replace") for p in sorted(Path(np.__file__).parent.rglob(
            "*.py"))[:400]]
        tokenizer = train_bpe(sample, VOCAB)
        (work / "tokenizer").mkdir()
        save_atomically(tokenizer, work / "tokenizer" / "tokenizer.json")
        rows = []
        for size in sizes:
            corpus = token_file(size, directory, eot=eot_id(tokenizer))
            argv = [sys.executable, "-m", "bigbatch", "train", "configs/tiny.toml",
                    f"--data.path={corpus}", f"--data.tokenizer={work / 'tokenizer'}",
                    f"--data.cache_dir={work / 'cache'}", "--train.eval_every=0",
                    "--train.eval_tokens=4096", "--overwrite", f"--out={work / 'run'}"]
            began = time.perf_counter()
            timed_lines([*argv, "--train.max_steps=1"], work / "cold.log")  # prepares the cache
            cold = time.perf_counter() - began
            seen = timed_lines([*argv, "--train.max_steps=2"], work / "warm.log")
            others = os.getloadavg()[0]
            rows.append(f"| {size:g} GB | {corpus.stat().st_size / 1e9:.2f} GB | "
                        f"{cold:.0f} s | {seen['data']:.1f} s | **{seen['step']:.1f} s** | "
                        f"{seen['end']:.1f} s | {others:.1f} |")
            corpus.unlink()
        return rows
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--text-gb", default="0.2,1,3,10")
    parser.add_argument("--warm-gb", default="0.2,3", help="text sizes of the warm starts")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    sizes = [float(s) for s in args.text_gb.split(",")]
    directory = Path(os.environ.get("BENCH_TMP", "/tmp"))
    started = time.perf_counter()
    rows = measure(sizes, directory)
    body = [
        "## Loader cost against corpus size (bench_loader)", "",
        f"Command: `.venv/bin/python benchmarks/bench_loader.py --text-gb {args.text_gb} "
        f"--warm-gb {args.warm_gb}`, "
        f"{today()}, {machine_description()}. Token files of the length each text size "
        f"tokenizes to ({TEXT_BYTES_PER_TOKEN} bytes of text per token), memory-mapped, in the "
        f"page cache; micro-batches of 16 x 256 tokens, 4 per step, every size interleaved "
        f"step by step; median time per micro-batch over the first {FIRST_STEPS} steps and "
        f"the {LATER_STEPS} after; ratios against the smallest.", "",
        "| text | tokens | token file | loader start (window order) | first steps | later steps "
        "| page faults per micro-batch |",
        "|---|---|---|---|---|---|---|",
        *rows, "",
        "### Warm start against corpus size", "",
        "`bigbatch train configs/tiny.toml --data.path=CORPUS.bin --data.tokenizer=DIR "
        "--train.eval_every=0 --train.eval_tokens=4096 --train.max_steps=2` on a warm cache "
        "(a first run with `--train.max_steps=1` prepared it: the time in \"cold\"), where "
        "CORPUS.bin is a pre-tokenized nanoGPT-style file (uint16 ids, a document every "
        f"{DOC_TOKENS} tokens) as long as the text size tokenizes to: seconds from the command "
        "to its corpus line and to its first step (Python, torch, model and evaluation "
        "start-up included) and to its end (report included).", "",
        "| text | token file | cold (prepare + 1 step) | corpus line | first step | end | "
        "load average |",
        "|---|---|---|---|---|---|---|",
        *warm_start_rows([float(s) for s in args.warm_gb.split(",")], directory), "",
        f"({time.perf_counter() - started:.0f} s.)"]
    print("\n".join(body))
    if not args.no_write:
        write_section("bench_loader", "\n".join(body))
    for path in directory.glob("bench_loader_*.bin"):
        path.unlink()  # GBs of scratch: rewritten (seeded) by the next run


if __name__ == "__main__":
    main()
