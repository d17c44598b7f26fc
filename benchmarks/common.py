"""What every benchmark here shares: running a child and measuring it, the load check, the matmul
peak, the machine's description, and writing one marked section of BENCHMARKS.md.

Each measured run is a fresh child process so that one run's heap, threads and caches never help
or hurt the next. `os.wait4` gives that child's own peak RSS and CPU time (RUSAGE_CHILDREN would
give the maximum over every child so far). The load check compares the machine's busy time in
/proc/stat over the child's life with the CPU time the child and this process used: the rest
belongs to other processes, and a run that shared the cores with them is marked disturbed.
"""

from __future__ import annotations

import datetime
import os
import platform
import re
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS_MD = ROOT / "BENCHMARKS.md"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

INTRO = """# Benchmarks

Written by `make bench` (`benchmarks/run_all.py`, which runs every `benchmarks/bench_*.py` as its
own process). Each section below comes from one benchmark and is replaced whole when that
benchmark runs again; it names the command that produced it, the machine, the date and the load
from other processes during the run. Compared runs are interleaved in one invocation, each in a
fresh child process, and every ratio is computed from runs of that same invocation. A run during
which other processes used more than a set share of the CPU is repeated (up to a set number of
tries) and the table says so.
"""


@dataclass
class CpuTimes:
    busy: float    # seconds of CPU time spent by anything, all cores
    steal: float   # seconds the hypervisor gave our virtual cores to someone else


def read_cpu_times() -> CpuTimes:
    # First line of /proc/stat: cpu user nice system idle iowait irq softirq steal guest guest_nice
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    # guest time is already counted in user, so it is not added again.
    return CpuTimes(busy=(user + nice + system + irq + softirq) / CLOCK_TICKS,
                    steal=steal / CLOCK_TICKS)


def loadavg() -> float:
    """One-minute load average: runnable processes, ours included."""
    return float(Path("/proc/loadavg").read_text().split()[0])


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@dataclass
class ChildRun:
    returncode: int
    wall_s: float
    cpu_s: float             # the child's user + system time
    peak_rss_mib: float      # the child's own high-water mark (ru_maxrss)
    other_cores: float       # CPU used by other processes (and steal), in cores, over the run
    loadavg_before: float
    log: str                 # the child's stdout and stderr

    def disturbed(self, max_other_cores: float) -> bool:
        return self.other_cores > max_other_cores


def run_child(argv: list[str], log_path: Path, env: dict[str, str] | None = None) -> ChildRun:
    """Run `argv` to completion and measure it; its output goes to `log_path`."""
    load_before = loadavg()
    cpu_before, own_before = read_cpu_times(), own_cpu_seconds()
    started = time.perf_counter()
    with log_path.open("w") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                env={**os.environ, **(env or {})})
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)  # so Popen does not wait again
    wall = time.perf_counter() - started
    cpu_after, own_after = read_cpu_times(), own_cpu_seconds()
    child_cpu = usage.ru_utime + usage.ru_stime
    others = (cpu_after.busy - cpu_before.busy) - child_cpu - (own_after - own_before)
    others += cpu_after.steal - cpu_before.steal
    return ChildRun(returncode=proc.returncode, wall_s=wall, cpu_s=child_cpu,
                    peak_rss_mib=usage.ru_maxrss / 1024,  # Linux reports KiB
                    other_cores=max(others, 0.0) / wall, loadavg_before=load_before,
                    log=log_path.read_text())


def compare_page(run_dirs: list[Path], scratch: Path) -> Path:
    """`bigbatch compare` of `run_dirs` into SCRATCH/compare.html (one seed of every arm: the
    curves to look at beside a benchmark's table); says where it is."""
    page = scratch / "compare.html"
    run_child([sys.executable, "-m", "bigbatch", "compare", *map(str, run_dirs), "--out",
               str(page)], scratch / "compare.log")
    print(f"compare page: {page}")
    return page


def matmul_peak(dtype_name: str, threads: int, seconds: float = 1.0) -> float:
    """Best FLOP/s of a large square `torch.mm` in `dtype_name` ("fp32" or "bf16").

    2048 is already large enough to reach the kernels' peak here; larger sizes only cost time.
    """
    import torch

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    best = 0.0
    try:
        for n in (1024, 2048):
            a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
            torch.mm(a, b)  # warm-up: kernel selection and first-touch of the output
            deadline = time.perf_counter() + seconds / 2
            while time.perf_counter() < deadline:
                began = time.perf_counter()
                torch.mm(a, b)
                best = max(best, 2 * n**3 / (time.perf_counter() - began))
    finally:
        torch.set_num_threads(previous)
    return best


def others_during(measure: Callable[[], T]) -> tuple[T, float]:
    """Run `measure()` in this process; also return the cores other processes used meanwhile."""
    cpu_before, own_before = read_cpu_times(), own_cpu_seconds()
    started = time.perf_counter()
    result = measure()
    wall = time.perf_counter() - started
    cpu_after, own_after = read_cpu_times(), own_cpu_seconds()
    others = (cpu_after.busy - cpu_before.busy) - (own_after - own_before)
    others += cpu_after.steal - cpu_before.steal
    return result, max(others, 0.0) / wall


def machine_description() -> str:
    import torch

    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = re.search(r"^model name\s*:\s*(.*)$", cpuinfo, re.M)
    flags = re.search(r"^flags\s*:\s*(.*)$", cpuinfo, re.M)
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")
    have = [f for f in wanted if flags and f in flags.group(1).split()]
    return (f"{model.group(1) if model else platform.processor()} ({os.cpu_count()} cores visible; "
            f"{', '.join(have) or 'no AVX2'}), torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, Python {platform.python_version()}")


def today() -> str:
    return datetime.datetime.now().strftime("%Y-%m-%d %H:%M")


def write_section(name: str, markdown: str, path: Path = BENCHMARKS_MD) -> None:
    """Replace the text between `<!-- name:start -->` and `<!-- name:end -->` (or append it),
    leaving the intro and the other benchmarks' sections as they are."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{markdown.strip()}\n{end}"
    text = path.read_text() if path.exists() else INTRO
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)  # others write their sections too: never leave a half-written file


def timed_lines(argv: list[str], log_path: Path) -> dict[str, float]:
    """Run `argv`; seconds from its start to its first `data:` line and first step line."""
    began, seen = time.perf_counter(), {}
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          cwd=ROOT) as proc, log_path.open("w") as log:
        for line in proc.stdout:
            log.write(line)
            for key, pattern in (("data", r"^data: [0-9,]+ training"), ("step", r"^step 1/")):
                if key not in seen and re.search(pattern, line):
                    seen[key] = time.perf_counter() - began
                    seen[f"{key}_line"] = line.strip()
    seen["end"] = time.perf_counter() - began
    if proc.returncode != 0:
        raise RuntimeError(f"{argv} failed:\n{log_path.read_text()[-3000:]}")
    return seen
