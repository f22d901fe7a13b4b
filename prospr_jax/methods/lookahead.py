"""Lookahead pruning, LAP (Park et al., ICLR 2020), with its LAP-forward / LAP-backward variants.

Paper convention (matrix notation, ``y = W x``): the score of weight ``W_i[j, k]`` (input unit
``k`` -> output unit ``j`` of layer ``i``) is the squared Frobenius distortion of the three-layer
block ``W_{i+1} W_i W_{i-1}`` when that one weight is zeroed::

    score = W_i[j, k]^2 * ||W_{i-1}[k, :]||^2 * ||W_{i+1}[:, j]||^2

A missing neighbour (first / last layer) counts as 1. In flax layouts (Dense kernel ``[in, out]``,
Conv kernel ``[kh, kw, in, out]``) the score of ``kernel[..., k, j]`` is
``kernel[..., k, j]^2 * in_norm[k] * out_norm[j]`` where a unit is a channel:

* ``in_norm[k]``: sum over every producer of input channel ``k`` of the squared weights into
  that channel (for a conv producer: over its spatial and input-channel axes), plus 1 for each
  parameter-free identity skip arriving there (and 1 for the model input itself);
* ``out_norm[j]``: sum over every consumer of output channel ``j`` of the squared weights out of
  that channel, plus 1 for each identity skip leaving it.

Which kernels are neighbours comes from a :class:`prospr_jax.graph.LayerGraph`:
traced from the model by default (residual sums, NHWC flattening ``f mod C``, global pooling,
option-A channel padding; see :mod:`prospr_jax.methods.layer_graph`), the plain chain of the
official code with ``chain=True``, or an explicit ``neighbours=`` mapping.

BatchNorm: with ``bn_fold=True`` the per-channel factor ``s = gamma / sqrt(running_var + eps)``
between a kernel and its neighbours multiplies the neighbour norms by ``s^2`` (the norms of the
network with ``s`` folded into the weights; the official code did the same for the BN after the
previous layer and after the layer itself). In a traced graph the factor also multiplies the
identity skip leaving a BN'd kernel (the official code added a bare 1 there).

Pruning is layerwise: every pruned layer keeps exactly ``ceil(d * N_l)`` weights. LAP scores all
layers on the original weights; LAP-forward prunes the layers in forward order, each scored with
the already pruned previous layers; LAP-backward goes in reverse order with the already pruned
next layers.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from prospr_jax._src.jaxpr.forward_order import forward_order
from prospr_jax._src.jaxpr.layer_graph import LayerGraph, LayerTrace, trace_layer_graph
from prospr_jax._src.jaxpr.walk import abstract
from prospr_jax._src.masks import masks_from_scores
from prospr_jax._src.problem import PruningProblem
from prospr_jax._src.prunable import default_prunable
from prospr_jax._src.tree import PyTree, map_with_names, named_leaves, names_in_order, path_name
from prospr_jax._src.validate import check_bool, check_choice
from prospr_jax.methods.base import Method, PruneResult, register
from prospr_jax.methods.rules import MaskRule

VARIANTS = ("lap", "forward", "backward")

BNScales = Optional[Sequence[Optional[Any]]]

_NO_RUNNING_STATS = (
    "bn_fold=True folds BatchNorm's gamma / sqrt(running_var + eps) into the neighbour norms, which "
    "needs the BatchNorm running statistics: the model must run in inference mode as "
    "`problem.apply_fn(params, problem.model_state, x, False)` with the statistics in "
    "`problem.model_state` (for flax: variables['batch_stats']). Provide them, or pass bn_fold=False"
)


# --------------------------------------------------------------------------------------------
# Functional core
# --------------------------------------------------------------------------------------------


def _kernels(params: PyTree, graph: LayerGraph) -> dict[str, jax.Array]:
    leaves = dict(named_leaves(params))
    return {name: jnp.asarray(leaves[name]) for name in graph.layers}


def _check_scales(graph: LayerGraph, bn_scales: BNScales) -> list:
    if bn_scales is None:
        return [None] * len(graph.edges)
    scales = list(bn_scales)
    if len(scales) != len(graph.edges):
        raise ValueError(
            f"`bn_scales` must have one entry (None or a per-unit array) per graph edge: got {len(scales)} "
            f"for {len(graph.edges)} edges"
        )
    for e, s in zip(graph.edges, scales):
        if s is not None and np.shape(s) != e.index.shape:
            raise ValueError(
                f"`bn_scales` entry for edge {e.src} -> {e.dst} has shape {np.shape(s)}, expected {e.index.shape}"
            )
    return scales


def _row_sq(kernel: jax.Array) -> jax.Array:
    """Squared norm of the weights into each output unit: [C_out]."""
    return jnp.sum(jnp.square(kernel), axis=tuple(range(kernel.ndim - 1)))


def _col_sq(kernel: jax.Array) -> jax.Array:
    """Squared norm of the weights out of each input unit: [C_in]."""
    axes = tuple(a for a in range(kernel.ndim) if a != kernel.ndim - 2)
    return jnp.sum(jnp.square(kernel), axis=axes)


def _in_norm(kernels: Mapping[str, jax.Array], graph: LayerGraph, scales: list, name: str) -> jax.Array:
    kernel = kernels[name]
    total = None
    for e, s in zip(graph.edges, scales):
        if e.dst != name:
            continue
        valid = e.index >= 0
        if e.src is None:
            contrib = jnp.asarray(valid, kernel.dtype)
        else:
            contrib = _row_sq(kernels[e.src])[np.where(valid, e.index, 0)] * jnp.asarray(valid, kernel.dtype)
        if s is not None:
            contrib = contrib * jnp.square(jnp.asarray(s, kernel.dtype))
        total = contrib if total is None else total + contrib
    return jnp.ones((kernel.shape[-2],), kernel.dtype) if total is None else total


def _out_norm(kernels: Mapping[str, jax.Array], graph: LayerGraph, scales: list, name: str) -> jax.Array:
    kernel = kernels[name]
    units = kernel.shape[-1]
    total = None
    for e, s in zip(graph.edges, scales):
        if e.src != name:
            continue
        valid = e.index >= 0
        vals = jnp.asarray(valid, kernel.dtype)
        if e.dst is not None:
            vals = vals * _col_sq(kernels[e.dst])
        if s is not None:
            vals = vals * jnp.square(jnp.asarray(s, kernel.dtype))
        contrib = jnp.zeros((units,), kernel.dtype).at[np.where(valid, e.index, 0)].add(vals)
        total = contrib if total is None else total + contrib
    return jnp.ones((units,), kernel.dtype) if total is None else total


def lap_neighbour_norms(
    params: PyTree, graph: LayerGraph, *, bn_scales: BNScales = None
) -> dict[str, tuple[jax.Array, jax.Array]]:
    """``{name: (in_norm [C_in], out_norm [C_out])}`` for every layer of ``graph``.

    ``in_norm[k]`` sums, over the edges into the layer, the squared weights into the producer's
    unit ``index[k]`` (1 for an input / identity edge), times ``bn_scales[e][k]^2``;
    ``out_norm[j]`` sums, over the edges out of the layer, the squared weights out of every
    consumer unit fed by unit ``j`` (1 for an identity edge), times the squared scale. A layer
    without edges in (out) gets all ones. Jittable (the graph is static); jitted internally.
    """
    graph.check(params)
    scales = _check_scales(graph, bn_scales)
    return jax.jit(functools.partial(_norms_impl, graph=graph))(params, scales)


def _norms_impl(params: PyTree, scales: list, graph: LayerGraph) -> dict[str, tuple[jax.Array, jax.Array]]:
    kernels = _kernels(params, graph)
    return {n: (_in_norm(kernels, graph, scales, n), _out_norm(kernels, graph, scales, n)) for n in graph.layers}


def _layer_score(kernels: Mapping[str, jax.Array], graph: LayerGraph, scales: list, name: str) -> jax.Array:
    kernel = kernels[name]
    in_norm = _in_norm(kernels, graph, scales, name)
    out_norm = _out_norm(kernels, graph, scales, name)
    return jnp.square(kernel) * in_norm[:, None] * out_norm[None, :]


def lap_scores(params: PyTree, graph: LayerGraph, *, bn_scales: BNScales = None) -> PyTree:
    """LAP scores ``W[..., k, j]^2 * in_norm[k] * out_norm[j]`` of the layers in ``graph.scored``.

    Args:
      params: the parameter pytree (the kernels are read by path name).
      graph: a :class:`LayerGraph` (static: close over it when jitting).
      bn_scales: ``None`` (no folding) or one entry per ``graph.edges``: ``None`` or a per-unit
        array of the BatchNorm factors ``s`` on that edge (squared here). See
        :func:`problem_layer_graph`.

    Returns:
      A scores pytree with ``params``' structure: full-shape scores on ``graph.scored`` leaves,
      0-d zeros elsewhere (the convention of :func:`prospr_jax.masks_from_scores`).
    """
    graph.check(params)
    scales = _check_scales(graph, bn_scales)
    missing = sorted(set(graph.scored) - set(graph.layers))
    if missing:
        raise ValueError(f"`graph.scored` names leaves that are not layers of the graph: {names_in_order(missing)}")
    return jax.jit(functools.partial(_scores_impl, graph=graph))(params, scales)


def _scores_impl(params: PyTree, scales: list, graph: LayerGraph) -> PyTree:
    kernels = _kernels(params, graph)
    scored = set(graph.scored)
    return map_with_names(
        lambda n, p: _layer_score(kernels, graph, scales, n) if n in scored else jnp.zeros((), jnp.result_type(p)),
        params,
    )


def _layer_score_impl(params: PyTree, scales: list, graph: LayerGraph, name: str) -> jax.Array:
    return _layer_score(_kernels(params, graph), graph, scales, name)


# --------------------------------------------------------------------------------------------
# Graphs of a PruningProblem
# --------------------------------------------------------------------------------------------


def _example_input(problem: PruningProblem) -> Optional[jax.ShapeDtypeStruct]:
    if problem.input_shape is not None:
        leaves = jax.tree_util.tree_leaves(problem.params)
        floats = [x for x in leaves if jnp.issubdtype(jnp.result_type(x), jnp.floating)]
        dtype = jnp.result_type(floats[0]) if floats else jnp.float32
        return jax.ShapeDtypeStruct((2, *tuple(problem.input_shape)), dtype)
    if problem.batch_fn is not None:
        batch = problem.batch(0)
        if isinstance(batch, Mapping) and "image" in batch:
            return jax.ShapeDtypeStruct(np.shape(batch["image"]), jnp.result_type(batch["image"]))
    return None


def _model_call(problem: PruningProblem, bn_fold: bool) -> tuple[str, Any, PyTree, PyTree]:
    """``(mode, fn(params, state, inputs), state, inputs)`` to trace: inference mode through
    ``apply_fn`` when possible, else the loss on batch 0."""
    failures = []
    x = _example_input(problem) if problem.apply_fn is not None else None
    if x is not None:
        state = problem.model_state if problem.model_state is not None else {}

        def inference(p: PyTree, s: PyTree, xs: Any) -> Any:
            return problem.apply_fn(p, s, xs, False)

        try:
            jax.eval_shape(inference, problem.params, state, x)
            return "inference", inference, state, x
        except Exception as err:  # noqa: BLE001 - reported below with the original message
            if bn_fold:
                raise ValueError(
                    f"{_NO_RUNNING_STATS} (apply_fn(..., train=False) failed: {type(err).__name__}: {err})"
                ) from err
            failures.append(f"apply_fn(..., train=False): {type(err).__name__}: {err}")
    if problem.batch_fn is not None:

        def loss(p: PyTree, s: PyTree, batch: Any) -> Any:
            del s
            return problem.loss_fn(p, batch)

        batch = abstract(problem.batch(0))
        try:
            jax.eval_shape(loss, problem.params, {}, batch)
            return "loss", loss, {}, batch
        except Exception as err:  # noqa: BLE001
            failures.append(f"loss_fn(params, batch 0): {type(err).__name__}: {err}")
    raise ValueError(
        "lookahead pruning traces the model to find each layer's neighbours: the PruningProblem needs "
        "`apply_fn` with `input_shape` (or `batch_fn`), or `batch_fn` for `loss_fn`"
        + ("; tracing failed: " + "; ".join(failures) if failures else "")
    )


def _kernel_names(params: PyTree, order: Sequence[str], scored: Sequence[str]) -> list[str]:
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    kernels = {path_name(path) for path, leaf in leaves if default_prunable(path, leaf)} | set(scored)
    return [n for n in order if n in kernels]


def _own_scale_edges(graph: LayerGraph, own: Mapping[str, Optional[np.ndarray]]) -> Optional[tuple]:
    scales = []
    for e in graph.edges:
        s = own.get(e.src) if e.src is not None else None
        if s is None:
            scales.append(None)
        else:
            scales.append(np.where(e.index >= 0, np.asarray(s)[np.where(e.index >= 0, e.index, 0)], 1.0))
    return tuple(scales) if any(s is not None for s in scales) else None


def _problem_graph(
    problem: PruningProblem, *, bn_fold: bool, chain: bool, neighbours: Optional[Mapping[str, Any]]
) -> tuple[LayerGraph, Optional[tuple], dict[str, Any]]:
    if not isinstance(problem, PruningProblem):
        raise TypeError(f"`problem` must be a PruningProblem, got {type(problem).__name__}")
    bn_fold, chain = check_bool(bn_fold, "bn_fold"), check_bool(chain, "chain")
    if chain and neighbours is not None:
        raise ValueError("pass either `chain=True` or `neighbours=`, not both")
    params = problem.params
    scored = [n for n, keep in named_leaves(problem.prunable_tree()) if keep]
    mode, fn, state, inputs = _model_call(problem, bn_fold)
    details: dict[str, Any] = {"trace_mode": mode}
    trace: Optional[LayerTrace] = None
    if bn_fold or (not chain and neighbours is None):
        trace = trace_layer_graph(fn, params, state, inputs)
        if bn_fold and trace.batch_stat_layers:
            raise ValueError(
                f"{_NO_RUNNING_STATS}. The model normalises with batch statistics (BatchNorm in training mode) "
                f"before {names_in_order(trace.batch_stat_layers)}"
            )
    if chain or neighbours is not None:
        order = _kernel_names(params, forward_order(fn, params, state, inputs), scored)
        if chain:
            graph, mismatched = LayerGraph.chain(params, order, scored)
            details["chain_mismatches"] = [list(pair) for pair in mismatched]
            if mismatched:
                warnings.warn(
                    "chain=True: consecutive kernels with incompatible unit counts are not neighbours "
                    f"(their norm counts as missing = 1): {mismatched}",
                    stacklevel=3,
                )
        else:
            graph = LayerGraph.from_neighbours(neighbours, params, order, scored)
        scales = None
        if trace is not None:
            scales = _own_scale_edges(graph, trace.own_scales)
            unread = [n for n in graph.layers if graph.out_edges(n) and n not in trace.own_scales]
            if unread:
                warnings.warn(
                    "bn_fold=True: the traced data flow stops (at an unsupported operation) before the "
                    f"BatchNorm factors of {names_in_order(unread)} could be read; they are not folded",
                    stacklevel=3,
                )
    else:
        if trace.unsupported:
            raise ValueError(
                "lookahead pruning could not derive the layer graph from the model: "
                + "; ".join(trace.unsupported[:3])
                + (f" (and {len(trace.unsupported) - 3} more)" if len(trace.unsupported) > 3 else "")
                + ". Pass chain=True to treat the layers as a plain chain in forward order (the official "
                "code's convention), or neighbours={path_name: {'producers': [...], 'consumers': [...], "
                "'identity_in': bool, 'identity_out': bool}} to give the graph explicitly"
            )
        missing = [n for n in scored if n not in trace.layers]
        if missing:
            raise ValueError(
                f"pruned leaves {names_in_order(missing)} are not kernels of a Conv/Dense product on the model's "
                "data path; pass chain=True or neighbours=..."
            )
        graph = trace.graph([n for n in trace.layers if n in set(scored)])
        scales = tuple(trace.scales) if any(s is not None for s in trace.scales) else None
    if not bn_fold:
        scales = None
    return graph, scales, details


def problem_layer_graph(
    problem: PruningProblem,
    *,
    bn_fold: bool = True,
    chain: bool = False,
    neighbours: Optional[Mapping[str, Mapping[str, Any]]] = None,
) -> tuple[LayerGraph, Optional[tuple]]:
    """The layer graph and BatchNorm factors LAP uses for ``problem``.

    Args:
      problem: the pruning problem. The model is traced in inference mode through
        ``apply_fn(params, model_state, x, False)`` (``x`` of shape ``(2, *input_shape)``, or of
        batch 0's ``'image'``) when possible, else through ``loss_fn`` on batch 0.
      bn_fold: fold ``s = gamma / sqrt(running_var + eps)`` in (needs the running statistics:
        a clear ``ValueError`` when the model has BatchNorm but they are not available; a no-op
        for models without BatchNorm).
      chain: the official code's convention: neighbours are the previous and the next kernel in
        forward order (:func:`prospr_jax.forward_order`), units matched by count.
      neighbours: an explicit graph, see :meth:`LayerGraph.from_neighbours`.

    Returns:
      ``(graph, bn_scales)`` for :func:`lap_scores`; ``bn_scales`` is ``None`` when nothing is
      folded.
    """
    graph, scales, _ = _problem_graph(problem, bn_fold=bn_fold, chain=chain, neighbours=neighbours)
    return graph, scales


# --------------------------------------------------------------------------------------------
# Masks
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LapOptions:
    """Options of lookahead pruning.

    Attributes:
      bn_fold: fold BatchNorm factors into the neighbour norms (see :func:`problem_layer_graph`).
      chain: use the official code's plain chain of layers instead of the traced graph.
      neighbours: an explicit layer graph (see :meth:`LayerGraph.from_neighbours`).
    """

    bn_fold: bool = True
    chain: bool = False
    neighbours: Optional[Mapping[str, Mapping[str, Any]]] = None

    def __post_init__(self) -> None:
        check_bool(self.bn_fold, "bn_fold")
        check_bool(self.chain, "chain")
        if self.chain and self.neighbours is not None:
            raise ValueError("pass either `chain=True` or `neighbours=`, not both")


def _lap(problem: PruningProblem, sparsity: float, variant: str, options: LapOptions, min_per_layer: int) -> PruneResult:
    check_choice(variant, "variant", VARIANTS)
    graph, scales, details = _problem_graph(
        problem, bn_fold=options.bn_fold, chain=options.chain, neighbours=options.neighbours
    )
    scale_list = _check_scales(graph, scales)
    graph.check(problem.params)
    order = [n for n in graph.layers if n in set(graph.scored)]
    if variant == "lap":
        scores = lap_scores(problem.params, graph, bn_scales=scales)
        masks = masks_from_scores(scores, sparsity, scope="layerwise", min_per_layer=min_per_layer)
    else:
        if variant == "backward":
            order = order[::-1]
        current = problem.params
        layer_masks: dict[str, jax.Array] = {}
        for name in order:
            score = jax.jit(functools.partial(_layer_score_impl, graph=graph, name=name))(current, scale_list)
            mask = masks_from_scores({name: score}, sparsity, scope="layerwise", min_per_layer=min_per_layer)[name]
            layer_masks[name] = mask
            current = map_with_names(
                lambda n, p, m=mask, t=name: p * m.astype(jnp.result_type(p)) if n == t else p, current
            )
        masks = map_with_names(
            lambda n, p: layer_masks[n] if n in layer_masks else jnp.ones((), jnp.result_type(p)), problem.params
        )
    leaves = dict(named_leaves(masks))
    extras = {
        "variant": variant,
        "graph": graph.source,
        "trace_mode": details["trace_mode"],
        "bn_folded": scales is not None,
        "order": list(order),
        "kept": {n: int(jnp.count_nonzero(leaves[n])) for n in order},
        "neighbours": graph.neighbours(),
    }
    if "chain_mismatches" in details:
        extras["chain_mismatches"] = details["chain_mismatches"]
    return PruneResult(masks=masks, extras=extras)


class _Lookahead(Method):
    paper = "Park et al., ICLR 2020"
    data = "none"
    Options = LapOptions
    rules = ("min_per_layer",)
    variant = "lap"

    def prune(self, problem: PruningProblem, sparsity: float, options: LapOptions, rule: MaskRule) -> PruneResult:
        """Layerwise lookahead pruning: every pruned layer keeps exactly ``ceil((1 - sparsity) * N_l)``
        weights (ties: the earlier entry is kept); the problem's model is traced for the layer graph.

        ``extras`` holds ``'variant'``, ``'graph'`` (``'traced'``/``'chain'``/``'explicit'``),
        ``'trace_mode'``, ``'bn_folded'``, ``'order'`` (layers in the order they were pruned),
        ``'kept'`` per layer and ``'neighbours'``.
        """
        return _lap(problem, sparsity, self.variant, options, rule.min_per_layer)


@register
class Lap(_Lookahead):
    name = "lap"
    idea = "lookahead distortion W[j,k]^2 * ||W_prev[k,:]||^2 * ||W_next[:,j]||^2, layerwise"
    cost = "one pass over the weights"


@register
class LapForward(_Lookahead):
    name = "lap_forward"
    idea = "LAP pruning layers first to last, each with its already pruned predecessor"
    cost = "one pass per layer, sequential"
    variant = "forward"


@register
class LapBackward(_Lookahead):
    name = "lap_backward"
    idea = "LAP pruning layers last to first, each with its already pruned successor"
    cost = "one pass per layer, sequential"
    variant = "backward"


__all__ = [
    "Lap",
    "LapBackward",
    "LapForward",
    "LapOptions",
    "lap_neighbour_norms",
    "lap_scores",
    "problem_layer_graph",
]
