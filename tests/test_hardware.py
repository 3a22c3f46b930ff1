"""What normexp chooses per device: attention kernel, custom gradients, asynchronous
checkpoints, and the peak FLOP/s table MFU is measured against."""

import json

import pytest

from normexp import hardware
from normexp.errors import UsageError
from normexp.hardware import Device, attention_kernel, custom_grads, peak_flops

CPU = Device("cpu", "cpu")
H100 = Device("gpu", "NVIDIA H100 80GB HBM3", (9, 0))
A100 = Device("gpu", "NVIDIA A100-SXM4-80GB", (8, 0))
TPU = Device("tpu", "TPU v5 lite")


def kernel(setting, device, dtype="bfloat16", head_width=64, softcap=0.0, seq_len=1024):
    return attention_kernel(setting, device, dtype=dtype, head_width=head_width,
                            seq_len=seq_len, softcap=softcap)


@pytest.mark.parametrize("device, dtype, width, expected, why", [
    (CPU, "float32", 32, "einsum", "CPU"),
    (CPU, "bfloat16", 64, "einsum", "CPU"),
    (H100, "bfloat16", 64, "cudnn", "cuDNN flash attention"),
    (H100, "bfloat16", 256, "cudnn", "cuDNN"),
    (H100, "float32", 64, "xla", "bfloat16"),
    (H100, "bfloat16", 12, "xla", "multiple of 8"),
    (H100, "bfloat16", 264, "xla", "at most 256"),
    (A100, "bfloat16", 128, "cudnn", "cuDNN"),
    (A100, "bfloat16", 192, "xla", "at most 128"),
    (TPU, "bfloat16", 128, "splash", "splash attention"),
    (TPU, "float32", 256, "splash", "splash attention"),
    (TPU, "bfloat16", 64, "xla", "not a multiple of 128"),
])
def test_auto_picks_the_kernel_each_device_and_shape_allow(device, dtype, width, expected, why):
    choice = kernel("auto", device, dtype, width)
    assert choice.value == expected and why in choice.reason


def test_a_forced_kernel_is_kept_or_refused_in_one_line():
    assert kernel("xla", CPU).value == "xla" and kernel("einsum", H100).value == "einsum"
    assert kernel("cudnn", H100).value == "cudnn"
    for device, dtype, width, why in [(CPU, "bfloat16", 64, "needs an NVIDIA GPU"),
                                      (H100, "float32", 64, "model.dtype=bfloat16"),
                                      (A100, "bfloat16", 256, "at most 128")]:
        with pytest.raises(UsageError) as e:
            kernel("cudnn", device, dtype, width)
        assert str(e.value).startswith("model.attention=cudnn: ") and why in str(e.value)
        assert "\n" not in str(e.value)


def test_splash_needs_a_tpu_and_whole_blocks():
    assert kernel("auto", TPU, head_width=128, seq_len=96).value == "xla"
    assert kernel("splash", TPU, head_width=64).value == "splash"
    with pytest.raises(UsageError, match="model.attention=splash: data.seq_len=96 is not a mult"):
        kernel("splash", TPU, seq_len=96)
    with pytest.raises(UsageError, match="splash attention needs a TPU, this is gpu"):
        kernel("splash", H100)


def test_splash_kernel_matches_the_einsum_core_forward_and_backward():
    """The TPU kernel run by Pallas's interpreter on this CPU, against normexp's core."""
    import jax
    import numpy as np
    from normexp.custom_grads import causal_attention_plain
    q, k, v = (jax.random.normal(jax.random.key(i), (1, 128, 2, 128)) for i in range(3))
    heads = lambda a: a.transpose(0, 2, 1, 3)
    core = lambda q, k, v: heads(causal_attention_plain(heads(q), heads(k), heads(v)))
    splash = lambda q, k, v: hardware.splash_attention(q, k, v, interpret=True)
    np.testing.assert_allclose(splash(q, k, v), core(q, k, v), atol=1e-5)
    loss = lambda f: lambda q, k, v: (f(q, k, v) ** 2).sum()
    for a, b in zip(jax.grad(loss(splash), (0, 1, 2))(q, k, v),
                    jax.grad(loss(core), (0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(a, b, atol=1e-4)


def test_soft_capped_logits_need_the_einsum_core():
    assert kernel("auto", H100, softcap=50.0).value == "einsum"
    with pytest.raises(UsageError, match="model.attention=xla: model.attn_softcap"):
        kernel("xla", CPU, softcap=50.0)


def test_custom_grads_auto_is_on_where_measured_faster_and_off_elsewhere():
    assert custom_grads("auto", CPU).value is True
    assert custom_grads("auto", H100).value is False and custom_grads("auto", TPU).value is False
    assert custom_grads("on", H100).value is True and custom_grads("off", CPU).value is False


def test_async_checkpoints_auto_on_accelerators_only():
    assert hardware.async_checkpoints("auto", CPU).value is False
    assert hardware.async_checkpoints("auto", H100).value is True
    assert hardware.async_checkpoints("on", CPU).value is True


@pytest.mark.parametrize("kind, dtype, tflops", [
    ("NVIDIA H100 80GB HBM3", "bfloat16", 989.4),
    ("NVIDIA H100 PCIe", "bfloat16", 756.0),
    ("NVIDIA H100 80GB HBM3", "float32", 494.7),
    ("NVIDIA H200", "bfloat16", 989.4),
    ("NVIDIA A100-SXM4-40GB", "bfloat16", 312.0),
    ("NVIDIA A100 80GB PCIe", "bfloat16", 312.0),
    ("NVIDIA L4", "bfloat16", 121.0),
    ("TPU v4", "bfloat16", 275.0),
    ("TPU v5 lite", "bfloat16", 197.0),
    ("TPU v5p", "bfloat16", 459.0),
    ("TPU v6 lite", "bfloat16", 918.0),
])
def test_peak_table_lookup(kind, dtype, tflops):
    flops, source = peak_flops(kind, dtype)
    assert flops == pytest.approx(tflops * 1e12) and "dense peak" in source


def test_unknown_devices_and_dtypes_have_no_peak_and_say_why():
    assert peak_flops("cpu", "float32") == (None, "'cpu' is not in the table")
    flops, why = peak_flops("TPU v4", "float32")
    assert flops is None and "no float32 peak" in why


def test_the_model_config_resolves_here_and_is_recorded(tiny, tmp_path):
    from normexp.train import run
    summary = run(tiny("train.steps=1", "log.tensorboard=false"))
    record = json.load(open(tmp_path / "run" / "summary.json"))["hardware"]
    assert summary.hardware == record
    assert record["attention"] == {"value": "einsum", "reason": kernel("auto", CPU).reason}
    assert record["custom_grads"]["value"] is True and record["platform"] == "cpu"


def test_forcing_cudnn_on_cpu_is_refused_before_anything_is_written(tiny, tmp_path):
    from normexp.train import run
    with pytest.raises(UsageError, match="model.attention=cudnn: cuDNN needs an NVIDIA GPU"):
        run(tiny("model.attention=cudnn", "model.dtype=bfloat16"))
    assert not (tmp_path / "run").exists()


def test_attention_diagnostics_are_the_same_whatever_kernel_ran(tiny):
    """They recompute the logits from the queries and keys, so a fused kernel changes nothing."""
    import jax
    import numpy as np
    from normexp import data as data_lib
    from normexp.step import init_state, make_train_step
    metrics = {}
    for kernel in ("einsum", "xla"):
        cfg = tiny(f"model.attention={kernel}", "optim.warmup_steps=0")
        corpus = data_lib.load_corpus("", 0, cfg.data.seq_len)
        graphdef, tx, state = init_state(cfg, corpus.vocab_size)
        x, y = data_lib.batch(corpus.train, seed=0, step=0, batch_size=4, seq_len=16)
        _, m = make_train_step(graphdef, tx, attention=True)(state, x, y)
        metrics[kernel] = {k: np.asarray(v) for k, v in jax.device_get(m).items()}
    assert any(k.startswith("attn/") for k in metrics["xla"])
    for key, value in metrics["einsum"].items():
        np.testing.assert_allclose(metrics["xla"][key], value, rtol=2e-4, atol=1e-6,
                                   err_msg=key)
