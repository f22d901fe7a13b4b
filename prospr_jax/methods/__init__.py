"""Pruning methods, one module each (see METHODS.md for the conventions each one follows).

Registry (``prune``, ``score``, ``names``, ``get``, ``table``): every method behind one call on a
:class:`prospr_jax.PruningProblem`. Functional cores (pure functions of params pytrees):

* :func:`snip_scores`, :func:`grasp_scores`, :func:`synflow_scores`, :func:`magnitude_scores`,
  :func:`random_scores`, :func:`lamp_scores`: single-round scorers (higher = keep);
* :func:`iterative_snip_masks`, :func:`force_masks`, :func:`synflow_masks`: iterative pruners;
* :func:`erk_densities`, :func:`density_schedule`, :func:`rule_masks`: density rules and schedules.
"""

from prospr_jax.methods.densities import density_schedule, erk_densities, lamp_scores, rule_masks
from prospr_jax.methods.grasp import balanced_batch, grasp_scores, temperature_loss
from prospr_jax.methods.iterative_snip import (
    force_masks,
    iterative_masks,
    iterative_snip_masks,
    masked_gradient_scores,
    progressive_prune,
)
from prospr_jax.methods.magnitude import magnitude_scores
from prospr_jax.methods.random_pruning import random_scores
from prospr_jax.methods.registry import Method, get, markdown_table, names, prune, score, table
from prospr_jax.methods.snip import snip_scores
from prospr_jax.methods.synflow import synflow_masks, synflow_scores

__all__ = [
    "Method",
    "balanced_batch",
    "density_schedule",
    "erk_densities",
    "force_masks",
    "get",
    "grasp_scores",
    "iterative_masks",
    "iterative_snip_masks",
    "lamp_scores",
    "magnitude_scores",
    "markdown_table",
    "masked_gradient_scores",
    "names",
    "progressive_prune",
    "prune",
    "random_scores",
    "rule_masks",
    "score",
    "snip_scores",
    "synflow_masks",
    "synflow_scores",
    "table",
    "temperature_loss",
]
