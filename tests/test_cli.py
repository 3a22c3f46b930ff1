import argparse
import importlib.metadata
import json
import os

import pytest
import yaml

from normexp import cli
from normexp.errors import UsageError

from conftest import cli_in_process, normexp, tiny_base, write_sweep

COMMANDS = ["train", "sweep", "compare", "ls", "results", "report", "prune", "claims", "prepare",
            "bench"]


def _existing_run(tmp_path):
    """A config file for a finished run directory, and a file in it that only deleting it loses."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("{}\n")
    (run_dir / "keep").write_text("results\n")
    config = tmp_path / "x.yaml"
    base = tiny_base("train.steps=2")
    base["run"] = {"out_dir": str(run_dir)}
    config.write_text(yaml.safe_dump(base))
    return str(config), run_dir


@pytest.mark.parametrize("option", ["--o", "--overwr", "--resum"])
def test_train_rejects_abbreviated_options(tmp_path, option):
    config, run_dir = _existing_run(tmp_path)
    result = cli_in_process("train", option, config, cwd=tmp_path)
    assert result.returncode == 2
    assert f"unrecognized arguments: {option}" in result.stderr
    assert sorted(os.listdir(run_dir)) == ["config.yaml", "keep"]


@pytest.mark.parametrize("args", [["--max-par", "2"], ["--dry"], ["--sh", "1/2"]])
def test_sweep_rejects_abbreviated_options(tmp_path, args):
    result = cli_in_process("sweep", write_sweep(tmp_path), *args, cwd=tmp_path)
    assert result.returncode == 2
    assert f"unrecognized arguments: {args[0]}" in result.stderr
    assert not (tmp_path / "out").exists()


def test_no_parser_accepts_abbreviations():
    top = cli.parser()
    (sub,) = [a for a in top._actions if isinstance(a, argparse._SubParsersAction)]
    assert top.allow_abbrev is False
    assert sorted(sub.choices) == sorted(COMMANDS)
    assert all(p.allow_abbrev is False for p in sub.choices.values())
    with pytest.raises(SystemExit) as exit_:
        top.parse_args(["bench", "--rep", "3"])
    assert exit_.value.code == 2


def test_help_describes_every_command_in_a_full_sentence():
    result = normexp("--help", env={**os.environ, "COLUMNS": "100"})
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    assert cli.DESCRIPTION in text and cli.DESCRIPTION.endswith(".")
    for name in COMMANDS:
        assert f"{name} (" in cli.DESCRIPTION, name
    (sub,) = [a for a in cli.parser()._actions if isinstance(a, argparse._SubParsersAction)]
    lines = result.stdout.splitlines()
    for choice in sub._choices_actions:
        # each command on one line with its whole help
        assert any(line.split() == [choice.dest, *choice.help.split()] for line in lines), \
            choice.dest


def test_version_prints_the_installed_version():
    result = normexp("--version")
    assert result.returncode == 0
    assert result.stdout == f"normexp {importlib.metadata.version('normexp')}\n"


@pytest.mark.parametrize("command", ["train", "bench"])
def test_a_key_without_value_asks_for_key_value(tmp_path, command):
    result = cli_in_process(command, "model.n_layer", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr
    assert "'model.n_layer': expected dotted.key=value (e.g. model.n_layer=8)" in result.stderr
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("name", ["missing.yaml", "configs.post_ln.yml"])
def test_a_missing_yaml_file_is_still_a_missing_file(tmp_path, name):
    result = cli_in_process("train", name, cwd=tmp_path)
    assert result.returncode == 2
    assert f"{name}: no such config file" in result.stderr


def test_an_existing_file_with_a_dotted_name_is_a_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "post.ln").write_text(yaml.safe_dump({"model": {"n_layr": 2}}))
    with pytest.raises(UsageError, match="model.n_layr: unknown key"):
        cli._load(["post.ln"])


def test_a_sweep_runs_config_path_with_equals_signs_is_a_config(study):
    run = study.runs[0]
    path = os.path.join(run.cfg.run.dir, "config.yaml")
    assert "=" in path
    assert cli._split_config_args([path, "train.steps=3"]) == (path, ["train.steps=3"])
    assert cli._split_config_args(["model.n_layer=2"]) == (None, ["model.n_layer=2"])
    done = normexp("train", path, "--resume")  # the README's resume command
    assert done.returncode == 0, done.stderr
    status = json.load(open(os.path.join(run.cfg.run.dir, "summary.json")))["status"]
    assert f": {status}" in done.stdout and "nothing to do" in done.stderr


def test_options_and_overrides_mix_in_any_order(tmp_path):
    config, run_dir = _existing_run(tmp_path)
    done = cli_in_process("train", config, "--overwrite", "train.steps=3", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 3
    assert not (run_dir / "keep").exists()
    again = cli_in_process("train", "train.steps=3", "--resume", config, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "nothing to do" in again.stderr


def test_a_bad_option_among_overrides_is_one_line_and_touches_nothing(tmp_path):
    config, run_dir = _existing_run(tmp_path)
    result = cli_in_process("train", config, "--overwrit", "train.steps=3", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith("normexp train: error: unrecognized arguments: --overwrit")
    assert "normexp train --help" in result.stderr
    assert sorted(os.listdir(run_dir)) == ["config.yaml", "keep"]


@pytest.mark.parametrize("args, expected", [
    (["train", "c.yaml", "--overwrite", "a.b=1"], {"config": ["c.yaml", "a.b=1"],
                                                   "overwrite": True}),
    (["train", "a.b=1", "--resume", "c.yaml"], {"config": ["a.b=1", "c.yaml"], "resume": True}),
    (["sweep", "--set", "a.b=1", "--dry-run", "s.yaml"], {"sweep_file": "s.yaml",
                                                          "set": ["a.b=1"], "dry_run": True}),
    (["sweep", "--dry-run", "s.yaml", "--set", "a.b=1", "seeds=2", "--shard", "1/2"],
     {"sweep_file": "s.yaml", "set": ["a.b=1", "seeds=2"], "shard": "1/2"}),
    (["report", "r1", "--out", "o", "r2"], {"path": ["r1", "r2"], "out": "o"}),
    (["compare", "r1", "--out", "o", "r2"], {"runs": ["r1", "r2"], "out": "o"}),
    (["prepare", "in.txt", "--tokenizer", "bpe:300", "out"], {"paths": ["in.txt", "out"]}),
    (["bench", "c.yaml", "--quick", "a.b=1"], {"config": ["c.yaml", "a.b=1"], "quick": True}),
])
def test_every_command_takes_options_between_its_positionals(args, expected):
    ns = cli.parser().parse_args(args)
    assert {k: getattr(ns, k) for k in expected} == expected


def test_the_config_file_may_follow_its_overrides(tmp_path):
    assert cli._split_config_args(["a.b=1", "c.yaml", "d.e=2"]) == ("c.yaml", ["a.b=1", "d.e=2"])
    with pytest.raises(UsageError, match="'d.yaml': expected dotted.key=value beside the config "
                                         r"file \(only one CONFIG.yaml may be given\)"):
        cli._split_config_args(["a.b=1", "c.yaml", "d.yaml"])
    with pytest.raises(UsageError, match="'model.n_layer': expected dotted.key=value"):
        cli._split_config_args(["c.yaml", "model.n_layer"])
