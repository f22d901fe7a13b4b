"""Benchmark ProsPr scoring against plain SGD steps: time, compile time and memory.

    python -m experiments.bench_prospr [--model resnet20] [--batch-size 128]
        [--num-steps 0 1 3 5 10] [--implementations hvp unrolled unrolled_remat] [--repeats 3]

For each implementation and number of inner steps M it prints: scoring time (compiled, median of
``--repeats`` runs), the time of M + 1 plain SGD training steps of the same model and batch size
(measured in the same process, right before), their ratio, trace+compile time, the compiled
executable's memory analysis (XLA temp buffers + arguments + outputs) and the process's peak RSS.
Each (implementation, M) runs in its own subprocess so that peak RSS belongs to that configuration
alone. Data are synthetic CIFAR-shaped batches: timing does not depend on pixel values. No
assertions: figures only.
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

    model = models.get(args.model, num_classes=10)
    params, batch_stats = models.init(model, jax.random.key(0), (1, 32, 32, 3))
    loss_fn = models.make_loss_fn(model, batch_stats, train=True)
    m = args.worker_num_steps
    key = jax.random.key(1)
    batches = {
        "image": jax.random.normal(key, (m + 1, args.batch_size, 32, 32, 3)),
        "label": jax.random.randint(jax.random.fold_in(key, 1), (m + 1, args.batch_size), 0, 10),
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

    impl, remat = {"hvp": ("hvp", False), "unrolled": ("unrolled", False), "unrolled_remat": ("unrolled", True)}[
        args.worker_implementation
    ]
    score = jax.jit(
        lambda p, b: pj.prospr_scores(loss_fn, p, b, num_steps=m, lr=0.1, implementation=impl, remat=remat)
    )
    start = time.perf_counter()
    compiled = score.lower(params, batches).compile()
    compile_s = time.perf_counter() - start
    mem = compiled.memory_analysis()
    xla_mb = None
    if mem is not None:
        xla_mb = (mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes) / 2**20
    jax.block_until_ready(compiled(params, batches))
    score_times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(params, batches))
        score_times.append(time.perf_counter() - start)
    score_s, sgd_s = statistics.median(score_times), statistics.median(sgd_times)
    return {
        "implementation": args.worker_implementation,
        "num_steps": m,
        "score_s": score_s,
        "sgd_steps_s": sgd_s,
        "ratio": score_s / sgd_s,
        "compile_s": compile_s,
        "xla_memory_mb": xla_mb,
        "peak_rss_mb": _rss_mb(),
        "rss_before_mb": rss_start,
    }


def _table(rows: list[dict]) -> str:
    head = (
        f"{'implementation':<15} {'M':>3} {'score s':>9} {'M+1 SGD s':>10} {'ratio':>6} {'compile s':>10} "
        f"{'XLA mem MB':>11} {'peak RSS MB':>12}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['implementation']:<15} {r['num_steps']:>3}  failed: {r['error']}")
            continue
        xla = f"{r['xla_memory_mb']:.0f}" if r["xla_memory_mb"] is not None else "n/a"
        lines.append(
            f"{r['implementation']:<15} {r['num_steps']:>3} {r['score_s']:>9.2f} {r['sgd_steps_s']:>10.2f} "
            f"{r['ratio']:>6.2f} {r['compile_s']:>10.1f} {xla:>11} {r['peak_rss_mb']:>12.0f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--num-steps", type=int, nargs="+", default=[0, 1, 3, 5, 10])
    parser.add_argument(
        "--implementations", nargs="+", default=["hvp", "unrolled", "unrolled_remat"],
        choices=["hvp", "unrolled", "unrolled_remat"],
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="also write the rows to this JSON file")
    parser.add_argument("--worker-implementation", help=argparse.SUPPRESS)
    parser.add_argument("--worker-num-steps", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker_implementation:
        print(json.dumps(_worker(args)))
        return

    import jax

    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} CPU(s); "
          f"{args.model}, batch {args.batch_size}, repeats {args.repeats}", flush=True)
    rows = []
    for impl in args.implementations:
        for m in args.num_steps:
            if m == 0 and impl != "hvp":
                continue  # M = 0 is SNIP: the same program whatever the implementation
            cmd = [sys.executable, "-m", "experiments.bench_prospr", "--model", args.model,
                   "--batch-size", str(args.batch_size), "--repeats", str(args.repeats),
                   "--worker-implementation", impl, "--worker-num-steps", str(m)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                rows.append({"implementation": impl, "num_steps": m,
                             "error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "?"})
            else:
                rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(_table(rows[-1:]).splitlines()[-1], flush=True)
    print()
    print(_table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
