"""prospr-jax: pruning neural networks at initialization in JAX.

The core works on any ``loss_fn(params, batch) -> scalar`` and parameter pytree:

* :func:`prospr_scores` / :func:`meta_gradient`: ProsPr (Alizadeh et al., ICLR 2022);
* :func:`snip_scores`: SNIP, ProsPr with zero inner steps;
* :func:`masks_from_scores`, :func:`apply_masks`, :func:`sparsity_report`: mask pytrees;
* :func:`masked`: an optax transformation keeping pruned weights at exactly zero.
"""

from prospr_jax.masks import (
    LayerCollapseWarning,
    LayerSparsity,
    SparsityReport,
    apply_masks,
    check_masks,
    dense_masks,
    kept_count,
    masks_from_scores,
    scores_on_prunable,
    sparsity_report,
)
from prospr_jax.methods.snip import snip_scores
from prospr_jax.optim import MaskedState, masked, masks_of, set_masks
from prospr_jax.problem import PruningProblem
from prospr_jax.prospr import meta_gradient, prospr_scores, stack_batches
from prospr_jax.prunable import default_prunable, forward_order, select_prunable

__version__ = "0.1.0"

_SUBMODULES = ("checkpoint", "data", "methods", "models", "train")


def __getattr__(name: str):
    # Submodules with heavier imports (tensorflow-datasets, orbax) load on first use.
    if name in _SUBMODULES:
        import importlib

        return importlib.import_module(f"prospr_jax.{name}")
    raise AttributeError(f"module 'prospr_jax' has no attribute {name!r}")


__all__ = [
    "LayerCollapseWarning",
    "LayerSparsity",
    "MaskedState",
    "PruningProblem",
    "SparsityReport",
    "apply_masks",
    "check_masks",
    "default_prunable",
    "dense_masks",
    "forward_order",
    "kept_count",
    "masked",
    "masks_from_scores",
    "masks_of",
    "meta_gradient",
    "prospr_scores",
    "scores_on_prunable",
    "select_prunable",
    "set_masks",
    "snip_scores",
    "sparsity_report",
    "stack_batches",
]
