"""Data parallelism with `jax.sharding`: a 1-D mesh over every device, the batch split on it,
the train state replicated.

jit partitions the one-device program by the shardings of its inputs, so the arithmetic is the
one-device run's (the gradient all-reduce is inserted by XLA) and batch-statistics norms still
pool over the whole global batch. With several hosts (`jax.distributed.initialize()`, see the
README) the mesh spans every process's devices; each process computes the same global batch
from (seed, step) and hands over the rows its own devices hold.
"""

import os
import re
import sys

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from normexp.errors import EXIT_LOST, UsageError

AXIS = "data"


ENV = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def initialize_distributed():
    """Join a multi-host job when its launcher says so (NORMEXP_DISTRIBUTED=1).

    With JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID set, they define the
    job (jax reads only the address from the environment itself); with none of them, jax
    detects SLURM, Open MPI or a TPU pod.
    """
    if os.environ.get("NORMEXP_DISTRIBUTED", "") in ("", "0"):
        return
    given = {name: os.environ.get(name, "") for name in ENV}
    if not any(given.values()):
        try:
            jax.distributed.initialize()
        except (ValueError, RuntimeError) as e:
            raise UsageError(f"NORMEXP_DISTRIBUTED=1: no cluster found ({str(e).splitlines()[0]})"
                             f"; set {', '.join(ENV)}") from None
        return
    missing = [name for name, value in given.items() if not value]
    if missing:
        raise UsageError(f"{', '.join(missing)}: not set (NORMEXP_DISTRIBUTED=1 needs all of "
                         f"{', '.join(ENV)}, or none of them to let jax detect the cluster)")
    address = given["JAX_COORDINATOR_ADDRESS"]
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"JAX_COORDINATOR_ADDRESS: expected host:port (process 0's address "
                         f"and a free port), got {address!r}")
    count, index = _env_int("JAX_NUM_PROCESSES", given, 1), _env_int("JAX_PROCESS_ID", given, 0)
    if index >= count:
        raise UsageError(f"JAX_PROCESS_ID: must be below JAX_NUM_PROCESSES={count}, got {index}")
    jax.distributed.initialize(address, num_processes=count, process_id=index)


# A process of the job that dies takes its end of every collective with it: the next one fails
# in the others at once (Gloo: "UNKNOWN: Gloo AllGather failed: ... Connection closed by
# peer"). The survivors record the run and end (normexp.train), before jax's coordination
# service, which notices the loss only when heartbeats stop (100 s), aborts them. Process 0
# hosts that service: when it is the one lost, the others are aborted at once, and the run's
# record says `running` with no live process holding its lock, which every reader takes as
# stopped. A runtime status alone is not enough: a failed write (tensorstore) or a compiler
# error has one too, and must fail the run, so the message must also name a lost peer.
_LOST_STATUS = re.compile(r"(UNKNOWN|UNAVAILABLE|INTERNAL|ABORTED|CANCELLED|DEADLINE_EXCEEDED"
                          r"|FAILED_PRECONDITION): ")
_LOST_PEER = re.compile(r"closed by peer|reset by peer|socket closed|broken pipe|heartbeat"
                        r"|remote process|coordination service", re.IGNORECASE)


def lost_peer(error):
    """Whether `error`, raised by jax in a job of several processes, is a collective or the
    coordination service failing because another process of the job has gone (Gloo raises
    ValueError, the runtime JaxRuntimeError)."""
    text = str(error)
    return (jax.process_count() > 1 and isinstance(error, (jax.errors.JaxRuntimeError,
                                                           ValueError))
            and _LOST_STATUS.match(text) is not None and _LOST_PEER.search(text) is not None)


def lost_message(error, step, checkpoint):
    """The one line a surviving process ends with."""
    cause = str(error).strip().splitlines()[0]
    where = f"its last checkpoint is step {checkpoint}" if checkpoint else "no checkpoint yet"
    return (f"process {jax.process_index()}: this {jax.process_count()}-process job lost a "
            f"process at step {step} ({cause}); the run is interrupted ({where}): relaunch "
            f"the whole job with --resume")


def abandon_job(line):
    """End this process at once (exit 69) with `line` on stderr, its runs already recorded:
    jax's exit handler would wait at a shutdown barrier for the lost process, then abort."""
    sys.stdout.flush()
    print(line, file=sys.stderr, flush=True)
    os._exit(EXIT_LOST)


def _env_int(name, given, least):
    value = given[name]
    if not value.strip().isdigit() or int(value) < least:
        raise UsageError(f"{name}: expected an integer >= {least}, got {value!r}")
    return int(value)


def is_primary():
    """The process that writes logs, summaries and tables (orbax coordinates checkpoints)."""
    return jax.process_index() == 0


def barrier(name):
    """Wait until every process of the job gets here (nothing to wait for in one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


class Devices:
    """Where the state and the batches live: one device, or a data-parallel mesh.

    `batch_axis` is the axis of a batch array that holds its sequences (1 when a vectorized
    group stacks its members' batches in front); `count`: how many of the devices to use
    (default all).
    """

    def __init__(self, mode, batch_size, *, batch_axis=0, count=None):
        count = count or jax.device_count()
        self.mesh = None
        if mode == "auto" and count > 1:
            if batch_size % count:
                raise UsageError(f"train.batch_size: {batch_size} sequences do not split evenly "
                                 f"over {count} devices (train.data_parallel=auto); use a "
                                 f"multiple of {count} or train.data_parallel=off")
            # Auto axes: XLA propagates the batch sharding through the unchanged model code
            self.mesh = jax.make_mesh((count,), (AXIS,), axis_types=(AxisType.Auto,),
                                      devices=jax.devices()[:count])
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
