"""The one settings engine: typed dataclass sections <-> TOML tables and ``--section.key=value`` overrides.

A command's settings are a few sections (``[model]``, ``[data]``, ...), each a dataclass whose fields
carry their help text (``opt``). Values arrive as layers of nested dicts, applied in order (built-in
defaults, a TOML file, command-line overrides); ``build`` checks every key, suggests the closest one
for a typo (also the same key in another section), coerces each value to its field's type and
constructs the sections, whose ``__post_init__`` checks their values. ``describe`` lists every key with
its default and help for ``--help``. Needs no torch.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import sys
import textwrap
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path

from gpt2lab.errors import ConfigError

_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")

Layer = dict[str, dict]  # {section: {key: value}}


def opt(default, help: str):
    """A settings field with its help text (listed by ``--help``); a list default is copied per instance."""
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


def read_toml(path: str | Path) -> Layer:
    """A TOML file as nested dicts; every failure is a ConfigError naming the file."""
    path = Path(path)
    if sys.version_info < (3, 11):
        raise ConfigError("reading TOML configs needs Python 3.11+ (tomllib); pass --section.key=value instead")
    import tomllib

    if path.is_dir():
        raise ConfigError(f"--config {path} is a directory; name a TOML file")
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not UTF-8 text; save the TOML file as UTF-8") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path} is not valid TOML: {e}") from None


def parse_overrides(args: Sequence[str]) -> Layer:
    """``["--a.b=1", "--c.d", "2", "--run.compile"]`` -> {"a": {"b": "1"}, "c": {"d": "2"}, "run": {"compile": "true"}}."""
    out: Layer = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError(f"unexpected argument {arg!r}; settings look like --section.key=value")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 < len(args) and not args[i + 1].startswith("--"):
                value, i = args[i + 1], i + 1
            else:
                value = _Switch("true")  # a bare --run.compile switches a flag on
        section, _, name = key.partition(".")
        if not name:
            raise ConfigError(f"--{key}: settings are section.key, e.g. --optim.lr=3e-4")
        out.setdefault(section, {})[name] = value
        i += 1
    return out


class _Switch(str):
    """A setting given without a value (``--run.compile``): true for a flag, an error for anything else."""


def merge(*layers: Mapping[str, Mapping]) -> Layer:
    """The layers applied in order: a later value for the same section.key wins."""
    out: Layer = {}
    for layer in layers:
        for section, values in layer.items():
            if not isinstance(values, Mapping):
                raise ConfigError(f"config section {section!r} must be a table of key = value, got {values!r}")
            out.setdefault(section, {}).update(values)
    return out


def build(sections: Mapping[str, type], values: Mapping[str, Mapping]) -> dict:
    """Each section constructed from its values (coerced to the field types); unknown names rejected."""
    for name, table in values.items():
        if name not in sections:
            raise ConfigError(f"unknown config section {name!r}{_suggest(name, list(sections))}")
        if not isinstance(table, Mapping):
            raise ConfigError(f"config section {name!r} must be a table of key = value, got {table!r}")
    built = {}
    for name, section in sections.items():
        hints = typing.get_type_hints(section)
        table = values.get(name, {})
        for key in table:
            if key not in hints:
                raise ConfigError(f"unknown config key {name}.{key}{_suggest_key(sections, name, key)}")
        built[name] = section(**{k: coerce(f"{name}.{k}", v, hints[k]) for k, v in table.items()})
    return built


def to_toml(layer: Mapping[str, Mapping]) -> str:
    """A layer as TOML that ``read_toml`` reads back (None values are left out: they are the defaults)."""
    lines = []
    for section, values in layer.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in values.items() if value is not None]
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def coerce(key: str, value, hint):
    """``value`` (from TOML, or a string from the command line) as the type ``hint`` of setting ``key``.

    Strings are parsed (``none`` for an optional field, true/false/yes/no/on/off/1/0 for a flag, ``a,b``
    for a list); TOML values must already have the type (an integer is accepted for a float)."""
    args = typing.get_args(hint)
    if isinstance(value, _Switch) and bool not in (args or (hint,)):
        raise ConfigError(f"--{key} has no value; give one: --{key}=VALUE (only true/false settings may go bare)")
    if typing.get_origin(hint) is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return [coerce(key, v, args[0]) for v in value]
    optional = type(None) in args
    base = next(a for a in args if a is not type(None)) if args else hint
    if isinstance(value, str) and base is not str:
        text = value.strip().lower()
        if optional and text in ("none", "null"):
            return None
        if base is bool:
            if text in _TRUE + _FALSE:
                return text in _TRUE
        else:
            try:
                return base(value)
            except ValueError:
                pass
    elif value is None and optional:
        return None
    elif base is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    elif isinstance(value, base) and not (base is int and isinstance(value, bool)):
        return value
    kind = base.__name__ + (" or none" if optional else "")
    raise ConfigError(f"{key} must be {kind}, got {value!r}")


def describe(sections: Mapping[str, type], defaults: Mapping[str, Mapping] | None = None) -> str:
    """Every key of every section with its default (``defaults`` override the fields') and help text."""
    defaults = defaults or {}
    lines = []
    for name, section in sections.items():
        lines.append(f"[{name}]  {(section.__doc__ or '').strip()}")
        for f in dataclasses.fields(section):
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            default = defaults.get(name, {}).get(f.name, default)
            lines.append(f"  --{name}.{f.name}={_show(default)}")
            lines.append(
                textwrap.fill(f.metadata["help"], width=100, initial_indent=" " * 6, subsequent_indent=" " * 6)
            )
    return "\n".join(lines)


def _show(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return ",".join(map(str, value))
    return str(value)


def _suggest(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else f"; known: {', '.join(known)}"


def _suggest_key(sections: Mapping[str, type], section: str, name: str) -> str:
    """The same key in another section, else the closest key anywhere."""
    keys = [f"{s}.{f.name}" for s, cls in sections.items() for f in dataclasses.fields(cls)]
    elsewhere = [k for k in keys if k.partition(".")[2] == name]
    return f"; did you mean {elsewhere[0]!r}?" if elsewhere else _suggest(f"{section}.{name}", keys)


def nonnegative(obj, section: str, *names: str) -> None:
    """Raise ConfigError unless each named field of ``obj`` is >= 0."""
    for name in names:
        if getattr(obj, name) < 0:
            raise ConfigError(f"{section}.{name} must be >= 0, got {getattr(obj, name)}")


def positive(obj, section: str, *names: str, optional: bool = False) -> None:
    """Raise ConfigError unless each named field of ``obj`` is a positive integer (or None, if ``optional``)."""
    for name in names:
        value = getattr(obj, name)
        if optional and value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"{section}.{name} must be a positive integer, got {value!r}")
