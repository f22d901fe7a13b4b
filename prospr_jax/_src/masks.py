"""Mask pytrees: from scores to masks, applying masks, and reporting sparsity.

Representation
--------------
A *mask* is a pytree with the structure of the params. Each leaf holds 0s and 1s (1 = keep; floats
or booleans) and broadcasts against its parameter leaf:

* full shape ``param.shape`` for an unstructured (per-weight) mask;
* ``[1, ..., 1, C_out]`` for a channel mask (flax kernels keep the output channel on the LAST axis);
* a 0-d array ``1.0`` for a leaf that is not pruned (biases, BatchNorm, excluded layers).

A *scores* pytree follows the same rule: a leaf of ``ndim >= 1`` holds one score per mask entry
(higher = keep); a 0-d leaf marks a leaf that is not pruned. Every scorer in the library returns
scores in this form, so ``masks_from_scores(scorer(...), sparsity)`` needs nothing else.

Masks are data, not compile-time constants: they pass through ``jit`` as arrays, so a new mask of the
same kind does not recompile anything.

Bad values are errors where they can be seen: concrete masks must hold only 0 and 1 (a 0.5 would
scale weights, a -1 flip them, a NaN poison them), concrete scores must be real and finite. Under
``jit`` values cannot be checked on the host, so bad values are made loud instead of silently wrong:
non-finite scores turn the WHOLE mask into NaN, and a traced mask entry other than 0 or 1 turns its
weight into NaN in :func:`apply_masks`.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, Mapping, Union

import jax
import jax.numpy as jnp
import numpy as np

from prospr_jax._src.prunable import PrunableSpec, select_prunable
from prospr_jax._src.topk import top_k_flags
from prospr_jax._src.tree import PyTree, any_traced, is_traced, named_leaves, names_in_order, path_name
from prospr_jax._src.validate import (
    check_finite,
    check_int,
    check_real_dtype,
    check_same_structure,
    check_sparsity,
    check_zero_one,
)

Scope = Union[str, Mapping[str, float]]
SCOPES = ("global", "layerwise")


class LayerCollapseWarning(UserWarning):
    """A pruned layer kept zero weights: the network is disconnected there."""


class SparsityWarning(UserWarning):
    """The masks keep more weights than the requested sparsity allows (a per-layer floor won)."""


def kept_count(density: float, n: int) -> int:
    """``ceil(density * n)``, with ``density * n`` first rounded to 6 decimals.

    The rounding makes decimal sparsities give the count a person would compute: 70% sparsity of
    10 weights keeps 3, although ``(1 - 0.7) * 10 == 3.0000000000000004`` in binary floating point.
    """
    return int(min(n, max(0, math.ceil(round(density * n, 6)))))


def is_pruned_leaf(leaf: Any) -> bool:
    """True for a mask or scores leaf that describes a pruned parameter (``ndim >= 1``)."""
    return np.ndim(leaf) >= 1


def _mask_dtype(score_leaf: Any) -> Any:
    dtype = jnp.result_type(score_leaf)
    return dtype if jnp.issubdtype(dtype, jnp.floating) else jnp.float32


def _layer_densities(scope: Mapping[str, float], names: list[str]) -> list[float]:
    unknown = sorted(set(scope) - set(names))
    missing = [n for n in names if n not in scope]
    if unknown or missing:
        raise ValueError(
            "a per-layer density mapping in `scope` must name exactly the pruned leaves; "
            f"unknown: {names_in_order(unknown) or 'none'}; missing: {names_in_order(missing) or 'none'}"
        )
    densities = []
    for n in names:
        d = float(scope[n])
        if not 0.0 <= d <= 1.0:
            raise ValueError(f"per-layer density for `{n}` in `scope` must be in [0, 1], got {scope[n]!r}")
        densities.append(d)
    return densities


def _layer_floor_flags(score: jax.Array, floor: int) -> jax.Array:
    return top_k_flags(score.reshape(-1), min(floor, score.size))


def _apply_layer_floor(names: list[str], sizes: list[int], counts: list[int], min_per_layer: int) -> list[int]:
    """Per-layer kept counts raised to ``min(min_per_layer, N_l)``; a :class:`SparsityWarning` naming the
    layers where the floor keeps more than the requested count, with the sparsity actually reached."""
    floors = [min(min_per_layer, n) for n in sizes]
    raised = [f"{name} ({k} -> {f} of {n})" for name, n, k, f in zip(names, sizes, counts, floors) if f > k]
    final = [max(k, f) for k, f in zip(counts, floors)]
    if raised:
        total = sum(sizes)
        warnings.warn(
            f"`min_per_layer`={min_per_layer} keeps more weights than the requested density in {len(raised)} "
            f"layer(s): {names_in_order(raised)}; sparsity {1 - sum(final) / total:.4f} instead of "
            f"{1 - sum(counts) / total:.4f}. Lower `min_per_layer`, or use scope='global', which keeps the "
            "total exact by moving the budget between layers",
            SparsityWarning,
            stacklevel=3,
        )
    return final


def masks_from_scores(
    scores: PyTree,
    sparsity: float | None,
    *,
    scope: Scope = "global",
    min_per_layer: int = 0,
) -> PyTree:
    """Masks that keep the highest-scoring entries.

    Args:
      scores: pytree of scores (see the module docstring): leaves of ``ndim >= 1`` are ranked, 0-d
        leaves are not pruned and get a 0-d mask ``1.0``. Scores must be real (float, int or bool)
        and finite.
      sparsity: fraction of the ranked entries to remove, in [0, 1). ``None`` only when ``scope``
        is a per-layer density mapping.
      scope: ``'global'`` keeps exactly ``ceil((1 - sparsity) * N)`` of the N ranked entries with one
        threshold over all layers (the convention of SNIP, ProsPr and most pruning-at-init papers);
        ``'layerwise'`` keeps ``ceil((1 - sparsity) * N_l)`` in every layer; a mapping
        ``{path_name: density}`` (for example from :func:`prospr_jax.methods.erk_densities`) keeps
        ``ceil(d_l * N_l)`` in each layer.
      min_per_layer: layer-collapse guard: every pruned layer keeps at least ``min(min_per_layer,
        N_l)`` entries (its highest-scoring ones). In ``'global'`` scope the total stays exactly
        ``ceil((1 - sparsity) * N)``: the guaranteed entries are taken first and the rest of the
        budget is filled globally (a ``ValueError`` when the guaranteed entries alone exceed it). In
        the per-layer scopes each layer keeps ``max(k_l, min(min_per_layer, N_l))``: where the floor
        wins, the requested sparsity is not reached and a :class:`SparsityWarning` names the layers
        and the sparsity reached.

    Returns:
      A mask pytree with ``scores``' structure; leaves are float arrays (the scores' float dtype,
      float32 for integer or bool scores) of 0s and 1s with the scores leaves' shapes.

    Raises:
      TypeError: non-real scores (complex, ...).
      ValueError: non-finite scores (outside ``jit``), a bad ``sparsity``/``scope``/``min_per_layer``,
        or a global floor larger than the kept budget.

    Ties are broken deterministically: among equal scores the entry earlier in flattening order
    (leaves in pytree order, entries in row-major order) is kept. Under ``jit`` the scores cannot be
    checked on the host: non-finite scores then turn the whole mask (every leaf) into NaN (loudly
    wrong instead of silently). Outside ``jit`` a layer left empty warns with
    :class:`LayerCollapseWarning`.
    """
    named = named_leaves(scores)
    ranked = [(name, s) for name, s in named if is_pruned_leaf(s)]
    if not ranked:
        raise ValueError("`scores` has no leaf with ndim >= 1: nothing to prune")
    check_real_dtype(ranked, "scores")
    min_per_layer = check_int(min_per_layer, "min_per_layer", low=0)
    names = [n for n, _ in ranked]
    sizes = [int(np.size(s)) for _, s in ranked]

    if isinstance(scope, Mapping):
        if sparsity is not None:
            raise ValueError("pass either `sparsity` or a per-layer density mapping as `scope`, not both")
        layer_counts = [kept_count(d, n) for d, n in zip(_layer_densities(scope, names), sizes)]
    else:
        if not isinstance(scope, str) or scope not in SCOPES:
            raise ValueError(f"`scope` must be 'global', 'layerwise' or a mapping {{path_name: density}}, got {scope!r}")
        if sparsity is None:
            raise ValueError(f"`sparsity` is required with scope={scope!r}")
        density = 1.0 - check_sparsity(sparsity)
        layer_counts = [kept_count(density, n) for n in sizes]

    traced = any_traced([s for _, s in ranked])
    if not traced:
        check_finite(ranked, "scores")

    floats = [jnp.asarray(s).astype(_mask_dtype(s)) for _, s in ranked]
    if scope == "global":
        total_kept = kept_count(density, sum(sizes))
        keys = [s.reshape(-1) for s in floats]
        if min_per_layer:
            floor_total = sum(min(min_per_layer, n) for n in sizes)
            if floor_total > total_kept:
                raise ValueError(
                    f"`min_per_layer`={min_per_layer} needs {floor_total} kept entries but sparsity "
                    f"{sparsity} keeps only {total_kept}"
                )
            keys = [jnp.where(_layer_floor_flags(s, min_per_layer), jnp.inf, k) for s, k in zip(floats, keys)]
        common = jnp.result_type(*keys)
        flags = top_k_flags(jnp.concatenate([k.astype(common) for k in keys]), total_kept)
        flat_masks = jnp.split(flags, np.cumsum(sizes)[:-1])
    else:
        layer_counts = _apply_layer_floor(names, sizes, layer_counts, min_per_layer)
        flat_masks = [top_k_flags(s.reshape(-1), k) for s, k in zip(floats, layer_counts)]

    masks_by_name = {name: flag.reshape(s.shape).astype(f.dtype) for (name, s), f, flag in zip(ranked, floats, flat_masks)}
    out = jax.tree_util.tree_map_with_path(
        lambda p, s: masks_by_name[path_name(p)] if is_pruned_leaf(s) else jnp.ones((), _mask_dtype(s)),
        scores,
    )
    if traced:
        # One NaN score anywhere poisons every leaf: a mask computed from it is wrong as a whole.
        finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(f)) for f in floats]))
        return jax.tree_util.tree_map(lambda m: jnp.where(finite, m, jnp.nan).astype(m.dtype), out)
    if min_per_layer == 0:
        counts = jax.device_get([jnp.count_nonzero(masks_by_name[n]) for n in names])
        empty = [n for n, c in zip(names, counts) if c == 0]
        if empty:
            warnings.warn(
                f"layer collapse: {len(empty)} pruned layer(s) kept no weights: {names_in_order(empty)}; "
                "use `min_per_layer=` to keep a few weights in every layer",
                LayerCollapseWarning,
                stacklevel=2,
            )
    return out


def scores_on_prunable(values: PyTree, prunable: PyTree) -> PyTree:
    """``values`` on the leaves where the bool pytree ``prunable`` is True, a 0-d zero elsewhere:
    the scores convention of this module, ready for :func:`masks_from_scores`."""
    check_same_structure(values, prunable, arg="values", ref_arg="prunable")
    return jax.tree_util.tree_map(
        lambda keep, v: v if keep else jnp.zeros((), jnp.result_type(v)), prunable, values
    )


def rank_below_kept(scores: PyTree, masks: PyTree) -> PyTree:
    """``scores`` with every entry that ``masks`` already prunes set to ``-1``.

    The rule of every method that prunes in rounds (Iter-SNIP, SynFlow, DRIVE, IMP): for non-negative
    scores it puts every pruned entry strictly below every kept one, so a round that keeps no more
    entries than are alive only removes live ones (the masks shrink monotonically). 0-d (unpruned)
    leaves pass through. Works under ``jit``.
    """
    return jax.tree_util.tree_map(
        lambda s, m: jnp.where(jnp.asarray(m) != 0, s, -1).astype(jnp.result_type(s)) if is_pruned_leaf(s) else s,
        scores,
        masks,
    )


def dense_masks(params: PyTree, prunable: PrunableSpec = None) -> PyTree:
    """All-ones masks: full-shape ``1.0`` on the prunable leaves, 0-d ``1.0`` elsewhere.

    ``prunable`` is anything :func:`prospr_jax.select_prunable` takes (default: Conv/Dense kernels).
    Mask leaves take the parameter's dtype.
    """
    selected = select_prunable(params, prunable)
    return jax.tree_util.tree_map(
        lambda keep, p: jnp.ones(np.shape(p) if keep else (), jnp.result_type(p)), selected, params
    )


def check_masks(masks: PyTree, params: PyTree, *, arg: str = "masks") -> None:
    """Raise unless ``masks`` fits ``params``: same tree structure, every mask leaf broadcasts to its
    parameter's shape without enlarging it, and (for concrete masks) holds only 0 and 1.

    Raises:
      ValueError: naming ``arg`` and the offending leaves.
      TypeError: mask leaves that are not real (complex, strings).
    """
    check_same_structure(masks, params, arg=arg)
    named = named_leaves(masks)
    bad = []
    for (name, m), (_, p) in zip(named, named_leaves(params)):
        m_shape, p_shape = np.shape(m), np.shape(p)
        try:
            ok = np.broadcast_shapes(m_shape, p_shape) == tuple(p_shape)
        except ValueError:
            ok = False
        if not ok or len(m_shape) > len(p_shape):
            bad.append(f"{name}: mask {m_shape} vs param {p_shape}")
    if bad:
        raise ValueError(
            f"`{arg}` leaves must broadcast to their parameter's shape (full shape, [1,...,1,C] or 0-d): "
            + "; ".join(bad[:5])
        )
    try:
        check_zero_one(named, arg)
    except ValueError as err:
        hint = ""
        if any(np.any(np.isnan(np.asarray(m, float))) for _, m in named if not is_traced(m)):
            hint = " (NaN masks come from non-finite scores under jit: check the scores)"
        raise ValueError(f"{err}{hint}") from None


def apply_masks(params: PyTree, masks: PyTree) -> PyTree:
    """``params`` with the entries that ``masks`` prunes set to exactly ``0.0``; kept entries unchanged.

    Pruned entries are zero whatever the parameter holds there (also ``-x``, ``inf`` or ``NaN``), and
    the result keeps each parameter's dtype. Works under ``jit``/``grad``/``vmap``. Concrete masks are
    checked (:func:`check_masks`: 0/1 values only); a TRACED mask entry other than 0 or 1 (which
    cannot be checked) makes its weight NaN, so a bad mask inside a jitted step shows up as a
    diverged loss instead of silently scaled weights.
    """
    check_masks(masks, params)

    def one(p: jax.Array, m: jax.Array) -> jax.Array:
        m = jnp.asarray(m)
        zero = jnp.zeros((), jnp.result_type(p))
        if not is_traced(m) or not jnp.issubdtype(jnp.result_type(p), jnp.floating):
            return jnp.where(m == 0, zero, p)
        return jnp.where(m == 0, zero, jnp.where(m == 1, p, jnp.nan))

    return jax.tree_util.tree_map(one, params, masks)


@dataclasses.dataclass(frozen=True)
class LayerSparsity:
    """Kept / total weights of one pruned leaf."""

    name: str
    shape: tuple[int, ...]
    kept: int
    total: int

    @property
    def density(self) -> float:
        return self.kept / self.total if self.total else 1.0

    @property
    def sparsity(self) -> float:
        return 1.0 - self.density


@dataclasses.dataclass(frozen=True)
class SparsityReport:
    """Per-layer and global sparsity of a mask pytree (see :func:`sparsity_report`)."""

    layers: tuple[LayerSparsity, ...]
    prunable_kept: int
    prunable_total: int
    all_kept: int
    all_total: int

    @property
    def sparsity(self) -> float:
        """Sparsity over the pruned leaves (the paper convention)."""
        return 1.0 - self.prunable_kept / self.prunable_total if self.prunable_total else 0.0

    @property
    def sparsity_all_params(self) -> float:
        """Sparsity over every parameter, unpruned leaves included."""
        return 1.0 - self.all_kept / self.all_total if self.all_total else 0.0

    @property
    def empty_layers(self) -> tuple[str, ...]:
        """Pruned leaves that kept no weight (layer collapse)."""
        return tuple(layer.name for layer in self.layers if layer.kept == 0)

    def as_dict(self) -> dict[str, Any]:
        return {
            "layers": [
                {"name": l.name, "shape": list(l.shape), "kept": l.kept, "total": l.total, "density": l.density}
                for l in self.layers
            ],
            "prunable_kept": self.prunable_kept,
            "prunable_total": self.prunable_total,
            "sparsity": self.sparsity,
            "all_kept": self.all_kept,
            "all_total": self.all_total,
            "sparsity_all_params": self.sparsity_all_params,
            "empty_layers": list(self.empty_layers),
        }

    def __str__(self) -> str:
        width = max([len("layer")] + [len(l.name) for l in self.layers])
        lines = [f"{'layer':<{width}}  {'shape':>18}  {'kept':>10}  {'total':>10}  {'density':>8}"]
        for l in self.layers:
            flag = "  <- EMPTY" if l.kept == 0 else ""
            shape = "x".join(map(str, l.shape))
            lines.append(f"{l.name:<{width}}  {shape:>18}  {l.kept:>10,}  {l.total:>10,}  {l.density:>8.2%}{flag}")
        lines.append(
            f"{'prunable':<{width}}  {'':>18}  {self.prunable_kept:>10,}  {self.prunable_total:>10,}  "
            f"{1 - self.sparsity:>8.2%}   sparsity {self.sparsity:.2%}"
        )
        lines.append(
            f"{'all params':<{width}}  {'':>18}  {self.all_kept:>10,}  {self.all_total:>10,}  "
            f"{1 - self.sparsity_all_params:>8.2%}   sparsity {self.sparsity_all_params:.2%}"
        )
        if self.empty_layers:
            lines.append(f"WARNING: {len(self.empty_layers)} empty layer(s): {', '.join(self.empty_layers)}")
        return "\n".join(lines)


def sparsity_report(masks: PyTree, params: PyTree) -> SparsityReport:
    """Kept and total weights per pruned layer, over all pruned layers and over all parameters.

    Args:
      masks: a mask pytree (any of the leaf forms of the module docstring).
      params: the parameters, or just their shapes (e.g. ``jax.eval_shape`` output): needed because a
        channel mask or a 0-d mask does not say how many weights it covers.

    Returns:
      A :class:`SparsityReport`; ``str(report)`` is a printable table, ``report.as_dict()`` plain data.
      A mask entry counts as kept when it is non-zero. Leaves with a 0-d mask count as not pruned.
    """
    check_masks(masks, params)
    named_masks = named_leaves(masks)
    named_params = named_leaves(params)
    nonzero = jax.device_get([jnp.count_nonzero(jnp.asarray(m)) for _, m in named_masks])
    layers = []
    all_kept = all_total = 0
    for (name, m), (_, p), nz in zip(named_masks, named_params, nonzero):
        total = int(np.prod(np.shape(p), dtype=np.int64))
        per_entry = total // max(int(np.size(m)), 1)
        kept = int(nz) * per_entry
        all_total += total
        all_kept += kept
        if is_pruned_leaf(m):
            layers.append(LayerSparsity(name, tuple(np.shape(p)), kept, total))
    return SparsityReport(
        layers=tuple(layers),
        prunable_kept=sum(l.kept for l in layers),
        prunable_total=sum(l.total for l in layers),
        all_kept=all_kept,
        all_total=all_total,
    )
