"""Where the norm sits around a sublayer F (attention or MLP), one function per placement.

Each rule takes the residual stream x, the sublayer f and its norm n, and reads like the
equation in its paper; `model.placement` picks one from `PLACEMENTS` by name.
"""


def post(x, f, n):
    """Post-Norm (Vaswani et al. 2017): x = N(x + F(x))."""
    return n(x + f(x))


def pre(x, f, n):
    """Pre-Norm (GPT-2; Xiong et al. 2020): x = x + F(N(x))."""
    return x + f(n(x))


PLACEMENTS = {
    "post": post,
    "pre": pre,
}
