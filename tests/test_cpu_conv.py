"""The project's CPU convolution kernels: each primitive against XLA's convolution, derivatives of every
order through the rewrite, what the rewrite leaves alone, determinism, the fallback without a compiler,
and the train step / ProsPr with the kernels against the same programs without them."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from prospr_jax._src import cpu_conv
from prospr_jax._src.cpu_conv import primitives as P
from prospr_jax._src.cpu_conv.rewrite import with_cpu_conv_kernels

DN = ("NHWC", "HWIO", "NHWC")

pytestmark = pytest.mark.skipif(
    jax.default_backend() != "cpu" or not cpu_conv.kernels_available(), reason="CPU kernels not available here"
)


def _xla(x, k, strides, padding):
    return lax.conv_general_dilated(x, k, strides, padding, dimension_numbers=DN)


def _close(got, expected, rtol=2e-5):
    """float32: each output is a sum of at most a few thousand products; different summation orders
    agree to a few units of 1e-6 of the output's scale. A wrong index (flip, stride, padding offset)
    changes values at the scale itself."""
    got, expected = np.asarray(got), np.asarray(expected)
    assert got.shape == expected.shape and got.dtype == expected.dtype
    scale = float(np.max(np.abs(expected)))
    assert scale > 0
    np.testing.assert_allclose(got, expected, rtol=0, atol=rtol * scale)


# (batch, height, width, in, out, kernel hw, strides, padding): odd sizes, channel counts off the
# vector width, asymmetric and zero padding, strides 2 and 3, 1x1 and 5x5 kernels.
SHAPES = [
    (2, 8, 8, 3, 16, (3, 3), (1, 1), ((1, 1), (1, 1))),
    (2, 9, 7, 5, 7, (3, 3), (2, 2), ((0, 1), (1, 0))),
    (3, 10, 10, 16, 33, (3, 3), (2, 2), ((1, 1), (1, 1))),
    (2, 11, 9, 8, 20, (5, 5), (1, 1), ((2, 2), (2, 2))),
    (2, 12, 12, 6, 40, (5, 5), (1, 1), ((0, 0), (0, 0))),
    (2, 10, 13, 7, 9, (3, 2), (3, 1), ((2, 0), (0, 1))),
    (4, 6, 6, 64, 64, (1, 1), (2, 2), ((0, 0), (0, 0))),
    (1, 4, 4, 2, 3, (3, 3), (1, 1), ((2, 2), (2, 2))),
]


@pytest.mark.parametrize("shape", SHAPES, ids=[str(s[:5]) for s in SHAPES])
def test_each_primitive_is_xlas_convolution_or_its_transpose(shape):
    n, h, w, i, o, khw, strides, padding = shape
    key = jax.random.key(0)
    x = jax.random.normal(key, (n, h, w, i))
    k = jax.random.normal(jax.random.fold_in(key, 1), (*khw, i, o))
    y, vjp = jax.vjp(lambda x, k: _xla(x, k, strides, padding), x, k)
    g = jax.random.normal(jax.random.fold_in(key, 2), y.shape)
    dx, dk = vjp(g)
    params = dict(strides=strides, padding=padding)
    _close(jax.jit(lambda x, k: P.conv2d_p.bind(x, k, **params))(x, k), y)
    _close(jax.jit(lambda g, k: P.conv2d_input_grad_p.bind(g, k, input_hw=(h, w), **params))(g, k), dx)
    _close(jax.jit(lambda x, g: P.conv2d_kernel_grad_p.bind(x, g, kernel_hw=khw, **params))(x, g), dk)
    # Eager evaluation (outside jit) takes the same kernels.
    _close(P.conv2d(x, k, strides, padding), y)


def _cnn(params, x):
    """Two convolutions (stride 1 and 2), tanh, a dense head: smooth, so all derivatives are well
    conditioned."""
    h = jnp.tanh(_xla(x, params["k1"], (1, 1), ((1, 1), (1, 1))))
    h = jnp.tanh(_xla(h, params["k2"], (2, 2), ((0, 1), (0, 1))))
    return jnp.mean((h.mean(axis=(1, 2)) @ params["d"] - 0.5) ** 2)


def _cnn_params(key):
    return {"k1": jax.random.normal(key, (3, 3, 3, 16)) / np.sqrt(27),
            "k2": jax.random.normal(jax.random.fold_in(key, 1), (3, 3, 16, 24)) / np.sqrt(144),
            "d": jax.random.normal(jax.random.fold_in(key, 2), (24, 5)) / np.sqrt(24)}


def _conv_primitives(jaxpr_text):
    return {name: jaxpr_text.count(name) for name in ("conv_general_dilated", "prospr_conv2d")}


def test_derivatives_of_every_order_equal_xlas_and_use_only_the_kernels():
    params = _cnn_params(jax.random.key(1))
    x = jax.random.normal(jax.random.key(2), (4, 10, 10, 3))
    fast = with_cpu_conv_kernels(_cnn)
    v = jax.tree_util.tree_map(lambda a: jax.random.normal(jax.random.key(3), a.shape), params)

    def hvp(f):  # forward over reverse, as ProsPr's default implementation
        return lambda p: jax.jvp(lambda q: jax.grad(f)(q, x), (p,), (v,))[1]

    def meta(f):  # reverse over reverse through one SGD step, as ProsPr's unrolled implementation
        def m(p):
            g = jax.grad(f)(p, x)
            return f(jax.tree_util.tree_map(lambda a, b: a - 0.5 * b, p, g), x)
        return jax.grad(m)

    for make in (lambda f: (lambda p: f(p, x)), lambda f: (lambda p: jax.grad(f)(p, x)), hvp, meta):
        expected, got = jax.jit(make(_cnn))(params), jax.jit(make(fast))(params)
        for a, b in zip(jax.tree_util.tree_leaves(expected), jax.tree_util.tree_leaves(got)):
            _close(b, a, rtol=1e-4)
        text = str(jax.make_jaxpr(make(fast))(params))
        counts = _conv_primitives(text)
        assert counts["conv_general_dilated"] == 0 and counts["prospr_conv2d"] >= 2


def test_keyword_arguments_and_pytree_outputs_pass_through():
    params = _cnn_params(jax.random.key(10))
    x = jax.random.normal(jax.random.key(11), (2, 8, 8, 3))

    def f(p, *, images):
        return {"loss": _cnn(p, images), "twice": (2 * _cnn(p, images),)}

    got = jax.jit(with_cpu_conv_kernels(f))(params, images=x)
    expected = f(params, images=x)
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(expected)
    for a, b in zip(jax.tree_util.tree_leaves(expected), jax.tree_util.tree_leaves(got)):
        _close(b, a, rtol=1e-5)


def test_vmap_falls_back_to_a_correct_convolution():
    params = _cnn_params(jax.random.key(4))
    xs = jax.random.normal(jax.random.key(5), (3, 2, 8, 8, 3))
    fast = with_cpu_conv_kernels(_cnn)
    expected = jax.vmap(jax.grad(_cnn), in_axes=(None, 0))(params, xs)
    got = jax.jit(jax.vmap(jax.grad(fast), in_axes=(None, 0)))(params, xs)
    for a, b in zip(jax.tree_util.tree_leaves(expected), jax.tree_util.tree_leaves(got)):
        _close(b, a, rtol=1e-4)


def test_the_rewrite_keeps_custom_derivative_rules():
    # relu(0): jax.nn.relu's custom JVP says 0; an inlined max(x, 0) would say 1/2. With a zero kernel
    # every pre-activation is exactly 0, so the kernel gradient shows which rule ran.
    x = jax.random.normal(jax.random.key(6), (2, 6, 6, 3))

    def f(k):
        return jnp.sum(jax.nn.relu(_xla(x, k, (1, 1), ((1, 1), (1, 1)))))

    k = jnp.zeros((3, 3, 3, 4))
    expected = jax.grad(f)(k)
    assert float(jnp.max(jnp.abs(expected))) == 0.0
    got = jax.jit(jax.grad(with_cpu_conv_kernels(f)))(k)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))


def test_the_rewrite_keeps_remat_and_rewrites_loop_bodies():
    params = _cnn_params(jax.random.key(7))
    xs = jax.random.normal(jax.random.key(8), (3, 2, 8, 8, 3))

    def f(p, xs):
        body = jax.checkpoint(lambda c, x: (c + _cnn(p, x), None))
        return lax.scan(body, 0.0, xs)[0]

    fast = with_cpu_conv_kernels(f)
    text = str(jax.make_jaxpr(jax.grad(fast))(params, xs))
    assert "checkpoint" in text or "remat" in text
    assert _conv_primitives(text)["conv_general_dilated"] == 0
    for a, b in zip(jax.tree_util.tree_leaves(jax.grad(f)(params, xs)),
                    jax.tree_util.tree_leaves(jax.jit(jax.grad(fast))(params, xs))):
        _close(b, a, rtol=1e-4)


@pytest.mark.parametrize("case", ["nchw", "groups", "dilation", "float64"])
def test_convolutions_the_kernels_do_not_cover_stay_xlas(case):
    key = jax.random.key(9)
    x = jax.random.normal(key, (2, 8, 8, 4))
    k = jax.random.normal(jax.random.fold_in(key, 1), (3, 3, 4, 4))
    if case == "nchw":
        def f(x, k):
            return lax.conv_general_dilated(jnp.transpose(x, (0, 3, 1, 2)), jnp.transpose(k, (3, 2, 0, 1)), (1, 1),
                                            "SAME", dimension_numbers=("NCHW", "OIHW", "NCHW"))
    elif case == "groups":
        def f(x, k):
            return lax.conv_general_dilated(x, k[:, :, :2], (1, 1), "SAME", dimension_numbers=DN,
                                            feature_group_count=2)
    elif case == "dilation":
        def f(x, k):
            return lax.conv_general_dilated(x, k, (1, 1), "SAME", rhs_dilation=(2, 2), dimension_numbers=DN)
    else:
        def f(x, k):
            return _xla(x.astype(jnp.float64), k.astype(jnp.float64), (1, 1), ((1, 1), (1, 1)))
    with jax.enable_x64(case == "float64"):
        counts = _conv_primitives(str(jax.make_jaxpr(with_cpu_conv_kernels(f))(x, k)))
        assert counts == {"conv_general_dilated": 1, "prospr_conv2d": 0}
        np.testing.assert_array_equal(np.asarray(jax.jit(with_cpu_conv_kernels(f))(x, k)), np.asarray(jax.jit(f)(x, k)))


_THREADS_SCRIPT = textwrap.dedent("""
    import hashlib, os, sys
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: int(sys.argv[1])])
    import jax, numpy as np
    from prospr_jax._src.cpu_conv import primitives as P
    x = jax.random.normal(jax.random.key(0), (64, 16, 16, 16))
    g = jax.random.normal(jax.random.key(1), (64, 16, 16, 32))
    k = jax.random.normal(jax.random.key(2), (3, 3, 16, 32))
    p = dict(strides=(1, 1), padding=((1, 1), (1, 1)))
    outs = [jax.jit(lambda x, g: P.conv2d_kernel_grad_p.bind(x, g, kernel_hw=(3, 3), **p))(x, g),
            jax.jit(lambda x, k: P.conv2d_p.bind(x, k, **p))(x, k)]
    print(hashlib.sha256(b"".join(np.asarray(o).tobytes() for o in outs)).hexdigest())
""")


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 cores")
def test_results_do_not_depend_on_the_number_of_threads():
    digests = [
        subprocess.run([sys.executable, "-c", _THREADS_SCRIPT, str(t)], capture_output=True, text=True, check=True,
                       timeout=300).stdout.strip()
        for t in (1, 2)
    ]
    assert len(digests[0]) == 64 and digests[0] == digests[1]


_NO_COMPILER_SCRIPT = textwrap.dedent("""
    import warnings
    import jax, jax.numpy as jnp, numpy as np
    from jax import lax
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        from prospr_jax._src import cpu_conv
        enabled = cpu_conv.cpu_conv_kernels_enabled()
    assert not enabled, "kernels enabled without a compiler"
    assert any("no C++ compiler" in str(w.message) for w in caught), [str(w.message) for w in caught]
    x = jax.random.normal(jax.random.key(0), (2, 6, 6, 3)); k = jax.random.normal(jax.random.key(1), (3, 3, 3, 5))
    f = lambda x, k: jnp.sum(lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")) ** 2)
    got = jax.jit(jax.grad(cpu_conv.with_cpu_conv_kernels(f), 1))(x, k)  # the primitives, lowered to XLA's conv
    np.testing.assert_allclose(np.asarray(got), np.asarray(jax.grad(f, 1)(x, k)), rtol=1e-5, atol=1e-5)
    print("ok")
""")


def test_without_a_compiler_the_project_runs_xlas_convolutions(tmp_path):
    env = dict(os.environ, PATH=str(tmp_path), PROSPR_JAX_CACHE=str(tmp_path / "cache"))
    env.pop("CXX", None)
    out = subprocess.run([sys.executable, "-c", _NO_COMPILER_SCRIPT], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


def test_the_switch(monkeypatch):
    monkeypatch.setenv(cpu_conv.rewrite.ENV_VAR, "0")
    assert not cpu_conv.cpu_conv_kernels_enabled()
    monkeypatch.setenv(cpu_conv.rewrite.ENV_VAR, "1")
    assert cpu_conv.cpu_conv_kernels_enabled()
    monkeypatch.setenv(cpu_conv.rewrite.ENV_VAR, "maybe")
    with pytest.raises(ValueError, match="PROSPR_JAX_CPU_CONV_KERNELS"):
        cpu_conv.cpu_conv_kernels_enabled()
    monkeypatch.delenv(cpu_conv.rewrite.ENV_VAR)
    try:
        cpu_conv.set_cpu_conv_kernels(False)
        assert not cpu_conv.cpu_conv_kernels_enabled()
        with pytest.raises(TypeError, match="enabled"):
            cpu_conv.set_cpu_conv_kernels("yes")
    finally:
        cpu_conv.set_cpu_conv_kernels(None)
    assert cpu_conv.cpu_conv_kernels_enabled()


def test_the_library_name_digests_the_cpu(monkeypatch, tmp_path):
    from prospr_jax._src.cpu_conv import build

    monkeypatch.setenv("PROSPR_JAX_CACHE", str(tmp_path))
    calls = []
    monkeypatch.setattr(build.subprocess, "run", lambda cmd, **kw: calls.append(cmd) or
                        subprocess.CompletedProcess(cmd, 1, "", "no"))
    names = []
    for signature in ("cpu A avx2", "cpu B avx512f"):
        monkeypatch.setattr(build, "_cpu_signature", lambda s=signature: s)
        with pytest.raises(RuntimeError, match="compiling the CPU convolution kernels failed"):
            build._compile("c++", "/include")
        names.append({cmd[-1].rsplit("/", 1)[-1] for cmd in calls})
        calls.clear()
    assert names[0].isdisjoint(names[1])


def test_train_step_and_prospr_with_the_kernels_equal_the_programs_without(monkeypatch):
    import prospr_jax as pj
    from prospr_jax import models
    from prospr_jax.train import RECIPES, Trainer

    model = models.get("lenet5", num_classes=10)
    params, stats = models.init(model, jax.random.key(0), (1, 28, 28, 1))
    batch = {"image": jax.random.normal(jax.random.key(1), (8, 28, 28, 1)), "label": jnp.arange(8) % 10}
    batches = jax.tree_util.tree_map(lambda a: jnp.stack([a, a[::-1]]), batch)
    loss_fn = models.make_loss_fn(model, stats, train=True)
    recipe = RECIPES["prospr"].replace(batch_size=8)
    results = {}
    for on in (True, False):
        monkeypatch.setattr(cpu_conv.rewrite, "_override", None if on else False)
        trainer = Trainer(model, recipe, steps_per_epoch=10)
        assert trainer.conv_kernels is on
        state = trainer.init(params, stats, pj.dense_masks(params), rng=0)
        state, metrics = trainer.train_step(state, batch)
        hlo = trainer.train_step.lower(state, batch).as_text()
        assert ("prospr_conv2d" in hlo) is on
        results[on] = (state.params, metrics["loss"], trainer.eval_step(state, batch)["loss"],
                       pj.prospr_scores(loss_fn, params, batches, num_steps=1, lr=0.1))
    for a, b in zip(jax.tree_util.tree_leaves(results[False]), jax.tree_util.tree_leaves(results[True])):
        if float(jnp.max(jnp.abs(a))) == 0.0:  # e.g. scores of weights ProsPr does not score
            np.testing.assert_array_equal(np.asarray(b), np.asarray(a))
        else:
            _close(b, a, rtol=1e-4)
