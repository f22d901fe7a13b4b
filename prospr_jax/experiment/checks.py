"""Checks of a run configuration against its data and model, made before any heavy work.

:func:`check_run` runs twice: before the data is loaded, on what the data set's metadata says
(:func:`prospr_jax.data.metadata`: the digits constants, a catalog set's tfds metadata), and right
after loading, on the loaded data set (folders and archives are known only then). It checks the
batch sizes and the subset against the training set, and the model against the input size:
:func:`check_model_input` traces the model's ``init`` abstractly (``jax.eval_shape``, no FLOP, no
memory) on the data's image shape, so any model of the zoo (or given options) that cannot take the
input is reported with both names instead of failing deep inside an initialiser.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp

from prospr_jax import data, models
from prospr_jax.experiment import paradigms
from prospr_jax.experiment.config import RunConfig, UsageError


def check_model_input(model_name: str, model_options: dict, num_classes: int, image_shape: tuple) -> None:
    """Check that model ``model_name`` can take images of ``image_shape`` (abstractly, no compute).

    Traces ``init`` and the forward pass of one image with ``jax.eval_shape``, capturing every
    submodule's output: an exception while tracing, an empty parameter or an empty intermediate
    activation means the input is too small (or of the wrong layout) for the model.

    Args:
      model_name: a model zoo name.
      model_options: keyword arguments of ``prospr_jax.models.get``.
      num_classes: number of logits.
      image_shape: ``(H, W, C)`` of one image.

    Raises:
      UsageError: the model cannot be built with these options or cannot take this input.
    """
    shape = tuple(int(d) for d in image_shape)
    try:
        model = models.get(model_name, num_classes, **model_options)
    except (TypeError, ValueError) as e:
        raise UsageError(f"`--model-options` {model_options}: {e}") from None
    problem = _input_problem(model, num_classes, shape)
    if problem is None:
        return
    smallest = _smallest_square_input(model, num_classes, shape)
    need = f"it needs images of at least {smallest}x{smallest}" if smallest else "it cannot take them"
    raise UsageError(
        f"`--model` {model_name} on inputs of shape {shape} (H, W, C): {need} ({problem}); use larger "
        "images (e.g. `--image-size`) or another `--model`"
    )


def _input_problem(model: Any, num_classes: int, shape: tuple) -> Optional[str]:
    """Why ``model`` cannot take one image of ``shape`` (``None`` if it can), traced abstractly."""

    def init() -> Any:
        return model.init(jax.random.PRNGKey(0), jnp.zeros((1,) + shape, jnp.float32), train=False,
                          capture_intermediates=True)

    try:
        variables = jax.eval_shape(init)
    except Exception as e:  # pylint: disable=broad-except  # Any failure to trace is the same report.
        return f"{type(e).__name__} while tracing its init: {e}"
    empty = [
        jax.tree_util.keystr(path)
        for path, leaf in jax.tree_util.tree_leaves_with_path(variables)
        if 0 in getattr(leaf, "shape", ())
    ]
    if empty:
        return f"{len(empty)} activations or weights would be empty, the first {empty[0]}"
    outputs = jax.tree_util.tree_leaves(variables.get("intermediates", {}).get("__call__", ()))
    if outputs and tuple(outputs[-1].shape) != (1, num_classes):
        return f"its output has shape {tuple(outputs[-1].shape)}, not (1, {num_classes})"
    return None


def _smallest_square_input(model: Any, num_classes: int, shape: tuple, limit: int = 4096) -> Optional[int]:
    """The smallest square size ``s > H`` with ``s x s`` images the model takes (``None`` up to ``limit``).

    Assumes that a model taking ``s x s`` images takes larger ones too (true of the zoo's models).
    """
    low, high = max(shape[0], shape[1]), max(shape[0], shape[1]) * 2
    while _input_problem(model, num_classes, (high, high, shape[2])) is not None:
        low, high = high, high * 2
        if high > limit:
            return None
    while high - low > 1:  # The model takes high x high images but not low x low ones.
        middle = (low + high) // 2
        if _input_problem(model, num_classes, (middle, middle, shape[2])) is None:
            high = middle
        else:
            low = middle
    return high


def _check_train_size(config: RunConfig, num_train: int, num_classes: Optional[int]) -> None:
    size = num_train
    if config.subset is not None:
        if config.subset > num_train:
            raise UsageError(
                f"`--subset` {config.subset} is larger than the training set of {config.dataset!r} "
                f"({num_train:,} examples)"
            )
        if num_classes is not None and config.subset < num_classes:
            raise UsageError(
                f"`--subset` {config.subset} is smaller than the number of classes of {config.dataset!r} "
                f"({num_classes}): a stratified subset would drop {num_classes - config.subset} classes; "
                f"use `--subset` >= {num_classes}"
            )
        size = config.subset
    for flag, batch_size in (("--batch-size", config.recipe.batch_size), ("--prune-batch-size", config.prune_batch_size)):
        if batch_size > size:
            raise UsageError(
                f"`{flag}` {batch_size} is larger than the training set ({size:,} examples"
                f"{' in --subset' if config.subset is not None else ''}): not one batch per epoch"
            )
    try:
        paradigms.check_prune_step(config.prune_at, config.recipe.epochs * data.steps_per_epoch(size, config.recipe.batch_size))
    except ValueError as e:
        raise UsageError(str(e)) from None


def check_run(config: RunConfig, *, num_train: Optional[int], num_classes: Optional[int],
              image_shape: Optional[tuple]) -> None:
    """Check ``config`` against what is known of its data (``None``: not known yet).

    Raises:
      UsageError: a subset larger than the training set or smaller than its number of classes, a
        batch larger than the training set, a model that cannot take the images.
    """
    if num_train is not None:
        _check_train_size(config, num_train, num_classes)
    if image_shape is not None:
        check_model_input(config.model, config.model_options, num_classes or 1, image_shape)
    elif num_classes is not None:
        try:
            models.get(config.model, num_classes, **config.model_options)
        except (TypeError, ValueError) as e:
            raise UsageError(f"`--model-options` {config.model_options}: {e}") from None


def check_before_loading(config: RunConfig) -> None:
    """:func:`check_run` on the data set's metadata (no example read).

    Raises:
      UsageError: see :func:`check_run`; also a catalog set that is not prepared.
    """
    try:
        meta = data.metadata(config.dataset, data_dir=config.data_dir, image_size=config.image_size)
    except (ValueError, data.DatasetNotPreparedError) as e:
        raise UsageError(f"`--dataset` {config.dataset!r}: {e}") from None
    if meta is not None:
        check_run(config, num_train=meta.num_train, num_classes=meta.num_classes, image_shape=meta.image_shape)


def check_loaded(config: RunConfig, dataset: data.Dataset) -> None:
    """:func:`check_run` on the loaded data set (whose train split is already the subset).

    Raises:
      UsageError: see :func:`check_run`.
    """
    check_run(config, num_train=len(dataset.train), num_classes=dataset.num_classes,
              image_shape=tuple(dataset.image_shape))


__all__ = ["check_before_loading", "check_loaded", "check_model_input", "check_run"]
