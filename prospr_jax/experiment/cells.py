"""Cells of a run: one method at one sparsity with its options, identified by a digest.

A cell's id digests the configuration id (:attr:`prospr_jax.experiment.config.RunConfig.config_id`),
the method, its options and the sparsity: two runs compute the same cell exactly when the ids agree,
so a record or a checkpoint of one run can stand in for the other's. The seed (``--seeds``) and the
ablation (``--ablations``) enter the id only when they differ from their defaults (the
configuration's seed; no ablation), so a cell of a single-seed run keeps its id in a multi-seed run.
"""

from __future__ import annotations

import dataclasses
import os
import re

from typing import Optional

from prospr_jax.experiment.ablations import applies
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
      seed: the seed of theta_0, data order and random pruning; ``None``: the configuration's seed.
      ablation: ``None``, or the sanity-check ablation applied to the method's mask (``'shuffle'``,
        ``'reinit'``, ``'invert'``; see :mod:`prospr_jax.experiment.ablations`).
      prune_at: when the mask is scored: ``'init'`` (default), ``'step:K'`` or ``'end'``
        (:mod:`prospr_jax.experiment.paradigms`).
      after: what training starts from after pruning: ``'rewind'`` (default), ``'finetune'`` or ``'reinit'``.
    """

    method: str
    sparsity: float
    options: dict
    seed: Optional[int] = None
    ablation: Optional[str] = None
    prune_at: str = "init"
    after: str = "rewind"

    @property
    def label(self) -> str:
        """The method, its options, its paradigm when not the default and the ablation, e.g.
        ``prospr[num_steps=1]``, ``magnitude@end+finetune`` or ``snip (shuffle)``; the seed is not part
        of it (the table groups a label's seeds)."""
        label = self.method
        if self.options:
            label += "[" + ",".join(f"{k}={v}" for k, v in sorted(self.options.items())) + "]"
        if self.prune_at != "init":
            label += f"@{self.prune_at}"
        if self.after != "rewind":
            label += f"+{self.after}"
        return label if self.ablation is None else f"{label} ({self.ablation})"

    @property
    def name(self) -> str:
        """``label s=sparsity`` (and ``seed=N`` when set): how the runner's messages name the cell."""
        seed = "" if self.seed is None else f" seed={self.seed}"
        return f"{self.label} s={self.sparsity:g}{seed}"

    def run_seed(self, config_seed: int) -> int:
        """The seed the cell runs with in a configuration of seed ``config_seed``."""
        return config_seed if self.seed is None else self.seed

    def cell_id(self, config_id: str) -> str:
        """The cell's id within configuration ``config_id``."""
        fields = {"config": config_id, "method": self.method, "options": self.options,
                  "sparsity": round(self.sparsity, 9)}
        # Fields digested only when they differ from their default: today's cells keep their ids.
        for name, default in (("seed", None), ("ablation", None), ("prune_at", "init"), ("after", "rewind")):
            if getattr(self, name) != default:
                fields[name] = getattr(self, name)
        return digest(fields)

    def dirname(self, config_id: str) -> str:
        """The name of the cell's checkpoint directory (ends with its id)."""
        tags = "".join(f"-{t}" for t in (self.ablation, None if self.seed is None else f"seed{self.seed}") if t)
        return f"{self.method}{tags}-s{self.sparsity:g}-{self.cell_id(config_id)}"


def cells_of(config: RunConfig) -> list[Cell]:
    """The run's cells, for every seed of ``config.cell_seeds`` in turn: ``'dense'`` once at sparsity 0,
    every other method at every sparsity, each followed by its ablation cells (``--ablations``;
    ``invert`` only for single-shot score methods). A method's cells of one seed are consecutive, so
    its scores are computed once and reused (:class:`prospr_jax.experiment.pruning.ScoreCache`)."""
    cells = []
    for run_seed in config.cell_seeds:
        seed = None if run_seed == config.seed else run_seed
        for method in config.methods:
            if method == DENSE:
                cells.append(Cell(DENSE, 0.0, {}, seed))
                continue
            options = dict(config.method_options.get(method, {}))
            for s in config.sparsities:
                paradigm = dict(prune_at=config.prune_at, after=config.after)
                cells.append(Cell(method, float(s), options, seed, **paradigm))
                cells += [Cell(method, float(s), options, seed, a, **paradigm)
                          for a in config.ablations if applies(a, method)]
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
