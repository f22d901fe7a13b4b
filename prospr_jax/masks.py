"""Mask pytrees: from scores to masks, applying masks, and reporting sparsity.

Representation
--------------
A *mask* is a pytree with the structure of the params. Each leaf is a float array of 0s and 1s
(1 = keep) that broadcasts against its parameter leaf:

* full shape ``param.shape`` for an unstructured (per-weight) mask;
* ``[1, ..., 1, C_out]`` for a channel mask (flax kernels keep the output channel on the LAST axis);
* a 0-d array ``1.0`` for a leaf that is not pruned (biases, BatchNorm, excluded layers).

A *scores* pytree follows the same rule: a leaf of ``ndim >= 1`` holds one score per mask entry
(higher = keep); a 0-d leaf marks a leaf that is not pruned. Every scorer in the library returns
scores in this form, so ``masks_from_scores(scorer(...), sparsity)`` needs nothing else.

Masks are data, not compile-time constants: they pass through ``jit`` as arrays, so a new mask of the
same kind does not recompile anything.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, Mapping, Union

import jax
import jax.numpy as jnp
import numpy as np

from prospr_jax.prunable import PrunableSpec, select_prunable
from prospr_jax.tree import (
    PyTree,
    any_traced,
    check_same_structure,
    is_traced,
    named_leaves,
    names_in_order,
    path_name,
)

Scope = Union[str, Mapping[str, float]]


class LayerCollapseWarning(UserWarning):
    """A pruned layer kept zero weights: the network is disconnected there."""


def check_sparsity(sparsity: Any, arg: str = "sparsity") -> float:
    """Return ``sparsity`` as a Python float, or raise naming ``arg`` unless it is in [0, 1)."""
    if is_traced(sparsity):
        raise TypeError(f"`{arg}` must be a Python number (static under jit), got a traced value")
    try:
        value = float(sparsity)
    except (TypeError, ValueError):
        raise TypeError(f"`{arg}` must be a number in [0, 1), got {sparsity!r}") from None
    if not (0.0 <= value < 1.0) or math.isnan(value):
        raise ValueError(f"`{arg}` must be in [0, 1), got {sparsity!r}")
    return value


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


def _check_finite_scores(named: list[tuple[str, Any]]) -> None:
    flags = jax.device_get([jnp.all(jnp.isfinite(s)) for _, s in named])
    bad = [name for (name, _), ok in zip(named, flags) if not ok]
    if bad:
        raise ValueError(f"`scores` contain NaN or Inf in {names_in_order(bad)}")


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
        if not 0.0 <= d <= 1.0 or math.isnan(d):
            raise ValueError(f"per-layer density for `{n}` in `scope` must be in [0, 1], got {scope[n]!r}")
        densities.append(d)
    return densities


def _top_k_flags(flat_scores: jax.Array, k: int) -> jax.Array:
    """Boolean vector with True at the ``k`` largest entries; ties go to the lower index."""
    n = flat_scores.shape[0]
    if k >= n:
        return jnp.ones((n,), bool)
    if k == 0:
        return jnp.zeros((n,), bool)
    return _top_k_flags_compiled(flat_scores, jnp.asarray(k, jnp.int32))


@jax.jit
def _top_k_flags_compiled(flat_scores: jax.Array, k: jax.Array) -> jax.Array:
    # Find the k-th largest value exactly by bisection on the bits of an order-preserving unsigned
    # integer key (one counting pass per bit: linear time, far faster than sorting on CPU), then
    # keep every entry above it and, among the entries equal to it, the first ones in index order.
    # k is data, so one compiled program serves every k (iterative pruners change k each round).
    keys = _order_keys(flat_scores)
    nbits = keys.dtype.itemsize * 8

    def add_bit(i, threshold):
        candidate = threshold | (jnp.ones((), keys.dtype) << (nbits - 1 - i).astype(keys.dtype))
        return jnp.where(jnp.sum(keys >= candidate, dtype=jnp.int32) >= k, candidate, threshold)

    threshold = jax.lax.fori_loop(0, nbits, add_bit, jnp.zeros((), keys.dtype))
    above = keys > threshold
    tied = keys == threshold
    room = k - jnp.sum(above, dtype=jnp.int32)
    return above | (tied & (jnp.cumsum(tied, dtype=jnp.int32) <= room))


def _order_keys(values: jax.Array) -> jax.Array:
    """Unsigned integers ordered like the float ``values`` (``-0.0`` and ``0.0`` map to one key)."""
    if values.dtype != jnp.float64:
        values = values.astype(jnp.float32)
    uint, sint = (jnp.uint64, jnp.int64) if values.dtype == jnp.float64 else (jnp.uint32, jnp.int32)
    bits = jax.lax.bitcast_convert_type(jnp.where(values == 0, jnp.zeros((), values.dtype), values), sint)
    ubits = jax.lax.bitcast_convert_type(bits, uint)
    sign = jnp.ones((), uint) << (values.dtype.itemsize * 8 - 1)
    return jnp.where(bits < 0, ~ubits, ubits | sign)


def _layer_floor_flags(score: jax.Array, floor: int) -> jax.Array:
    return _top_k_flags(score.reshape(-1), min(floor, score.size))


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
        leaves are not pruned and get a 0-d mask ``1.0``. Scores must be finite.
      sparsity: fraction of the ranked entries to remove, in [0, 1). ``None`` only when ``scope``
        is a per-layer density mapping.
      scope: ``'global'`` keeps exactly ``ceil((1 - sparsity) * N)`` of the N ranked entries with one
        threshold over all layers (METHODS.md convention); ``'layerwise'`` keeps
        ``ceil((1 - sparsity) * N_l)`` in every layer; a mapping ``{path_name: density}`` (for
        example from :func:`prospr_jax.methods.erk_densities`) keeps ``ceil(d_l * N_l)`` in each
        layer.
      min_per_layer: layer-collapse guard: every pruned layer keeps at least
        ``min(min_per_layer, N_l)`` entries (its highest-scoring ones). In ``'global'`` scope the total
        stays exactly ``ceil((1 - sparsity) * N)``: the guaranteed entries are taken first and the rest
        of the budget is filled globally. Elsewhere each layer keeps ``max(k_l, min_per_layer)``.

    Returns:
      A mask pytree with ``scores``' structure; leaves are float arrays (the scores' float dtype,
      float32 for integer scores) of 0s and 1s with the scores leaves' shapes.

    Ties are broken deterministically: among equal scores the entry earlier in flattening order
    (leaves in pytree order, entries in row-major order) is kept. Under ``jit`` the scores cannot be
    checked on the host: non-finite scores then turn the whole mask into NaN (loudly wrong instead of
    silently). Outside ``jit``, non-finite scores raise and a layer left empty warns with
    :class:`LayerCollapseWarning`.
    """
    named = named_leaves(scores)
    ranked = [(name, s) for name, s in named if is_pruned_leaf(s)]
    if not ranked:
        raise ValueError("`scores` has no leaf with ndim >= 1: nothing to prune")
    if isinstance(min_per_layer, bool) or not isinstance(min_per_layer, (int, np.integer)) or min_per_layer < 0:
        raise ValueError(f"`min_per_layer` must be an integer >= 0, got {min_per_layer!r}")
    names = [n for n, _ in ranked]
    sizes = [int(np.size(s)) for _, s in ranked]

    if isinstance(scope, Mapping):
        if sparsity is not None:
            raise ValueError("pass either `sparsity` or a per-layer density mapping as `scope`, not both")
        layer_counts = [kept_count(d, n) for d, n in zip(_layer_densities(scope, names), sizes)]
    elif scope in ("global", "layerwise"):
        if sparsity is None:
            raise ValueError(f"`sparsity` is required with scope={scope!r}")
        density = 1.0 - check_sparsity(sparsity)
        layer_counts = [kept_count(density, n) for n in sizes]
    else:
        raise ValueError(f"`scope` must be 'global', 'layerwise' or a mapping {{path_name: density}}, got {scope!r}")

    traced = any_traced([s for _, s in ranked])
    if not traced:
        _check_finite_scores(ranked)

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
        flags = _top_k_flags(jnp.concatenate([k.astype(common) for k in keys]), total_kept)
        splits = np.cumsum(sizes)[:-1]
        flat_masks = jnp.split(flags, splits)
    else:
        flat_masks = []
        for s, k in zip(floats, layer_counts):
            k = max(k, min(min_per_layer, s.size))
            flat_masks.append(_top_k_flags(s.reshape(-1), k))

    masks_by_name = {}
    for (name, s), f, flag in zip(ranked, floats, flat_masks):
        mask = flag.reshape(s.shape).astype(f.dtype)
        if traced:
            mask = jnp.where(jnp.all(jnp.isfinite(f)), mask, jnp.nan)
        masks_by_name[name] = mask

    out = jax.tree_util.tree_map_with_path(
        lambda p, s: masks_by_name[path_name(p)] if is_pruned_leaf(s) else jnp.ones((), _mask_dtype(s)),
        scores,
    )
    if traced:
        return out
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


def dense_masks(params: PyTree, prunable: PrunableSpec = None) -> PyTree:
    """All-ones masks: full-shape ``1.0`` on the prunable leaves, 0-d ``1.0`` elsewhere.

    ``prunable`` is anything :func:`prospr_jax.prunable.select_prunable` takes (default: Conv/Dense
    kernels). Mask leaves take the parameter's dtype.
    """
    selected = select_prunable(params, prunable)
    return jax.tree_util.tree_map(
        lambda keep, p: jnp.ones(np.shape(p) if keep else (), jnp.result_type(p)), selected, params
    )


def check_masks(masks: PyTree, params: PyTree, *, arg: str = "masks") -> None:
    """Raise a ``ValueError`` naming ``arg`` unless ``masks`` matches ``params``: same tree structure and
    every mask leaf broadcasts to its parameter's shape without enlarging it."""
    check_same_structure(masks, params, arg=arg)
    bad = []
    for (name, m), (_, p) in zip(named_leaves(masks), named_leaves(params)):
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


def apply_masks(params: PyTree, masks: PyTree) -> PyTree:
    """``params * masks`` leaf by leaf, with pruned entries set to exactly ``0.0``.

    Pruned entries are zero whatever the parameter holds there (also ``-x``, ``inf`` or ``NaN``), and
    the result keeps each parameter's dtype. Works under ``jit``/``grad``/``vmap``.
    """
    check_masks(masks, params)

    def one(p: jax.Array, m: jax.Array) -> jax.Array:
        m = jnp.asarray(m).astype(jnp.result_type(p))
        return jnp.where(m == 0, jnp.zeros((), jnp.result_type(p)), p * m)

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
