"""The prepared accelerator check: one command, no downloads, a few minutes on one GPU or TPU.

    python -m experiments.accelerator_check               # full size (ResNet-20 and ResNet-18, batch 128)
    python -m experiments.accelerator_check --smoke       # CI size: seconds on a CPU
    python -m experiments.accelerator_check --out check.json

What it measures, on every local device of the first backend (data-parallel when there are several):

* ProsPr scoring time for M = 0 (SNIP), 1, 3, 5 inner steps, warm (median of ``--repeats`` calls),
  beside the time of M + 1 plain SGD steps of the same model and batch (the ratio the ProsPr target
  speaks of), and the first call's extra time (trace + compile);
* training throughput of the masked train step (images/s, warm);
* peak device memory (the device's own counter where it has one, else XLA's memory analysis of
  the compiled scoring program).

It prints one table and, with ``--out``, writes the figures as JSON. Inputs are random images (the
speed of the step does not depend on the pixels), so nothing is read or downloaded.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import prospr_jax as pj
from prospr_jax import models
from prospr_jax.train import Recipe, Trainer

FULL = {"models": (("resnet20", {}), ("resnet18", {"stem": "cifar"})), "image": (32, 32, 3), "batch": 128,
        "steps": (0, 1, 3, 5), "train_steps": 20, "classes": 10}
SMOKE = {"models": (("resnet20", {}),), "image": (8, 8, 1), "batch": 8, "steps": (0, 1), "train_steps": 2,
         "classes": 10}


def _compiled(fn: Callable[..., Any], *args: Any) -> tuple[Any, float]:
    """(the compiled program of ``fn`` on ``args``, seconds of tracing + compiling it)."""
    began = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    return compiled, time.perf_counter() - began


def _warm(fn: Callable[[], Any], repeats: int) -> float:
    """Median seconds of ``repeats`` calls after one untimed call, results blocked until ready."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def _peak_bytes() -> Optional[int]:
    stats = jax.local_devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def check_model(name: str, options: dict, size: dict, repeats: int, mesh: Any) -> list[dict]:
    """The rows of one model: one per M, plus the training throughput in every row."""
    model = models.get(name, size["classes"], **options)
    params, stats = models.init(model, jax.random.key(0), (1, *size["image"]))
    batch_size = size["batch"]
    key = jax.random.key(1)

    def batch(i: int) -> dict:
        k = jax.random.fold_in(key, i)
        return {"image": np.asarray(jax.random.normal(k, (batch_size, *size["image"]))),
                "label": np.asarray(jax.random.randint(k, (batch_size,), 0, size["classes"]))}

    placed_params = pj.replicate(params, mesh)
    loss_fn = pj.classifier_loss_fn(pj.flax_apply_fn(model), {"batch_stats": stats} if stats else {})
    def sgd_steps(p: Any, bs: Any) -> Any:  # M + 1 plain SGD steps, one per batch
        step = lambda w, b: (jax.tree_util.tree_map(lambda x, g: x - 0.1 * g, w, jax.grad(loss_fn)(w, b)), None)  # noqa: E731
        return jax.lax.scan(step, p, bs)[0]

    recipe = Recipe(epochs=1, batch_size=batch_size, lr=0.1, augment=False, schedule="constant")
    trainer = Trainer(model, recipe, steps_per_epoch=size["train_steps"], mesh=mesh)
    state = trainer.init(params, stats, pj.dense_masks(params), rng=0)
    train_batch = trainer.place_batch(batch(0))
    state, _ = jax.block_until_ready(trainer.train_step(state, train_batch))
    began = time.perf_counter()
    for _ in range(size["train_steps"]):
        state, metrics = trainer.train_step(state, train_batch)
    jax.block_until_ready(metrics)
    throughput = size["train_steps"] * batch_size / (time.perf_counter() - began)

    rows = []
    for m in size["steps"]:
        stacked = pj.shard_batch(pj.stack_batches([batch(i) for i in range(m + 1)]), mesh, axis=1)
        scoring, compile_s = _compiled(lambda p, b: pj.prospr_scores(loss_fn, p, b, num_steps=m), placed_params, stacked)
        warm = _warm(lambda: scoring(placed_params, stacked), repeats)
        sgd, _ = _compiled(sgd_steps, placed_params, stacked)
        sgd_warm = _warm(lambda: sgd(placed_params, stacked), repeats)
        peak, source = _peak_bytes(), "device"
        if peak is None:
            analysis = scoring.memory_analysis()
            peak = None if analysis is None else int(
                analysis.temp_size_in_bytes + analysis.argument_size_in_bytes + analysis.output_size_in_bytes)
            source = "xla analysis"
        rows.append({
            "model": name, "batch": batch_size, "num_steps": m, "scoring_s": warm, "sgd_steps_s": sgd_warm,
            "ratio": warm / sgd_warm, "trace_compile_s": compile_s, "train_images_per_s": throughput,
            "peak_memory_mb": None if peak is None else peak / 2**20, "memory_source": source,
        })
    return rows


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.accelerator_check", description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (seconds on a CPU), for CI")
    parser.add_argument("--repeats", type=int, default=3, help="warm calls timed per figure (median)")
    parser.add_argument("--num-devices", type=int, default=None, help="use the first N local devices (default all)")
    parser.add_argument("--out", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("`--repeats` must be >= 1")
    size = SMOKE if args.smoke else FULL
    try:
        mesh = pj.data_mesh(args.num_devices)
        pj.process_rows(size["batch"], mesh)
    except ValueError as e:
        parser.error(str(e))
    device = jax.devices()[0]
    print(f"accelerator check on {device.platform} ({device.device_kind}); {pj.describe_mesh(mesh)}; jax {jax.__version__}")
    rows = [row for name, options in size["models"] for row in check_model(name, options, size, args.repeats, mesh)]
    header = ("model", "batch", "M", "scoring s", "M+1 SGD s", "ratio", "trace+compile s", "train img/s", "peak MB")
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for r in rows:
        peak = "n/a" if r["peak_memory_mb"] is None else f"{r['peak_memory_mb']:.0f} ({r['memory_source']})"
        print(f"| {r['model']} | {r['batch']} | {r['num_steps']} | {r['scoring_s']:.3f} | {r['sgd_steps_s']:.3f} | "
              f"{r['ratio']:.2f} | {r['trace_compile_s']:.1f} | {r['train_images_per_s']:,.0f} | {peak} |")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump({"device": f"{device.platform} {device.device_kind}", "num_devices": int(mesh.devices.size),
                       "jax": jax.__version__, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
