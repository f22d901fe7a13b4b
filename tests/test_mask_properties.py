"""Property-based tests of the mask algebra: kept counts, tie-breaking, the global min_per_layer guard,
apply_masks and channel masks, each checked against an independent numpy reference.

Trees are assembled at random from a small alphabet of leaf shapes (1-d to 4-d, sizes 1 to 6), so that
the few programs jax compiles per shape are shared between examples and the file stays fast.
"""

from __future__ import annotations

import importlib
import math
import pkgutil
import warnings
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import experiments
import prospr_jax as pj

# Deterministic: the same examples on every machine and run, no example database in the working
# directory (a stored failure would otherwise make one run depend on an earlier one).
settings.register_profile(
    "prospr-deterministic", derandomize=True, deadline=None, max_examples=40, database=None, print_blob=True
)
DETERMINISTIC = settings.get_profile("prospr-deterministic")

# Hypothesis also draws constants it finds in the source of the project's modules that are loaded at
# the time (derandomize fixes only its random seed), so the examples would depend on which modules
# the tests run before these had imported. With every project module imported here, they do not.
for _package in (pj, experiments):
    for _module in pkgutil.walk_packages(_package.__path__, _package.__name__ + "."):
        importlib.import_module(_module.name)

LEAF_SHAPES = (
    (1,), (2,), (3,), (4,), (6,), (1, 1), (1, 3), (2, 2), (3, 2), (2, 3), (1, 2, 2), (2, 1, 3), (1, 1, 1, 4)
)
KERNEL_SHAPES = ((1, 1), (2, 4), (3, 1), (1, 3), (3, 3, 2), (1, 1, 4), (2, 1, 1, 3), (3, 3, 2, 2))
SPARSITIES = st.one_of(
    st.sampled_from([0.0, 0.1, 0.2, 0.25, 0.3, 0.5, 0.7, 0.75, 0.8, 0.9, 0.95, 0.99]),
    st.integers(0, 99).map(lambda p: p / 100),  # decimal sparsities: the rounding of kept_count
    st.floats(0.0, 1.0, exclude_max=True, allow_nan=False),
)


# No subnormal floats: XLA on CPU treats them as zero (they compare equal to 0 and products flush to
# 0), so masks_from_scores ranks them as ties with 0 and apply_masks zeroes them where numpy would
# not. That is the platform's arithmetic, not the mask algebra under test.
FLOAT32 = st.floats(width=32, allow_nan=False, allow_subnormal=False)


def _score_values(shape):
    """Scores of one leaf: small integers (many ties, negatives included) or arbitrary float32."""
    size = math.prod(shape)
    ties = st.integers(1, 4).flatmap(
        lambda top: st.lists(st.integers(-top, top), min_size=size, max_size=size).map(
            lambda v: np.asarray(v, np.float32).reshape(shape)))
    floats = st.lists(st.floats(-1e3, 1e3, width=32, allow_subnormal=False), min_size=size, max_size=size).map(
        lambda v: np.asarray(v, np.float32).reshape(shape))
    return st.one_of(ties, ties, floats)


@st.composite
def score_trees(draw, max_layers=3):
    """(scores tree, its ranked leaves in flattening order): layers named so that insertion order,
    sorted (flattening) order and layer index differ; some layers carry a 0-d "not pruned" leaf."""
    shapes = draw(st.lists(st.sampled_from(LEAF_SHAPES), min_size=1, max_size=max_layers))
    layers = {}
    for i, shape in enumerate(shapes):  # inserted as z0, y1, x2; flattened as x2, y1, z0
        layer = {"kernel": jnp.asarray(draw(_score_values(shape)))}
        if draw(st.booleans()):
            layer["bias"] = jnp.zeros(())
        layers[f"{'zyx'[i]}{i}"] = layer
    tree = [layers, jnp.zeros(())] if draw(st.booleans()) else layers
    ranked = [np.asarray(leaf, np.float64) for leaf in jax.tree_util.tree_leaves(tree) if np.ndim(leaf) >= 1]
    return tree, ranked


def _kept(density, n):
    """The documented count, written out: ceil of density * n rounded to 6 decimals."""
    return math.ceil(round(density * n, 6))


def _fixed_tree(*leaves):
    """An explicit example for the tree strategy: ranked leaves given as arrays, in flattening order."""
    layers = {f"layer{i}": {"kernel": jnp.asarray(np.asarray(leaf, np.float32))} for i, leaf in enumerate(leaves)}
    return layers, [np.asarray(leaf, np.float64) for leaf in leaves]


# (1 - 0.7) * 10 == 3.0000000000000004 and (1 - 0.95) * 20 == 1.0000000000000009 in binary: a plain
# ceil would keep one entry too many. Random trees rarely have N = 10 or 20, so these are explicit.
DECIMAL_EXAMPLES = (
    (_fixed_tree(np.arange(4.0) % 2, np.arange(6.0) % 3), 0.7),
    (_fixed_tree(np.arange(20.0).reshape(4, 5) % 4), 0.95),
)


# (numerator, denominator) of a sparsity with 1 to 3 decimals
DECIMAL_FRACTIONS = st.sampled_from([10, 100, 1000]).flatmap(lambda d: st.tuples(st.integers(0, d - 1), st.just(d)))


@DETERMINISTIC
@given(st.integers(1, 10**7), DECIMAL_FRACTIONS)
def test_kept_count_is_the_count_in_exact_decimal_arithmetic(n, fraction):
    numerator, denominator = fraction
    sparsity = numerator / denominator  # a decimal sparsity as a person writes it: 0.7, 0.95, 0.999
    exact = math.ceil((1 - Fraction(numerator, denominator)) * n)
    assert pj.kept_count(1 - sparsity, n) == exact == _kept(1 - sparsity, n)


def _top(flat, k):
    """numpy reference: True at the k largest entries; among equal entries the earlier ones first."""
    keep = np.zeros(flat.size, bool)
    keep[np.argsort(-flat, kind="stable")[:k]] = True
    return keep


def _ranked_masks(masks):
    return [np.asarray(m) for m in jax.tree_util.tree_leaves(masks) if np.ndim(m) >= 1]


def _check_unpruned_leaves(scores, masks):
    for s, m in zip(jax.tree_util.tree_leaves(scores), jax.tree_util.tree_leaves(masks)):
        m = np.asarray(m)
        assert set(np.unique(m)) <= {0.0, 1.0}
        if np.ndim(s) == 0:
            assert m.shape == () and m == 1.0
        else:
            assert m.shape == np.shape(s)


def _masks_and_collapse_warning(scores, sparsity, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", pj.LayerCollapseWarning)
        masks = pj.masks_from_scores(scores, sparsity, **kw)
    return masks, any(issubclass(w.category, pj.LayerCollapseWarning) for w in caught)


@DETERMINISTIC
@given(score_trees(), SPARSITIES)
@example(*DECIMAL_EXAMPLES[0])
@example(*DECIMAL_EXAMPLES[1])
def test_global_scope_keeps_the_exact_count_and_breaks_ties_by_flattening_order(tree, sparsity):
    scores, ranked = tree
    masks, warned = _masks_and_collapse_warning(scores, sparsity, scope="global")
    _check_unpruned_leaves(scores, masks)
    flat = np.concatenate([s.ravel() for s in ranked])
    k = _kept(1 - sparsity, flat.size)
    assert k == pj.kept_count(1 - sparsity, flat.size)
    got = np.concatenate([m.ravel() for m in _ranked_masks(masks)]).astype(bool)
    assert got.sum() == k
    np.testing.assert_array_equal(got, _top(flat, k))
    if 0 < k < flat.size:
        assert flat[got].min() >= flat[~got].max()
    assert warned == any(not m.any() for m in _ranked_masks(masks))  # an empty layer warns


@DETERMINISTIC
@given(score_trees(), SPARSITIES)
@example(*DECIMAL_EXAMPLES[1])
def test_layerwise_scope_keeps_the_exact_count_in_every_layer(tree, sparsity):
    scores, ranked = tree
    masks, warned = _masks_and_collapse_warning(scores, sparsity, scope="layerwise")
    _check_unpruned_leaves(scores, masks)
    for s, m in zip(ranked, _ranked_masks(masks)):
        flat, got = s.ravel(), m.ravel().astype(bool)
        k = _kept(1 - sparsity, flat.size)
        assert got.sum() == k
        np.testing.assert_array_equal(got, _top(flat, k))
        if 0 < k < flat.size:
            assert flat[got].min() >= flat[~got].max()
    assert warned == any(not m.any() for m in _ranked_masks(masks))


@st.composite
def guarded_problems(draw):
    """A scores tree, min_per_layer >= 1 and a sparsity whose budget covers every layer's floor."""
    scores, ranked = draw(score_trees())
    floor = draw(st.integers(1, 4))
    sizes = [s.size for s in ranked]
    n = sum(sizes)
    kept = draw(st.integers(sum(min(floor, size) for size in sizes), n))
    return scores, ranked, floor, 1 - kept / n


@DETERMINISTIC
@given(guarded_problems())
def test_global_min_per_layer_keeps_every_layer_a_floor_and_the_total_exact(problem):
    scores, ranked, floor, sparsity = problem
    with warnings.catch_warnings():
        warnings.simplefilter("error", pj.LayerCollapseWarning)  # no layer can end up empty
        masks = pj.masks_from_scores(scores, sparsity, scope="global", min_per_layer=floor)
    _check_unpruned_leaves(scores, masks)
    flat = np.concatenate([s.ravel() for s in ranked])
    k = _kept(1 - sparsity, flat.size)
    got_layers = [m.ravel().astype(bool) for m in _ranked_masks(masks)]
    assert sum(int(g.sum()) for g in got_layers) == k
    for s, g in zip(ranked, got_layers):
        assert g.sum() >= min(floor, s.size)
    # Documented rule: each layer's `floor` best entries are taken first, the rest of the budget is
    # filled by one global ranking (ties: earlier in flattening order).
    guaranteed = np.concatenate([_top(s.ravel(), min(floor, s.size)) for s in ranked])
    priority = np.where(guaranteed, np.inf, flat)
    np.testing.assert_array_equal(np.concatenate(got_layers), _top(priority, k))


@st.composite
def params_and_masks(draw):
    scores, ranked = draw(score_trees())
    masks, _ = _masks_and_collapse_warning(scores, draw(SPARSITIES))

    def param_like(score):
        shape = np.shape(score) if np.ndim(score) else (draw(st.integers(1, 3)),)  # e.g. a bias
        values = draw(st.lists(FLOAT32, min_size=math.prod(shape), max_size=math.prod(shape)))  # inf too
        return jnp.asarray(np.asarray(values, np.float32).reshape(shape))

    params = jax.tree_util.tree_map(param_like, scores)
    return params, masks


@DETERMINISTIC
@given(params_and_masks())
def test_apply_masks_is_idempotent_zeroes_pruned_entries_and_keeps_the_rest(problem):
    params, masks = problem
    once = pj.apply_masks(params, masks)
    twice = pj.apply_masks(once, masks)
    for p, m, a, b in zip(*(jax.tree_util.tree_leaves(t) for t in (params, masks, once, twice))):
        p, a, b = np.asarray(p), np.asarray(a), np.asarray(b)
        assert a.dtype == p.dtype and a.shape == p.shape
        np.testing.assert_array_equal(a.view(np.uint32), b.view(np.uint32))  # bit for bit
        keep = np.broadcast_to(np.asarray(m), p.shape) != 0
        assert np.all(a[~keep] == 0) and not np.any(np.signbit(a[~keep]))  # exactly +0.0
        np.testing.assert_array_equal(a[keep].view(np.uint32), p[keep].view(np.uint32))  # unchanged, to the bit


@st.composite
def channel_problems(draw):
    """Conv/Dense-like kernels with [1, ..., 1, C] channel masks, one unstructured full-shape mask and
    one unpruned leaf (0-d mask)."""
    params, masks, channel = {}, {}, {}
    for i in range(draw(st.integers(1, 3))):
        shape = draw(st.sampled_from(KERNEL_SHAPES))
        bits = np.asarray(draw(st.lists(st.booleans(), min_size=shape[-1], max_size=shape[-1])), np.float32)
        values = np.arange(1, math.prod(shape) + 1, dtype=np.float32).reshape(shape)  # no zero weight
        params[f"conv{i}"] = {"kernel": jnp.asarray(values)}
        masks[f"conv{i}"] = {"kernel": jnp.asarray(bits.reshape((1,) * (len(shape) - 1) + (shape[-1],)))}
        channel[f"conv{i}/kernel"] = (shape, bits)
    dense = np.asarray(draw(st.lists(st.booleans(), min_size=6, max_size=6)), np.float32).reshape(2, 3)
    params["dense"] = {"kernel": jnp.full((2, 3), -2.5), "bias": jnp.ones(3)}
    masks["dense"] = {"kernel": jnp.asarray(dense), "bias": jnp.ones(())}
    return params, masks, channel, dense


@DETERMINISTIC
@given(channel_problems())
def test_channel_masks_broadcast_in_apply_masks_and_count_whole_channels(problem):
    params, masks, channel, dense = problem
    out = pj.apply_masks(params, masks)
    for name, (shape, bits) in channel.items():
        layer = name.split("/")[0]
        got, p = np.asarray(out[layer]["kernel"]), np.asarray(params[layer]["kernel"])
        for c in range(shape[-1]):
            np.testing.assert_array_equal(got[..., c], p[..., c] if bits[c] else np.zeros(shape[:-1]))
    np.testing.assert_array_equal(out["dense"]["kernel"], np.where(dense > 0, -2.5, 0.0))
    np.testing.assert_array_equal(out["dense"]["bias"], np.ones(3))

    shapes = jax.tree_util.tree_map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype), params)
    for report in (pj.sparsity_report(masks, params), pj.sparsity_report(masks, shapes)):
        by_name = {layer.name: layer for layer in report.layers}
        assert set(by_name) == set(channel) | {"dense/kernel"}
        for name, (shape, bits) in channel.items():
            per_channel = math.prod(shape[:-1])
            assert by_name[name].kept == int(bits.sum()) * per_channel
            assert by_name[name].total == math.prod(shape)
        assert (by_name["dense/kernel"].kept, by_name["dense/kernel"].total) == (int(dense.sum()), 6)
        kept = sum(int(bits.sum()) * math.prod(shape[:-1]) for shape, bits in channel.values()) + int(dense.sum())
        total = sum(math.prod(shape) for shape, _ in channel.values()) + 6
        assert (report.prunable_kept, report.prunable_total) == (kept, total)
        assert (report.all_kept, report.all_total) == (kept + 3, total + 3)  # + the unpruned bias
        assert report.sparsity == pytest.approx(1 - kept / total)
        empty = {name for name, (_, bits) in channel.items() if not bits.any()}
        empty |= set() if dense.any() else {"dense/kernel"}
        assert set(report.empty_layers) == empty
