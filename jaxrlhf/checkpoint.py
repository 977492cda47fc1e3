"""Orbax checkpoints holding everything a resume needs.

One `CheckpointManager` per stage directory (`<workdir>/checkpoints`). Each checkpoint has
two items:
  state  the train state pytree (params, optimizer state, step, rng, and for PPO the KL
         controller and running reward statistics), restored onto any mesh by passing the
         target shardings;
  meta   a small JSON dict (data-iterator positions, stage bookkeeping).

Saves are atomic: orbax writes into a temporary directory and renames it when complete, so a
process killed half-way through a save leaves the previous checkpoint as the latest usable one.

Resume order (documented for every stage): the latest checkpoint in the stage directory,
else `init_from`, else a fresh initialisation.
"""
from __future__ import annotations

from typing import Any, Optional

import jax
import orbax.checkpoint as ocp

from jaxrlhf import paths


def abstract_like(tree, shardings=None):
    """ShapeDtypeStructs (with target shardings when given) describing `tree`."""
    if shardings is None:
        return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shardings)


class Checkpointer:
    """Thin wrapper over `ocp.CheckpointManager` with the save/restore jaxrlhf needs."""

    def __init__(self, directory: str, *, max_to_keep: int = 3, save_every: int = 0):
        self.directory = paths.absolute(directory)   # a local path or a gs:// URL
        self.save_every = save_every
        self._mngr = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
        )

    def latest_step(self) -> Optional[int]:
        return self._mngr.latest_step()

    def all_steps(self):
        return list(self._mngr.all_steps())

    def should_save(self, step: int) -> bool:
        return bool(self.save_every) and step % self.save_every == 0

    def save(self, step: int, state: Any, meta: Optional[dict] = None) -> None:
        """Saves synchronously-complete (waits), so a following kill cannot corrupt it."""
        if step in self._mngr.all_steps():
            return
        self._mngr.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            meta=ocp.args.JsonSave(meta or {})))
        self._mngr.wait_until_finished()

    def restore(self, abstract_state: Any, step: Optional[int] = None):
        """Returns (state, meta) of `step` (default: latest) laid out like `abstract_state`
        (a pytree of ShapeDtypeStructs, possibly with shardings of a different mesh)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"No checkpoint in {self.directory}.")
        out = self._mngr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            meta=ocp.args.JsonRestore()))
        return out.state, dict(out.meta or {})

    def restore_raw(self, step: Optional[int] = None):
        """(state, meta) as saved, without a target layout (NamedTuples come back as dicts,
        arrays on the default device). For inspection and tools."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"No checkpoint in {self.directory}.")
        out = self._mngr.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
        return out.state, dict(out.meta or {})

    def close(self) -> None:
        self._mngr.wait_until_finished()
        self._mngr.close()
