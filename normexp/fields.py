"""How a config field is declared: its default, its one-line doc, its range check and the older
spellings of its values. `normexp.config` declares every field with these."""

import re
from dataclasses import field

from normexp.errors import suggest


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
