import functools
import os

import jax
import numpy as np
import pytest

from normexp import budget, hardware
from normexp.config import flatten, load
from normexp.errors import UsageError
from normexp.step import init_state, make_train_step

from conftest import TINY, cli_in_process

GiB = 2**30
H200 = hardware.Device("gpu", "NVIDIA H200", (9, 0))
H200_MEMORY = (141e9, "NVIDIA H200 memory")  # the data sheet's 141 GB (131.3 GiB)
GPT2_SMALL = ["model.n_layer=12", "model.d_model=768", "model.n_head=12", "data.seq_len=1024",
              "train.batch_size=64", "model.dtype=bfloat16"]


def estimate(cfg, vocab=256, runs=1, devices=1, device=None):
    return budget.estimate({**flatten(cfg), "data.vocab_size": vocab}, runs, devices,
                           attention=budget.attention(cfg, device))


@pytest.mark.parametrize("overrides", [[], ["model.d_model=64", "model.n_layer=6",
                                            "model.mlp_ratio=2"],
                                       ["model.placement=normformer", "model.qk_norm=per_head"],
                                       ["model.norm.kind=rmsnorm", "model.bias=false"]])
def test_the_state_estimate_counts_the_model_parameters_within_one_percent(overrides):
    cfg = load(None, overrides)
    count = sum(np.size(leaf) for leaf in jax.tree.leaves(init_state(cfg, 256)[2]["params"]))
    parts = estimate(cfg)
    # parameters and two AdamW moments, float32
    assert parts["parameters and optimizer state"] == pytest.approx(12 * count, rel=0.01)


def test_the_gradients_replace_the_activations_when_they_are_the_larger():
    cfg = load(None, ["train.batch_size=1", "data.seq_len=8", "model.d_model=256"])
    count = sum(np.size(leaf) for leaf in jax.tree.leaves(init_state(cfg, 256)[2]["params"]))
    parts = estimate(cfg)
    # the activations are all freed before every gradient is held: the step holds the larger
    assert "activations" not in parts
    assert parts["gradients"] == pytest.approx(4 * count, rel=0.01)
    assert "gradients" not in estimate(load(None, []))


def test_what_scales_with_what():
    values = {**flatten(load(None, [])), "data.vocab_size": 256}
    counted = functools.partial(budget.estimate, attention="einsum")
    base = counted(values)
    double_batch = counted({**values, "train.batch_size": 64})
    assert double_batch["activations"] == 2 * base["activations"]
    assert double_batch["parameters and optimizer state"] == base["parameters and optimizer state"]
    assert counted(values, runs=3)["activations"] == 3 * base["activations"]
    assert counted(values, devices=4)["activations"] == base["activations"] // 4
    remat = counted({**values, "train.remat": True, "model.n_layer": 16})
    assert remat["activations"] < counted({**values, "model.n_layer": 16})["activations"]
    # activations are counted in the compute dtype; parameters and AdamW state stay float32
    bf16 = counted({**values, "model.dtype": "bfloat16"})
    assert 2 * bf16["activations"] == base["activations"]
    assert bf16["parameters and optimizer state"] == base["parameters and optimizer state"]


def test_only_an_unfused_attention_kernel_holds_the_probabilities():
    values = {**flatten(load(None, GPT2_SMALL)), "data.vocab_size": 50304}
    L, N, H, T = 12, 64 * 1024, 12, 1024
    unfused = {k: budget.estimate(values, attention=k)["activations"] for k in ("xla", "einsum")}
    fused = {k: budget.estimate(values, attention=k)["activations"] for k in ("cudnn", "splash")}
    assert len(set(unfused.values())) == len(set(fused.values())) == 1
    # one [B, H, T, T] softmax per block, in bfloat16
    assert unfused["xla"] - fused["cudnn"] == L * N * H * T * 2


@pytest.mark.parametrize("device, overrides, kernel", [
    (H200, [], "cudnn"), (H200, ["model.dtype=float32"], "xla"),
    (hardware.Device("tpu", "TPU v5 lite"), ["model.n_head=6"], "splash"),  # 128-wide heads
    (hardware.Device("tpu", "TPU v5 lite"), [], "xla"),
    (hardware.Device("cpu", "cpu"), [], "einsum")])
def test_the_kernel_counted_is_the_one_auto_resolves_to_on_the_device(device, overrides, kernel):
    assert budget.attention(load(None, GPT2_SMALL + overrides), device) == kernel


def test_gpt2_small_in_bfloat16_fits_an_h200_by_the_fused_kernel():
    parts = budget.check(load(None, GPT2_SMALL), 50304, memory=H200_MEMORY, device=H200)
    assert sum(parts.values()) < 141e9
    # the floor is not vacuous: it still counts the bfloat16 activations and the logits
    assert parts["activations"] > 12 * 64 * 1024 * 2 * (6 + 2 * 4) * 768


def test_a_config_no_h200_could_hold_is_still_refused_with_one_line_naming_the_key():
    cfg = load(None, [*GPT2_SMALL, "model.dtype=float32", "model.attention=xla",
                      "train.batch_size=512"])
    with pytest.raises(UsageError) as error:
        budget.check(cfg, 50304, memory=H200_MEMORY, device=H200)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith("train.batch_size=512: the run needs at least ")
    assert message.endswith("but NVIDIA H200 memory is 131.3 GiB; lower train.batch_size")


@pytest.mark.parametrize("overrides", [
    [],  # the CPU's einsum core
    ["model.attention=xla", "model.custom_grads=off"],
    ["model.activation=relu", "model.norm.kind=none", "data.seq_len=16", "model.d_model=64"],
    ["train.remat=true", "model.n_layer=10"],
    ["model.dtype=bfloat16", "data.seq_len=16", "model.d_model=128"],
])
def test_the_estimate_is_a_floor_of_what_xla_allocates_on_cpu(overrides):
    cfg = load(None, ["model.n_layer=2", "model.d_model=16", "model.n_head=4",
                      "data.seq_len=256", "train.batch_size=4", *overrides])
    graphdef, tx, state = init_state(cfg, 256)
    tokens = jax.ShapeDtypeStruct((4, cfg.data.seq_len), np.int32)
    shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state)
    held = make_train_step(graphdef, tx).lower(shapes, tokens, tokens).compile().memory_analysis()
    # the step's arguments hold the state and one batch, not the prefetched or validation ones
    step = (held.argument_size_in_bytes + held.output_size_in_bytes - held.alias_size_in_bytes
            + held.temp_size_in_bytes)
    parts = estimate(cfg)
    assert sum(parts.values()) - parts["batches"] <= step


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
    result = cli_in_process("train", *TINY, f"run.out_dir={out}", override)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"normexp: error: {override}: the run needs at least")
    assert f"lower {key}" in result.stderr
    assert not out.exists()


def test_a_group_fills_one_device_before_another_is_used():
    cfg = load(None, TINY)
    need = lambda count: sum(estimate(cfg, 256, 8, count).values())
    assert budget.devices_needed(cfg, 256, 8, 4, memory=(need(1), "x")) == 1
    assert budget.devices_needed(cfg, 256, 8, 4, memory=(need(1) - 1, "x")) == 2
    assert budget.devices_needed(cfg, 256, 8, 4, memory=(need(4) - 1, "x")) == 4  # none fits
    # the batch of 4 sequences splits over 1, 2 or 4 devices, never 3
    assert budget.devices_needed(cfg, 256, 8, 3, memory=(need(2), "x")) == 2
