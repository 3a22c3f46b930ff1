import os

import jax
import numpy as np
import pytest

from normexp import budget
from normexp.config import flatten, load
from normexp.errors import UsageError
from normexp.step import init_state

from conftest import TINY, normexp

GiB = 2**30


@pytest.mark.parametrize("overrides", [[], ["model.d_model=64", "model.n_layer=6",
                                            "model.mlp_ratio=2"],
                                       ["model.placement=normformer", "model.qk_norm=per_head"],
                                       ["model.norm.kind=rmsnorm", "model.bias=false"]])
def test_the_state_estimate_counts_the_model_parameters_within_one_percent(overrides):
    cfg = load(None, overrides)
    count = sum(np.size(leaf) for leaf in jax.tree.leaves(init_state(cfg, 256)[2]["params"]))
    parts = budget.estimate({**flatten(cfg), "data.vocab_size": 256})
    # parameters, two AdamW moments, gradients and updates, float32
    assert parts["parameters and optimizer state"] == pytest.approx(20 * count, rel=0.01)


def test_what_scales_with_what():
    values = {**flatten(load(None, [])), "data.vocab_size": 256}
    base = budget.estimate(values)
    double_batch = budget.estimate({**values, "train.batch_size": 64})
    assert double_batch["activations"] == 2 * base["activations"]
    assert double_batch["parameters and optimizer state"] == base["parameters and optimizer state"]
    assert budget.estimate(values, runs=3)["activations"] == 3 * base["activations"]
    assert budget.estimate(values, devices=4)["activations"] == base["activations"] // 4
    remat = budget.estimate({**values, "train.remat": True, "model.n_layer": 16})
    assert remat["activations"] < budget.estimate({**values, "model.n_layer": 16})["activations"]


@pytest.mark.parametrize("override, key", [
    ("train.batch_size=1000000000", "train.batch_size"),
    ("model.d_model=100000", "model.d_model"),
    ("model.n_layer=1000000", "model.n_layer"),
    ("data.seq_len=10000000", "data.seq_len"),
])
def test_a_config_that_cannot_fit_names_the_key_the_estimate_and_the_limit(override, key):
    with pytest.raises(UsageError) as error:
        budget.check(load(None, [override]), 256, memory=(16 * GiB, "host memory"))
    message = str(error.value)
    assert message.startswith(f"{override}: the run needs at least ")
    assert "but host memory is 16.0 GiB; lower " + key in message


def test_the_default_config_fits_and_the_limit_is_this_machines_memory():
    parts = budget.check(load(None, []), 256)
    assert 0 < sum(parts.values()) < GiB
    limit, where = budget.device_memory()
    assert where == "host memory" and limit <= os.sysconf("SC_PAGE_SIZE") * os.sysconf(
        "SC_PHYS_PAGES")


@pytest.mark.parametrize("override, key", [("train.batch_size=1000000000", "train.batch_size"),
                                           ("model.d_model=200000", "model.d_model")])
def test_the_command_refuses_before_anything_is_allocated_or_written(tmp_path, override, key):
    out = tmp_path / "run"
    result = normexp("train", *TINY, f"run.out_dir={out}", override)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"normexp: error: {override}: the run needs at least")
    assert f"lower {key}" in result.stderr
    assert not out.exists()


def test_a_group_fills_one_device_before_another_is_used():
    cfg = load(None, TINY)
    need = lambda count: sum(budget.estimate({**flatten(cfg), "data.vocab_size": 256}, 8,
                                             count).values())
    assert budget.devices_needed(cfg, 256, 8, 4, memory=(need(1), "x")) == 1
    assert budget.devices_needed(cfg, 256, 8, 4, memory=(need(1) - 1, "x")) == 2
    assert budget.devices_needed(cfg, 256, 8, 4, memory=(need(4) - 1, "x")) == 4  # none fits
    # the batch of 4 sequences splits over 1, 2 or 4 devices, never 3
    assert budget.devices_needed(cfg, 256, 8, 3, memory=(need(2), "x")) == 2
