"""The one glue between a classifier and the pruners: logits, cross-entropy, loss functions.

Model convention (``ApplyFn``): ``apply_fn(params, model_state, x, train) -> logits [N, classes]``.
``train=True`` runs BatchNorm with batch statistics and throws the updated statistics away (how
ProsPr, SNIP, GraSP and the other scorers use a model); ``train=False`` uses the running statistics
in ``model_state``. :func:`flax_apply_fn` builds it for a flax.linen module (duck-typed: anything
with ``.apply(variables, x, train=..., mutable=...)``; flax itself is not imported).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax

from prospr_jax._src.tree import PyTree

ApplyFn = Callable[[PyTree, PyTree, jax.Array, bool], jax.Array]
LossFn = Callable[[PyTree, Any], jax.Array]


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy of ``logits [N, C]`` against integer ``labels [N]``, computed in at
    least float32 (bfloat16/float16 logits are promoted)."""
    logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def flax_apply_fn(model: Any) -> ApplyFn:
    """``apply_fn(params, model_state, x, train)`` of a flax.linen classifier.

    ``model_state`` holds the non-parameter collections (``{'batch_stats': ...}`` or ``{}``). In train
    mode the mutable collections are updated and the updates discarded.
    """

    def apply_fn(params: PyTree, model_state: PyTree, x: jax.Array, train: bool) -> jax.Array:
        variables = {"params": params, **(model_state or {})}
        if train and model_state:
            logits, _ = model.apply(variables, x, train=True, mutable=list(model_state))
            return logits
        return model.apply(variables, x, train=train)

    return apply_fn


def classifier_loss(
    apply_fn: ApplyFn,
    params: PyTree,
    model_state: PyTree,
    batch: Mapping[str, Any],
    *,
    train: bool = True,
    temperature: Any = 1.0,
) -> jax.Array:
    """``cross_entropy(apply_fn(params, model_state, batch['image'], train) / temperature, batch['label'])``.

    ``temperature`` may be traced (GraSP divides the logits by 200 in both of its passes).
    """
    logits = apply_fn(params, model_state, batch["image"], train)
    return cross_entropy(logits / temperature, batch["label"])


def classifier_loss_fn(apply_fn: ApplyFn, model_state: PyTree, *, train: bool = True) -> LossFn:
    """``loss_fn(params, batch) -> scalar``: :func:`classifier_loss` with ``apply_fn`` and ``model_state``
    fixed, on ``{'image', 'label'}`` batches."""

    def loss_fn(params: PyTree, batch: Mapping[str, Any]) -> jax.Array:
        return classifier_loss(apply_fn, params, model_state, batch, train=train)

    return loss_fn


__all__ = ["ApplyFn", "LossFn", "classifier_loss", "classifier_loss_fn", "cross_entropy", "flax_apply_fn"]
