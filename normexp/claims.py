"""`normexp claims`: published claims about normalization, tested by small studies, with verdicts
computed from what the studies measure.

Each claim has a study (`normexp.studies.measure_*`, which returns plain numbers) and a judge
(`normexp.verdicts.judge_*`: numbers -> `Verdict`). `run_claims` runs them all and writes
`claims.md` and `claims.json`. A study whose runs did not all finish is judged inconclusive,
naming them, before its judge sees the rest.
"""

import dataclasses
import json
import os

from normexp import analysis, plots
from normexp.depth_study import depth_scale, measure_depth
from normexp.dyt_study import ALPHAS, dyt_scale, measure_dyt
from normexp.dyt_verdicts import judge_alpha_width, judge_dyt_matches
from normexp.depth_verdicts import (judge_angular, judge_mix_loss, judge_pruning,
                                    judge_variance_growth)
from normexp.lr_study import lr_sensitivity_sweep, measure_lr_sensitivity
from normexp.lr_verdicts import judge_higher_lr, judge_logit_growth, judge_qk_sensitivity
from normexp.qkv_study import load_runs as qkv_runs
from normexp.qkv_study import measure_qkv, qkv_sweep
from normexp.report import png, write_report
from normexp.rundir import write_atomic
from normexp.studies import (measure_batchnorm, measure_expected_gradients,
                             measure_init_gradients, measure_kurtosis, measure_leak,
                             measure_rmsnorm, measure_scale_invariance, measure_warmup,
                             warmup_overrides, warmup_scale)
from normexp.verdicts import (Verdict, depth_slopes, incomplete, judge_batchnorm,
                              judge_depth_slope, judge_init_gradients, judge_kurtosis,
                              judge_leak, judge_rmsnorm, judge_scale_invariance, judge_warmup)


@dataclasses.dataclass(frozen=True)
class Result:
    number: int
    claim: str
    setup: str
    verdict: Verdict
    numbers: dict


# -- the claims, their setups, and the table ------------------------------------------------

def _shape(scale, layers=None, width=None):
    return (f"{layers or scale.n_layer} blocks x {width or scale.d_model} wide, seq "
            f"{scale.seq_len}, batch {scale.batch_size}, embedded corpus")


def _trained(scale, what):
    return f"{_shape(scale)}, {scale.steps} steps, {scale.seeds} seeds; {what}"


def _save(fig, out, name):
    """Write a figure of a claim into `out`; returns its path relative to `out`."""
    os.makedirs(out, exist_ok=True)
    write_atomic(os.path.join(out, name), png(fig))
    return name


def _judged(numbers, where, judge, *args):
    """Completeness first: the judge's verdict only on a study whose runs all finished (those
    of another claim's study are not looked at); else inconclusive, naming the missing runs."""
    if numbers.get("missing") or not numbers.get("of", 1):
        return incomplete(numbers["missing"], numbers["of"], where=where)
    return judge(*args)


def _claim_1(scale, out):
    numbers = measure_expected_gradients(scale)
    depth = max(L for L in scale.depths if L <= 12)
    ratios = {p: [w2[-1] / w2[0] for w2 in numbers["profiles"][p][depth]["w2"]]
              for p in ("pre", "post")}
    setup = (f"a decoder-only byte model as a proxy for the paper's translation Transformer: "
             f"{scale.init_width} wide, 4 heads, Xavier init, ReLU, seq {scale.seq_len}, batch "
             f"{scale.batch_size}, ||E[grad]|| over {scale.grad_batches} batches at "
             f"initialisation, {scale.seeds} seeds")
    figure = _save(plots.expected_gradients(numbers["profiles"], numbers["last_w2"], depth),
                   out, "expected_gradients.png")
    yield ("Xiong et al. 2020 (Fig. 3a/b): at initialisation the FFN's expected gradient "
           "||E[grad W2]|| grows toward the last block under Post-LN and stays flat under "
           "Pre-LN"), f"{setup}; {depth} blocks", judge_init_gradients(ratios), {
        "ratios": ratios, "depth": depth, "profiles": numbers["profiles"], "figures": [figure]}
    yield ("Xiong et al. 2020 (Fig. 3c/d, Theorem 1): the last block's ||E[grad W2]|| falls "
           "with depth L as 1/sqrt(L) under Pre-LN and stays constant under Post-LN"), (
        f"{setup}; L in {list(scale.depths)}"), judge_depth_slope(numbers["last_w2"]), {
        "last_w2": numbers["last_w2"], "slopes": depth_slopes(numbers["last_w2"])}
    gpt2 = measure_init_gradients(scale, "gpt2")
    yield ("With GPT-2's init, Post-Norm's whole-block gradient norms grow toward the last "
           "blocks at initialisation while Pre-Norm's stay flat or shrink (the quantity "
           "normexp logs: per batch, the whole block)"), (
        f"{_shape(scale, scale.init_layers, scale.init_width)}, GPT-2 init (N(0, 0.02), "
        f"residual 1/sqrt(2L)), {scale.seeds} seeds, step 0"), judge_init_gradients(
        gpt2["ratios"]), gpt2


def _claim_2(scale, out):
    numbers = measure_warmup(scale, out)
    lr, warmup = (v for k, v in warmup_overrides(scale, "pre", True)[2:])
    yield ("Post-Norm without warmup at a high learning rate diverges or ends worse; Pre-Norm "
           "does not need the warmup"), _trained(
        warmup_scale(scale), f"lr {lr:g}, warmup 0 vs {warmup} steps, final val loss"), _judged(
        numbers, os.path.join(out, "warmup"), judge_warmup, numbers), numbers


def _claim_3(scale, out):
    numbers = measure_rmsnorm(scale, out)
    yield ("Zhang & Sennrich 2019: RMSNorm reaches LayerNorm's loss at lower cost"), _trained(
        scale, "Pre-Norm, lr 3e-3; time of the train step and of the norm alone (forward + "
        "backward), median of alternating repeats"), _judged(
        numbers, os.path.join(out, "rmsnorm"), judge_rmsnorm, numbers), numbers


def _claim_4(scale, out):
    numbers = measure_batchnorm(scale, out)
    yield ("BatchNorm: training (batch statistics) and evaluation (running averages) differ, "
           "and normalizing a single sample (batch 1, sequence 1) breaks"), (
        f"{_shape(scale)}, pooled BatchNorm trained {scale.steps} steps, one validation batch; "
        f"the norm alone on one token"), _judged(
        numbers, os.path.join(out, "batchnorm"), judge_batchnorm, numbers), numbers


def _claim_5(scale, out):
    numbers = measure_leak(scale)
    yield ("BatchNorm and InstanceNorm leak information across positions in a causal language "
           "model; LayerNorm and RMSNorm do not"), (
        f"{_shape(scale)}, Pre-Norm at init, training mode; tokens after position "
        f"{numbers['position']} changed, max change of the logits up to it / max logit"), \
        judge_leak(numbers["leaks"]), numbers


def _claim_6(scale, out):
    for placement in ("pre", "post"):
        numbers = measure_kurtosis(scale, out, placement)
        yield ("The residual stream becomes more Gaussian with depth (excess kurtosis per "
               "block)"), _trained(warmup_scale(scale), f"{placement.capitalize()}-Norm (the "
                                   f"warmup study's runs with warmup), last logged step"), \
            _judged(numbers, os.path.join(out, "warmup"), judge_kurtosis, numbers), numbers


def _claim_7(scale, out):
    numbers = measure_scale_invariance(scale)
    yield ("A norm makes the weights feeding it scale-invariant, so weight decay changes only "
           "their effective learning rate"), (
        f"{_shape(scale)}, Pre-Norm with per-head QK-norm at init: q/k projection (kernel and "
        f"bias) scaled by c; control: the MLP's input projection scaled by 2"), \
        judge_scale_invariance(numbers), numbers


def _claim_8(scale, out):
    numbers = measure_lr_sensitivity(scale, out)
    sweep = lr_sensitivity_sweep(scale, out)
    # a report of part of the sweep shows which runs are missing (it has no lr figures then)
    written = write_report(sweep.out_dir) if len(numbers["missing"]) < numbers["of"] else []
    figures = [os.path.relpath(p, out) for p in written if os.path.basename(p).startswith((
        "loss_vs_lr", "logit_max"))]
    c = sweep.runs[0].cfg
    widths = sorted({r.cfg.model.d_model for r in sweep.runs})
    lrs = sorted({r.cfg.optim.lr for r in sweep.runs})
    for placement in dict.fromkeys(r.cfg.model.placement for r in sweep.runs):
        setup = (f"{placement}, widths {widths} x {c.model.n_layer} blocks, {c.model.n_head} "
                 f"heads, seq {c.data.seq_len}, batch {c.train.batch_size}, {c.train.steps} "
                 f"steps on the stdlib corpus, lr {lrs[0]:g}..{lrs[-1]:g} ({len(lrs)}), "
                 f"{len({r.cfg.run.seed for r in sweep.runs})} seeds; the paper's optimizer, "
                 f"z-loss and no biases ({os.path.relpath(sweep.path)}); report: "
                 f"{os.path.relpath(written[-2], out) if written else 'none, no run finished'}")
        table = [row for row in numbers["table"] if row["model.placement"] == placement]
        mine = {k: numbers[k].get(placement, v) for k, v in (("sensitivity", {}), ("runs", []))}
        yield ("Wortsman et al. 2023 (Fig. 1): qk-layernorm lowers the learning-rate "
               "sensitivity at every model size"), setup, _judged(
            numbers, sweep.out_dir, judge_qk_sensitivity, mine["sensitivity"]), {
            "sensitivity": mine["sensitivity"], "table": table, "missing": numbers["missing"],
            "figures": figures if placement == sweep.runs[0].cfg.model.placement else []}
        yield ("Wortsman et al. 2023 (sec. 3.1.1): without qk-layernorm the max attention "
               "logit grows before the loss fails"), setup, _judged(
            numbers, sweep.out_dir, judge_logit_growth, mine["runs"]), {"runs": mine["runs"]}


def _depth_setup(scale):
    scale = depth_scale(scale)
    return _trained(scale, f"LayerNorm, GELU, N(0, 0.02) init without residual scaling, lr "
                    f"1e-3, warmup {max(1, scale.steps // 10)}, Mix-LN alpha 0.25; each run "
                    f"pruned at its last checkpoint on its validation batches (normexp prune)")


def _claim_9(scale, out):
    numbers = measure_depth(scale, out, pruned=("pre", "lns"))
    figures = [_save(plots.depth_profiles(numbers["profiles"], "Pre-LN vs LayerNorm Scaling"),
                     out, "curse_of_depth.png")] if numbers["profiles"] else []
    yield ("Sun et al. 2025 (Fig. 1/6): under Pre-LN the output variance grows with depth; "
           "LayerNorm Scaling (1/sqrt(l)) keeps it much flatter"), _depth_setup(scale), \
        judge_variance_growth(numbers), {**numbers, "figures": figures}
    yield ("Sun et al. 2025 (Fig. 4): Pre-LN's deep blocks can be pruned at little cost; "
           "under LayerNorm Scaling they matter more"), _depth_setup(scale), \
        judge_pruning(numbers), {"profiles": numbers["profiles"], "missing": numbers["missing"]}


def _claim_10(scale, out):
    numbers = measure_depth(scale, out, pruned=("pre", "mix", "post"))
    figures = [_save(plots.depth_profiles(numbers["profiles"], "Pre-LN, Mix-LN, Post-LN"),
                     out, "mix_ln.png")] if numbers["profiles"] else []
    yield ("Li et al. 2024 (Fig. 3): deep in a Pre-LN stack a block barely changes the "
           "stream's direction; Mix-LN's deep blocks change it more"), _depth_setup(scale), \
        judge_angular(numbers), {**numbers, "figures": figures}
    yield ("Li et al. 2024 (Table 1): Mix-LN trains at least as well as Pre-LN and "
           "Post-LN"), _depth_setup(scale), judge_mix_loss(numbers), {
        "losses": numbers["losses"], "missing": numbers["missing"]}


def _claim_11(scale, out):
    numbers = measure_qkv(scale, out)
    sweep = qkv_sweep(scale, out)
    figures = []
    if numbers["stable"]:
        runs = qkv_runs(sweep.out_dir)
        figures = [_save(plots.loss_vs_lr(runs, line="model.d_model", panel="setup"), out,
                         "qkv_norm_loss_vs_lr.png")]
    c = sweep.runs[0].cfg
    widths = sorted({r.cfg.model.d_model for r in sweep.runs})
    lrs = sorted({r.cfg.optim.lr for r in sweep.runs})
    yield ("Rybakov et al. 2024: QK-norm with softmax capping, or a norm after the QKV "
           "projection without the pre-norm, trains stably at a higher learning rate than "
           "QK-norm alone (1.5x in the paper)"), (
        f"QK-norm (per head) alone, with the attention logits soft-capped at 20, and placement "
        f"qkv; widths {widths} x {c.model.n_layer} blocks, {c.model.n_head} heads, seq "
        f"{c.data.seq_len}, batch {c.train.batch_size}, {c.train.steps} steps on the stdlib "
        f"corpus, lr {lrs[0]:g}..{lrs[-1]:g} ({len(lrs)}, 3x apart), "
        f"{len({r.cfg.run.seed for r in sweep.runs})} seeds; claim 8's optimizer, z-loss and "
        f"no biases ({os.path.relpath(sweep.path)})"), _judged(
        numbers, sweep.out_dir, judge_higher_lr, numbers["stable"], numbers.get("lrs", [])), {
        **numbers, "figures": figures}


def _claim_12(scale, out):
    numbers = measure_dyt(scale, out)
    figures = []
    if not numbers["missing"]:
        runs = analysis.load_runs(numbers["run_dirs"])
        figures = [_save(plots.loss_vs_lr(runs[runs["model.norm.kind"] == "dyt"],
                                          line="model.n_layer", panel="model.d_model",
                                          lr="model.norm.alpha_attn"), out, "dyt_alpha.png"),
                   _save(plots.saturation_curves(numbers["curves"]), out, "dyt_saturation.png")]
    batch = dyt_scale(scale, 1, 1).batch_size
    setup = (f"widths {list(scale.dyt_widths)} x {list(scale.dyt_depths)} blocks, seq "
             f"{scale.seq_len}, batch {batch}, embedded corpus, {scale.steps} steps, "
             f"{scale.seeds} seeds; Pre-LN with DyT at every norm, alpha0 in {list(ALPHAS)} "
             f"(one value at every norm), against LayerNorm; Xavier init (unit-scale "
             f"embeddings), lr 1e-3, warmup "
             f"{max(1, scale.steps // 10)}")
    yield ("Zhu et al. 2025: DyT (tanh(alpha x) in place of the norm) matches LayerNorm's "
           "loss"), setup, judge_dyt_matches(numbers), {
        **{k: v for k, v in numbers.items() if k != "run_dirs"}, "figures": figures}
    yield ("Zhu et al. 2025 (Table 12): DyT's best alpha0 depends on the width, not the "
           "depth"), setup, judge_alpha_width(numbers), {
        "losses": numbers["losses"], "missing": numbers["missing"]}


CLAIMS = {1: _claim_1, 2: _claim_2, 3: _claim_3, 4: _claim_4, 5: _claim_5, 6: _claim_6,
          7: _claim_7, 8: _claim_8, 9: _claim_9, 10: _claim_10, 11: _claim_11, 12: _claim_12}


def run_claims(scale, out, only=None, echo=print):
    """Run the claims (all, or the numbers in `only`), write claims.md and claims.json."""
    results = []
    for number, claim in CLAIMS.items():
        if only and number not in only:
            continue
        for text, setup, verdict, numbers in claim(scale, out):
            results.append(Result(number, text, setup, verdict, numbers))
            echo(f"claim {number}: {verdict.verdict}: {verdict.figure}")
    os.makedirs(out, exist_ok=True)
    write_atomic(os.path.join(out, "claims.md"), markdown(results, scale))
    write_atomic(os.path.join(out, "claims.json"), json.dumps(
        [dataclasses.asdict(r) for r in results], indent=1, default=float) + "\n")
    return results


def markdown(results, scale):
    cell = lambda text: str(text).replace("|", "\\|")
    lines = [f"# Claims checked by normexp ({scale.name} scale)", "",
             "Each verdict is computed by the rule in its row from the figure measured in this "
             "run; the runs behind the training studies are in the subdirectories.", "",
             "| # | claim | setup | measured | verdict | rule |", "|---|---|---|---|---|---|"]
    for r in results:
        lines.append("| " + " | ".join(cell(c) for c in (
            r.number, r.claim, r.setup, r.verdict.figure, f"**{r.verdict.verdict}**",
            r.verdict.rule)) + " |")
    for r in results:
        for figure in r.numbers.get("figures", []):
            lines += ["", f"![claim {r.number}]({figure})"]
    return "\n".join(lines) + "\n"
