"""Many processes that survive: SIGTERM through `--nproc`, per-rank random streams, a worker
killed under `torchrun --max-restarts`, and two nodes made of network namespaces.

Every run is small_runs.py's model (dropout 0.1, 4 micro-batches of 8 x 64 tokens per step) on
2 gloo ranks, 16 steps. The oracle is one uninterrupted `--nproc 2` run of the same settings:
at the same world size the reductions happen in the same order, so an interrupted and resumed
run must equal it bit for bit (metrics.jsonl rows without timings, final weights' bytes), which
with dropout on needs each rank's own random state back. The two-node run without dropout is
compared with one process instead, within fp32 rounding. Two nodes need root (network
namespaces); without it the two-node test skips and the killed worker is tested on one node.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bigbatch.batch import split_batch
from bigbatch.engine.batch_schedule import build_batch_schedule
from bigbatch.engine.loop import TrainState, previous_micro_steps
from bigbatch.engine.seeding import seed_everything
from bigbatch.model.artifacts import load_model
from bigbatch.model.gpt import GPT, GPTShape
from bigbatch.parallel.launch import SignalForwarder, child_pids
from bigbatch.run.checkpoint_files import list_checkpoints, verify_checkpoint, write_checkpoint
from bigbatch.run.train import train
from small_runs import ROOT, metric_rows, small_args, small_config
from test_preemption import Process, assert_same_run

STEPS = ["--train.max_steps=16", "--checkpoint.every_steps=2", "--checkpoint.keep=5"]
TIMEOUT = 240  # seconds any one run may take here before it counts as hung


def two_ranks(args: list[str], timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bigbatch", "train", *args, "--nproc", "2"],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def straight(tmp_path_factory, tiny_overrides) -> Path:
    """The reference: an uninterrupted 2-rank run."""
    out = tmp_path_factory.mktemp("straight-2-ranks")
    done = two_ranks([*small_args(tiny_overrides, *STEPS), "--out", str(out)])
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        children = child_pids(todo.pop())
        found += children
        todo += children
    return found


def running(pid: int) -> bool:
    """Alive and not a zombie (a zombie has exited and only waits to be reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


@pytest.mark.slow  # 20-70 s each here: 2-3 torchrun launches
def test_sigterm_to_the_nproc_launcher_stops_every_rank_with_a_checkpoint(
        tmp_path, tiny_overrides, straight):
    """SIGTERM to the pid of `bigbatch train --nproc 2` (what a scheduler signals): the workers
    finish their step and write one checkpoint, the launcher exits 143, no process is left, the
    checkpoint holds each rank's own random state (the ranks draw different dropout masks), and
    `--resume auto` then ends bitwise equal to the uninterrupted run."""
    out = tmp_path / "run"
    run = Process([*small_args(tiny_overrides, *STEPS), "--out", str(out), "--nproc", "2"],
                  timeout=TIMEOUT)
    run.wait_for("step 1/16")
    processes = descendants(run.proc.pid)  # torchrun, its 2 workers (and their helpers)
    assert len(processes) >= 3, run.output
    run.proc.send_signal(signal.SIGTERM)
    assert run.finish() == 128 + signal.SIGTERM, run.output
    assert [pid for pid in processes if running(pid)] == [], run.output
    saved = list_checkpoints(out / "checkpoints")
    assert saved and verify_checkpoint(saved[-1]) is None, run.output
    stopped_at = int(saved[-1].name[5:])
    assert stopped_at < 16 and f"stopped by SIGTERM after step {stopped_at}/16" in run.output

    rng = load_file(str(saved[-1] / "rng.safetensors"))
    assert sorted(rng) == ["rank0.torch_cpu", "rank1.torch_cpu"]
    assert not torch.equal(rng["rank0.torch_cpu"], rng["rank1.torch_cpu"])

    resumed = two_ranks([*small_args(tiny_overrides, *STEPS), "--out", str(out),
                         "--resume", "auto"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {saved[-1]} at step {stopped_at}" in resumed.stdout
    assert_same_run(out, straight)


def test_rank_0_picks_the_checkpoint_and_each_rank_draws_its_own_dropout(tmp_path):
    """On 2 ranks: only rank 0 hashes checkpoint files, and both resume from its choice (the
    newest intact one: the damaged newest is skipped); both start from the same weights; their
    dropout masks differ, and rank 0's is the one a single process draws."""
    checkpoints = tmp_path / "run" / "checkpoints"
    for step in (2, 4, 6):
        write_checkpoint(checkpoints, step, {"state.json": lambda path: path.write_text("{}")})
    (checkpoints / "step-00000006" / "state.json").write_text('{"damaged": 1}')
    out = tmp_path / "reports.json"
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", str(ROOT / "tests" / "rank_agreement_worker.py"),
                           str(tmp_path / "run"), str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr[-3000:]
    rank0, rank1 = json.loads(out.read_text())
    assert rank0["verified"] == ["step-00000006", "step-00000004"] and rank1["verified"] == []
    assert rank0["chosen"] == rank1["chosen"] == "step-00000004"
    assert rank0["weights"] == rank1["weights"]
    assert rank0["mask"] != rank1["mask"]

    from rank_agreement_worker import SEED
    seed_everything(SEED)
    GPT(GPTShape(vocab_size=64, seq_len=16, n_layer=1, n_head=2, d_model=16, dropout=0.5))
    assert torch.nn.functional.dropout(torch.ones(64), p=0.5).tolist() == rank0["mask"]


# A stand-in for torchrun: reports a SIGTERM it gets, and waits for its two children.
FAKE_TORCHRUN = """
import signal, subprocess, sys
signal.signal(signal.SIGTERM, lambda *_: print("torchrun got SIGTERM", flush=True))
workers = [subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
           for _ in range(2)]
print("ready", flush=True)
print("workers ended by", sorted({-w.wait() for w in workers}), flush=True)
"""


def test_the_launchers_second_signal_goes_to_the_workers_themselves():
    """The first signal goes to torchrun only (it passes it on to each worker once); a second
    one to torchrun's children directly: sent to torchrun it would abort torchrun's wait for
    its workers and leave them running."""
    fake = subprocess.Popen([sys.executable, "-c", FAKE_TORCHRUN], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert fake.stdout.readline() == "ready\n"
        forward = SignalForwarder(fake)
        forward(signal.SIGTERM)
        assert fake.stdout.readline() == "torchrun got SIGTERM\n"
        workers = child_pids(fake.pid)
        assert len(workers) == 2 and all(running(pid) for pid in workers)
        forward(signal.SIGTERM)
        assert fake.communicate(timeout=30)[0] == f"workers ended by [{int(signal.SIGTERM)}]\n"
        assert forward.signal == signal.SIGTERM
    finally:
        fake.kill()
        fake.wait(timeout=30)


def test_an_auto_ramp_resumed_at_another_world_size_keeps_its_batch(tiny_overrides):
    """The ramp's state is the last step's global batch in tokens. After a step of 6 micro-steps
    per rank on 2 ranks (6,144 tokens), a run resumed on 1 or 4 ranks asks for the same 6,144
    (6 micro-steps of its own would be 3,072 on 1 rank: the "never shrinks" batch shrunk), and
    where the batch is no whole number of the new micro-steps, the next larger one."""
    cfg = small_config(tiny_overrides, "--batch.global_tokens=8192", "--batch.ramp=auto",
                       "--batch.ramp_start_tokens=4096")
    state = TrainState()
    state.load_state_dict({**TrainState(batch_tokens=6 * 1024).state_dict(), "micro_steps": 6})
    for world_size, expected in ((2, 6144), (1, 6144), (4, 6144)):
        plan = split_batch(8192, 64, 8, world_size)
        schedule = build_batch_schedule(cfg, plan)
        steps = previous_micro_steps(state, schedule)
        assert schedule.shape(state.tokens_seen, None, steps).global_tokens == expected
    state.batch_tokens = 5 * 1024  # 2.5 micro-steps of 4 ranks x 8 x 64
    schedule = build_batch_schedule(cfg, split_batch(8192, 64, 8, 4))
    assert schedule.shape(0, None, previous_micro_steps(state, schedule)).global_tokens == 6144


def kill_worker_env(rank: int, step: int) -> dict[str, str]:
    """tests/kill_worker.py's settings. TORCH_DISABLE_SHARE_RDZV_TCP_STORE: torchrun 2.13 keeps
    one store for all its rendezvous rounds, so a restarted rank can read its peer's gloo
    address from the round before and fail to connect ("Connection refused" in
    connectFullMesh), which costs one more restart each time; a store per round avoids it."""
    return {**os.environ, "KILL_RANK": str(rank), "KILL_AT_STEP": str(step),
            "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


KILL_WORKER = [str(ROOT / "tests" / "kill_worker.py"), "train"]


# --- Two nodes: two network namespaces joined by a veth pair, one torchrun in each. ----------

ADDRESSES = ("10.231.0.1", "10.231.0.2")  # only ever inside the namespaces made here
PORT = 29500


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


@pytest.fixture(scope="module")
def two_hosts() -> list[str] | str:
    """Two namespaces, `veth0` (10.231.0.1) in the first and `veth1` (10.231.0.2) in the
    second, each with its loopback up, removed afterwards (with them the veth pair); or, where
    they cannot be made, the reason why."""
    if shutil.which("ip") is None:
        yield "two nodes need iproute2's `ip` to make network namespaces"
        return
    names = [f"bigbatch-{os.getpid()}-node{i}" for i in range(2)]
    made = []
    try:
        for name in names:
            ip("netns", "add", name)
            made.append(name)
        ip("link", "add", "veth0", "netns", names[0], "type", "veth", "peer", "name", "veth1",
           "netns", names[1])
        for i, name in enumerate(names):
            ip("-n", name, "addr", "add", f"{ADDRESSES[i]}/24", "dev", f"veth{i}")
            ip("-n", name, "link", "set", f"veth{i}", "up")
            ip("-n", name, "link", "set", "lo", "up")
        yield names
    except (subprocess.CalledProcessError, OSError) as err:
        detail = getattr(err, "stderr", "") or err
        yield f"cannot make network namespaces here (needs root): {str(detail).strip()}"
    finally:
        for name in made:
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)


def node_command(namespace: str, node: int, run_id: str, entry: list[str],
                 *torchrun_flags: str) -> list[str]:
    """The README's multi-node command, in `namespace`. is_host: c10d serves the rendezvous
    from the node whose own name or address is the endpoint; a namespace keeps the machine's
    hostname, so node 0 is told. OMP_NUM_THREADS=1 as torchrun sets it with 2+ local workers:
    the same math threads as the one-node run, for bitwise equal results."""
    return ["ip", "netns", "exec", namespace, "env", f"GLOO_SOCKET_IFNAME=veth{node}",
            "OMP_NUM_THREADS=1", sys.executable, "-m", "torch.distributed.run", "--nnodes=2",
            "--nproc_per_node=1", "--rdzv_backend=c10d", f"--rdzv_endpoint={ADDRESSES[0]}:{PORT}",
            f"--rdzv_id={run_id}", f"--rdzv_conf=is_host={int(node == 0)},join_timeout=120",
            f"--local_addr={ADDRESSES[node]}", *torchrun_flags, *entry]


def run_two_nodes(namespaces: list[str], run_id: str, entry: list[str], *torchrun_flags: str,
                  env: dict[str, str] | None = None, logs: Path) -> str:
    """Start both nodes, wait for both (bounded), and return their merged output. Output goes
    to files, not pipes: a worker outliving its torchrun would hold a pipe open."""
    procs = []
    for node, namespace in enumerate(namespaces):
        with (logs / f"node{node}.log").open("w") as log:
            procs.append(subprocess.Popen(node_command(namespace, node, run_id, entry,
                                                       *torchrun_flags),
                                          cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
    try:
        codes = [proc.wait(timeout=TIMEOUT) for proc in procs]
    finally:
        for proc in procs:  # a hung node: torchrun stops its worker on SIGTERM
            if proc.poll() is None:
                proc.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=60)
                proc.kill()
    output = "\n".join((logs / f"node{node}.log").read_text() for node in range(2))
    assert codes == [0, 0], output[-6000:]
    return output


@pytest.mark.slow  # 20-70 s each here: 2-3 torchrun launches
def test_two_nodes_equal_one_process(two_hosts, tmp_path, tiny_overrides):
    """The README's multi-node command on two namespaces, without dropout, against one process
    over the same samples. Equal within fp32 rounding (tests/integration/test_distributed.py
    explains the bound); SGD, which unlike Adam does not normalise rounding noise into full-size
    steps."""
    if isinstance(two_hosts, str):
        pytest.skip(two_hosts)
    settings = [*STEPS, "--model.dropout=0.0", "--precision.dtype=fp32", "--optim.name=sgd",
                "--optim.lr=0.3"]
    out = tmp_path / "two-nodes"
    output = run_two_nodes(two_hosts, "equal", ["-m", "bigbatch", "train",
                                                 *small_args(tiny_overrides, *settings),
                                                 "--out", str(out)], logs=tmp_path)
    assert "micro-batch 8 x 2 micro-steps x 2 rank(s)" in output
    one = train(small_config(tiny_overrides, *settings), tmp_path / "one", verbose=False)

    def comparable(run_dir: Path) -> list[dict]:  # micro-steps per rank and gns_* differ
        return [{k: v for k, v in row.items() if k != "num_micro_steps"
                 and not k.startswith("gns_")} for row in metric_rows(run_dir)]

    got, want = comparable(out), comparable(one.out_dir)
    assert [(r["step"], sorted(r)) for r in got] == [(r["step"], sorted(r)) for r in want]
    for got_row, want_row in zip(got, want, strict=True):
        for key, value in want_row.items():
            assert got_row[key] == pytest.approx(value, rel=1e-5, abs=0), (got_row["step"], key)
    assert want[-1]["val_loss"] < want[0]["val_loss"] - 0.1  # it really trained
    two_model, one_model = load_model(out)[0], load_model(one.out_dir)[0]
    for (name, got_p), want_p in zip(two_model.named_parameters(), one_model.parameters(),
                                     strict=True):
        error = float((got_p - want_p).detach().abs().max() / want_p.detach().abs().max())
        assert error <= 1e-5, name


@pytest.mark.slow  # 20-70 s each here: 2-3 torchrun launches
def test_a_worker_killed_under_max_restarts_costs_only_the_steps_since_the_checkpoint(
        two_hosts, tmp_path, tiny_overrides, straight):
    """Rank 1's worker, on whichever node holds it, is SIGKILLed before step 5; torchrun
    (--max-restarts 1, on both nodes) restarts the group, which resumes from the step-4
    checkpoint and ends bitwise equal to the uninterrupted one-node 2-rank run. On two
    namespaces where they can be made, else on one node (--standalone)."""
    out = tmp_path / "run"
    entry = [*KILL_WORKER, *small_args(tiny_overrides, *STEPS), "--out", str(out),
             "--resume", "auto"]
    env = kill_worker_env(rank=1, step=5)
    if isinstance(two_hosts, str):
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                               "--nproc_per_node=2", "--max-restarts=1", *entry], cwd=ROOT,
                              capture_output=True, text=True, timeout=TIMEOUT, env=env)
        assert done.returncode == 0, done.stderr[-3000:]
        output = done.stdout
    else:
        output = run_two_nodes(two_hosts, "killed", entry, "--max-restarts=1", env=env,
                               logs=tmp_path)
    assert "rank 1: SIGKILL before step 5" in output
    assert f"resumed from {out / 'checkpoints' / 'step-00000004'} at step 4" in output, output
    assert_same_run(out, straight)
