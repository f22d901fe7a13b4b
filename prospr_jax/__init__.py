"""prospr-jax: pruning neural networks at initialisation in JAX.

The core works on any ``loss_fn(params, batch) -> scalar`` and parameter pytree (flax.linen,
flax.nnx through ``nnx.split``/``nnx.merge``, or hand-written) and needs only jax, optax, chex and numpy:

* :func:`prospr_scores` / :func:`meta_gradient`: ProsPr (Alizadeh et al., ICLR 2022);
* :func:`snip_scores`: SNIP, ProsPr with zero inner steps;
* :func:`masks_from_scores`, :func:`apply_masks`, :func:`sparsity_report`: mask pytrees;
* :func:`masked_optimizer`: an optax transformation keeping pruned weights at exactly zero;
* :class:`PruningProblem` and :mod:`prospr_jax.methods`: every method by name, one contract.

Scorers that take functions (``loss_fn``, ``apply_fn``) compile them with ``jax.jit`` as static
arguments: a computation is compiled once per function object, shapes and static options. Build your
loss once and reuse it (a :class:`PruningProblem` does this for every method).

The experiment harness (``prospr_jax.models``: flax.linen model zoo; ``prospr_jax.data``;
``prospr_jax.train``; ``prospr_jax.checkpoint``; ``prospr_jax.experiment``: the prune-then-train
runner) needs the ``experiments`` extra: ``pip install "prospr-jax[experiments]"``. Those modules
load on first use.
"""

from prospr_jax._src.cpu_conv import set_cpu_conv_kernels, with_cpu_conv_kernels
from prospr_jax._src.jaxpr.forward_order import forward_order
from prospr_jax._src.losses import classifier_loss, classifier_loss_fn, cross_entropy, flax_apply_fn
from prospr_jax._src.masks import (
    LayerCollapseWarning,
    LayerSparsity,
    SparsityReport,
    SparsityWarning,
    apply_masks,
    check_masks,
    dense_masks,
    kept_count,
    masks_from_scores,
    rank_below_kept,
    scores_on_prunable,
    sparsity_report,
)
from prospr_jax._src.optimizer import MaskedOptimizerState, masked_optimizer, masks_of, set_masks
from prospr_jax._src.problem import PruningProblem
from prospr_jax._src.prunable import default_prunable, select_prunable
from prospr_jax._src.sharding import data_mesh, describe_mesh, process_rows, replicate, shard_batch
from prospr_jax._src.tree import named_leaves, path_name
from prospr_jax.methods import PruneResult, meta_gradient, prospr_scores, snip_scores, stack_batches

__version__ = "0.2.0"

_HARNESS = ("checkpoint", "data", "experiment", "models", "train")


def __getattr__(name: str):
    # The harness's subpackages import flax, tensorflow-datasets or orbax: load them on first use.
    if name in _HARNESS:
        import importlib

        return importlib.import_module(f"prospr_jax.{name}")
    raise AttributeError(f"module 'prospr_jax' has no attribute {name!r}")


__all__ = [
    "shard_batch",
    "replicate",
    "process_rows",
    "describe_mesh",
    "data_mesh",
    "LayerCollapseWarning",
    "LayerSparsity",
    "MaskedOptimizerState",
    "PruneResult",
    "PruningProblem",
    "SparsityReport",
    "SparsityWarning",
    "apply_masks",
    "check_masks",
    "classifier_loss",
    "classifier_loss_fn",
    "cross_entropy",
    "default_prunable",
    "dense_masks",
    "flax_apply_fn",
    "forward_order",
    "kept_count",
    "masked_optimizer",
    "masks_from_scores",
    "masks_of",
    "meta_gradient",
    "named_leaves",
    "path_name",
    "prospr_scores",
    "rank_below_kept",
    "scores_on_prunable",
    "select_prunable",
    "set_cpu_conv_kernels",
    "set_masks",
    "snip_scores",
    "sparsity_report",
    "stack_batches",
    "with_cpu_conv_kernels",
]
