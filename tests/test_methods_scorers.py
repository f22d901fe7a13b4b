"""GraSP, SynFlow, Iter-SNIP/FORCE, LAMP, ERK, magnitude and random, each checked against an
independent computation (explicit Hessians, closed forms, Python loops)."""

from __future__ import annotations

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import prospr_jax as pj
from prospr_jax.methods import (
    MaskRule,
    balanced_batch,
    density_schedule,
    erk_densities,
    force_masks,
    grasp_scores,
    iterative_snip_masks,
    lamp_scores,
    magnitude_scores,
    masked_gradient_scores,
    random_scores,
    synflow_masks,
    synflow_scores,
)
from tiny_models import batch_at, mlp_batches, mlp_loss, mlp_params


# ----------------------------------------------------------------------------------------------- helpers
def chain_params(key, sizes, dtype=jnp.float32):
    """Bias-free MLP kernels, Kaiming-normal, named in forward order."""
    keys = jax.random.split(key, len(sizes) - 1)
    return {
        f"l{i:02d}": {"kernel": (jax.random.normal(k, (a, b)) * np.sqrt(2.0 / a)).astype(dtype)}
        for i, (k, a, b) in enumerate(zip(keys, sizes[:-1], sizes[1:]))
    }


def chain_logits(params, state, x, train=False):
    h = x.reshape(x.shape[0], -1)
    n = len(params)
    for i in range(n):
        h = h @ params[f"l{i:02d}"]["kernel"]
        if i < n - 1:
            h = jax.nn.relu(h)
    return h


def chain_loss(params, batch):
    return optax.softmax_cross_entropy_with_integer_labels(chain_logits(params, {}, batch["x"]), batch["y"]).mean()


def chain_batch_fn(in_dim, classes, size=32):
    def batch_fn(i):
        k = jax.random.fold_in(jax.random.key(123), i)
        kx, ky = jax.random.split(k)
        return {"x": jax.random.normal(kx, (size, in_dim)), "y": jax.random.randint(ky, (size,), 0, classes)}

    return batch_fn


def kept_per_layer(masks):
    return [int(np.sum(m)) for _, m in pj.named_leaves(masks) if np.ndim(m) >= 1]


def total_kept(masks):
    return sum(kept_per_layer(masks))


# ----------------------------------------------------------------------------------------------- GraSP
def _flat_prunable(params):
    ones = jax.tree_util.tree_map_with_path(
        lambda p, x: jnp.full(x.shape, 1.0 if pj.default_prunable(p, x) else 0.0, x.dtype), params
    )
    return ravel_pytree(ones)[0]


@pytest.mark.parametrize("hvp", ["double_backprop", "jvp"])
@pytest.mark.parametrize("full_gradient", [False, True])
def test_grasp_hg_equals_explicit_hessian_times_gradient(hvp, full_gradient):
    with jax.enable_x64(True):
        params = mlp_params(jax.random.key(0))
        batches = mlp_batches(jax.random.key(1), 2)
        scores = grasp_scores(mlp_loss, params, batches, hvp=hvp, full_gradient=full_gradient)

        flat, unravel = ravel_pytree(params)
        n = flat.size
        h = np.zeros((n, n))
        g = np.zeros(n)
        f = jax.jit(lambda v, batch: mlp_loss(unravel(v), batch))
        for b in range(2):
            batch = batch_at(batches, b)
            h += np.asarray(jax.jit(jax.hessian(f))(flat, batch)) / 2
            g += np.asarray(jax.jit(jax.grad(f))(flat, batch)) / 2
        direction = g if full_gradient else g * np.asarray(_flat_prunable(params))
        expected = unravel(jnp.asarray(np.asarray(flat) * (h @ direction)))
        for layer in params:
            np.testing.assert_allclose(scores[layer]["kernel"], expected[layer]["kernel"], rtol=1e-9, atol=1e-14)
            assert np.ndim(scores[layer]["bias"]) == 0


def test_grasp_removes_the_weights_with_the_largest_saliency_first():
    with jax.enable_x64(True):
        params = mlp_params(jax.random.key(2))
        batches = mlp_batches(jax.random.key(3), 1)
        scores = grasp_scores(mlp_loss, params, batches)
        flat, unravel = ravel_pytree(params)
        batch = batch_at(batches, 0)
        f = jax.jit(lambda v: mlp_loss(unravel(v), batch))
        g = np.asarray(jax.jit(jax.grad(f))(flat)) * np.asarray(_flat_prunable(params))
        saliency = -np.asarray(flat) * (np.asarray(jax.jit(jax.hessian(f))(flat)) @ g)  # S = -theta * Hg
        kernels = np.asarray(_flat_prunable(params)) > 0
        n = int(kernels.sum())
        for removed in (1, 5):
            masks = pj.masks_from_scores(scores, removed / n)
            kept_flat = np.asarray(ravel_pytree(jax.tree_util.tree_map(
                lambda m, p: jnp.broadcast_to(m, p.shape), masks, params))[0])
            pruned = np.flatnonzero(kernels & (kept_flat == 0))
            largest = np.flatnonzero(kernels)[np.argsort(-saliency[kernels])[:removed]]
            assert sorted(pruned) == sorted(largest)
            assert saliency[pruned].min() > saliency[kernels & (kept_flat == 1)].max()


def test_grasp_temperature_divides_logits_in_both_passes():
    params = chain_params(jax.random.key(4), (6, 8, 3))
    batch_fn = chain_batch_fn(6, 3, size=12)

    def apply_fn(p, s, x, train):
        return chain_logits(p, s, x)

    def loss_fn(p, b):
        return optax.softmax_cross_entropy_with_integer_labels(chain_logits(p, {}, b["image"]), b["label"]).mean()

    def image_batch(i):
        b = batch_fn(i)
        return {"image": b["x"], "label": b["y"]}

    problem = pj.PruningProblem(params, loss_fn, batch_fn=image_batch, apply_fn=apply_fn, num_classes=3)
    got = pj.methods.score("grasp", problem, samples_per_class=None, num_batches=2)

    def hot_loss(p, b):  # written out independently: cross-entropy of logits / 200
        z = chain_logits(p, {}, b["image"]) / 200.0
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(z), b["label"][:, None], axis=1))

    expected = grasp_scores(hot_loss, params, pj.stack_batches([image_batch(0), image_batch(1)]))
    cold = grasp_scores(loss_fn, params, pj.stack_batches([image_batch(0), image_batch(1)]))
    for layer in params:
        np.testing.assert_allclose(got[layer]["kernel"], expected[layer]["kernel"], rtol=1e-4, atol=1e-12)
        assert not np.allclose(got[layer]["kernel"], cold[layer]["kernel"], rtol=1e-2)

    info = pj.methods.prune("grasp", problem, 0.5, samples_per_class=None).extras
    assert info["temperature"] == 200.0
    no_apply = problem.replace(apply_fn=None)
    with pytest.warns(UserWarning, match="temperature"):
        info = pj.methods.prune("grasp", no_apply, 0.5, samples_per_class=None).extras
    assert info["temperature"] == 1.0 and "no apply_fn" in info["temperature_note"]
    with pytest.raises(ValueError, match="apply_fn"):
        pj.methods.score("grasp", no_apply, samples_per_class=None, temperature=100.0)


def test_balanced_batch_takes_the_first_examples_of_each_class():
    rng = np.random.default_rng(0)
    stream = [{"label": rng.integers(0, 4, size=7), "image": rng.normal(size=(7, 2))} for _ in range(20)]
    batch, next_start = balanced_batch(lambda i: stream[i], 4, 3)
    expected_images, counts, used = [], [0] * 4, 0
    for b in stream:  # independent loop over the stream
        if min(counts) == 3:
            break
        used += 1
        for x, y in zip(b["image"], b["label"]):
            if counts[y] < 3:
                counts[y] += 1
                expected_images.append(x)
    assert next_start == used
    np.testing.assert_array_equal(np.bincount(np.asarray(batch["label"]), minlength=4), [3, 3, 3, 3])
    np.testing.assert_allclose(np.asarray(batch["image"]), np.stack(expected_images), rtol=1e-6)
    with pytest.raises(ValueError, match="classes"):
        balanced_batch(lambda i: stream[i], 5, 3, max_batches=20)


# ----------------------------------------------------------------------------------------------- SynFlow
def _closed_form_synflow(kernels):
    """Score of a bias-free chain on x = 1: |W_l[i,j]| * (1^T |W_1|..|W_{l-1}|)[i] * (|W_{l+1}|..|W_L| 1)[j]."""
    a = [np.abs(np.asarray(w, np.float64)) for w in kernels]
    out = []
    for l in range(len(a)):
        left = np.ones(a[0].shape[0])
        for w in a[:l]:
            left = left @ w
        right = np.ones(a[-1].shape[1])
        for w in reversed(a[l + 1:]):
            right = w @ right
        out.append(a[l] * np.outer(left, right))
    return out


def test_synflow_matches_closed_form_on_a_linear_chain():
    sizes = (5, 4, 6, 3)
    params = chain_params(jax.random.key(5), sizes)
    expected = _closed_form_synflow([params[k]["kernel"] for k in sorted(params)])
    with jax.enable_x64(True):
        exact = synflow_scores(chain_logits, params, {}, (sizes[0],), precision="float64")
        for k, e in zip(sorted(params), expected):
            np.testing.assert_allclose(np.asarray(exact[k]["kernel"]), e, rtol=1e-10)
    rescaled = synflow_scores(chain_logits, params, {}, (sizes[0],), precision="rescale")
    got = np.concatenate([np.asarray(rescaled[k]["kernel"]).ravel() for k in sorted(params)])
    want = np.concatenate([e.ravel() for e in expected])
    np.testing.assert_allclose(got / got.sum(), want / want.sum(), rtol=1e-5)


def test_synflow_rescaling_avoids_overflow_on_a_deep_narrow_mlp():
    sizes = (256,) * 36  # 35 layers, each multiplies an all-ones signal by ~18: R ~ 1e43 overflows float32
    params = chain_params(jax.random.key(6), sizes)
    signal = np.ones(256, np.float32)  # R computed naively in float32 overflows
    with np.errstate(over="ignore"):
        for k in sorted(params):
            signal = signal @ np.abs(np.asarray(params[k]["kernel"], np.float32))
    assert not np.all(np.isfinite(signal))
    rescaled = synflow_scores(chain_logits, params, {}, (256,), precision="rescale")
    got = np.concatenate([np.asarray(rescaled[k]["kernel"]).ravel() for k in sorted(params)])
    assert np.all(np.isfinite(got)) and got.sum() > 0
    with jax.enable_x64(True):
        exact = synflow_scores(chain_logits, params, {}, (256,), precision="float64")
        want = np.concatenate([np.asarray(exact[k]["kernel"]).ravel() for k in sorted(params)])
    assert np.all(np.isfinite(want))
    np.testing.assert_allclose(got / got.sum(), want / want.sum(), rtol=1e-3, atol=1e-12)
    auto = synflow_scores(chain_logits, params, {}, (256,))  # float32 overflows: auto falls back to rescaling
    for k in params:
        # The fallback runs inside a lax.cond, a different program from precision='rescale', so the
        # two agree up to rounding, not bit for bit. Every term is positive (|weights|, all-ones
        # input): relative rounding of ~sqrt(35 layers x 256 terms) ulps ~ 1e-5 at most; without the
        # fallback the scores would be inf.
        np.testing.assert_allclose(auto[k]["kernel"], rescaled[k]["kernel"], rtol=1e-4)
    with pytest.warns(UserWarning, match="overflowed float32 in 1 of 1"):
        info = synflow_masks(chain_logits, params, {}, (256,), 0.5, rounds=1).extras
    assert info["precision"] == "float32_or_rescale" and info["rescaled_rounds"] == 1


def residual_logits(params, state, x, train=False):
    h = x @ params["in"]["kernel"]
    for i in range(3):
        block = params[f"block{i}"]
        h = h + jax.nn.relu(h @ block["a"]["kernel"]) @ block["b"]["kernel"]
    return h @ params["out"]["kernel"]


def test_synflow_auto_is_exact_without_overflow_where_rescaling_is_not():
    keys = iter(jax.random.split(jax.random.key(14), 8))
    normal = lambda a, b: {"kernel": jax.random.normal(next(keys), (a, b)) * np.sqrt(2.0 / a)}  # noqa: E731
    params = {"in": normal(5, 8), "out": normal(8, 3)}
    params.update({f"block{i}": {"a": normal(8, 8), "b": normal(8, 8)} for i in range(3)})

    def flat(scores):
        v = np.concatenate([np.asarray(x).ravel() for _, x in pj.named_leaves(scores)])
        return v / v.sum()

    auto = flat(synflow_scores(residual_logits, params, {}, (5,)))
    rescaled = flat(synflow_scores(residual_logits, params, {}, (5,), precision="rescale"))
    with jax.enable_x64(True):
        exact = flat(synflow_scores(residual_logits, params, {}, (5,), precision="float64"))
    np.testing.assert_allclose(auto, exact, rtol=1e-5, atol=1e-12)
    assert not np.allclose(rescaled, exact, rtol=1e-2)  # skip connections break the rescaling's exactness


def test_iterative_synflow_avoids_the_layer_collapse_of_snip():
    sizes = (100,) * 9 + (10,)
    params = chain_params(jax.random.key(0), sizes)
    n = sum(v["kernel"].size for v in params.values())
    batch_fn = chain_batch_fn(100, 10, size=64)
    sparsity = 0.999
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pj.LayerCollapseWarning)
        snip = pj.masks_from_scores(pj.snip_scores(chain_loss, params, batch_fn(0)), sparsity)
        one_shot = synflow_masks(chain_logits, params, {}, (100,), sparsity, rounds=1).masks
    assert min(kept_per_layer(snip)) == 0, kept_per_layer(snip)
    assert min(kept_per_layer(one_shot)) == 0, kept_per_layer(one_shot)
    with warnings.catch_warnings():
        warnings.simplefilter("error", pj.LayerCollapseWarning)
        result = synflow_masks(chain_logits, params, {}, (100,), sparsity, rounds=5)
        iterative = result.masks
    assert min(kept_per_layer(iterative)) > 0, kept_per_layer(iterative)
    assert total_kept(iterative) == pj.kept_count(1 - sparsity, n)
    assert [h["kept"] for h in result.history] == [pj.kept_count(d, n) for d in density_schedule(1 - sparsity, 5)]
    assert result.extras["revived_total"] == 0


def test_synflow_uses_absolute_batchnorm_statistics_in_inference_mode():
    import flax.linen as nn

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, train):
            x = nn.Dense(5, use_bias=False)(x)
            x = nn.BatchNorm(use_running_average=not train)(x)
            return nn.Dense(2, use_bias=False)(nn.relu(x))

    model = Net()
    variables = model.init(jax.random.key(7), jnp.ones((1, 3)), train=False)
    bn = variables["batch_stats"]["BatchNorm_0"]
    negative_mean = -jax.random.uniform(jax.random.key(8), bn["mean"].shape, minval=1.0, maxval=2.0)
    state = {"batch_stats": {"BatchNorm_0": {"mean": negative_mean, "var": bn["var"]}}}

    def logits_fn(p, s, x, train=False):
        return model.apply({"params": p, **s}, x, train=train)

    got = synflow_scores(logits_fn, variables["params"], state, (3,), precision="float32")

    abs_params = jax.tree_util.tree_map(jnp.abs, variables["params"])
    abs_state = jax.tree_util.tree_map(jnp.abs, state)
    expected = jax.grad(lambda p: jnp.sum(logits_fn(p, abs_state, jnp.ones((1, 3)))))(abs_params)
    signed = jax.grad(lambda p: jnp.sum(logits_fn(p, state, jnp.ones((1, 3)))))(abs_params)
    for layer in ("Dense_0", "Dense_1"):
        want = np.abs(np.asarray(abs_params[layer]["kernel"] * expected[layer]["kernel"]))
        np.testing.assert_allclose(got[layer]["kernel"], want, rtol=1e-5)
    assert not np.allclose(expected["Dense_0"]["kernel"], signed["Dense_0"]["kernel"])


def test_synflow_rejects_float64_without_x64_and_bad_input_shape():
    params = chain_params(jax.random.key(0), (3, 2))
    with pytest.raises(ValueError, match="x64"):
        synflow_scores(chain_logits, params, {}, (3,), precision="float64")
    with pytest.raises(ValueError, match="precision"):
        synflow_scores(chain_logits, params, {}, (3,), precision="half")
    with pytest.raises(ValueError, match="input_shape"):
        synflow_scores(chain_logits, params, {}, (), precision="rescale")


# ----------------------------------------------------------------------------------------------- Iter-SNIP / FORCE
def _tiny_problem_parts():
    params = chain_params(jax.random.key(9), (8, 12, 12, 4))
    return params, chain_batch_fn(8, 4, size=16)


def test_iterative_snip_masks_are_monotone_and_hit_the_schedule():
    params, batch_fn = _tiny_problem_parts()
    n = sum(v["kernel"].size for v in params.values())
    result = iterative_snip_masks(chain_loss, params, batch_fn, 0.9, rounds=4, keep_history_masks=True)
    masks, info = result.masks, {**result.extras, "history": result.history}
    previous = pj.dense_masks(params)
    for m in info["masks_history"]:
        for (_, new), (_, old) in zip(pj.named_leaves(m), pj.named_leaves(previous)):
            assert np.all(np.asarray(new) <= np.asarray(old))
        previous = m
    expected = [0.1 ** (t / 4) for t in range(1, 5)]
    np.testing.assert_allclose([h["density"] for h in info["history"]], expected, rtol=1e-12)
    assert [h["kept"] for h in info["history"]] == [pj.kept_count(d, n) for d in expected]
    assert info["revived_total"] == 0
    assert total_kept(masks) == pj.kept_count(0.1, n)


def test_force_revives_pruned_weights_and_counts_them():
    params, batch_fn = _tiny_problem_parts()
    result = force_masks(chain_loss, params, batch_fn, 0.9, rounds=4, keep_history_masks=True)
    masks, info = result.masks, {**result.extras, "history": result.history}
    previous = pj.dense_masks(params)
    counted = []
    for m in info["masks_history"]:
        counted.append(sum(
            int(np.sum((np.asarray(new) > 0) & (np.asarray(old) == 0)))
            for (_, new), (_, old) in zip(pj.named_leaves(m), pj.named_leaves(previous))
        ))
        previous = m
    assert [h["revived"] for h in info["history"]] == counted
    assert info["revived_total"] == sum(counted) > 0


def test_round_scores_match_gradients_at_the_masked_network():
    # Two programs computing the same gradients, compared in float64: in float32 the entries that
    # cancel over the batch carry rounding of a few ulps of the largest ones, above 1e-9 absolute.
    # float64 rounding here is ~1e-16 of each leaf's scale, hence the 1e-12 x scale tolerance.
    with jax.enable_x64(True):
        params = chain_params(jax.random.key(9), (8, 12, 12, 4), dtype=jnp.float64)
        key = jax.random.key(10)
        masks = jax.tree_util.tree_map(
            lambda p: (jax.random.uniform(jax.random.fold_in(key, p.size), p.shape) > 0.5).astype(p.dtype), params
        )
        batch = chain_batch_fn(8, 4, size=16)(0)
        batch = dict(batch, x=batch["x"].astype(jnp.float64))
        masked = {k: {"kernel": v["kernel"] * masks[k]["kernel"]} for k, v in params.items()}
        g = jax.jit(jax.grad(chain_loss))(masked, batch)
        stacked = pj.stack_batches([batch])
        force = masked_gradient_scores(chain_loss, params, masks, stacked, revive=True)
        snip = masked_gradient_scores(chain_loss, params, masks, stacked, revive=False)
    for k in params:
        theta, m, gk = (np.asarray(x) for x in (params[k]["kernel"], masks[k]["kernel"], g[k]["kernel"]))
        assert force[k]["kernel"].dtype == snip[k]["kernel"].dtype == np.float64
        want_force = np.abs(theta * gk)
        want_snip = np.where(m > 0, np.abs(theta * m * gk), -1.0)
        atol = 1e-12 * np.abs(want_force).max()
        np.testing.assert_allclose(force[k]["kernel"], want_force, rtol=1e-12, atol=atol)
        np.testing.assert_allclose(snip[k]["kernel"], want_snip, rtol=1e-12, atol=atol)
        assert np.any((m == 0) & (np.abs(gk) > 0))  # FORCE sees gradients at pruned positions


def test_iterative_rounds_compile_once():
    params, batch_fn = _tiny_problem_parts()
    traces = []

    def counting_loss(p, b):  # a fresh function: no compiled program of another test is reused
        traces.append(1)  # runs only while jax traces the scoring round
        return chain_loss(p, b)

    iterative_snip_masks(counting_loss, params, batch_fn, 0.5, rounds=1)
    per_compile = len(traces)  # one trace of the round program (the loss once per batch)
    assert per_compile >= 1
    iterative_snip_masks(counting_loss, params, batch_fn, 0.8, rounds=3)
    assert len(traces) == per_compile  # three more Iter-SNIP rounds: no new trace
    force_masks(counting_loss, params, batch_fn, 0.8, rounds=3)
    assert len(traces) == 2 * per_compile  # FORCE is the one new (static) variant, traced once


def test_density_schedules():
    np.testing.assert_allclose(density_schedule(0.01, 4), 0.01 ** (np.arange(1, 5) / 4), rtol=1e-12)
    np.testing.assert_allclose(density_schedule(0.2, 4, "linear"), [0.8, 0.6, 0.4, 0.2], rtol=1e-12)
    with pytest.raises(ValueError, match="schedule"):
        density_schedule(0.2, 4, "cosine")
    with pytest.raises(ValueError, match="rounds"):
        density_schedule(0.2, 0)


# ----------------------------------------------------------------------------------------------- LAMP and ERK
def test_lamp_scores_match_an_explicit_loop():
    rng = np.random.default_rng(1)
    # float64 (the claim is the formula itself): a float32 suffix sum of n positive squares may round
    # by up to ~n ulps (1.2e-6 relative for n = 20), more than a tight rtol allows; in float64 the
    # explicit loop and the cumulative sum agree to ~n * 1.1e-16.
    with jax.enable_x64(True):
        scores = {"a": {"kernel": jnp.asarray(rng.random((4, 5)))}, "b": {"kernel": jnp.asarray(rng.random((3, 3)))},
                  "c": {"bias": jnp.zeros(())}}
        got = lamp_scores(scores)
        for layer in ("a", "b"):
            flat = np.asarray(scores[layer]["kernel"], np.float64).ravel()
            assert got[layer]["kernel"].dtype == np.float64
            want = np.empty_like(flat)
            for u in range(flat.size):
                want[u] = flat[u] ** 2 / sum(flat[v] ** 2 for v in range(flat.size) if flat[v] >= flat[u])
            np.testing.assert_allclose(np.asarray(got[layer]["kernel"]).ravel(), want, rtol=1e-12)
        assert np.ndim(got["c"]["bias"]) == 0
        masks = MaskRule(density_rule="lamp").masks(scores, 0.7)
        expected = pj.masks_from_scores(got, 0.7)
        for layer in ("a", "b"):
            np.testing.assert_array_equal(masks[layer]["kernel"], expected[layer]["kernel"])
        with pytest.raises(ValueError, match="non-negative"):
            lamp_scores({"a": jnp.asarray([1.0, -1.0])})


def test_erk_densities_hit_the_target_exactly_and_cap_small_layers():
    shapes = {
        "stem": {"kernel": jax.ShapeDtypeStruct((3, 3, 3, 4), jnp.float32)},  # raw 13/108: dense at 60%
        "conv": {"kernel": jax.ShapeDtypeStruct((3, 3, 16, 32), jnp.float32)},
        "fc": {"kernel": jax.ShapeDtypeStruct((64, 10), jnp.float32)},
        "tiny": {"kernel": jax.ShapeDtypeStruct((2, 2), jnp.float32)},  # raw 1: would exceed 1
    }
    sizes = {k: math.prod(v["kernel"].shape) for k, v in shapes.items()}
    raw = {k: sum(v["kernel"].shape) / sizes[k] for k, v in shapes.items()}
    n = sum(sizes.values())
    for sparsity in (0.6, 0.9, 0.99):
        dens = erk_densities(shapes, None, sparsity)
        kept = {k.split("/")[0]: pj.kept_count(d, sizes[k.split("/")[0]]) for k, d in dens.items()}
        assert sum(kept.values()) == pj.kept_count(1 - sparsity, n)
        # where the proportional solution without capping puts `tiny` above 1, it is made dense
        eps_uncapped = pj.kept_count(1 - sparsity, n) / sum(raw[k] * sizes[k] for k in sizes)
        assert (raw["tiny"] * eps_uncapped > 1) == (sparsity < 0.95)
        assert (kept["tiny"] == sizes["tiny"]) == (sparsity < 0.95)
        dense = {k for k in sizes if kept[k] == sizes[k]}
        free = [k for k in sizes if k not in dense]
        eps = (pj.kept_count(1 - sparsity, n) - sum(sizes[k] for k in dense)) / sum(raw[k] * sizes[k] for k in free)
        for k in free:
            assert abs(kept[k] - eps * raw[k] * sizes[k]) < 1.0
            assert eps * raw[k] <= 1.0
    dens = erk_densities(shapes, None, 0.6)
    assert dens["stem/kernel"] == 1.0  # capped too at 60%

    er = erk_densities(shapes, None, 0.9, erdos_renyi_kernel=False)
    ratio = (er["conv/kernel"]) / (er["fc/kernel"])
    assert ratio == pytest.approx(((16 + 32) / (16 * 32)) / ((64 + 10) / 640), rel=0.02)

    rng = np.random.default_rng(2)
    scores = {k: {"kernel": jnp.asarray(rng.random(v["kernel"].shape))} for k, v in shapes.items()}
    masks = MaskRule(density_rule="erk").masks(scores, 0.9)
    dens = erk_densities(shapes, None, 0.9)
    assert total_kept(masks) == pj.kept_count(0.1, n)
    for k in shapes:
        assert int(np.sum(masks[k]["kernel"])) == pj.kept_count(dens[f"{k}/kernel"], sizes[k])
    with pytest.raises(ValueError, match="scope"):
        MaskRule(density_rule="erk", scope="layerwise")


# ----------------------------------------------------------------------------------------------- magnitude, random
def test_magnitude_and_random_scores():
    params = mlp_params(jax.random.key(11), dtype=jnp.float32)
    mag = magnitude_scores(params)
    for layer in params:
        np.testing.assert_array_equal(mag[layer]["kernel"], np.abs(np.asarray(params[layer]["kernel"])))
        assert np.ndim(mag[layer]["bias"]) == 0
    key = jax.random.key(12)
    r1, r2 = random_scores(key, params), random_scores(key, params)
    r3 = random_scores(jax.random.key(13), params)
    for layer in params:
        k = np.asarray(r1[layer]["kernel"])
        np.testing.assert_array_equal(k, r2[layer]["kernel"])
        assert not np.array_equal(k, r3[layer]["kernel"])
        assert k.min() >= 0 and k.max() < 1 and k.std() > 0.1
    layerwise = pj.masks_from_scores(r1, 0.6, scope="layerwise")
    assert kept_per_layer(layerwise) == [pj.kept_count(0.4, 20), pj.kept_count(0.4, 15)]
