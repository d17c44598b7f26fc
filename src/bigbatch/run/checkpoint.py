"""Full-state checkpoints: the `Checkpointer` that saves and restores everything a run carries.

    RUN_DIR/checkpoints/step-00001000/
        model.safetensors   the unwrapped model's weights (checkpoint_state.py)
        optimizer.pt        the optimizer's full state; read back with torch.load(weights_only=True)
        rng.safetensors     every rank's torch CPU generator state (and CUDA one on a GPU),
                            as `rank{r}.torch_cpu`, ...
        state.json          TrainState, loader position, GradScaler, every rank's Python and
                            NumPy RNG, the model's shape and the resolved config
        manifest.json       size and sha256 of every file above; written last (checkpoint_files.py)

The files are written atomically and checked before loading (checkpoint_files.py). The learning
rate has no state of its own: the schedule is a pure function of `TrainState.tokens_seen` (and the
config), so restoring the state restores it.

A warmup-stable-decay run also keeps its newest checkpoint before the cooldown, whatever
`checkpoint.keep` says (state.json: `"before_cooldown": true`), and writes one at the last step
before the cooldown: a longer run continues from it exactly (run/extend.py).
"""

from __future__ import annotations

import json
import pickle
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from bigbatch.config.files import config_to_dict
from bigbatch.config.sections import Config
from bigbatch.data.loader import TokenLoader
from bigbatch.engine.loop import TrainState
from bigbatch.engine.seeding import derived_seed, seed_everything
from bigbatch.errors import UsageError
from bigbatch.model.artifacts import unwrap
from bigbatch.optim.schedule import before_cooldown
from bigbatch.parallel.process_group import DistInfo, barrier
from bigbatch.run.checkpoint_files import (
    FORMAT,
    PARTIAL_PREFIXES,
    checkpoint_name,
    checkpoint_step,
    list_checkpoints,
    write_checkpoint,
)
from bigbatch.run.checkpoint_state import (
    load_model_state,
    load_optimizer_state,
    model_description,
    model_state,
    optimizer_state,
    tied_embedding_key,
    trainable_keys,
)
from bigbatch.run.disk_space import tensor_bytes
from bigbatch.run.extend import RESULT_NEUTRAL, check_extension, marked_before_cooldown
from bigbatch.run.preemption import any_rank
from bigbatch.run.rng_state import gather_rng, rank_rng, restore_rng


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


# The global batch counts a run's steps: the schedule ends after `train.max_steps` of them, and
# warmup and decay are counted in their tokens. A resume that changed it would show the
# checkpoint's step against a total in another batch ("step 10/8"), jump the learning rate and
# end at another step than it says, so it is refused (a cbs branch, which counts its own steps
# in its own batch, is allowed: `branch=True`).
BATCH_KEYS = ("batch.global_tokens", "batch.global_sequences")


def check_same_batch(path: Path, saved: dict[str, Any], now: dict[str, Any]) -> None:
    old, new = _flatten(saved), _flatten(now)
    for key in BATCH_KEYS:
        if old.get(key) is not None and old.get(key) != new.get(key):
            raise UsageError(f"{key} = {new.get(key)!r} but checkpoint {path} was trained with "
                             f"{old.get(key)!r}: a resumed run counts its steps, learning rate "
                             f"and end in the checkpoint's batch; resume with "
                             f"--{key}={old.get(key)}, or start a new --out with the new batch")


class Checkpointer:
    """Saves and restores everything a run carries. `maybe_save` is fit()'s `on_step_end`."""

    def __init__(self, run_dir: Path, cfg: Config, *, model: nn.Module,
                 optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                 loader: TokenLoader, dist: DistInfo, device: torch.device,
                 full_batch_tokens: int, say: Callable[[str], None] = print) -> None:
        self.directory = run_dir / "checkpoints"
        self.cfg, self.model, self.optimizer, self.scaler = cfg, model, optimizer, scaler
        self.loader, self.dist, self.device, self.say = loader, dist, device, say
        self.full_batch_tokens = full_batch_tokens  # the schedule's unit: where the cooldown is
        self.last_path: Path | None = None  # the newest checkpoint written or resumed from
        self.last_step = -1
        self.last_time = time.monotonic()

    def last_checkpoint_note(self, step: int | None = None) -> str:
        """Where the run can continue from, for an error's line; `step` (the step the run had
        reached) adds how many trained steps that leaves to redo, or lost without a checkpoint."""
        if self.last_path is None:
            lost = f", so its {step} trained step(s) are lost" if step else ""
            return f"no checkpoint of this run was written{lost}"
        redo = (f" (the {step - self.last_step} step(s) after it are trained again)"
                if step is not None and step > self.last_step else "")
        return (f"the last checkpoint, {self.last_path} (step {self.last_step}), is intact: "
                f"continue from it with --resume {self.last_path} or --resume auto{redo}")

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
        # A wsd run with checkpointing on also saves at its last step before the cooldown: the
        # latest point a longer run shares with it, so an extension redoes no stable steps.
        checkpointing = every.every_steps > 0 or every.every_minutes > 0
        due = due or (checkpointing and self.last_before_cooldown(state.tokens_seen))
        # Not while steps are being skipped as non-finite: the last good checkpoint must survive
        # the rotation below if the run then stops for too many of them.
        if due and state.bad_steps_in_row == 0:
            self.save(state)

    def before_cooldown(self, tokens_seen: int) -> bool:
        return before_cooldown(tokens_seen, self.cfg.optim, full_batch_tokens=self.full_batch_tokens,
                               max_steps=self.cfg.train.max_steps)

    def last_before_cooldown(self, tokens_seen: int) -> bool:
        """Before the cooldown, and a full batch more would be in it. The next step's batch is
        at most the full one, so the last state before the cooldown is always among these (under
        a batch ramp a step or two before it may be too: each is saved, the newest kept)."""
        return (self.before_cooldown(tokens_seen)
                and not self.before_cooldown(tokens_seen + self.full_batch_tokens))

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
                    "config": config_to_dict(self.cfg),
                    "before_cooldown": self.before_cooldown(state.tokens_seen)}
            if trainable_keys(self.model) is not None:  # what model.safetensors leaves out
                meta["frozen_base"] = {"source": self.cfg.model.source,
                                       "note": "not in this checkpoint: rebuilt from source"}
            write_checkpoint(self.directory, state.step, {
                "model.safetensors": lambda path: save_file(tensors, str(path)),
                "optimizer.pt": lambda path: torch.save(optim, path),
                "rng.safetensors": lambda path: save_file(rng_tensors, str(path)),
                "state.json": lambda path: path.write_text(json.dumps(meta, indent=1)),
            }, needed=tensor_bytes([tensors, optim, rng_tensors]))
            self._rotate()
        barrier(self.dist)
        self.last_path, self.last_step, self.last_time = final, state.step, time.monotonic()
        return final

    def _rotate(self) -> None:
        """Delete all but the newest `checkpoint.keep` checkpoints, and the newest one before a
        wsd cooldown (only that one: older ones before it go as usual)."""
        checkpoints = list_checkpoints(self.directory)
        kept = next((p for p in reversed(checkpoints) if marked_before_cooldown(p)), None
                    ) if self.cfg.optim.decay == "wsd" else None
        for old in checkpoints[:-self.cfg.checkpoint.keep]:
            if old != kept:
                shutil.rmtree(old, ignore_errors=True)

    def save_unless_saved(self, state: TrainState) -> Path:
        if self.last_path is not None and self.last_step == state.step:
            return self.last_path
        return self.save(state)

    def restore(self, path: Path, state: TrainState, branch: bool = False) -> None:
        """Load `path` (already verified) into the live objects and `state`. A changed global
        batch is refused unless `branch` (a new run that starts from the checkpoint and counts
        its own steps in the new batch, as cbs's branches do)."""
        meta = json.loads((path / "state.json").read_text())
        now = config_to_dict(self.cfg)
        if not branch:
            check_same_batch(path, meta["config"], now)
        tensors = load_file(str(path / "model.safetensors"))
        self._check_compatible(path, meta, tensors)
        all_changes = config_changes(meta["config"], now)
        # A longer max_steps continues this run (--out) for longer; a checkpoint of another run
        # directory starts a new run from its weights, whose schedule is its own (a note below).
        own = path.parent.resolve() == self.directory.resolve()
        extension = check_extension(path, meta, now, all_changes) if own and not branch else None
        # How often to checkpoint, how to spread the work over ranks and where metrics go
        # change no result (up to reduction order), so only the other settings are worth a note.
        changes = [c for c in all_changes if not c.startswith(RESULT_NEUTRAL)]
        if extension:  # only max_steps changed: the longer run, exactly
            self.say(extension)
        elif changes:
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
