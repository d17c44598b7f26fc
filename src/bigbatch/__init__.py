"""bigbatch: train Transformers with large, exact, well-chosen batches on any hardware.

The public API (stable; everything else is internal and may move):

    load_config(recipe=None, overrides=...) -> Config   a recipe plus overrides, validated
    train(config, out_dir, ...) -> TrainResult          a whole run (what `bigbatch train` does)
    plan(config, world_size=1) -> MemoryPlan            the micro-batch that fits, explained
    train_step(model, optimizer, micro_batches, precision=...) -> StepStats
                                                        one exact optimizer step, in your loop
    Precision.create("bf16", device)                    autocast + loss scaling for train_step
    verify(model, micro_batches, ...) -> VerifyResult   accumulation == one big batch, checked
    MicroBatch, IGNORE_INDEX, lm_loss_sum               the loss-sum protocol's pieces
    dist_info_from_env() -> DistInfo                    this rank under torchrun, for train_step

A batch for `train_step` is any object with `num_targets()` (its count of target tokens, or of
texts); `loss_sum_fn(model, batch)` returns the *sum* of its losses (the default, `lm_loss_sum`,
calls `model(**batch.model_inputs())`: a MicroBatch gives `input_ids`). train_step divides by the
step's global count, so uneven micro-batches give exactly the full batch's gradient.

Names load on first use, so `import bigbatch` (and the command line) stays quick.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {  # public name -> the module that defines it
    "Config": "bigbatch.config.sections",
    "load_config": "bigbatch.config.files",
    "train": "bigbatch.run.train",
    "TrainResult": "bigbatch.run.train",
    "plan": "bigbatch.planning.planner",
    "MemoryPlan": "bigbatch.planning.search",
    "train_step": "bigbatch.engine.step",
    "StepStats": "bigbatch.engine.step",
    "lm_loss_sum": "bigbatch.engine.step",
    "IGNORE_INDEX": "bigbatch.batch",
    "Precision": "bigbatch.engine.precision",
    "MicroBatch": "bigbatch.batch",
    "DistInfo": "bigbatch.parallel.process_group",
    "dist_info_from_env": "bigbatch.parallel.process_group",
    "verify": "bigbatch.tools.verify",
    "VerifyResult": "bigbatch.tools.verify",
}
__all__ = ["IGNORE_INDEX", "Config", "DistInfo", "MemoryPlan", "MicroBatch", "Precision",
           "StepStats", "TrainResult", "VerifyResult", "dist_info_from_env", "lm_loss_sum",
           "load_config", "plan", "train", "train_step", "verify"]

if TYPE_CHECKING:
    from bigbatch.batch import IGNORE_INDEX, MicroBatch
    from bigbatch.config.files import load_config
    from bigbatch.config.sections import Config
    from bigbatch.engine.precision import Precision
    from bigbatch.engine.step import StepStats, lm_loss_sum, train_step
    from bigbatch.parallel.process_group import DistInfo, dist_info_from_env
    from bigbatch.planning.planner import plan
    from bigbatch.planning.search import MemoryPlan
    from bigbatch.run.train import TrainResult, train
    from bigbatch.tools.verify import VerifyResult, verify


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'bigbatch' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return [*__all__, "__version__"]
