"""Lookahead pruning (LAP): scores against brute-force distortions and independent numpy loops,
the traced layer graph (flatten, pooling, BatchNorm folding, residual sums), the variants and errors."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import prospr_jax as pj
from prospr_jax import PruningProblem
from prospr_jax.graph import LayerGraph
from prospr_jax.methods.lookahead import lap_neighbour_norms, lap_scores, problem_layer_graph

VARIANT_METHODS = {"lap": "lap", "forward": "lap_forward", "backward": "lap_backward"}


def lap_masks(problem, sparsity, *, variant="lap", min_per_layer=0, **options):
    """Lookahead pruning through the registry: ``(masks, result)``."""
    result = pj.methods.prune(VARIANT_METHODS[variant], problem, sparsity, min_per_layer=min_per_layer, **options)
    return result.masks, result


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def _kernels(seed, shapes, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.standard_normal(s).astype(dtype)) for s in shapes]


def _params(kernels):
    return {f"l{i}": {"kernel": k} for i, k in enumerate(kernels)}


def _problem(params, apply, input_shape, **kw):
    """A PruningProblem around a hand-written ``apply(params, x) -> outputs``."""

    def apply_fn(p, state, x, train):
        del state, train
        return apply(p, x)

    def loss_fn(p, batch):
        return jnp.sum(apply(p, batch["image"]) ** 2)

    return PruningProblem(params=params, loss_fn=loss_fn, apply_fn=apply_fn, input_shape=input_shape, **kw)


def _mlp(p, x):
    n = len(p)
    h = x
    for i in range(n):
        h = h @ p[f"l{i}"]["kernel"]
        if i < n - 1:
            h = jax.nn.relu(h)
    return h


def _conv(x, kernel, stride=1, padding="VALID"):
    return jax.lax.conv_general_dilated(
        x, kernel, (stride, stride), padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def _convnet(p, x, relu=True):
    h = x
    n = len(p)
    for i in range(n):
        h = _conv(h, p[f"l{i}"]["kernel"])
        if relu and i < n - 1:
            h = jax.nn.relu(h)
    return h


def _sq_rows(k):
    """numpy: squared weights into each output unit of a kernel [..., in, out]."""
    k = np.asarray(k, np.float64)
    return np.array([np.sum(k[..., j] ** 2) for j in range(k.shape[-1])])


def _sq_cols(k):
    """numpy: squared weights out of each input unit of a kernel [..., in, out]."""
    k = np.asarray(k, np.float64)
    return np.array([np.sum(k[..., i, :] ** 2) for i in range(k.shape[-2])])


def _norms(problem, **kw):
    graph, scales = problem_layer_graph(problem, **kw)
    norms = lap_neighbour_norms(problem.params, graph, bn_scales=scales)
    return {name.split("/")[0]: tuple(np.asarray(v, np.float64) for v in pair) for name, pair in norms.items()}


def _scores(problem, **kw):
    graph, scales = problem_layer_graph(problem, **kw)
    scores = lap_scores(problem.params, graph, bn_scales=scales)
    return {k: np.asarray(v["kernel"], np.float64) for k, v in scores.items() if "kernel" in v}


# ---------------------------------------------------------------------------------------------
# scores = brute-force Frobenius distortion
# ---------------------------------------------------------------------------------------------


def test_mlp_scores_equal_bruteforce_frobenius_distortion():
    with jax.enable_x64(True):
        k1, k2, k3 = _kernels(0, [(4, 5), (5, 6), (6, 3)], np.float64)
        problem = _problem(_params([k1, k2, k3]), _mlp, (4,))
        scores = _scores(problem)
    # matrix convention y = W x: W_i = kernel_i^T
    w1, w2, w3 = (np.asarray(k, np.float64).T for k in (k1, k2, k3))

    def distortion(left, w, right):
        """||left W right - left W' right||_F^2 for every single zeroed entry W'[j, k] = 0,
        returned in the flax [in, out] layout (entry [k, j])."""
        out = np.zeros(w.T.shape)
        full = left @ w @ right
        for j in range(w.shape[0]):
            for k in range(w.shape[1]):
                pruned = w.copy()
                pruned[j, k] = 0.0
                out[k, j] = np.sum((full - left @ pruned @ right) ** 2)
        return out

    eye = np.eye
    expected = {
        "l0": distortion(w2, w1, eye(4)),  # no previous layer: the identity (norm 1 per unit)
        "l1": distortion(w3, w2, w1),
        "l2": distortion(eye(3), w3, w2),  # no next layer
    }
    for name in expected:
        np.testing.assert_allclose(scores[name], expected[name], rtol=1e-10, err_msg=name)
        np.testing.assert_array_equal(
            np.argsort(scores[name], axis=None), np.argsort(expected[name], axis=None), err_msg=name
        )


def _linear_operator(apply, params, in_shape):
    """The matrix of a linear network: its outputs on every basis input."""
    n = int(np.prod(in_shape))
    basis = jnp.eye(n, dtype=jnp.float64).reshape((n, *in_shape))
    return np.asarray(apply(params, basis)).reshape(n, -1)


def test_pointwise_conv_scores_equal_bruteforce_distortion_of_the_composed_operator():
    """With 1x1 convolutions the network acts on every pixel as W3 W2 W1, so the distortion of
    the whole composed operator is (pixels) x the LAP score exactly."""
    in_shape = (3, 3, 2)
    with jax.enable_x64(True):
        ks = _kernels(1, [(1, 1, 2, 3), (1, 1, 3, 4), (1, 1, 4, 2)], np.float64)
        params = _params(ks)
        problem = _problem(params, _convnet, in_shape)
        scores = _scores(problem)
        linear = jax.jit(lambda p, x: _convnet(p, x, relu=False))
        full = _linear_operator(linear, params, in_shape)
        mid = np.asarray(ks[1])
        brute = np.zeros(mid.shape)
        for k in range(mid.shape[2]):
            for j in range(mid.shape[3]):
                pruned = dict(params, l1={"kernel": ks[1].at[0, 0, k, j].set(0.0)})
                brute[0, 0, k, j] = np.sum((full - _linear_operator(linear, pruned, in_shape)) ** 2)
    pixels = in_shape[0] * in_shape[1]
    np.testing.assert_allclose(scores["l1"], brute / pixels, rtol=1e-10)
    np.testing.assert_array_equal(np.argsort(scores["l1"], axis=None), np.argsort(brute, axis=None))


def test_spatial_conv_scores_follow_the_channel_unit_definition():
    """For k x k kernels the distortion of the composed operator has cross terms between kernel
    positions (||a * b||^2 != ||a||^2 ||b||^2 for convolutions), so LAP's conv score is defined with
    a channel as the unit: checked here against an explicit numpy loop."""
    ks = _kernels(2, [(3, 3, 2, 3), (2, 2, 3, 4), (3, 3, 4, 2)])
    problem = _problem(_params(ks), _convnet, (9, 9, 2))
    scores = _scores(problem)
    w0, w1, w2 = (np.asarray(k, np.float64) for k in ks)
    expected = np.zeros(w1.shape)
    for a in range(w1.shape[0]):
        for b in range(w1.shape[1]):
            for k in range(w1.shape[2]):
                for j in range(w1.shape[3]):
                    prev = sum(w0[p, q, c, k] ** 2 for p in range(3) for q in range(3) for c in range(2))
                    nxt = sum(w2[p, q, j, m] ** 2 for p in range(3) for q in range(3) for m in range(2))
                    expected[a, b, k, j] = w1[a, b, k, j] ** 2 * prev * nxt
    np.testing.assert_allclose(scores["l1"], expected, rtol=1e-5)
    # first layer: missing previous neighbour counts as 1
    first = np.array([[[[w0[a, b, k, j] ** 2 * np.sum(w1[:, :, j, :] ** 2) for j in range(3)]
                        for k in range(2)] for b in range(3)] for a in range(3)])
    np.testing.assert_allclose(scores["l0"], first, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# channel maps through flatten and pooling
# ---------------------------------------------------------------------------------------------


def test_conv_flatten_dense_maps_feature_f_to_channel_f_mod_c():
    kc, kd, ko = _kernels(3, [(3, 3, 2, 3), (2 * 2 * 3, 5), (5, 4)])

    def apply(p, x):  # 6x6 -> conv VALID 4x4x3 -> max-pool 2x2 -> 2x2x3 -> flatten 12 -> dense
        h = jax.nn.relu(_conv(x, p["l0"]["kernel"]))
        h = nn.max_pool(h, (2, 2), strides=(2, 2))
        h = h.reshape((h.shape[0], -1))
        return jax.nn.relu(h @ p["l1"]["kernel"]) @ p["l2"]["kernel"]

    norms = _norms(_problem(_params([kc, kd, ko]), apply, (6, 6, 2)))
    c = 3
    wc, wd = np.asarray(kc, np.float64), np.asarray(kd, np.float64)
    out_conv = [sum(np.sum(wd[f, :] ** 2) for f in range(wd.shape[0]) if f % c == ch) for ch in range(c)]
    in_dense = [np.sum(wc[:, :, :, f % c] ** 2) for f in range(wd.shape[0])]
    np.testing.assert_allclose(norms["l0"][1], out_conv, rtol=1e-5)
    np.testing.assert_allclose(norms["l1"][0], in_dense, rtol=1e-5)
    np.testing.assert_allclose(norms["l0"][0], np.ones(2))  # first layer
    np.testing.assert_allclose(norms["l2"][1], np.ones(4))  # last layer


def test_global_average_pool_maps_channel_c_to_dense_input_c():
    kc, kd = _kernels(4, [(3, 3, 2, 5), (5, 3)])

    def apply(p, x):
        h = jax.nn.relu(_conv(x, p["l0"]["kernel"], padding="SAME"))
        return jnp.mean(h, axis=(1, 2)) @ p["l1"]["kernel"]

    norms = _norms(_problem(_params([kc, kd]), apply, (4, 4, 2)))
    np.testing.assert_allclose(norms["l1"][0], _sq_rows(kc), rtol=1e-5)
    np.testing.assert_allclose(norms["l0"][1], _sq_cols(kd), rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# BatchNorm folding
# ---------------------------------------------------------------------------------------------


class _DenseBNDense(nn.Module):
    @nn.compact
    def __call__(self, x, train):
        h = nn.Dense(6, use_bias=False, name="fc1")(x)
        h = nn.BatchNorm(use_running_average=not train, epsilon=1e-3, name="bn")(h)
        h = nn.relu(h)
        return nn.Dense(3, use_bias=False, name="fc2")(h)


def _bn_variables(seed=5):
    model = _DenseBNDense()
    variables = model.init(jax.random.PRNGKey(seed), jnp.zeros((1, 4)), train=False)
    k = jax.random.split(jax.random.PRNGKey(seed + 1), 4)
    params = dict(variables["params"])
    params["bn"] = {"scale": jax.random.uniform(k[0], (6,), minval=0.2, maxval=3.0),
                    "bias": jax.random.normal(k[1], (6,))}
    stats = {"bn": {"mean": jax.random.normal(k[2], (6,)),
                    "var": jax.random.uniform(k[3], (6,), minval=0.1, maxval=4.0)}}
    return model, {"params": params, "batch_stats": stats}


def test_bn_fold_equals_scores_of_the_network_with_s_folded_by_hand():
    model, variables = _bn_variables()
    problem = PruningProblem.from_flax(model, variables, input_shape=(4,))
    scores = _scores(problem)
    p, st = variables["params"], variables["batch_stats"]
    s = np.asarray(p["bn"]["scale"], np.float64) / np.sqrt(np.asarray(st["bn"]["var"], np.float64) + 1e-3)
    k1 = np.asarray(p["fc1"]["kernel"], np.float64) * s[None, :]  # fold s into fc1's output units
    k2 = np.asarray(p["fc2"]["kernel"], np.float64)
    expected_fc1 = k1 ** 2 * np.sum(k2 ** 2, axis=1)[None, :]
    expected_fc2 = k2 ** 2 * np.sum(k1 ** 2, axis=0)[:, None]
    np.testing.assert_allclose(scores["fc1"], expected_fc1, rtol=1e-5)
    np.testing.assert_allclose(scores["fc2"], expected_fc2, rtol=1e-5)
    # without folding the scores are those of the raw kernels
    raw = _scores(problem, bn_fold=False)
    k1_raw = np.asarray(p["fc1"]["kernel"], np.float64)
    np.testing.assert_allclose(raw["fc2"], k2 ** 2 * np.sum(k1_raw ** 2, axis=0)[:, None], rtol=1e-5)


def test_bn_fold_without_running_statistics_raises():
    model, variables = _bn_variables()
    no_stats = PruningProblem.from_flax(model, {"params": variables["params"]}, input_shape=(4,))
    with pytest.raises(ValueError, match="running"):
        lap_masks(no_stats, 0.5)
    # only a training-mode loss (batch statistics): also refused with bn_fold, fine without
    train_loss = PruningProblem(
        params=variables["params"],
        loss_fn=lambda p, b: jnp.sum(
            model.apply({"params": p, "batch_stats": variables["batch_stats"]}, b["image"], train=True,
                        mutable=["batch_stats"])[0] ** 2),
        batch_fn=lambda i: {"image": jax.random.normal(jax.random.PRNGKey(i), (8, 4))},
    )
    with pytest.raises(ValueError, match="batch statistics"):
        lap_masks(train_loss, 0.5)
    masks, result = lap_masks(train_loss, 0.5, bn_fold=False)
    assert result.extras["trace_mode"] == "loss" and not result.extras["bn_folded"]
    assert int(masks["fc1"]["kernel"].sum()) == 12


def test_bn_fold_is_a_noop_without_batchnorm():
    ks = _kernels(6, [(4, 5), (5, 3)])
    problem = _problem(_params(ks), _mlp, (4,))
    a, b = _scores(problem, bn_fold=True), _scores(problem, bn_fold=False)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])


# ---------------------------------------------------------------------------------------------
# residual graphs
# ---------------------------------------------------------------------------------------------


def _residual_mlp(p, x):
    h = jax.nn.relu(x @ p["l0"]["kernel"])
    r = jax.nn.relu(h @ p["l1"]["kernel"]) @ p["l2"]["kernel"]
    return jax.nn.relu(h + r) @ p["l3"]["kernel"]


def test_residual_mlp_sums_both_consumers_and_adds_one_for_the_identity_skip():
    ks = _kernels(7, [(3, 5), (5, 4), (4, 5), (5, 2)])
    problem = _problem(_params(ks), _residual_mlp, (3,))
    norms = _norms(problem)
    a, b, c, d = ks
    np.testing.assert_allclose(norms["l0"][1], _sq_cols(b) + 1.0, rtol=1e-5)  # consumers: l1 and the skip
    np.testing.assert_allclose(norms["l3"][0], _sq_rows(c) + 1.0, rtol=1e-5)  # producers: l2 and the skip
    np.testing.assert_allclose(norms["l1"][0], _sq_rows(a), rtol=1e-5)
    np.testing.assert_allclose(norms["l2"][1], _sq_cols(d), rtol=1e-5)
    np.testing.assert_allclose(norms["l0"][0], np.ones(3))
    np.testing.assert_allclose(norms["l3"][1], np.ones(2))
    # chain=True (official convention): previous / next kernel in forward order, no skip
    chain = _norms(problem, chain=True)
    np.testing.assert_allclose(chain["l0"][1], _sq_cols(b), rtol=1e-5)
    np.testing.assert_allclose(chain["l3"][0], _sq_rows(c), rtol=1e-5)
    # the explicit override reproduces the traced graph
    explicit = {
        "l0/kernel": {"consumers": ["l1/kernel"], "identity_out": True},
        "l1/kernel": {"consumers": ["l2/kernel"]},
        "l2/kernel": {"consumers": ["l3/kernel"]},
        "l3/kernel": {"identity_in": True},
    }
    over = _norms(problem, neighbours=explicit)
    for name in norms:
        for got, want in zip(over[name], norms[name]):
            np.testing.assert_allclose(got, want, rtol=1e-6)


def test_residual_scales_fold_into_the_producer_side_only():
    """Per-channel factors (as BatchNorm's s) multiply the norms of the units they scale; the skip
    taken after the factor still counts 1 where it arrives, and s^2 (1 + ...) where it leaves."""
    ks = _kernels(18, [(3, 5), (5, 4), (4, 5), (5, 2)])
    rng = np.random.default_rng(18)
    s_a, s_c = (jnp.asarray(rng.uniform(0.3, 2.0, 5).astype(np.float32)) for _ in range(2))
    params = _params(ks)
    params["sa"] = {"scale": s_a}
    params["sc"] = {"scale": s_c}

    def apply(p, x):
        h = jax.nn.relu((x @ p["l0"]["kernel"]) * p["sa"]["scale"])
        r = (jax.nn.relu(h @ p["l1"]["kernel"]) @ p["l2"]["kernel"]) * p["sc"]["scale"]
        return jax.nn.relu(h + r) @ p["l3"]["kernel"]

    norms = _norms(_problem(params, apply, (3,)))
    a, b, c, d = ks
    sa, sc = np.asarray(s_a, np.float64) ** 2, np.asarray(s_c, np.float64) ** 2
    np.testing.assert_allclose(norms["l0"][1], sa * (_sq_cols(b) + 1.0), rtol=1e-5)
    np.testing.assert_allclose(norms["l1"][0], sa * _sq_rows(a), rtol=1e-5)
    np.testing.assert_allclose(norms["l2"][1], sc * _sq_cols(d), rtol=1e-5)
    np.testing.assert_allclose(norms["l3"][0], sc * _sq_rows(c) + 1.0, rtol=1e-5)
    unfolded = _norms(_problem(params, apply, (3,)), bn_fold=False)
    np.testing.assert_allclose(unfolded["l3"][0], _sq_rows(c) + 1.0, rtol=1e-5)


def _option_a_net(projection):
    def apply(p, x):
        h = jax.nn.relu(_conv(x, p["a"]["kernel"], padding="SAME"))  # 4 channels, 4x4
        r = jax.nn.relu(_conv(h, p["b"]["kernel"], stride=2, padding="SAME"))  # 8 channels, 2x2
        r = _conv(r, p["c"]["kernel"], padding="SAME")
        if projection:
            skip = _conv(h, p["p"]["kernel"], stride=2)
        else:  # option A: subsample, zero-pad 2 channels before and after
            skip = jnp.pad(h[:, ::2, ::2, :], ((0, 0), (0, 0), (0, 0), (2, 2)))
        y = jax.nn.relu(r + skip)
        return _conv(y, p["d"]["kernel"], padding="SAME")

    return apply


def test_option_a_shortcut_maps_the_skip_to_an_offset_channel_range():
    ka, kb, kc, kd = _kernels(8, [(3, 3, 3, 4), (3, 3, 4, 8), (3, 3, 8, 8), (3, 3, 8, 5)])
    params = {"a": {"kernel": ka}, "b": {"kernel": kb}, "c": {"kernel": kc}, "d": {"kernel": kd}}
    norms = _norms(_problem(params, _option_a_net(False), (4, 4, 3)))
    offset = np.array([1.0 if 2 <= k < 6 else 0.0 for k in range(8)])
    np.testing.assert_allclose(norms["d"][0], _sq_rows(kc) + offset, rtol=1e-5)
    np.testing.assert_allclose(norms["a"][1], _sq_cols(kb) + 1.0, rtol=1e-5)
    np.testing.assert_allclose(norms["c"][1], _sq_cols(kd), rtol=1e-5)


def test_projection_shortcut_sums_all_producers_and_consumers_without_identity():
    ka, kb, kc, kd, kp = _kernels(
        9, [(3, 3, 3, 4), (3, 3, 4, 8), (3, 3, 8, 8), (3, 3, 8, 5), (1, 1, 4, 8)]
    )
    params = {"a": {"kernel": ka}, "b": {"kernel": kb}, "c": {"kernel": kc}, "d": {"kernel": kd}, "p": {"kernel": kp}}
    norms = _norms(_problem(params, _option_a_net(True), (4, 4, 3)))
    np.testing.assert_allclose(norms["d"][0], _sq_rows(kc) + _sq_rows(kp), rtol=1e-5)
    np.testing.assert_allclose(norms["a"][1], _sq_cols(kb) + _sq_cols(kp), rtol=1e-5)
    np.testing.assert_allclose(norms["p"][0], _sq_rows(ka), rtol=1e-5)
    np.testing.assert_allclose(norms["p"][1], _sq_cols(kd), rtol=1e-5)


def test_elementwise_function_of_one_activation_is_not_a_residual():
    """GELU (x * tanh(... x^3)) uses its input several times; that is not a skip connection."""
    ks = _kernels(10, [(3, 4), (4, 5), (5, 2)])

    def apply(p, x):
        h = jax.nn.gelu(x @ p["l0"]["kernel"], approximate=True)
        h = jax.nn.silu(h @ p["l1"]["kernel"])
        return h @ p["l2"]["kernel"]

    graph, _ = problem_layer_graph(_problem(_params(ks), apply, (3,)))
    assert not any(e.kind == "identity" for e in graph.edges)
    norms = _norms(_problem(_params(ks), apply, (3,)))
    np.testing.assert_allclose(norms["l1"][0], _sq_rows(ks[0]), rtol=1e-5)
    np.testing.assert_allclose(norms["l1"][1], _sq_cols(ks[2]), rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# masks and variants
# ---------------------------------------------------------------------------------------------


def _np_lap(ws, i):
    """numpy LAP scores of layer i of a bias-free MLP chain with flax kernels ws."""
    prev = np.sum(ws[i - 1] ** 2, axis=0) if i > 0 else np.ones(ws[i].shape[0])
    nxt = np.sum(ws[i + 1] ** 2, axis=1) if i < len(ws) - 1 else np.ones(ws[i].shape[1])
    return ws[i] ** 2 * prev[:, None] * nxt[None, :]


def _np_top(score, density):
    k = math.ceil(round(density * score.size, 6))
    keep = np.zeros(score.size)
    keep[np.argsort(-score, axis=None, kind="stable")[:k]] = 1.0
    return keep.reshape(score.shape)


@pytest.mark.parametrize("variant", ["lap", "forward", "backward"])
def test_variants_match_a_numpy_reference_and_keep_ceil_d_n_per_layer(variant):
    ks = _kernels(11, [(6, 7), (7, 8), (8, 5), (5, 3)])
    problem = _problem(_params(ks), _mlp, (6,))
    sparsity = 0.7
    masks, result = lap_masks(problem, sparsity, variant=variant)
    ws = [np.asarray(k, np.float64) for k in ks]
    order = list(range(4)) if variant != "backward" else list(range(3, -1, -1))
    expected = {}
    for i in order:
        expected[i] = _np_top(_np_lap(ws, i), 1 - sparsity)
        if variant != "lap":
            ws[i] = ws[i] * expected[i]  # the next layer in the order sees the pruned weights
    for i in range(4):
        got = np.asarray(masks[f"l{i}"]["kernel"])
        np.testing.assert_array_equal(got, expected[i], err_msg=f"{variant} layer {i}")
        assert got.sum() == math.ceil(round(0.3 * got.size, 6)) == result.extras["kept"][f"l{i}/kernel"]
    assert result.method == VARIANT_METHODS[variant]
    assert result.sparsity == sparsity and result.seconds > 0 and result.extras["graph"] == "traced"


def test_lap_forward_uses_the_pruned_previous_layer():
    ks = _kernels(12, [(6, 7), (7, 8), (8, 5), (5, 3)])
    problem = _problem(_params(ks), _mlp, (6,))
    plain, _ = lap_masks(problem, 0.8)
    forward, _ = lap_masks(problem, 0.8, variant="forward")
    backward, _ = lap_masks(problem, 0.8, variant="backward")
    # the first layer has no pruned predecessor: same mask; the next ones differ
    np.testing.assert_array_equal(plain["l0"]["kernel"], forward["l0"]["kernel"])
    assert not np.array_equal(plain["l1"]["kernel"], forward["l1"]["kernel"])
    np.testing.assert_array_equal(plain["l3"]["kernel"], backward["l3"]["kernel"])
    assert not np.array_equal(plain["l2"]["kernel"], backward["l2"]["kernel"])


def test_excluded_layers_stay_dense_but_remain_neighbours():
    ks = _kernels(13, [(4, 5), (5, 6), (6, 3)])
    problem = _problem(_params(ks), _mlp, (4,), exclude_first=True, exclude_last=True,
                       batch_fn=lambda i: {"image": jnp.ones((2, 4))})
    masks, result = lap_masks(problem, 0.5)
    assert masks["l0"]["kernel"].ndim == 0 and masks["l2"]["kernel"].ndim == 0
    ws = [np.asarray(k, np.float64) for k in ks]
    np.testing.assert_array_equal(masks["l1"]["kernel"], _np_top(_np_lap(ws, 1), 0.5))
    assert result.extras["order"] == ["l1/kernel"]


def test_lap_scores_are_jittable():
    # Eager and jitted are two programs: float64 makes "the same values" a sharp claim (in float32
    # each score, a product of two sums of squares, may round by ~10 ulps differently in each).
    with jax.enable_x64(True):
        ks = _kernels(14, [(3, 5), (5, 4), (4, 5), (5, 2)], np.float64)
        problem = _problem(_params(ks), _residual_mlp, (3,))
        graph, scales = problem_layer_graph(problem)
        eager = lap_scores(problem.params, graph, bn_scales=scales)
        jitted = jax.jit(lambda p: lap_scores(p, graph, bn_scales=scales))(problem.params)
        for a, b in zip(jax.tree_util.tree_leaves(eager), jax.tree_util.tree_leaves(jitted)):
            assert np.asarray(b).dtype == np.float64
            np.testing.assert_allclose(a, b, rtol=1e-12)


# ---------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------


def test_unsupported_primitive_raises_naming_it_and_chain_still_works():
    ks = _kernels(15, [(4, 5), (5, 3)])

    def apply(p, x):
        h = jnp.sort(x @ p["l0"]["kernel"], axis=-1)  # mixes channels
        return h @ p["l1"]["kernel"]

    problem = _problem(_params(ks), apply, (4,))
    with pytest.raises(ValueError, match=r"(?s)'sort'.*chain=True"):
        lap_masks(problem, 0.5)
    with pytest.warns(UserWarning, match="not folded"):  # BN after l0 could not be looked for
        masks, result = lap_masks(problem, 0.5, chain=True)
    assert result.extras["graph"] == "chain" and int(masks["l0"]["kernel"].sum()) == 10
    masks, result = lap_masks(problem, 0.5, chain=True, bn_fold=False)
    ws = [np.asarray(k, np.float64) for k in ks]
    np.testing.assert_array_equal(masks["l1"]["kernel"], _np_top(_np_lap(ws, 1), 0.5))


def test_product_of_two_activations_is_unsupported():
    ks = _kernels(16, [(4, 5), (4, 5), (5, 3)])

    def apply(p, x):
        gate = jax.nn.sigmoid(x @ p["l1"]["kernel"])
        return (jax.nn.relu(x @ p["l0"]["kernel"]) * gate) @ p["l2"]["kernel"]

    with pytest.raises(ValueError, match="'mul' of two different activations"):
        problem_layer_graph(_problem(_params(ks), apply, (4,)))


def test_bad_arguments_raise():
    ks = _kernels(17, [(4, 5), (5, 3)])
    problem = _problem(_params(ks), _mlp, (4,))
    with pytest.raises(ValueError, match="unknown pruning method 'lap_sideways'.*lap_forward"):
        pj.methods.prune("lap_sideways", problem, 0.5)
    with pytest.raises(ValueError, match="sparsity"):
        lap_masks(problem, 1.5)
    with pytest.raises(ValueError, match="not both"):
        lap_masks(problem, 0.5, chain=True, neighbours={})
    with pytest.raises(ValueError, match="not kernels"):
        lap_masks(problem, 0.5, neighbours={"l0/kernel": {"consumers": ["nope/kernel"]}})
    with pytest.raises(ValueError, match="input units"):
        LayerGraph.from_neighbours({"l0/kernel": {"consumers": ["l0/kernel"]}}, problem.params,
                                   ["l0/kernel", "l1/kernel"], ["l0/kernel"])


# ---------------------------------------------------------------------------------------------
# model zoo smoke test
# ---------------------------------------------------------------------------------------------


def test_resnet20_graph_smoke():
    models = pytest.importorskip("prospr_jax.models", reason="model zoo not available")
    model = models.get("resnet20", num_classes=10)
    # random values of the right shapes (cheaper than compiling the model's initialiser)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 3)), train=False))
    rng = np.random.default_rng(0)
    variables = jax.tree_util.tree_map(
        lambda s: jnp.asarray(0.5 + np.abs(rng.standard_normal(s.shape)), s.dtype), shapes
    )
    problem = PruningProblem.from_flax(model, variables, input_shape=(8, 8, 3), num_classes=10)
    graph, scales = problem_layer_graph(problem)
    nb = graph.neighbours()
    convs = [n for n in graph.layers if n != "logits/kernel"]
    assert len(convs) == 19 and graph.layers[0] == "conv_stem/kernel" and graph.layers[-1] == "logits/kernel"
    assert all(nb[n]["consumers"] for n in convs)
    assert nb["conv_stem/kernel"]["producers"] == [] and not nb["conv_stem/kernel"]["identity_in"]
    assert nb["logits/kernel"]["consumers"] == [] and not nb["logits/kernel"]["identity_out"]
    # every block's first conv reads a residual sum, except the first block's, which reads the stem
    assert nb["layer2_block0/conv1/kernel"]["identity_in"] and not nb["layer1_block0/conv1/kernel"]["identity_in"]
    assert nb["layer2_block0/conv1/kernel"]["producers"] == ["layer1_block2/conv2/kernel"]
    assert scales is not None  # BatchNorm folded
