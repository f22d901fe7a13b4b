"""Bad input to the core is a clear error, or (under jit, where values cannot be read) loudly wrong."""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import prospr_jax as pj
from tiny_models import mlp_batches, mlp_loss, mlp_params


def _params():
    return {"a": {"kernel": jnp.arange(1.0, 7.0).reshape(2, 3), "bias": jnp.ones(3)}, "b": {"kernel": jnp.ones((3, 2))}}


def _masks(bad):
    return {"a": {"kernel": jnp.asarray([[1.0, 0.0, bad], [1.0, 1.0, 0.0]]), "bias": jnp.ones(())},
            "b": {"kernel": jnp.ones((3, 2))}}


@pytest.mark.parametrize("bad", [0.5, 2.0, -1.0, np.nan])
def test_masks_must_hold_only_zeros_and_ones_where_they_enter(bad):
    params, masks = _params(), _masks(bad)
    with pytest.raises(ValueError, match=r"`masks` must hold only 0 and 1.*a/kernel"):
        pj.apply_masks(params, masks)
    with pytest.raises(ValueError, match=r"only 0 and 1.*a/kernel"):
        pj.sparsity_report(masks, params)
    with pytest.raises(ValueError, match=r"only 0 and 1.*a/kernel"):
        pj.masked_optimizer(optax.sgd(0.1), masks)
    good = _masks(1.0)
    state = pj.masked_optimizer(optax.sgd(0.1), good).init(params)
    with pytest.raises(ValueError, match=r"only 0 and 1"):
        pj.set_masks(state, masks)
    with pytest.raises(ValueError, match=r"only 0 and 1"):
        pj.check_masks(masks, params)


def test_bool_masks_are_accepted_and_complex_masks_are_not():
    params = _params()
    masks = jax.tree_util.tree_map(lambda m: jnp.asarray(m) != 0, _masks(1.0))
    out = pj.apply_masks(params, masks)
    np.testing.assert_array_equal(out["a"]["kernel"], [[1.0, 0.0, 3.0], [4.0, 5.0, 0.0]])
    assert pj.sparsity_report(masks, params).prunable_kept == 4 + 6
    with pytest.raises(TypeError, match="not real.*a/kernel"):
        pj.apply_masks(params, jax.tree_util.tree_map(lambda m: jnp.asarray(m, jnp.complex64), _masks(1.0)))


def test_a_bad_traced_mask_poisons_its_weights_instead_of_scaling_them():
    params = _params()
    out = jax.jit(pj.apply_masks)(params, _masks(0.5))  # values cannot be checked under jit
    kernel = np.asarray(out["a"]["kernel"])
    assert np.isnan(kernel[0, 2]) and kernel[0, 1] == 0.0 and kernel[0, 0] == 1.0
    np.testing.assert_array_equal(out["b"]["kernel"], params["b"]["kernel"])
    ok = jax.jit(pj.apply_masks)(params, _masks(1.0))
    np.testing.assert_array_equal(ok["a"]["kernel"], [[1.0, 0.0, 3.0], [4.0, 5.0, 0.0]])


def test_layerwise_floor_that_beats_the_sparsity_warns_naming_the_layers():
    scores = {"small": {"kernel": jnp.arange(6.0).reshape(2, 3)}, "big": {"kernel": jnp.arange(200.0).reshape(10, 20)}}
    # Both layers are smaller than the floor: the "pruned" network is dense, and says so.
    with pytest.warns(pj.SparsityWarning, match=r"big/kernel \(100 -> 200 of 200\), small/kernel \(3 -> 6 of 6\)"
                      r".*sparsity 0\.0000 instead of 0\.5000"):
        masks = pj.masks_from_scores(scores, 0.5, scope="layerwise", min_per_layer=1000)
    assert int(masks["small"]["kernel"].sum()) == 6 and int(masks["big"]["kernel"].sum()) == 200
    mapping = {"small/kernel": 0.5, "big/kernel": 0.5}
    with pytest.warns(pj.SparsityWarning, match="small/kernel"):
        pj.masks_from_scores(scores, None, scope=mapping, min_per_layer=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", pj.SparsityWarning)  # a floor below every layer's count is silent
        pj.masks_from_scores(scores, 0.5, scope="layerwise", min_per_layer=3)


def test_nan_scores_under_jit_mark_the_whole_mask():
    scores = {"a": jnp.asarray([[0.3, jnp.nan, 0.1]]), "b": jnp.asarray([0.5, 0.2]), "c": jnp.zeros(())}
    masks = jax.jit(lambda s: pj.masks_from_scores(s, 0.5))(scores)
    for name, leaf in pj.named_leaves(masks):
        assert np.all(np.isnan(np.asarray(leaf))), name
    params = {"a": jnp.ones((1, 3)), "b": jnp.ones(2), "c": jnp.ones(())}
    with pytest.raises(ValueError, match="non-finite scores under jit"):
        pj.sparsity_report(masks, params)
    with pytest.raises(ValueError, match=r"NaN or Inf in a"):
        pj.masks_from_scores(scores, 0.5)
    finite = jax.jit(lambda s: pj.masks_from_scores(s, 0.5))({**scores, "a": jnp.asarray([[0.3, 0.4, 0.1]])})
    assert pj.sparsity_report(finite, params).prunable_kept == 3


def test_complex_scores_are_rejected():
    with pytest.raises(TypeError, match="`scores` must hold real numbers.*a"):
        pj.masks_from_scores({"a": jnp.asarray([1.0 + 2j, 3.0])}, 0.5)


def test_prospr_hyperparameters_can_be_traced_for_sweeps():
    # float64: the batched (vmap) and the single programs then agree to rounding (1e-10 relative)
    # whatever the CPU's summation order.
    with jax.enable_x64(True):
        params, batches = mlp_params(jax.random.key(0)), mlp_batches(jax.random.key(1), 3)

        def scores(lr):
            return pj.prospr_scores(mlp_loss, params, batches, num_steps=2, lr=lr, momentum=0.5 * lr)

        lrs = jnp.asarray([0.05, 0.2])
        swept = jax.vmap(scores)(lrs)
        jitted = jax.jit(scores)(jnp.asarray(0.2))
        for i, lr in enumerate((0.05, 0.2)):
            one = scores(lr)
            for (name, a), (_, b) in zip(pj.named_leaves(swept), pj.named_leaves(one)):
                if np.ndim(b):  # the scored leaves are batched by vmap: row i is the run at lrs[i]
                    np.testing.assert_allclose(np.asarray(a)[i], b, rtol=1e-10, err_msg=name)
        for (_, a), (_, b) in zip(pj.named_leaves(jitted), pj.named_leaves(scores(0.2))):
            np.testing.assert_allclose(a, b, rtol=1e-10)
    # the learning rate matters: the two rows differ
    assert not np.allclose(np.asarray(swept["layer0"]["kernel"])[0], np.asarray(swept["layer0"]["kernel"])[1])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"lr": 0.0}, r"`lr` must be a finite real number > 0, got 0.0"),
        ({"lr": float("nan")}, r"`lr` must be a finite real number > 0, got nan"),
        ({"momentum": 1.0}, r"`momentum` must be a finite real number >= 0 and < 1"),
        ({"momentum": -0.1}, r"`momentum`"),
        ({"weight_decay": -1e-4}, r"`weight_decay` must be a finite real number >= 0"),
        ({"weight_decay": float("inf")}, r"`weight_decay`"),
        ({"num_steps": -1}, r"`num_steps` must be an integer >= 0"),
        ({"implementation": "fast"}, r"`implementation` must be one of 'hvp', 'unrolled'"),
    ],
)
def test_prospr_hyperparameters_are_checked_with_clear_messages(kwargs, match):
    with pytest.raises(ValueError, match=match):
        pj.prospr_scores(mlp_loss, mlp_params(jax.random.key(0), dtype=jnp.float32),
                         mlp_batches(jax.random.key(1), 2, dtype=jnp.float32), **{"num_steps": 1, **kwargs})


def test_prospr_option_typo_lists_the_options_like_every_method():
    batches = mlp_batches(jax.random.key(1), 4, dtype=jnp.float32)
    problem = pj.PruningProblem(mlp_params(jax.random.key(0), dtype=jnp.float32), mlp_loss,
                                batch_fn=lambda i: jax.tree_util.tree_map(lambda b: b[i], batches))
    with pytest.raises(ValueError, match=r"method 'prospr' has no option\(s\) \['num_step'\]; its options: num_steps=3"):
        pj.methods.prune("prospr", problem, 0.5, num_step=1)
    with pytest.raises(ValueError, match=r"method 'snip' has no option\(s\) \['num_step'\]; its options: none"):
        pj.methods.prune("snip", problem, 0.5, num_step=1)
    with pytest.raises(TypeError, match="`num_steps` must be an integer"):
        pj.methods.prune("prospr", problem, 0.5, num_steps=1.5)
