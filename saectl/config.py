"""Config dataclasses are the CLI flags, the YAML fields and the artifact address at once.

A stage declares a frozen dataclass whose fields use `opt(default, help, address=...)`.
`stage_command` turns it into a typer command: one `--flag` per field (`hooks` → `--hooks`),
plus `--config FILE.yaml` filling the same fields. Precedence: dataclass default < YAML <
flags given on the command line. Fields with `address=False` (device, batch size, store,
shard, ...) do not change the result and stay out of the address (`address_params`).
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Callable, Optional

import typer
import yaml

from saectl.errors import ConfigError


def opt(default: Any = None, help: str = "", *, address: bool = True, flag: str | None = None):
    """A config field: its default, its help text, and whether it belongs in the address."""
    return dataclasses.field(default=default,
                             metadata={"help": help, "address": address, "flag": flag})


_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1000, "kib": 1 << 10, "m": 1 << 20, "mb": 10**6,
          "mib": 1 << 20, "g": 1 << 30, "gb": 10**9, "gib": 1 << 30, "t": 1 << 40, "tib": 1 << 40}


def parse_bytes(text: str | int) -> int:
    """'2GiB', '512MiB', '1.5G', '1000000' → bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ConfigError(f"cannot read {text!r} as a size; write e.g. 512MiB or 2GiB")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def parse_image_shape(text: str | None) -> tuple[int, int] | None:
    """'8x8' → (8, 8); None or '' → None (`--image-shape` of import and interpret)."""
    if not text:
        return None
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ConfigError(f"--image-shape {text!r} must look like 8x8") from None
    return h, w


def fields(cls) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if not f.name.startswith("_")]


def address_params(cfg) -> dict:
    """The fields that decide the result (the stage may replace some by resolved identities)."""
    return {f.name: getattr(cfg, f.name) for f in fields(cfg) if f.metadata.get("address", True)}


def _flag(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _base_type(tp):
    """`int | None` → int; plain types as they are."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else str
    return tp


def load_yaml(path: str | Path) -> dict:
    """A YAML mapping from a file, or a one-line ConfigError."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror or e}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path} is not valid YAML{where}; fix the file") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of field: value, not a {type(data).__name__}")
    return data


def build(cls, values: dict, source: str = "config"):
    """`cls(**values)` with unknown keys and wrong types refused in one line."""
    names = {f.name: f for f in fields(cls)}
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ConfigError(f"{source}: unknown field(s) {', '.join(unknown)}; valid fields are "
                          f"{', '.join(sorted(names))}")
    hints = typing.get_type_hints(cls)
    clean = {}
    for key, val in values.items():
        tp = _base_type(hints[key])
        if val is not None and tp in (int, float, str, bool):
            if tp is float and isinstance(val, int) and not isinstance(val, bool):
                val = float(val)
            elif tp is str and isinstance(val, (int, float)) and not isinstance(val, bool):
                val = str(val)
            if not isinstance(val, tp) or (tp is int and isinstance(val, bool)):
                raise ConfigError(f"{source}: {key} must be {tp.__name__}, got {val!r}")
        clean[key] = val
    try:
        return cls(**clean)
    except TypeError as e:
        raise ConfigError(f"{source}: {e}") from None


def merge(cls, cli: dict, config_file: str | Path | None = None):
    """Defaults < YAML file < flags that were given (not None)."""
    values = dict(load_yaml(config_file)) if config_file else {}
    values.update({k: v for k, v in cli.items() if v is not None})
    return build(cls, values, str(config_file) if config_file else "flags")


def stage_command(app: typer.Typer, cls, name: str, help: str,
                  positional: tuple[str, ...] = ()) -> Callable:
    """Register `fn(cfg) -> str` as `saectl NAME`: flags from `cls`, the returned ref printed as
    the command's one line of stdout. `positional` fields are arguments (e.g. the input REF)."""

    def decorator(fn: Callable):
        hints = typing.get_type_hints(cls)
        params = []
        for f in fields(cls):
            tp = Optional[_base_type(hints[f.name])]
            default = f.default if f.default is not dataclasses.MISSING else None
            shown = None if default is None else str(default)
            if f.name in positional:
                marker = typer.Argument(help=f.metadata.get("help", ""), show_default=False)
            else:
                names = [_flag(f)]
                if default is True:  # on by default: the flag that matters is --no-NAME
                    names = [f"{_flag(f)}/--no-{_flag(f)[2:]}"]
                marker = typer.Option(*names, help=f.metadata.get("help", ""),
                                      show_default=shown if shown is not None else False)
            params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=None,
                                            annotation=Annotated[tp, marker]))
        params.append(inspect.Parameter(
            "config", inspect.Parameter.KEYWORD_ONLY, default=None,
            annotation=Annotated[Optional[Path], typer.Option(
                "--config", help="YAML file with the same fields as the flags")]))

        def command(**kwargs):
            config_file = kwargs.pop("config")
            cfg = merge(cls, kwargs, config_file)
            out = fn(cfg)
            if out is not None:
                print(out, flush=True)

        command.__signature__ = inspect.Signature(params)
        command.__name__ = name
        command.__doc__ = help
        app.command(name, help=help)(command)
        return fn

    return decorator
