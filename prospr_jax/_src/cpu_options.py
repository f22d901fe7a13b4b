"""XLA compiler options under which this project's programs run faster on CPU.

XLA's CPU backend (jaxlib 0.10) hands convolutions to YNNPACK. For the weight gradient of a
convolution (a "convolution" whose window is the whole 32x32 image and whose output is the 3x3
kernel) that path is slow: it transposes both activations and runs a huge-window convolution. On
ResNet-20 (batch 128, 1 thread) the weight gradient of a 32x32, 16 -> 16 channel conv took about
230 ms through YNNPACK and 45 ms through XLA's own convolution; the whole gradient went from about
5.0 s to 2.6 s with the option below, the forward pass unchanged within the noise
(``python -m experiments.bench_cpu``; the README's performance section has the figures).

:func:`cpu_compiler_options` keeps YNNPACK for dots, elementwise operations and reductions and takes
convolutions away from it, for the programs this project compiles itself (the masked train step
of :class:`prospr_jax.train.Trainer`, ProsPr's meta-gradient). Where those programs run their
convolutions through the project's own kernels (:mod:`prospr_jax._src.cpu_conv`), elementwise
fusions are taken away from YNNPACK as well: XLA's loop fusions then absorb the broadcasts of
BatchNorm's per-channel factors, which a YNNPACK fusion needs materialised at full activation size
(ResNet-20 train step, batch 128, 2 threads: 456 -> 414 ms, interleaved in one process). It is ``{}``
(XLA's defaults):

* on any backend other than CPU;
* when ``XLA_FLAGS`` already sets ``--xla_cpu_experimental_ynn_fusion_type`` (the user's choice wins);
* when this jaxlib does not know the option (it is experimental and may be renamed).

Options apply to the program they are compiled with: a project function called inside the user's
own ``jax.jit`` is compiled with that outer jit's options.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp

from prospr_jax._src.cpu_conv import cpu_conv_kernels_enabled
from prospr_jax._src.tree import any_traced

YNN_FUSION_OPTION = "xla_cpu_experimental_ynn_fusion_type"
# Every YNNPACK fusion type but LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION.
YNN_WITHOUT_CONVOLUTIONS = ",".join(
    f"LIBRARY_FUSION_TYPE_{kind}" for kind in ("DOT", "ELTWISE", "REDUCE", "INDIVIDUAL_DOT")
)
# With the project's own convolution kernels: elementwise fusions back to XLA's loop emitter too.
YNN_DOTS_AND_REDUCTIONS = ",".join(f"LIBRARY_FUSION_TYPE_{kind}" for kind in ("DOT", "REDUCE", "INDIVIDUAL_DOT"))


@functools.cache
def cpu_compiler_options() -> dict[str, str]:
    """The compiler options of the project's jitted programs on this backend (see the module docstring).

    Decided once per process, at the first call (after the backend is initialised).
    """
    if jax.default_backend() != "cpu":
        return {}
    if YNN_FUSION_OPTION in os.environ.get("XLA_FLAGS", ""):
        return {}
    kinds = YNN_DOTS_AND_REDUCTIONS if cpu_conv_kernels_enabled() else YNN_WITHOUT_CONVOLUTIONS
    options = {YNN_FUSION_OPTION: kinds}
    try:
        jax.jit(lambda x: x + 1, compiler_options=options).lower(jnp.zeros((), jnp.float32)).compile()
    except Exception:  # an unknown option or enum value in this jaxlib: XLA's defaults
        return {}
    return options


class _JitWithOptions:
    """``jax.jit(fn)`` compiled with compiler options when called at the top level; a plain nested
    ``jax.jit`` when called inside another trace (jax accepts options only at the top level)."""

    def __init__(self, fn: Callable[..., Any], options: dict[str, str], **jit_kwargs: Any) -> None:
        self._top = jax.jit(fn, compiler_options=options, **jit_kwargs)
        self._nested = jax.jit(fn, **jit_kwargs)
        functools.update_wrapper(self, fn)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if any_traced((args, kwargs)):
            return self._nested(*args, **kwargs)
        try:
            return self._top(*args, **kwargs)
        except ValueError as e:  # inside a trace through closed-over values only
            if "compiler_options" not in str(e):
                raise
            return self._nested(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:  # lower, trace, eval_shape, ... of the top-level jit
        return getattr(self._top, name)


def jit(fn: Callable[..., Any], **jit_kwargs: Any) -> Callable[..., Any]:
    """``jax.jit(fn, **jit_kwargs)``, compiled with :func:`cpu_compiler_options` when called at the top
    level (inside another ``jax.jit`` it is inlined into that program, compiled with its options)."""
    options = cpu_compiler_options()
    if not options:
        return jax.jit(fn, **jit_kwargs)
    return _JitWithOptions(fn, options, **jit_kwargs)


__all__ = ["YNN_DOTS_AND_REDUCTIONS", "YNN_FUSION_OPTION", "YNN_WITHOUT_CONVOLUTIONS", "cpu_compiler_options", "jit"]
