"""Full-state checkpoints: atomic, checksummed, and loadable without executing code.

    RUN_DIR/checkpoints/step-00001000/
        model.safetensors   the unwrapped model's weights (the tied lm_head is saved once, as wte);
                            with adapters (model.adapter) only the trained ones: the adapters
                            and a head trained whole, never the frozen base, which the config's
                            model.source names and a resume rebuilds
        optimizer.pt        optimizer.state_dict(); read back with torch.load(weights_only=True)
        rng.safetensors     every rank's torch CPU generator state (and CUDA one on a GPU),
                            as `rank{r}.torch_cpu`, ...
        state.json          TrainState, loader position, GradScaler, every rank's Python and
                            NumPy RNG, the model's shape and the resolved config
        manifest.json       size and sha256 of every file above; written last

A checkpoint is written into `.tmp-step-...`, every file and the directory are fsynced, and the
directory is renamed into place: a `step-*` directory is therefore always complete, and a crash
mid-save leaves only a temporary directory, which the next run removes. Loading checks every
file against the manifest first. The LR schedule has no state of its own: it is a pure function
of `TrainState.step`.

`model_state`/`load_model_state` and `optimizer_state`/`load_optimizer_state` are the only places
that touch the model's and optimizer's state; under torch.distributed they gather full state
dicts (every rank calls them; rank 0 writes, every rank reads), so a checkpoint loads at any
world size. (This module's tests run one process; the multi-rank path is parallel.py's.)
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as torch_dist
from safetensors.torch import load_file, save_file
from torch import nn

from bigbatch.config.files import config_to_dict
from bigbatch.config.sections import Config
from bigbatch.data.loader import TokenLoader
from bigbatch.engine.loop import TrainState
from bigbatch.engine.seeding import derived_seed, seed_everything
from bigbatch.errors import UsageError
from bigbatch.model.adapters import is_adapted
from bigbatch.model.artifacts import state_dict_for_saving, unwrap
from bigbatch.parallel.process_group import DistInfo, barrier
from bigbatch.parallel.wrap import full_model_state_dict, load_full_model_state_dict
from bigbatch.run.preemption import any_rank
from bigbatch.run.rng_state import gather_rng, rank_rng, restore_rng

FORMAT = 1
MANIFEST = "manifest.json"
NAME = re.compile(r"step-(\d{8})")
PARTIAL_PREFIXES = (".tmp-step-", ".old-step-")  # left behind by a save that was killed


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


# --- The model's and optimizer's state: swap these four for FSDP full state dicts. ---------------

def tied_embedding_key(model: nn.Module) -> str | None:
    """The key of the input embedding that the output matrix (`lm_head.weight`) is tied to:
    always for the GPT, per its config for a Hugging Face model; None when untied."""
    inner = unwrap(model)
    if is_adapted(inner):  # the output matrix is frozen, so no checkpoint holds it
        return None
    if hasattr(inner, "shape"):  # the built-in GPT
        return "wte.weight"
    config = getattr(inner, "config", None)
    if not getattr(config, "tie_word_embeddings", False) or \
            "lm_head.weight" not in inner.state_dict():
        return None
    embedding = inner.get_input_embeddings()
    return next(f"{name}.weight" for name, module in inner.named_modules() if module is embedding)


def trainable_keys(model: nn.Module) -> set[str] | None:
    """The state-dict keys an adapted model trains (its adapters, a head trained whole); None
    for a model without adapters, all of whose weights a checkpoint holds."""
    inner = unwrap(model)
    if not is_adapted(inner):
        return None
    return {name for name, p in inner.named_parameters() if p.requires_grad}


def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Full weights on CPU (rank 0; {} elsewhere under FSDP), a tied output matrix dropped:
    safetensors refuses shared storage. With adapters only the trained weights: the frozen
    base is the model that `model.source` names, which a resume rebuilds as the run did."""
    full = full_model_state_dict(model)
    keep = trainable_keys(model)
    if keep is not None:
        return {k: v.detach().cpu().contiguous() for k, v in full.items() if k in keep}
    if tied_embedding_key(model) is None:  # an untied output matrix is a weight of its own
        return {k: v.detach().cpu().contiguous() for k, v in full.items()}
    return state_dict_for_saving(unwrap(model), full)


def load_model_state(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    if trainable_keys(model) is not None:  # the adapters over the rebuilt frozen base
        load_full_model_state_dict(model, tensors, strict=False)
        return
    key = tied_embedding_key(model)
    if key is not None and key in tensors:
        tensors = {**tensors, "lm_head.weight": tensors[key]}  # tied: one tensor
    load_full_model_state_dict(model, tensors)


def model_description(model: nn.Module) -> dict[str, Any]:
    """What fixes the model's shapes: the GPT's shape, or a Hugging Face model's config."""
    inner = unwrap(model)
    if hasattr(inner, "shape"):
        return asdict(inner.shape)
    return json.loads(inner.config.to_json_string())


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's full (unsharded) state keyed by parameter names, whatever the world size
    (under torch.distributed gathered to rank 0's CPU), so any world size can resume from it."""
    # Imported here, not at start-up: it pulls in DTensor and sympy (parallel/wrap.py says so).
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    if not torch_dist.is_initialized():  # the full-state options need a process group
        return get_optimizer_state_dict(model, optimizer)
    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(
        full_state_dict=True, cpu_offload=True))


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer,
                         state: dict[str, Any]) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    if not torch_dist.is_initialized():  # moves each tensor to its parameter's device
        set_optimizer_state_dict(model, optimizer, state)
        return
    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(
        full_state_dict=True, broadcast_from_rank0=True))


# --- Files: atomic write, manifest, verification. -------------------------------------------

def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def write_checkpoint(directory: Path, step: int, writers: dict[str, Callable[[Path], None]]
                     ) -> Path:
    """Call each `writers[name](path)` inside a temporary directory, add the manifest, fsync,
    and rename the directory to `directory/step-XXXXXXXX`. On OSError (a full disk) nothing is
    left behind and the checkpoints already there are untouched."""
    final = directory / checkpoint_name(step)
    tmp = directory / f".tmp-{final.name}-{os.getpid()}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        files = {}
        for name, write in writers.items():
            write(tmp / name)
            _fsync(tmp / name)
            files[name] = {"bytes": (tmp / name).stat().st_size, "sha256": _sha256(tmp / name)}
        (tmp / MANIFEST).write_text(json.dumps({"format": FORMAT, "step": step, "files": files},
                                               indent=1))
        _fsync(tmp / MANIFEST)
        _fsync(tmp)
        if final.exists():  # a damaged checkpoint of this step from an abandoned attempt
            old = directory / f".old-{final.name}-{os.getpid()}"
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old)
        else:
            os.rename(tmp, final)
        _fsync(directory)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UsageError(f"could not write checkpoint {final}: {err.strerror or err} (free "
                         "space, or choose another --out)") from None
    return final


def verify_checkpoint(path: Path) -> str | None:
    """None when `path` is a complete checkpoint whose files match its manifest; else why not."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = manifest["files"]
        for name, entry in files.items():
            file = path / name
            if not file.is_file():
                return f"{name} is missing"
            if file.stat().st_size != entry["bytes"]:
                return (f"{name} is {file.stat().st_size} bytes, the manifest says "
                        f"{entry['bytes']} (truncated?)")
            if _sha256(file) != entry["sha256"]:
                return f"{name} does not match its sha256 in the manifest"
    except FileNotFoundError:
        return "it has no manifest.json (incomplete)"
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        return f"its manifest.json is unreadable ({type(err).__name__})"
    if manifest.get("format") != FORMAT:
        return f"its format {manifest.get('format')!r} is not {FORMAT}"
    return None


def list_checkpoints(directory: Path) -> list[Path]:
    """The `step-XXXXXXXX` directories under `directory`, oldest first."""
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.is_dir() and NAME.fullmatch(p.name))


def checkpoint_step(path: Path) -> int:
    return int(NAME.fullmatch(path.name).group(1))


def _flatten(doc: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in doc.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_changes(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """`section.key: old -> new` for every setting that differs between two config dicts."""
    old, new = _flatten(saved), _flatten(now)
    return [f"{key}: {old.get(key)!r} -> {new.get(key)!r}" for key in sorted(old.keys() | new.keys())
            if old.get(key) != new.get(key)]


class Checkpointer:
    """Saves and restores everything a run carries. `maybe_save` is fit()'s `on_step_end`."""

    def __init__(self, run_dir: Path, cfg: Config, *, model: nn.Module,
                 optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                 loader: TokenLoader, dist: DistInfo, device: torch.device,
                 say: Callable[[str], None] = print) -> None:
        self.directory = run_dir / "checkpoints"
        self.cfg, self.model, self.optimizer, self.scaler = cfg, model, optimizer, scaler
        self.loader, self.dist, self.device, self.say = loader, dist, device, say
        self.last_path: Path | None = None  # the newest checkpoint written or resumed from
        self.last_step = -1
        self.last_time = time.monotonic()

    def last_checkpoint_note(self) -> str:
        if self.last_path is None:
            return "no checkpoint of this run was written"
        return (f"the last checkpoint, {self.last_path} (step {self.last_step}), is intact: "
                f"continue from it with --resume {self.last_path}")

    def remove_partial_saves(self) -> None:
        if self.dist.is_main and self.directory.is_dir():
            for path in self.directory.iterdir():
                if path.name.startswith(PARTIAL_PREFIXES):
                    shutil.rmtree(path, ignore_errors=True)

    def maybe_save(self, state: TrainState) -> None:
        every = self.cfg.checkpoint
        due = every.every_steps > 0 and state.step % every.every_steps == 0
        if every.every_minutes > 0:  # clocks differ between ranks: any rank's "due" counts
            minutes = (time.monotonic() - self.last_time) / 60
            due = any_rank(due or minutes >= every.every_minutes, self.dist, self.device)
        # Not while steps are being skipped as non-finite: the last good checkpoint must survive
        # the rotation below if the run then stops for too many of them.
        if due and state.bad_steps_in_row == 0:
            self.save(state)

    def save(self, state: TrainState) -> Path:
        """Every rank calls this (the state getters may be collectives); rank 0 writes."""
        final = self.directory / checkpoint_name(state.step)
        tensors = model_state(self.model)
        optim = optimizer_state(self.model, self.optimizer)
        rng_plain, rng_tensors = gather_rng(self.dist, self.device)
        if self.dist.is_main:
            meta = {"format": FORMAT, "train_state": state.state_dict(),
                    "loader": self.loader.state_dict(), "scaler": self.scaler.state_dict(),
                    "rng": rng_plain, "model_shape": model_description(self.model),
                    "config": config_to_dict(self.cfg)}
            if trainable_keys(self.model) is not None:  # what model.safetensors leaves out
                meta["frozen_base"] = {"source": self.cfg.model.source,
                                       "note": "not in this checkpoint: rebuilt from source"}
            write_checkpoint(self.directory, state.step, {
                "model.safetensors": lambda path: save_file(tensors, str(path)),
                "optimizer.pt": lambda path: torch.save(optim, path),
                "rng.safetensors": lambda path: save_file(rng_tensors, str(path)),
                "state.json": lambda path: path.write_text(json.dumps(meta, indent=1)),
            })
            for old in list_checkpoints(self.directory)[:-self.cfg.checkpoint.keep]:
                shutil.rmtree(old, ignore_errors=True)
        barrier(self.dist)
        self.last_path, self.last_step, self.last_time = final, state.step, time.monotonic()
        return final

    def save_unless_saved(self, state: TrainState) -> Path:
        if self.last_path is not None and self.last_step == state.step:
            return self.last_path
        return self.save(state)

    def restore(self, path: Path, state: TrainState) -> None:
        """Load `path` (already verified) into the live objects and `state`."""
        meta = json.loads((path / "state.json").read_text())
        tensors = load_file(str(path / "model.safetensors"))
        self._check_compatible(path, meta, tensors)
        # How often to checkpoint, how to spread the work over ranks and where metrics go
        # change no result (up to reduction order), so only the other settings are worth a note.
        changes = [c for c in config_changes(meta["config"], config_to_dict(self.cfg))
                   if not c.startswith(("checkpoint.", "parallel.", "train.trackers:"))]
        if changes:
            self.say(f"note: settings changed since the checkpoint, so this run will not match "
                     f"an uninterrupted one: {'; '.join(changes)}")
        load_model_state(self.model, tensors)
        try:  # weights_only: tensors and plain containers only, never code from a pickle
            optim = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            raise UsageError(f"checkpoint {path}/optimizer.pt holds objects other than tensors "
                             "and plain data; refusing to load it") from None
        try:
            load_optimizer_state(self.model, self.optimizer, optim)
        except (ValueError, KeyError) as err:
            raise UsageError(f"checkpoint {path} holds optimizer state for other parameters "
                             f"({err}): resume with the checkpoint's settings") from None
        if self.scaler.is_enabled() and meta["scaler"]:
            self.scaler.load_state_dict(meta["scaler"])
        self.loader.load_state_dict(meta["loader"])
        state.load_state_dict(meta["train_state"])
        self._restore_rng(meta["rng"], load_file(str(path / "rng.safetensors")), state.step)
        self.last_path, self.last_step = path, state.step
        self._discard_newer(state.step)

    def _restore_rng(self, plain: list[dict[str, Any]] | dict[str, Any],
                     tensors: dict[str, torch.Tensor], step: int) -> None:
        """Each rank continues its own streams. At a larger world size than the checkpoint's,
        the new ranks start fresh ones (seeded by the rank and step, so a rerun repeats them)."""
        saved_ranks = 1 if isinstance(plain, dict) else len(plain)
        if self.dist.world_size != saved_ranks:
            self.say(f"note: the checkpoint holds the random state of {saved_ranks} rank(s), "
                     f"this run has {self.dist.world_size}: dropout masks will not match an "
                     "uninterrupted run")
        mine = rank_rng(plain, tensors, self.dist.rank)
        if mine is None:
            seed_everything(derived_seed(self.cfg.train.seed, self.dist.rank, step))
            return
        restore_rng(*mine, self.device)

    def _check_compatible(self, path: Path, meta: dict[str, Any],
                          tensors: dict[str, torch.Tensor]) -> None:
        # Shapes from the module itself (global shapes under FSDP), not a collective gather.
        tied = tied_embedding_key(self.model) is not None
        keep = trainable_keys(self.model)
        expected = {k: v for k, v in unwrap(self.model).state_dict().items()
                    if (k != "lm_head.weight" or not tied) and (keep is None or k in keep)}
        mismatched = sorted(k for k in expected.keys() | tensors.keys()
                            if k not in expected or k not in tensors
                            or expected[k].shape != tensors[k].shape)
        if mismatched:
            shape_changes = [c for c in config_changes(meta["model_shape"],
                                                       model_description(self.model))
                             if not c.startswith("dropout")]
            raise UsageError(f"checkpoint {path} is from an incompatible model "
                             f"({'; '.join(shape_changes) or mismatched[0]}): resume with the "
                             "model and data settings it was trained with, or start a new --out")

    def _discard_newer(self, step: int) -> None:
        """Checkpoints in this run directory beyond the resumed step belong to the abandoned
        attempt (damaged ones, or newer ones when resuming from an older PATH): remove them so
        `--resume auto` never returns to that timeline."""
        if not self.dist.is_main:
            return
        for path in list_checkpoints(self.directory):
            if checkpoint_step(path) > step:
                self.say(f"removing {path}: it is past the resumed step {step}")
                shutil.rmtree(path, ignore_errors=True)
