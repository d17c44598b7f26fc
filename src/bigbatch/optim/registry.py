"""The optimizers, by name: what `optim.name` may say, how each is built, and the state it keeps.

An entry is one or more parts. A part is one torch optimizer over the trainable parameters that
its rule takes (a predicate on (name, parameter)); each parameter goes to the first part that
takes it. A rule that needs the model (Muon's: the matrices of the repeated Transformer layers)
is made from it when the optimizer is built or its state counted (`Part.takes_from_model`). An entry of one part builds that plain torch optimizer (so its numerics and its
checkpoints are torch's own); an entry of several builds each part over its parameters and
holds them in an `OptimizerContainer` (container.py), which steps, zeroes and saves as one
optimizer (torchtitan's `OptimizersContainer`: e.g. Muon on hidden matrices, AdamW on the rest).

Every part also says how many fp32 tensors of a parameter's size it keeps per parameter (AdamW
and LAMB two moments; LARS and SGD with momentum one buffer): the planner counts optimizer
state per parameter from that (planning/memory.py), so a plan measures what the run holds.

`build_optimizer` records each parameter group's base learning rate, the lr its part built it
with (today `optim.lr` for every group), outside `param_groups`: the schedule scales each group's
own base (schedule.py `set_learning_rates`), and a checkpoint's param groups never hold it.

Adding an optimizer is one entry plus its tests: write a `build_...(params, cfg, device)` that
returns the torch optimizer over `params` (importing torch inside it: the config room imports
this module, and must not import torch), add `"name": single(build_..., state_tensors)` (or
`combine(Part(...), ...)`) to OPTIMIZERS, and test that it builds, steps, saves and reloads
(tests/unit/optim/test_optim_registry.py) and that the planner counts its state
(tests/unit/planning/test_planner.py). "muon" is the example of a combination: its entry, its
builder and its rule below, the torch optimizer in muon.py, its tests in test_muon.py.
Any option it needs beyond OptimConfig's is a field of `OptimConfig` (config/sections.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # types only: torch loads when an optimizer is built; config sits above
    import torch
    from torch import nn

    from bigbatch.config.sections import OptimConfig

NamedParameters = Sequence[tuple[str, "torch.nn.Parameter"]]
BuildFn = Callable[[NamedParameters, "OptimConfig", "torch.device"], "torch.optim.Optimizer"]
Rule = Callable[[str, Any], bool]
ModelRule = Callable[["nn.Module"], Rule]


def every_parameter(name: str, param: Any) -> bool:
    return True


def is_matrix(name: str, param: Any) -> bool:
    """Weights of two or more dimensions: matrices and embeddings (not biases, norm gains)."""
    return param.dim() >= 2


@dataclass(frozen=True)
class Part:
    """One torch optimizer of an entry: how to build it over the parameters its rule takes, and
    the fp32 tensors of each parameter's size it keeps as state."""

    build: BuildFn
    state_tensors: int
    takes: Rule = every_parameter
    # A rule that needs the model (e.g. which parameters sit in its repeated Transformer
    # layers): made from the model by `OptimizerEntry.for_model`, then used as `takes`.
    takes_from_model: ModelRule | None = None


@dataclass(frozen=True)
class OptimizerEntry:
    parts: tuple[Part, ...]

    def for_model(self, model: nn.Module) -> OptimizerEntry:
        """This entry with every rule made from `model` (`Part.takes_from_model`) made."""
        return OptimizerEntry(tuple(
            replace(part, takes=part.takes_from_model(model), takes_from_model=None)
            if part.takes_from_model else part for part in self.parts))

    def part_for(self, name: str, param: Any) -> Part:
        return next(part for part in self.parts if part.takes(name, param))

    def state_tensors(self, name: str, param: Any) -> int:
        """The fp32 tensors of `param`'s size that the optimizer keeps for it."""
        return self.part_for(name, param).state_tensors

    @property
    def uniform_state_tensors(self) -> int | None:
        """The state tensors of every parameter when all parts keep the same; else None (count
        per parameter, with `state_elements`)."""
        counts = {part.state_tensors for part in self.parts}
        return counts.pop() if len(counts) == 1 else None


def single(build: BuildFn, state_tensors: int) -> OptimizerEntry:
    """An entry of one torch optimizer over every trainable parameter."""
    return OptimizerEntry((Part(build, state_tensors),))


def combine(*parts: Part) -> OptimizerEntry:
    """An entry of several optimizers; the last part should take every parameter left."""
    return OptimizerEntry(tuple(parts))


# --- The builders: each a torch optimizer over the parameters it is given. ---------------------

def parameter_groups(params: NamedParameters, weight_decay: float) -> list[dict]:
    """Matrices and embeddings decay; biases and LayerNorm gains (1-D) do not."""
    tensors = [p for _, p in params]
    return [{"params": [p for p in tensors if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in tensors if p.dim() < 2], "weight_decay": 0.0}]


def trust_ratio_groups(params: NamedParameters, weight_decay: float) -> list[dict]:
    """`parameter_groups` with the trust ratio on the matrices only: the LAMB and LARS papers
    exclude norm gains and biases from the trust ratio as well as from weight decay."""
    matrices, vectors = parameter_groups(params, weight_decay)
    return [{**matrices, "trust_ratio": True}, {**vectors, "trust_ratio": False}]


def build_adamw(params: NamedParameters, cfg: OptimConfig, device: torch.device
                ) -> torch.optim.Optimizer:
    import torch

    # The fused kernel exists for CPU and CUDA in the torch versions we support; it updates
    # all parameters in one pass instead of a Python loop over tensors.
    fused = device.type in ("cpu", "cuda")
    return torch.optim.AdamW(parameter_groups(params, cfg.weight_decay), lr=cfg.lr,
                             betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused)


def build_sgd(params: NamedParameters, cfg: OptimConfig, device: torch.device
              ) -> torch.optim.Optimizer:
    import torch

    return torch.optim.SGD(parameter_groups(params, cfg.weight_decay), lr=cfg.lr,
                           momentum=cfg.momentum)


def build_lamb(params: NamedParameters, cfg: OptimConfig, device: torch.device
               ) -> torch.optim.Optimizer:
    from bigbatch.optim.large_batch import LAMB

    return LAMB(trust_ratio_groups(params, cfg.weight_decay), lr=cfg.lr,
                betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)


def build_lars(params: NamedParameters, cfg: OptimConfig, device: torch.device
               ) -> torch.optim.Optimizer:
    from bigbatch.optim.large_batch import LARS

    return LARS(trust_ratio_groups(params, cfg.weight_decay), lr=cfg.lr, momentum=cfg.momentum,
                trust_coefficient=cfg.trust_coefficient)


def build_muon(params: NamedParameters, cfg: OptimConfig, device: torch.device
               ) -> torch.optim.Optimizer:
    """torch's Muon (optim/muon.py: Newton-Schulz in fp32 on a CPU without native bf16) at
    `optim.lr`: under "match_rms_adamw" each matrix's step is lr x 0.2 sqrt(max(A, B)), the RMS
    of an AdamW update, so AdamW's lr and weight decay carry over (Moonlight, torchtitan)."""
    from bigbatch.optim.muon import Muon, newton_schulz_dtype

    return Muon([p for _, p in params], lr=cfg.lr, weight_decay=cfg.weight_decay,
                momentum=cfg.muon_momentum, nesterov=cfg.muon_nesterov,
                ns_steps=cfg.muon_ns_steps, adjust_lr_fn=cfg.muon_adjust_lr,
                ns_dtype=newton_schulz_dtype(device))


def hidden_matrices(model: nn.Module) -> Rule:
    """The rule of Muon's part: the 2-D weights inside the repeated Transformer layers, found
    as FSDP finds them (layers.py). Embeddings, the output head (tied or not), norms, biases and
    anything outside the layers (a pooler, a classifier) are left to the next part."""
    from bigbatch.errors import UsageError
    from bigbatch.optim.layers import transformer_layers

    layers = transformer_layers(model)
    if not layers:
        raise UsageError("optim.name = 'muon' needs repeated Transformer layers (Muon takes "
                         f"their matrices) and {type(model).__name__} has none bigbatch can "
                         "find (a model of one layer?): a model of 2+ layers, or adamw")
    inside = {id(p) for layer in layers for p in layer.parameters()}
    # LoRA's adapter factors (peft's `lora_A` / `lora_B`) are low-rank by construction and
    # Muon's whole matrices are frozen under LoRA: the adapters train under AdamW, so
    # `optim.name = "muon"` with `model.adapter = "lora"` is AdamW on the adapters.
    return lambda name, p: p.dim() == 2 and id(p) in inside and ".lora_" not in name


OPTIMIZERS: dict[str, OptimizerEntry] = {
    "adamw": single(build_adamw, state_tensors=2),  # exp_avg, exp_avg_sq
    "lamb": single(build_lamb, state_tensors=2),    # exp_avg, exp_avg_sq
    "lars": single(build_lars, state_tensors=1),    # momentum_buffer
    "muon": combine(Part(build_muon, state_tensors=1,  # momentum_buffer
                         takes_from_model=hidden_matrices),
                    Part(build_adamw, state_tensors=2)),  # exp_avg, exp_avg_sq
    "sgd": single(build_sgd, state_tensors=1),      # momentum_buffer
}


def optimizer_entry(name: str) -> OptimizerEntry:
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}: one of {', '.join(OPTIMIZERS)}")
    return OPTIMIZERS[name]


def trainable_parameters(model: nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device
                    ) -> torch.optim.Optimizer:
    """The optimizer `cfg.name` names over `model`'s trainable parameters: a plain torch
    optimizer for an entry of one part, an `OptimizerContainer` for a combination. Each group's
    base lr (the lr it was built with) is recorded for the schedule (`base_lrs`)."""
    entry = optimizer_entry(cfg.name).for_model(model)
    params = trainable_parameters(model)
    if len(entry.parts) == 1:
        optimizer = entry.parts[0].build(params, cfg, device)
    else:
        from bigbatch.optim.container import OptimizerContainer

        taken: dict[int, list[tuple[str, torch.nn.Parameter]]] = {}
        for name, p in params:
            taken.setdefault(entry.parts.index(entry.part_for(name, p)), []).append((name, p))
        parts = [part.build(taken[i], cfg, device) for i, part in enumerate(entry.parts)
                 if i in taken]
        for part in parts:  # a part's empty group (e.g. no 1-D weights among its parameters)
            # goes: torch.distributed.checkpoint loads at most one empty group per optimizer.
            part.param_groups[:] = [group for group in part.param_groups if group["params"]]
        optimizer = OptimizerContainer(parts)
    record_base_lrs(optimizer)
    return optimizer


def record_base_lrs(optimizer: torch.optim.Optimizer) -> None:
    """Keep each parameter group's lr as built as its base lr, on the optimizer object and not in
    its `param_groups`: `load_state_dict` replaces those with the checkpoint's, which may predate
    this record (and the config, not the checkpoint, says the base lr)."""
    optimizer.base_lrs = [group["lr"] for group in optimizer.param_groups]


def state_elements(name: str, model: nn.Module) -> int:
    """The fp32 elements of optimizer state that `name` keeps for `model`'s trainable
    parameters, counted per parameter: a combination counts each part's own state."""
    entry = optimizer_entry(name).for_model(model)
    return sum(entry.state_tensors(n, p) * p.numel() for n, p in trainable_parameters(model))
