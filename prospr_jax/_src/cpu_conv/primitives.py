"""Three convolution primitives, closed under differentiation, run by the project's CPU kernels.

In the notation of a convolution with strides ``s`` and low padding ``p`` (per spatial axis)

    y[n, oh, ow, o] = sum_{kh, kw, i} x[n, oh*s + kh - p, ow*s + kw - p, i] * k[kh, kw, i, o]

(``x`` zero outside the image; layouts NHWC / HWIO / NHWC, flax's), the three bilinear maps are

* :data:`conv2d_p` ``(x, k) -> y`` (the forward convolution),
* :data:`conv2d_input_grad_p` ``(g, k) -> x``-shaped: the transpose of ``x -> conv2d(x, k)`` at ``g``,
* :data:`conv2d_kernel_grad_p` ``(x, g) -> k``-shaped: the transpose of ``k -> conv2d(x, k)`` at ``g``.

The transpose of each with respect to either operand is one of the three (for instance the input
gradient's transpose in the kernel is ``conv2d_kernel_grad(ct, g)``), so gradients, Hessian-vector
products (forward over reverse) and ProsPr's gradient through SGD steps (reverse over reverse) stay
in these primitives however deep the differentiation goes. Their JVPs follow from bilinearity.

Lowering: on CPU, when the kernels are available (:mod:`.build`), each is one XLA FFI call
(``conv2d.cc``; the input gradient is its forward convolution over the output gradient dilated by the
strides, with the kernel flipped and its in/out axes swapped); otherwise, and on every other backend,
XLA's own ``conv_general_dilated`` computes the same map. Under ``jax.vmap`` they run as a vmapped
XLA convolution (correct, not accelerated). Only float32 is supported by the kernels; the rewrite
(:mod:`.rewrite`) inserts these primitives only for float32 convolutions.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.extend.core as jex
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.interpreters import ad, batching, mlir

from prospr_jax._src.cpu_conv.build import kernels_available

_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")

conv2d_p = jex.Primitive("prospr_conv2d")
conv2d_input_grad_p = jex.Primitive("prospr_conv2d_input_grad")
conv2d_kernel_grad_p = jex.Primitive("prospr_conv2d_kernel_grad")


def output_hw(input_hw: tuple, kernel_hw: tuple, strides: tuple, padding: tuple) -> tuple[int, int]:
    """Output height and width of the convolution (``padding``: ``((lo, hi), (lo, hi))``)."""
    return tuple((i + lo + hi - k) // s + 1 for i, k, s, (lo, hi) in zip(input_hw, kernel_hw, strides, padding))


# --- XLA's convolution: the reference, and the lowering off CPU --------------------------------------

def _xla_conv2d(x: jax.Array, k: jax.Array, *, strides: tuple, padding: tuple) -> jax.Array:
    return lax.conv_general_dilated(x, k, strides, padding, dimension_numbers=_DIMENSION_NUMBERS)


def _xla_input_grad(g: jax.Array, k: jax.Array, *, strides: tuple, padding: tuple, input_hw: tuple) -> jax.Array:
    x = jnp.zeros((g.shape[0], *input_hw, k.shape[2]), g.dtype)
    return jax.vjp(lambda x: _xla_conv2d(x, k, strides=strides, padding=padding), x)[1](g)[0]


def _xla_kernel_grad(x: jax.Array, g: jax.Array, *, strides: tuple, padding: tuple, kernel_hw: tuple) -> jax.Array:
    k = jnp.zeros((*kernel_hw, x.shape[3], g.shape[3]), x.dtype)
    return jax.vjp(lambda k: _xla_conv2d(x, k, strides=strides, padding=padding), k)[1](g)[0]


# --- the FFI kernels ------------------------------------------------------------------------------

def _forward_call(x: jax.Array, k: jax.Array, out_hw: tuple, strides: tuple, dilation: tuple, low: tuple) -> jax.Array:
    out = jax.ShapeDtypeStruct((x.shape[0], *out_hw, k.shape[3]), x.dtype)
    return jax.ffi.ffi_call("prospr_conv2d_forward", out)(
        x, k, sh=np.int64(strides[0]), sw=np.int64(strides[1]), dh=np.int64(dilation[0]),
        dw=np.int64(dilation[1]), ph=np.int64(low[0]), pw=np.int64(low[1]),
    )


def _ffi_conv2d(x: jax.Array, k: jax.Array, *, strides: tuple, padding: tuple) -> jax.Array:
    out_hw = output_hw(x.shape[1:3], k.shape[:2], strides, padding)
    return _forward_call(x, k, out_hw, strides, (1, 1), (padding[0][0], padding[1][0]))


def _ffi_input_grad(g: jax.Array, k: jax.Array, *, strides: tuple, padding: tuple, input_hw: tuple) -> jax.Array:
    # x[ih] = sum_kh g_dilated[ih + p - kh] k[kh]: a stride-1 convolution of the output gradient dilated
    # by the strides, with the kernel flipped (kh -> KH-1-kh) and its in/out axes swapped.
    flipped = jnp.transpose(k[::-1, ::-1], (0, 1, 3, 2))
    low = (k.shape[0] - 1 - padding[0][0], k.shape[1] - 1 - padding[1][0])
    return _forward_call(g, flipped, tuple(input_hw), (1, 1), strides, low)


def _ffi_kernel_grad(x: jax.Array, g: jax.Array, *, strides: tuple, padding: tuple, kernel_hw: tuple) -> jax.Array:
    out = jax.ShapeDtypeStruct((*kernel_hw, x.shape[3], g.shape[3]), x.dtype)
    return jax.ffi.ffi_call("prospr_conv2d_kernel_grad", out)(
        x, g, sh=np.int64(strides[0]), sw=np.int64(strides[1]), ph=np.int64(padding[0][0]),
        pw=np.int64(padding[1][0]),
    )


# --- shapes, evaluation, lowering, batching, differentiation -----------------------------------------

def _conv2d_shape(x: Any, k: Any, *, strides: tuple, padding: tuple) -> jax.core.ShapedArray:
    return jax.core.ShapedArray((x.shape[0], *output_hw(x.shape[1:3], k.shape[:2], strides, padding), k.shape[3]),
                                x.dtype)


def _input_grad_shape(g: Any, k: Any, *, strides: tuple, padding: tuple, input_hw: tuple) -> jax.core.ShapedArray:
    return jax.core.ShapedArray((g.shape[0], *input_hw, k.shape[2]), g.dtype)


def _kernel_grad_shape(x: Any, g: Any, *, strides: tuple, padding: tuple, kernel_hw: tuple) -> jax.core.ShapedArray:
    return jax.core.ShapedArray((*kernel_hw, x.shape[3], g.shape[3]), x.dtype)


@functools.lru_cache(maxsize=None)
def _jitted_bind(prim: jex.Primitive, params: tuple) -> Any:
    return jax.jit(functools.partial(prim.bind, **dict(params)))


def _impl(prim: jex.Primitive, *args: Any, **params: Any) -> Any:
    """Eager evaluation: the primitive compiled on its own (cached per parameters)."""
    return _jitted_bind(prim, tuple(sorted(params.items())))(*args)


def _cpu_lowering(ffi_fn: Any, xla_fn: Any) -> Any:
    ffi_rule = mlir.lower_fun(ffi_fn, multiple_results=False)
    xla_rule = mlir.lower_fun(xla_fn, multiple_results=False)

    def rule(ctx: Any, *args: Any, **params: Any) -> Any:
        return (ffi_rule if kernels_available() else xla_rule)(ctx, *args, **params)

    return rule


def _batching_rule(xla_fn: Any) -> Any:
    def rule(args: Any, dims: Any, **params: Any) -> Any:
        return jax.vmap(functools.partial(xla_fn, **params), in_axes=tuple(dims))(*args), 0

    return rule


for _prim, _shape, _ffi, _xla in (
    (conv2d_p, _conv2d_shape, _ffi_conv2d, _xla_conv2d),
    (conv2d_input_grad_p, _input_grad_shape, _ffi_input_grad, _xla_input_grad),
    (conv2d_kernel_grad_p, _kernel_grad_shape, _ffi_kernel_grad, _xla_kernel_grad),
):
    _prim.def_abstract_eval(_shape)
    _prim.def_impl(functools.partial(_impl, _prim))
    mlir.register_lowering(_prim, mlir.lower_fun(_xla, multiple_results=False))
    mlir.register_lowering(_prim, _cpu_lowering(_ffi, _xla), platform="cpu")
    batching.primitive_batchers[_prim] = _batching_rule(_xla)


def _hw(operand: Any, axes: slice) -> tuple:
    return tuple(operand.aval.shape[axes])


# Transposes (cotangent ct of the result; the operand being transposed is an undefined primal).
ad.defbilinear(
    conv2d_p,
    lambda ct, x, k, **p: conv2d_input_grad_p.bind(ct, k, input_hw=_hw(x, slice(1, 3)), **p),
    lambda ct, x, k, **p: conv2d_kernel_grad_p.bind(x, ct, kernel_hw=_hw(k, slice(0, 2)), **p),
)
ad.defbilinear(
    conv2d_input_grad_p,
    lambda ct, g, k, *, input_hw, **p: conv2d_p.bind(ct, k, **p),
    lambda ct, g, k, *, input_hw, **p: conv2d_kernel_grad_p.bind(ct, g, kernel_hw=_hw(k, slice(0, 2)), **p),
)
ad.defbilinear(
    conv2d_kernel_grad_p,
    lambda ct, x, g, *, kernel_hw, **p: conv2d_input_grad_p.bind(g, ct, input_hw=_hw(x, slice(1, 3)), **p),
    lambda ct, x, g, *, kernel_hw, **p: conv2d_p.bind(x, ct, **p),
)


def conv2d(x: jax.Array, k: jax.Array, strides: tuple = (1, 1), padding: tuple = ((0, 0), (0, 0))) -> jax.Array:
    """``lax.conv_general_dilated(x, k, strides, padding, dimension_numbers=('NHWC', 'HWIO', 'NHWC'))``
    through :data:`conv2d_p` (float32; ``padding`` as ``((lo, hi), (lo, hi))``)."""
    strides = tuple(int(s) for s in strides)
    padding = tuple((int(lo), int(hi)) for lo, hi in padding)
    return conv2d_p.bind(x, k, strides=strides, padding=padding)


__all__ = ["conv2d", "conv2d_input_grad_p", "conv2d_kernel_grad_p", "conv2d_p", "output_hw"]
