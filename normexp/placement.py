"""Where the norm sits around a sublayer F (attention or MLP), one function per placement.

Each rule takes the residual stream x, the sublayer f, its norm n and the block's `Depth`, and
reads like the equation in its paper; `model.placement` picks one from `PLACEMENTS` by name.
Inside the scan over blocks `depth.index` is a traced integer, so a rule that differs per block
(a depth-dependent scale, post in the first blocks and pre in the rest) is written with
`jnp.where` / `lax.cond` on it rather than with Python control flow.
"""

from typing import NamedTuple

import jax


class Depth(NamedTuple):
    """Where a block sits: `index` (0-based; a traced int32 inside the scan) of `count`."""
    index: jax.Array
    count: int


def post(x, f, n, depth):
    """Post-Norm (Vaswani et al. 2017): x = N(x + F(x))."""
    return n(x + f(x))


def pre(x, f, n, depth):
    """Pre-Norm (GPT-2; Xiong et al. 2020): x = x + F(N(x))."""
    return x + f(n(x))


PLACEMENTS = {
    "post": post,
    "pre": pre,
}
