import jax
import numpy as np
import pytest
from flax import nnx

from normexp import data as data_lib
from normexp.metrics import per_block
from normexp.step import init_state, loss_fn, make_train_step


def flat(tree):
    return {path: np.asarray(v[...], np.float64) for path, v in nnx.to_flat_state(tree)}


def one_step(cfg, **diagnostics):
    """(metrics of one train step at init, jax.grad of the loss computed outside it, params
    before and after the step), all as NumPy; block parameters are split per block."""
    corpus = data_lib.load_corpus("", 0, cfg.data.seq_len)
    graphdef, tx, state = init_state(cfg, corpus.vocab_size)
    x, y = data_lib.batch(corpus.train, seed=0, step=0, batch_size=4, seq_len=16)

    def loss_of(params):
        return loss_fn(nnx.merge(graphdef, params, state["rest"])(x), y)

    grads = per_block_leaves(jax.grad(loss_of)(state["params"]))
    before = per_block_leaves(state["params"])
    new_state, metrics = make_train_step(graphdef, tx, grad_norms=True, **diagnostics)(state, x, y)
    return per_block(jax.device_get(metrics)), grads, before, per_block_leaves(new_state["params"])


def per_block_leaves(tree):
    """{path: array}, with each stacked block parameter split into ('blocks', i, ...) paths."""
    out = {}
    for path, v in nnx.to_flat_state(tree):
        value = np.asarray(v[...], np.float64)
        if path[0] == "blocks":
            for i, block_value in enumerate(value):
                out[("blocks", i, *path[1:])] = block_value
        else:
            out[path] = value
    return out


def test_per_layer_grad_norms_equal_norms_of_jax_grad(tiny):
    # A tiny clip_norm: the logged norms must be the raw ones, taken before clipping.
    cfg = tiny("optim.clip_norm=0.01", "model.n_layer=3", "optim.warmup_steps=0")
    metrics, grads, before, after = one_step(cfg)

    def norm(tree, keep):
        return np.sqrt(sum(np.sum(v ** 2) for path, v in tree.items() if keep(path)))

    expected = {"grad_norm": norm(grads, lambda p: True),
                "grad_norm/tok_embed": norm(grads, lambda p: p[0] == "tok_embed"),
                "grad_norm/pos_embed": norm(grads, lambda p: p[0] == "pos_embed"),
                "grad_norm/final_norm": norm(grads, lambda p: p[0] == "final_norm")}
    update = {path: after[path] - before[path] for path in before}
    for i in range(3):
        in_block = lambda p, i=i: p[:2] == ("blocks", i)
        expected[f"grad_norm/block_{i:02d}"] = norm(grads, in_block)
        expected[f"grad_norm/block_{i:02d}/attn"] = norm(grads, lambda p: in_block(p) and p[2] == "attn")
        expected[f"grad_norm/block_{i:02d}/mlp"] = norm(grads, lambda p: in_block(p) and p[2] == "mlp")
        expected[f"grad_norm/block_{i:02d}/norm"] = norm(
            grads, lambda p: in_block(p) and p[2] in ("attn_norms", "mlp_norms"))
        expected[f"param_norm/block_{i:02d}"] = norm(before, in_block)
        expected[f"update_ratio/block_{i:02d}"] = norm(update, in_block) / norm(before, in_block)
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value, rel=2e-4), key
    assert expected["grad_norm"] > 0.5  # far above the clip, so clipping would have shown
    assert set(k for k in metrics if k.startswith("grad_norm/block_")) == \
        set(k for k in expected if k.startswith("grad_norm/block_"))
    # one norm per block, not one for the whole stack
    assert len({round(metrics[f"grad_norm/block_{i:02d}"], 6) for i in range(3)}) == 3


@pytest.mark.parametrize("placement", ["pre", "post"])
def test_every_way_of_applying_the_blocks_gives_the_same_gradients(tiny, placement):
    """Scanned (unrolled by default at 3 blocks, or one block per iteration), Python loop,
    remat, and autodiff instead of the custom backward passes: rel 1e-4 on every per-block
    norm, 1e-5 abs / 1e-4 rel on each gradient entry (float32 summation order only)."""
    base = [f"model.placement={placement}", "model.n_layer=3", "optim.warmup_steps=0"]
    scanned, grads, _, _ = one_step(tiny(*base))
    for variant in (["model.scan=false"], ["model.scan_unroll=1"], ["train.remat=true"],
                    ["train.remat=true", "train.remat_policy=dots", "model.scan=false"],
                    ["model.custom_grads=false"]):
        other, other_grads, _, _ = one_step(tiny(*base, *variant))
        assert other.keys() == scanned.keys()
        for key in scanned:
            assert other[key] == pytest.approx(scanned[key], rel=1e-4, abs=1e-7), (variant, key)
        for path in grads:
            np.testing.assert_allclose(other_grads[path], grads[path], atol=1e-5, rtol=1e-4)


def test_remat_reduces_memory_in_a_real_loop(tiny):
    def temp_bytes(*overrides):
        cfg = tiny("model.n_layer=6", "data.seq_len=64", "model.d_model=64", *overrides)
        graphdef, tx, state = init_state(cfg, 256)
        x = np.zeros((4, 64), np.int32)
        step = make_train_step(graphdef, tx, grad_norms=True).lower(state, x, x).compile()
        return step.memory_analysis().temp_size_in_bytes

    assert temp_bytes("train.remat=true") < 0.6 * temp_bytes("model.scan_unroll=1")


def initial_logits(cfg):
    """The output logits of the fresh model on one_step's batch, and their log Z, float64."""
    corpus = data_lib.load_corpus("", 0, cfg.data.seq_len)
    graphdef, _, state = init_state(cfg, corpus.vocab_size)
    x, _ = data_lib.batch(corpus.train, seed=0, step=0, batch_size=4, seq_len=16)
    logits = np.asarray(nnx.merge(graphdef, state["params"], state["rest"])(x), np.float64)
    top = logits.max(-1, keepdims=True)
    return logits, (top + np.log(np.exp(logits - top).sum(-1, keepdims=True)))[:, 0]


def test_diagnostics_equal_their_formulas_and_leave_the_update_unchanged(tiny):
    """logits/* from the output logits, grad_rms/* from jax.grad outside the step, in float64;
    the update is the same bit for bit with the diagnostics on."""
    cfg = tiny("model.n_layer=3", "optim.warmup_steps=0")
    plain, _, _, after_plain = one_step(cfg)
    metrics, grads, before, after = one_step(cfg, attention=True, log=(5, 100))
    for path in after:
        np.testing.assert_array_equal(after[path], after_plain[path])
    logits, lse = initial_logits(cfg)
    assert metrics["logits/lse_mean"] == pytest.approx(lse.mean(), rel=1e-5)
    assert metrics["logits/max"] == pytest.approx(logits.max(), rel=1e-5)
    for i in range(3):
        block = np.concatenate([v.ravel() for p, v in grads.items() if p[:2] == ("blocks", i)])
        assert metrics[f"grad_rms/block_{i:02d}"] == pytest.approx(
            np.sqrt(np.mean(block ** 2)), rel=1e-4)
    every = np.concatenate([v.ravel() for v in grads.values()])
    assert metrics["grad_rms"] == pytest.approx(np.sqrt(np.mean(every ** 2)), rel=1e-4)
    assert metrics["attn/block_02/logit_max"] != 0 and metrics["act/block_01/massive"] > 1
    assert set(metrics) - set(plain) == {k for k in metrics if k.startswith(
        ("attn/", "act/", "logits/", "grad_rms"))}


def test_diagnostics_are_zero_off_log_steps(tiny):
    cfg = tiny("model.n_layer=2")
    corpus = data_lib.load_corpus("", 0, cfg.data.seq_len)
    graphdef, tx, state = init_state(cfg, corpus.vocab_size)
    step = make_train_step(graphdef, tx, grad_norms=False, attention=True, log=(2, 5))
    for s in range(5):
        x, y = data_lib.batch(corpus.train, seed=0, step=s, batch_size=4, seq_len=16)
        state, metrics = step(state, x, y)
        diagnostics = {k: np.asarray(v) for k, v in metrics.items()
                       if k.startswith(("attn/", "act/", "logits/", "grad_rms"))}
        assert len(diagnostics) == 12  # 7 attention, massive, 2 logits, 2 grad_rms
        logged = s in (0, 2, 4)
        assert all((np.abs(v) > 0).all() == logged for v in diagnostics.values()), s


def test_z_loss_adds_its_formula_and_changes_the_update(tiny):
    cfg = tiny("optim.warmup_steps=0")
    corpus = data_lib.load_corpus("", 0, cfg.data.seq_len)
    graphdef, tx, state = init_state(cfg, corpus.vocab_size)
    x, y = data_lib.batch(corpus.train, seed=0, step=0, batch_size=4, seq_len=16)
    _, lse = initial_logits(cfg)
    plain_state, plain = make_train_step(graphdef, tx, grad_norms=False)(
        jax.tree.map(np.copy, state), x, y)
    new_state, metrics = make_train_step(graphdef, tx, grad_norms=False, z_loss=0.5)(state, x, y)
    assert float(metrics["z_loss"]) == pytest.approx(0.5 * np.mean(lse ** 2), rel=1e-5)
    assert float(metrics["loss"]) == float(plain["loss"])  # `loss` stays the cross entropy
    assert "z_loss" not in plain
    changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(plain_state["params"]),
                                                         jax.tree.leaves(new_state["params"]))]
    assert any(changed)


def test_per_layer_statistics_only_at_log_steps_and_the_update_unchanged(tiny):
    """grad_norm/<layer>, param_norm and update_ratio are computed at log steps only; the state
    is bit for bit the one without them; the loss and global grad_norm are every step's."""
    cfg = tiny("model.n_layer=2", "optim.warmup_steps=0")  # a non-zero update at step 0
    corpus = data_lib.load_corpus("", 0, cfg.data.seq_len)
    graphdef, tx, state = init_state(cfg, corpus.vocab_size)
    logged = make_train_step(graphdef, tx, grad_norms=True, log=(3, 7))
    plain = make_train_step(graphdef, tx, grad_norms=False, log=(3, 7))
    other = jax.tree.map(np.copy, state)
    for s in range(7):
        x, y = data_lib.batch(corpus.train, seed=0, step=s, batch_size=4, seq_len=16)
        state, metrics = logged(state, x, y)
        other, reference = plain(other, x, y)
        for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(other)):
            np.testing.assert_array_equal(a, b)
        stats = {k: np.asarray(v) for k, v in metrics.items()
                 if k.startswith(("grad_norm/", "param_norm", "update_ratio"))}
        assert len(stats) > 10 and set(metrics) - set(stats) == set(reference)
        assert all((v > 0).all() == (s in (0, 3, 6)) for v in stats.values()), s
        assert float(metrics["grad_norm"]) == float(reference["grad_norm"]) > 0
