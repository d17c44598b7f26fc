"""Several torch optimizers over disjoint parameters, stepping and saving as one optimizer.

What a combination entry of the registry builds (torchtitan's `OptimizersContainer`). It is a
`torch.optim.Optimizer` to everything that holds one:

- train_step: `step()` and `zero_grad()` run every part's.
- `param_groups` is the parts' groups, the same dicts, in order: the schedule's lr (set in a
  group here) is the lr the part steps with, and GradScaler's `unscale_` (which walks
  `param_groups`) unscales every part's gradients. GradScaler's `step` calls `step()` after its
  own inf check (the container does not claim `_step_supports_amp_scaling`, so a fused part is
  handed gradients already unscaled).
- `state_dict()` is torch's format over all the parts, parameters numbered across their groups
  in order, so torch.distributed.checkpoint's get/set_optimizer_state_dict (run/checkpoint.py)
  key it by parameter names as for one optimizer; `load_state_dict` hands each part its groups
  and its parameters' state.
Hooks (`register_step_pre_hook`, ...) are each part's own, not the container's.
"""

from __future__ import annotations

from collections import ChainMap
from collections.abc import Sequence
from typing import Any

import torch


class OptimizerContainer(torch.optim.Optimizer):
    # No Optimizer.__init__: the parts own the groups and the state, the container only joins
    # them (Optimizer.__init__ would make groups of its own that the parts never read).
    def __init__(self, optimizers: Sequence[torch.optim.Optimizer]) -> None:
        self.optimizers = list(optimizers)
        self.defaults: dict[str, Any] = {}

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [group for optimizer in self.optimizers for group in optimizer.param_groups]

    @property
    def state(self) -> ChainMap:
        """Every part's per-parameter state (read-only use: the parts are disjoint). Over plain
        dict copies of the parts' maps (the per-parameter dicts themselves are the parts'): a
        part's state is a defaultdict, and a look-up that reached the first part's with another
        part's parameter would plant an empty entry there, which its state_dict() cannot name."""
        return ChainMap(*(dict(optimizer.state) for optimizer in self.optimizers))

    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for optimizer in self.optimizers:
            optimizer.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        raise NotImplementedError("add a parameter group to one of the container's optimizers")

    def state_dict(self) -> dict[str, Any]:
        """Torch's format: {"state": {index: ...}, "param_groups": [...]}, the parameters
        numbered 0, 1, ... across all the parts' groups in order."""
        state: dict[int, Any] = {}
        groups: list[dict[str, Any]] = []
        for optimizer in self.optimizers:
            offset = sum(len(group["params"]) for group in groups)
            part = optimizer.state_dict()
            state.update({index + offset: value for index, value in part["state"].items()})
            groups += [{**group, "params": [index + offset for index in group["params"]]}
                       for group in part["param_groups"]]
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Each part gets its own groups (in order) and the state of their parameters, keyed as
        saved (indices, or names under torch.distributed.checkpoint)."""
        groups = list(state_dict["param_groups"])
        if len(groups) != len(self.param_groups):
            raise ValueError(f"the state dict has {len(groups)} parameter groups, the "
                             f"optimizers {len(self.param_groups)}")
        for optimizer in self.optimizers:
            mine, groups = groups[:len(optimizer.param_groups)], groups[len(optimizer.param_groups):]
            keys = {key for group in mine for key in group["params"]}
            optimizer.load_state_dict({
                "state": {k: v for k, v in state_dict["state"].items() if k in keys},
                "param_groups": mine})

    def __repr__(self) -> str:
        return f"OptimizerContainer({', '.join(type(o).__name__ for o in self.optimizers)})"
