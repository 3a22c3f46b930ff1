"""Data parallelism with `jax.sharding`: a 1-D mesh over every device, the batch split on it,
the train state replicated.

jit partitions the one-device program by the shardings of its inputs, so the arithmetic is the
one-device run's (the gradient all-reduce is inserted by XLA) and batch-statistics norms still
pool over the whole global batch. With several hosts (`jax.distributed.initialize()`, see the
README) the mesh spans every process's devices; each process computes the same global batch
from (seed, step) and hands over the rows its own devices hold.
"""

import os

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from normexp.errors import UsageError

AXIS = "data"


def initialize_distributed():
    """Join a multi-host job when its launcher says so (NORMEXP_DISTRIBUTED=1).

    jax.distributed.initialize() reads the coordinator, process count and id from SLURM, Open
    MPI, TPU pods, or JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID.
    """
    if os.environ.get("NORMEXP_DISTRIBUTED", "") not in ("", "0"):
        jax.distributed.initialize()


def is_primary():
    """The process that writes logs, summaries and tables (orbax coordinates checkpoints)."""
    return jax.process_index() == 0


class Devices:
    """Where the state and the batches live: one device, or a data-parallel mesh.

    `batch_axis` is the axis of a batch array that holds its sequences (1 when a vectorized
    group stacks its members' batches in front).
    """

    def __init__(self, mode, batch_size, *, batch_axis=0):
        count = jax.device_count()
        self.mesh = None
        if mode == "auto" and count > 1:
            if batch_size % count:
                raise UsageError(f"train.batch_size: {batch_size} sequences do not split evenly "
                                 f"over {count} devices (train.data_parallel=auto); use a "
                                 f"multiple of {count} or train.data_parallel=off")
            # Auto axes: XLA propagates the batch sharding through the unchanged model code
            self.mesh = jax.make_mesh((count,), (AXIS,), axis_types=(AxisType.Auto,))
        self.count = count if self.mesh is not None else 1
        spec = [None] * batch_axis + [AXIS]
        self._batch = self.mesh and NamedSharding(self.mesh, PartitionSpec(*spec))
        self._replicated = self.mesh and NamedSharding(self.mesh, PartitionSpec())

    def batch(self, arrays):
        """Host arrays -> device arrays, split over the mesh along the batch axis."""
        if self.mesh is None:
            return jax.device_put(arrays)
        return jax.tree.map(lambda a: jax.make_array_from_callback(
            a.shape, self._batch, lambda index: a[index]), arrays)

    def state(self, tree):
        """The train state, replicated on every device of the mesh."""
        if self.mesh is None:
            return tree
        return jax.device_put(jax.tree.map(np.asarray, tree), self._replicated)
