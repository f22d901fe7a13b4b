"""Pruning methods: one module each, holding the method's math, its adapter and its registry row.

Registry (:func:`prune`, :func:`score`, :func:`masks_for`, :func:`names`, :func:`get`,
:func:`register`, :func:`table`): every method behind one call on a :class:`prospr_jax.PruningProblem`,
returning a :class:`PruneResult`. Add your own with :func:`register` (see :mod:`prospr_jax.methods.base`).

Functional cores (pure functions of params pytrees, for your own code):

* scorers (higher = keep): :func:`prospr_scores`, :func:`snip_scores`, :func:`grasp_scores`,
  :func:`synflow_scores`, :func:`magnitude_scores`, :func:`random_scores`, :func:`lamp_scores`,
  :func:`drive_scores`, :func:`lap_scores`;
* iterative pruners: :func:`iterative_snip_masks`, :func:`force_masks`, :func:`synflow_masks`;
* density rules and schedules: :func:`erk_densities`, :class:`MaskRule`, :func:`density_schedule`;
* dynamic sparse training (``set``, ``rigl``): :func:`drop_and_grow`, :func:`drop_fraction_at` and the
  :class:`MaskUpdater` a training loop calls (:class:`DynamicSparseMethod`).

The reference of every method (what it computes, the authors' conventions, where this library departs
from them) is docs/methods.md in the repository.
"""

# Method modules register their row on import; the order below is the order of names() and table().
from prospr_jax.methods.base import Method, NoOptions, PruneResult, get, names, register, unregister
from prospr_jax.methods.prospr import ProsPrOptions, meta_gradient, prospr_scores, stack_batches
from prospr_jax.methods.snip import snip_scores
from prospr_jax.methods.rules import DENSITY_RULES, MaskRule  # registers magnitude and lamp
from prospr_jax.methods.rounds import density_schedule, progressive_prune
from prospr_jax.methods.erk import erk_densities
from prospr_jax.methods.iterative_snip import force_masks, iterative_masks, iterative_snip_masks, masked_gradient_scores
from prospr_jax.methods.grasp import balanced_batch, grasp_scores
from prospr_jax.methods.synflow import synflow_masks, synflow_scores
from prospr_jax.methods.magnitude import magnitude_scores
from prospr_jax.methods.random_pruning import random_scores
from prospr_jax.methods.lamp import lamp_scores
from prospr_jax.methods.lookahead import lap_scores, problem_layer_graph
from prospr_jax.methods.drive import drive_scores
from prospr_jax.methods.imp import imp_densities, imp_num_rounds
from prospr_jax.methods.dst import DynamicSparseMethod, MaskUpdater, drop_and_grow, drop_fraction_at
from prospr_jax.methods import set as _set_module, rigl  # noqa: F401  (register 'set' and 'rigl')
from prospr_jax.methods.registry import check_call, markdown_table, masks_for, prune, score, table

__all__ = [
    "DENSITY_RULES",
    "MaskRule",
    "Method",
    "NoOptions",
    "ProsPrOptions",
    "PruneResult",
    "balanced_batch",
    "check_call",
    "density_schedule",
    "drive_scores",
    "drop_and_grow",
    "drop_fraction_at",
    "DynamicSparseMethod",
    "erk_densities",
    "force_masks",
    "get",
    "grasp_scores",
    "imp_densities",
    "imp_num_rounds",
    "iterative_masks",
    "iterative_snip_masks",
    "lamp_scores",
    "lap_scores",
    "magnitude_scores",
    "markdown_table",
    "masked_gradient_scores",
    "masks_for",
    "MaskUpdater",
    "meta_gradient",
    "names",
    "problem_layer_graph",
    "progressive_prune",
    "prospr_scores",
    "prune",
    "random_scores",
    "register",
    "score",
    "snip_scores",
    "stack_batches",
    "synflow_masks",
    "synflow_scores",
    "table",
    "unregister",
]
