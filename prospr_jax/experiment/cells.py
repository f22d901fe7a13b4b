"""Cells of a run: one method at one sparsity with its options, identified by a digest.

A cell's id digests the configuration id (:attr:`prospr_jax.experiment.config.RunConfig.config_id`),
the method, its options and the sparsity: two runs compute the same cell exactly when the ids agree,
so a record or a checkpoint of one run can stand in for the other's.
"""

from __future__ import annotations

import dataclasses
import os
import re

from prospr_jax.experiment.config import DENSE, RunConfig, digest

CHECKPOINT_DIR = "checkpoints"
_CELL_DIR = re.compile(r"^.+-s[0-9.e+-]+-(?P<cell_id>[0-9a-f]{12})$")


@dataclasses.dataclass(frozen=True)
class Cell:
    """One method x sparsity cell.

    Attributes:
      method: a registered method name or ``'dense'``.
      sparsity: the sparsity of the prunable weights (0 for ``'dense'``).
      options: the method's options (``prospr_jax.methods.prune`` keyword arguments).
      granularity: ``'weight'`` (default) or ``'channel'`` (prune channel groups, then compact).
    """

    method: str
    sparsity: float
    options: dict
    granularity: str = "weight"

    @property
    def label(self) -> str:
        """The method and its options, e.g. ``prospr[num_steps=1]``."""
        suffix = "" if self.granularity == "weight" else f"@{self.granularity}"
        if not self.options:
            return self.method + suffix
        opts = ",".join(f"{k}={v}" for k, v in sorted(self.options.items()))
        return f"{self.method}[{opts}]{suffix}"

    @property
    def name(self) -> str:
        """``label s=sparsity``: how the runner's messages name the cell."""
        return f"{self.label} s={self.sparsity:g}"

    def cell_id(self, config_id: str) -> str:
        """The cell's id within configuration ``config_id``."""
        fields = {"config": config_id, "method": self.method, "options": self.options,
                  "sparsity": round(self.sparsity, 9)}
        if self.granularity != "weight":  # digested only when not the default: today's ids stay
            fields["granularity"] = self.granularity
        return digest(fields)

    def dirname(self, config_id: str) -> str:
        """The name of the cell's checkpoint directory (ends with its id)."""
        return f"{self.method}-s{self.sparsity:g}-{self.cell_id(config_id)}"


def cells_of(config: RunConfig) -> list[Cell]:
    """The run's cells: ``'dense'`` once at sparsity 0, every other method at every sparsity."""
    cells = []
    for method in config.methods:
        if method == DENSE:
            cells.append(Cell(DENSE, 0.0, {}))
            continue
        for s in config.sparsities:
            cells.append(Cell(method, float(s), dict(config.method_options.get(method, {})), config.granularity))
    return cells


def checkpoint_path(out: str, cell: Cell, config_id: str) -> str:
    """The checkpoint directory of ``cell`` in the run directory ``out``."""
    return os.path.join(out, CHECKPOINT_DIR, cell.dirname(config_id))


def checkpoint_dirs(out: str) -> dict[str, str]:
    """Cell id -> checkpoint directory, for every cell directory under ``out/checkpoints``."""
    root = os.path.join(out, CHECKPOINT_DIR)
    if not os.path.isdir(root):
        return {}
    found = {}
    for name in sorted(os.listdir(root)):
        match = _CELL_DIR.match(name)
        if match and os.path.isdir(os.path.join(root, name)):
            found[match["cell_id"]] = os.path.join(root, name)
    return found


__all__ = ["CHECKPOINT_DIR", "Cell", "checkpoint_dirs", "checkpoint_path", "cells_of"]
