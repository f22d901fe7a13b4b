"""prospr_scores on flax.linen, flax.nnx and a plain function of a params dict.

In each case the scores are checked against an independent unrolled computation: an explicit
Python loop of SGD steps differentiated with ``jax.grad`` (no scan, no Hessian-vector products).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import prospr_jax as pj
from tiny_models import batch_at, unrolled_meta_loss

M = 2
LR = 0.1


def _images(key, n_batches=M + 1, batch_size=6):
    kx, ky = jax.random.split(key)
    return {
        "image": jax.random.normal(kx, (n_batches, batch_size, 8, 8, 3)),
        "label": jax.random.randint(ky, (n_batches, batch_size), 0, 4),
    }


def _reference_scores(loss_fn, params, batches, selected):
    """|theta_0 * d/dtheta_0 L(w_M)| by jax.grad through an explicit Python loop of SGD steps."""
    grads = jax.jit(jax.grad(lambda p: unrolled_meta_loss(loss_fn, p, batches, M, lr=LR)))(params)
    return jax.tree_util.tree_map(lambda keep, p, g: np.abs(p * g) if keep else None, selected, params, grads)


def _assert_scores_match(scores, reference, selected):
    checked = 0
    for keep, s, r in zip(*(jax.tree_util.tree_leaves(t, is_leaf=lambda x: x is None) for t in (selected, scores, reference))):
        if keep:
            np.testing.assert_allclose(s, r, rtol=2e-4, atol=1e-6)
            checked += 1
        else:
            assert np.shape(s) == ()
    assert checked >= 2


class LinenCNN(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Conv(8, (3, 3), use_bias=False)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        x = nn.relu(x)
        x = nn.Conv(8, (3, 3), strides=2, use_bias=False)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)
        x = nn.relu(x).mean(axis=(1, 2))
        return nn.Dense(4)(x)


def test_flax_linen_with_train_mode_batchnorm():
    model = LinenCNN()
    batches = _images(jax.random.key(0))
    variables = model.init(jax.random.key(1), batches["image"][0], train=False)
    params, batch_stats = variables["params"], variables["batch_stats"]

    def loss_fn(p, batch):
        # BatchNorm in training mode (batch statistics); the updated statistics are thrown away.
        logits, _ = model.apply(
            {"params": p, "batch_stats": batch_stats}, batch["image"], train=True, mutable=["batch_stats"]
        )
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()

    selected = pj.select_prunable(params)
    assert sorted(pj.path_name(p) for p, keep in jax.tree_util.tree_flatten_with_path(selected)[0] if keep) == [
        "Conv_0/kernel", "Conv_1/kernel", "Dense_0/kernel",
    ]
    scores = pj.prospr_scores(loss_fn, params, batches, num_steps=M, lr=LR)
    _assert_scores_match(scores, _reference_scores(loss_fn, params, batches, selected), selected)
    # Train-mode BN matters: eval-mode BN (running statistics) gives different scores.
    def eval_loss(p, batch):
        logits = model.apply({"params": p, "batch_stats": batch_stats}, batch["image"], train=False)
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()

    eval_scores = pj.prospr_scores(eval_loss, params, batches, num_steps=M, lr=LR)
    assert not np.allclose(eval_scores["Conv_0"]["kernel"], scores["Conv_0"]["kernel"], rtol=1e-2)


class NnxMLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(12, 16, rngs=rngs)
        self.norm = nnx.BatchNorm(16, rngs=rngs)
        self.out = nnx.Linear(16, 4, rngs=rngs)

    def __call__(self, x):
        return self.out(nnx.relu(self.norm(self.hidden(x))))


def test_flax_nnx_through_split_and_merge():
    model = NnxMLP(nnx.Rngs(0))
    model.train()  # BatchNorm uses batch statistics
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    key = jax.random.key(2)
    batches = {
        "x": jax.random.normal(key, (M + 1, 10, 12)),
        "label": jax.random.randint(jax.random.fold_in(key, 1), (M + 1, 10), 0, 4),
    }

    def loss_fn(p, batch):
        module = nnx.merge(graphdef, p, rest, copy=True)  # a copy: statistics updates are discarded
        logits = module(batch["x"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()

    selected = pj.select_prunable(params)
    names = sorted(pj.path_name(p) for p, keep in jax.tree_util.tree_flatten_with_path(selected)[0] if keep)
    assert names == ["hidden/kernel", "out/kernel"], names
    scores = pj.prospr_scores(loss_fn, params, batches, num_steps=M, lr=LR)
    _assert_scores_match(scores, _reference_scores(loss_fn, params, batches, selected), selected)
    masks = pj.masks_from_scores(scores, 0.5)
    pruned = pj.apply_masks(params, masks)
    assert int((pruned["hidden"]["kernel"].get_value() == 0).sum()) > 0


def test_plain_function_of_a_params_dict():
    key = jax.random.key(3)
    params = {
        "w1": jax.random.normal(key, (6, 10)) * 0.4,
        "b1": jnp.zeros(10),
        "w2": jax.random.normal(jax.random.fold_in(key, 1), (10, 3)) * 0.4,
    }
    batches = {
        "x": jax.random.normal(jax.random.fold_in(key, 2), (M + 1, 16, 6)),
        "y": jax.random.normal(jax.random.fold_in(key, 3), (M + 1, 16, 3)),
    }

    def loss_fn(p, batch):
        h = jax.nn.softplus(batch["x"] @ p["w1"] + p["b1"])
        return jnp.mean((h @ p["w2"] - batch["y"]) ** 2)

    # Leaves are not named `kernel`: select the weight matrices with a predicate.
    prunable = lambda path, leaf: leaf.ndim == 2  # noqa: E731
    selected = pj.select_prunable(params, prunable)
    scores = pj.prospr_scores(loss_fn, params, batches, num_steps=M, lr=LR, prunable=prunable)
    _assert_scores_match(scores, _reference_scores(loss_fn, params, batches, selected), selected)
    with pytest.raises(ValueError, match="no prunable leaves"):
        pj.prospr_scores(loss_fn, params, batches, num_steps=M)
