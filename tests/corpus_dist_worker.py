"""Worker for tests/unit/data/test_corpus_streaming.py, launched on 2 CPU ranks by
`python -m torch.distributed.run --standalone --nproc_per_node 2 tests/corpus_dist_worker.py
DATA_JSON OUT_DIR`: every rank loads the corpus through the training run's own call site
(`run.load_corpus`) on a cold cache and writes a digest of what it got to OUT_DIR/rankN.json.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import torch.distributed as dist

from bigbatch.config.sections import Config, DataConfig
from bigbatch.parallel.process_group import dist_info_from_env
from bigbatch.tasks.lm.wiring import load_corpus


def corpus_digest(corpus) -> str:
    digest = hashlib.sha256(corpus.tokenizer.to_str().encode())
    for tokens in (corpus.train_tokens, corpus.val_tokens):
        digest.update(np.asarray(tokens).tobytes())
    return digest.hexdigest()


def main(data_json: str, out_dir: str) -> None:
    dist.init_process_group("gloo")
    info = dist_info_from_env()
    corpus = load_corpus(Config(data=DataConfig(**json.loads(data_json))), info)
    Path(out_dir, f"rank{info.rank}.json").write_text(json.dumps(
        {"digest": corpus_digest(corpus), "cache": str(corpus.cache_dir)}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
