"""Benchmark structured ProsPr: what compaction buys, and what scoring and compaction cost.

    python -m experiments.bench_structured [--models resnet20 vgg16 resnet18] [--sparsities 0.3 0.5 0.7]
        [--method prospr] [--num-steps 3] [--score-batch-size 32] [--repeats 5] [--round-to 8] [--smoke] [--json FILE]

For each model (CIFAR shapes, 32x32x3 inputs, 10 classes; ResNet-18 with the CIFAR stem) it scores the
channel groups once with ``--method`` on synthetic batches (timing does not depend on pixel values),
then for every channel sparsity masks the groups, compacts the model into a narrower model of its own
class (:func:`prospr_jax.models.compact_module`, its output check included in the compaction time) and
measures the dense and the compact model (and, with ``--round-to 8``, the default, a compact model whose
layers are rounded up to multiples of 8 channels with dead extras): parameters, FLOPs per example (XLA's cost analysis of the compiled batch-1 forward
pass) and inference latency at batch 1 and 128 (median of ``--repeats`` calls, results ready). It
also prints the time to trace the groups, to score (compile included, and the median of a second
call) and to compact. ``--smoke`` runs a tiny configuration (ResNet-20 on 8x8 inputs, one sparsity,
batch 1 and 4) for the test suite. Figures only, no assertions.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import jax
import jax.numpy as jnp

import prospr_jax as pj
from prospr_jax import models, structured

MODEL_OPTIONS = {"resnet18": {"stem": "cifar"}}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m experiments.bench_structured", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["resnet20", "vgg16", "resnet18"], choices=models.names())
    p.add_argument("--sparsities", nargs="+", type=float, default=[0.3, 0.5, 0.7])
    p.add_argument("--method", default="prospr", choices=structured.CHANNEL_METHODS)
    p.add_argument("--num-steps", type=int, default=3, help="ProsPr inner steps M")
    p.add_argument("--score-batch-size", type=int, default=32)
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 128], help="latency batch sizes")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--round-to", type=int, default=8,
                   help="also measure the compact model with every layer rounded up to a multiple of this many "
                        "channels (dead extras; models.compact_module's round_to); 1: do not")
    p.add_argument("--smoke", action="store_true", help="tiny configuration (seconds)")
    p.add_argument("--json", help="also write the figures to this JSON file")
    return p


def bench_model(name: str, args: argparse.Namespace) -> list[dict]:
    size = args.image_size
    model = models.get(name, 10, **MODEL_OPTIONS.get(name, {}))
    params, batch_stats = models.init(model, 0, (1, size, size, 3))
    state = {"batch_stats": batch_stats} if batch_stats else {}
    key = jax.random.key(1)

    def batch_fn(i: int) -> dict:
        k = jax.random.fold_in(key, i)
        return {"image": jax.random.normal(k, (args.score_batch_size, size, size, 3)),
                "label": jax.random.randint(jax.random.fold_in(k, 1), (args.score_batch_size,), 0, 10)}

    problem = pj.PruningProblem.from_flax(model, {"params": params, **state}, batch_fn, input_shape=(size, size, 3),
                                          num_classes=10, key=jax.random.key(2))
    options = {"num_steps": args.num_steps} if args.method == "prospr" else {}
    began = time.perf_counter()
    groups = structured.problem_groups(problem)
    trace_s = time.perf_counter() - began
    began = time.perf_counter()
    scores = jax.block_until_ready(structured.channel_scores(args.method, problem, groups, **options))
    score_first_s = time.perf_counter() - began
    began = time.perf_counter()
    jax.block_until_ready(structured.channel_scores(args.method, problem, groups, **options))
    score_s = time.perf_counter() - began
    apply_fn = pj.flax_apply_fn(model)
    x = jnp.ones((1, size, size, 3))
    eval_groups = structured.model_channel_groups(apply_fn, params, state, x)
    rows = []
    for s in args.sparsities:
        masks = groups.leaf_masks(structured.group_mask(scores, groups, s), params)
        began = time.perf_counter()
        narrow, small_params, small_stats = models.compact_module(model, params, state.get("batch_stats", {}), masks,
                                                                  x, groups=eval_groups)
        compact_s = time.perf_counter() - began
        small_state = {"batch_stats": small_stats} if small_stats else {}
        others = {}
        if args.round_to > 1:
            wide, wide_params, wide_stats = models.compact_module(model, params, state.get("batch_stats", {}), masks,
                                                                  x, groups=eval_groups, round_to=args.round_to)
            others["rounded"] = (pj.flax_apply_fn(wide), wide_params, {"batch_stats": wide_stats} if wide_stats else {})
        effect = structured.compaction_effect(apply_fn, params, state, pj.flax_apply_fn(narrow), small_params, small_state,
                                              (size, size, 3), batch_sizes=args.batch_sizes, repeats=args.repeats,
                                              others=others)
        rows.append({"model": name, "sparsity": s, "groups": groups.num_prunable, "trace_s": trace_s,
                     "score_first_s": score_first_s, "score_s": score_s, "compact_s": compact_s, **effect})
        print(_row(rows[-1], args.batch_sizes), flush=True)
    return rows


def _header(batch_sizes, round_to: int) -> str:
    lat = " | ".join(f"latency ms b{b} dense -> compact" for b in batch_sizes)
    rounded = (f" rounded to {round_to}: params, FLOPs, latency ms b{max(batch_sizes)} |" if round_to > 1 else "")
    return ("| model | channel sparsity | params dense -> compact | FLOPs/example dense -> compact | "
            f"{lat} |{rounded} trace groups s | score s (first, next) | compact s |\n"
            "|---|---:|---:|---:|" + "---:|" * len(batch_sizes) + ("---:|" if round_to > 1 else "")
            + "---:|---:|---:|")


def _row(r: dict, batch_sizes) -> str:
    lat = " | ".join(f"{r['latency_ms'][b]['dense']:.2f} -> {r['latency_ms'][b]['compact']:.2f}" for b in batch_sizes)
    rounded = (f" {r['params_rounded']:,}, {r['flops_rounded']:.3g}, "
               f"{r['latency_ms'][max(batch_sizes)]['rounded']:.2f} |" if "params_rounded" in r else "")
    return (f"| {r['model']} | {100 * r['sparsity']:g}% | {r['params_dense']:,} -> {r['params_compact']:,} | "
            f"{r['flops_dense']:.3g} -> {r['flops_compact']:.3g} ({100 * r['flops_compact'] / r['flops_dense']:.0f}%) | "
            f"{lat} |{rounded} {r['trace_s']:.1f} | {r['score_first_s']:.1f}, {r['score_s']:.1f} | {r['compact_s']:.1f} |")


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if args.smoke:
        args.models, args.sparsities, args.image_size = ["resnet20"], [0.5], 8
        args.batch_sizes, args.repeats, args.score_batch_size, args.num_steps = [1, 4], 2, 4, 1
    print(f"# structured {args.method} (M = {args.num_steps}), {jax.default_backend()} "
          f"({jax.device_count()} device(s), {platform.processor() or platform.machine()}), "
          f"scoring batch {args.score_batch_size}, {args.image_size}x{args.image_size} inputs\n")
    print(_header(args.batch_sizes, args.round_to), flush=True)
    rows = []
    for name in args.models:
        rows += bench_model(name, args)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
