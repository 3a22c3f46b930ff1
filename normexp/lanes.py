"""How the runs a loop trains together are laid out: `Single` (one run, its own arrays) or
`Group` (a vectorized group: every leaf has a leading run axis). How states stack, how batches
join and how fetched values split per run is all that differs between the two; the training
loop (normexp.train) never asks which it has.
"""

import jax
import jax.numpy as jnp
import numpy as np


class Single:
    """One run: states, batches and fetched values are the run's own."""
    vectorized = False

    def stack(self, trees):
        return trees[0]

    def join(self, pairs):  # one (inputs, targets) per run -> the step's arguments
        return pairs[0]

    def row(self, tree, i):
        return tree

    def rows(self, tree):  # fetched host values -> one tree per run
        return [tree]


_take = jax.jit(lambda tree, i: jax.tree.map(lambda leaf: leaf[i], tree))


class Group:
    """Several runs: every leaf has a leading run axis."""
    vectorized = True

    def __init__(self, count):
        self.count = count

    def stack(self, trees):
        return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)

    def join(self, pairs):
        return tuple(np.stack(x) for x in zip(*pairs))

    def row(self, tree, i):
        if any(isinstance(leaf, jax.Array) for leaf in jax.tree.leaves(tree)):
            return _take(tree, i)  # one dispatch, not one per leaf (checkpoints of 21 runs)
        return jax.tree.map(lambda leaf: leaf[i], tree)

    def rows(self, tree):
        return [self.row(tree, i) for i in range(self.count)]
