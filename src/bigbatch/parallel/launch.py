"""`bigbatch train|verify --nproc N`: start torchrun on this node and run the same subcommand.

A convenience for one machine only; for several, run torchrun yourself (README, "Several
processes and machines"). `--standalone` makes torchrun pick a free port and rendezvous on
localhost.

Signals: SIGTERM/SIGINT to this process are passed on to torchrun, once, and torchrun passes
them on to each worker, which finishes its step, writes the stop checkpoint and exits 128 +
signal. torchrun gives the workers `TORCH_ELASTIC_SHUTDOWN_TIMEOUT` seconds (its own default,
30, is raised to `SHUTDOWN_GRACE_SECONDS` here: a step plus a checkpoint of a large model can
take longer) before it SIGKILLs them, and then exits 1, whatever the workers said; this process
exits 128 + signal instead, the code one process gives. torchrun runs in a session of its own,
so a terminal's Ctrl-C reaches it only through here and the workers get one signal, not two. A
second signal goes straight to the workers, which then stop at once (preemption.py).

Errors: bad input is one line and exit 2 here as in one process, printed once. What the launcher
can check is checked before torchrun starts (cli.py). A worker's own error goes through a folder
the launcher makes (`LAUNCH_DIR_ENV`): a UsageError's message as `rank{R}.error`, any other
exception's traceback as `rank{R}.crash` (report_to_launcher); when torchrun fails, the launcher
raises the first message as its own UsageError, or says in one line which rank crashed (or died
of a signal: torchrun's report says so) and where the log is. torchrun's own output (its banner,
its logging, the ChildFailedError report) goes to that log (`torchrun.log` in the run directory,
else a temporary file): torchrun runs inside `run_torchrun`, which points Python's stderr at the
log before torch is imported, while the file descriptors the workers inherit stay the
terminal's, so their progress lines arrive live and unprefixed. Why not torchrun's own means:
`--redirects`/`--tee` capture the workers' output, not torchrun's, and tee it back with rank
prefixes; `TORCHELASTIC_ERROR_FILE` (`@record`) only adds a traceback to torchrun's report,
which is still printed, and would tie the message to torch's JSON format. Left on the terminal:
what C++ code in torchrun's process writes to the file descriptor itself (c10d store warnings),
which is rare.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import runpy
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from bigbatch.errors import UsageError

HANDLED = (signal.SIGTERM, signal.SIGINT)  # as preemption.py's (not imported: it loads torch)
SHUTDOWN_GRACE_SECONDS = 300
PR_SET_PDEATHSIG = 1  # prctl(2): the signal a process gets when its parent dies
LAUNCH_DIR_ENV = "BIGBATCH_LAUNCH_DIR"  # where the workers leave their errors (docstring)
LOG_NAME = "torchrun.log"
KILLED = "killed"  # "RANK SIGNAL" lines: the ranks a signal killed (run_torchrun)


def without_flag(args: list[str], flag: str) -> list[str]:
    """`args` minus `flag VALUE` / `flag=VALUE`."""
    kept, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg == flag:
            skip = True
        elif not arg.startswith(flag + "="):
            kept.append(arg)
    return kept


def torchrun_command(subcommand: str, args: list[str], nproc: int,
                     log: Path | None = None) -> list[str]:
    """The torchrun command line; with `log`, torchrun's own output goes there (run_torchrun)."""
    torchrun = ["torch.distributed.run"] if log is None else [
        "bigbatch.parallel.launch", str(log)]
    return [sys.executable, "-m", *torchrun, "--standalone", f"--nproc_per_node={nproc}",
            "-m", "bigbatch", subcommand, *without_flag(args, "--nproc")]


def run_torchrun(log: str, args: list[str]) -> None:
    """`python -m torch.distributed.run ARGS` in this process, its Python-level stderr (logging,
    warnings, the traceback of its ChildFailedError) appended to `log` (module docstring)."""
    sys.stderr = open(log, "a", buffering=1)  # noqa: SIM115 (open until the process ends)
    sys.argv = ["torchrun", *args]
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    try:
        runpy.run_module("torch.distributed.run", run_name="__main__", alter_sys=True)
    except ChildFailedError as err:
        # The ranks a signal killed left no report of their own. SIGTERM is left out: torchrun
        # sends it to the ranks still running once one has failed, and lists them too.
        killed = [f"{rank} {failure.signal_name()}\n" for rank, failure
                  in sorted(err.failures.items())
                  if failure.exitcode < 0 and -failure.exitcode != signal.SIGTERM]
        with contextlib.suppress(KeyError, OSError):
            (Path(os.environ[LAUNCH_DIR_ENV]) / KILLED).write_text("".join(killed))
        raise


def open_log(log_dir: Path | None) -> tuple[Path, bool]:
    """(torchrun.log in `log_dir`, else a new temporary file; whether it is temporary)."""
    if log_dir is not None:
        with contextlib.suppress(OSError):  # not writable: rank 0 says so in one line
            log_dir.mkdir(parents=True, exist_ok=True)
            with (log_dir / LOG_NAME).open("a"):
                return log_dir / LOG_NAME, False
    handle, name = tempfile.mkstemp(prefix="bigbatch-torchrun-", suffix=".log")
    os.close(handle)
    return Path(name), True


def launcher_folder() -> Path | None:
    """In a worker the launcher started: the folder to leave errors in. Taken out of the
    environment, so that the worker's own children (the report process) print theirs."""
    folder = os.environ.pop(LAUNCH_DIR_ENV, None)
    return Path(folder) if folder and "RANK" in os.environ else None


def report_to_launcher(folder: Path | None, err: BaseException) -> bool:
    """Leave `err` for the launcher: a UsageError's message (`rank{R}.error`), or any other
    exception's traceback (`rank{R}.crash`). False where there is no launcher to tell."""
    if folder is None:
        return False
    usage = isinstance(err, UsageError)
    text = str(err) if usage else "".join(traceback.format_exception(err))
    try:
        (folder / f"rank{os.environ['RANK']}.{'error' if usage else 'crash'}").write_text(text)
    except OSError:
        return False
    return True


def reports(folder: Path, suffix: str) -> list[tuple[int, str]]:
    """(rank, text) of the workers' reports with `suffix`, the first written first: the root
    cause, where one rank's crash made the others fail in their next collective."""
    paths = sorted(folder.glob(f"rank*.{suffix}"),
                   key=lambda path: (path.stat().st_mtime_ns, int(path.stem[4:])))
    return [(int(path.stem[4:]), path.read_text()) for path in paths]


def failure(folder: Path, log: Path, code: int, temporary: bool) -> int:
    """torchrun exited `code` != 0: a worker's UsageError is raised as the launcher's own (one
    line, exit 2); otherwise one line names the crash and `log`, which gets the tracebacks."""
    errors = reports(folder, "error")
    if errors:  # several ranks may refuse the same input alike: said once
        if temporary:  # nothing in it that the one line does not say
            log.unlink(missing_ok=True)
        raise UsageError(errors[0][1])
    crashes = reports(folder, "crash")
    with log.open("a") as out:
        for rank, text in crashes:
            out.write(f"\nrank {rank}'s traceback:\n{text}")
    killed = (folder / KILLED).read_text().split() if (folder / KILLED).exists() else []
    if killed:  # the cause: the others' crashes then are only their collectives failing
        what = (f"rank {killed[0]} died of {killed[1]}; the other ranks' tracebacks and "
                "torchrun's report are in")
    elif crashes:
        rank, text = crashes[0]
        what = (f"rank {rank} failed: {text.strip().splitlines()[-1]}; the traceback and "
                "torchrun's report are in")
    else:  # a worker that exited non-zero with its own output (verify: FAILED)
        what = f"a worker stopped (torchrun exited {code}); torchrun's report is in"
    print(f"bigbatch: error: {what} {log}", file=sys.stderr, flush=True)
    return code


def child_pids(pid: int) -> list[int]:
    """The processes whose parent is `pid` (torchrun's workers), from /proc."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            # "pid (comm) state ppid ...": comm may hold spaces, so split after its ")"
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                children.append(int(stat.parent.name))
    return children


def _term_when_parent_dies() -> None:
    """In torchrun's process before exec: if this launcher is killed (SIGKILL, a lost shell),
    torchrun gets SIGTERM and stops its workers with a checkpoint instead of running on."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class SignalForwarder:
    """The launcher's SIGTERM/SIGINT handler: the first signal to torchrun, later ones to the
    workers themselves."""

    def __init__(self, torchrun: subprocess.Popen) -> None:
        self.torchrun = torchrun
        self.signal: int | None = None

    def __call__(self, signum: int, frame: object = None) -> None:
        if self.signal is None:
            self.signal = signum
            with contextlib.suppress(ProcessLookupError):
                self.torchrun.send_signal(signum)
            return
        # A second signal to torchrun would abort its wait for the workers and leave them
        # running; sent to the workers it is their "second signal": stop at once.
        for pid in child_pids(self.torchrun.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)


def relaunch(subcommand: str, args: list[str], nproc: int, log_dir: Path | None = None) -> int:
    """Run torchrun and wait for it, passing SIGTERM/SIGINT on, its own output into
    `log_dir`/torchrun.log or a temporary file (module docstring). Returns 0, 128 + signal when
    a signal stopped the run, or torchrun's exit code after one line naming the log; a
    worker's UsageError is raised here."""
    log, temporary = open_log(log_dir)
    with log.open("a") as out:  # one header per launch: a resumed run appends to the same log
        out.write(f"\n=== bigbatch {subcommand} --nproc {nproc}, "
                  f"{time.strftime('%Y-%m-%d %H:%M:%S')} ===\n")
    with tempfile.TemporaryDirectory(prefix="bigbatch-ranks-") as folder:
        env = {**os.environ, LAUNCH_DIR_ENV: folder}
        env.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(SHUTDOWN_GRACE_SECONDS))
        torchrun = subprocess.Popen(torchrun_command(subcommand, args, nproc, log), env=env,
                                    start_new_session=True, preexec_fn=_term_when_parent_dies)
        forwarder = SignalForwarder(torchrun)
        previous = {signum: signal.signal(signum, forwarder) for signum in HANDLED}
        try:
            code = torchrun.wait()  # bounded: torchrun SIGKILLs workers after its grace period
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        stopped = forwarder.signal is not None and code != 0
        if code != 0 and not stopped:
            return failure(Path(folder), log, code, temporary)
    if temporary:
        log.unlink(missing_ok=True)
    return 128 + forwarder.signal if stopped else code


def exit_process(code: int) -> None:
    """Leave with `code`. A torchrun rank skips the C++ teardown at interpreter exit: there FSDP2
    on gloo sometimes aborts after all work is done ("terminate called without an active
    exception": 1 run in 8 of a bare fully_shard script here, 0 in 12 with os._exit), which
    torchrun would report as a failed run. The process group is already destroyed by then."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    raise SystemExit(code)


if __name__ == "__main__":  # torchrun_command(..., log): torchrun with its output in the log
    run_torchrun(sys.argv[1], sys.argv[2:])
