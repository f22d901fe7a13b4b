"""Run a function's convolutions through the project's CPU kernels: :func:`with_cpu_conv_kernels`.

The function (a loss, a forward pass) is traced to a jaxpr and evaluated again with every
convolution of the form flax's ``nn.Conv`` emits (2-D, NHWC / HWIO, float32, no dilation, no groups)
replaced by :data:`~prospr_jax._src.cpu_conv.primitives.conv2d_p`. Apply it BEFORE differentiating:
gradients, Hessian-vector products and ProsPr's meta-gradient of the rewritten function then consist
of the three kernel primitives only (their derivative rules map into each other).

What the rewrite keeps: custom derivative rules (``jax.custom_jvp``/``custom_vjp`` functions, such as
``jax.nn.relu``, are re-bound as they are, with their rules; convolutions inside them stay XLA's),
rematerialisation (``jax.checkpoint`` bodies are rewritten and checkpointed again with the same
policy), loops and conditionals (their bodies are rewritten). Nested ``jax.jit`` calls are inlined.

:func:`cpu_conv_kernels_enabled` decides whether the project's own programs (the masked train step
of :class:`prospr_jax.train.Trainer`, ProsPr's meta-gradient) use the kernels: on the CPU backend
when they compile (:mod:`.build`), unless ``PROSPR_JAX_CPU_CONV_KERNELS=0`` or
:func:`set_cpu_conv_kernels` turned them off.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Optional

import jax
import jax.extend.core as jex
import jax.numpy as jnp

from prospr_jax._src.cpu_conv.build import kernels_available
from prospr_jax._src.cpu_conv.primitives import conv2d_p
from prospr_jax._src.jaxpr.walk import CALL_PRIMITIVES, CUSTOM_DERIVATIVE_PRIMITIVES, reevaluated, retrace_params, walk

ENV_VAR = "PROSPR_JAX_CPU_CONV_KERNELS"
_REMAT = frozenset({"remat", "remat2", "checkpoint"})
# Calls inlined by the rewrite: not the custom-derivative ones (their rules must survive) nor remat.
_INLINE = CALL_PRIMITIVES - CUSTOM_DERIVATIVE_PRIMITIVES - _REMAT
_NHWC_HWIO = ((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))

_override: Optional[bool] = None


def set_cpu_conv_kernels(enabled: Optional[bool]) -> None:
    """Turn the project's CPU convolution kernels on (where available) or off for this process;
    ``None`` restores the default (the ``PROSPR_JAX_CPU_CONV_KERNELS`` variable, else on). Programs
    already compiled keep what they were compiled with."""
    global _override
    if enabled is not None and not isinstance(enabled, bool):
        raise TypeError(f"`enabled` must be True, False or None, got {enabled!r}")
    _override = enabled


def cpu_conv_kernels_enabled() -> bool:
    """Whether the project's programs run their convolutions through the CPU kernels (see the module
    docstring); compiles the kernels at the first call on CPU."""
    if _override is False:
        return False
    if _override is None:
        value = os.environ.get(ENV_VAR, "1").strip().lower()
        if value not in ("0", "1", "false", "true", "off", "on"):
            raise ValueError(f"{ENV_VAR} must be 0/1 (or false/true, off/on), got {value!r}")
        if value in ("0", "false", "off"):
            return False
    return jax.default_backend() == "cpu" and kernels_available()


def _is_supported(eqn: Any) -> bool:
    p = eqn.params
    lhs, rhs = (v.aval for v in eqn.invars)
    dn = p["dimension_numbers"]
    return (
        lhs.ndim == 4 and rhs.ndim == 4
        and lhs.dtype == jnp.float32 and rhs.dtype == jnp.float32
        and (tuple(dn.lhs_spec), tuple(dn.rhs_spec), tuple(dn.out_spec)) == _NHWC_HWIO
        and tuple(p["lhs_dilation"]) == (1, 1) and tuple(p["rhs_dilation"]) == (1, 1)
        and p["feature_group_count"] == 1 and p["batch_group_count"] == 1
        and p.get("preferred_element_type") in (None, jnp.float32)
        and all(lo >= 0 and hi >= 0 for lo, hi in p["padding"])
        and all(k <= i + lo + hi for k, i, (lo, hi) in zip(rhs.shape[:2], lhs.shape[1:3], p["padding"]))
    )


def _visit(eqn: Any, invals: list) -> list:
    name = eqn.primitive.name
    if name == "conv_general_dilated" and _is_supported(eqn):
        p = eqn.params
        return [conv2d_p.bind(*invals, strides=tuple(p["window_strides"]),
                              padding=tuple(tuple(int(v) for v in pad) for pad in p["padding"]))]
    if name in _REMAT:
        body = eqn.params["jaxpr"]
        fn = jax.checkpoint(lambda *args: _evaluate(body, [], *args), prevent_cse=eqn.params["prevent_cse"],
                            policy=eqn.params["policy"])
        return list(fn(*invals))
    if name in CUSTOM_DERIVATIVE_PRIMITIVES:
        out = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
    else:  # loop and conditional bodies are rewritten too
        out = eqn.primitive.bind(*invals, **retrace_params(eqn.params, _evaluate))
    return out if eqn.primitive.multiple_results else [out]


def _evaluate(jaxpr: jex.Jaxpr, consts: Any, *args: Any) -> list[Any]:
    return walk(jaxpr, consts, args, _visit, inline=_INLINE)


def with_cpu_conv_kernels(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` with its float32 NHWC/HWIO convolutions run by the project's CPU kernels.

    Args:
      fn: a function of arrays (pytrees of arrays) to differentiate or evaluate, e.g. a
        ``loss_fn(params, batch) -> scalar`` of a flax model.

    Returns:
      A function with the same arguments and results, equal to float32 rounding (the kernels sum in
      another order than XLA), to be called under ``jax.jit`` and differentiated as usual. Off CPU, or
      where the kernels are unavailable, the primitives compute XLA's convolution: the rewrite is
      always correct, and only on CPU is it faster (README, CPU performance).
    """
    return reevaluated(fn, _evaluate)


__all__ = ["ENV_VAR", "cpu_conv_kernels_enabled", "set_cpu_conv_kernels", "with_cpu_conv_kernels"]
