"""Worker for tests/integration/test_multiprocess_survival.py, on 2 gloo ranks:
`torchrun --standalone --nproc_per_node 2 tests/rank_agreement_worker.py RUN_DIR OUT.json`.

RUN_DIR holds two intact checkpoints. Every rank resumes through `agree_on_resume_checkpoint`
with `verify_checkpoint` counting its calls, then seeds as `train()` does (the model from
`train.seed`, then `seed_rank_streams`) and reports a checksum of its initial weights and a
dropout mask of its own. Rank 0 gathers the reports into OUT.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from bigbatch.engine.seeding import seed_everything, seed_rank_streams
from bigbatch.model.gpt import GPT, GPTShape
from bigbatch.parallel.process_group import all_gather_objects, dist_info_from_env
from bigbatch.run import resume

SEED = 1234


def main(run_dir: str, out_path: str) -> None:
    dist.init_process_group("gloo")
    info = dist_info_from_env()
    verified = []
    real_verify = resume.verify_checkpoint

    def counting_verify(path: Path) -> str | None:
        verified.append(path.name)
        return real_verify(path)

    resume.verify_checkpoint = counting_verify
    chosen = resume.agree_on_resume_checkpoint("auto", Path(run_dir), info, print)
    seed_everything(SEED)
    model = GPT(GPTShape(vocab_size=64, seq_len=16, n_layer=1, n_head=2, d_model=16,
                         dropout=0.5))
    seed_rank_streams(SEED, info.rank)
    weights = float(sum(p.double().sum() for p in model.parameters()))
    mask = torch.nn.functional.dropout(torch.ones(64), p=0.5).tolist()
    report = {"rank": info.rank, "chosen": chosen.name, "verified": verified,
              "weights": weights, "mask": mask}
    reports = all_gather_objects(report, info)
    if info.is_main:
        Path(out_path).write_text(json.dumps(reports))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
