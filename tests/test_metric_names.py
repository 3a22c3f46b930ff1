"""Metric names are built and read by one scheme, and one cadence rule decides when."""

import jax
import jax.numpy as jnp

from normexp.metric_names import block_metric, due, family, parse_metric


def test_metric_names_are_built_and_parsed_by_one_scheme():
    name = family("grad_norm", "attn")
    assert name == "grad_norm/block/attn" and family("act") == "act/block"
    assert block_metric(name, 3) == "grad_norm/block_03/attn"
    assert block_metric("grad_norm/block", 12) == "grad_norm/block_12"
    for kind, index in [(name, 3), ("grad_norm/block", 12), ("act/block/kurtosis", 0)]:
        assert parse_metric(block_metric(kind, index)) == (kind, index)
    assert parse_metric("grad_norm/tok_embed") == ("grad_norm/tok_embed", None)
    assert parse_metric("val_loss") == ("val_loss", None)


def test_one_cadence_rule_fires_at_multiples_and_at_the_last_step():
    assert [s for s in range(10) if due(s, 4, 9)] == [0, 4, 8, 9]
    assert [s for s in range(10) if due(s, 20, 9)] == [0, 9]
    traced = jax.jit(due, static_argnums=(1, 2))  # the same rule inside the jitted step
    assert [s for s in range(10) if bool(traced(jnp.int32(s), 4, 9))] == [0, 4, 8, 9]


def test_the_names_module_imports_no_jax():
    """Whatever reads runs names metrics without importing the model (or JAX)."""
    import subprocess
    import sys
    code = ("import sys, normexp.metric_names; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'flax')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
