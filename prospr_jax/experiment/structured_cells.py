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

import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization

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


COMPACT_DIR = "compact"


def compact_variables_path(cell_id: str) -> str:
    """Where a cell's compact variables are written, relative to the run directory."""
    return os.path.join(COMPACT_DIR, f"{cell_id}.msgpack")


def _tuples(value: Any) -> Any:
    """JSON lists back to the tuples the model attributes were."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def load_compact(out: str, record: dict) -> tuple[Any, dict]:
    """The trained compact model of a channel cell of the run in ``out``, and its variables.

    Args:
      out: the run directory.
      record: the cell's record (a line of ``results.jsonl``).

    Returns:
      ``(model, variables)``: the narrow zoo model (the run's model with the record's
      ``compact_architecture``) and ``{'params': ..., 'batch_stats': ...}`` read from the record's
      ``compact_variables`` file; ``model.apply(variables, x, train=False)`` is the compact network.
    """
    if "compact_variables" not in record:
        raise ValueError(f"record {record.get('label', '?')!r} has no compact model (not a channel cell, "
                         "or a cell that diverged)")
    cfg = record["config"]
    base = models.get(cfg["model"], int(record["num_classes"]), **(cfg.get("model_options") or {}))
    model = base.clone(**{k: _tuples(v) for k, v in record["compact_architecture"].items()})
    with open(os.path.join(out, record["compact_variables"]), "rb") as f:
        variables = serialization.msgpack_restore(f.read())
    return model, variables


def compaction_record(exp: Any, masks: Any, trained: Any, save_to: Optional[str] = None) -> dict:
    """Record fields of a trained channel-pruned cell: sizes, FLOPs and latency of the dense and the
    compact model, the compact model's test top-1 and architecture.

    Args:
      exp: the :class:`prospr_jax.experiment.runner.Experiment`.
      masks: the cell's masks.
      trained: its trained :class:`prospr_jax.train.TrainState` (params and batch statistics).
      save_to: a path relative to the run directory where the compact variables are written
        (``flax.serialization`` msgpack of ``{'params', 'batch_stats'}``; :func:`load_compact` reads
        them back); ``None``: not written (processes other than the first).
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
    record = {
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
        "num_classes": int(exp.num_classes),
    }
    if save_to is not None:
        path = os.path.join(exp.out, save_to)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        variables = {"params": small_params, **small_state}
        with open(path + ".tmp", "wb") as f:
            f.write(serialization.msgpack_serialize(jax.tree_util.tree_map(np.asarray, variables)))
        os.replace(path + ".tmp", path)
        record["compact_variables"] = save_to
    return record


__all__ = ["CHANNEL", "COMPACT_DIR", "WEIGHT", "check_granularity", "compact_variables_path", "compaction_record",
           "load_compact", "prune_cell"]
