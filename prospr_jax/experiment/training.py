"""Glue between the trainer and the data pipeline: the scoring batches and ``train_fn`` of pruners.

:mod:`prospr_jax.train` trains on any iterable of batches and knows nothing of
:mod:`prospr_jax.data`; the two functions here read the data pipeline's training stream for it.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import jax
import numpy as np

from prospr_jax import data
from prospr_jax.train import Trainer, TrainState, raw_key
from prospr_jax._src.tree import PyTree
from prospr_jax._src.validate import check_int

Batch = Mapping[str, Any]


def batch_at_step(dataset: data.Dataset, global_step: int, *, batch_size: int, seed: int, augment: bool) -> Batch:
    """The training batch of global step ``global_step`` of ``prospr_jax.data.train_batches``.

    Args:
      dataset: the data set.
      global_step: the step, counted over epochs: step ``global_step % S`` of epoch
        ``global_step // S`` (``S`` steps per epoch).
      batch_size: the batch size (fixes ``S``).
      seed: the data order seed.
      augment: apply the training augmentation.

    Returns:
      The batch, ``{'image', 'label'}`` numpy arrays.
    """
    spe = data.steps_per_epoch(dataset, batch_size)
    epoch, step = divmod(int(global_step), spe)
    batches = data.train_batches(
        dataset, batch_size=batch_size, epoch=epoch, seed=seed, augment=augment, start_step=step, prefetch=0
    )
    return next(iter(batches))


def make_train_fn(
    trainer: Trainer,
    dataset: data.Dataset,
    *,
    batch_stats: PyTree,
    seed: int = 0,
    augment: Optional[bool] = None,
) -> Callable[..., PyTree]:
    """``PruningProblem.train_fn`` for the methods that train (IMP, DRIVE).

    ``train_fn(params, masks, *, steps=None, key=None, start_step=0) -> params`` trains the masked
    network from ``params`` with the trainer's recipe and returns the trained params (pruned weights
    exactly zero). Each call starts a fresh optimiser state and BatchNorm statistics ``batch_stats``;
    the statistics it accumulates stay inside the call.

    * ``steps``: optimiser steps (``None``: to the end of the recipe's budget, i.e.
      ``epochs * steps_per_epoch - start_step`` steps).
    * ``start_step``: global step to start at: the lr schedule AND the data stream continue from there
      (batch ``start_step`` of the data order is the first one used). IMP rewinding to ``theta_k``
      passes ``start_step=k`` to train the remaining ``T - k`` steps as Frankle et al. do.
    * ``key``: a PRNG key; when given, it fixes the data order seed and the step randomness of the
      call (``seed`` otherwise).

    Data: ``prospr_jax.data.train_batches(dataset, batch_size=recipe.batch_size, epoch=e, seed=...)``,
    augmented as the recipe says (``augment`` overrides).

    Args:
      trainer: the :class:`prospr_jax.train.Trainer` (its recipe and compiled train step).
      dataset: the data set whose training stream is read.
      batch_stats: the BatchNorm statistics every call starts from (``{}`` without BatchNorm).
      seed: the data order seed when ``train_fn`` gets no ``key``.
      augment: override the recipe's augmentation.

    Returns:
      ``train_fn``.

    Raises:
      ValueError: the trainer's ``steps_per_epoch`` is not that of the data set and batch size.
    """
    recipe = trainer.recipe
    augment = recipe.augment if augment is None else bool(augment)
    spe = data.steps_per_epoch(dataset, recipe.batch_size)
    if spe != trainer.steps_per_epoch:
        raise ValueError(
            f"the trainer has `steps_per_epoch`={trainer.steps_per_epoch} but the data set gives {spe} "
            f"batches of {recipe.batch_size} per epoch"
        )

    def train_fn(params: PyTree, masks: PyTree, *, steps: Optional[int] = None, key: Any = None, start_step: int = 0):
        start_step = check_int(start_step, "start_step", low=0)
        steps = max(trainer.total_steps - start_step, 0) if steps is None else check_int(steps, "steps", low=0)
        if key is None:
            data_seed, rng = int(seed), jax.random.PRNGKey(int(seed))
        else:
            key = raw_key(key)
            data_seed = int(jax.random.randint(key, (), 0, 2**31 - 1))
            rng = jax.random.fold_in(key, 1)
        state = trainer.init(params, batch_stats, masks, rng=rng, start_step=int(start_step))
        return train_steps(trainer, dataset, state, steps, seed=data_seed, augment=augment).params

    return train_fn


def train_steps(trainer: Trainer, dataset: data.Dataset, state: TrainState, steps: int, *, seed: int,
                augment: bool) -> TrainState:
    """``state`` after ``steps`` more train steps on the training stream, continuing it from the
    state's global step (batch ``state.step`` of the data order of ``seed`` comes first)."""
    spe = trainer.steps_per_epoch
    done, global_step = 0, int(state.step)
    while done < steps:
        epoch, first = divmod(global_step, spe)
        batches = data.train_batches(
            dataset, batch_size=trainer.recipe.batch_size, epoch=epoch, seed=seed, augment=augment, start_step=first,
            rows=trainer.rows,
        )
        for batch in batches:
            state, _ = trainer.train_step(state, trainer.place_batch({"image": batch["image"], "label": batch["label"]}))
            done += 1
            global_step += 1
            if done == steps:
                break
    return state


__all__ = ["batch_at_step", "make_train_fn", "train_steps"]
