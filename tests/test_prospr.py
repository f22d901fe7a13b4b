"""ProsPr meta-gradient scores checked against independent computations."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import prospr_jax as pj
from tiny_models import batch_at, mlp_batches, mlp_loss, mlp_params, scale_entry, unrolled_meta_loss

LR = 0.3
ENTRIES = [("layer0", (0, 0)), ("layer0", (3, 2)), ("layer1", (1, 1)), ("layer1", (4, 0)), ("layer0", (2, 4))]


def _assert_trees_close(a, b, rel):
    """Leaf by leaf |a - b| <= rel * (|b| + max|b|): rounding in a leaf scales with its largest
    entries (sums over a batch, Hessian-vector products), not with each entry, which may be near 0
    after cancellation."""
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        x, y = np.asarray(x), np.asarray(y)
        np.testing.assert_allclose(x, y, rtol=rel, atol=rel * float(np.max(np.abs(y), initial=0.0)))


def _finite_difference(params, batches, num_steps, layer, index, eps=1e-5, **kw):
    plus = unrolled_meta_loss(mlp_loss, scale_entry(params, layer, index, 1 + eps), batches, num_steps, **kw)
    minus = unrolled_meta_loss(mlp_loss, scale_entry(params, layer, index, 1 - eps), batches, num_steps, **kw)
    return float((plus - minus) / (2 * eps))


@pytest.mark.parametrize("implementation", ["hvp", "unrolled"])
@pytest.mark.parametrize("num_steps,momentum", [(1, 0.0), (3, 0.0), (1, 0.9), (3, 0.9)])
def test_meta_gradient_matches_central_finite_difference(implementation, num_steps, momentum):
    with jax.enable_x64(True):
        params = mlp_params(jax.random.key(0))
        batches = mlp_batches(jax.random.key(1), num_steps + 1)
        grads = pj.meta_gradient(
            mlp_loss, params, batches, num_steps=num_steps, lr=LR, momentum=momentum, implementation=implementation
        )
        scores = pj.prospr_scores(
            mlp_loss, params, batches, num_steps=num_steps, lr=LR, momentum=momentum, implementation=implementation
        )
        for layer, index in ENTRIES:
            fd = _finite_difference(params, batches, num_steps, layer, index, lr=LR, momentum=momentum)
            analytic = float(params[layer]["kernel"][index] * grads[layer]["kernel"][index])
            assert analytic == pytest.approx(fd, rel=1e-6, abs=1e-12)
            assert float(scores[layer]["kernel"][index]) == pytest.approx(abs(fd), rel=1e-6, abs=1e-12)


@pytest.mark.parametrize("implementation", ["hvp", "unrolled"])
def test_weight_decay_in_inner_steps_matches_finite_difference(implementation):
    with jax.enable_x64(True):
        params = mlp_params(jax.random.key(2))
        batches = mlp_batches(jax.random.key(3), 4)
        grads = pj.meta_gradient(
            mlp_loss, params, batches, num_steps=3, lr=LR, momentum=0.5, weight_decay=0.05,
            implementation=implementation,
        )
        for layer, index in ENTRIES[:3]:
            fd = _finite_difference(params, batches, 3, layer, index, lr=LR, momentum=0.5, weight_decay=0.05)
            assert float(params[layer]["kernel"][index] * grads[layer]["kernel"][index]) == pytest.approx(fd, rel=1e-6)


@pytest.mark.parametrize("implementation", ["hvp", "unrolled"])
def test_detached_first_buffer_treats_first_update_as_constant(implementation):
    with jax.enable_x64(True):
        params = mlp_params(jax.random.key(4))
        batches = mlp_batches(jax.random.key(5), 4)
        frozen = jax.grad(mlp_loss)(params, batch_at(batches, 0))  # g_0 at c = 1, held constant
        grads = pj.meta_gradient(
            mlp_loss, params, batches, num_steps=3, lr=LR, momentum=0.9, detach_first_buffer=True,
            implementation=implementation,
        )
        attached = pj.meta_gradient(mlp_loss, params, batches, num_steps=3, lr=LR, momentum=0.9)
        for layer, index in ENTRIES[:3]:
            fd = _finite_difference(params, batches, 3, layer, index, lr=LR, momentum=0.9, frozen_first_update=frozen)
            assert float(params[layer]["kernel"][index] * grads[layer]["kernel"][index]) == pytest.approx(fd, rel=1e-6)
        # The flag must change the result (otherwise this test could not fail).
        assert not np.allclose(grads["layer0"]["kernel"], attached["layer0"]["kernel"], rtol=1e-3)


def test_num_steps_zero_is_snip_and_equals_theta_times_gradient():
    # The gradient entries are sums over the batch that partly cancel: in float32 their rounding is a
    # few ulps of the largest terms, far above 1e-5 of the smallest entries. float64 makes the
    # comparison with the hand-written gradient exact up to ~1e-15 of the scale.
    with jax.enable_x64(True):
        params = mlp_params(jax.random.key(6))
        batches = mlp_batches(jax.random.key(7), 1)
        batch = batch_at(batches, 0)
        prospr = pj.prospr_scores(mlp_loss, params, batches, num_steps=0)
        snip = pj.snip_scores(mlp_loss, params, batch)
    # Independent: |theta * dL/dtheta| with the gradient written out by hand for the 2-layer MLP.
    x, y = np.asarray(batch["x"], np.float64), np.asarray(batch["y"], np.float64)
    w0, b0 = (np.asarray(params["layer0"][k], np.float64) for k in ("kernel", "bias"))
    w1, b1 = (np.asarray(params["layer1"][k], np.float64) for k in ("kernel", "bias"))
    h = np.tanh(x @ w0 + b0)
    out = h @ w1 + b1
    d_out = 2 * (out - y) / out.size
    g1 = h.T @ d_out
    g0 = x.T @ ((d_out @ w1.T) * (1 - h**2))
    for layer, w, g in (("layer0", w0, g0), ("layer1", w1, g1)):
        assert prospr[layer]["kernel"].dtype == np.float64
        _assert_trees_close(prospr[layer]["kernel"], np.abs(w * g), rel=1e-12)
        # SNIP runs through the same code with the batch given unstacked: equal up to rounding.
        _assert_trees_close(snip[layer]["kernel"], prospr[layer]["kernel"], rel=1e-12)
        assert prospr[layer]["bias"].shape == ()  # not pruned


def test_first_order_scores_equal_gradient_at_w_m_times_theta0():
    # float64: the claim is an identity, and in float32 the rounding of gradients after three momentum
    # steps (a few ulps of the largest entries) is not small next to 1e-5 of the smallest entries.
    with jax.enable_x64(True):
        params = mlp_params(jax.random.key(8))
        batches = mlp_batches(jax.random.key(9), 4)
        scores = pj.prospr_scores(mlp_loss, params, batches, num_steps=3, lr=LR, momentum=0.9, first_order=True)
        w, buf = params, None
        for k in range(3):  # explicit loop, PyTorch momentum semantics
            g = jax.grad(mlp_loss)(w, batch_at(batches, k))
            buf = g if buf is None else jax.tree_util.tree_map(lambda b, gi: 0.9 * b + gi, buf, g)
            w = jax.tree_util.tree_map(lambda wi, bi: wi - LR * bi, w, buf)
        g_m = jax.grad(mlp_loss)(w, batch_at(batches, 3))
        second = pj.prospr_scores(mlp_loss, params, batches, num_steps=3, lr=LR, momentum=0.9)
    for layer in ("layer0", "layer1"):
        expected = np.abs(np.asarray(g_m[layer]["kernel"]) * np.asarray(params[layer]["kernel"]))
        assert scores[layer]["kernel"].dtype == np.float64
        _assert_trees_close(scores[layer]["kernel"], expected, rel=1e-12)
    assert not np.allclose(second["layer0"]["kernel"], scores["layer0"]["kernel"], rtol=1e-3)


def test_single_batch_equals_stacked_copies():
    # Two different programs computing the same meta-gradient: compared in float64, where their
    # rounding (a few steps of Hessian-vector products, ~1e-15 of each leaf's scale) is far below
    # 1e-10; a real difference (another batch, a missing step) is O(1) relative.
    with jax.enable_x64(True):
        params = mlp_params(jax.random.key(10))
        batch = batch_at(mlp_batches(jax.random.key(11), 1), 0)
        stacked = pj.stack_batches([batch] * 4)
        for implementation in ("hvp", "unrolled"):
            a = pj.prospr_scores(mlp_loss, params, batch, single_batch=True, implementation=implementation)
            b = pj.prospr_scores(mlp_loss, params, stacked, implementation=implementation)
            _assert_trees_close(a, b, rel=1e-10)


def _count_eqns(jaxpr) -> int:
    total = 0
    for eqn in jaxpr.eqns:
        total += 1
        for value in eqn.params.values():
            for v in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(v, jax.extend.core.ClosedJaxpr):
                    total += _count_eqns(v.jaxpr)
                elif isinstance(v, jax.extend.core.Jaxpr):
                    total += _count_eqns(v)
    return total


@pytest.mark.parametrize(
    "options",
    [dict(implementation="hvp"), dict(implementation="unrolled"), dict(implementation="unrolled", remat=True),
     dict(implementation="hvp", momentum=0.9, detach_first_buffer=True)],
)
def test_program_size_does_not_grow_with_num_steps(options):
    params = mlp_params(jax.random.key(12), dtype=jnp.float32)
    sizes = []
    for m in (2, 7):
        batches = mlp_batches(jax.random.key(13), m + 1, dtype=jnp.float32)
        fn = lambda p, b: pj.prospr_scores(mlp_loss, p, b, num_steps=m, **options)  # noqa: E731
        jaxpr = jax.make_jaxpr(fn)(params, batches)
        hlo = jax.jit(fn).lower(params, batches).as_text()
        sizes.append((_count_eqns(jaxpr.jaxpr), hlo.count("\n")))
    assert sizes[0] == sizes[1]


def test_scores_jit_and_match_eager():
    # Same computation, two programs (the outer jit may fuse differently): float64, as above.
    with jax.enable_x64(True):
        params = mlp_params(jax.random.key(14))
        batches = mlp_batches(jax.random.key(15), 4)
        eager = pj.prospr_scores(mlp_loss, params, batches)
        jitted = jax.jit(lambda p, b: pj.prospr_scores(mlp_loss, p, b))(params, batches)
        _assert_trees_close(jitted, eager, rel=1e-10)


def test_exclude_first_and_last_use_forward_order():
    # 12 layers: flattening order sorts 'layer10' before 'layer2', forward order does not.
    sizes = (3,) + (4,) * 11 + (2,)
    params = mlp_params(jax.random.key(16), sizes=sizes, dtype=jnp.float32)
    batches = mlp_batches(jax.random.key(17), 2, sizes=sizes, dtype=jnp.float32)
    scores = pj.prospr_scores(mlp_loss, params, batches, num_steps=1, exclude_first=True, exclude_last=True)
    assert scores["layer0"]["kernel"].shape == ()
    assert scores["layer11"]["kernel"].shape == ()
    assert all(scores[f"layer{i}"]["kernel"].shape == (4, 4) for i in range(1, 11))


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(num_steps=-1), "num_steps"),
        (dict(num_steps=2), "leading axis of length num_steps \\+ 1 = 3"),
        (dict(implementation="fast"), "implementation"),
        (dict(lr=float("nan")), "lr"),
        (dict(momentum=-0.1), "momentum"),
        (dict(prunable=lambda path, leaf: False), "no prunable leaves"),
    ],
)
def test_bad_input_raises_clear_errors(kwargs, message):
    params = mlp_params(jax.random.key(18), dtype=jnp.float32)
    batches = mlp_batches(jax.random.key(19), 4, dtype=jnp.float32)
    with pytest.raises((ValueError, TypeError), match=message):
        pj.prospr_scores(mlp_loss, params, batches, **{"num_steps": 3, **kwargs})


def test_changing_lr_does_not_recompile():
    params = mlp_params(jax.random.key(20), dtype=jnp.float32)
    batches = mlp_batches(jax.random.key(21), 4, dtype=jnp.float32)
    traces = []

    def counting_loss(p, b):
        traces.append(1)
        return mlp_loss(p, b)

    pj.prospr_scores(counting_loss, params, batches, lr=0.1)
    n = len(traces)
    pj.prospr_scores(counting_loss, params, batches, lr=0.05, momentum=0.0)
    assert len(traces) == n


def test_hvp_and_unrolled_agree_on_all_leaves_with_momentum_and_decay():
    with jax.enable_x64(True):
        params = mlp_params(jax.random.key(22), sizes=(4, 6, 6, 3))
        batches = mlp_batches(jax.random.key(23), 6, sizes=(4, 6, 6, 3))
        for momentum, detach, wd, remat in ((0.0, False, 0.0, True), (0.9, False, 1e-2, False), (0.9, True, 0.0, True)):
            kw = dict(num_steps=5, lr=0.2, momentum=momentum, detach_first_buffer=detach, weight_decay=wd)
            a = pj.meta_gradient(mlp_loss, params, batches, implementation="hvp", **kw)
            b = pj.meta_gradient(mlp_loss, params, batches, implementation="unrolled", remat=remat, **kw)
            for x, y in zip(*(jax.tree_util.tree_leaves(t) for t in (a, b))):
                np.testing.assert_allclose(x, y, rtol=1e-10, atol=1e-13)


def _sliced_mean_loss(loss_fn, n):
    """Reference for micro-batching, written independently: the mean of ``loss_fn`` over the ``n``
    slices ``rows j, j + n, j + 2n, ...`` of a whole batch."""
    def loss(p, b):
        return sum(loss_fn(p, jax.tree_util.tree_map(lambda x: x[j::n], b)) for j in range(n)) / n
    return loss


def _batch_standardised_loss(p, b):
    """A loss that mixes the examples of a batch (like BatchNorm in training mode)."""
    x = b["x"]
    x = (x - x.mean(0)) / (x.std(0) + 1.0)
    return mlp_loss(p, {"x": x, "y": b["y"]})


@pytest.mark.parametrize("implementation,remat,micro_batches", [("hvp", False, 2), ("unrolled", False, 4),
                                                                ("unrolled", True, 2)])
def test_micro_batches_equal_whole_batches_for_a_per_example_loss(implementation, remat, micro_batches):
    with jax.enable_x64(True):
        params = mlp_params(jax.random.key(24))
        batches = mlp_batches(jax.random.key(25), 4)
        kw = dict(num_steps=3, lr=LR, momentum=0.9, weight_decay=1e-2, implementation=implementation, remat=remat)
        whole = pj.meta_gradient(mlp_loss, params, batches, **kw)
        micro = pj.meta_gradient(mlp_loss, params, batches, micro_batches=micro_batches, **kw)
        # float64 and the same terms summed in another order: agreement to rounding.
        _assert_trees_close(micro, whole, 1e-10)


@pytest.mark.parametrize("implementation", ["hvp", "unrolled"])
def test_micro_batches_of_a_batch_mixing_loss_are_the_mean_over_interleaved_slices(implementation):
    with jax.enable_x64(True):
        params = mlp_params(jax.random.key(26))
        batches = mlp_batches(jax.random.key(27), 3)
        kw = dict(num_steps=2, lr=LR, implementation=implementation)
        micro = pj.meta_gradient(_batch_standardised_loss, params, batches, micro_batches=4, **kw)
        reference = pj.meta_gradient(_sliced_mean_loss(_batch_standardised_loss, 4), params, batches, **kw)
        whole = pj.meta_gradient(_batch_standardised_loss, params, batches, **kw)
        _assert_trees_close(micro, reference, 1e-10)
        # ... and differs from the whole-batch result: statistics are per slice.
        assert max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree_util.tree_leaves(micro),
                                                                   jax.tree_util.tree_leaves(whole))) > 1e-4


def test_micro_batches_must_divide_the_batch():
    params = mlp_params(jax.random.key(28), dtype=jnp.float32)
    batches = mlp_batches(jax.random.key(29), 4, dtype=jnp.float32)  # batch size 8
    with pytest.raises(ValueError, match="micro_batches=3 must divide the batch size"):
        pj.prospr_scores(mlp_loss, params, batches, micro_batches=3)
    with pytest.raises(ValueError, match="micro_batches"):
        pj.prospr_scores(mlp_loss, params, batches, micro_batches=0)


def test_micro_batches_bound_the_compiled_memory():
    sizes = (16, 256, 256, 4)
    params = mlp_params(jax.random.key(30), sizes=sizes, dtype=jnp.float32)
    batches = mlp_batches(jax.random.key(31), 4, batch_size=1024, sizes=sizes, dtype=jnp.float32)

    def temp_bytes(n):
        score = jax.jit(lambda p, b: pj.meta_gradient(mlp_loss, p, b, num_steps=3, micro_batches=n))
        mem = score.lower(params, batches).compile().memory_analysis()
        if mem is None:
            pytest.skip("this backend reports no memory analysis")
        return mem.temp_size_in_bytes

    # Activations (1024 x 256 per layer, several per step) dominate the parameters (about 0.3 MB):
    # eight slices must need well under half the scratch memory of whole batches.
    assert temp_bytes(8) < 0.5 * temp_bytes(1)
