import glob
import os
import sys

import pytest

from normexp.config import Config, differences, load, to_yaml
from normexp.errors import UsageError, suggest

from conftest import ROOT, cli_in_process, normexp

sys.path.insert(0, os.path.join(ROOT, "scripts"))
from readme_reference import reference, reference_markdown  # noqa: E402


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml"))))
def test_every_shipped_config_parses(path):
    assert isinstance(load(path), Config)


def test_default_yaml_is_the_built_in_default():
    assert load(os.path.join(ROOT, "configs", "default.yaml")) == Config()


def test_config_is_frozen():
    cfg = load()
    with pytest.raises(AttributeError):
        cfg.optim.lr = 1.0


def test_resolved_yaml_round_trips(tmp_path):
    cfg = load(None, ["model.placement=post", "optim.lr=2e-4", "model.norm.eps=1e-6"])
    path = tmp_path / "config.yaml"
    path.write_text(to_yaml(cfg))
    assert load(str(path)) == cfg and differences(load(str(path)), cfg) == []


@pytest.mark.parametrize("args, fragment", [
    (["model.n_layr=3"], "model.n_layr: unknown key; did you mean 'model.n_layer'?"),
    (["optimm.lr=1"], "optimm: unknown key; did you mean 'optim'?"),
    (["optim.lr=fast"], "optim.lr: expected a finite number, got 'fast'"),
    (["model.n_layer=2.5"], "model.n_layer: expected an integer, got 2.5"),
    (["log.grad_norms=maybe"], "log.grad_norms: expected true or false"),
    (["model.n_layer=0"], "model.n_layer: must be > 0, got 0"),
    (["optim.beta2=1.0"], "optim.beta2: must be in [0, 1), got 1.0"),
    (["model.norm.kind=layrnorm"], "model.norm.kind: unknown norm 'layrnorm'; did you mean "
                                   "'layernorm'? (valid: batchnorm, derf, dyt, groupnorm, "
                                       "instancenorm, layernorm, none, rmsnorm, scalenorm, weightnorm)"),
    (["model.placement=sideways"], "model.placement: unknown placement 'sideways'"),
    (["model.n_head=3"], "model.n_head: 3 does not divide model.d_model=128"),
    (["optim.lr"], "override 'optim.lr' must look like dotted.key=value"),
    (["model.norm=3"], "model.norm: expected a section of keys"),
    (["optim.lr.x=3"], "optim.lr: is a value, not a section"),
])
def test_bad_overrides_name_the_key(args, fragment):
    with pytest.raises(UsageError) as err:
        load(None, args)
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)


def test_bad_files(tmp_path):
    with pytest.raises(UsageError, match="nope.yaml: no such config file"):
        load(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  n_layer: [1\n")
    with pytest.raises(UsageError, match="bad.yaml: line"):
        load(str(bad))
    for text in ("", "# only a comment\n"):  # would silently train the defaults
        empty = tmp_path / "empty.yaml"
        empty.write_text(text)
        with pytest.raises(UsageError, match="empty.yaml: is empty, expected a mapping"):
            load(str(empty))
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(UsageError, match="expected a mapping"):
        load(str(listy))


@pytest.mark.parametrize("override, fragment", [
    # difflib alone suggests deepnorm for prenorm and nothing for PreNorm
    ("model.placement=prenorm", "unknown placement 'prenorm'; did you mean 'pre'?"),
    ("model.placement=postnorm", "unknown placement 'postnorm'; did you mean 'post'?"),
    ("model.placement=PreNorm", "did you mean 'pre'?"),
    ("model.norm.kind=layer", "unknown norm 'layer'; did you mean 'layernorm'?"),
    ("model.norm.kind=layrnorm", "unknown norm 'layrnorm'; did you mean 'layernorm'?"),
    ("model.norm.kind=rms_norm", "unknown norm 'rms_norm'; did you mean 'rmsnorm'?"),
    ("model.n_layers=3", "model.n_layers: unknown key; did you mean 'model.n_layer'?"),
    ("optim.warmup=3", "optim.warmup: unknown key; did you mean 'optim.warmup_steps'?"),
    ("model.n_layr=3", "model.n_layr: unknown key; did you mean 'model.n_layer'?"),
])
def test_suggestions_prefer_a_name_the_input_extends_or_abbreviates(override, fragment):
    with pytest.raises(UsageError) as err:
        load(None, [override])
    assert fragment in str(err.value)


def test_suggest_offers_nothing_for_nothing_alike():
    assert suggest("", ["pre", "post"]) is None
    assert suggest("zzz", ["pre", "post"]) is None
    assert suggest("prenorm", ["deepnorm", "pre"]) == "pre"


def test_every_field_is_documented():
    rows = reference()
    assert len(rows) > 30 and all(doc for _, _, doc in rows)


@pytest.mark.parametrize("override, fragment", [
    ("model.norm.kind=rmsnrm", "model.norm.kind: unknown norm 'rmsnrm'; did you mean 'rmsnorm'?"),
    ("model.n_layr=3", "model.n_layr: unknown key; did you mean 'model.n_layer'?"),
    ("optim.lr=fast", "optim.lr: expected a finite number, got 'fast'"),
    ("model.n_layer=[1", "model.n_layer: expected an integer, got '[1'"),
    ("model.placement=postt", "model.placement: unknown placement 'postt'; did you mean 'post'?"),
    ("model.placement=prenorm", "unknown placement 'prenorm'; did you mean 'pre'?"),
    ("run.name=../../etc", "run.name: must be a plain file name"),
    # past int32 (the step counter), before tensorboardX or XLA ever sees the value
    ("train.steps=100000000000000000000", "train.steps: must be at most 2147483647"),
    ("model.d_model=1099511627776", "model.d_model: must be at most 2147483647"),
    ("train.batch_size=2147483648", "train.batch_size: must be at most 2147483647"),
    ("run.seed=4294967296", "run.seed: must be at most 2147483647"),
])
def test_cli_config_error_exits_2_with_one_line_and_writes_nothing(tmp_path, override, fragment):
    out = tmp_path / "run"
    result = cli_in_process("train", f"run.out_dir={out}", override)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr
    assert fragment in result.stderr
    assert not out.exists()


def test_readme_reference_lists_every_key_with_its_default():
    readme = open(os.path.join(ROOT, "README.md")).read()
    assert reference_markdown() in readme, "run: python scripts/readme_reference.py"
    for key, _, _ in reference():
        assert f"| `{key}` |" in readme


def test_readme_tables_list_every_norm_and_placement_and_each_placement_has_a_config():
    from normexp.norms import NORMS
    from normexp.placement import PLACEMENTS
    readme = open(os.path.join(ROOT, "README.md")).read()
    for name in [*NORMS, *PLACEMENTS]:
        assert f"| `{name}` |" in readme, name
    placements = {load(path).model.placement
                  for path in glob.glob(os.path.join(ROOT, "configs", "*.yaml"))}
    assert placements == set(PLACEMENTS)


def test_an_empty_config_file_exits_2_and_trains_nothing(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    result = normexp("train", str(empty), f"run.out_dir={tmp_path / 'run'}")
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "empty.yaml: is empty" in result.stderr and not (tmp_path / "run").exists()
