"""The two helpers every config section uses: a documented field, and a checked value."""

from __future__ import annotations

from dataclasses import field
from typing import Any

from bigbatch.errors import UsageError


def option(default: Any, doc: str) -> Any:
    return field(default=default, metadata={"doc": doc})


def require(condition: bool, key: str, value: Any, valid: str) -> None:
    if not condition:
        raise UsageError(f"{key} = {value!r} is invalid: {valid}")
