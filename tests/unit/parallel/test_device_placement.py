"""Every rank on its own GPU, asserted on CPU through mocks of the CUDA calls.

Invariants:
- rank r of a node resolves `auto` and `cuda` to cuda:LOCAL_RANK; an explicit cuda:N under
  several ranks, or a local rank with no GPU of its own, is a one-line UsageError;
- `init_process_group` calls `torch.cuda.set_device(cuda:LOCAL_RANK)` before the group exists,
  and hands NCCL `device_id` = that device; on CPU it starts gloo and touches no CUDA;
- the planner's cross-rank agreement puts its tensor on the rank's own GPU, not cuda:0.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as torch_dist

from bigbatch.errors import UsageError
from bigbatch.parallel import process_group as distributed
from bigbatch.parallel.process_group import DistInfo, init_process_group
from bigbatch.run.train import resolve_device


@pytest.fixture
def eight_gpus(monkeypatch):
    """A node of 8 GPUs, as far as device resolution can tell."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)


@pytest.fixture
def calls(monkeypatch) -> list:
    """Records set_device and init_process_group, in order, instead of running them."""
    recorded = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda dev: recorded.append(("set_device", dev)))
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: False)
    monkeypatch.setattr(distributed.dist, "init_process_group",
                        lambda **kwargs: recorded.append(("init_process_group", kwargs)))
    return recorded


@pytest.mark.parametrize("name", ["auto", "cuda"])
def test_each_rank_resolves_to_its_local_gpu(eight_gpus, name):
    for local_rank in range(8):
        info = DistInfo(rank=8 + local_rank, local_rank=local_rank, world_size=16)
        assert resolve_device(name, info) == torch.device("cuda", local_rank)


def test_explicit_gpu_is_refused_under_several_ranks(eight_gpus):
    with pytest.raises(UsageError, match=r"train.device = 'cuda:0'.*CUDA_VISIBLE_DEVICES"):
        resolve_device("cuda:0", DistInfo(rank=1, local_rank=1, world_size=2))
    assert resolve_device("cuda:3", DistInfo()) == torch.device("cuda", 3)  # one process: yes


def test_more_ranks_than_gpus_is_refused(eight_gpus):
    with pytest.raises(UsageError, match=r"local rank 8.*8 GPU"):
        resolve_device("cuda", DistInfo(rank=8, local_rank=8, world_size=9))


def test_set_device_precedes_the_nccl_group_with_device_id(calls):
    device = torch.device("cuda", 5)
    init_process_group(DistInfo(rank=5, local_rank=5, world_size=8), device)
    assert calls == [("set_device", device),
                     ("init_process_group", {"backend": "nccl", "device_id": device})]


def test_one_gpu_process_still_binds_its_device(calls):
    init_process_group(DistInfo(), torch.device("cuda", 2))
    assert calls == [("set_device", torch.device("cuda", 2))]


def test_cpu_ranks_use_gloo_and_touch_no_cuda(calls):
    init_process_group(DistInfo(rank=1, local_rank=1, world_size=2), torch.device("cpu"))
    assert calls == [("init_process_group", {"backend": "gloo"})]


def test_planner_agreement_tensor_goes_to_the_ranks_gpu(monkeypatch):
    from bigbatch.planning import search

    seen = []

    class Moved(Exception):
        pass

    def to(self, *args, **kwargs):
        seen.append(args[0] if args else kwargs.get("device"))
        raise Moved  # stop before the (mocked-away) collective

    monkeypatch.setattr(torch_dist, "is_initialized", lambda: True)
    monkeypatch.setattr(torch_dist, "get_backend", lambda: "nccl")
    monkeypatch.setattr(torch.Tensor, "to", to)
    plan = search.MemoryPlan(
        micro_batch_size=4, num_micro_steps=2, activation_checkpointing="none",
        checkpoint_every=1, loss_chunk_tokens=0, predicted_peak_bytes=1, budget_bytes=2,
        components={}, calibration={}, global_tokens=8, seq_len=1, world_size=8,
        sequences_per_rank=8, strategy="ddp", allreduce_bytes_per_step=0, device="cuda:6")
    with pytest.raises(Moved):
        search.agree_across_ranks(plan, [search.Tactic("none", 1, 0)])
    assert [str(d) for d in seen] == ["cuda:6"]
