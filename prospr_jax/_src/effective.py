"""Effective sparsity (Vysogorets & Kempe, 2021): weights cut off from the input or the output count
as pruned.

A kept weight of a Conv/Dense kernel connects input unit ``i`` (input channel, the kernel's
second-to-last axis) to output unit ``o`` (output channel, the last axis). It is *effective* when a
path of kept weights leads from the model input to unit ``i`` and from unit ``o`` to the model
output; otherwise it can be removed without changing which units compute anything, and it counts as
pruned. Units are channels: a conv weight at any spatial offset counts as a connection of its
channels. Biases do not make a unit alive (a unit that receives nothing outputs a constant).

The unit graph comes from the jaxpr tracer (:func:`prospr_jax._src.jaxpr.layer_graph.trace_layer_graph`):
its ``'weight'`` and ``'input'`` edges, and identity skips resolved to the kernels (or input) they
carry (:attr:`LayerTrace.skip_sources`), so a residual skip keeps a block's output alive when the
block's own weights are all pruned, and a skip from a dead layer carries nothing. A kernel with no
outgoing edge is taken to feed the model output (the logits layer of a classifier).

Two passes over the kernels in forward order: forward, the input units that receive something;
backward, the output units that reach the output. A kernel unit is connected through the kernel when
any kept weight joins the two units.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from prospr_jax._src.jaxpr.layer_graph import LayerTrace, trace_layer_graph
from prospr_jax._src.masks import is_pruned_leaf
from prospr_jax._src.tree import PyTree, named_leaves
from prospr_jax._src.validate import check_same_structure, check_shape


def model_trace(apply_fn: Callable[..., Any], params: PyTree, model_state: PyTree, input_shape: tuple) -> LayerTrace:
    """The layer trace of ``apply_fn(params, model_state, x, False)`` (inference mode) on a batch of one
    all-ones input of ``input_shape`` (one example, no batch axis)."""
    shape = check_shape(input_shape, "input_shape")
    x = jax.ShapeDtypeStruct((1, *shape), jnp.float32)
    return trace_layer_graph(lambda p, s, inp: apply_fn(p, s, inp, False), params, model_state or {}, x)


def _full_masks(masks: PyTree, params: PyTree) -> dict[str, np.ndarray]:
    """Boolean masks of every leaf at its parameter's shape (0-d masks: all kept)."""
    check_same_structure(masks, params, arg="masks")
    shapes = {n: np.shape(p) for n, p in named_leaves(params)}
    return {n: np.broadcast_to(np.asarray(m) != 0, shapes[n]) for n, m in named_leaves(masks)}


def _check_trace(trace: LayerTrace) -> None:
    if not isinstance(trace, LayerTrace):
        raise TypeError(f"`trace` must be a LayerTrace (prospr_jax._src.effective.model_trace), got {type(trace).__name__}")
    if trace.unsupported:
        raise ValueError("effective sparsity needs the model's layer graph, which the tracer could not follow: "
                         + "; ".join(trace.unsupported))


def effective_masks(masks: PyTree, params: PyTree, trace: LayerTrace) -> PyTree:
    """``masks`` with every kept weight that lies on no input-to-output path set to 0.

    Args:
      masks: mask pytree of ``params``' structure (per-weight, channel or 0-d leaves).
      params: the parameters (only their shapes are used).
      trace: the model's :class:`LayerTrace` (:func:`model_trace`).

    Returns:
      Boolean masks at the parameters' full shapes for the pruned leaves (``ndim >= 1`` masks) and the
      kernels of the trace; other leaves as given. Leaves the trace does not know (no kernel of it)
      keep their mask.

    Raises:
      ValueError: the trace could not follow the model (its ``unsupported`` messages), or a kernel
        the trace names is not in ``params``.
    """
    _check_trace(trace)
    full = _full_masks(masks, params)
    missing = [n for n in trace.layers if n not in full]
    if missing:
        raise ValueError(f"`trace` names kernels that are not leaves of `params`: {missing}")
    conn = {n: full[n].reshape(-1, *full[n].shape[-2:]).any(axis=0) for n in trace.layers}  # [in, out]
    ins: dict[str, list] = {n: [] for n in trace.layers}
    outs: dict[str, list] = {n: [] for n in trace.layers}
    for e in tuple(e for e in trace.edges if e.kind != "identity") + tuple(trace.skip_sources):
        ins[e.dst].append(e)
        if e.src is not None:
            outs[e.src].append(e)
    fed_out: dict[str, np.ndarray] = {}
    fed_in: dict[str, np.ndarray] = {}
    for n in trace.layers:
        fed = np.zeros(conn[n].shape[0], bool)
        for e in ins[n]:
            ok = e.index >= 0
            fed[ok] |= True if e.src is None else fed_out[e.src][e.index[ok]]
        fed_in[n] = fed
        fed_out[n] = (fed[:, None] & conn[n]).any(axis=0)
    reach_in: dict[str, np.ndarray] = {}
    reach_out: dict[str, np.ndarray] = {}
    for n in reversed(trace.layers):
        if not outs[n]:
            reach = np.ones(conn[n].shape[1], bool)
        else:
            reach = np.zeros(conn[n].shape[1], bool)
            for e in outs[n]:
                ok = (e.index >= 0) & reach_in[e.dst]
                reach[e.index[ok]] = True
        reach_out[n] = reach
        reach_in[n] = (conn[n] & reach[None, :]).any(axis=1)
    alive = {n: full[n] & (fed_in[n][:, None] & reach_out[n][None, :]) for n in trace.layers}
    leaves, treedef = jax.tree_util.tree_flatten(masks)
    names = [n for n, _ in named_leaves(masks)]
    out = [alive[n] if n in alive else (full[n] if is_pruned_leaf(m) else m) for n, m in zip(names, leaves)]
    return jax.tree_util.tree_unflatten(treedef, out)


def effective_sparsity(masks: PyTree, params: PyTree, trace: LayerTrace) -> float:
    """The fraction of the prunable weights (the leaves whose mask has ``ndim >= 1``) that are pruned or
    lie on no input-to-output path (:func:`effective_masks`). Equals the nominal sparsity when every
    kept weight is connected; ``1.0`` when no path is left."""
    return dead_fraction(masks, effective_masks(masks, params, trace), params)


def dead_fraction(masks: PyTree, alive: PyTree, params: PyTree) -> float:
    """The fraction of the prunable weights (``ndim >= 1`` leaves of ``masks``) that ``alive`` (the
    result of :func:`effective_masks`) does not keep."""
    kept = total = 0
    for (_, m), (_, a), (_, p) in zip(named_leaves(masks), named_leaves(alive), named_leaves(params)):
        if is_pruned_leaf(m):
            kept += int(np.count_nonzero(a))
            total += int(np.size(p))
    return 1.0 - kept / total if total else 0.0


__all__ = ["dead_fraction", "effective_masks", "effective_sparsity", "model_trace"]
