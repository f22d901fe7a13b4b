"""The harness's per-cell metrics beyond accuracy: effective sparsity and cost (FLOPs, compression,
theoretical speed-up), computed from the model's layer trace.

The trace (:func:`prospr_jax._src.effective.model_trace`: the model in inference mode on one
all-ones example) is taken once per run. When the tracer cannot follow the model, the metrics that
need it are ``None`` and the record's ``metrics_note`` says why: never a guess.
"""

from __future__ import annotations

from typing import Any, Optional

from prospr_jax._src.cost import masked_cost
from prospr_jax._src.effective import dead_fraction, effective_masks, model_trace
from prospr_jax._src.jaxpr.layer_graph import LayerTrace
from prospr_jax._src.losses import flax_apply_fn
from prospr_jax._src.tree import PyTree

METRIC_FIELDS = ("effective_sparsity", "flops", "dense_flops", "effective_flops", "compression_ratio",
                 "theoretical_speedup", "metrics_note")


def flax_trace(model: Any, params: PyTree, batch_stats: PyTree, input_shape: tuple) -> LayerTrace:
    """The layer trace of a flax.linen classifier (inference mode, one all-ones example)."""
    state = {"batch_stats": batch_stats} if batch_stats else {}
    return model_trace(flax_apply_fn(model), params, state, tuple(input_shape))


def cell_metrics(masks: PyTree, params: PyTree, trace: Optional[LayerTrace], trace_error: Optional[str] = None) -> dict:
    """The record fields :data:`METRIC_FIELDS` of a cell with ``masks`` over ``params``.

    * ``effective_sparsity``: fraction of the prunable weights pruned or on no input-output path;
    * ``flops`` / ``dense_flops`` / ``effective_flops``: multiply-accumulates per example of the kept,
      all and effective kernel weights (:mod:`prospr_jax._src.cost`);
    * ``compression_ratio``: all parameters / kept parameters;
    * ``theoretical_speedup``: ``dense_flops / flops``;
    * ``metrics_note``: ``None``, or why some of them are ``None``.

    Args:
      masks, params: the cell's masks and (any) parameters of the model.
      trace: the model's layer trace, or ``None`` when tracing failed (``trace_error`` says why).
    """
    out: dict = dict.fromkeys(METRIC_FIELDS)
    if trace is None:
        out["metrics_note"] = f"the model could not be traced: {trace_error}"
        return out
    cost = masked_cost(masks, params, trace)
    out.update(flops=cost.flops, dense_flops=cost.dense_flops, compression_ratio=cost.compression_ratio,
               theoretical_speedup=cost.theoretical_speedup)
    if trace.unsupported:
        out["metrics_note"] = "effective sparsity needs a layer graph the tracer could not follow: " + "; ".join(trace.unsupported)
        return out
    alive = effective_masks(masks, params, trace)
    out["effective_flops"] = masked_cost(alive, params, trace).flops
    out["effective_sparsity"] = dead_fraction(masks, alive, params)
    return out


__all__ = ["METRIC_FIELDS", "cell_metrics", "flax_trace"]
