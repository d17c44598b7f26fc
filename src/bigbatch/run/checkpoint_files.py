"""A checkpoint's files: written atomically, checksummed, verified before loading.

A checkpoint is written into `.tmp-step-...`, every file and the directory are fsynced, and the
directory is renamed into place: a `step-*` directory is therefore always complete, and a crash
mid-save leaves only a temporary directory, which the next run removes (checkpoint.py). Loading
checks every file against `manifest.json` (size and sha256 of every file, written last) first.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

from bigbatch.errors import UsageError
from bigbatch.run.disk_space import disk_full_line, is_disk_full

FORMAT = 1
MANIFEST = "manifest.json"
NAME = re.compile(r"step-(\d{8})")
PARTIAL_PREFIXES = (".tmp-step-", ".old-step-")  # left behind by a save that was killed


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


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


def write_checkpoint(directory: Path, step: int, writers: dict[str, Callable[[Path], None]],
                     needed: int | None = None) -> Path:
    """Call each `writers[name](path)` inside a temporary directory, add the manifest, fsync,
    and rename the directory to `directory/step-XXXXXXXX`. On a full disk (about `needed` bytes
    did not fit: an OSError, or torch's or safetensors' own error) or another OSError nothing is
    left behind, the checkpoints already there are untouched, and one line says what failed."""
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
    except Exception as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_full(err, directory, needed):
            raise UsageError(f"{disk_full_line(f'checkpoint {final}', directory, needed)}: "
                             "free space, then run the same command with --resume auto") from None
        if not isinstance(err, OSError):
            raise
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
