"""SNIP: single-shot network pruning by connection sensitivity (Lee et al., ICLR 2019).

Score ``|theta * dL/dtheta|`` on one batch, equivalently ``|dL/dc|`` at ``c = 1`` for a mask ``c`` on the
weights; rank globally and keep the top ``ceil(d * N)``. This is exactly ProsPr with ``num_steps = 0``,
and it runs through the same code (:func:`prospr_jax.prospr_scores`).
"""

from __future__ import annotations

from typing import Any

from prospr_jax._src.losses import LossFn
from prospr_jax._src.problem import PruningProblem
from prospr_jax._src.prunable import PrunableSpec
from prospr_jax._src.tree import PyTree
from prospr_jax.methods.base import Method, register
from prospr_jax.methods.prospr import prospr_scores


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
        :func:`prospr_jax.prospr_scores`.

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


@register
class Snip(Method):
    """Registry row of SNIP: :func:`snip_scores` on ``problem.batch(0)``."""

    name = "snip"
    paper = "Lee et al., ICLR 2019"
    idea = "connection sensitivity |theta * dL/dtheta| on one batch"
    data = "1 batch"
    cost = "1 forward/backward pass"
    needs = ("batch_fn",)

    def score(self, problem: PruningProblem, options: object) -> PyTree:
        return snip_scores(problem.loss_fn, problem.params, problem.batch(0), prunable=problem.prunable_tree())


__all__ = ["Snip", "snip_scores"]
