"""canonicalize_convs computes the same function with channels-last convolutions only."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from prospr_jax._src.jaxpr.canonical_convs import _is_canonical, canonicalize_convs


def _conv_specs(jaxpr) -> list:
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "conv_general_dilated":
            found.append(eqn.params["dimension_numbers"])
        for value in eqn.params.values():
            for v in value if isinstance(value, tuple) else (value,):
                if isinstance(v, jax.extend.core.ClosedJaxpr):
                    found += _conv_specs(v.jaxpr)
                elif isinstance(v, jax.extend.core.Jaxpr):
                    found += _conv_specs(v)
    return found


@pytest.mark.parametrize(
    "strides,rhs_dilation,groups,padding",
    [((1, 1), (1, 1), 1, "SAME"), ((2, 2), (1, 1), 1, ((1, 1), (1, 1))), ((1, 2), (2, 1), 1, "VALID"),
     ((1, 1), (1, 1), 2, "SAME")],
)
def test_gradients_in_a_scan_are_unchanged_and_canonical(strides, rhs_dilation, groups, padding):
    # The claim is that the rewrite computes the same function (only the memory layout changes), so
    # it is checked in float64 on a well-conditioned problem: unit-variance inputs, kernels scaled by
    # 1/sqrt(fan_in) and a mean (not a sum) of squares keep every compared value O(0.1-1) through the
    # Hessian-vector product and both scan steps. In float32 the two programs legitimately differ by
    # a few ulps of each value's scale (their convolutions sum in different orders, which also varies
    # with the CPU and its thread count), so float32 could not tell a wrong rewrite from rounding.
    with jax.enable_x64(True):
        key = jax.random.key(0)
        x = jax.random.normal(key, (3, 9, 8, 4), jnp.float64)
        w1 = jax.random.normal(jax.random.fold_in(key, 1), (3, 3, 4 // groups, 6), jnp.float64)
        w1 = w1 / np.sqrt(3 * 3 * 4 // groups)  # fan-in scaling: O(1) pre-activations
        w2 = jax.random.normal(jax.random.fold_in(key, 2), (2, 2, 6, 5), jnp.float64) / np.sqrt(2 * 2 * 6)

        def loss(params, x):
            h = lax.conv_general_dilated(x, params[0], strides, padding, rhs_dilation=rhs_dilation,
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups)
            h = jnp.tanh(h)
            # A channels-first conv as well, to exercise arbitrary dimension numbers in the forward pass.
            h = lax.conv_general_dilated(jnp.transpose(h, (0, 3, 1, 2)), jnp.transpose(params[1], (3, 2, 0, 1)),
                                         (1, 1), "SAME", dimension_numbers=("NCHW", "OIHW", "NCHW"))
            return jnp.mean(h**2)

        def fn(params, xs):
            def body(p, x):
                g = jax.grad(loss)(p, x)
                hvp = jax.jvp(lambda q: jax.grad(loss)(q, x), (p,), (g,))[1]
                # lr 0.1 moves the kernels by about 1%: the second step runs at different weights.
                return jax.tree_util.tree_map(lambda a, b: a - 0.1 * b, p, hvp), g
            return lax.scan(body, params, xs)

        xs = jnp.stack([x, 0.5 * x])
        expected = jax.jit(fn)((w1, w2), xs)
        got = jax.jit(canonicalize_convs(fn))((w1, w2), xs)
        for a, b in zip(jax.tree_util.tree_leaves(expected), jax.tree_util.tree_leaves(got)):
            a, b = np.asarray(a), np.asarray(b)
            assert a.dtype == np.float64 and b.dtype == np.float64
            # Rounding: each value is a chain of at most a few thousand float64 multiply-adds of terms
            # no larger than the leaf's scale, so the two summation orders agree to well below
            # 1e-12 x scale (u = 1.1e-16). A wrong layout (a transposed or flipped kernel, swapped
            # spatial axes) changes values at the scale itself.
            scale = np.max(np.abs(a))
            assert scale > 1e-2
            np.testing.assert_allclose(b, a, rtol=1e-12, atol=1e-12 * scale)
        before = _conv_specs(jax.make_jaxpr(fn)((w1, w2), xs).jaxpr)
        after = _conv_specs(jax.make_jaxpr(canonicalize_convs(fn))((w1, w2), xs).jaxpr)
    assert any(not _is_canonical(dn) for dn in before)  # autodiff made non-canonical convolutions
    assert after and all(_is_canonical(dn) for dn in after)


@pytest.mark.parametrize(
    "options", [dict(implementation="hvp"), dict(implementation="unrolled"), dict(implementation="unrolled", remat=True)]
)
def test_every_convolution_of_the_scoring_program_is_canonical(options, monkeypatch):
    import prospr_jax as pj
    from prospr_jax._src import cpu_conv

    # What reaches XLA's convolution when the project's CPU kernels are off (tests/test_cpu_conv.py
    # checks the program with them on: no XLA convolution left at all).
    monkeypatch.setattr(cpu_conv.rewrite, "_override", False)

    key = jax.random.key(3)
    params = {"conv": {"kernel": jax.random.normal(key, (3, 3, 2, 4)) * 0.3},
              "dense": {"kernel": jax.random.normal(jax.random.fold_in(key, 1), (4, 3)) * 0.3}}
    batches = {"x": jax.random.normal(jax.random.fold_in(key, 2), (3, 5, 6, 6, 2)),
               "y": jax.random.normal(jax.random.fold_in(key, 3), (3, 5, 3))}

    def loss(p, b):
        h = lax.conv_general_dilated(b["x"], p["conv"]["kernel"], (2, 2), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return jnp.mean((jnp.tanh(h).mean(axis=(1, 2)) @ p["dense"]["kernel"] - b["y"]) ** 2)

    jaxpr = jax.make_jaxpr(lambda p, b: pj.meta_gradient(loss, p, b, num_steps=2, **options))(params, batches)
    specs = _conv_specs(jaxpr.jaxpr)
    assert len(specs) >= 3 and all(_is_canonical(dn) for dn in specs)


@pytest.mark.parametrize(
    "strides,rhs_dilation,padding,dims",
    [((1, 1), (1, 1), ((1, 1), (1, 1)), ("NHWC", "HWIO", "NHWC")),
     ((2, 2), (1, 1), ((1, 1), (1, 1)), ("NHWC", "HWIO", "NHWC")),
     ((2, 1), (1, 2), "VALID", ("NHWC", "HWIO", "NHWC")),
     ((1, 1), (1, 1), "SAME", ("NCHW", "OIHW", "NCHW"))],
)
def test_window_dots_compute_the_same_gradients(strides, rhs_dilation, padding, dims):
    # Window matmuls replace the weight-gradient convolutions (9 output positions) by dot_generals;
    # checked in float64 against the untouched program on a well-conditioned problem (unit inputs,
    # fan-in scaled kernel, a mean of squares: every value O(0.01-1)).
    with jax.enable_x64(True):
        key = jax.random.key(3)
        x = jax.random.normal(key, (4, 9, 8, 3), jnp.float64)
        w = jax.random.normal(jax.random.fold_in(key, 1), (3, 3, 3, 5), jnp.float64) / np.sqrt(27)
        lhs_t, rhs_t = ((0, 3, 1, 2), (3, 2, 0, 1)) if dims[0] == "NCHW" else ((0, 1, 2, 3), (0, 1, 2, 3))

        def loss(w, x):
            h = lax.conv_general_dilated(jnp.transpose(x, lhs_t), jnp.transpose(w, rhs_t), strides, padding,
                                         rhs_dilation=rhs_dilation, dimension_numbers=dims)
            return jnp.mean(jnp.tanh(h) ** 2)

        grad = jax.grad(loss, argnums=(0, 1))
        expected = jax.jit(grad)(w, x)
        rewritten = canonicalize_convs(grad, window_dots=True)
        got = jax.jit(rewritten)(w, x)
        for a, b in zip(expected, got):
            a, b = np.asarray(a), np.asarray(b)
            scale = np.max(np.abs(a))
            assert scale > 1e-3
            # Float64 sums of at most a few hundred O(scale) terms in another order: far below
            # 1e-12 x scale; a shifted window or swapped axis errs at the scale itself.
            np.testing.assert_allclose(b, a, rtol=1e-12, atol=1e-12 * scale)
        jaxpr = str(jax.make_jaxpr(rewritten)(w, x))
        untouched = str(jax.make_jaxpr(canonicalize_convs(grad))(w, x))
    assert "dot_general" in jaxpr and "dot_general" not in untouched
    # The input gradient (a convolution of the dilated output gradient) and, when it has more than
    # 9 positions, the forward convolution stay convolutions.
    assert "conv_general_dilated" in jaxpr


def test_window_dots_must_be_a_bool():
    with pytest.raises(TypeError, match="window_dots"):
        canonicalize_convs(lambda x: x, window_dots="yes")
