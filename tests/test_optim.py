"""The masked optax transformation keeps pruned weights at exactly zero and masks are data."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import prospr_jax as pj
from tiny_models import mlp_loss, mlp_params


def _setup(key=0):
    params = mlp_params(jax.random.key(key), sizes=(6, 16, 4), dtype=jnp.float32)
    scores = jax.tree_util.tree_map(
        lambda keep, p: jax.random.uniform(jax.random.key(key + 1), p.shape) if keep else jnp.zeros(()),
        pj.select_prunable(params),
        params,
    )
    masks = pj.masks_from_scores(scores, 0.8)
    return params, masks


def _batch(step):
    k = jax.random.fold_in(jax.random.key(99), step)
    return {"x": jax.random.normal(k, (32, 6)), "y": jax.random.normal(jax.random.fold_in(k, 1), (32, 4))}


OPTIMISERS = {
    "sgd+momentum+weight_decay": optax.chain(optax.add_decayed_weights(5e-4), optax.sgd(0.05, momentum=0.9)),
    "sgd+nesterov+cosine": optax.chain(
        optax.add_decayed_weights(1e-4),
        optax.sgd(optax.cosine_decay_schedule(0.1, 200), momentum=0.9, nesterov=True),
    ),
    "adamw": optax.adamw(1e-2, weight_decay=0.1),
}


@pytest.mark.parametrize("name", sorted(OPTIMISERS))
def test_200_masked_steps_leave_pruned_weights_exactly_zero(name):
    params, masks = _setup()
    tx = pj.masked_optimizer(OPTIMISERS[name], masks)
    params = pj.apply_masks(params, masks)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(mlp_loss)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    first = None
    for i in range(200):
        params, opt_state, loss = step(params, opt_state, _batch(i))
        first = float(loss) if first is None else first
    for layer in ("layer0", "layer1"):
        w, m = np.asarray(params[layer]["kernel"]), np.asarray(masks[layer]["kernel"])
        assert np.all(w[m == 0] == 0.0), f"{name}: a pruned weight moved"
        assert np.count_nonzero(w[m == 1]) == np.count_nonzero(m)  # kept weights trained
    assert float(loss) < first
    # Unpruned leaves (biases) are trained normally.
    assert np.count_nonzero(params["layer0"]["bias"]) == params["layer0"]["bias"].size


def test_without_masking_the_same_optimiser_revives_pruned_weights():
    # Guard against a test that cannot fail: plain adamw moves zeroed weights.
    params, masks = _setup()
    params = pj.apply_masks(params, masks)
    tx = OPTIMISERS["adamw"]
    opt_state = tx.init(params)
    grads = jax.grad(mlp_loss)(params, _batch(0))
    updates, _ = tx.update(grads, opt_state, params)
    moved = optax.apply_updates(params, updates)
    m = np.asarray(masks["layer0"]["kernel"])
    assert np.any(np.asarray(moved["layer0"]["kernel"])[m == 0] != 0.0)


def test_new_mask_does_not_recompile_the_train_step():
    params, masks = _setup()
    _, masks2 = _setup(key=5)
    tx = pj.masked_optimizer(optax.sgd(0.1, momentum=0.9), masks)
    traces = []

    @jax.jit
    def step(params, opt_state, batch):
        traces.append(1)
        grads = jax.grad(mlp_loss)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    params = pj.apply_masks(params, masks)
    opt_state = tx.init(params)
    params, opt_state = step(params, opt_state, _batch(0))
    opt_state = pj.set_masks(opt_state, masks2)
    params = pj.apply_masks(params, masks2)
    for i in range(3):
        params, opt_state = step(params, opt_state, _batch(i + 1))
    assert len(traces) == 1
    m2 = np.asarray(masks2["layer0"]["kernel"])
    assert np.all(np.asarray(params["layer0"]["kernel"])[m2 == 0] == 0.0)
    np.testing.assert_array_equal(pj.masks_of(opt_state)["layer0"]["kernel"], masks2["layer0"]["kernel"])


def test_channel_masks_and_bad_masks():
    params = {"conv": {"kernel": jnp.ones((3, 3, 2, 4))}, "b": jnp.ones(4)}
    masks = {"conv": {"kernel": jnp.array([1.0, 0.0, 1.0, 1.0]).reshape(1, 1, 1, 4)}, "b": jnp.ones(())}
    tx = pj.masked_optimizer(optax.sgd(1.0), masks)
    state = tx.init(params)
    updates, _ = tx.update(jax.tree_util.tree_map(jnp.ones_like, params), state, params)
    assert np.all(np.asarray(updates["conv"]["kernel"])[..., 1] == 0.0)
    assert np.all(np.asarray(updates["conv"]["kernel"])[..., 0] == -1.0)
    with pytest.raises(ValueError, match="same tree structure"):
        pj.masked_optimizer(optax.sgd(1.0), {"conv": {"kernel": jnp.ones(())}}).init(params)
    with pytest.raises(ValueError, match="structure, shapes and dtypes"):
        pj.set_masks(state, {"conv": {"kernel": jnp.ones((3, 3, 2, 4))}, "b": jnp.ones(())})
    with pytest.raises(ValueError, match="no MaskedOptimizerState"):
        pj.set_masks(optax.sgd(1.0).init(params), masks)
