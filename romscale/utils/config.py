"""Typed configs: nested dataclasses <-> YAML, strictly checked (one reader for every config file).

`romscale train CONFIG.yaml` and `romscale adapters benchmark CONFIG.yaml` both read through here:
an unknown key, a wrong type or a value out of range raises ConfigError naming the file and the key
path (`optim.lr`). Types come from the annotations (int, float, str, bool, Literal, Optional,
tuples / lists / dicts of those, nested dataclasses, Any); ranges from the field's metadata
(`ge` / `gt` / `le` / `lt`); help text from `metadata["help"]`, from which `reference` builds the
docs' tables, so they cannot drift. Cross-field checks live in the dataclass's `__post_init__`
(a ValueError there becomes a ConfigError naming the file).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

from romscale.errors import RomscaleError

T = TypeVar("T")
MAX_CONFIG_BYTES = 1 << 20  # a config is a few KB; refuse anything that is clearly not one
_LIMITS = (("ge", lambda v, b: v >= b, ">="), ("gt", lambda v, b: v > b, ">"),
           ("le", lambda v, b: v <= b, "<="), ("lt", lambda v, b: v < b, "<"))


class ConfigError(RomscaleError):
    """A config file (or dict) that is malformed, has unknown keys or values out of range."""


def to_plain(obj: Any) -> Any:
    """A YAML/JSON-able form of a config dataclass (tuples as lists, Paths as strings)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (tuple, list)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(type_name(a) for a in args) + " or null"
    if origin in (tuple, list):
        item = typing.get_args(tp)[0] if typing.get_args(tp) else Any
        return "a list of " + {int: "integers", float: "numbers", str: "strings"}.get(item, type_name(item))
    if origin is dict or dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string", Any: "any value"}.get(tp, str(tp))


def _convert(value: Any, tp: Any, path: str, where: str) -> Any:
    origin = typing.get_origin(tp)

    def bad() -> ConfigError:
        return ConfigError(f"{where}: {path} must be {type_name(tp)}; got {value!r}")

    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise bad()
        return build(tp, value, where, prefix=path)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        for a in args[:-1]:
            try:
                return _convert(value, a, path, where)
            except ConfigError:
                pass
        return _convert(value, args[-1], path, where)
    if origin is Literal:
        if value not in typing.get_args(tp) or isinstance(value, bool):
            raise bad()
        return value
    if origin in (tuple, list):
        if not isinstance(value, list):
            raise bad()
        item = typing.get_args(tp)[0] if typing.get_args(tp) else Any
        items = [_convert(v, item, f"{path}[{i}]", where) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise bad()
        kt, vt = typing.get_args(tp) or (Any, Any)
        return {_convert(k, kt, f"{path}.{k}", where): _convert(v, vt, f"{path}.{k}", where) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise bad()
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad()
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            raise bad()
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad()
        return value
    raise TypeError(f"internal: config type {tp!r} at {path} is not handled")


def _check_range(value: Any, f: dataclasses.Field, path: str, where: str) -> None:
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    for key, ok, word in _LIMITS:
        if key in f.metadata and not ok(value, f.metadata[key]):
            raise ConfigError(f"{where}: {path} must be {word} {f.metadata[key]:g}; got {value!r}")


def build(cls: type[T], data: Any, where: str = "config", *, prefix: str = "", hint: str = "") -> T:
    """Dataclass `cls` from a plain mapping (as YAML gives): unknown or missing keys, wrong types and
    out-of-range values are ConfigErrors naming `where` and the key path."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: {prefix or 'the top level'} must be a mapping of keys to values; got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls) if f.init}
    for key in data:
        if key not in known:
            path = f"{prefix}.{key}" if prefix else str(key)
            raise ConfigError(f"{where}: unknown key {path!r}; {prefix or 'the top level'} takes "
                              f"{', '.join(known)}{f' ({hint})' if hint else ''}")
    for name, f in known.items():
        if name not in data and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{where}: missing required key {(prefix + '.' if prefix else '') + name!r}")
    kwargs = {}
    for name, value in data.items():
        path = f"{prefix}.{name}" if prefix else name
        v = _convert(value, hints[name], path, where)
        _check_range(v, known[name], path, where)
        kwargs[name] = v
    try:
        return cls(**kwargs)
    except (ValueError, TypeError, RomscaleError) as exc:  # __post_init__ checks
        raise ConfigError(f"{where}: {prefix + ': ' if prefix else ''}{exc}") from None


def read_yaml(path: str | Path, what: str = "config") -> Any:
    """The plain data of a YAML file (yaml.safe_load: no arbitrary objects), size-capped."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such file; expected a YAML {what}")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: {path.stat().st_size:,} bytes is too large for a {what}")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(exc).split())})") from None


def load(cls: type[T], path: str | Path, *, what: str = "config", hint: str = "") -> T:
    """Dataclass `cls` from a YAML file, strictly."""
    return build(cls, read_yaml(path, what), str(path), hint=hint)


def reference(cls: type, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(key path, type, default, help) for every field, depth first: the docs' reference tables."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        path = f"{prefix}.{f.name}" if prefix else f.name
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows.extend(reference(tp, path))
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else "(required)")
        limits = [f"{w} {f.metadata[k]:g}" for k, _, w in _LIMITS if k in f.metadata]
        help_text = f.metadata.get("help", "") + (f" ({', '.join(limits)})" if limits else "")
        shown = "null" if default is None else str(default).lower() if isinstance(default, bool) else \
            repr(to_plain(default)).replace("'", '"')
        rows.append((path, type_name(tp), shown, help_text))
    return rows


def reference_markdown(cls: type) -> str:
    """The reference of `cls` as a Markdown table."""
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for path, tp, default, help_text in reference(cls):
        lines.append(f"| `{path}` | {tp} | `{default}` | {help_text} |")
    return "\n".join(lines)
