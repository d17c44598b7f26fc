"""Hugging Face models in: `model.source = "hf:DIR" | "hf-config:FILE"`, loaded from local files only.

The model class follows the task (`AutoModelForCausalLM` for lm, `AutoModelForSequenceClassification`
for classify); the tokenizer comes from the same directory (for hf-config:, from `data.tokenizer` or
the config file's directory). Nothing is fetched over the network (`local_files_only`), and a
directory's own Python code runs only with `model.trust_remote_code = true`.

`hf:package:NAME/SUB` names SUB inside the installed Python package NAME (found by importlib), so a
recipe can point at weights a package ships without knowing where site-packages is.
"""

from __future__ import annotations

import importlib.util
import json
import os
import struct
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from bigbatch.errors import UsageError

# The weights files transformers' from_pretrained reads from a directory, in its order of preference
# (a sharded checkpoint is an index naming its shards).
WEIGHTS_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                 "pytorch_model.bin.index.json")
# The model heads bigbatch trains, by transformers' Auto class: a task names its head (tasks/).
HEADS = {"causal-lm": "AutoModelForCausalLM",
         "sequence-classification": "AutoModelForSequenceClassification"}


@dataclass(frozen=True)
class HFSource:
    kind: str          # "hf" (pretrained weights) or "hf-config" (random initialisation)
    path: Path         # the model directory, or the config file


def parse_source(source: str) -> HFSource | None:
    """None for the built-in GPT; otherwise where the Hugging Face model lives (checked)."""
    if source == "gpt":
        return None
    kind, _, rest = source.partition(":")
    if kind == "hf" and rest.startswith("package:"):
        name, _, sub = rest[len("package:"):].partition("/")
        spec = importlib.util.find_spec(name) if name else None
        if spec is None or not spec.submodule_search_locations:
            raise UsageError(f"model.source = {source!r}: no installed Python package {name!r} "
                             "(install it, or give hf:DIR)")
        path = Path(next(iter(spec.submodule_search_locations))) / sub
    else:
        path = Path(rest).expanduser()
    if kind == "hf" and not (path / "config.json").is_file():
        raise UsageError(f"model.source = {source!r}: {str(path)!r} is not a Hugging Face model "
                         "directory (no config.json)")
    if kind == "hf":
        check_weights(source, path)
    if kind == "hf-config" and not path.is_file():
        raise UsageError(f"model.source = {source!r}: {str(path)!r} is not a config file")
    if kind not in ("hf", "hf-config"):
        raise UsageError(f"model.source = {source!r} is invalid: gpt, hf:DIR or hf-config:FILE")
    return HFSource(kind, path)


def check_weights(source: str, directory: Path) -> None:
    """The directory's weights are there and whole: read from their headers only (a safetensors
    header, a zip's central directory), so a missing or truncated file is one line before the
    corpus is prepared rather than transformers' traceback after it."""
    found = next((directory / name for name in WEIGHTS_FILES if (directory / name).is_file()),
                 None)
    if found is None:
        raise UsageError(f"model.source = {source!r}: {str(directory)!r} has no weights: "
                         f"expected one of {', '.join(WEIGHTS_FILES)}")
    shards = [found]
    if found.name.endswith(".index.json"):
        try:
            weight_map = json.loads(found.read_text())["weight_map"]
            shards = [directory / name for name in dict.fromkeys(weight_map.values())]
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise UsageError(f"model.source = {source!r}: {str(found)!r} is not a weights index "
                             "(JSON with a weight_map)") from None
    for shard in shards:
        problem = weights_file_problem(shard)
        if problem:
            raise UsageError(f"model.source = {source!r}: the weights file {str(shard)!r} "
                             f"{problem}: download or save the model again")


def weights_file_problem(path: Path) -> str:
    """"" for a weights file whose header says it is whole; else what is wrong with it."""
    try:
        size = path.stat().st_size
        with path.open("rb") as file:
            if path.suffix == ".safetensors":  # u64 header length, JSON header, then the data
                (length,) = struct.unpack("<Q", file.read(8).ljust(8, b"\0"))
                if length == 0 or 8 + length > size:
                    return f"is truncated or not safetensors ({size:,} bytes)"
                header = json.loads(file.read(length))
                end = max((info["data_offsets"][1] for key, info in header.items()
                           if key != "__metadata__"), default=0)
                if 8 + length + end > size:
                    return (f"is truncated: {size:,} bytes, its header describes "
                            f"{8 + length + end:,}")
            elif file.read(4) == b"PK\x03\x04" and not zipfile.is_zipfile(file):
                return f"is truncated: a zip archive (torch.save) without its end ({size:,} bytes)"
    except FileNotFoundError:
        return "is missing (named by the index)"
    except OSError as err:
        return f"cannot be read: {err.strerror}"
    except (ValueError, KeyError, TypeError, IndexError):
        return "has a corrupt header"
    return ""


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' own progress bars and load reports (a coloured "LOAD REPORT" table) off
    while it loads, so a run's output is bigbatch's; what matters of them is said in one line
    by the caller. `--debug` (BIGBATCH_DEBUG=1, inherited by torchrun's ranks and the planner's
    probes) leaves transformers as it is configured."""
    if os.environ.get("BIGBATCH_DEBUG"):
        yield
        return
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def tokenizer_dir(source: HFSource, data_tokenizer: str) -> Path:
    if data_tokenizer:
        return Path(data_tokenizer).expanduser()
    return source.path if source.kind == "hf" else source.path.parent


def load_tokenizer(source: HFSource, data_tokenizer: str, trust_remote_code: bool):
    from transformers import AutoTokenizer

    directory = tokenizer_dir(source, data_tokenizer)
    try:
        with quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True,
                                                      trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise UsageError(f"no Hugging Face tokenizer in {str(directory)!r} (set data.tokenizer "
                         f"to a directory with one): {str(err).splitlines()[0]}") from None
    if not tokenizer.is_fast:  # windows of long texts need the fast tokenizer's overflow
        raise UsageError(f"the tokenizer in {str(directory)!r} is not a fast (Rust) tokenizer: "
                         "give a directory with tokenizer.json")
    return tokenizer


def text_dims(source: HFSource, trust_remote_code: bool) -> dict[str, int]:
    """The text model's vocabulary, layers, width and heads, read from its config."""
    config = load_config(source, trust_remote_code)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return {"vocab_size": text.vocab_size, "n_layer": text.num_hidden_layers,
            "d_model": text.hidden_size, "n_head": text.num_attention_heads}


def load_config(source: HFSource, trust_remote_code: bool, **overrides):
    from transformers import AutoConfig

    path = source.path  # a directory (hf:) or a config file (hf-config:): AutoConfig reads both
    try:
        with quiet_transformers():
            return AutoConfig.from_pretrained(str(path), local_files_only=True,
                                              trust_remote_code=trust_remote_code, **overrides)
    except (OSError, ValueError) as err:
        raise UsageError(f"model.source: cannot read a Hugging Face config from {str(path)!r}: "
                         f"{str(err).splitlines()[0]}") from None


def auto_model_class(head: str):
    """transformers' Auto class for a model head (HEADS)."""
    import transformers

    return getattr(transformers, HEADS[head])


def build_hf_model(source: HFSource, head: str, *, trust_remote_code: bool,
                   labels: list[str] | None = None, dtype: torch.dtype = torch.float32,
                   say: Callable[[str], None] | None = None) -> nn.Module:
    """The model with `head` (HEADS), pretrained (hf:) or freshly initialised (hf-config:), in
    fp32 (autocast does the lower precision). With `labels`, the head gets one output per label
    and the label names (so an exported model reports them). `say` gets one line naming the
    weights that the checkpoint did not have (newly initialised, e.g. a classification head)."""
    overrides = {}
    if labels is not None:
        overrides = {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
                     "label2id": {name: i for i, name in enumerate(labels)}}
    config = load_config(source, trust_remote_code, **overrides)
    auto = auto_model_class(head)
    try:
        with quiet_transformers():
            if source.kind == "hf-config":
                return auto.from_config(config, trust_remote_code=trust_remote_code, dtype=dtype)
            model, info = auto.from_pretrained(str(source.path), config=config,
                                               local_files_only=True, output_loading_info=True,
                                               trust_remote_code=trust_remote_code, dtype=dtype)
    except ValueError as err:  # e.g. an architecture without a head for this task
        raise UsageError(f"model.source = {str(source.path)!r} has no {auto.__name__} "
                         f"({head} head): {str(err).splitlines()[0]}") from None
    if say is not None and info.get("missing_keys"):
        say(f"model: newly initialised (not in the checkpoint): "
            f"{', '.join(sorted(info['missing_keys']))}")
    return model


def apply_hf_checkpointing(model: nn.Module, mode: str, every: int = 1) -> bool:
    """Activation checkpointing through transformers' own switch (per layer; non-reentrant, so
    it works with DDP and with inputs that need no grad). every_n: every `every`-th layer."""
    if mode in ("none", "auto"):  # "auto" unresolved by the planner means none
        return False
    every = every if mode == "every_n" else 1
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs,
                                              every_n_layers=every)
    elif every == 1:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        raise UsageError("model.activation_checkpointing = \"every_n\" needs a transformers "
                         "version with activation_checkpointing_enable: use all or none")
    if hasattr(model.config, "use_cache"):
        model.config.use_cache = False  # a generation cache is useless in training
    return True


def describe_hf_model(model: nn.Module, source: HFSource) -> str:
    count = sum(p.numel() for p in model.parameters())
    how = "pretrained" if source.kind == "hf" else "randomly initialised"
    return (f"model: {type(model).__name__} {count / 1e6:.2f}M parameters, {how} from "
            f"{source.path}")
