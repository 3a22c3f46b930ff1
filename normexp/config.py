"""A frozen, typed config tree loaded from YAML plus dotted command-line overrides.

`load("configs/post_ln.yaml", ["optim.lr=3e-3"])` returns a `Config`; any unknown key, wrong
type or out-of-range value raises `UsageError` with one line naming the key path and what is
valid. Every field carries a one-line doc (`metadata["doc"]`) that the README reference mirrors.
"""

import copy
import dataclasses
import os
import typing
from dataclasses import dataclass

import yaml

from normexp.errors import UsageError, suggest
from normexp.fields import (Override, coerce, nonneg, one_of, opt, positive, registered, registry,
                            safe_name, section, unalias, unit_closed, unit_left_open, unit_open)


INT32_MAX = 2**31 - 1  # the step counter, token ids and positions are int32 on the device


@dataclass(frozen=True)
class NormConfig:
    kind: str = opt("layernorm", "norm variant, by registered name (README: Norms and placements)",
                    registered("norm"))
    eps: float = opt(1e-5, "added to the variance (or mean square) before the square root; "
                           "scalenorm: the floor of the norm", positive)
    bias: bool = opt(True, "learn an additive bias beta (layernorm, batchnorm, groupnorm, "
                           "instancenorm, dyt, derf); false = scale only")
    float32: bool = opt(True, "compute the norm in float32 whatever the activation dtype, then "
                              "cast back; false = in the activation dtype")
    partial: float = opt(1.0, "rmsnorm: fraction p of the features the RMS is estimated from "
                              "(p < 1 = pRMSNorm)", unit_left_open)
    groups: int = opt(8, "groupnorm: number of feature groups (must divide the normalized width)",
                      positive)
    momentum: float = opt(0.9, "batchnorm, weightnorm: running statistics r <- momentum * r + "
                               "(1 - momentum) * batch value", unit_open)
    batch_stats: str = opt("pooled", "batchnorm, weightnorm: pooled (over batch and time, leaks "
                                     "across positions) or per_position (over the batch only)",
                           one_of("pooled", "per_position"))
    running_var: str = opt("unbiased", "batchnorm: average the unbiased batch variance m/(m-1) "
                                       "sigma^2 (the paper, PyTorch) or the biased (Flax)",
                           one_of("unbiased", "biased"))
    unit_offset: bool = opt(False, "store each gain as w, gamma = 1 + w (scalenorm: sqrt(dim) + "
                                   "w), w = 0 at init and weight-decayed: decay pulls gamma to "
                                   "its init, not to 0 (Gemma)")
    alpha_attn: float = opt(0.5, "dyt, derf: initial alpha of the norms on the attention side",
                            positive)
    alpha_mlp: float = opt(0.5, "dyt, derf: initial alpha of the norms on the MLP side", positive)
    alpha_final: float = opt(0.5, "dyt, derf: initial alpha of the final and embedding norms",
                             positive)


@dataclass(frozen=True)
class ModelConfig:
    n_layer: int = opt(4, "number of transformer blocks", positive)
    n_head: int = opt(4, "attention heads per block (must divide d_model)", positive)
    d_model: int = opt(128, "residual stream width", positive)
    mlp_ratio: int = opt(4, "MLP hidden width as a multiple of d_model", positive)
    activation: str = opt("gelu", "MLP activation: gelu (exact, GPT-2's) or relu (the original "
                                  "Transformer's, as in Xiong et al. 2020)",
                          one_of("gelu", "relu"))
    placement: str = opt("pre", "where the norm sits around each sublayer, by registered name",
                         registered("placement"))
    final_norm: bool = opt(True, "apply a norm to the residual stream before the output head")
    bias: bool = opt(True, "biases in the attention and MLP projections")
    init: str = opt("gpt2", "gpt2: every weight N(0, init_std^2) (residual projections scaled "
                            "by scale_residual_init); xavier: the Transformer's init as in Xiong "
                            "et al. 2020, kernels Glorot normal std sqrt(2 / (fan_in + fan_out)), "
                            "embeddings N(0, 1/d_model) times sqrt(d_model) at the input",
                    one_of("gpt2", "xavier"))
    init_std: float = opt(0.02, "std of the normal init of embeddings and projections", positive)
    scale_residual_init: bool = opt(True, "GPT-2: residual output projections init with "
                                          "std init_std / sqrt(2 * n_layer) (deepnorm uses its "
                                          "own gain instead)")
    attn_softcap: float = opt(0.0, "soft-cap the attention logits, c * tanh(z / c) (Gemma 2: "
                                   "50; the einsum core, autodiff); 0 = off", nonneg)
    logit_softcap: float = opt(0.0, "soft-cap the output logits, c * tanh(z / c) (Gemma 2: 30); "
                                    "0 = off", nonneg)
    qk_norm: str = opt("off", "a norm of model.norm.kind on queries and keys: per_head (over "
                              "each head's features), shared (over d_model) or off; true/false "
                              "read as per_head/off", one_of("off", "per_head", "shared"),
                       aliases={"true": "per_head", "false": "off"})
    embed_norm: bool = opt(False, "normalize the embeddings before the first block (always on "
                                  "for placement peri)")
    weight_norm: bool = opt(False, "weight normalization of the attention and MLP kernels, "
                                   "w = g * v / ||v|| per output unit (always on for norm kind "
                                   "weightnorm)")
    mix_alpha: float = opt(0.25, "placement mix: the first floor(mix_alpha * n_layer) blocks "
                                 "are post, the rest pre", unit_closed)
    dtype: str = opt("float32", "compute dtype of matmuls and activations (float32 | bfloat16); "
                                "parameters, optimizer state and norm statistics stay float32",
                     one_of("float32", "bfloat16"))
    attention: str = opt("auto", "attention kernel: cudnn (cuDNN flash attention; bfloat16, "
                                 "NVIDIA GPUs), splash (Pallas, TPUs), xla (XLA's unfused "
                                 "jax.nn.dot_product_attention), einsum (normexp's core), or "
                                 "auto: cudnn or splash where they run, else xla; einsum on CPU",
                         one_of("auto", "cudnn", "splash", "xla", "einsum"),
                         aliases={"dot_product": "xla"})
    custom_grads: str = opt("auto", "hand-written backward passes for GELU, attention, the norms "
                                    "and the matmul (equal to autodiff, tested): on, off, or auto "
                                    "(on CPU, where they were measured faster; off elsewhere)",
                            one_of("auto", "on", "off"), aliases={"true": "on", "false": "off"})
    scan: bool = opt(True, "apply the stacked blocks with lax.scan (compile time flat in depth); "
                           "false = a Python loop over the same parameters, for debugging")
    scan_unroll: int = opt(0, "blocks per scan iteration (lax.scan unroll); 0 = auto: all of them "
                              "up to 8 blocks without remat (fastest on CPU), else 1 (flat "
                              "compile time)",
                           nonneg)
    norm: NormConfig = section(NormConfig, "the normalization layers")


@dataclass(frozen=True)
class DataConfig:
    path: str = opt("", "directory with train.bin/val.bin (uint16 token ids, or uint32 when "
                           "meta.json says dtype: uint32); empty = the embedded data.corpus")
    corpus: str = opt("pydoc", "the embedded byte corpus when data.path is empty: pydoc "
                               "(Python's pydoc topics, 0.47 MB) or stdlib (the standard "
                               "library's .py source without tests, ~12 MB)",
                      one_of("pydoc", "stdlib"))
    vocab_size: int = opt(0, "vocabulary size; 0 = from meta.json/meta.pkl (256 for the embedded "
                             "corpus)", nonneg)
    seq_len: int = opt(128, "tokens per training window", positive)
    eval_batches: int = opt(8, "validation batches (fixed windows) per evaluation", positive)


@dataclass(frozen=True)
class OptimConfig:
    lr: float = opt(1e-3, "peak learning rate of AdamW", nonneg)
    warmup_steps: int = opt(100, "linear warmup from 0 to lr; 0 = no warmup", nonneg)
    min_lr_ratio: float = opt(0.1, "cosine decay ends at lr * min_lr_ratio", unit_closed)
    beta1: float = opt(0.9, "AdamW first-moment decay", unit_open)
    beta2: float = opt(0.95, "AdamW second-moment decay", unit_open)
    eps: float = opt(1e-8, "AdamW epsilon", positive)
    weight_decay: float = opt(0.1, "decoupled weight decay on kernels, embeddings and unit-offset "
                                   "gains (not on biases or plain gains)", nonneg)
    clip_norm: float = opt(1.0, "clip the global gradient norm to this; 0 = off", nonneg)
    z_loss: float = opt(0.0, "z-loss coefficient c: minimise loss + c * mean(log^2 Z) of the "
                             "output softmax (PaLM: 1e-4); 0 = off", nonneg)


@dataclass(frozen=True)
class TrainConfig:
    steps: int = opt(300, "optimizer steps", positive)
    batch_size: int = opt(32, "sequences per step", positive)
    eval_every: int = opt(100, "evaluate on the val split every N steps (and at the end)", positive)
    checkpoint_every: int = opt(100, "save a checkpoint every N steps (and at the end)", positive)
    keep_checkpoints: int = opt(2, "how many of the latest checkpoints to keep", positive)
    compile_cache: str = opt("", "directory of JAX's persistent compilation cache (a second run of "
                                 "the same shapes skips compiling); empty = off")
    data_parallel: str = opt("auto", "auto: split each batch over every device (a jax.sharding "
                                     "mesh; batch_size must be a multiple of the device count; "
                                     "a vectorized group over the fewest that hold it), off: "
                                     "one device", one_of("auto", "off"))
    async_checkpoints: str = opt("auto", "write checkpoints in the background while training "
                                         "continues: on, off, or auto (on accelerators, off on "
                                         "CPU)", one_of("auto", "on", "off"),
                                 aliases={"true": "on", "false": "off"})
    remat: bool = opt(False, "rematerialise each block in the backward pass (jax.checkpoint): "
                             "less memory, more step time (see README, Deep models)")
    remat_policy: str = opt("nothing", "what remat keeps: nothing (recompute the block), dots "
                                       "(matmul outputs), dots_no_batch (matmuls without batch "
                                       "dims)", one_of("nothing", "dots", "dots_no_batch"))


@dataclass(frozen=True)
class WandbConfig:
    mode: str = opt("off", "Weights & Biases: off, online, offline (local files; `wandb sync` "
                           "uploads them) or disabled (wandb's no-op); pip install "
                           "'normexp[wandb]'", one_of("off", "online", "offline", "disabled"))
    project: str = opt("normexp", "the wandb project")
    entity: str = opt("", "the wandb entity (a team or user); empty = your default")
    group: str = opt("", "the wandb group; empty = the sweep's name for a sweep's runs")


@dataclass(frozen=True)
class LogConfig:
    every: int = opt(10, "fetch and write training metrics every N steps (step 0 always)", positive)
    grad_norms: bool = opt(True, "per-block gradient, parameter and update/parameter norms, at "
                                 "log steps")
    activations: bool = opt(False, "per-block activation statistics at log steps: residual "
                                   "stream mean, variance, RMS, excess kurtosis; each "
                                   "sublayer's residual update ratio; the RMS of each sublayer "
                                   "norm's and each linear layer's output; DyT and Derf "
                                   "saturation and alpha; AdamW's moments and the gradient's "
                                   "outliers per block")
    attention: bool = opt(False, "instability diagnostics at log steps: attention logits, "
                                 "entropy, sinks, massive activations, log Z, gradient RMS")
    spike_sigma: float = opt(6.0, "the spike score's threshold: a loss or gradient norm more "
                                  "than this many standard deviations above the mean of the "
                                  "previous spike_window steps is a spike (OLMo 2: 7)", positive)
    spike_window: int = opt(128, "the spike score's window, in steps (OLMo 2: 1000)", positive)
    tensorboard: bool = opt(True, "also write TensorBoard events (tensorboardX)")
    progress: bool = opt(True, "say what runs where, the compile time and the progress (a bar "
                               "on a terminal, a line per log step otherwise) on stderr")
    wandb: WandbConfig = section(WandbConfig, "Weights & Biases, as well as metrics.jsonl")


@dataclass(frozen=True)
class RunConfig:
    name: str = opt("default", "run name; the run directory is runs/<name> unless out_dir is set",
                    safe_name)
    out_dir: str = opt("", "run directory; empty = runs/<name>")
    seed: int = opt(0, "seed of the init and of the data order (batches depend on (seed, step))",
                    nonneg)

    @property
    def dir(self):
        return self.out_dir or os.path.join("runs", self.name)


# What may differ between the runs of one vectorized group: everything else shapes the program.
# (DyT's and Derf's alphas are the initial values of learned scalars, so they do not.)
GROUP_KEYS = ("run.seed", "optim.lr", "model.norm.alpha_attn", "model.norm.alpha_mlp",
              "model.norm.alpha_final", "run.name", "run.out_dir")


@dataclass(frozen=True)
class Config:
    model: ModelConfig = section(ModelConfig, "the transformer")
    data: DataConfig = section(DataConfig, "the corpus and windows")
    optim: OptimConfig = section(OptimConfig, "AdamW and the learning-rate schedule")
    train: TrainConfig = section(TrainConfig, "the training loop")
    log: LogConfig = section(LogConfig, "what is measured and written")
    run: RunConfig = section(RunConfig, "naming and seeding")


def parse_overrides(items):
    """`dotted.key=value` texts -> (key, value) settings, each value parsed by its field's type."""
    settings = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"override {item!r} must look like dotted.key=value "
                             f"(e.g. optim.lr=3e-3)")
        settings.append((key, Override(value)))
    return settings


def load(path=None, overrides=()):
    """Config from an optional YAML file plus `dotted.key=value` overrides, validated."""
    return build(read_yaml(path) if path is not None else {}, parse_overrides(overrides))


def build(raw, settings=()):
    """Config from a nested mapping (a parsed config file) and (dotted key, value) settings."""
    raw = copy.deepcopy(raw)
    for key, value in settings:
        node = raw
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise UsageError(f"{'.'.join(parts[:i + 1])}: is a value, not a section")
            node = child
        node[parts[-1]] = value
    cfg = _build(Config, raw, "")
    _check_cross(cfg)
    return cfg


def read_yaml(path, what="sections (model:, optim:, ...)"):
    """The mapping in a YAML file; any problem is a UsageError naming the file."""
    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
    except FileNotFoundError:
        raise UsageError(f"{path}: no such config file") from None
    except IsADirectoryError:
        raise UsageError(f"{path}: is a directory, expected a YAML config file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"{path}: cannot read the config file ({e})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise UsageError(f"{path}:{where}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if raw is None:  # an empty file (or only comments) would silently mean the defaults
        raise UsageError(f"{path}: is empty, expected a mapping of {what}")
    if not isinstance(raw, dict):
        raise UsageError(f"{path}: expected a mapping of {what}, got {type(raw).__name__}")
    return raw


def _build(cls, raw, prefix):
    if not isinstance(raw, dict):
        raise UsageError(f"{prefix.rstrip('.')}: expected a section of keys, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in raw:
        if key not in fields:
            near = suggest(key, fields)
            hint = f"; did you mean '{prefix}{near}'?" if near else ""
            raise UsageError(f"{prefix}{key}: unknown key{hint} "
                             f"(valid in {prefix.rstrip('.') or 'the top level'}: "
                             f"{', '.join(fields)})")
    values = {}
    for name, f in fields.items():
        if name not in raw:
            continue
        path, kind = prefix + name, hints[name]
        if dataclasses.is_dataclass(kind):
            values[name] = _build(kind, raw[name], path + ".")
            continue
        if isinstance(raw[name], dict):
            raise UsageError(f"{path}: is a value, not a section (it has no keys "
                             f"{', '.join(path + '.' + str(k) for k in raw[name])})")
        value = coerce(unalias(raw[name], f.metadata["aliases"]), kind, path)
        if kind is int and value > INT32_MAX:
            raise UsageError(f"{path}: must be at most {INT32_MAX} (steps, token ids and "
                             f"positions are int32), got {value}")
        problem = f.metadata["check"] and f.metadata["check"](value)
        if problem:
            raise UsageError(f"{path}: {problem}, got {value!r}")
        values[name] = value
    return cls(**values)


def _check_cross(cfg):
    """The rules that join keys; a norm kind and a placement each state their own."""
    m = cfg.model
    if m.d_model % m.n_head:
        raise UsageError(f"model.n_head: {m.n_head} does not divide model.d_model={m.d_model}")
    if cfg.data.path and cfg.data.corpus != "pydoc":
        raise UsageError(f"data.corpus: {cfg.data.corpus!r} names an embedded corpus, but "
                         f"data.path={cfg.data.path!r} is set (empty it, or drop data.corpus)")
    for problem in (registry("placement")[m.placement].check(m),
                    registry("norm")[m.norm.kind].check(m)):
        if problem:
            raise UsageError(problem)


def flatten(tree, prefix=""):
    """{"optim": {"lr": 1e-3}} -> {"optim.lr": 1e-3}: a config (or its dict) by dotted key."""
    tree = dataclasses.asdict(tree) if dataclasses.is_dataclass(tree) else tree
    out = {}
    for k, v in tree.items():
        out.update(flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return out


def _aliases(cls=None, prefix=""):
    """{dotted key: its field's aliases} for the fields that have older spellings."""
    cls, out = cls or Config, {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out.update(_aliases(hints[f.name], f"{prefix}{f.name}."))
        elif f.metadata.get("aliases"):
            out[prefix + f.name] = f.metadata["aliases"]
    return out


def current_spelling(flat):
    """Dotted settings (an older run's config.yaml) with values in today's spelling, so runs
    from before and after a key took names compare equal (model.qk_norm: true -> per_head)."""
    aliases = _aliases()
    return {k: unalias(v, aliases.get(k)) for k, v in flat.items()}


def to_yaml(cfg):
    return yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)


def differences(a, b):
    """Dotted keys whose values differ between two configs (or their dicts)."""
    a, b = flatten(a), flatten(b)
    return [k for k in a if a[k] != b.get(k)]
