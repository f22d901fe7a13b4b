"""Prune at initialisation, train the sparse network, compare methods: the project's main job.

    python -m experiments.prune_train                      # offline demo (preset 'demo', digits)
    python -m experiments.prune_train --preset prospr-resnet20-cifar10 --dataset ../shared/data/cifar10-jpeg.tar.gz
    python -m experiments.prune_train --methods prospr snip grasp --sparsities 0.9 0.98 --epochs 20 --out runs/x
    python -m experiments.prune_train --out runs/x --resume      # continue an interrupted run

(also ``prospr-prune-train`` and ``python -m prospr_jax.experiment``). For every method x sparsity
cell: initialise the model (theta_0, the same for every cell of a seed), build a
:class:`prospr_jax.PruningProblem` whose batches come from the training pipeline (without
augmentation unless ``--prune-augment``), prune (timed), train from theta_0 under the mask with the
recipe (pruned weights exactly zero throughout), evaluate on the test split. ``dense`` is a
pseudo-method: the unpruned network (sparsity 0), the reference line.

Outputs in ``--out`` (default ``runs/<preset>``):

* ``results.jsonl``: one strict JSON record per finished cell, appended (never truncated);
* ``results.md``: the table method x sparsity -> final test accuracy, with kept weights and timings;
* ``accuracy.png``: final test top-1 vs sparsity, one line per method;
* ``run.json``: the resolved configuration of the latest run started there (``--resume`` reloads it);
* ``checkpoints/<cell>/``: orbax checkpoints written at the end of every epoch of the running cell
  (removed when the cell is finished unless ``--keep-checkpoints``);
* ``.lock``: the lock that keeps a second run out while one runs.

``--seeds 0 1 2`` runs every cell once per seed (the table: mean ± std); ``--ablations shuffle reinit
invert`` adds the sanity-check cells of Frankle et al. (2021) next to every pruned cell. Single-shot
methods score once per seed and options and reuse the scores at every sparsity. Every record also
carries effective sparsity and cost (FLOPs of the kept weights, dense FLOPs, compression, speed-up).
``python -m experiments.report RUN_DIR...`` merges runs into one table and one plot on the
``1 - 0.8**k`` sparsity ladder.

``--resume`` continues from the last checkpoint of an unfinished cell and skips the cells whose record
is already in ``results.jsonl``; the final result equals that of an uninterrupted run with the same
seed (data order, augmentation and step randomness are functions of (seed, epoch, step)).

Modules: :mod:`~prospr_jax.experiment.config` (command line, preset + flags),
:mod:`~prospr_jax.experiment.presets`, :mod:`~prospr_jax.experiment.checks` (checks before heavy
work), :mod:`~prospr_jax.experiment.launch` (``--out``, lock, resume, leftovers),
:mod:`~prospr_jax.experiment.rundir`, :mod:`~prospr_jax.experiment.cells`,
:mod:`~prospr_jax.experiment.runner` (the cells), :mod:`~prospr_jax.experiment.training` (data glue
of the trainer), :mod:`~prospr_jax.experiment.pruning` (the door to the method registry),
:mod:`~prospr_jax.experiment.results`, :mod:`~prospr_jax.experiment.plots`,
:mod:`~prospr_jax.experiment.main`, :mod:`~prospr_jax.experiment.ablations` (the sanity checks),
:mod:`~prospr_jax.experiment.aggregate` (seeds pooled: mean ± std, flags),
:mod:`~prospr_jax.experiment.metrics` (effective sparsity and cost of a cell),
:mod:`~prospr_jax.experiment.merge` (several runs into one report).
"""

from prospr_jax.experiment.cells import Cell, cells_of
from prospr_jax.experiment.config import RunConfig, UsageError, build_parser, resolve_config
from prospr_jax.experiment.main import EXIT_DIVERGED, EXIT_FAILED, EXIT_OK, main
from prospr_jax.experiment.presets import DEFAULT_PRESET, PRESETS, Preset, get_preset
from prospr_jax.experiment.runner import Experiment, run_cell
from prospr_jax.experiment.training import batch_at_step, make_train_fn

__all__ = [
    "Cell",
    "DEFAULT_PRESET",
    "EXIT_DIVERGED",
    "EXIT_FAILED",
    "EXIT_OK",
    "Experiment",
    "PRESETS",
    "Preset",
    "RunConfig",
    "UsageError",
    "batch_at_step",
    "build_parser",
    "cells_of",
    "get_preset",
    "main",
    "make_train_fn",
    "resolve_config",
    "run_cell",
]
