"""Orbax checkpoints of the whole train state: every N steps, at the end and on interrupt."""

import os

import jax
import orbax.checkpoint as ocp
from absl import logging as absl_logging

absl_logging.set_verbosity(absl_logging.ERROR)  # orbax narrates every save at INFO


class Checkpoints:
    """The last `keep` checkpoints of a run under `directory`, written atomically by orbax."""

    def __init__(self, directory, keep):
        # Synchronous saves: the train step donates its state buffers, and an interrupted run
        # must have its checkpoint on disk before the process exits.
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=False)
        self.manager = ocp.CheckpointManager(os.path.abspath(directory), options=options)

    def latest_step(self):
        return self.manager.latest_step()

    def all_steps(self):
        return list(self.manager.all_steps())

    def save(self, step, state):
        if step in self.manager.all_steps():
            return
        self.manager.save(step, args=ocp.args.StandardSave(state))

    def restore(self, step, like):
        """The state saved at `step`, with the structure, shapes and dtypes of `like`."""
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        return self.manager.restore(step, args=ocp.args.StandardRestore(target))

    def close(self):
        self.manager.close()
