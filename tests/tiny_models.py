"""Tiny hand-written models and independent reference computations shared by the core tests."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def mlp_params(key: jax.Array, sizes=(4, 5, 3), dtype=jnp.float64) -> dict:
    keys = jax.random.split(key, len(sizes))
    params = {}
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        params[f"layer{i}"] = {
            "kernel": (jax.random.normal(keys[i], (a, b)) / jnp.sqrt(a)).astype(dtype),
            "bias": (0.1 * jax.random.normal(jax.random.fold_in(keys[i], 1), (b,))).astype(dtype),
        }
    return params


def mlp_loss(params: dict, batch: dict) -> jax.Array:
    """Mean squared error of a tanh MLP: enough curvature for meaningful Hessian terms."""
    h = batch["x"]
    n = len(params)
    for i in range(n):
        layer = params[f"layer{i}"]
        h = h @ layer["kernel"] + layer["bias"]
        if i < n - 1:
            h = jnp.tanh(h)
    return jnp.mean((h - batch["y"]) ** 2)


def mlp_batches(key: jax.Array, num_batches: int, batch_size=8, sizes=(4, 5, 3), dtype=jnp.float64) -> dict:
    kx, ky = jax.random.split(key)
    return {
        "x": jax.random.normal(kx, (num_batches, batch_size, sizes[0])).astype(dtype),
        "y": jax.random.normal(ky, (num_batches, batch_size, sizes[-1])).astype(dtype),
    }


def batch_at(batches: dict, k: int) -> dict:
    return jax.tree_util.tree_map(lambda b: b[k], batches)


def unrolled_meta_loss(
    loss_fn,
    params: dict,
    batches: dict,
    num_steps: int,
    *,
    lr: float,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    frozen_first_update=None,
):
    """L(w_M; batch_M) by an explicit Python loop of SGD steps (PyTorch momentum semantics).

    ``frozen_first_update``: if given, the first momentum buffer is this constant instead of g_0 (the
    official code's detached first buffer, evaluated at c = 1).
    """
    w = params
    buf = None
    for k in range(num_steps):
        g = jax.grad(loss_fn)(w, batch_at(batches, k))
        g = jax.tree_util.tree_map(lambda gi, wi: gi + weight_decay * wi, g, w)
        if momentum:
            if buf is None:
                buf = g if frozen_first_update is None else frozen_first_update
            else:
                buf = jax.tree_util.tree_map(lambda b, gi: momentum * b + gi, buf, g)
            g = buf
        w = jax.tree_util.tree_map(lambda wi, gi: wi - lr * gi, w, g)
    return loss_fn(w, batch_at(batches, num_steps))


def scale_entry(params: dict, layer: str, index: tuple, factor: float) -> dict:
    """params with one kernel entry multiplied by ``factor`` (the mask entry c = factor)."""
    new = jax.tree_util.tree_map(lambda x: x, params)
    kernel = new[layer]["kernel"]
    new[layer] = dict(new[layer], kernel=kernel.at[index].multiply(factor))
    return new


def topk_accuracy_bounds(logits, labels, k: int, tol: float) -> tuple[float, float, int]:
    """Top-k accuracy of ``logits`` [N, C] when each logit may be off by up to ``tol``.

    A metric computed by another program (another batch size, another fusion) rounds the logits
    differently, which can flip an example whose label is within ``2 * tol`` of the k-th largest
    logit. Returns ``(lowest, highest, ambiguous)``: the accuracy with every such example counted as
    a miss, as a hit, and how many there are. An exact tie counts as ambiguous (top-k order decides).
    """
    logits = np.asarray(logits, np.float64)
    labels = np.asarray(labels)
    rows = np.arange(len(labels))
    true = logits[rows, labels][:, None]
    others = np.ones(logits.shape, bool)
    others[rows, labels] = False
    surely_above = np.sum(others & (logits > true + 2 * tol), axis=1)
    maybe_above = np.sum(others & (logits >= true - 2 * tol), axis=1)
    lowest = float(np.mean(maybe_above < k))
    highest = float(np.mean(surely_above < k))
    return lowest, highest, int(np.sum((maybe_above >= k) & (surely_above < k)))
