"""FLOPs and latency of a compiled function, measured, not counted by hand.

:func:`compiled_flops` asks XLA: the function is lowered and compiled for the current backend and the
compiler's cost analysis reports the floating-point operations of the whole program (a multiply-add
counts 2; elementwise ops, reductions and BatchNorm arithmetic count too). The same call works on CPU,
GPU and TPU; the figure is the backend's own (fusions may change it slightly between backends).

:func:`latency_ms` runs the compiled function and reports the median wall time of a call with the
result ready (``block_until_ready``), after warm-up calls that absorb compilation and caches.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Mapping

import jax

from prospr_jax._src.validate import check_int


def _cost(compiled: Any) -> Mapping[str, float]:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax: one dict per computation
        cost = cost[0] if cost else {}
    return cost or {}


def compiled_flops(fn: Callable[..., Any], *args: Any) -> float:
    """Floating-point operations of one call ``fn(*args)`` by XLA's cost analysis of the compiled
    program (``args`` may be arrays or ``jax.ShapeDtypeStruct``).

    Raises:
      ValueError: the backend reports no FLOP count.
    """
    compiled = jax.jit(fn).lower(*args).compile()
    cost = _cost(compiled)
    if "flops" not in cost:
        raise ValueError(f"the {jax.default_backend()} backend's cost analysis reports no 'flops' (keys: {sorted(cost)})")
    return float(cost["flops"])


def latency_ms(fn: Callable[..., Any], *args: Any, repeats: int = 10, warmup: int = 2) -> float:
    """Median wall time in milliseconds of ``jax.jit(fn)(*args)`` with the result ready.

    Args:
      fn: the function (jitted here).
      args: its arguments (concrete arrays).
      repeats: timed calls (>= 1).
      warmup: untimed calls first (>= 1; the first compiles).
    """
    return interleaved_latency_ms({"fn": (fn, args)}, repeats=repeats, warmup=warmup)["fn"]


def interleaved_latency_ms(
    calls: Mapping[str, tuple[Callable[..., Any], tuple]], *, repeats: int = 10, warmup: int = 2
) -> dict[str, float]:
    """Median wall times in milliseconds of several jitted calls, timed in turns (a, b, c, a, b, c, ...)
    so that all of them see the same load on a shared machine; their ratios are what to read.

    Args:
      calls: ``{name: (fn, args)}``; each ``fn`` is jitted here and called as ``fn(*args)``.
      repeats: timed rounds (>= 1).
      warmup: untimed calls of each first (>= 1; the first compiles).
    """
    repeats = check_int(repeats, "repeats", low=1)
    warmup = check_int(warmup, "warmup", low=1)
    compiled = {name: (jax.jit(fn), args) for name, (fn, args) in calls.items()}
    for fn, args in compiled.values():
        for _ in range(warmup):
            jax.block_until_ready(fn(*args))
    times: dict[str, list[float]] = {name: [] for name in compiled}
    for _ in range(repeats):
        for name, (fn, args) in compiled.items():
            began = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[name].append(1000.0 * (time.perf_counter() - began))
    return {name: float(statistics.median(t)) for name, t in times.items()}


__all__ = ["compiled_flops", "interleaved_latency_ms", "latency_ms"]
