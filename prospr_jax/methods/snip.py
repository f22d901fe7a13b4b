"""SNIP: single-shot network pruning by connection sensitivity (Lee et al., ICLR 2019).

Score ``|theta * dL/dtheta|`` on one batch, equivalently ``|dL/dc|`` at ``c = 1`` for a mask ``c`` on the
weights; rank globally and keep the top ``ceil(d * N)`` (METHODS.md). This is exactly ProsPr with
``num_steps = 0``, and it runs through the same code (:func:`prospr_jax.prospr.prospr_scores`).
"""

from __future__ import annotations

from typing import Any

from prospr_jax.prospr import LossFn, prospr_scores
from prospr_jax.prunable import PrunableSpec
from prospr_jax.tree import PyTree


def snip_scores(
    loss_fn: LossFn,
    params: PyTree,
    batch: Any,
    *,
    prunable: PrunableSpec = None,
    exclude_first: bool = False,
    exclude_last: bool = False,
) -> PyTree:
    """SNIP connection sensitivity ``|theta * grad L(theta; batch)|`` of every prunable weight.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar`` (BatchNorm in training mode, as the authors did).
      params: the initial parameters ``theta``.
      batch: one batch (any pytree ``loss_fn`` accepts); the paper uses one batch of 128 on CIFAR.
      prunable, exclude_first, exclude_last: which leaves are scored, as in
        :func:`prospr_jax.prospr.prospr_scores`.

    Returns:
      Scores pytree: ``|theta * g|`` on pruned leaves, 0-d zero elsewhere.
    """
    return prospr_scores(
        loss_fn,
        params,
        batch,
        num_steps=0,
        single_batch=True,
        prunable=prunable,
        exclude_first=exclude_first,
        exclude_last=exclude_last,
    )
