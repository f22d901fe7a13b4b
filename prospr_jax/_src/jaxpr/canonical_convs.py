"""Rewrite convolutions into the one layout every backend runs fast, inside loops too.

Autodiff of a convolution produces convolutions with unusual dimension numbers (the weight gradient
treats the batch as the contracted feature axis: ``f01b_i01o->01bf``; the input gradient swaps the
kernel's in/out axes: ``b01f_01oi->b01f``). XLA's CPU compiler turns those into its fast
channels-last form only in a program's entry computation, not inside ``while`` bodies, so a
gradient inside ``lax.scan`` ran about 30x slower than the same gradient outside one (ResNet-20,
batch 32: 7 s instead of 0.23 s; the known XLA issue jax-ml/jax#12868).

:func:`canonicalize_convs` wraps a function so that every ``conv_general_dilated`` it executes,
including those inside ``scan``/``while``/``cond`` bodies, is computed as

    transpose(operands) -> conv in [N, spatial..., C] x [spatial..., I, O] -> transpose(result)

which is the same mathematical operation (exactly: only the memory layout changes) in the layout
that XLA's fast convolution paths take. GPU and TPU compilers handle any layout, so this does not
hurt there. The function is traced once to a jaxpr and re-evaluated with the rewrite; apply it
OUTSIDE any autodiff (to the already differentiated function), since ``custom_jvp``/``custom_vjp``
rules are inlined to their primal computation.

Weight gradients as window matmuls. The weight gradient of a convolution is itself a convolution
whose "kernel" is the output gradient (as large as the image) and whose output is as small as the
kernel (3x3). XLA's CPU compiler runs it by transposing both activations to channels-first-like
layouts and a convolution with a 32x32 window. Written instead as one matmul per output position,

    out[b, p, o] = sum_{k, c} lhs_padded[b, p * stride + k * dilation, c] * rhs[o, c, k]

(``p`` one of the few output positions; the sum runs over the whole window and the features), each
a ``dot_general`` of a strided slice of the (padded) activations in their own layout with the output
gradient, it needs no transposes of the activations. It is opt-in (``window_dots=True``): measured
per shape on ResNet-20 (``python -m experiments.bench_cpu --convs``) it won only where XLA's
YNNPACK convolution path was slow, and switching that path off for the whole program
(:mod:`prospr_jax._src.cpu_options`) won by more.
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import Any, Callable, Optional

import jax
import jax.extend.core as jex
import jax.numpy as jnp
import numpy as np
from jax import lax

from prospr_jax._src.jaxpr.walk import reevaluated, retrace_params, walk
from prospr_jax._src.validate import check_bool


def _is_canonical(dn: lax.ConvDimensionNumbers) -> bool:
    n = len(dn.lhs_spec)
    spatial = tuple(range(1, n - 1))
    return (
        tuple(dn.lhs_spec) == (0, n - 1, *spatial)
        and tuple(dn.rhs_spec) == (n - 1, n - 2, *range(n - 2))
        and tuple(dn.out_spec) == (0, n - 1, *spatial)
    )


def _canonical_conv(lhs: jax.Array, rhs: jax.Array, **params: Any) -> jax.Array:
    dn: lax.ConvDimensionNumbers = params["dimension_numbers"]
    n = lhs.ndim
    lhs_order = (dn.lhs_spec[0], *dn.lhs_spec[2:], dn.lhs_spec[1])  # -> [N, spatial..., C]
    rhs_order = (*dn.rhs_spec[2:], dn.rhs_spec[1], dn.rhs_spec[0])  # -> [spatial..., I, O]
    out_logical = (dn.out_spec[0], *dn.out_spec[2:], dn.out_spec[1])
    canonical = lax.ConvDimensionNumbers(
        lhs_spec=(0, n - 1, *range(1, n - 1)),
        rhs_spec=(n - 1, n - 2, *range(n - 2)),
        out_spec=(0, n - 1, *range(1, n - 1)),
    )
    out = lax.conv_general_dilated_p.bind(
        lax.transpose(lhs, lhs_order),
        lax.transpose(rhs, rhs_order),
        **dict(params, dimension_numbers=canonical),
    )
    return lax.transpose(out, tuple(int(i) for i in np.argsort(out_logical)))


def _window_geometry(lhs_shape: tuple, rhs_shape: tuple, params: dict) -> Optional[tuple[list, list]]:
    """``(window sizes, output sizes)`` along the spatial axes, or ``None`` where window matmuls do not
    apply (grouped convolutions, dilated inputs: the transposed convolutions of input gradients)."""
    dn: lax.ConvDimensionNumbers = params["dimension_numbers"]
    if params["feature_group_count"] != 1 or params["batch_group_count"] != 1:
        return None
    if any(d != 1 for d in params["lhs_dilation"]):
        return None
    window = [rhs_shape[d] for d in dn.rhs_spec[2:]]
    out = []
    for d, k, (lo, hi), stride, dil in zip(
        dn.lhs_spec[2:], window, params["padding"], params["window_strides"], params["rhs_dilation"]
    ):
        span = lhs_shape[d] + lo + hi - (k - 1) * dil
        if span < 1:
            return None
        out.append((span - 1) // stride + 1)
    return window, out


# Weight-gradient convolutions of a 3x3 kernel have 9 output positions: at most this many positions
# are computed as window matmuls when asked for.
MAX_OUTPUT_POSITIONS = 9


def _conv_as_window_dots(lhs: jax.Array, rhs: jax.Array, **params: Any) -> jax.Array:
    """The convolution as one ``dot_general`` per output position (see the module docstring)."""
    dn: lax.ConvDimensionNumbers = params["dimension_numbers"]
    window, out_sizes = _window_geometry(lhs.shape, rhs.shape, params)
    lhs_spatial, rhs_spatial = dn.lhs_spec[2:], dn.rhs_spec[2:]
    pad_config = [(0, 0, 0)] * lhs.ndim
    for d, (lo, hi) in zip(lhs_spatial, params["padding"]):
        pad_config[d] = (lo, hi, 0)
    padded = lax.pad(lhs, jnp.zeros((), lhs.dtype), pad_config)
    contract = ((dn.lhs_spec[1], *lhs_spatial), (dn.rhs_spec[1], *rhs_spatial))
    per_position = []
    for position in itertools.product(*(range(n) for n in out_sizes)):
        start, limit, step = [0] * lhs.ndim, list(padded.shape), [1] * lhs.ndim
        for d, p, k, stride, dil in zip(lhs_spatial, position, window, params["window_strides"],
                                        params["rhs_dilation"]):
            start[d], limit[d], step[d] = p * stride, p * stride + (k - 1) * dil + 1, dil
        # [batch, out features]: the window's features and positions contracted with the kernel's.
        per_position.append(lax.dot_general(
            lax.slice(padded, start, limit, step), rhs, (contract, ((), ())),
            precision=params["precision"], preferred_element_type=params["preferred_element_type"],
        ))
    batch, features = per_position[0].shape
    out = jnp.stack(per_position, axis=-1).reshape(batch, features, *out_sizes)  # logical (b, f, spatial)
    return lax.transpose(out, tuple(int(i) for i in np.argsort(dn.out_spec)))


def _use_window_dots(eqn: Any, window_dots: bool) -> bool:
    if not window_dots:
        return False
    geometry = _window_geometry(*(v.aval.shape for v in eqn.invars), eqn.params)
    return geometry is not None and math.prod(geometry[1]) <= MAX_OUTPUT_POSITIONS


def _visit(window_dots: bool, eqn: Any, invals: list) -> list:
    if eqn.primitive.name == "conv_general_dilated":
        if _use_window_dots(eqn, window_dots):
            return [_conv_as_window_dots(*invals, **eqn.params)]
        if not _is_canonical(eqn.params["dimension_numbers"]):
            return [_canonical_conv(*invals, **eqn.params)]
    # Loop and conditional bodies are rewritten too (that is where the slow layouts hurt).
    out = eqn.primitive.bind(*invals, **retrace_params(eqn.params, functools.partial(_eval, window_dots=window_dots)))
    return out if eqn.primitive.multiple_results else [out]


def _eval(jaxpr: jex.Jaxpr, consts: Any, *args: Any, window_dots: bool) -> list[Any]:
    return walk(jaxpr, consts, args, functools.partial(_visit, window_dots))


def canonicalize_convs(fn: Callable[..., Any], *, window_dots: bool = False) -> Callable[..., Any]:
    """``fn`` with every convolution computed in channels-last layout (see the module docstring).

    Args:
      fn: any function of arrays (pytrees) whose convolutions are to be rewritten.
      window_dots: compute the weight-gradient-like convolutions (at most ``MAX_OUTPUT_POSITIONS``
        output positions, no input dilation, no groups) as window matmuls. Default ``False``: on
        XLA's CPU backend they were measured slower than its convolutions once the YNNPACK
        convolution path is off (:mod:`prospr_jax._src.cpu_options`); see the README's performance
        section.

    Same arguments, same results (up to the summation order of the convolution algorithm or of the
    matmuls). Trace-time only: the returned function is meant to be called inside ``jax.jit``.
    """
    window_dots = check_bool(window_dots, "window_dots")

    return reevaluated(fn, functools.partial(_eval, window_dots=window_dots))
