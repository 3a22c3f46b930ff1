"""The device a run is on, and what normexp chooses for it: the attention kernel, custom
gradients, asynchronous checkpoints, and the dense peak FLOP/s that MFU is measured against.

Every choice comes with its reason, printed when a run starts and kept in `summary.json`
under `hardware`, so a figure can always be traced to the kernel that produced it.
"""

import dataclasses

from normexp.errors import UsageError


@dataclasses.dataclass(frozen=True)
class Device:
    """What the choices depend on: `platform` (cpu, gpu, tpu), `kind` (jax's device_kind) and,
    on NVIDIA GPUs, the CUDA compute capability as (major, minor)."""
    platform: str
    kind: str
    capability: tuple = None


def local_device():
    import jax
    d = jax.local_devices()[0]
    cc = getattr(d, "compute_capability", None)
    capability = tuple(int(x) for x in cc.split(".")) if d.platform == "gpu" and cc else None
    return Device(d.platform, d.device_kind, capability)


@dataclasses.dataclass(frozen=True)
class Choice:
    value: object
    reason: str


def attention_kernel(setting, device, *, dtype, head_width, seq_len, softcap=0.0):
    """`model.attention` -> Choice of "cudnn" (cuDNN's fused flash attention, through
    jax.nn.dot_product_attention), "splash" (jax's Pallas splash attention for TPUs), "xla"
    (jax.nn.dot_product_attention's XLA path: unfused [B, H, T, T] logits) or "einsum"
    (normexp's own core, with its hand-written backward under custom_grads).

    auto: cuDNN on NVIDIA GPUs where it runs (bfloat16; a head width that is a multiple of 8,
    at most 256 from Hopper on, 128 before), splash on TPUs where the sequence and the head
    width are multiples of 128, XLA on other accelerators, einsum on CPU (its backward was
    tuned there). Soft-capped logits need the einsum core. Forcing a kernel where it cannot
    run is a config error.
    """
    if softcap:
        if setting != "auto" and setting != "einsum":
            raise UsageError(f"model.attention={setting}: model.attn_softcap needs the logits, "
                             f"which only the einsum core has; use model.attention=einsum or "
                             f"auto")
        return Choice("einsum", "model.attn_softcap needs the logits: the einsum core")
    problems = {"cudnn": lambda: cudnn_problem(device, dtype, head_width),
                "splash": lambda: splash_problem(device, seq_len)}
    if setting in problems:
        problem = problems[setting]()
        if problem:
            raise UsageError(f"model.attention={setting}: {problem}; use model.attention=auto "
                             f"(or xla)")
        return Choice(setting, "set in the config")
    if setting in ("xla", "einsum"):
        return Choice(setting, "set in the config")
    if device.platform == "cpu":
        return Choice("einsum", "CPU: the einsum core, whose backward was measured fastest")
    if device.platform == "tpu":
        problem = splash_problem(device, seq_len) or (
            f"head width {head_width} is not a multiple of 128" if head_width % 128 else None)
        if problem is None:
            return Choice("splash", f"{device.kind}: splash attention")
        return Choice("xla", f"{device.kind}: {problem} for splash attention, so XLA")
    problem = cudnn_problem(device, dtype, head_width)
    if problem is None:
        return Choice("cudnn", f"{device.kind}: cuDNN flash attention")
    return Choice("xla", f"{device.kind}: {problem}, so XLA")


def cudnn_problem(device, dtype, head_width):
    """Why cuDNN's flash attention cannot run this model here (None: it can). The conditions
    are jax's (`jax._src.cudnn.fused_attention_stablehlo.check_is_flash_attention`)."""
    if device.platform != "gpu" or device.capability is None:
        return f"cuDNN needs an NVIDIA GPU, this is {device.platform} ({device.kind})"
    if dtype != "bfloat16":
        return f"cuDNN needs model.dtype=bfloat16, got {dtype}"
    most = 256 if device.capability >= (9, 0) else 128
    if head_width % 8 or head_width > most:
        return (f"cuDNN needs a head width (model.d_model / model.n_head) that is a multiple "
                f"of 8 and at most {most} on {device.kind}, got {head_width}")
    return None


def splash_problem(device, seq_len):
    """Why splash attention cannot run here (None: it can): it needs a TPU and a sequence
    that its 128-token blocks tile."""
    if device.platform != "tpu":
        return f"splash attention needs a TPU, this is {device.platform} ({device.kind})"
    if seq_len % 128:
        return f"data.seq_len={seq_len} is not a multiple of 128"
    return None


def splash_attention(q_BxTxHxK, k_BxTxHxK, v_BxTxHxK, interpret=False):
    """softmax(q k^T / sqrt(K) + causal mask) v with jax's Pallas splash attention kernel (one
    sequence at a time, vmapped over the batch; `interpret` runs it anywhere, for tests)."""
    import numpy as np
    import jax
    from jax.experimental.pallas.ops.tpu import splash_attention as sa
    _, T, H, K = q_BxTxHxK.shape
    mask = sa.MultiHeadMask([sa.CausalMask((T, T)) for _ in range(H)])
    kernel = sa.make_splash_mha_single_device(mask, interpret=interpret)
    heads_first = lambda a: a.transpose(0, 2, 1, 3)
    scale = np.asarray(1.0 / np.sqrt(K), q_BxTxHxK.dtype)  # the kernel does not scale
    y_BxHxTxK = jax.vmap(kernel)(heads_first(q_BxTxHxK * scale), heads_first(k_BxTxHxK),
                                 heads_first(v_BxTxHxK))
    return heads_first(y_BxHxTxK)


def custom_grads(setting, device):
    """`model.custom_grads` -> Choice of True/False. auto: on where they were measured faster
    (XLA:CPU, see ../PERF_NOTES), off on accelerators until measured there (the matmul's forced
    transpose and the kept softmax may block a GPU's fusions)."""
    if setting != "auto":
        return Choice(setting == "on", "set in the config")
    if device.platform == "cpu":
        return Choice(True, "CPU: measured faster than autodiff")
    return Choice(False, f"{device.platform}: autodiff until custom gradients are measured here")


def async_checkpoints(setting, device):
    """`train.async_checkpoints` -> Choice. auto: on accelerators, where the host can write
    while the device trains; synchronous on CPU, where the writing would take the cores the
    step runs on."""
    if setting != "auto":
        return Choice(setting == "on", "set in the config")
    if device.platform == "cpu":
        return Choice(False, "CPU: the writer would compete with the step for the cores")
    return Choice(True, f"{device.platform}: the host writes while the device trains")


def model_choices(m, seq_len, device=None):
    """The model's kernels (m: `model` config, `seq_len` tokens) on `device` (default: this
    host's first): {"attention": Choice, "custom_grads": Choice}."""
    device = device or local_device()
    return {"attention": attention_kernel(m.attention, device, dtype=m.dtype,
                                          head_width=m.d_model // m.n_head, seq_len=seq_len,
                                          softcap=m.attn_softcap),
            "custom_grads": custom_grads(m.custom_grads, device)}


def choices(cfg, device=None):
    """Every choice for a config (normexp.config.Config) on `device` (default: this host's
    first), as {name: Choice}; raises UsageError for a forced choice that cannot run."""
    device = device or local_device()
    return {**model_choices(cfg.model, cfg.data.seq_len, device),
            "async_checkpoints": async_checkpoints(cfg.train.async_checkpoints, device)}


def describe(chosen, device=None):
    """For summary.json: the device and {name: {"value": ..., "reason": ...}}."""
    device = device or local_device()
    return {"device": device.kind, "platform": device.platform,
            **{name: dataclasses.asdict(c) for name, c in chosen.items()}}


# Dense (no sparsity) peak TFLOP/s per chip from the vendors' data sheets. float32 on NVIDIA
# GPUs is TF32, what XLA runs a float32 matmul as at jax's default precision; no float32 is
# listed for TPUs, whose float32 matmuls take several bfloat16 passes. Matched in order
# against jax's device_kind, case-insensitively: every word of the pattern must appear.
PEAK_TFLOPS = (
    ("h100 pcie", "NVIDIA H100 PCIe", {"bfloat16": 756.0, "float32": 378.0}),
    ("h100 nvl", "NVIDIA H100 NVL", {"bfloat16": 835.0, "float32": 417.5}),
    ("h100", "NVIDIA H100 SXM", {"bfloat16": 989.4, "float32": 494.7}),
    ("gh200", "NVIDIA GH200", {"bfloat16": 989.4, "float32": 494.7}),
    ("h200 nvl", "NVIDIA H200 NVL", {"bfloat16": 835.0, "float32": 417.5}),
    ("h200", "NVIDIA H200", {"bfloat16": 989.4, "float32": 494.7}),
    ("a100", "NVIDIA A100", {"bfloat16": 312.0, "float32": 156.0}),
    ("l4", "NVIDIA L4", {"bfloat16": 121.0, "float32": 60.0}),
    ("tpu v4", "TPU v4", {"bfloat16": 275.0}),
    ("tpu v5 lite", "TPU v5e", {"bfloat16": 197.0}),
    ("tpu v5e", "TPU v5e", {"bfloat16": 197.0}),
    ("tpu v5p", "TPU v5p", {"bfloat16": 459.0}),
    ("tpu v5", "TPU v5p", {"bfloat16": 459.0}),
    ("tpu v6 lite", "TPU v6e", {"bfloat16": 918.0}),
)


def peak_flops(kind, dtype):
    """(FLOP/s, name) of one chip of `kind` in `dtype` from PEAK_TFLOPS, or (None, why not)."""
    words = kind.lower().replace("-", " ").split()
    for pattern, name, peaks in PEAK_TFLOPS:
        if all(w in words for w in pattern.split()):
            if dtype in peaks:
                return peaks[dtype] * 1e12, f"{name} {dtype} dense peak {peaks[dtype]:g} TFLOP/s"
            return None, f"{name}: no {dtype} peak in the table"
    return None, f"{kind!r} is not in the table"
