"""Structured pruning: channel groups, channel scores and dead channels (core, no flax)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import prospr_jax as pj
from prospr_jax import structured
from tests.tiny_models import unrolled_meta_loss

# --------------------------------------------------------------------------- a tiny residual net
# x [N, 5, 5, 2] -> a: conv 2->4, BN, relu = h -> b: conv 4->4, BN; relu(. + h) = r
# -> c: conv 4->5, BN, relu -> mean pool -> head: dense 5->3.
# The residual sum ties channel k of a, bn_a, b and bn_b (4 groups); c has 5 groups of its own.

TIED = ("a", "bn_a", "b", "bn_b")


def _conv(x, k):
    return lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _bn(x, p):
    mean = x.mean(axis=(0, 1, 2))
    var = ((x - mean) ** 2).mean(axis=(0, 1, 2))
    return (x - mean) * lax.rsqrt(var + 1e-5) * p["scale"] + p["bias"]


def tiny_forward(params, x, taps=None, act=jax.nn.relu):
    h = act(_bn(_conv(x, params["a"]["kernel"]), params["bn_a"]))
    y = _bn(_conv(h, params["b"]["kernel"]), params["bn_b"])
    r = act(y + h)
    z = act(_bn(_conv(r, params["c"]["kernel"]), params["bn_c"]))
    if taps is not None:
        taps.update(h=h, y=y, r=r, z=z)
    return z.mean(axis=(1, 2)) @ params["head"]["kernel"] + params["head"]["bias"]


def tiny_loss(params, batch):
    return pj.cross_entropy(tiny_forward(params, batch["image"]), batch["label"])


def smooth_loss(params, batch):
    """The same net with x * sigmoid(x): smooth, so a central difference converges as h^2 (ReLU's
    kinks make it O(h)); its zero stays zero, so its channels can still be pruned."""
    return pj.cross_entropy(tiny_forward(params, batch["image"], act=jax.nn.silu), batch["label"])


def tiny_params(key, dtype=jnp.float32):
    ks = jax.random.split(key, 8)

    def bn(k, n):
        return {"scale": (1.0 + 0.2 * jax.random.normal(k, (n,))).astype(dtype),
                "bias": (0.1 * jax.random.normal(jax.random.fold_in(k, 1), (n,))).astype(dtype)}

    return {
        "a": {"kernel": (jax.random.normal(ks[0], (3, 3, 2, 4)) / 4.0).astype(dtype)},
        "bn_a": bn(ks[1], 4),
        "b": {"kernel": (jax.random.normal(ks[2], (3, 3, 4, 4)) / 6.0).astype(dtype)},
        "bn_b": bn(ks[3], 4),
        "c": {"kernel": (jax.random.normal(ks[4], (3, 3, 4, 5)) / 6.0).astype(dtype)},
        "bn_c": bn(ks[5], 5),
        "head": {"kernel": (jax.random.normal(ks[6], (5, 3)) / 2.0).astype(dtype),
                 "bias": jnp.zeros((3,), dtype)},
    }


def tiny_batches(key, num, dtype=jnp.float32, n=8):
    kx, ky = jax.random.split(key)
    return {"image": jax.random.normal(kx, (num, n, 5, 5, 2)).astype(dtype),
            "label": jax.random.randint(ky, (num, n), 0, 3)}


def _group_of(groups, leaf, unit):
    return int(groups.units[("out", leaf)][unit])


def test_residual_sum_ties_channels_and_their_batchnorm():
    params = tiny_params(jax.random.key(0))
    batch = jax.tree_util.tree_map(lambda b: b[0], tiny_batches(jax.random.key(1), 1))
    groups = structured.channel_groups(tiny_loss, params, batch)
    # 4 tied (a, b) + 5 (c) prunable; the head's logits are read by no kernel: not a unit at all.
    assert groups.num_prunable == 9
    for k in range(4):
        g = _group_of(groups, "a/kernel", k)
        assert groups.prunable[g]
        expected = {("out", "a/kernel", k), ("out", "b/kernel", k), ("param", "bn_a/scale", k), ("param", "bn_a/bias", k),
                    ("param", "bn_b/scale", k), ("param", "bn_b/bias", k), ("in", "b/kernel", k), ("in", "c/kernel", k)}
        assert set(groups.members(g)) == expected
    for k in range(5):
        g = _group_of(groups, "c/kernel", k)
        assert set(groups.members(g)) == {("out", "c/kernel", k), ("param", "bn_c/scale", k),
                                          ("param", "bn_c/bias", k), ("in", "head/kernel", k)}
    # The input channels are groups too, protected.
    protected = [g for g in range(groups.num_groups) if not groups.prunable[g]]
    assert len(protected) == 2 and all("input" in groups.why_protected[g] for g in protected)


def _scaled_members(params, k, factor):
    """params with channel k of a, bn_a, b and bn_b (the tied group, listed by hand) times factor."""
    out = jax.tree_util.tree_map(lambda x: x, params)
    for layer in TIED:
        out[layer] = {name: v.at[..., k].multiply(factor) for name, v in params[layer].items()}
    return out


@pytest.mark.parametrize("num_steps", [0, 2])
def test_channel_meta_gradient_equals_central_difference(num_steps):
    """dL(w_M)/dc_g for a tied group against a central difference of the explicitly unrolled meta-loss."""
    with jax.enable_x64(True):
        params = tiny_params(jax.random.key(2), jnp.float64)
        batches = tiny_batches(jax.random.key(3), num_steps + 1, jnp.float64)
        groups = structured.channel_groups(smooth_loss, params, jax.tree_util.tree_map(lambda b: b[0], batches))
        assert groups.num_prunable == 9
        grad = np.asarray(structured.channel_meta_gradient(smooth_loss, params, batches, groups, num_steps=num_steps, lr=0.1))
        meta_loss = jax.jit(
            lambda c, k: unrolled_meta_loss(smooth_loss, _scaled_members(params, k, c), batches, num_steps, lr=0.1)
        )
        h = 1e-4
        for k in range(4):
            plus, minus = meta_loss(1 + h, k), meta_loss(1 - h, k)
            fd = float(plus - minus) / (2 * h)
            # Central difference of a smooth function: error O(h^2) ~ 1e-8 relative, far above float64
            # rounding (1e-16 / h = 1e-12).
            np.testing.assert_allclose(grad[_group_of(groups, "a/kernel", k)], fd, rtol=1e-5, atol=1e-9)
        assert np.max(np.abs(grad)) > 1e-4  # not a vacuous comparison of zeros


def test_scaling_only_the_kernel_column_is_invisible_through_batchnorm():
    """Why the mask entry multiplies BatchNorm's scale and shift too: through BN in training mode a
    kernel column's scale cancels, so its derivative alone is (up to epsilon) zero."""
    with jax.enable_x64(True):
        params = tiny_params(jax.random.key(2), jnp.float64)
        batch = jax.tree_util.tree_map(lambda b: b[0], tiny_batches(jax.random.key(3), 1, jnp.float64))
        g = jax.grad(tiny_loss)(params, batch)
        column = np.sum(np.asarray(params["c"]["kernel"] * g["c"]["kernel"]).reshape(-1, 5), axis=0)
        groups = structured.channel_groups(tiny_loss, params, batch)
        full = np.asarray(structured.channel_meta_gradient(tiny_loss, params, batch, groups, num_steps=0, single_batch=True))
        c_groups = [_group_of(groups, "c/kernel", k) for k in range(5)]
        assert np.max(np.abs(column)) < 1e-3 * np.max(np.abs(full[c_groups]))


def test_pruned_group_is_exactly_zero_on_both_sides_of_the_sum_before_and_after_training():
    params = tiny_params(jax.random.key(4))
    batches = tiny_batches(jax.random.key(5), 4)
    batch0 = jax.tree_util.tree_map(lambda b: b[0], batches)
    groups = structured.channel_groups(tiny_loss, params, batch0)
    keep = np.ones(groups.num_groups)
    dropped_tied, dropped_c = _group_of(groups, "a/kernel", 1), _group_of(groups, "c/kernel", 3)
    keep[[dropped_tied, dropped_c]] = 0
    masks = groups.leaf_masks(keep, params)
    assert np.shape(masks["a"]["kernel"]) == (1, 1, 1, 4) and np.shape(masks["bn_b"]["bias"]) == (4,)
    assert np.ndim(masks["head"]["kernel"]) == 0  # the classifier's outputs are never pruned

    def check(p):
        taps = {}
        tiny_forward(p, batch0["image"], taps)
        for name in ("h", "y", "r"):
            assert np.all(np.asarray(taps[name][..., 1]) == 0.0), name  # exactly zero, both operands and the sum
            assert np.all(np.any(np.asarray(taps[name][..., [0, 2, 3]]) != 0, axis=(0, 1, 2))), name
        assert np.all(np.asarray(taps["z"][..., 3]) == 0.0)

    masked = pj.apply_masks(params, masks)
    check(masked)
    import optax

    opt = pj.masked_optimizer(optax.sgd(0.1, momentum=0.9), masks)
    state = opt.init(masked)
    p = masked
    for i in range(3):
        g = jax.grad(tiny_loss)(p, jax.tree_util.tree_map(lambda b: b[i], batches))
        updates, state = opt.update(g, state, p)
        p = optax.apply_updates(p, updates)
    check(p)


def test_masking_the_kernel_column_alone_leaves_the_channel_alive():
    """Without the BN shift the 'pruned' channel is not dead (the bug of kernel-only channel masks)."""
    params = tiny_params(jax.random.key(4))
    batch0 = jax.tree_util.tree_map(lambda b: b[0], tiny_batches(jax.random.key(5), 1))
    p = jax.tree_util.tree_map(lambda x: x, params)
    p["c"] = {"kernel": params["c"]["kernel"].at[..., 3].set(0.0)}
    taps = {}
    tiny_forward(p, batch0["image"], taps)
    assert np.any(np.asarray(taps["z"][..., 3]) != 0.0)


def test_channel_scores_rank_groups_globally_and_count_groups():
    params = tiny_params(jax.random.key(6))
    batches = tiny_batches(jax.random.key(7), 4)
    batch_fn = lambda i: jax.tree_util.tree_map(lambda b: b[i], batches)  # noqa: E731
    problem = pj.PruningProblem(params, tiny_loss, batch_fn=batch_fn, key=jax.random.key(0))
    for method in structured.CHANNEL_METHODS:
        result = structured.prune_channels(method, problem, 0.5)
        assert result.extras["prunable_groups"] == 9
        assert result.extras["kept_groups"] == 5  # ceil(0.5 * 9)
        groups = structured.problem_groups(problem)
        kept = groups.kept_groups(result.masks)
        assert kept.sum() == 5 + 2  # + the two protected input groups
    # magnitude: the group's summed filter L1 norms, checked by hand for group a/b channel 0
    groups = structured.problem_groups(problem)
    mag = np.asarray(structured.channel_magnitude_scores(params, groups))
    by_hand = np.abs(np.asarray(params["a"]["kernel"][..., 0])).sum() + np.abs(np.asarray(params["b"]["kernel"][..., 0])).sum()
    np.testing.assert_allclose(mag[_group_of(groups, "a/kernel", 0)], by_hand, rtol=1e-6)


def test_partial_group_masks_are_refused():
    params = tiny_params(jax.random.key(6))
    batch0 = jax.tree_util.tree_map(lambda b: b[0], tiny_batches(jax.random.key(7), 1))
    groups = structured.channel_groups(tiny_loss, params, batch0)
    masks = groups.leaf_masks(np.ones(groups.num_groups), params)
    masks["a"]["kernel"] = masks["a"]["kernel"].at[..., 2].set(0.0)  # a's channel 2 without b's
    with pytest.raises(ValueError, match="residual sum must be pruned together"):
        groups.kept_groups(masks)


def test_untraceable_operation_is_a_clear_error():
    params = tiny_params(jax.random.key(6))
    batch0 = jax.tree_util.tree_map(lambda b: b[0], tiny_batches(jax.random.key(7), 1))

    def loss(p, b):  # a product of two activations: the channels cannot be followed
        h = _conv(b["image"], p["a"]["kernel"])
        h = h * jnp.flip(h, axis=-1)
        z = _conv(h, p["b"]["kernel"]).mean(axis=(1, 2))
        return jnp.mean(z @ jnp.ones((4, 3)))

    with pytest.raises(ValueError, match="could not follow.*primitive"):
        structured.channel_groups(loss, params, batch0)
