"""The repeated Transformer layers of a model: the one rule that FSDP shards by (parallel/wrap.py
makes each layer a unit) and that Muon takes its matrices by (optim/muon.py). It lives in the
optimizer room because that room sits below the model and parallel rooms (the config room
checks `optim.name` against the registry), and both ask it.

The layers are found, not named: the classes a Hugging Face model lists in `_no_split_modules`
that occur more than once (BERT's `BertLayer`, GPT-2's `GPT2Block`, Llama's
`LlamaDecoderLayer`), else the children of the largest ModuleList of one class (the built-in
GPT's `blocks`, most custom models; one of a single layer too, so a one-layer GPT has its layer:
Muon, the default optimizer, takes its matrices).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # types only: the registry imports this module without torch
    from torch import nn


def transformer_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated Transformer layers of `model`, outermost only, in model order."""
    from torch import nn

    no_split = set(getattr(model, "_no_split_modules", None) or ())
    counts: dict[str, int] = {}
    for module in model.modules():
        counts[type(module).__name__] = counts.get(type(module).__name__, 0) + 1
    repeated = {name for name in no_split if counts.get(name, 0) > 1}
    if repeated:  # a single no-split module (BertEmbeddings) is not a layer: the root keeps it
        layers = [m for m in model.modules() if type(m).__name__ in repeated]
    else:
        lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) >= 1
                 and len({type(child) for child in m}) == 1]
        layers = list(max(lists, key=lambda m: sum(p.numel() for p in m.parameters()),
                          default=()))
    inside = {id(sub) for layer in layers for sub in layer.modules() if sub is not layer}
    return [layer for layer in layers if id(layer) not in inside]
