"""The CPU compiler options of the project's programs: what they are, when they apply, same results."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from prospr_jax._src import cpu_options


@pytest.fixture
def fresh_options():
    cpu_options.cpu_compiler_options.cache_clear()
    yield cpu_options.cpu_compiler_options
    cpu_options.cpu_compiler_options.cache_clear()


def _conv_net_loss(params, x):
    h = lax.conv_general_dilated(x, params["w1"], (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
    h = jnp.tanh(h)
    h = lax.conv_general_dilated(h, params["w2"], (2, 2), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jnp.mean(h**2)


def _params(key):
    # Fan-in scaled kernels: O(1) activations, O(0.01-1) gradients.
    return {"w1": jax.random.normal(key, (3, 3, 4, 8)) / np.sqrt(36),
            "w2": jax.random.normal(jax.random.fold_in(key, 1), (3, 3, 8, 8)) / np.sqrt(72)}


def _ynn_convolutions(hlo: str) -> int:
    """Number of YNNPACK fusions of a compiled HLO text whose body holds a convolution."""
    called = re.findall(r'calls=(%[\w.\-]+), backend_config=\{"fusion_config":\{"kind":"__ynn_fusion"', hlo)
    bodies = {m.group(1): m.group(2) for m in re.finditer(r"\n(%[\w.\-]+) \([^\n]*\{\n(.*?)\n\}", hlo, re.S)}
    return sum(" convolution(" in bodies.get(name, "") for name in called)


def test_options_on_cpu_keep_convolutions_out_of_ynnpack(fresh_options, monkeypatch):
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    options = fresh_options()
    if jax.default_backend() != "cpu":
        assert options == {}
        return
    if not options:
        pytest.skip("this jaxlib does not know the YNNPACK fusion option")
    assert set(options) == {cpu_options.YNN_FUSION_OPTION}
    assert "INDIVIDUAL_CONVOLUTION" not in options[cpu_options.YNN_FUSION_OPTION]
    params, x = _params(jax.random.key(0)), jax.random.normal(jax.random.key(1), (4, 8, 8, 4))
    grad = jax.grad(_conv_net_loss)
    hlo = cpu_options.jit(grad).lower(params, x).compile().as_text()
    assert _ynn_convolutions(hlo) == 0
    assert " convolution(" in hlo  # the convolutions are still there, compiled by XLA itself


def test_the_users_xla_flags_win(fresh_options, monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", f"--{cpu_options.YNN_FUSION_OPTION}=-individual_convolution")
    assert fresh_options() == {}


def test_results_equal_with_and_without_the_options():
    # Same program, another convolution library: float32 results agree to rounding. Each gradient
    # entry is a sum of at most 4 x 8 x 8 x 72 products of O(1) terms (divided by the element count),
    # so two summation orders differ by far less than 1e-4 of the largest entry; a wrong
    # convolution would differ at that scale itself.
    params, x = _params(jax.random.key(2)), jax.random.normal(jax.random.key(3), (4, 8, 8, 4))
    grad = jax.grad(_conv_net_loss)
    expected = jax.jit(grad)(params, x)
    got = cpu_options.jit(grad)(params, x)
    for name in params:
        a, b = np.asarray(expected[name]), np.asarray(got[name])
        scale = np.max(np.abs(a))
        assert scale > 1e-3
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4 * scale)


def test_a_program_with_options_can_be_called_inside_another_jit():
    # jax refuses compiler options on a nested jit: the project's jitted programs (the train step,
    # ProsPr's meta-gradient) must still work inside a user's jax.jit, with traced or closed-over values.
    params, x = _params(jax.random.key(4)), jax.random.normal(jax.random.key(5), (2, 8, 8, 4))
    loss = cpu_options.jit(_conv_net_loss)
    expected = float(loss(params, x))
    assert float(jax.jit(loss)(params, x)) == pytest.approx(expected, rel=1e-5)
    assert float(jax.jit(lambda: loss(params, x))()) == pytest.approx(expected, rel=1e-5)
    assert float(jax.jit(jax.grad(lambda p: loss(p, x)))(params)["w1"].sum()) == pytest.approx(
        float(jax.grad(_conv_net_loss)(params, x)["w1"].sum()), rel=1e-4, abs=1e-6)
