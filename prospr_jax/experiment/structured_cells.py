"""The runner's channel granularity: prune channels, and after training compact and measure the model.

``--granularity channel`` makes every pruned cell prune channel groups
(:func:`prospr_jax.structured.prune_channels`: ProsPr, SNIP, filter L1 magnitude or random); the masks
make the dropped channels dead, so the masked model trains as usual. When the cell's training is done,
:func:`compaction_record` compacts the trained model into a narrower model of its own zoo class
(:func:`prospr_jax.models.compact_module`: plain flax.linen layers with fewer channels), evaluates the
compact model on the test split and measures both models (parameters, XLA FLOPs per example, latency
at batch 1 and 128 in inference mode). Its fields join the cell's record, with ``compact_architecture``:
the attributes that rebuild the narrow model (``model.clone(**compact_architecture)``).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from prospr_jax import data, flax_apply_fn, models
from prospr_jax.methods import PruneResult
from prospr_jax.structured import CHANNEL_METHODS, GRANULARITIES, compaction_effect, prune_channels

CHANNEL = "channel"
WEIGHT = "weight"
LATENCY_BATCHES = (1, 128)


def check_granularity(granularity: str, methods: tuple[str, ...], *, density_rule: Any, scope: str,
                      min_per_layer: int, dense: str) -> None:
    """Raise a ``ValueError`` unless the run's methods and mask rule support ``granularity``."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"`--granularity` must be one of {GRANULARITIES}, got {granularity!r}")
    if granularity != CHANNEL:
        return
    unsupported = [m for m in methods if m != dense and m not in CHANNEL_METHODS]
    if unsupported:
        raise ValueError(
            f"`--granularity channel` supports the methods {', '.join(CHANNEL_METHODS)} (and 'dense'); "
            f"not {unsupported}"
        )
    if density_rule is not None or scope != "global" or min_per_layer:
        raise ValueError("`--granularity channel` ranks channel groups globally: it takes no --density-rule, "
                         "--scope layerwise or --min-per-layer")


def prune_cell(problem: Any, method: str, sparsity: float, options: dict) -> PruneResult:
    """The channel masks of one cell (see the module docstring)."""
    return prune_channels(method, problem, sparsity, **options)


def _compact_top1(exp: Any, apply_fn: Any, params: Any, state: Any) -> float:
    apply = jax.jit(lambda p, s, x: apply_fn(p, s, x, False))
    correct = count = 0
    for batch in data.eval_batches(exp.dataset, batch_size=exp.eval_batch_size, pad_remainder=True):
        logits = apply(params, state, jnp.asarray(batch["image"]))
        hit = np.asarray(jnp.argmax(logits, axis=-1)) == np.asarray(batch["label"])
        valid = np.asarray(batch["mask"], bool) if "mask" in batch else np.ones(hit.shape, bool)
        correct += int(np.sum(hit & valid))
        count += int(np.sum(valid))
    return correct / count if count else float("nan")


def compaction_record(exp: Any, masks: Any, trained: Any) -> dict:
    """Record fields of a trained channel-pruned cell: sizes, FLOPs and latency of the dense and the
    compact model, and the compact model's test top-1.

    Args:
      exp: the :class:`prospr_jax.experiment.runner.Experiment`.
      masks: the cell's masks.
      trained: its trained :class:`prospr_jax.train.TrainState` (params and batch statistics).
    """
    apply_fn = flax_apply_fn(exp.model)
    state = {"batch_stats": trained.batch_stats} if trained.batch_stats else {}
    params = jax.device_get(trained.params)
    state = jax.device_get(state)
    x = jnp.ones((1, *exp.input_shape), jnp.float32)
    narrow, small_params, small_stats = models.compact_module(exp.model, params, state.get("batch_stats", {}),
                                                              masks, x)
    small_state = {"batch_stats": small_stats} if small_stats else {}
    small_apply = flax_apply_fn(narrow)
    effect = compaction_effect(apply_fn, params, state, small_apply, small_params, small_state, exp.input_shape,
                               batch_sizes=LATENCY_BATCHES, repeats=5)
    lat = effect["latency_ms"]
    big = max(LATENCY_BATCHES)
    return {
        "granularity": CHANNEL,
        "params_dense": effect["params_dense"],
        "params_compact": effect["params_compact"],
        "flops_dense": effect["flops_dense"],
        "flops_compact": effect["flops_compact"],
        "latency_ms_dense": lat[big]["dense"],
        "latency_ms_compact": lat[big]["compact"],
        "latency_batch": big,
        "latency_ms_by_batch": {str(b): v for b, v in lat.items()},
        "test_top1_compact": _compact_top1(exp, small_apply, small_params, small_state),
        "compact_architecture": models.architecture_changes(exp.model, narrow),
    }


__all__ = ["CHANNEL", "WEIGHT", "check_granularity", "compaction_record", "prune_cell"]
