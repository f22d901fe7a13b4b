"""Registry adapters of the core scorers: ``'prospr'`` (:func:`prospr_jax.prospr_scores`) and ``'snip'``
(:func:`prospr_jax.snip_scores`), both taking a :class:`prospr_jax.PruningProblem`."""

from __future__ import annotations

from typing import Any

from prospr_jax.methods.snip import snip_scores
from prospr_jax.problem import PruningProblem
from prospr_jax.prospr import check_num_steps, prospr_scores, stack_batches
from prospr_jax.tree import PyTree

def prospr_method(
    problem: PruningProblem,
    *,
    num_steps: int = 3,
    lr: float = 0.1,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    first_order: bool = False,
    single_batch: bool = False,
    **options: Any,
) -> PyTree:
    """Registry adapter of ``'prospr'``: :func:`prospr_jax.prospr_scores` on ``problem``.

    Batches: ``problem.batch(0), ..., problem.batch(num_steps)`` (one per inner step plus one for the
    meta-loss, the paper's default); with ``single_batch=True`` only ``problem.batch(0)``, reused.
    Defaults are the paper's (M = 3, lr = 0.1, plain SGD). Other options (``detach_first_buffer``,
    ``implementation``, ``remat``) are passed through.
    """
    problem.require("batch_fn", method="prospr")
    problem.reject_problem_options(options, method="prospr")
    num_steps = check_num_steps(num_steps)
    if single_batch:
        batches = problem.batch(0)
    else:
        batches = stack_batches([problem.batch(i) for i in range(num_steps + 1)])
    return prospr_scores(
        problem.loss_fn,
        problem.params,
        batches,
        num_steps=num_steps,
        lr=lr,
        momentum=momentum,
        weight_decay=weight_decay,
        first_order=first_order,
        single_batch=single_batch,
        prunable=problem.prunable_tree(),
        **options,
    )


def snip_method(problem: PruningProblem) -> PyTree:
    """Registry adapter of ``'snip'``: :func:`prospr_jax.snip_scores` on ``problem.batch(0)``."""
    problem.require("batch_fn", method="snip")
    return snip_scores(problem.loss_fn, problem.params, problem.batch(0), prunable=problem.prunable_tree())
