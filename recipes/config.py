"""Recipe configs: YAML files read into nested dataclasses, with overrides and validation.

A recipe's config is a dataclass whose fields are sections (nested dataclasses) or values. The
YAML mirrors it; ``key.sub=value`` overrides (the value parsed as YAML) are applied on top.
Every value is type-checked against the field's annotation, and every error names the field by its
dotted path (``training.max_steps must be an int >= 1, got 0``). Relative paths are relative to
the working directory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from memflow_adapter import MemFlowConfig

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value that is missing, unknown, mistyped or out of range; names the field."""


def check(ok: bool, field: str, expected: str, value: Any) -> None:
    """Raise ``ConfigError("<field> must be <expected>, got <value>")`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"{field} must be {expected}, got {value!r}")


def load_config(cls: type[T], path: str | Path, overrides: Sequence[str] = ()) -> T:
    """Read ``path`` (YAML) into ``cls``, applying ``key.sub=value`` overrides first."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {str(path)!r} must hold a mapping, got {type(data).__name__}"
        )
    for override in overrides:
        key, sep, raw = override.partition("=")
        if not sep or not key:
            raise ConfigError(f"overrides must look like section.key=value, got {override!r}")
        _set_dotted(data, key.split("."), yaml.safe_load(raw))
    return from_dict(cls, data)


def from_dict(cls: type[T], data: Any, path: str = "") -> T:
    """Build dataclass ``cls`` from plain data, checking every field's type."""
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'the config'} must be a mapping, got {data!r}")
    if cls is MemFlowConfig:
        return _memflow_config(data, path)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown key(s) {', '.join(_join(path, k) for k in unknown)}; "
            f"{path or 'the config'} accepts {sorted(fields)}"
        )
    values = {}
    for name, field in fields.items():
        if name in data:
            values[name] = _convert(hints[name], data[name], _join(path, name))
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{_join(path, name)} is required")
    try:
        return cls(**values)
    except (TypeError, ValueError) as error:  # errors of the library's configs name the field too
        raise ConfigError(_join(path, str(error))) from None


def to_dict(config: Any) -> Any:
    """Plain YAML-ready data of a config (paths as strings, tuples as lists)."""
    if dataclasses.is_dataclass(config):
        return {f.name: to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, (list, tuple)):
        return [to_dict(item) for item in config]
    if isinstance(config, dict):
        return {key: to_dict(value) for key, value in config.items()}
    return str(config) if isinstance(config, Path) else config


# --------------------------------------------------------------------------------------- helpers
def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


def _memflow_config(data: dict[str, Any], path: str) -> MemFlowConfig:
    """``{preset: reference, <field>: <override>, ...}`` -> ``MemFlowConfig.preset(...)``."""
    data = dict(data)
    preset = data.pop("preset", "reference")
    try:
        return MemFlowConfig.preset(preset, **data)
    except (TypeError, ValueError) as error:
        raise ConfigError(_join(path, str(error))) from None


def _convert(hint: Any, value: Any, path: str) -> Any:
    """``value`` checked (and converted: lists to tuples, str to Path) against ``hint``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [arg for arg in args if arg is not type(None)]
        if len(inner) == 1:
            return _convert(inner[0], value, path)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, path)
    if origin in (tuple, list):
        check(isinstance(value, (list, tuple)), path, "a list", value)
        item = args[0] if args else Any
        items = [_convert(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or hint is dict:
        check(isinstance(value, dict), path, "a mapping", value)
        return dict(value)
    if hint is Any:
        return value
    if hint is bool:
        check(isinstance(value, bool), path, "true or false", value)
    elif hint is int:
        check(isinstance(value, int) and not isinstance(value, bool), path, "an int", value)
    elif hint is float:
        # PyYAML reads exponents without a dot (1e-4) as strings.
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                value = float(value)
        check(
            isinstance(value, (int, float)) and not isinstance(value, bool), path, "a number", value
        )
        return float(value)
    elif hint is str:
        check(isinstance(value, str), path, "a string", value)
    elif hint is Path:
        check(isinstance(value, (str, Path)), path, "a path", value)
        return Path(value)
    else:
        raise TypeError(f"config field {path} has an unsupported annotation {hint!r}")
    return value


def _set_dotted(data: dict[str, Any], keys: list[str], value: Any) -> None:
    node = data
    for key in keys[:-1]:
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        elif not isinstance(child, dict):
            raise ConfigError(f"cannot override {'.'.join(keys)}: {key} is not a section")
        node = child
    node[keys[-1]] = value
