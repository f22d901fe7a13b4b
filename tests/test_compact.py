"""Compaction: the physically smaller model equals the channel-masked model, and is that small."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import prospr_jax as pj
from prospr_jax import models
from prospr_jax.structured import group_mask, model_channel_groups
from prospr_jax.structured.compaction import compact, param_count


def _perturbed(params, batch_stats, key):
    """Non-trivial BatchNorm parameters and running statistics (at init they are 1, 0, 0, 1)."""
    k1, k2 = jax.random.split(key)
    params = jax.tree_util.tree_map(lambda x: x + 0.1 * jax.random.normal(k1, x.shape) if x.ndim == 1 else x, params)
    batch_stats = jax.tree_util.tree_map(lambda x: x + 0.2 * jax.random.uniform(k2, x.shape), batch_stats)
    return params, batch_stats


def _setup(model, input_shape, sparsity=0.5, seed=0):
    params, batch_stats = models.init(model, seed, (1, *input_shape))
    params, batch_stats = _perturbed(params, batch_stats, jax.random.key(seed + 1))
    apply_fn = pj.flax_apply_fn(model)
    state = {"batch_stats": batch_stats} if batch_stats else {}
    x = jax.random.normal(jax.random.key(seed + 2), (8, *input_shape))
    groups = model_channel_groups(apply_fn, params, state, x[:1])
    keep = group_mask(jax.random.uniform(jax.random.key(seed + 3), (groups.num_groups,)), groups, sparsity)
    masks = groups.leaf_masks(keep, params)
    return apply_fn, params, state, x, groups, masks


def _check_equal(apply_fn, params, state, x, groups, masks, *, train_too=True):
    model, small_params, small_state = compact(apply_fn, params, state, masks, x[:1], groups=groups)
    masked = pj.apply_masks(params, masks)
    for train in (False, True) if train_too else (False,):
        want = np.asarray(apply_fn(masked, state, x, train))
        got = np.asarray(model.apply(small_params, small_state, x, train))
        assert got.shape == want.shape
        scale = np.max(np.abs(want))
        assert scale > 1e-3  # a non-trivial output
        # float32 with a different summation order (fewer zero terms): ~1e-6 of the output scale;
        # training-mode BatchNorm divides by small batch deviations, so it gets 100x more room.
        np.testing.assert_allclose(got, want, atol=(1e-4 if train else 1e-5) * scale)
    return model, small_params, small_state


def test_resnet20_compacts_exactly_and_its_size_is_counted_by_hand():
    model = models.get("resnet20", 10)
    apply_fn, params, state, x, groups, masks = _setup(model, (8, 8, 3))
    _check_equal(apply_fn, params, state, x, groups, masks)
    # By hand: drop the first half of every block's conv1 channels (one group each: conv1's column,
    # bn1's scale and shift, conv2's input rows) and nothing else.
    keep = np.ones(groups.num_groups)
    removed = 0
    for stage, width in enumerate((16, 32, 64)):
        c_in_first = 16 if stage == 0 else width // 2
        for block in range(3):
            name = f"layer{stage + 1}_block{block}"
            ids = groups.units[("out", f"{name}/conv1/kernel")]
            keep[ids[: width // 2]] = 0
            c_in = c_in_first if block == 0 else width
            removed += (width // 2) * (9 * c_in + 2 + 9 * width)  # conv1 columns, bn1, conv2 rows
    masks = groups.leaf_masks(keep, params)
    _, small_params, small_state = _check_equal(apply_fn, params, state, x, groups, masks, train_too=False)
    assert param_count(small_params) == 269_722 - removed
    assert param_count(small_state) == param_count(state) - 2 * 3 * (8 + 16 + 32)  # bn1 mean and var
    # Nothing dropped: the compact model is the dense model (the padded shortcut meets whole values).
    _, everything, _ = _check_equal(apply_fn, params, state, x, groups,
                                    groups.leaf_masks(np.ones(groups.num_groups), params), train_too=False)
    assert param_count(everything) == 269_722
    # Only stage-2 channels that the option-A shortcut pads with zeros (no stage-1 channel behind them):
    # the whole stage-1 stream is kept and the padded skip must drop them as well.
    keep = np.ones(groups.num_groups)
    keep[groups.units[("out", "layer2_block0/conv2/kernel")][[0, 1, 30]]] = 0
    _check_equal(apply_fn, params, state, x, groups, groups.leaf_masks(keep, params), train_too=False)


def test_vgg11_compacts_to_the_size_of_the_narrower_vgg11():
    config = models.vgg.VGG_CONFIGS[11]
    model = models.VGG(num_classes=10, config=config)
    apply_fn, params, state, x, groups, masks = _setup(model, (16, 16, 3))
    _check_equal(apply_fn, params, state, x, groups, masks)
    # Keep k_l channels in conv l: the compact model has the parameters of a VGG-11 of those widths.
    keep = np.ones(groups.num_groups)
    narrow, index = [], 0
    for v in config:
        if v == "M":
            narrow.append(v)
            continue
        index += 1
        ids = groups.units[("out", f"conv{index}/kernel")]
        k = max(1, v // 3 + index)
        keep[ids[k:]] = 0
        narrow.append(k)
    masks = groups.leaf_masks(keep, params)
    _, small_params, _ = _check_equal(apply_fn, params, state, x, groups, masks, train_too=False)
    reference, _ = models.init(models.VGG(num_classes=10, config=tuple(narrow)), 0, (1, 16, 16, 3))
    assert param_count(small_params) == param_count(reference)


def test_resnet18_projection_shortcuts_compact_exactly():
    model = models.get("resnet18", 10, stem="cifar", widths=(8, 16, 16, 32))
    apply_fn, params, state, x, groups, masks = _setup(model, (8, 8, 3), sparsity=0.4)
    _, small_params, _ = _check_equal(apply_fn, params, state, x, groups, masks)
    assert param_count(small_params) < 0.8 * param_count(params)


class UserNet(nn.Module):
    """A user's model: conv/BN, an identity residual add, a two-branch concatenation, max-pool,
    NHWC flattening and a Dense head with bias; no zoo code."""

    @nn.compact
    def __call__(self, x, train=False):
        norm = lambda name: nn.BatchNorm(use_running_average=not train, name=name)  # noqa: E731
        h = nn.relu(norm("bn0")(nn.Conv(6, (3, 3), name="stem")(x)))
        y = norm("bn1")(nn.Conv(6, (3, 3), name="res")(h))
        h = nn.relu(y + h)
        a = nn.Conv(4, (1, 1), name="branch_a")(h)
        b = nn.Conv(3, (3, 3), name="branch_b")(h)
        h = nn.relu(jnp.concatenate([a, b], axis=-1))
        h = nn.max_pool(h, (2, 2), strides=(2, 2))
        h = nn.Dense(5, name="hidden")(h.reshape(h.shape[0], -1))
        return nn.Dense(3, name="head")(nn.relu(h))


def test_a_users_residual_model_compacts_exactly():
    model = UserNet()
    x0 = jnp.zeros((1, 6, 6, 2))
    variables = model.init(jax.random.key(0), x0)
    params, batch_stats = _perturbed(variables["params"], variables["batch_stats"], jax.random.key(1))
    apply_fn = pj.flax_apply_fn(model)
    state = {"batch_stats": batch_stats}
    x = jax.random.normal(jax.random.key(2), (8, 6, 6, 2))
    groups = model_channel_groups(apply_fn, params, state, x0)
    # stem/res tied (6), branch_a (4), branch_b (3), hidden (5); head protected
    assert groups.num_prunable == 18
    keep = np.ones(groups.num_groups)
    for leaf, units in (("stem/kernel", [1, 4]), ("branch_a/kernel", [0]), ("branch_b/kernel", [2]), ("hidden/kernel", [3])):
        keep[groups.units[("out", leaf)][units]] = 0
    masks = groups.leaf_masks(keep, params)
    assert np.ravel(masks["res"]["kernel"]).tolist() == [1, 0, 1, 1, 0, 1]  # tied through the residual add
    _, small_params, _ = _check_equal(apply_fn, params, state, x, groups, masks)
    # By hand: stem 3x3x2x4 + 4, bn0 2x4, res 3x3x4x4 + 4, bn1 2x4, branch_a 1x1x4x3 + 3,
    # branch_b 3x3x4x2 + 2, hidden (3*3*5 kept features) x 4 + 4, head 4x3 + 3.
    by_hand = (72 + 4) + 8 + (144 + 4) + 8 + (12 + 3) + (72 + 2) + (45 * 4 + 4) + (12 + 3)
    assert param_count(small_params) == by_hand


def test_an_operation_that_revives_a_dropped_channel_is_an_error():
    class Revive(nn.Module):
        @nn.compact
        def __call__(self, x, train=False):
            h = nn.Conv(4, (3, 3), use_bias=False, name="a")(x)
            h = jnp.cos(h)  # cos(0) = 1: a dropped channel is not zero after this
            return nn.Dense(2, name="head")(h.mean(axis=(1, 2)))

    model = Revive()
    x = jnp.ones((2, 5, 5, 2))
    params = model.init(jax.random.key(0), x)["params"]
    apply_fn = pj.flax_apply_fn(model)
    groups = model_channel_groups(apply_fn, params, {}, x)
    assert groups.num_prunable == 0 and all("cos" in why for g, why in groups.why_protected.items()
                                            if ("out", "a/kernel", 0) in groups.members(g))
    masks = jax.tree_util.tree_map(lambda p: jnp.ones(()), params)
    masks["a"]["kernel"] = jnp.array([[[[0.0, 1, 1, 1]]]])
    with pytest.raises(ValueError, match="protected"):
        compact(apply_fn, params, {}, masks, x, groups=groups)
