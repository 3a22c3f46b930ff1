import json
import os

import numpy as np
import pytest

from normexp import cli
from normexp.prune import PER_BLOCK, PRUNE, prune
from normexp.rundir import read_summary
from normexp.train import run


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny 3-block Pre-Norm run, trained to its last checkpoint."""
    from normexp.config import load
    from conftest import TINY
    out = tmp_path_factory.mktemp("prune")
    cfg = load(None, TINY + ["model.n_layer=3", f"run.out_dir={out}", "run.name=pre"])
    run(cfg)
    return cfg.run.dir


def test_the_whole_models_loss_is_the_runs_final_val_loss_and_each_skip_costs(trained):
    numbers = prune(trained)
    summary = read_summary(trained)
    assert numbers["step"] == summary.steps == 12 and numbers["status"] == "completed"
    assert numbers["loss"] == pytest.approx(summary.final_val_loss, rel=1e-5)
    assert numbers["batches"] == 2
    for key in ("skipped_loss", *PER_BLOCK):
        assert len(numbers[key]) == 3, key
    np.testing.assert_allclose(np.subtract(numbers["skipped_loss"], numbers["loss"]),
                               numbers["damage"])
    assert len(set(numbers["skipped_loss"])) == 3 and numbers["loss"] not in numbers["skipped_loss"]
    assert all(0 < a < 0.5 for a in numbers["angular"])
    assert prune(trained, batches=1)["batches"] == 1


def test_the_command_prints_the_table_and_writes_prune_json(trained, tmp_path, capsys):
    assert cli.main(["prune", trained]) == 0
    out = capsys.readouterr()
    assert "val loss" in out.out and "angular" in out.out and PRUNE in out.err
    with open(os.path.join(trained, PRUNE)) as f:
        written = json.load(f)
    assert written["damage"] == prune(trained)["damage"]
    # bad input: one line each, exit 2, nothing written
    assert cli.main(["prune", str(tmp_path)]) == 2
    assert "not a run directory" in capsys.readouterr().err
    os.makedirs(tmp_path / "bare")
    for name in ("config.yaml",):
        with open(os.path.join(trained, name)) as src, open(tmp_path / "bare" / name, "w") as dst:
            dst.write(src.read())
    assert cli.main(["prune", str(tmp_path / "bare")]) == 2
    assert "no verified checkpoint" in capsys.readouterr().err
    assert os.listdir(tmp_path / "bare") == ["config.yaml"]
