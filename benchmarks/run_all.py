"""`make bench`: run every `benchmarks/bench_*.py` as its own process, one after another.

Each benchmark writes its own marked section of BENCHMARKS.md. Separate processes keep one
benchmark's threads, heap and imports from colouring the next one's numbers; running them one at
a time keeps them from competing for the cores. Arguments after `--` go to every benchmark
(e.g. `--no-write`). A benchmark that fails is reported and the rest still run; the exit status
is non-zero if any failed. A benchmark whose optional dependency is missing says so in one line
and exits 0 (bench_sft_trl without TRL: `make bench` installs the `bench` extra first).

    python benchmarks/run_all.py [NAME_SUBSTRING ...] [-- ARGS]
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv: list[str]) -> int:
    split = argv.index("--") if "--" in argv else len(argv)
    names, passed_on = argv[:split], argv[split + 1:]
    scripts = sorted(HERE.glob("bench_*.py"))
    if names:
        scripts = [s for s in scripts if any(n in s.stem for n in names)]
    if not scripts:
        print(f"no benchmarks/bench_*.py matched {names or 'anything'}")
        return 1
    failed = []
    for script in scripts:
        print(f"== {script.name}", flush=True)
        started = time.perf_counter()
        code = subprocess.call([sys.executable, str(script), *passed_on], cwd=HERE.parent)
        print(f"== {script.name}: exit {code} after {time.perf_counter() - started:.0f}s",
              flush=True)
        if code != 0:
            failed.append(script.name)
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
