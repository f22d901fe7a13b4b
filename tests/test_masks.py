"""masks_from_scores, apply_masks, sparsity_report and prunable-leaf selection."""

from __future__ import annotations

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import prospr_jax as pj


def _scores(key=0, sizes=((6, 5), (5, 4), (4, 3))):
    keys = jax.random.split(jax.random.key(key), len(sizes))
    return {
        f"layer{i}": {"kernel": jax.random.uniform(k, s), "bias": jnp.zeros(())}
        for i, (k, s) in enumerate(zip(keys, sizes))
    }


def _kept(mask_tree):
    return int(sum(np.count_nonzero(m) for m in jax.tree_util.tree_leaves(mask_tree) if np.ndim(m) > 0))


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.5, 0.7, 0.9, 0.98, 0.999])
def test_global_keeps_exact_count_and_the_top_scores(sparsity):
    scores = _scores()
    n = 30 + 20 + 12
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pj.LayerCollapseWarning)
        masks = pj.masks_from_scores(scores, sparsity)
    k = math.ceil(round((1 - sparsity) * n, 6))
    assert _kept(masks) == k
    flat_scores = np.concatenate([np.ravel(scores[f"layer{i}"]["kernel"]) for i in range(3)])
    flat_masks = np.concatenate([np.ravel(masks[f"layer{i}"]["kernel"]) for i in range(3)])
    if 0 < k < n:  # every kept score >= every pruned score
        assert flat_scores[flat_masks == 1].min() >= flat_scores[flat_masks == 0].max()
    assert all(np.shape(masks[f"layer{i}"]["bias"]) == () for i in range(3))


def test_decimal_sparsity_gives_the_count_a_person_computes():
    assert pj.kept_count(1 - 0.7, 10) == 3  # (1 - 0.7) * 10 == 3.0000000000000004 in binary
    assert pj.kept_count(0.3, 10) == 3
    assert pj.kept_count(0.31, 10) == 4
    assert pj.kept_count(0.0, 10) == 0


def test_layerwise_keeps_exact_count_per_layer():
    scores = _scores()
    masks = pj.masks_from_scores(scores, 0.75, scope="layerwise")
    for i, n in enumerate((30, 20, 12)):
        m = np.asarray(masks[f"layer{i}"]["kernel"])
        assert np.count_nonzero(m) == math.ceil(0.25 * n)
        s = np.asarray(scores[f"layer{i}"]["kernel"])
        assert s[m == 1].min() >= s[m == 0].max()


def test_ties_are_broken_by_position_deterministically():
    scores = {"a": {"kernel": jnp.ones((2, 3))}, "b": {"kernel": jnp.ones((3, 2))}}
    with pytest.warns(pj.LayerCollapseWarning):  # keep 6 of 12 equal scores: the first 6 in flattening order
        masks = pj.masks_from_scores(scores, 0.5)
    np.testing.assert_array_equal(masks["a"]["kernel"], np.ones((2, 3)))
    np.testing.assert_array_equal(masks["b"]["kernel"], np.zeros((3, 2)))
    layer = pj.masks_from_scores({"w": jnp.array([[1.0, 2.0, 2.0, 2.0, 0.5]])}, 0.6)
    np.testing.assert_array_equal(layer["w"], [[0, 1, 1, 0, 0]])


def test_sparsity_zero_keeps_everything():
    scores = _scores()
    masks = pj.masks_from_scores(scores, 0.0)
    assert _kept(masks) == 62


def test_min_per_layer_guard_keeps_total_exact():
    # Layer 'small' has tiny scores: global pruning would empty it.
    scores = {"big": {"kernel": jnp.arange(1.0, 101.0).reshape(10, 10)}, "small": {"kernel": jnp.full((4, 4), 1e-3)}}
    with pytest.warns(pj.LayerCollapseWarning, match="small/kernel"):
        collapsed = pj.masks_from_scores(scores, 0.9)
    assert np.count_nonzero(collapsed["small"]["kernel"]) == 0
    guarded = pj.masks_from_scores(scores, 0.9, min_per_layer=3)
    assert np.count_nonzero(guarded["small"]["kernel"]) == 3
    assert _kept(guarded) == math.ceil(0.1 * 116)
    # The big layer gives up its lowest-scoring kept entries.
    assert np.count_nonzero(guarded["big"]["kernel"]) == math.ceil(0.1 * 116) - 3
    with pytest.warns(pj.SparsityWarning, match=r"big/kernel \(1 -> 2 of 100\), small/kernel \(1 -> 2 of 16\)"):
        layerwise = pj.masks_from_scores(scores, 0.99, scope="layerwise", min_per_layer=2)
    assert np.count_nonzero(layerwise["small"]["kernel"]) == 2
    with pytest.raises(ValueError, match="min_per_layer"):
        pj.masks_from_scores(scores, 0.99, min_per_layer=5)


def test_per_layer_density_mapping():
    scores = _scores()
    masks = pj.masks_from_scores(
        scores, None, scope={"layer0/kernel": 0.5, "layer1/kernel": 0.1, "layer2/kernel": 1.0}
    )
    assert [int(np.count_nonzero(masks[f"layer{i}"]["kernel"])) for i in range(3)] == [15, 2, 12]
    with pytest.raises(ValueError, match="missing: layer2/kernel"):
        pj.masks_from_scores(scores, None, scope={"layer0/kernel": 0.5, "layer1/kernel": 0.1})
    with pytest.raises(ValueError, match="not both"):
        pj.masks_from_scores(scores, 0.5, scope={"layer0/kernel": 0.5, "layer1/kernel": 0.1, "layer2/kernel": 1.0})


def test_jit_compatible_and_equal_to_eager():
    scores = _scores(3)
    eager = pj.masks_from_scores(scores, 0.8)
    jitted = jax.jit(pj.masks_from_scores, static_argnames=("sparsity", "scope"))(scores, sparsity=0.8)
    for a, b in zip(jax.tree_util.tree_leaves(eager), jax.tree_util.tree_leaves(jitted)):
        np.testing.assert_array_equal(a, b)


def test_nonfinite_scores_raise_eagerly_and_poison_masks_under_jit():
    scores = _scores()
    scores["layer1"]["kernel"] = scores["layer1"]["kernel"].at[0, 0].set(jnp.nan)
    with pytest.raises(ValueError, match="NaN or Inf in layer1/kernel"):
        pj.masks_from_scores(scores, 0.5)
    scores["layer1"]["kernel"] = scores["layer1"]["kernel"].at[0, 0].set(jnp.inf)
    with pytest.raises(ValueError, match="NaN or Inf"):
        pj.masks_from_scores(scores, 0.5)
    traced = jax.jit(lambda s: pj.masks_from_scores(s, 0.5))(scores)
    assert np.isnan(traced["layer1"]["kernel"]).all()


@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5, float("nan")])
def test_sparsity_outside_unit_interval_raises(sparsity):
    with pytest.raises(ValueError, match=r"`sparsity` must be in \[0, 1\)"):
        pj.masks_from_scores(_scores(), sparsity)


def test_bad_scope_and_no_prunable_leaves():
    with pytest.raises(ValueError, match="`scope` must be"):
        pj.masks_from_scores(_scores(), 0.5, scope="per-layer")
    with pytest.raises(ValueError, match="nothing to prune"):
        pj.masks_from_scores({"a": jnp.zeros(())}, 0.5)


def test_apply_masks_zeroes_exactly_and_keeps_dtype():
    params = {"w": jnp.array([[-1.5, 2.0], [jnp.inf, jnp.nan]], jnp.bfloat16), "b": jnp.array([1.0, 2.0])}
    masks = {"w": jnp.array([[0.0, 1.0], [0.0, 0.0]]), "b": jnp.ones(())}
    out = pj.apply_masks(params, masks)
    assert out["w"].dtype == jnp.bfloat16
    got = np.asarray(out["w"], np.float32)
    assert got[0, 1] == 2.0 and np.all(got[[0, 1, 1], [0, 0, 1]] == 0.0)
    assert not np.signbit(got[0, 0])  # +0.0, not -0.0
    np.testing.assert_array_equal(out["b"], params["b"])


def test_mask_tree_mismatch_raises():
    params = {"a": {"kernel": jnp.ones((3, 4))}, "b": jnp.ones(2)}
    with pytest.raises(ValueError, match="same tree structure.*missing leaves \\['b'\\]"):
        pj.apply_masks(params, {"a": {"kernel": jnp.ones((3, 4))}})
    with pytest.raises(ValueError, match="a/kernel: mask \\(4, 3\\)"):
        pj.apply_masks(params, {"a": {"kernel": jnp.ones((4, 3))}, "b": jnp.ones(())})
    with pytest.raises(ValueError, match="broadcast"):
        pj.sparsity_report({"a": {"kernel": jnp.ones((1, 1, 4))}, "b": jnp.ones(())}, params)


def test_sparsity_report_counts_unstructured_channel_and_unpruned_leaves():
    params = {
        "conv": {"kernel": jnp.ones((3, 3, 2, 4)), "bias": jnp.ones(4)},
        "dense": {"kernel": jnp.ones((4, 5))},
        "bn": {"scale": jnp.ones(4)},
    }
    masks = {
        "conv": {"kernel": jnp.array([1.0, 0.0, 1.0, 0.0]).reshape(1, 1, 1, 4), "bias": jnp.ones(())},
        "dense": {"kernel": jnp.zeros((4, 5)).at[0, :3].set(1.0)},
        "bn": {"scale": jnp.ones(())},
    }
    report = pj.sparsity_report(masks, jax.eval_shape(lambda: params))
    by_name = {l.name: l for l in report.layers}
    assert (by_name["conv/kernel"].kept, by_name["conv/kernel"].total) == (36, 72)
    assert (by_name["dense/kernel"].kept, by_name["dense/kernel"].total) == (3, 20)
    assert set(by_name) == {"conv/kernel", "dense/kernel"}
    assert (report.prunable_kept, report.prunable_total) == (39, 92)
    assert (report.all_kept, report.all_total) == (47, 100)
    assert report.sparsity == pytest.approx(1 - 39 / 92)
    text = str(report)
    assert "conv/kernel" in text and "sparsity" in text and "EMPTY" not in text
    assert report.as_dict()["all_total"] == 100
    empty = dict(masks, dense={"kernel": jnp.zeros((4, 5))})
    report = pj.sparsity_report(empty, params)
    assert report.empty_layers == ("dense/kernel",)
    assert "EMPTY" in str(report) and "WARNING" in str(report)


def test_default_prunable_selection_and_predicate():
    params = {
        "Conv_0": {"kernel": jnp.ones((3, 3, 1, 2)), "bias": jnp.ones(2)},
        "BatchNorm_0": {"scale": jnp.ones(2), "bias": jnp.ones(2)},
        "Dense_0": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3)},
        "embed": {"embedding": jnp.ones((5, 2))},
    }
    sel = pj.select_prunable(params)
    assert sel["Conv_0"]["kernel"] and sel["Dense_0"]["kernel"]
    assert not any([sel["Conv_0"]["bias"], sel["BatchNorm_0"]["scale"], sel["embed"]["embedding"]])
    sel = pj.select_prunable(params, lambda path, leaf: leaf.ndim >= 2)
    assert sel["embed"]["embedding"]
    with pytest.raises(ValueError, match="exclude_first"):
        pj.select_prunable(params, exclude_first=True)
    with pytest.raises(ValueError, match="0-d leaves"):
        pj.select_prunable({"t": jnp.ones(())}, lambda p, x: True)
    masks = pj.dense_masks(params)
    assert masks["Conv_0"]["kernel"].shape == (3, 3, 1, 2) and masks["Conv_0"]["bias"].shape == ()


def test_forward_order_follows_computation_not_key_order():
    params = {f"Dense_{i}": {"kernel": jnp.ones((2, 2)) * (i + 1)} for i in range(12)}
    masks = jax.tree_util.tree_map(jnp.ones_like, params)

    def fn(p, x):
        p = pj.apply_masks(p, masks)  # masks multiplied first, in key order: must not matter
        for i in range(12):
            x = jax.nn.relu(x @ p[f"Dense_{i}"]["kernel"])
        return x.sum()

    order = pj.forward_order(fn, params, jnp.ones((1, 2)))
    assert order == [f"Dense_{i}/kernel" for i in range(12)]
    assert sorted(order) != order  # the flattening order is different
    sel = pj.select_prunable(params, exclude_first=True, exclude_last=True, order=order)
    assert not sel["Dense_0"]["kernel"] and not sel["Dense_11"]["kernel"] and sel["Dense_10"]["kernel"]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_masks_equal_a_numpy_stable_argsort_reference(seed):
    rng = np.random.default_rng(seed)
    # Few distinct values (many ties), negatives and +-0 are all ranked like numpy does.
    values = rng.choice(np.array([-2.0, -0.0, 0.0, 0.5, 1.0, 3.0, 1e30, -1e30], np.float32), size=(7, 9))
    scores = {"a": jnp.asarray(values[:3]), "b": jnp.asarray(values[3:]), "c": jnp.zeros(())}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pj.LayerCollapseWarning)
        for sparsity in (0.2, 0.55, 0.9):
            masks = pj.masks_from_scores(scores, sparsity, scope="global")
            flat = values.ravel() + 0.0  # -0.0 == 0.0
            k = math.ceil(round((1 - sparsity) * flat.size, 6))
            ref = np.zeros(flat.size, bool)
            ref[np.argsort(-flat, kind="stable")[:k]] = True
            got = np.concatenate([np.ravel(masks["a"]), np.ravel(masks["b"])]).astype(bool)
            np.testing.assert_array_equal(got, ref)
            layer = pj.masks_from_scores(scores, sparsity, scope="layerwise")
            for name, part in (("a", values[:3]), ("b", values[3:])):
                flat = part.ravel() + 0.0
                k = math.ceil(round((1 - sparsity) * flat.size, 6))
                ref = np.zeros(flat.size, bool)
                ref[np.argsort(-flat, kind="stable")[:k]] = True
                np.testing.assert_array_equal(np.ravel(layer[name]).astype(bool), ref)


def test_scores_on_prunable_keeps_selected_leaves_and_marks_the_others():
    values = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.array([5.0, 6.0])}
    scores = pj.scores_on_prunable(values, {"w": True, "b": False})
    np.testing.assert_array_equal(scores["w"], values["w"])
    assert scores["b"].shape == () and float(scores["b"]) == 0.0
    assert pj.masks_from_scores(scores, 0.5)["b"].shape == ()
    with pytest.raises(ValueError, match="`values` must have the same tree structure as `prunable`"):
        pj.scores_on_prunable(values, {"w": True})


def test_subnormal_scores_rank_above_zero_and_kept_subnormal_params_are_unchanged():
    # CPUs that flush denormals would compare 1e-40 == 0: ranking and masking must not use float compares.
    scores = np.array([0.0, 1e-40, 2e-40, -1e-40, -0.0], np.float32)
    np.testing.assert_array_equal(pj.masks_from_scores({"w": jnp.asarray(scores)}, 0.6)["w"], [0, 1, 1, 0, 0])
    params = {"w": jnp.asarray(np.array([1e-40, -1e-40, 3.0], np.float32))}
    for apply in (pj.apply_masks, jax.jit(pj.apply_masks)):
        out = np.asarray(apply(params, {"w": jnp.asarray([1.0, 1.0, 0.0])})["w"])
        assert out.tobytes() == np.array([1e-40, -1e-40, 0.0], np.float32).tobytes()
