"""normexp.fields: how a config field is declared (default, doc, range check, older spellings)
and how a value is read as its field's type; and that every field of the Config keeps to it."""

import dataclasses
import math
import typing

import pytest

from normexp import fields
from normexp.config import Config, load
from normexp.errors import UsageError
from normexp.fields import Override, coerce, one_of, opt, registered, safe_name, section, unalias


def config_fields(cls=Config, prefix=""):
    """(dotted key, dataclass field, type) of every value field of the Config."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from config_fields(hints[f.name], f"{prefix}{f.name}.")
        else:
            yield prefix + f.name, f, hints[f.name]


FIELDS = list(config_fields())


def choices(f):
    """The values a `one_of` field accepts, as its check states them; None for other fields."""
    check = f.metadata["check"]
    problem = check("\0not a choice") if check is not None and f.default.__class__ is str else None
    prefix = "must be one of "
    return problem[len(prefix):].split(", ") if problem and problem.startswith(prefix) else None


def value_at(cfg, key):
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


ONE_OF = [(key, choices(f)) for key, f, _ in FIELDS if choices(f)]


# -- declaring a field --------------------------------------------------------------------------

def test_opt_and_section_declare_default_doc_check_and_aliases():
    @dataclasses.dataclass(frozen=True)
    class Inner:
        width: int = opt(8, "a width", fields.positive)

    @dataclasses.dataclass(frozen=True)
    class Outer:
        mode: str = opt("off", "a mode", one_of("off", "on"), aliases={"false": "off"})
        inner: Inner = section(Inner, "the inner keys")

    mode, inner = dataclasses.fields(Outer)
    assert Outer().mode == "off" and Outer().inner == Inner(8)
    assert mode.metadata["doc"] == "a mode" and mode.metadata["aliases"] == {"false": "off"}
    assert mode.metadata["check"]("on") is None and mode.metadata["check"]("up")
    assert inner.metadata == {"doc": "the inner keys", "check": None}
    assert Outer().inner is not Outer().inner  # a fresh section per config, never shared
    width, = dataclasses.fields(Inner)
    assert width.metadata["aliases"] is None and width.metadata["check"](0) == "must be > 0"


@pytest.mark.parametrize("value, expected", [
    ("true", "per_head"), ("True", "per_head"), ("TRUE", "per_head"), (True, "per_head"),
    (False, "off"), ("false", "off"),
    ("shared", "shared"),      # today's spelling passes through
    ("yes please", "yes please"),  # not an alias: left for the check to refuse
    (1, 1), (0, 0),            # only bools and strings are older spellings, not 1 and 0
    (None, None),
])
def test_unalias_maps_older_spellings_case_insensitively(value, expected):
    aliases = {"true": "per_head", "false": "off"}
    assert unalias(value, aliases) == expected
    assert type(unalias(value, aliases)) is type(expected)
    assert unalias(value, None) == value and unalias(value, {}) == value


# -- range checks -------------------------------------------------------------------------------

@pytest.mark.parametrize("check, inside, outside, text", [
    (fields.positive, [1e-12, 1, 2 ** 31], [0, -1e-12, -3], "must be > 0"),
    (fields.nonneg, [0, 0.0, 5], [-1e-12, -1], "must be >= 0"),
    (fields.unit_open, [0, 0.5, 1 - 1e-12], [1, 1.0, -1e-12], "must be in [0, 1)"),
    (fields.unit_closed, [0, 0.5, 1], [1 + 1e-12, -1e-12], "must be in [0, 1]"),
    (fields.unit_left_open, [1e-12, 1], [0, 1 + 1e-12], "must be in (0, 1]"),
])
def test_each_range_check_holds_up_to_its_boundary_and_states_its_range(check, inside, outside,
                                                                         text):
    assert [check(v) for v in inside] == [None] * len(inside)
    assert [check(v) for v in outside] == [text] * len(outside)


def test_one_of_names_every_choice_in_order():
    check = one_of("nothing", "dots", "dots_no_batch")
    assert [check(v) for v in ("nothing", "dots", "dots_no_batch")] == [None] * 3
    assert check("Dots") == check("dot") == "must be one of nothing, dots, dots_no_batch"


@pytest.mark.parametrize("name", ["default", "rms8", "placement=post,lr=0.003,seed=1", "a+b-c",
                                  "x.y_z", "9", "lr=1e-3"])
def test_safe_name_takes_plain_file_names(name):
    assert safe_name(name) is None


@pytest.mark.parametrize("name", ["", ".", "..", ".hidden", "-rf", "a/b", "../../etc", "a..b",
                                  "a b", "tab\t", "new\nline", "é", "a*", "~", "a:b", "/abs"])
def test_safe_name_refuses_what_could_leave_its_directory_or_read_as_an_option(name):
    assert safe_name(name).startswith("must be a plain file name")


@pytest.mark.parametrize("registry_name, typo, near", [("norm", "rmsnrm", "rmsnorm"),
                                                       ("placement", "postt", "post")])
def test_a_registered_name_is_checked_against_the_registry_it_names(registry_name, typo, near):
    names = sorted(fields.registry(registry_name))
    check = registered(registry_name)
    assert all(check(n) is None for n in names)
    assert check(typo) == (f"unknown {registry_name} {typo!r}; did you mean {near!r}? "
                           f"(valid: {', '.join(names)})")
    assert check("zzzz") == f"unknown {registry_name} 'zzzz' (valid: {', '.join(names)})"


def test_a_registered_check_sees_a_name_registered_after_it_was_made(monkeypatch):
    """The registry is read when a value is checked, not when the field is declared."""
    from normexp.norms import NORMS
    check = registered("norm")
    assert check("later") is not None
    monkeypatch.setitem(NORMS, "later", NORMS["layernorm"])
    assert check("later") is None


# -- reading a value as the field's type --------------------------------------------------------

@pytest.mark.parametrize("value, kind, expected", [
    # a command-line value is parsed as YAML, then judged like a file's value
    (Override("3e-3"), float, 0.003), (Override("1"), float, 1.0), (Override(".5"), float, 0.5),
    (Override("8"), int, 8), (Override(" 3 "), int, 3), (Override("1000.0"), int, 1000),
    (Override("false"), bool, False), (Override("True"), bool, True),
    (Override("123"), str, "123"), (Override("null"), str, "null"), (Override(""), str, ""),
    (Override("a: b"), str, "a: b"),  # a str field takes the text itself, never its YAML
    # a config file's values, as yaml.safe_load gives them
    ("3e-3", float, 0.003),           # YAML 1.1 reads 3e-3 (no dot) as a string
    (3, float, 3.0), (2.0, int, 2), (0, int, 0), (True, bool, True), ("pre", str, "pre"),
])
def test_coerce_reads_a_value_as_its_field_type(value, kind, expected):
    got = coerce(value, kind, "a.key")
    assert got == expected and type(got) is kind


@pytest.mark.parametrize("value, kind, shown", [
    (True, int, "True"), (False, float, "False"),  # a bool is never a number
    (1, bool, "1"), ("true", bool, "'true'"),      # nor a number or a file's string a bool
    (2.5, int, "2.5"), (Override("2.5"), int, "2.5"), (Override("[1"), int, "'[1'"),
    (Override(""), int, "''"), (Override("fast"), float, "'fast'"),
    (math.inf, float, "inf"), (Override(".nan"), float, "nan"), (Override("1e400"), float, "inf"),
    (3, str, "3"), (None, str, "None"), ([1], int, "[1]"),
])
def test_coerce_refuses_another_type_naming_the_key_and_the_type_it_wants(value, kind, shown):
    wanted = {bool: "true or false", int: "an integer", float: "a finite number",
              str: "a string"}[kind]
    with pytest.raises(UsageError) as err:
        coerce(value, kind, "model.some_key")
    assert str(err.value) == f"model.some_key: expected {wanted}, got {shown}"


def test_overrides_are_parsed_to_the_field_type():
    cfg = load(None, ["optim.lr=3e-3", "model.n_layer=8", "optim.clip_norm=0",
                      "log.grad_norms=false", "run.name=123", "model.norm.kind=rmsnorm"])
    assert cfg.optim.lr == 0.003 and isinstance(cfg.optim.lr, float)
    assert cfg.model.n_layer == 8 and cfg.optim.clip_norm == 0.0
    assert cfg.log.grad_norms is False and cfg.run.name == "123"
    assert cfg.model.norm.kind == "rmsnorm"


def test_an_older_spelling_reads_as_its_value(tmp_path):
    """model.qk_norm was a bool: run directories and sweep files from then still load."""
    assert load(None, ["model.qk_norm=true"]).model.qk_norm == "per_head"
    assert load(None, ["model.qk_norm=False"]).model.qk_norm == "off"
    path = tmp_path / "old.yaml"
    path.write_text("model:\n  qk_norm: true\n")
    assert load(str(path)).model.qk_norm == "per_head"
    with pytest.raises(UsageError, match="model.qk_norm: must be one of off, per_head, shared, "
                                         "got 'yes please'"):
        load(None, ["model.qk_norm=yes please"])


# -- every field of the Config ------------------------------------------------------------------

@pytest.mark.parametrize("key, f, kind", FIELDS, ids=[key for key, _, _ in FIELDS])
def test_every_default_has_its_declared_type_and_passes_its_own_check(key, f, kind):
    assert type(f.default) is kind, key
    assert coerce(f.default, kind, key) == f.default
    check = f.metadata["check"]
    assert check is None or check(f.default) is None, (key, check(f.default))
    assert f.metadata["doc"].strip(), key


def test_every_older_spelling_maps_to_a_value_its_field_accepts():
    aliased = [(key, f) for key, f, _ in FIELDS if f.metadata["aliases"]]
    assert {key for key, _ in aliased} >= {"model.qk_norm", "model.attention"}
    for key, f in aliased:
        for old, new in f.metadata["aliases"].items():
            assert old == old.lower(), (key, old)  # read case-insensitively: stored lowered
            assert f.metadata["check"](new) is None, (key, old, new)
            assert value_at(load(None, [f"{key}={old.upper()}"]), key) == new, (key, old)


@pytest.mark.parametrize("key, valid", ONE_OF, ids=[key for key, _ in ONE_OF])
def test_a_bad_choice_names_the_key_and_every_valid_value_and_each_of_them_loads(key, valid):
    with pytest.raises(UsageError) as err:
        load(None, [f"{key}=bogus"])
    assert str(err.value) == f"{key}: must be one of {', '.join(valid)}, got 'bogus'"
    for value in valid:
        assert value_at(load(None, [f"{key}={value}"]), key) == value, (key, value)


def test_the_choice_fields_are_found():
    """The parametrization above covers the fields it should (a guard on `choices`)."""
    keys = dict(ONE_OF)
    assert keys["model.qk_norm"] == ["off", "per_head", "shared"]
    assert keys["train.remat_policy"] == ["nothing", "dots", "dots_no_batch"]
    assert len(keys) >= 12 and "run.name" not in keys and "model.norm.kind" not in keys


@pytest.mark.parametrize("key, registry_name", [("model.norm.kind", "norm"),
                                                ("model.placement", "placement")])
def test_an_unknown_registered_name_lists_every_registered_one(key, registry_name):
    names = sorted(fields.registry(registry_name))
    with pytest.raises(UsageError) as err:
        load(None, [f"{key}=bogus"])
    assert str(err.value) == (f"{key}: unknown {registry_name} 'bogus' "
                              f"(valid: {', '.join(names)}), got 'bogus'")
