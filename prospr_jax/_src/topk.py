"""Exact top-k selection: the ``k`` largest entries of a vector, ties to the lower index.

Sorting is slow on CPU (a 15M-entry sort takes seconds). :func:`top_k_flags` finds the k-th largest
value exactly by bisection on the bits of an order-preserving unsigned integer key (one counting pass
per bit: linear time), keeps every entry above it and, among the entries equal to it, the first ones
in index order. ``k`` is data, so one compiled program serves every k (iterative pruners change k
every round).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def top_k_flags(flat_scores: jax.Array, k: int) -> jax.Array:
    """Boolean vector with True at the ``k`` largest entries; ties go to the lower index."""
    n = flat_scores.shape[0]
    if k >= n:
        return jnp.ones((n,), bool)
    if k == 0:
        return jnp.zeros((n,), bool)
    return _top_k_flags_compiled(flat_scores, jnp.asarray(k, jnp.int32))


@jax.jit
def _top_k_flags_compiled(flat_scores: jax.Array, k: jax.Array) -> jax.Array:
    keys = order_keys(flat_scores)
    nbits = keys.dtype.itemsize * 8

    def add_bit(i, threshold):
        candidate = threshold | (jnp.ones((), keys.dtype) << (nbits - 1 - i).astype(keys.dtype))
        return jnp.where(jnp.sum(keys >= candidate, dtype=jnp.int32) >= k, candidate, threshold)

    threshold = jax.lax.fori_loop(0, nbits, add_bit, jnp.zeros((), keys.dtype))
    above = keys > threshold
    tied = keys == threshold
    room = k - jnp.sum(above, dtype=jnp.int32)
    return above | (tied & (jnp.cumsum(tied, dtype=jnp.int32) <= room))


def order_keys(values: jax.Array) -> jax.Array:
    """Unsigned integers ordered like the float ``values`` (``-0.0`` and ``0.0`` map to one key)."""
    if values.dtype != jnp.float64:
        values = values.astype(jnp.float32)
    uint, sint = (jnp.uint64, jnp.int64) if values.dtype == jnp.float64 else (jnp.uint32, jnp.int32)
    bits = jax.lax.bitcast_convert_type(values, sint)
    # -0.0 (the sign bit alone) becomes +0.0. Compared as integers, not floats: a float comparison
    # would treat subnormals as zero on CPUs that flush denormals, and tie them with 0.
    bits = jnp.where(bits == jnp.iinfo(sint).min, jnp.zeros((), sint), bits)
    ubits = jax.lax.bitcast_convert_type(bits, uint)
    sign = jnp.ones((), uint) << (values.dtype.itemsize * 8 - 1)
    return jnp.where(bits < 0, ~ubits, ubits | sign)


__all__ = ["order_keys", "top_k_flags"]
