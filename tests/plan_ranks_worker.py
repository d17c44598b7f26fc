"""Worker for tests/unit/planning/test_planner_wrapper.py, on 2 gloo ranks:
`torchrun --standalone --nproc_per_node 2 tests/plan_ranks_worker.py OUT.json`.

Every rank plans a tiny GPT under FSDP with `batch.micro_batch_size = "auto"` as a run does
(`plan_for_config` inside torchrun), with the real probe counted: on CPU FSDP is probed under
the wrapper, so rank 0 alone starts the probes (a torchrun group of their own, inside this one)
and every rank gets its plan. Rank 0 gathers what each rank saw into OUT.json.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import torch.distributed as dist

from bigbatch.config.files import load_config
from bigbatch.parallel.process_group import all_gather_objects, dist_info_from_env
from bigbatch.planning import planner
from bigbatch.planning.probe import run_probe

OVERRIDES = ["--parallel.strategy=fsdp", "--batch.micro_batch_size=auto", "--model.n_layer=2",
             "--model.d_model=64", "--model.n_head=2", "--data.seq_len=32",
             "--batch.global_tokens=128", "--precision.dtype=fp32", "--batch.memory_budget=8GiB",
             "--parallel.fsdp_gradient_sync=last"]


def main(out_path: str) -> None:
    dist.init_process_group("gloo")
    info = dist_info_from_env()
    requests = []

    def counted_probe(request):
        requests.append(dataclasses.asdict(request))
        return run_probe(request)

    cfg = load_config(None, OVERRIDES)
    plan = planner.plan_for_config(cfg, 512, world_size=2, probe=counted_probe)
    report = {"rank": info.rank, "requests": requests, "plan": plan.to_dict()}
    reports = all_gather_objects(report, info)
    if info.is_main:
        Path(out_path).write_text(json.dumps(reports))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
