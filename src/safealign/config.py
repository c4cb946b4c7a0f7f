"""Small typed configs: dataclasses with documented defaults, loaded from YAML, overridden on the CLI.

Every stage has one flat dataclass (e.g. `SFTConfig`). A field's `metadata["help"]` is its one-line
documentation; `safealign STAGE --help` prints them. Resolution order: dataclass defaults, then the
YAML file (`--config x.yaml`), then command-line `--key value` pairs. The resolved config is saved
into the run directory (`config.yaml`) so a run can be reproduced exactly.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from safealign.io import atomic_write_yaml

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override that does not fit the stage's config dataclass."""


class StageFailed(RuntimeError):
    """A stage ran but could not finish (e.g. one of several pipeline processes); the message says where to look."""


def config_field(default: Any = dataclasses.MISSING, help: str = "", **kwargs: Any) -> Any:
    """A dataclass field with a one-line `help` (shown by `--help` and in the docs)."""
    if isinstance(default, (list, dict, set)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata={"help": help}, **kwargs)
    return dataclasses.field(default=default, metadata={"help": help}, **kwargs)


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def _coerce(value: Any, annotation: Any, key: str, source: str) -> Any:
    """Check/convert `value` to `annotation` (str, int, float, bool, Optional, Literal, list, dict)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, option, key, source)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{source}: '{key}' cannot be None")
    if origin is typing.Literal:
        if isinstance(value, bool) and value not in args:
            # YAML reads `no`/`off`/`yes` as booleans: map them back to the choice they spell.
            spellings = ("no", "false", "off") if not value else ("yes", "true", "on")
            value = next((a for a in args if isinstance(a, str) and a.lower() in spellings), value)
        if value not in args:
            raise ConfigError(f"{source}: '{key}' must be one of {list(args)}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            value = [value]
        item_type = args[0] if args else Any
        return [_coerce(v, item_type, key, source) for v in value]
    if origin is dict or annotation is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: '{key}' must be a mapping, got {value!r}")
        return dict(value)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in {"true", "yes", "1", "on", "false", "no", "0", "off"}:
            return value.lower() in {"true", "yes", "1", "on"}
        raise ConfigError(f"{source}: '{key}' must be true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"{source}: '{key}' must be an integer, got {value!r}")
        try:
            as_float = float(value)
        except ValueError:
            raise ConfigError(f"{source}: '{key}' must be an integer, got {value!r}") from None
        if not as_float.is_integer():
            raise ConfigError(f"{source}: '{key}' must be an integer, got {value!r}")
        return int(as_float)
    if annotation is float:
        if isinstance(value, bool):
            raise ConfigError(f"{source}: '{key}' must be a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{source}: '{key}' must be a number, got {value!r}") from None
    if annotation is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{source}: '{key}' must be a string, got {value!r}")
        return str(value)
    return value


def _apply(values: dict[str, Any], updates: dict[str, Any], types_: dict[str, Any], source: str) -> None:
    for raw_key, value in updates.items():
        key = raw_key.replace("-", "_")
        if key not in types_:
            close = difflib.get_close_matches(key, list(types_), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"{source}: unknown key '{raw_key}'{hint}")
        values[key] = _coerce(value, types_[key], key, source)


def check_overrides(cls: type, overrides: dict[str, Any], source: str) -> None:
    """Fail (ConfigError naming `source`) when `overrides` has a key `cls` lacks or a value of the wrong type."""
    _apply({}, overrides, _field_types(cls), source)


def parse_overrides(args: list[str], types_: dict[str, Any] | None = None) -> dict[str, Any]:
    """Turn ['--lr', '1e-4', '--bf16=false', '--flag'] into {'lr': 1e-4, 'bf16': False, 'flag': True}.

    Values are parsed as YAML scalars/lists (`--sizes [1,2]`), then checked against the field's type
    (YAML reads `1e-4` as a string; the float check converts it). With the fields' `types_`, a string field
    keeps its text as typed (`--output_dir 010` is the folder "010", not 8; `yes` stays "yes"), and a bare
    `--key` is an error unless the field is a bool.
    """
    overrides: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError(f"command line: expected --key value, got {arg!r}")
        key = arg[2:]
        if "=" in key:
            key, text = key.split("=", 1)
            i += 1
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            text = args[i + 1]
            i += 2
        else:
            annotation = (types_ or {}).get(key.replace("-", "_"), bool)
            if annotation is not bool:
                raise ConfigError(f"command line: --{key} needs a value (--{key} VALUE)")
            text = "true"  # bare flag
            i += 1
        if (types_ or {}).get(key.replace("-", "_")) is str:
            overrides[key] = text
            continue
        try:
            overrides[key] = yaml.safe_load(text) if text != "" else ""
        except yaml.YAMLError:
            overrides[key] = text
    return overrides


def load_config(cls: type[T], path: str | Path | None = None, overrides: dict[str, Any] | list[str] | None = None) -> T:
    """Build `cls` from its defaults, a YAML file and overrides (a dict or a list of CLI words)."""
    types_ = _field_types(cls)
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: a config file must be a mapping of key: value")
        _apply(values, loaded, types_, str(path))
    if overrides:
        if isinstance(overrides, list):
            overrides = parse_overrides(overrides, types_)
        _apply(values, overrides, types_, "command line")
    try:
        return cls(**values)
    except TypeError as err:  # a required field without a value
        raise ConfigError(f"{cls.__name__}: {err}") from None


def config_to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg: Any, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically); `load_config(type(cfg), path)` reads it back."""
    atomic_write_yaml(path, config_to_dict(cfg))


def changed_settings(cfg: Any, path: str | Path, ignore: tuple[str, ...] = ()) -> list[str] | None:
    """The keys whose value in the config saved at `path` (by `save_config`) differs from `cfg`'s, `ignore` aside;
    None when no readable config is there. Values are compared as saved (YAML), keys the saved one lacks (an older
    version's) as unchanged."""
    try:
        saved = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None
    if not isinstance(saved, dict):
        return None
    current = yaml.safe_load(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    return [k for k, v in current.items() if k not in ignore and k in saved and saved[k] != v]


def config_keys(cls: type) -> list[tuple[str, str, Any, str]]:
    """(name, type, default, help) of every field of a config class, in order."""
    keys = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else "required")
        keys.append((f.name, getattr(f.type, "__name__", str(f.type)).replace("typing.", ""), default,
                     f.metadata.get("help", "")))
    return keys


def describe_config(cls: type) -> str:
    """One line per field: `--name (type, default): help`, for `--help` output."""
    return "\n".join(f"--{name} ({kind}, default {default!r}): {text}" for name, kind, default, text in config_keys(cls))
