"""Effective sparsity on hand-built networks: every expected count is worked out by hand from the
network's wiring (comments say how), and once against a random mask dense enough that no unit can be
cut off."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prospr_jax import models
from prospr_jax._src.effective import effective_masks, effective_sparsity, model_trace
from prospr_jax._src.jaxpr.layer_graph import trace_layer_graph


def _trace(fn, params, shape):
    return trace_layer_graph(lambda p, s, x: fn(p, x), params, {}, jax.ShapeDtypeStruct((1, *shape), jnp.float32))


def _ones(params):
    return {k: np.ones(np.shape(v), np.float32) for k, v in params.items()}


def _mlp(p, x):
    h = jax.nn.relu(x @ p["w1"] + p["b1"])
    h = jax.nn.relu(h @ p["w2"])
    return h @ p["w3"]


MLP = {"w1": np.ones((4, 5)), "b1": np.ones(5), "w2": np.ones((5, 6)), "w3": np.ones((6, 3))}
MLP_TOTAL = 4 * 5 + 5 * 6 + 6 * 3  # the kernels; b1 is not pruned


def _mlp_masks(**changes):
    masks = {"w1": np.ones((4, 5), np.float32), "b1": np.float32(1.0), "w2": np.ones((5, 6), np.float32),
             "w3": np.ones((6, 3), np.float32)}
    masks.update(changes)
    return masks


def test_a_layer_whose_every_input_is_pruned_kills_the_next_layers_weights():
    trace = _trace(_mlp, MLP, (4,))
    # Output unit 2 of w1 keeps no input weight: hidden unit 2 receives nothing (its bias is not a
    # path), so the 6 weights of row 2 of w2 are dead. Nominal: 4 pruned of 68.
    w1 = np.ones((4, 5), np.float32)
    w1[:, 2] = 0
    masks = _mlp_masks(w1=w1)
    alive = effective_masks(masks, MLP, trace)
    expected_w2 = np.ones((5, 6), bool)
    expected_w2[2] = False
    assert np.array_equal(alive["w2"], expected_w2)
    assert np.array_equal(alive["w1"], w1 > 0) and alive["w3"].all()
    assert effective_sparsity(masks, MLP, trace) == pytest.approx((4 + 6) / MLP_TOTAL, abs=1e-12)
    # Column 4 of w2 pruned: hidden unit 4 of layer 2 reaches nothing... it still feeds w3: only its
    # input weights are gone (6 weights of row 4 of w3 dead: it receives nothing).
    w2 = np.ones((5, 6), np.float32)
    w2[:, 4] = 0
    alive = effective_masks(_mlp_masks(w2=w2), MLP, trace)
    assert (~alive["w3"]).sum() == 3 and not alive["w3"][4].any()
    # The whole of w2 pruned: nothing reaches the output, every weight is dead.
    assert effective_sparsity(_mlp_masks(w2=np.zeros((5, 6), np.float32)), MLP, trace) == 1.0


def test_a_unit_that_reaches_nothing_kills_its_input_weights():
    trace = _trace(_mlp, MLP, (4,))
    # Row 1 of w3 pruned: unit 1 of the second hidden layer reaches no output, so the 5 weights of
    # column 1 of w2 that feed it are dead; everything else is connected. 3 + 5 of 68.
    w3 = np.ones((6, 3), np.float32)
    w3[1] = 0
    masks = _mlp_masks(w3=w3)
    alive = effective_masks(masks, MLP, trace)
    assert not alive["w2"][:, 1].any() and alive["w2"].sum() == 25
    assert effective_sparsity(masks, MLP, trace) == pytest.approx(8 / MLP_TOTAL, abs=1e-12)


def _residual(p, x):
    h = jax.nn.relu(x @ p["stem"])
    y = jax.nn.relu(h @ p["a"])
    y = y @ p["b"]
    h = jax.nn.relu(h + y)  # identity skip around a, b
    return h @ p["head"]


RES = {"stem": np.ones((3, 4)), "a": np.ones((4, 4)), "b": np.ones((4, 4)), "head": np.ones((4, 2))}


def test_a_residual_skip_keeps_a_block_alive_and_a_dead_stem_kills_it():
    trace = _trace(_residual, RES, (3,))
    masks = {k: np.ones(np.shape(v), np.float32) for k, v in RES.items()}
    # b fully pruned: the block's branch is dead (a reaches nothing), but the head still receives the
    # stem through the skip: stem and head stay alive. Dead: a (16) and b (16, pruned) of 12+16+16+8.
    cut = dict(masks, b=np.zeros((4, 4), np.float32))
    alive = effective_masks(cut, RES, trace)
    assert alive["stem"].all() and alive["head"].all() and not alive["a"].any()
    assert effective_sparsity(cut, RES, trace) == pytest.approx(32 / 52, abs=1e-12)
    # Without the skip the same mask kills everything.
    plain = _trace(lambda p, x: jax.nn.relu(jax.nn.relu(jax.nn.relu(x @ p["stem"]) @ p["a"]) @ p["b"]) @ p["head"],
                   RES, (3,))
    assert effective_sparsity(cut, RES, plain) == 1.0
    # The stem's output unit 0 dead (column 0 pruned): the skip carries nothing on channel 0, and the
    # block's a has row 0 dead; b's column 0 still feeds channel 0 of the sum, so the head's row 0 lives.
    stem = np.ones((3, 4), np.float32)
    stem[:, 0] = 0
    alive = effective_masks(dict(masks, stem=stem), RES, trace)
    assert not alive["a"][0].any() and alive["a"][1:].all() and alive["head"].all() and alive["b"].all()
    # A dead stem: the skip carries nothing, everything is dead.
    assert effective_sparsity(dict(masks, stem=np.zeros((3, 4), np.float32)), RES, trace) == 1.0


def _convnet(p, x):
    dn = ("NHWC", "HWIO", "NHWC")
    h = jax.nn.relu(jax.lax.conv_general_dilated(x, p["c1"], (1, 1), "SAME", dimension_numbers=dn))
    h = jax.nn.relu(jax.lax.conv_general_dilated(h, p["c2"], (1, 1), "SAME", dimension_numbers=dn))
    return h.reshape(h.shape[0], -1) @ p["fc"]


CONV = {"c1": np.ones((3, 3, 2, 4)), "c2": np.ones((3, 3, 4, 3)), "fc": np.ones((4 * 4 * 3, 5))}


def test_conv_channels_and_the_flatten_into_a_dense_layer():
    trace = _trace(_convnet, CONV, (4, 4, 2))
    masks = {k: np.ones(np.shape(v), np.float32) for k, v in CONV.items()}
    # Output channel 1 of c1 pruned (18 weights): input channel 1 of c2 is dead (9 * 3 = 27 weights).
    c1 = np.ones((3, 3, 2, 4), np.float32)
    c1[..., 1] = 0
    alive = effective_masks(dict(masks, c1=c1), CONV, trace)
    assert not alive["c2"][:, :, 1, :].any() and alive["c2"].sum() == 9 * 3 * 3
    # Output channel 2 of c2 feeds features f with f % 3 == 2 of the flatten (16 of 48); pruning those
    # 16 rows of fc (80 weights) leaves channel 2 reaching nothing: its 9 * 4 input weights are dead.
    fc = np.ones((48, 5), np.float32)
    fc[2::3] = 0
    alive = effective_masks(dict(masks, fc=fc), CONV, trace)
    assert not alive["c2"][..., 2].any() and alive["c2"].sum() == 9 * 4 * 2
    total = 72 + 108 + 240
    assert effective_sparsity(dict(masks, fc=fc), CONV, trace) == pytest.approx((80 + 36) / total, abs=1e-12)


@pytest.mark.parametrize("name", ["resnet20", "lenet5", "vgg11"])
def test_equals_nominal_sparsity_for_a_dense_enough_random_mask(name):
    model = models.get(name, 10)
    shape = (32, 32, 3) if name != "lenet5" else (28, 28, 1)
    params, stats = models.init(model, jax.random.PRNGKey(0), (1, *shape))
    apply_fn = lambda p, s, x, train: model.apply({"params": p, **({"batch_stats": s} if s else {})}, x, train=False)
    trace = model_trace(apply_fn, params, stats, shape)
    assert not trace.unsupported
    rng = np.random.default_rng(0)
    # 70% of every kernel's weights kept at random. The unit with the fewest weights is an input row of
    # the 10-class logits layer (10 weights): it loses them all with probability 0.3**10 < 6e-6, so with
    # at most 512 such rows the chance that any unit is cut off is below 0.3%, and the seed is fixed.
    # (At 50% a row of 10 dies with probability 1/1024: VGG-11 then really loses about one channel.)
    masks = jax.tree_util.tree_map(
        lambda p: (rng.uniform(size=np.shape(p)) < 0.7).astype(np.float32) if np.ndim(p) >= 2 else np.float32(1), params)
    kernels = [m for m in jax.tree_util.tree_leaves(masks) if np.ndim(m) >= 2]
    nominal = 1 - sum(int(np.count_nonzero(m)) for m in kernels) / sum(m.size for m in kernels)
    assert effective_sparsity(masks, params, trace) == pytest.approx(nominal, abs=1e-12)


def test_bad_trace_and_masks_are_clear_errors():
    trace = _trace(_mlp, MLP, (4,))
    with pytest.raises(TypeError, match="`trace` must be a LayerTrace"):
        effective_sparsity(_mlp_masks(), MLP, "graph")
    with pytest.raises(ValueError, match="masks"):
        effective_sparsity({"w1": np.ones((4, 5))}, MLP, trace)


# --------------------------------------------------------------------------- FLOPs


def _strided(p, x):
    dn = ("NHWC", "HWIO", "NHWC")
    h = jax.nn.relu(jax.lax.conv_general_dilated(x, p["c1"], (1, 1), "SAME", dimension_numbers=dn) + p["bias"])
    h = jax.lax.conv_general_dilated(h, p["c2"], (2, 2), "SAME", dimension_numbers=dn)
    return h.reshape(h.shape[0], -1) @ p["fc"]


def test_flops_of_a_masked_tiny_model_against_a_count_by_hand():
    from prospr_jax._src.cost import masked_cost

    params = {"c1": np.ones((3, 3, 2, 4)), "bias": np.ones(4), "c2": np.ones((3, 3, 4, 3)), "fc": np.ones((27, 5))}
    trace = _trace(_strided, params, (5, 5, 2))
    rng = np.random.default_rng(3)
    masks = {"c1": (rng.uniform(size=(3, 3, 2, 4)) < 0.4).astype(np.float32), "bias": np.float32(1.0),
             "c2": (rng.uniform(size=(3, 3, 4, 3)) < 0.6).astype(np.float32),
             "fc": (rng.uniform(size=(27, 5)) < 0.5).astype(np.float32)}
    k1, k2, k3 = (int(masks[n].sum()) for n in ("c1", "c2", "fc"))
    # c1: stride 1, SAME on 5x5: 25 output positions. c2: stride 2 -> ceil(5/2) = 3, 9 positions.
    # fc on the flattened 3*3*3 = 27 features: applied once per example. Bias and ReLU are not counted.
    cost = masked_cost(masks, params, trace)
    assert cost.flops == 25 * k1 + 9 * k2 + k3
    assert cost.dense_flops == 25 * 72 + 9 * 108 + 135
    assert cost.layer_flops["c2"] == (9 * k2, 9 * 108)
    assert cost.theoretical_speedup == pytest.approx((25 * 72 + 9 * 108 + 135) / (25 * k1 + 9 * k2 + k3), rel=1e-12)
    assert (cost.kept_params, cost.total_params) == (k1 + k2 + k3 + 4, 72 + 4 + 108 + 135)
    assert cost.compression_ratio == pytest.approx(319 / (k1 + k2 + k3 + 4), rel=1e-12)
