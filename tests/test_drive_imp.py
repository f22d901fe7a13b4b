"""IMP (lottery tickets with rewinding) and DRIVE, checked against independent numpy computations."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import prospr_jax as pj
from prospr_jax.methods import drive_scores, imp_num_rounds


def imp_masks(problem, sparsity, **options):
    """IMP through the registry: ``(masks, result)``."""
    result = pj.methods.prune("imp", problem, sparsity, **options)
    return result.masks, result


def drive_masks(problem, sparsity, **options):
    """DRIVE through the registry: ``(masks, result)``."""
    result = pj.methods.prune("drive", problem, sparsity, **options)
    return result.masks, result

SIZES = (8, 16, 4)
N_PRUNABLE = 8 * 16 + 16 * 4  # 192 kernel weights
KERNELS = ("layer0", "layer1")
LR = 0.1


# --------------------------------------------------------------------------- a tiny problem


def _params(seed=0, dtype=jnp.float32):
    k0, k1, k2, k3 = jax.random.split(jax.random.key(seed), 4)
    return {
        "layer0": {
            "kernel": (jax.random.normal(k0, SIZES[:2]) / np.sqrt(SIZES[0])).astype(dtype),
            "bias": (0.1 * jax.random.normal(k1, (SIZES[1],))).astype(dtype),
        },
        "layer1": {
            "kernel": (jax.random.normal(k2, SIZES[1:]) / np.sqrt(SIZES[1])).astype(dtype),
            "bias": (0.1 * jax.random.normal(k3, (SIZES[2],))).astype(dtype),
        },
    }


def _data(dtype=jnp.float32, num_batches=4, batch_size=16):
    kx, kw = jax.random.split(jax.random.key(100))
    x = jax.random.normal(kx, (num_batches, batch_size, SIZES[0]))
    teacher = jax.random.normal(kw, (SIZES[0], SIZES[2]))
    return {"x": x.astype(dtype), "y": jnp.sin(x @ teacher).astype(dtype)}


def _loss(params, batch):
    h = jnp.tanh(batch["x"] @ params["layer0"]["kernel"] + params["layer0"]["bias"])
    out = h @ params["layer1"]["kernel"] + params["layer1"]["bias"]
    return jnp.mean((out - batch["y"]) ** 2)


@functools.partial(jax.jit, static_argnames="steps")
def _sgd(params, masks, data, steps):
    def step(i, p):
        batch = jax.tree_util.tree_map(lambda d: d[i % d.shape[0]], data)
        g = jax.grad(_loss)(p, batch)
        return jax.tree_util.tree_map(lambda w, gi, m: jnp.where(m != 0, w - LR * gi, 0), p, g, masks)

    return jax.lax.fori_loop(0, steps, step, pj.apply_masks(params, masks))


class RecordingTrainFn:
    """Masked full-batch-cycling SGD that records every call."""

    def __init__(self, data, default_steps=2):
        self.data = data
        self.default_steps = default_steps
        self.calls = []

    def __call__(self, params, masks, *, steps=None, key=None, **kwargs):
        out = _sgd(params, masks, self.data, self.default_steps if steps is None else steps)
        self.calls.append({"params": params, "masks": masks, "steps": steps, "key": key, "out": out, **kwargs})
        return out


def _problem(train_fn=None, dtype=jnp.float32, seed=0):
    data = _data(dtype)
    if train_fn is None:
        train_fn = RecordingTrainFn(data)
    return pj.PruningProblem(
        params=_params(seed, dtype),
        loss_fn=_loss,
        batch_fn=lambda i: jax.tree_util.tree_map(lambda d: d[i % d.shape[0]], data),
        train_fn=train_fn,
    )


def _flat_kernels(tree):
    return np.concatenate([np.asarray(tree[name]["kernel"], np.float64).ravel() for name in KERNELS])


def _unflatten_kernels(flat):
    out, start = {}, 0
    for name, shape in zip(KERNELS, (SIZES[:2], SIZES[1:])):
        size = int(np.prod(shape))
        out[name] = flat[start : start + size].reshape(shape)
        start += size
    return out


def _top_k_among(scores, candidates, k):
    """numpy: 0/1 vector keeping the k highest scores among the candidate entries (stable ties)."""
    idx = np.flatnonzero(candidates)
    order = idx[np.argsort(-scores[idx], kind="stable")]
    keep = np.zeros_like(scores)
    keep[order[:k]] = 1
    return keep


def _count(density, n):
    return math.ceil(round(density * n, 6))


def _assert_trees_equal(a, b):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# --------------------------------------------------------------------------- IMP


@pytest.mark.parametrize("sparsity,rounds", [(0.2, 1), (0.36, 2), (0.5, 4), (0.9, 11), (0.95, 14), (0.98, 18)])
def test_imp_round_count(sparsity, rounds):
    assert imp_num_rounds(sparsity) == rounds
    assert imp_num_rounds(sparsity) == math.ceil(math.log(1 - sparsity) / math.log(0.8) - 1e-9)


@pytest.mark.filterwarnings("ignore::prospr_jax.LayerCollapseWarning")
@pytest.mark.parametrize("sparsity,rounds,final_kept", [(0.5, 4, 96), (0.9, 11, 20)])
def test_imp_schedule_exact_sparsity_and_magnitude_pruning_among_kept(sparsity, rounds, final_kept):
    train_fn = RecordingTrainFn(_data())
    problem = _problem(train_fn)
    masks, result = imp_masks(problem, sparsity)

    assert result.extras["rounds"] == rounds and len(result.history) == rounds
    assert len(train_fn.calls) == rounds  # k = 0: no rewind run, one training per round
    final = _flat_kernels(masks)
    assert final.sum() == final_kept == _count(1 - sparsity, N_PRUNABLE)
    expected_kept = [_count(0.8**r, N_PRUNABLE) for r in range(1, rounds)] + [final_kept]
    assert [h["kept"] for h in result.history] == expected_kept
    assert result.history[-1]["sparsity"] == pytest.approx(1 - final_kept / N_PRUNABLE)

    # Round r trains with mask m_{r-1}; the next mask keeps the largest |trained| among the kept.
    round_masks = [c["masks"] for c in train_fn.calls] + [masks]
    for r, call in enumerate(train_fn.calls):
        before = _flat_kernels(round_masks[r])
        after = _flat_kernels(round_masks[r + 1])
        assert np.all(after <= before)  # monotone
        trained = np.abs(_flat_kernels(call["out"]))
        np.testing.assert_array_equal(after, _top_k_among(trained, before == 1, expected_kept[r]))
        assert np.shape(masks["layer0"]["bias"]) == ()


@pytest.mark.filterwarnings("ignore::prospr_jax.LayerCollapseWarning")
def test_imp_prunes_only_kept_weights_even_when_kept_weights_are_zero():
    """From round 2 on the trained weights are all exactly 0: kept and pruned weights tie in |theta|,
    and only the restriction to kept weights keeps the masks monotone (a plain top-k by |theta| would
    keep the lowest indices, pruned ones included)."""
    inner = RecordingTrainFn(_data())

    def zeroing_train_fn(params, masks, *, steps=None, key=None):
        out = inner(params, masks, steps=steps, key=key)
        return out if len(inner.calls) == 1 else jax.tree_util.tree_map(jnp.zeros_like, out)

    masks, result = imp_masks(_problem(zeroing_train_fn), 0.5)
    round_masks = [_flat_kernels(c["masks"]) for c in inner.calls] + [_flat_kernels(masks)]
    assert not np.array_equal(round_masks[1], np.sort(round_masks[1])[::-1])  # round 1 is not a prefix
    for before, after, kept in zip(round_masks[1:], round_masks[2:], [h["kept"] for h in result.history[1:]]):
        assert np.all(after <= before) and after.sum() == kept
        np.testing.assert_array_equal(after, _top_k_among(np.zeros_like(before), before == 1, kept))


def test_imp_rewinds_all_params_to_theta_0_bitwise():
    train_fn = RecordingTrainFn(_data())
    problem = _problem(train_fn)
    masks, result = imp_masks(problem, 0.5)
    assert result.extras["rewind_step"] == 0
    _assert_trees_equal(result.start_params, problem.params)
    _assert_trees_equal(result.start_params, problem.params)
    # every round's training starts from theta_0 with the current mask applied (biases rewound too)
    for call in train_fn.calls:
        _assert_trees_equal(call["params"], pj.apply_masks(problem.params, call["masks"]))
        assert call["steps"] is None


def test_imp_rewinds_to_theta_k_from_an_independent_dense_run():
    k = 5
    train_fn = RecordingTrainFn(_data())
    problem = _problem(train_fn)
    masks, result = imp_masks(problem, 0.5, rewind_step=k, round_steps=3)
    theta_k = _sgd(problem.params, pj.dense_masks(problem.params), _data(), k)  # independent run
    _assert_trees_equal(result.start_params, theta_k)
    assert not np.array_equal(theta_k["layer0"]["kernel"], problem.params["layer0"]["kernel"])
    first, round1, *later = train_fn.calls
    assert first["steps"] == k and _flat_kernels(first["masks"]).min() == 1
    assert round1["steps"] == 3
    _assert_trees_equal(round1["params"], problem.params)  # the dense run starts at theta_0
    assert len(later) == 3
    assert "start_step" not in first and "start_step" not in round1
    assert result.start_step == k
    for call in later:  # all params rewound to theta_k, pruned weights zero, schedule continued from k
        assert call["start_step"] == k
        _assert_trees_equal(call["params"], pj.apply_masks(theta_k, call["masks"]))
        np.testing.assert_array_equal(call["params"]["layer1"]["bias"], theta_k["layer1"]["bias"])


@pytest.mark.filterwarnings("ignore::prospr_jax.LayerCollapseWarning")
def test_imp_layerwise_max_rounds_eval_fn_and_zero_sparsity():
    problem = _problem()
    masks, result = imp_masks(problem, 0.8, scope="layerwise")
    for name, n in zip(KERNELS, (128, 64)):
        assert int(np.sum(masks[name]["kernel"])) == _count(0.2, n)
        assert [h["kept_per_layer"][f"{name}/kernel"] for h in result.history][:-1] == [
            _count(0.8**r, n) for r in range(1, result.extras["rounds"])
        ]

    seen = []
    masks, result = imp_masks(
        _problem(), 0.9, max_rounds=3, eval_fn=lambda p, m: seen.append(1) or {"loss": float(_loss(p, _data()))}
    )
    assert result.extras["rounds"] == 3 and len(seen) == 3
    assert [h["kept"] for h in result.history] == [_count(0.1 ** (r / 3), N_PRUNABLE) for r in (1, 2, 3)]
    assert result.extras["prune_fraction_used"] == pytest.approx(1 - 0.1 ** (1 / 3))
    assert all(np.isfinite(h["metrics"]["loss"]) for h in result.history)

    masks, result = imp_masks(_problem(), 0.0)
    assert result.extras["rounds"] == 0 and _flat_kernels(masks).min() == 1


# --------------------------------------------------------------------------- DRIVE


def _numpy_grads(params, batch):
    """Analytic gradients of _loss w.r.t. the kernels, by hand in float64 numpy."""
    x = np.asarray(batch["x"], np.float64)
    y = np.asarray(batch["y"], np.float64)
    w0, b0 = (np.asarray(params["layer0"][k], np.float64) for k in ("kernel", "bias"))
    w1, b1 = (np.asarray(params["layer1"][k], np.float64) for k in ("kernel", "bias"))
    h = np.tanh(x @ w0 + b0)
    out = h @ w1 + b1
    d_out = 2 * (out - y) / out.size
    d_z = (d_out @ w1.T) * (1 - h**2)
    return {"layer0": x.T @ d_z, "layer1": h.T @ d_out}


def _numpy_drive(params, masks, batch, weights=(1, 1, 1), combine="sum"):
    masked = {n: {k: np.asarray(params[n][k], np.float64) * np.asarray(masks[n][k]) for k in params[n]} for n in params}
    grads = _numpy_grads(masked, batch)
    out = {}
    for name in KERNELS:
        w, g, keep = masked[name]["kernel"], grads[name], np.asarray(masks[name]["kernel"]) != 0
        terms = [np.abs(w) * keep, np.abs(w * g) * keep, np.abs(g) * keep]
        normed = [t / t.sum() for t in terms]
        if combine == "sum":
            score = sum(wi * t for wi, t in zip(weights, normed))
        else:
            score = np.prod([t**wi for wi, t in zip(weights, normed)], axis=0)
        out[name] = np.where(keep, score, 0.0)
    return out


@pytest.mark.parametrize(
    "weights,combine",
    [((1, 1, 1), "sum"), ((0.5, 2.0, 0.0), "sum"), ((1, 1, 1), "product"), ((2.0, 0.5, 1.0), "product")],
)
def test_drive_scores_match_numpy_per_layer_normalised_terms(weights, combine):
    with jax.enable_x64(True):
        params = _params(3, jnp.float64)
        batch = jax.tree_util.tree_map(lambda d: d[1], _data(jnp.float64))
        rng = np.random.default_rng(0)
        masks = pj.dense_masks(params)
        masks["layer0"]["kernel"] = jnp.asarray(rng.random(SIZES[:2]) < 0.7, jnp.float64)
        scores = drive_scores(_loss, params, batch, weights=weights, combine=combine, masks=masks)
        expected = _numpy_drive(params, masks, batch, weights, combine)
        for name in KERNELS:
            np.testing.assert_allclose(np.asarray(scores[name]["kernel"]), expected[name], rtol=1e-9, atol=1e-14)
            assert np.shape(scores[name]["bias"]) == ()
        assert np.all(np.asarray(scores["layer0"]["kernel"])[np.asarray(masks["layer0"]["kernel"]) == 0] == 0)
        # dense default masks and jit
        dense = drive_scores(_loss, params, batch, weights=weights, combine=combine)
        jitted = jax.jit(lambda p, b: drive_scores(_loss, p, b, weights=weights, combine=combine))(params, batch)
        expected = _numpy_drive(params, pj.dense_masks(params), batch, weights, combine)
        for name in KERNELS:
            np.testing.assert_allclose(np.asarray(dense[name]["kernel"]), expected[name], rtol=1e-9, atol=1e-14)
            np.testing.assert_allclose(np.asarray(jitted[name]["kernel"]), expected[name], rtol=1e-9, atol=1e-14)
        if combine == "sum":  # each layer's scores sum to the total weight
            for name in KERNELS:
                assert float(jnp.sum(dense[name]["kernel"])) == pytest.approx(sum(weights))


def test_drive_dense_phase_schedule_and_exact_sparsity():
    with jax.enable_x64(True):
        train_fn = RecordingTrainFn(_data(jnp.float64))
        problem = _problem(train_fn, jnp.float64)
        sparsity, rounds = 0.8, 3
        masks, result = drive_masks(problem, sparsity, dense_steps=7, rounds=rounds, round_steps=2)

        dense_call, *between = train_fn.calls
        assert dense_call["steps"] == 7
        _assert_trees_equal(dense_call["params"], problem.params)
        assert _flat_kernels(dense_call["masks"]).min() == 1 and np.shape(dense_call["masks"]["layer0"]["bias"]) == ()
        assert [c["steps"] for c in between] == [2] * (rounds - 1)
        assert result.extras["train_steps"] == 7 + 2 * (rounds - 1) and result.extras["train_calls"] == rounds

        expected_kept = [_count(0.2 ** (t / rounds), N_PRUNABLE) for t in range(1, rounds + 1)]
        assert [h["kept"] for h in result.history] == expected_kept
        assert _flat_kernels(masks).sum() == _count(0.2, N_PRUNABLE) == 39

        # Round 1 ranks the numpy DRIVE score of the dense-TRAINED params on batch 0.
        round_masks = [c["masks"] for c in between] + [masks]
        trained = dense_call["out"]
        dense = pj.dense_masks(problem.params)
        score = _numpy_drive(trained, dense, problem.batch(0))
        flat = np.concatenate([score[n].ravel() for n in KERNELS])
        np.testing.assert_array_equal(
            _flat_kernels(round_masks[0]), _top_k_among(flat, np.ones_like(flat), expected_kept[0])
        )
        # Later rounds: score at the params after in-between training, among the kept only.
        for t, call in enumerate(between, start=1):
            before = _flat_kernels(round_masks[t - 1])
            _assert_trees_equal(call["masks"], round_masks[t - 1])
            score = _numpy_drive(call["out"], call["masks"], problem.batch(t))
            flat = np.concatenate([score[n].ravel() for n in KERNELS])
            after = _flat_kernels(round_masks[t])
            assert np.all(after <= before)
            np.testing.assert_array_equal(after, _top_k_among(flat, before == 1, expected_kept[t]))

        assert result.extras["start_from"] == "theta0"
        _assert_trees_equal(result.start_params, problem.params)
        _assert_trees_equal(result.extras["trained_params"], pj.apply_masks(between[-1]["out"], masks))


def test_drive_start_from_trained_and_options_change_the_masks():
    problem = _problem()
    kw = dict(dense_steps=3, rounds=2, round_steps=1)
    base, result = drive_masks(problem, 0.7, start_from="trained", **kw)
    _assert_trees_equal(result.start_params, result.extras["trained_params"])
    assert not np.array_equal(result.start_params["layer1"]["bias"], problem.params["layer1"]["bias"])

    l1_only, _ = drive_masks(problem, 0.7, weights=(1, 0, 0), **kw)
    grad_only, _ = drive_masks(problem, 0.7, weights=(0, 0, 1), **kw)
    product, _ = drive_masks(problem, 0.7, combine="product", **kw)
    flat = {k: _flat_kernels(m) for k, m in dict(base=base, l1=l1_only, g=grad_only, prod=product).items()}
    assert all(m.sum() == _count(0.3, N_PRUNABLE) for m in flat.values())
    assert not np.array_equal(flat["l1"], flat["g"])
    assert not np.array_equal(flat["base"], flat["prod"])
    assert not np.array_equal(flat["base"], flat["l1"])

    # weights (1, 0, 0), one round: the per-layer-normalised magnitude of the dense-trained params.
    train_fn = RecordingTrainFn(_data())
    masks, _ = drive_masks(_problem(train_fn), 0.7, dense_steps=3, rounds=1, weights=(1, 0, 0))
    trained = train_fn.calls[0]["out"]
    kernels = [np.abs(np.asarray(trained[n]["kernel"], np.float64)).ravel() for n in KERNELS]
    magnitude = np.concatenate([k / k.sum() for k in kernels])
    np.testing.assert_array_equal(
        _flat_kernels(masks), _top_k_among(magnitude, np.ones_like(magnitude), _count(0.3, N_PRUNABLE))
    )


# --------------------------------------------------------------------------- with a flax model and an optax loop


def test_flax_problem_with_masked_optax_train_fn():
    import flax.linen as nn

    class Tiny(nn.Module):
        @nn.compact
        def __call__(self, x, train=False):
            return nn.Dense(3)(nn.relu(nn.Dense(12)(x)))

    model = Tiny()
    data = _data()
    variables = model.init(jax.random.key(0), data["x"][0])
    labels = jnp.argmax(data["y"][..., :3], -1)

    def batch_fn(i):
        return {"image": data["x"][i % 4], "label": labels[i % 4]}

    optimizer = optax.sgd(0.1, momentum=0.9)
    tx = pj.masked_optimizer(optimizer, pj.dense_masks(variables["params"]))  # update() reads the masks from the state

    @jax.jit
    def step(params, state, batch):
        grads = jax.grad(problem.loss_fn)(params, batch)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    def train_fn(params, masks, *, steps=None, key=None, start_step=0):
        params = pj.apply_masks(params, masks)
        state = pj.masked_optimizer(optimizer, masks).init(params)
        for i in range(start_step, start_step + (4 if steps is None else steps)):
            params, state = step(params, state, batch_fn(i))
        return params

    def train_fn_without_start_step(params, masks, *, steps=None, key=None):
        return train_fn(params, masks, steps=steps, key=key)

    problem = pj.PruningProblem.from_flax(
        model, variables, batch_fn, input_shape=(8,), num_classes=3, train_fn=train_fn
    )
    with pytest.raises(ValueError, match="must accept `start_step="):
        imp_masks(problem.replace(train_fn=train_fn_without_start_step), 0.6, rewind_step=1)
    n = 8 * 12 + 12 * 3
    for masks, result in (
        imp_masks(problem, 0.6, rewind_step=1),
        drive_masks(problem, 0.6, dense_steps=2, rounds=2, round_steps=1),
    ):
        report = pj.sparsity_report(masks, problem.params)
        assert report.prunable_kept == _count(0.4, n)
        start = pj.apply_masks(result.start_params, masks)
        trained = train_fn(start, masks, steps=2)
        for leaf, m in zip(jax.tree_util.tree_leaves(trained), jax.tree_util.tree_leaves(masks)):
            assert np.all(np.asarray(leaf)[np.broadcast_to(np.asarray(m), np.shape(leaf)) == 0] == 0)


# --------------------------------------------------------------------------- errors


def test_errors():
    no_train = _problem().replace(train_fn=None)
    with pytest.raises(ValueError, match="train_fn"):
        imp_masks(no_train, 0.5)
    with pytest.raises(ValueError, match="train_fn"):
        drive_masks(no_train, 0.5)
    problem = _problem()
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="sparsity"):
            imp_masks(problem, bad)
        with pytest.raises(ValueError, match="sparsity"):
            drive_masks(problem, bad)
    for bad in (0.0, 1.0, 1.5, -0.2):
        with pytest.raises(ValueError, match="prune_fraction"):
            imp_masks(problem, 0.5, prune_fraction=bad)
    with pytest.raises(TypeError, match="prune_fraction"):
        imp_masks(problem, 0.5, prune_fraction="0.2x")
    with pytest.raises(ValueError, match="rewind_step"):
        imp_masks(problem, 0.5, rewind_step=-1)
    with pytest.raises(ValueError, match="max_rounds"):
        imp_masks(problem, 0.5, max_rounds=0)
    with pytest.raises(ValueError, match="scope"):
        imp_masks(problem, 0.5, scope="per-layer")
    with pytest.raises(ValueError, match="combine"):
        drive_masks(problem, 0.5, combine="mean")
    with pytest.raises(ValueError, match="combine"):
        drive_scores(_loss, problem.params, problem.batch(0), combine="max")
    with pytest.raises(ValueError, match="weights"):
        drive_masks(problem, 0.5, weights=(1, 1))
    with pytest.raises(ValueError, match="weights"):
        drive_scores(_loss, problem.params, problem.batch(0), weights=(1, -1, 1))
    with pytest.raises(ValueError, match="weights"):
        drive_scores(_loss, problem.params, problem.batch(0), weights=(0, 0, 0))
    with pytest.raises(ValueError, match="rounds"):
        drive_masks(problem, 0.5, rounds=0)
    with pytest.raises(ValueError, match="start_from"):
        drive_masks(problem, 0.5, start_from="theta_k")
    with pytest.raises(ValueError, match="batch_fn"):
        drive_masks(problem.replace(batch_fn=None), 0.5)
