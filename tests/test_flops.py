"""FLOPs from XLA's cost analysis against counts by hand; latency is a positive time."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from prospr_jax._src.flops import compiled_flops, interleaved_latency_ms, latency_ms


def test_dense_flops_match_a_count_by_hand():
    # x [4, 6] @ w [6, 5]: 4 * 5 outputs, each 6 multiply-adds (2 FLOPs each).
    assert compiled_flops(lambda x, w: x @ w, jnp.ones((4, 6)), jnp.ones((6, 5))) == 2 * 4 * 5 * 6


def test_conv_flops_match_a_count_by_hand_and_shrink_with_channels():
    def conv(x, k):
        return lax.conv_general_dilated(x, k, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))

    # [2, 6, 6, 3] * [3, 3, 3, 4] VALID: 2 * 4 * 4 outputs per channel, 4 channels, 27 multiply-adds each.
    full = compiled_flops(conv, jax.ShapeDtypeStruct((2, 6, 6, 3), jnp.float32), jax.ShapeDtypeStruct((3, 3, 3, 4), jnp.float32))
    assert full == 2 * (2 * 4 * 4 * 4) * 27
    half = compiled_flops(conv, jnp.ones((2, 6, 6, 3)), jnp.ones((3, 3, 3, 2)))
    assert half == full / 2


def test_latency_is_a_positive_time():
    ms = latency_ms(lambda x: (x @ x).sum(), jnp.ones((32, 32)), repeats=3)
    assert 0.0 < ms < 10_000.0


def test_interleaved_latencies_rank_a_small_and_a_large_product():
    # 8^3 against 768^3 multiply-adds: six orders of magnitude apart, whatever the machine's load.
    ms = interleaved_latency_ms({"small": (lambda x: (x @ x).sum(), (jnp.ones((8, 8)),)),
                                 "large": (lambda x: (x @ x @ x).sum(), (jnp.ones((768, 768)),))}, repeats=3)
    assert set(ms) == {"small", "large"} and 0.0 < ms["small"] < ms["large"]
