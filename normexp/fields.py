"""How a config field is declared: its default, its one-line doc, its range check and the older
spellings of its values; and how a value is read as its field's type. `normexp.config` declares
every field with these."""

import math
import re
from dataclasses import field

import yaml

from normexp.errors import UsageError, suggest


def opt(default, doc, check=None, aliases=None):
    """A config field with its default, a one-line doc, an optional range check and optional
    aliases: older spellings of a value, e.g. {"true": "per_head"} (read case-insensitively)."""
    return field(default=default, metadata={"doc": doc, "check": check, "aliases": aliases})


def unalias(value, aliases):
    """`value` in today's spelling: an older one (a bool or string, read case-insensitively)
    mapped through the field's `aliases`, anything else unchanged."""
    if aliases and isinstance(value, (bool, str)) and str(value).lower() in aliases:
        return aliases[str(value).lower()]
    return value


def section(cls, doc):
    return field(default_factory=cls, metadata={"doc": doc, "check": None})


def rule(holds, text):
    """A range check: None where `holds(value)`, else the problem, e.g. 'must be > 0'."""
    return lambda v: None if holds(v) else text


positive = rule(lambda v: v > 0, "must be > 0")
nonneg = rule(lambda v: v >= 0, "must be >= 0")
unit_open = rule(lambda v: 0 <= v < 1, "must be in [0, 1)")
unit_closed = rule(lambda v: 0 <= v <= 1, "must be in [0, 1]")
unit_left_open = rule(lambda v: 0 < v <= 1, "must be in (0, 1]")


def one_of(*choices):
    def check(v):
        return None if v in choices else f"must be one of {', '.join(choices)}"
    return check


def safe_name(v):
    if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._=,+-]*", v) and ".." not in v:
        return None
    return ("must be a plain file name (letters, digits and . _ = , + -, no '/' or '..', "
            "not starting with '.' or '-')")


def registered(registry_name):
    """Checks a name against a registry (norms, placements) that is imported lazily."""
    def check(v):
        names = sorted(registry(registry_name))
        if v in names:
            return None
        near = suggest(v, names)
        hint = f"; did you mean {near!r}?" if near else ""
        return f"unknown {registry_name} {v!r}{hint} (valid: {', '.join(names)})"
    return check


def registry(name):
    from normexp.norms import NORMS
    from normexp.placement import PLACEMENTS
    return NORMS if name == "norm" else PLACEMENTS


class Override(str):
    """A command-line value, parsed against its field's type rather than taken as YAML text."""


def coerce(value, kind, path):
    """`value` as the field's type `kind` (bool, int, float, str), or UsageError naming `path`."""
    if isinstance(value, Override):
        if kind is str:
            return str(value)
        try:
            value = yaml.safe_load(value) if value.strip() else value
        except yaml.YAMLError:
            pass  # not YAML: judged as the plain string below
    if kind is bool and isinstance(value, bool):
        return value
    elif kind is int:
        if isinstance(value, str):
            try:
                value = int(value)
            except ValueError:
                pass
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif kind is float:
        if isinstance(value, str):
            try:
                value = float(value)  # YAML 1.1 reads '3e-3' as a string
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if math.isfinite(value):
                return float(value)
    elif kind is str and isinstance(value, str):
        return value
    raise UsageError(f"{path}: expected {_TYPE_NAMES[kind]}, got {value!r}")


_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string"}
