"""LoRA adapters through `peft` (`model.adapter = "lora"`): the base weights frozen, low-rank
A (r x in) and B (out x r) trained beside each targeted projection, scaled by alpha / r.

`peft.get_peft_model` wraps the model (a `PeftModel`, which forwards attribute access to the
model inside it); nothing here reimplements LoRA. The built-in GPT is a plain `nn.Module` to
peft, which adapts its Linear layers by name. A classifier's head (BERT's `classifier`, GPT-2's
and Llama's `score`) is trained whole: peft's sequence-classification task puts it in
`modules_to_save`. The names to adapt default per model family to the attention and MLP
projections (`DEFAULT_TARGETS`); `model.lora_targets` overrides them.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from bigbatch.config.model_section import ModelConfig
from bigbatch.errors import UsageError

# Module names (last components) of each family's attention and MLP projections.
DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    "gpt": ("qkv", "proj", "fc"),  # the built-in GPT (model/gpt.py)
    "bert": ("query", "key", "value", "dense"),
    "roberta": ("query", "key", "value", "dense"),
    "gpt2": ("c_attn", "c_proj", "c_fc"),
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "mistral": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "qwen2": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
}
# peft's task type for each model head (model/hf.py HEADS): it chooses the PeftModel class (its
# forward and saving) and, for classification, keeps the head fully trained.
PEFT_TASK_TYPES = {"causal-lm": "CAUSAL_LM", "sequence-classification": "SEQ_CLS"}
# What peft's save_pretrained writes into a directory, and from_pretrained reads.
ADAPTER_FILE, ADAPTER_CONFIG = "adapter_model.safetensors", "adapter_config.json"


def model_family(model: nn.Module) -> str:
    """"gpt" for the built-in GPT, else the Hugging Face config's model_type."""
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None) or "gpt"


def adaptable_types() -> tuple[type[nn.Module], ...]:
    """The layer types peft's LoRA adapts (its `dispatch_default`, peft/tuners/lora/layer.py):
    any other module a target names (a LayerNorm, a block, a ModuleList) makes get_peft_model
    raise."""
    types: tuple[type[nn.Module], ...] = (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d,
                                          nn.Conv3d, nn.MultiheadAttention)
    try:
        from transformers.pytorch_utils import Conv1D  # GPT-2's projections
    except ImportError:
        return types
    return (*types, Conv1D)


def matches(name: str, target: str) -> bool:
    """peft's rule for a name in target_modules: the module's full name, or its last components."""
    return name == target or name.endswith("." + target)


def adaptable_names(model: nn.Module) -> list[str]:
    """The last components of the modules LoRA can adapt, in model order, each once."""
    kinds = adaptable_types()
    names = (name.rsplit(".", 1)[-1] for name, module in model.named_modules()
             if name and isinstance(module, kinds))
    return list(dict.fromkeys(names))


def lora_targets(model: nn.Module, configured: tuple[str, ...]) -> list[str]:
    """The configured names, or the family's default; each must name modules of the model that
    LoRA can adapt (checked here, so a bad name is one line before peft touches the model)."""
    family = model_family(model)
    targets = list(configured) or list(DEFAULT_TARGETS.get(family, ()))
    if not targets:
        raise UsageError(f"model.lora_targets = [] and bigbatch has no default for model family "
                         f"{family!r}: name its projection modules, e.g. [\"q_proj\", \"v_proj\"]")
    kinds, modules = adaptable_types(), list(model.named_modules())
    valid = f"adaptable modules: {', '.join(adaptable_names(model))}"
    for target in targets:
        found = [(name, module) for name, module in modules if matches(name, target)]
        if not found:
            raise UsageError(f"model.lora_targets = {targets!r} is invalid: the model has no "
                             f"module named {target!r}; {valid}")
        bad = next((module for _, module in found if not isinstance(module, kinds)), None)
        if bad is not None:
            what = ("a container of other modules" if any(True for _ in bad.children())
                    else "a layer LoRA cannot adapt")
            raise UsageError(f"model.lora_targets = {targets!r} is invalid: {target!r} is a "
                             f"{type(bad).__name__}, {what}; {valid}")
    return targets


@contextmanager
def quiet_peft() -> Iterator[None]:
    """Silence the one FutureWarning that is peft's, not bigbatch's: PeftModel.__init__ (peft
    0.21.2, peft_model.py) reads `model.is_gradient_checkpointing`, which transformers 5.x
    deprecates for `is_activation_checkpointing`. bigbatch itself uses the current API
    (model/hf.py: activation_checkpointing_enable); no peft release installed here asks the new
    name, and get_peft_model has no switch to skip the question, so only this message, of this
    category, is filtered. Drop this once peft reads is_activation_checkpointing."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        yield


def apply_adapter(model: nn.Module, cfg: ModelConfig, head: str) -> nn.Module:
    """`model` itself for adapter = "none"; else the peft model with LoRA on the targets (the
    base frozen); `head` is the model's head (model/hf.py HEADS). Call it on the device, before DDP/FSDP and before building the optimizer."""
    if cfg.adapter == "none":
        return model
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise UsageError("model.adapter = \"lora\" needs peft: pip install 'bigbatch[hf]'"
                         ) from None
    is_hf = model_family(model) != "gpt"
    config = LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha,
                        lora_dropout=cfg.lora_dropout,
                        target_modules=lora_targets(model, cfg.lora_targets),
                        task_type=PEFT_TASK_TYPES[head] if is_hf else None)
    with quiet_peft():
        return get_peft_model(model, config)


def is_adapted(model: nn.Module) -> bool:
    """Whether `model` (unwrapped) carries peft adapters."""
    return hasattr(model, "peft_config")


def base_model(model: nn.Module) -> nn.Module:
    """The model inside the peft wrapper (itself when there is none)."""
    return model.get_base_model() if is_adapted(model) else model


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters; a tied matrix counts once (parameters() dedupes)."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def describe_parameters(model: nn.Module) -> str:
    trainable, total = parameter_counts(model)
    how = ""
    if is_adapted(model):
        config = model.peft_config["default"]
        how = (f"; LoRA rank {config.r}, alpha {config.lora_alpha:g} on "
               f"{', '.join(sorted(config.target_modules))}")
        if config.modules_to_save:
            how += f"; trained whole: {', '.join(sorted(config.modules_to_save))}"
    return (f"parameters: {trainable / 1e6:.3f}M trainable of {total / 1e6:.2f}M "
            f"({100 * trainable / total:.2f}%{how})")
