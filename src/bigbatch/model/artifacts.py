"""The finished model on disk: `model.safetensors`, `model.json` (its shape), `tokenizer.json`.

safetensors holds tensors only, so loading it can never execute code (unlike pickle).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer
from torch import nn

from bigbatch.errors import UsageError
from bigbatch.model.gpt import GPT, GPTShape


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside DDP (or any wrapper exposing `.module`)."""
    return model.module if hasattr(model, "module") else model


def state_dict_for_saving(model: GPT, state: dict[str, torch.Tensor] | None = None
                          ) -> dict[str, torch.Tensor]:
    """`state` (default: the model's own) on CPU; pass the gathered full one under FSDP."""
    state = model.state_dict() if state is None else state
    # The tied output matrix is the embedding; safetensors refuses shared storage, so save it once.
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    state.pop("lm_head.weight", None)
    return state


def save_model(model: GPT, tokenizer: Tokenizer, out_dir: Path,
               state: dict[str, torch.Tensor] | None = None) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".model.safetensors.tmp{os.getpid()}"
    save_file(state_dict_for_saving(model, state), str(tmp))
    os.replace(tmp, out_dir / "model.safetensors")
    (out_dir / "model.json").write_text(json.dumps(asdict(model.shape), indent=1))
    tokenizer.save(str(out_dir / "tokenizer.json"))


def load_model(run_dir: Path, device: torch.device | str = "cpu") -> tuple[GPT, Tokenizer]:
    needed = [run_dir / name for name in ("model.safetensors", "model.json", "tokenizer.json")]
    missing = [p.name for p in needed if not p.is_file()]
    if missing:
        raise UsageError(f"{str(run_dir)!r} is not a finished run directory: missing "
                         f"{', '.join(missing)}")
    shape = GPTShape(**json.loads((run_dir / "model.json").read_text()))
    model = GPT(shape)
    state = load_file(str(run_dir / "model.safetensors"))
    state["lm_head.weight"] = state["wte.weight"]
    model.load_state_dict(state)
    return model.to(device).eval(), Tokenizer.from_file(str(run_dir / "tokenizer.json"))
