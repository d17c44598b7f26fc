"""Configs in and out of files: TOML recipes, `--section.field=VALUE` overrides, the resolved
config written back as TOML, and the per-field documentation. The sections themselves, with their
validation, are the frozen dataclasses of `bigbatch.config.sections`."""

from __future__ import annotations

import dataclasses
import json
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import tomli_w
import tomllib

from bigbatch.config.sections import SECTIONS, Config
from bigbatch.errors import UsageError


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _is_str_list(tp: Any) -> bool:
    """A `tuple[str, ...]` field: a TOML list of strings, held as a tuple (frozen config)."""
    return typing.get_origin(tp) is tuple and typing.get_args(tp) == (str, ...)


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check `value` against the field type; ints are accepted where floats are expected."""
    if _is_str_list(tp):
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
            raise UsageError(f"{key} = {value!r} has the wrong type: expected a list of "
                             'strings, e.g. ["a", "b"] (or [] for none)')
        return tuple(value)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    takes_int = tp is int or int in typing.get_args(tp)  # int | str fields too
    if takes_int and isinstance(value, bool) or not isinstance(value, tp):
        raise UsageError(f"{key} = {value!r} has the wrong type: expected {_type_name(tp)}")
    return value


def _build_section(name: str, values: dict[str, Any]) -> Any:
    cls = SECTIONS[name]
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in known:
            raise UsageError(f"unknown config key {name}.{key}: valid keys in [{name}] are "
                             f"{', '.join(sorted(known))}")
        kwargs[key] = _coerce(f"{name}.{key}", value, hints[key])
    return cls(**kwargs)


def config_from_dict(doc: dict[str, Any]) -> Config:
    sections = {}
    for name, values in doc.items():
        if name not in SECTIONS:
            raise UsageError(f"unknown config section [{name}]: valid sections are "
                             f"{', '.join(SECTIONS)}")
        if not isinstance(values, dict):
            raise UsageError(f"config section [{name}] must be a table of keys, got {values!r}")
        sections[name] = _build_section(name, values)
    return Config(**sections)


def parse_override_value(text: str) -> Any:
    """`--a.b=3e-4` is a float, `=true` a bool, `=[1,2]` a list; anything not TOML is a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _declared_type(section: str, name: str) -> Any:
    cls = SECTIONS.get(section)
    return typing.get_type_hints(cls).get(name) if cls is not None else None


def parse_overrides(args: list[str]) -> dict[str, dict[str, Any]]:
    """Turn `--section.field=VALUE` / `--section.field VALUE` arguments into a nested dict."""
    nested: dict[str, dict[str, Any]] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg.split("=", 1)[0]:
            raise UsageError(f"unexpected argument {arg!r}: overrides look like "
                             "--section.field=VALUE")
        if "=" in arg:
            key, text = arg[2:].split("=", 1)
        elif i + 1 < len(args):
            key, text = arg[2:], args[i + 1]
            i += 1
        else:
            raise UsageError(f"override {arg} has no value: write {arg}=VALUE")
        section, _, name = key.partition(".")
        if not name or "." in name:
            raise UsageError(f"override --{key} must name one field as --section.field")
        value = parse_override_value(text)
        declared = _declared_type(section, name)
        if declared is str and not isinstance(value, str):
            value = text  # a path or name that reads as TOML, e.g. `--data.path=2024`
        elif _is_str_list(declared) and isinstance(value, str):
            value = [value]  # `--train.trackers=wandb`: one name needs no TOML brackets
        nested.setdefault(section, {})[name] = value
        i += 1
    return nested


def _override_text(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list | tuple):
        return json.dumps(list(value))  # a JSON list of strings or numbers is a TOML list
    return str(value)


def load_config(recipe: str | Path | None = None,
                overrides: Sequence[str] | Mapping[str, Any] | None = None) -> Config:
    """The config: dataclass defaults, then the recipe's TOML (a path, or None for defaults),
    then overrides, either command-line style (["--optim.lr=1e-3", "--data.seq_len", "128"])
    or a mapping ({"optim.lr": 1e-3, "data.seq_len": 128}). Unknown keys and wrong types are
    a UsageError naming the key."""
    if isinstance(overrides, Mapping):
        overrides = [f"--{key}={_override_text(value)}" for key, value in overrides.items()]
    doc: dict[str, Any] = {}
    if recipe is not None:
        path = Path(recipe)
        if not path.is_file():
            raise UsageError(f"recipe {str(recipe)!r} is not a file: give a TOML file such as "
                             "configs/tiny.toml")
        try:
            doc = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as err:
            raise UsageError(f"recipe {str(recipe)!r} is not valid TOML: {err}") from None
        except UnicodeDecodeError:
            raise UsageError(f"recipe {str(recipe)!r} is not a UTF-8 text file") from None
    for section, values in parse_overrides(list(overrides or [])).items():
        if isinstance(doc.get(section), dict):
            doc[section] = {**doc[section], **values}
        else:
            doc[section] = values
    return config_from_dict(doc)


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """Plain data, as JSON and TOML hold it: lists, not the frozen config's tuples (a checkpoint's
    config, read back from JSON, then compares equal to the live one's)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def config_to_toml(cfg: Config) -> str:
    return tomli_w.dumps(config_to_dict(cfg))


def field_docs() -> list[tuple[str, Any, str]]:
    """(key, default, doc) for every field, for `bigbatch config --fields`."""
    rows = []
    for name, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            rows.append((f"{name}.{f.name}", f.default, f.metadata.get("doc", "")))
    return rows
