"""Checkpoints of training runs with orbax: atomic, several named pytrees plus JSON metadata.

A checkpoint directory holds numbered steps (e.g. one per finished epoch). Each step stores named
pytree items (``'state'``: params, BatchNorm statistics, optimiser state with its masks, step
counter, PRNG key; ``'masks'``: the mask pytree ...) and one JSON document (epoch, metrics history,
the pruning info ...). orbax writes a step into a temporary directory and renames it when complete,
so a process killed mid-write leaves the previous steps intact; only the newest ``keep`` steps are
kept.

Example::

    ckpt = Checkpointer(os.path.join(out, "checkpoints", "snip-0.9"))
    ckpt.save(epoch, {"state": state, "masks": masks}, {"epoch": epoch})
    ...
    step = ckpt.latest_step()                              # None when there is nothing to resume
    masks, = ckpt.restore(step, {"masks": None})[0].values()          # as saved (nested dicts)
    items, meta = ckpt.restore(step, {"state": state_like})           # into the target's structure
"""

from __future__ import annotations

import logging
import os
import shutil
from typing import Any, Mapping, Optional

import jax
import numpy as np
from jax.experimental import multihost_utils

from prospr_jax._src.tree import PyTree
from prospr_jax._src.validate import check_int

META = "meta"


def _orbax():
    # orbax logs every save at INFO/WARNING level through absl; keep the caller's output readable.
    logging.getLogger("absl").setLevel(logging.ERROR)
    import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel

    return ocp


class Checkpointer:
    """Numbered, atomically written checkpoints in one directory.

    Args:
      directory: where the steps are written (created on the first save). Relative paths are made
        absolute (orbax needs absolute paths).
      keep: how many of the newest steps to keep (>= 1; 2 by default, so a corrupt newest step can
        never be the only one).
    """

    def __init__(self, directory: str | os.PathLike, *, keep: int = 2):
        keep = check_int(keep, "keep", low=1)
        self.directory = os.path.abspath(os.fspath(directory))
        if os.path.exists(self.directory) and not os.path.isdir(self.directory):
            raise ValueError(f"checkpoint `directory` {self.directory!r} exists and is not a directory")
        self.keep = keep
        self._manager = None

    def _mgr(self):
        if self._manager is None:
            ocp = _orbax()
            options = ocp.CheckpointManagerOptions(
                max_to_keep=self.keep, create=True, enable_async_checkpointing=False, cleanup_tmp_directories=True
            )
            self._manager = ocp.CheckpointManager(self.directory, options=options)
        return self._manager

    def all_steps(self) -> tuple[int, ...]:
        """The completed steps on disk, ascending (empty if the directory does not exist)."""
        if not os.path.isdir(self.directory):
            return ()
        return tuple(sorted(self._mgr().all_steps(read=True)))

    def latest_step(self) -> Optional[int]:
        """The newest completed step, or ``None``."""
        steps = self.all_steps()
        return steps[-1] if steps else None

    def save(self, step: int, items: Mapping[str, PyTree], meta: Mapping[str, Any]) -> None:
        """Write ``items`` (name -> pytree of arrays) and ``meta`` (JSON-serialisable) as ``step``.

        Blocks until the step is complete on disk. An existing ``step`` is replaced.
        """
        step = check_int(step, "step", low=0)
        if META in items:
            raise ValueError(f"item name {META!r} is reserved for the metadata")
        ocp = _orbax()
        mgr = self._mgr()
        if int(step) in mgr.all_steps():
            mgr.delete(int(step))
        args = {name: ocp.args.StandardSave(jax.device_get(tree)) for name, tree in items.items()}
        args[META] = ocp.args.JsonSave(dict(meta))
        mgr.save(int(step), args=ocp.args.Composite(**args), force=True)
        mgr.wait_until_finished()

    def restore(
        self, step: Optional[int], targets: Mapping[str, Optional[PyTree]]
    ) -> tuple[dict[str, PyTree], dict]:
        """Read the named items and the metadata of ``step`` (``None``: the latest).

        Args:
          step: the step to read, or ``None`` for the newest.
          targets: item name -> a pytree with the saved structure (arrays or ``ShapeDtypeStruct``
            leaves; the result takes its structure, e.g. NamedTuples), or ``None`` to read the item
            as saved (nested dicts / lists of numpy arrays).

        Returns:
          ``(items, meta)``.

        Raises:
          FileNotFoundError: no completed step to read.
        """
        ocp = _orbax()
        if step is None:
            step = self.latest_step()
        if step is None or step not in self.all_steps():
            raise FileNotFoundError(f"no checkpoint step {step!r} in {self.directory!r}")
        args = {}
        for name, target in targets.items():
            if target is None:
                args[name] = ocp.args.StandardRestore()
            else:
                abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, target)
                args[name] = ocp.args.StandardRestore(abstract)
        args[META] = ocp.args.JsonRestore()
        restored = self._mgr().restore(int(step), args=ocp.args.Composite(**args))
        items = {name: restored[name] for name in targets}
        return items, dict(restored[META])

    def delete_all(self) -> None:
        """Remove the directory and every step in it (with several processes: process 0 removes it and
        every process waits for that)."""
        self.close()
        if jax.process_index() == 0 and os.path.isdir(self.directory):
            shutil.rmtree(self.directory)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"prospr_jax.checkpoint: deleted {self.directory}")

    def close(self) -> None:
        if self._manager is not None:
            self._manager.close()
            self._manager = None

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


__all__ = ["Checkpointer"]
