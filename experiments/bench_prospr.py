"""Benchmark ProsPr scoring against plain SGD steps: time, compile time and memory.

    python -m experiments.bench_prospr [--model resnet20] [--batch-size 128] [--image-size 32]
        [--num-steps 0 1 3 5 10] [--implementations hvp unrolled unrolled_remat] [--repeats 3]
        [--micro-batches 1] [--compile-only]

For each implementation and number of inner steps M it prints: scoring time (compiled, median of
``--repeats`` runs), the time of M + 1 plain SGD training steps of the same model and batch size
(measured in the same process, right before), their ratio, trace+compile time, the compiled
executable's memory analysis (XLA temp buffers + arguments + outputs) and the process's peak RSS.
Each (implementation, M) runs in its own subprocess so that peak RSS belongs to that configuration
alone. Data are synthetic batches of ``--image-size`` square RGB images: timing does not depend on
pixel values. No assertions: figures only.

``--compile-only`` lowers and compiles the scoring program on abstract inputs (no batch is ever
materialised) and reports trace+compile time and XLA's memory analysis: the peak memory a device
needs, measurable on a CPU for an accelerator-sized problem, e.g. full second-order ProsPr for
ResNet-50 at 224x224, batch 128, M = 3::

    python -m experiments.bench_prospr --model resnet50 --image-size 224 --num-classes 1000 \
        --num-steps 3 --implementations hvp --compile-only --micro-batches 1 4 16
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _worker(args: argparse.Namespace) -> dict:
    import jax
    import jax.numpy as jnp
    import optax

    import prospr_jax as pj
    from prospr_jax import models

    size, classes = args.image_size, args.num_classes
    model = models.get(args.model, num_classes=classes)
    params, batch_stats = models.init(model, jax.random.key(0), (1, size, size, 3))
    loss_fn = models.make_loss_fn(model, batch_stats, train=True)
    m, micro = args.worker_num_steps, args.worker_micro_batches
    impl, remat = {"hvp": ("hvp", False), "unrolled": ("unrolled", False), "unrolled_remat": ("unrolled", True)}[
        args.worker_implementation
    ]
    score = jax.jit(
        lambda p, b: pj.prospr_scores(loss_fn, p, b, num_steps=m, lr=0.1, implementation=impl, remat=remat,
                                      micro_batches=micro)
    )
    row = {"implementation": args.worker_implementation, "num_steps": m, "micro_batches": micro}
    if args.compile_only:
        shapes = {
            "image": jax.ShapeDtypeStruct((m + 1, args.batch_size, size, size, 3), jnp.float32),
            "label": jax.ShapeDtypeStruct((m + 1, args.batch_size), jnp.int32),
        }
        start = time.perf_counter()
        compiled = score.lower(params, shapes).compile()
        return {**row, "compile_s": time.perf_counter() - start, **_memory(compiled), "peak_rss_mb": _rss_mb()}

    key = jax.random.key(1)
    batches = {
        "image": jax.random.normal(key, (m + 1, args.batch_size, size, size, 3)),
        "label": jax.random.randint(jax.random.fold_in(key, 1), (m + 1, args.batch_size), 0, classes),
    }
    rss_start = _rss_mb()

    # Baseline: M + 1 plain SGD steps (same loss, BN in train mode), one jitted step each.
    tx = optax.sgd(0.1)

    @jax.jit
    def sgd_step(params, opt_state, batch):
        grads = jax.grad(loss_fn)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    opt_state = tx.init(params)
    batch0 = jax.tree_util.tree_map(lambda b: b[0], batches)
    jax.block_until_ready(sgd_step(params, opt_state, batch0))
    sgd_times = []
    for _ in range(args.repeats):
        p, s = params, opt_state
        start = time.perf_counter()
        for k in range(m + 1):
            p, s = sgd_step(p, s, jax.tree_util.tree_map(lambda b: b[k], batches))
        jax.block_until_ready(p)
        sgd_times.append(time.perf_counter() - start)

    start = time.perf_counter()
    compiled = score.lower(params, batches).compile()
    compile_s = time.perf_counter() - start
    jax.block_until_ready(compiled(params, batches))
    score_times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(params, batches))
        score_times.append(time.perf_counter() - start)
    score_s, sgd_s = statistics.median(score_times), statistics.median(sgd_times)
    return {
        **row,
        "score_s": score_s,
        "sgd_steps_s": sgd_s,
        "ratio": score_s / sgd_s,
        "compile_s": compile_s,
        **_memory(compiled),
        "peak_rss_mb": _rss_mb(),
        "rss_before_mb": rss_start,
    }


def _memory(compiled) -> dict:
    """XLA's memory analysis of a compiled program in MB: temp buffers and the total a device holds
    while it runs (temp + arguments + outputs - aliased); ``None`` where the backend reports none."""
    mem = compiled.memory_analysis()
    if mem is None:
        return {"xla_temp_mb": None, "xla_memory_mb": None}
    total = (mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes
             - mem.alias_size_in_bytes)
    return {"xla_temp_mb": mem.temp_size_in_bytes / 2**20, "xla_memory_mb": total / 2**20}


def _mb(x) -> str:
    return "n/a" if x is None else f"{x:.0f}"


def _table(rows: list[dict], compile_only: bool = False) -> str:
    if compile_only:
        head = (f"{'implementation':<15} {'M':>3} {'micro':>5} {'compile s':>10} {'XLA temp MB':>12} "
                f"{'XLA mem MB':>11} {'peak RSS MB':>12}")
    else:
        head = (f"{'implementation':<15} {'M':>3} {'micro':>5} {'score s':>9} {'M+1 SGD s':>10} {'ratio':>6} "
                f"{'compile s':>10} {'XLA mem MB':>11} {'peak RSS MB':>12}")
    lines = [head, "-" * len(head)]
    for r in rows:
        lead = f"{r['implementation']:<15} {r['num_steps']:>3} {r['micro_batches']:>5}"
        if "error" in r:
            lines.append(f"{lead}  failed: {r['error']}")
        elif compile_only:
            lines.append(f"{lead} {r['compile_s']:>10.1f} {_mb(r['xla_temp_mb']):>12} {_mb(r['xla_memory_mb']):>11} "
                         f"{r['peak_rss_mb']:>12.0f}")
        else:
            lines.append(f"{lead} {r['score_s']:>9.2f} {r['sgd_steps_s']:>10.2f} {r['ratio']:>6.2f} "
                         f"{r['compile_s']:>10.1f} {_mb(r['xla_memory_mb']):>11} {r['peak_rss_mb']:>12.0f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=32, help="side of the square RGB inputs (default 32)")
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--num-steps", type=int, nargs="+", default=[0, 1, 3, 5, 10])
    parser.add_argument(
        "--implementations", nargs="+", default=["hvp", "unrolled", "unrolled_remat"],
        choices=["hvp", "unrolled", "unrolled_remat"],
    )
    parser.add_argument("--micro-batches", type=int, nargs="+", default=[1],
                        help="micro-batch counts to try (prospr_scores(micro_batches=...); default 1)")
    parser.add_argument("--compile-only", action="store_true",
                        help="only trace and compile: compile time and XLA memory analysis, nothing runs")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="also write the rows to this JSON file")
    parser.add_argument("--worker-implementation", help=argparse.SUPPRESS)
    parser.add_argument("--worker-num-steps", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--worker-micro-batches", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for n in args.micro_batches:
        if n < 1 or args.batch_size % n:
            parser.error(f"--micro-batches {n}: must be >= 1 and divide --batch-size {args.batch_size}")

    if args.worker_implementation:
        print(json.dumps(_worker(args)))
        return

    import jax

    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} CPU(s); "
          f"{args.model}, {args.image_size}x{args.image_size}, batch {args.batch_size}"
          + ("; compile only" if args.compile_only else f", repeats {args.repeats}"), flush=True)
    rows = []
    for impl in args.implementations:
        for m in args.num_steps:
            if m == 0 and impl != "hvp":
                continue  # M = 0 is SNIP: the same program whatever the implementation
            for micro in args.micro_batches:
                cmd = [sys.executable, "-m", "experiments.bench_prospr", "--model", args.model,
                       "--batch-size", str(args.batch_size), "--image-size", str(args.image_size),
                       "--num-classes", str(args.num_classes), "--repeats", str(args.repeats),
                       "--worker-implementation", impl, "--worker-num-steps", str(m),
                       "--worker-micro-batches", str(micro)] + (["--compile-only"] if args.compile_only else [])
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode != 0:
                    err = proc.stderr.strip().splitlines()
                    rows.append({"implementation": impl, "num_steps": m, "micro_batches": micro,
                                 "error": err[-1] if err else f"exit {proc.returncode}"})
                else:
                    rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
                print(_table(rows[-1:], args.compile_only).splitlines()[-1], flush=True)
    print()
    print(_table(rows, args.compile_only))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
