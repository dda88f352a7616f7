"""Typed configs: one dataclass per command, read from YAML plus ``key.sub=value`` overrides.

Every field carries its help text in ``metadata["help"]``; ``describe`` prints them (the README's
reference is generated from it). Unknown keys and values of the wrong type are errors that name the
dotted key, raised before any model is loaded.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from rebelrl.errors import UserError

C = TypeVar("C")


class ConfigError(UserError, ValueError):
    """A config that cannot mean what the user wants; the message names the dotted key."""


class _StrictLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key repeated in one mapping is an error: plain YAML keeps the
    last one silently, so a section written twice would lose every value of its first copy."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                if isinstance(key, (str, int, float, bool)) and key in first:
                    raise ConfigError(f"line {line}: duplicate key {key!r} (first on line {first[key]}): merge the two into one")
                first.setdefault(key, line)
        return super().construct_mapping(node, deep)


def field(default: Any = dataclasses.MISSING, help: str = "", **kw) -> Any:
    """A dataclass field with a help string; mutable defaults are copied per instance."""
    if isinstance(default, (dict, list)) or dataclasses.is_dataclass(default):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata={"help": help}, **kw)
    return dataclasses.field(default=default, metadata={"help": help}, **kw)


def load_config(cls: type[C], path: str | Path | None, overrides: list[str] = ()) -> C:
    """Read ``path`` (YAML), apply ``key.sub=value`` overrides (values parsed as YAML), build ``cls``."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file not found: {path}")
        if not path.is_file():  # a folder, or a pipe or device that would block or read as an empty config
            raise ConfigError(f"config file {path} is not a regular file")
        try:
            data = yaml.load(path.read_text(encoding="utf-8"), Loader=_StrictLoader) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not valid UTF-8 (byte {e.object[e.start]:#04x} at offset {e.start})") from None
        except ConfigError as e:
            raise ConfigError(f"{path}, {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of config keys")
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        try:
            value = yaml.load(raw, Loader=_StrictLoader) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        except ConfigError as e:
            raise ConfigError(f"override {item!r}: {e}") from None
        set_dotted(data, key, value, f"override {item!r}")
    return from_dict(cls, data)


def set_dotted(data: dict, key: str, value: Any, where: str = "") -> None:
    """``data[a][b][c] = value`` for ``key`` "a.b.c", creating sections on the way."""
    node = data
    *path, last = key.split(".")
    for part in path:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{where or key}: {part!r} is not a section")
    node[last] = value


def from_dict(cls: type[C], data: dict, prefix: str = "") -> C:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown config key {prefix + unknown[0]!r}" + (f" (and {[prefix + u for u in unknown[1:]]})" if unknown[1:] else "")
            + f"; valid keys{' under ' + prefix.rstrip('.') if prefix else ''}: {', '.join(sorted(fields))}"
        )
    kwargs = {name: _coerce(hints[name], value, prefix + name) for name, value in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise  # already names its key
    except (ValueError, TypeError) as e:
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {e}") from None


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(arg, value, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: expected {_name(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value if value is not None else {}, key + ".")
    if origin is typing.Literal:
        if value not in typing.get_args(tp):
            raise ConfigError(f"{key}: expected one of {list(typing.get_args(tp))}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)[:1] or (Any,)
        return [_coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads 3e-6 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as e:  # YAML's "\ud800", or an argument that was not UTF-8
                raise ConfigError(f"{key}: holds {value[e.start]!r} at character {e.start}, which is not text (a lone surrogate)") from None
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported config type {tp}")


def _name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _name(a) for a in typing.get_args(tp))
    if origin is typing.Literal:
        return "/".join(str(a) for a in typing.get_args(tp))
    if origin is not None:
        return origin.__name__
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def markdown_reference(cls: type) -> str:
    """The fields of ``cls`` as a Markdown table (the README's config reference)."""
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for key, tp, default, help_ in describe(cls):
        lines.append(f"| `{key}` | {tp} | `{default}` | {help_.replace('|', '/')} |")
    return "\n".join(lines)


def to_dict(config: Any) -> dict:
    return dataclasses.asdict(config)


def to_yaml(config: Any) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False, default_flow_style=False)


def describe(cls: type, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(dotted key, type, default, help) for every leaf field, in declaration order."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows += describe(tp, prefix + f.name + ".")
            continue
        default = f.default if f.default is not dataclasses.MISSING else (f.default_factory() if f.default_factory is not dataclasses.MISSING else "")
        rows.append((prefix + f.name, _name(tp), repr(default), f.metadata.get("help", "")))
    return rows
