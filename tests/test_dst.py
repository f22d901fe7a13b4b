"""Dynamic sparse training (SET, RigL): exact per-layer counts through every update, regrown weights
and their momentum at 0, RigL's growth against a numpy reference, the schedules, no recompilation."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import prospr_jax as pj
from prospr_jax.methods import dst
from tiny_models import mlp_batches, mlp_loss, mlp_params, batch_at

SIZES = (6, 8, 4)


def _problem(seed=0, dtype=jnp.float32):
    params = mlp_params(jax.random.PRNGKey(seed), SIZES, dtype=dtype)
    batches = mlp_batches(jax.random.PRNGKey(seed + 1), 12, sizes=SIZES, dtype=dtype)
    return pj.PruningProblem(params=params, loss_fn=mlp_loss, batch_fn=lambda i: batch_at(batches, i),
                             key=jax.random.key(seed + 2))


def _kept_per_layer(masks):
    return {name: int(np.sum(np.asarray(m))) for name, m in pj.named_leaves(masks) if np.ndim(m) >= 1}


def _train(problem, method, sparsity, steps, *, momentum=0.9, update_every=2, **options):
    """A hand-written masked SGD loop with the method's updater; returns every state after an update."""
    m = pj.methods.get(method)
    opts = m.parse_options({"update_every": update_every, **options})
    result = pj.methods.prune(method, problem, sparsity, update_every=update_every, **options)
    updater = m.updater(problem, opts, steps)
    tx = pj.masked_optimizer(optax.sgd(0.05, momentum=momentum), result.masks)
    params = pj.apply_masks(problem.params, result.masks)
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, batch):
        masks = pj.masks_of(opt_state)
        grads = jax.grad(lambda p: mlp_loss(pj.apply_masks(p, masks), batch))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    snapshots = []
    for t in range(1, steps + 1):
        batch = problem.batch(t % 12)
        params, opt_state = step(params, opt_state, batch)
        if updater.is_update_step(t):
            before = (params, opt_state)
            params, opt_state = updater(params, opt_state, batch, t)
            snapshots.append((t, before, (params, opt_state)))
    return result, snapshots


@pytest.mark.parametrize("method", ["set", "rigl"])
def test_kept_count_exact_per_layer_after_every_update_and_masks_move(method):
    problem = _problem()
    result, snapshots = _train(problem, method, 0.7, 20, end_fraction=1.0)
    first = _kept_per_layer(result.masks)
    assert len(snapshots) == 9  # updates after steps 2, 4, ..., 18 (t < end_step = 20)
    moved = 0
    for _, (_, state_before), (params, opt_state) in snapshots:
        masks = pj.masks_of(opt_state)
        assert _kept_per_layer(masks) == first
        # Pruned weights are exactly zero after the update.
        for (_, p), (_, m) in zip(pj.named_leaves(params), pj.named_leaves(masks)):
            assert np.all(np.asarray(p)[np.broadcast_to(np.asarray(m), np.shape(p)) == 0] == 0)
        old = pj.masks_of(state_before)
        moved += sum(int(np.sum(np.asarray(a) != np.asarray(b))) for a, b in zip(jax.tree.leaves(old), jax.tree.leaves(masks)))
    assert moved > 0, "no update changed the mask"


@pytest.mark.parametrize("method", ["set", "rigl"])
def test_regrown_weights_and_their_momentum_start_at_zero(method):
    problem = _problem(seed=3)
    _, snapshots = _train(problem, method, 0.6, 12, end_fraction=1.0)
    grown_total = 0
    for _, (_, state_before), (params, opt_state) in snapshots:
        old, new = pj.masks_of(state_before), pj.masks_of(opt_state)
        trace = opt_state.inner_state[0].trace  # optax.sgd(momentum): (TraceState, ScaleByScheduleState...)
        trace_before = state_before.inner_state[0].trace
        for name in ("layer0", "layer1"):
            o, n = np.asarray(old[name]["kernel"]), np.asarray(new[name]["kernel"])
            grown = (o == 0) & (n == 1)
            stayed = (o == 1) & (n == 1)
            grown_total += int(grown.sum())
            assert np.all(np.asarray(params[name]["kernel"])[grown] == 0.0)
            assert np.all(np.asarray(trace[name]["kernel"])[grown] == 0.0)
            assert np.all(np.asarray(trace[name]["kernel"])[(o == 1) & (n == 0)] == 0.0)
            # Weights kept by both masks keep their momentum.
            np.testing.assert_array_equal(np.asarray(trace[name]["kernel"])[stayed],
                                          np.asarray(trace_before[name]["kernel"])[stayed])
    assert grown_total > 0


def _numpy_rigl(mask, w, g, fraction):
    """RigL's update of one layer by sorting (ties: lower flat index first)."""
    mask, w, g = mask.ravel() != 0, np.abs(w.ravel()), np.abs(g.ravel())
    n = int(mask.sum())
    k = int(math.floor(fraction * n))
    kept_idx = np.flatnonzero(mask)
    order = sorted(kept_idx, key=lambda i: (-w[i], i))
    keep = set(order[: n - k])
    candidates = sorted((i for i in range(mask.size) if i not in keep), key=lambda i: (-g[i], i))
    new = np.zeros(mask.size, bool)
    new[list(keep)] = True
    new[candidates[:k]] = True
    return new


def test_rigl_regrows_exactly_the_top_gradient_positions_numpy_reference():
    problem = _problem(seed=5)
    _, snapshots = _train(problem, "rigl", 0.5, 12, update_every=3, end_fraction=1.0)
    assert len(snapshots) == 3
    end_step, moved = 12, 0
    for t, (params_b, state_b), (_, state_a) in snapshots:
        masks_b = pj.masks_of(state_b)
        w = pj.apply_masks(params_b, masks_b)
        g = jax.grad(mlp_loss)(w, problem.batch(t % 12))
        fraction = 0.3 / 2 * (1 + math.cos(math.pi * t / end_step))
        for name in ("layer0", "layer1"):
            expected = _numpy_rigl(np.asarray(masks_b[name]["kernel"]), np.asarray(w[name]["kernel"]),
                                   np.asarray(g[name]["kernel"]), fraction)
            got = np.asarray(pj.masks_of(state_a)[name]["kernel"]).ravel() != 0
            np.testing.assert_array_equal(got, expected)
            moved += int(np.sum(expected != (np.asarray(masks_b[name]["kernel"]).ravel() != 0)))
    assert moved > 0, "the reference never moved a weight: the test would not see a wrong growth rule"


def test_set_grows_only_in_free_positions_and_drops_the_smallest():
    """SET's dropped entries are exactly the k smallest |w| among the kept (numpy reference)."""
    problem = _problem(seed=7)
    _, snapshots = _train(problem, "set", 0.5, 4, update_every=4, end_fraction=1.0)
    assert snapshots == []  # t < end_step = 4: no update at step 4
    _, snapshots = _train(problem, "set", 0.5, 8, update_every=4, end_fraction=1.0)
    (t, (params_b, state_b), (_, state_a)), = snapshots
    for name in ("layer0", "layer1"):
        o = np.asarray(pj.masks_of(state_b)[name]["kernel"]).ravel() != 0
        n = np.asarray(pj.masks_of(state_a)[name]["kernel"]).ravel() != 0
        w = np.abs(np.asarray(params_b[name]["kernel"]).ravel())
        k = int(math.floor(0.3 * o.sum()))
        survivors = sorted(np.flatnonzero(o), key=lambda i: (-w[i], i))[: o.sum() - k]
        assert np.all(n[survivors])
        assert n.sum() == o.sum()


def test_cosine_and_constant_drop_fraction():
    assert dst.drop_fraction_at(0, drop_fraction=0.3, end_step=100, schedule="cosine") == pytest.approx(0.3)
    assert dst.drop_fraction_at(50, drop_fraction=0.3, end_step=100, schedule="cosine") == pytest.approx(0.15)
    assert dst.drop_fraction_at(100, drop_fraction=0.3, end_step=100, schedule="cosine") == pytest.approx(0.0, abs=1e-12)
    assert dst.drop_fraction_at(25, drop_fraction=0.3, end_step=100, schedule="cosine") == pytest.approx(
        0.15 * (1 + math.cos(math.pi / 4)))
    assert dst.drop_fraction_at(70, drop_fraction=0.3, end_step=100, schedule="constant") == 0.3
    with pytest.raises(ValueError, match="schedule"):
        dst.drop_fraction_at(1, drop_fraction=0.3, end_step=10, schedule="linear")


def test_initial_masks_follow_erk_er_and_uniform_densities():
    problem = _problem()
    n = {"layer0": 6 * 8, "layer1": 8 * 4}
    for distribution, kernel in (("erk", True), ("er", False)):
        result = pj.methods.prune("rigl", problem, 0.6, distribution=distribution)
        densities = pj.methods.erk_densities(problem.params, None, 0.6, erdos_renyi_kernel=kernel)
        kept = _kept_per_layer(result.masks)
        for layer in n:
            name = [k for k in kept if k.startswith(layer)][0]
            assert kept[name] == round(densities[name] * n[layer])
    kept = _kept_per_layer(pj.methods.prune("set", problem, 0.5, distribution="uniform").masks)
    assert sorted(kept.values()) == [16, 24]
    assert sum(_kept_per_layer(pj.methods.prune("set", problem, 0.6).masks).values()) == math.ceil(0.4 * 80)


def test_no_recompilation_across_mask_updates():
    traces = {"loss": 0}
    problem = _problem()

    def counting_loss(params, batch):
        traces["loss"] += 1  # runs when traced, not when a compiled program runs
        return mlp_loss(params, batch)

    problem = problem.replace(loss_fn=counting_loss)
    m = pj.methods.get("rigl")
    opts = m.parse_options({"update_every": 1, "end_fraction": 1.0})
    updater = m.updater(problem, opts, 10)
    masks = pj.methods.prune("rigl", problem, 0.7).masks
    tx = pj.masked_optimizer(optax.sgd(0.05, momentum=0.9), masks)
    params = pj.apply_masks(problem.params, masks)
    opt_state = tx.init(params)
    step_traces = [0]

    @jax.jit
    def step(params, opt_state, batch):
        step_traces[0] += 1
        grads = jax.grad(lambda p: mlp_loss(pj.apply_masks(p, pj.masks_of(opt_state)), batch))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    seen = []
    for t in range(1, 8):
        params, opt_state = step(params, opt_state, problem.batch(t))
        params, opt_state = updater(params, opt_state, problem.batch(t), t)
        seen.append(np.asarray(pj.masks_of(opt_state)["layer0"]["kernel"]).copy())
    assert any(np.any(a != b) for a, b in zip(seen, seen[1:])), "the masks never changed"
    assert step_traces[0] == 1
    assert traces["loss"] == 1


def test_bad_dst_options_are_clear_errors():
    problem = _problem()
    with pytest.raises(ValueError, match="update_every"):
        pj.methods.prune("rigl", problem, 0.5, update_every=0)
    with pytest.raises(ValueError, match="drop_fraction"):
        pj.methods.prune("set", problem, 0.5, drop_fraction=1.0)
    with pytest.raises(ValueError, match="distribution"):
        pj.methods.prune("set", problem, 0.5, distribution="gaussian")
    with pytest.raises(ValueError, match="does not support"):
        pj.methods.prune("rigl", problem, 0.5, scope="layerwise")
