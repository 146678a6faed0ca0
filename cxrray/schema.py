"""How a job's schema is read, checked, saved and explained; the schemas live in config.py.

Every job config is a frozen pydantic dataclass (`@schema`): it validates on construction,
refuses unknown keys, and stays a real dataclass, so `dataclasses.replace`, `asdict` and
positional construction keep working. Whatever the route in (YAML file, `key=value`
overrides, CLI flags, `serve run ... k=v`, a Python call) a wrong value fails here, before
Ray starts, as ONE line naming the key, the value and what is allowed: `lr: 'abc' is not a
number`. Light on purpose: pydantic and YAML only, no Ray, no torch.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import re
import typing
from pathlib import Path
from typing import Any, Sequence, TypeVar

import yaml
from pydantic import ConfigDict, TypeAdapter, ValidationError
from pydantic.dataclasses import dataclass as _pydantic_dataclass

from cxrray import storage

T = TypeVar("T")

# coerce_numbers_to_str: `run_name=2024` arrives from YAML as an int; it is still a name.
SCHEMA_CONFIG = ConfigDict(extra="forbid", coerce_numbers_to_str=True, validate_default=False)


def schema(cls: type[T]) -> type[T]:
    """A frozen, validated dataclass that refuses unknown keys."""
    return _pydantic_dataclass(frozen=True, config=SCHEMA_CONFIG)(cls)


class ConfigError(ValueError):
    """A config that does not validate; str() is the one line the CLI prints."""


# --- one line per error -------------------------------------------------------------------------

_WHAT = {"float": "a number", "int": "a whole number", "bool": "true or false", "string": "text",
         "list": "a list", "tuple": "a list", "dict": "a mapping of key: value"}


_TYPE_TAG = re.compile(r"^(str|int|float|bool|none|list|dict|tuple|literal|function-\w+)(\[.*\])?$")


def _key(loc: tuple) -> str:
    """The key an error is about; union members' type tags (`use_gpu.bool`) are not keys."""
    parts = [str(p) for p in loc]
    while len(parts) > 1 and _TYPE_TAG.match(parts[-1]):
        parts.pop()
    return ".".join(parts)


def _shown(value: Any) -> str | None:
    scalar = (str, int, float, bool, type(None))
    if isinstance(value, scalar) or (isinstance(value, (list, tuple)) and all(isinstance(v, scalar) for v in value)):
        return repr(value)
    return None  # a whole mapping (a model-level check): the message says what is wrong


def _problem(err: dict, cls: type | None) -> tuple[str, str | None, str]:
    """(key, the value as shown, what is wrong) of one pydantic error dict."""
    key, kind, ctx = _key(err.get("loc", ())), err["type"], err.get("ctx") or {}
    shown = _shown(err.get("input"))
    if kind in ("unexpected_keyword_argument", "extra_forbidden"):
        moved = getattr(cls, "moved_keys", {}).get(key)  # a key of older releases: say where it went
        if moved:
            return key, None, moved
        valid = sorted(_fields(cls)) if cls else []
        near = difflib.get_close_matches(key, valid, n=1)
        return key, None, ("unknown key" + (f" (did you mean {near[0]}?)" if near else "")
                           + (f"; valid keys: {', '.join(valid)}" if valid else ""))
    if kind in ("missing", "missing_argument"):
        if key.isdigit():  # a tuple short of items
            return "", None, f": needs {int(key) + 1} or more items"
        return key, None, "required, not given"
    if kind == "literal_error":
        return key, shown, f"is not one of {ctx.get('expected')}"
    for prefix, what in _WHAT.items():
        if kind.startswith(prefix) and kind.endswith(("_parsing", "_type", "_from_float")):
            return key, shown, f"is not {what}"
    bounds = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}
    if kind in bounds:
        limit = next(iter(ctx.values()), "")
        return key, shown, f"is out of range (must be {bounds[kind]} {limit:g})" if isinstance(limit, (int, float)) \
            else f"is out of range (must be {bounds[kind]} {limit})"
    return key, shown, ": " + str(ctx.get("error") or err.get("msg", kind)).removeprefix("Value error, ")


def _line(key: str, shown: str | None, whats: list[str]) -> str:
    what = whats[0] if len(whats) == 1 else "is not " + " nor ".join(w.removeprefix("is not ") for w in whats)
    head = key + (f": {shown}" if shown is not None else "") if key else (shown or "")
    if what.startswith(": "):
        return f"{head}{what}" if head else what[2:]
    return f"{head} {what}" if shown is not None else f"{head}: {what}"


def describe(err: dict, cls: type | None = None) -> str:
    """One pydantic error dict -> `key: 'value' is not a number`-style text."""
    return _line(*_problem(err, cls)[:2], [_problem(err, cls)[2]])


def one_line(e: ValidationError, cls: type | None = None) -> str:
    """Every error of a ValidationError on one line; a union's alternatives under one key."""
    grouped: dict[str, tuple[str | None, list[str]]] = {}
    for err in e.errors():
        key, shown, what = _problem(err, cls)
        grouped.setdefault(key, (shown, []))[1].append(what)
    return "; ".join(_line(k, shown, whats) for k, (shown, whats) in grouped.items())


# --- reading ------------------------------------------------------------------------------------


def _fields(cls: type) -> dict[str, Any]:
    return dict(getattr(cls, "__pydantic_fields__", {}))


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """['epochs=3', 'lr=1e-3', 'labels=[Edema,Cardiomegaly]'] -> a dict of YAML scalars; the
    schema then types them (YAML 1.1 reads `1e-3` as a string: the float field takes it)."""
    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value")
        key, raw = item.split("=", 1)
        try:
            out[key.strip()] = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError as e:
            raise ConfigError(f"{key.strip()}: {raw!r} is not a YAML value ({e.problem})") from None
    return out


def build(cls: type[T], values: dict[str, Any], what: str | None = None) -> T:
    """`cls(**values)`, with any validation error as one ConfigError line."""
    try:
        return cls(**values)
    except ValidationError as e:
        raise ConfigError((f"{what}: " if what else "") + one_line(e, cls)) from None


def load_config(cls: type[T], path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """A YAML file (a mapping), then `key=value` overrides on top, through the schema."""
    values: dict[str, Any] = {}
    if path:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"config {path} does not exist (shipped configs live in jobs/configs/)")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({e})") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: a config must be a YAML mapping of key: value")
    values.update(parse_overrides(overrides))
    return build(cls, values, what=str(path) if path and not overrides else None)


def to_dict(cfg: Any) -> dict:
    """Plain YAML/JSON-ready values (tuples as lists), nested configs as mappings."""
    def plain(v):
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return {k: plain(v) for k, v in dataclasses.asdict(cfg).items()}


def save_config(cfg: Any, path: str | Path) -> str:
    """The resolved config as YAML, beside a job's outputs (a local path or a URI)."""
    return storage.write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


# --- explaining: --help from the schema ---------------------------------------------------------


def _default(f) -> Any:
    if f.default_factory is not None:
        return f.default_factory()
    return f.default


def keys_help(cls: type, title: str = "keys (key=value)") -> str:
    """Every key with its default and meaning, for an argparse epilog."""
    lines = [f"{title}:"]
    for name, f in _fields(cls).items():
        default = _default(f)
        shown = "required" if default is dataclasses.MISSING or repr(default) == "PydanticUndefined" \
            else f"default {yaml.safe_dump(to_yaml_value(default), default_flow_style=True).strip().removesuffix('...').strip()}"
        lines.append(f"  {name:24s} {shown}" + (f"  {f.description}" if f.description else ""))
    return "\n".join(lines)


def to_yaml_value(v: Any) -> Any:
    if dataclasses.is_dataclass(v):
        return to_dict(v)
    return list(v) if isinstance(v, tuple) else v


def _is_bool(annotation: Any) -> bool:
    return annotation is bool or (typing.get_origin(annotation) is typing.Union
                                  and set(typing.get_args(annotation)) == {bool, type(None)})


def _converter(name: str, annotation: Any):
    """argparse type= for a field: the field's own type checks the text (one line on failure),
    so `args` hold typed values; a list-valued field takes `a,b,c`."""
    adapter = TypeAdapter(annotation)
    listy = any(typing.get_origin(a) in (list, tuple) for a in (annotation, *typing.get_args(annotation)))

    def convert(text: str):
        try:
            return adapter.validate_python(text)
        except ValidationError as e:
            if not listy:
                raise argparse.ArgumentTypeError(one_line(e)) from None
            first = e
        try:  # `frontal` or `0.8,0.1,0.1` for a list-valued field
            return adapter.validate_python([t.strip() for t in text.split(",") if t.strip()])
        except ValidationError as second:
            raise argparse.ArgumentTypeError(one_line(second if "," in text else first)) from None

    convert.__name__ = name  # argparse names it in "invalid <name> value"
    return convert


def add_flags(parser: argparse.ArgumentParser, cls: type, *, skip: Sequence[str] = (),
              required: Sequence[str] = ()) -> argparse.ArgumentParser:
    """One --flag per field of `cls` (help = its description and default). A field's
    json_schema_extra may rename it ({"flag": "--workers"}) or give a bool's off switch
    ({"off_flag": "--no-hash"}); bools default True get --no-<name>."""
    for name, f in _fields(cls).items():
        if name in skip or (isinstance(f.json_schema_extra, dict) and f.json_schema_extra.get("cli") is False):
            continue
        extra = f.json_schema_extra if isinstance(f.json_schema_extra, dict) else {}
        flag = extra.get("flag", "--" + name.replace("_", "-"))
        default = _default(f)
        missing = default is dataclasses.MISSING or repr(default) == "PydanticUndefined"
        shown = not missing and default is not None and default is not False
        text = (f.description or "") + (f" (default: {to_yaml_value(default)})" if shown else "")
        if _is_bool(f.annotation) and not missing:
            if default:
                off = extra.get("off_flag", "--no-" + name.replace("_", "-"))
                # The flag turns the setting off: its help says what it stops, not the default.
                scope, _, what = (f.description or name).partition(": ") if re.match(r"^\w+: ", f.description or "") \
                    else ("", "", f.description or name)
                parser.add_argument(off, dest=name, action="store_false", default=True,
                                    help=f"{scope + ': ' if scope else ''}do not {what} (on by default)".replace("%", "%%"))
            else:
                parser.add_argument(flag, dest=name, action="store_true", default=False, help=text)
            continue
        parser.add_argument(flag, dest=name, type=_converter(name, f.annotation),
                            default=None if missing else default, required=missing or name in required,
                            help=text.replace("%", "%%"), metavar=name.upper())
    return parser


def from_args(cls: type[T], args: argparse.Namespace, **values: Any) -> T:
    """The schema's fields from parsed flags (plus `values`), validated."""
    got = {name: getattr(args, name) for name in _fields(cls) if hasattr(args, name)}
    return build(cls, {**got, **values})
