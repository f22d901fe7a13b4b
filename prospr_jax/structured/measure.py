"""What compaction buys: parameters, FLOPs (XLA's cost analysis) and latency, dense vs compact."""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp

from prospr_jax._src.flops import compiled_flops, interleaved_latency_ms
from prospr_jax._src.tree import PyTree
from prospr_jax.structured.compaction import CompactModel, param_count


def compaction_effect(
    apply_fn: Callable[..., Any],
    params: PyTree,
    state: PyTree,
    model: CompactModel | Callable[..., Any],
    small_params: PyTree,
    small_state: PyTree,
    input_shape: Sequence[int],
    *,
    batch_sizes: Sequence[int] = (1, 128),
    repeats: int = 10,
    others: Optional[Mapping[str, tuple[Callable[..., Any], PyTree, PyTree]]] = None,
) -> dict[str, Any]:
    """Parameter counts, FLOPs per example and inference latency of the dense and the compact model.

    Args:
      apply_fn, params, state: the dense model ``apply_fn(params, state, x, train)``.
      model, small_params, small_state: what :func:`prospr_jax.structured.compact` returned, or an
        ``apply_fn(params, state, x, train)`` of another compact model (e.g. the narrowed zoo Module of
        :func:`prospr_jax.models.compact_module` through :func:`prospr_jax.flax_apply_fn`) and its
        variables.
      input_shape: one example's shape, e.g. ``(32, 32, 3)``.
      batch_sizes: the batch sizes timed (inference mode, float32 inputs).
      repeats: timed calls per measurement (the median is reported); the dense and the compact model
        (and ``others``) are timed in turns, so that their ratio is robust to the load of a shared machine.
      others: more compact models to measure beside them, ``{name: (apply_fn, params, state)}`` (e.g.
        one rounded to multiples of 8 channels): ``params_<name>``, ``flops_<name>`` and a latency in
        each batch size's entry.

    Returns:
      ``{'params_dense', 'params_compact', 'flops_dense', 'flops_compact'`` (per example, from the
      compiled batch-1 forward pass), ``'latency_ms': {batch: {'dense', 'compact'}}}``, and the same
      entries for ``others``.
    """
    small_apply = model.apply if isinstance(model, CompactModel) else model
    variants = {"dense": (apply_fn, params, state), "compact": (small_apply, small_params, small_state),
              **(others or {})}
    # Inference-mode calls ``f(params, state, x)`` of every model, with its variables.
    calls = {name: (lambda p, s, x, f=f: f(p, s, x, False), p, s) for name, (f, p, s) in variants.items()}
    one = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
    out: dict[str, Any] = {}
    for name, (fn, p, s) in calls.items():
        out[f"params_{name}"] = param_count(p)
        out[f"flops_{name}"] = compiled_flops(fn, p, s, one)
    out["latency_ms"] = {}
    for b in batch_sizes:
        x = jnp.ones((int(b), *input_shape), jnp.float32)
        out["latency_ms"][int(b)] = interleaved_latency_ms({name: (fn, (p, s, x)) for name, (fn, p, s) in calls.items()},
                                                           repeats=repeats)
    return out

__all__ = ["compaction_effect"]
