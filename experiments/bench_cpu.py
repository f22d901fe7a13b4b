"""CPU speed of this project against PyTorch, side by side in one process: ResNet-20 (option A), float32.

    python -m experiments.bench_cpu [--threads 1 2] [--batch-size 128] [--repeats 5] [--tasks ...]
        [--quick] [--json out.json]

Tasks (each timed on the same batch in both frameworks; warm, i.e. after compilation / a first run):

* ``train_step``: one SGD step (momentum 0.9, weight decay 5e-4, BatchNorm in train mode), this
  project's jitted masked step (:class:`prospr_jax.train.Trainer`, dense masks) against
  ``loss.backward(); optimizer.step()``; ``train_step_plain`` is a bare ``jax.jit`` of
  ``value_and_grad`` + ``optax.sgd`` on the zoo model (no masks), compiled with XLA's default
  options and XLA's convolutions (the other JAX tasks use the project's compiler options,
  :mod:`prospr_jax._src.cpu_options`, and its CPU convolution kernels, :mod:`prospr_jax._src.cpu_conv`,
  where they are available).
* ``forward``: logits in eval mode (running BatchNorm statistics; ``torch.no_grad``).
* ``gradient``: the loss gradient w.r.t. all parameters (BatchNorm in train mode).
* ``hvp``: a Hessian-vector product, forward-over-reverse in JAX (``jvp`` of ``grad``, what ProsPr
  uses), double backward in PyTorch (``grad`` of ``<grad, v>`` with ``create_graph``).
* ``prospr``: ProsPr scores with M = 3 inner SGD steps (lr 0.1) on 4 batches: this project's
  :func:`prospr_jax.prospr_scores` (default ``implementation='hvp'``) against the authors' method in
  PyTorch (a mask ``c`` on the weights, M differentiable steps with ``create_graph=True``, the
  meta-loss differentiated w.r.t. ``c``: the full meta-gradient).

Timing: the repetitions are interleaved (JAX, PyTorch, JAX, PyTorch, ...) so that both frameworks see
the same load on a shared machine, and medians are reported with the ratio JAX / PyTorch (below 1:
this project is faster). Each thread count runs in its own subprocess pinned to that many cores
(``sched_setaffinity``, which sizes XLA's CPU thread pool) with ``torch.set_num_threads``. Both
networks hold the same weights (the JAX initialisation copied into PyTorch) and the worker checks that
their losses agree before timing. PyTorch is a benchmark-only dependency (``pip install
'prospr-jax[bench]'``).

``--quick`` (batch 8, 1 repetition) is a smoke test. ``--convs`` instead times every convolution
shape of ResNet-20 alone (forward, input gradient, weight gradient) in both frameworks, in JAX at
XLA's default options, at the project's compiler options and through the project's kernels (what the
train step and ProsPr run), and the count-weighted total of one ResNet-20 pass.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

TASKS = ("train_step", "train_step_plain", "forward", "gradient", "hvp", "prospr")
PROSPR_STEPS = 3
LR = 0.1
MOMENTUM = 0.9
WEIGHT_DECAY = 5e-4
# ResNet-20 convolutions at 32x32 input: (spatial size of the input, C_in, C_out, stride, count).
RESNET20_CONVS = (
    (32, 3, 16, 1, 1),
    (32, 16, 16, 1, 6),
    (32, 16, 32, 2, 1),
    (16, 32, 32, 1, 5),
    (16, 32, 64, 2, 1),
    (8, 64, 64, 1, 5),
)


# --------------------------------------------------------------------------- the PyTorch ResNet-20


def torch_resnet20(num_classes: int = 10) -> Any:
    """The CIFAR ResNet-20 of the pruning-at-init code bases in PyTorch (NCHW), option-A shortcuts.

    Same layout as :func:`prospr_jax.models.resnet20`: 3x3 convs without bias, padding 1, BatchNorm
    (momentum 0.1, eps 1e-5) after each, zero-padded strided shortcuts, global average pool, Linear.
    """
    import torch
    from torch import nn
    from torch.nn import functional as F

    class Block(nn.Module):
        def __init__(self, c_in: int, c_out: int, stride: int):
            super().__init__()
            self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(c_out)
            self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(c_out)
            self.stride, self.extra = stride, c_out - c_in

        def forward(self, x):
            y = F.relu(self.bn1(self.conv1(x)))
            y = self.bn2(self.conv2(y))
            skip = x
            if self.stride != 1 or self.extra:
                before = self.extra // 2
                skip = F.pad(x[:, :, :: self.stride, :: self.stride], (0, 0, 0, 0, before, self.extra - before))
            return F.relu(y + skip)

    class ResNet20(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv_stem = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
            self.bn_stem = nn.BatchNorm2d(16)
            blocks, c_in = [], 16
            for stage, width in enumerate((16, 32, 64)):
                for block in range(3):
                    blocks.append(Block(c_in, width, 2 if stage > 0 and block == 0 else 1))
                    c_in = width
            self.blocks = nn.Sequential(*blocks)
            self.logits = nn.Linear(64, num_classes)

        def forward(self, x):
            x = F.relu(self.bn_stem(self.conv_stem(x)))
            x = self.blocks(x)
            return self.logits(torch.mean(x, dim=(2, 3)))

    return ResNet20()


def copy_flax_params_into_torch(params: dict, net: Any) -> None:
    """Load the zoo ResNet-20's ``params`` into :func:`torch_resnet20` (HWIO -> OIHW, [in, out] -> [out, in])."""
    import numpy as np
    import torch

    def conv_bn(conv: Any, bn: Any, p_conv: dict, p_bn: dict) -> None:
        conv.weight.copy_(torch.from_numpy(np.transpose(np.asarray(p_conv["kernel"]), (3, 2, 0, 1)).copy()))
        bn.weight.copy_(torch.from_numpy(np.array(p_bn["scale"])))
        bn.bias.copy_(torch.from_numpy(np.array(p_bn["bias"])))

    with torch.no_grad():
        conv_bn(net.conv_stem, net.bn_stem, params["conv_stem"], params["bn_stem"])
        names = sorted(k for k in params if k.startswith("layer"))
        for name, block in zip(names, net.blocks):
            p = params[name]
            conv_bn(block.conv1, block.bn1, p["conv1"], p["bn1"])
            conv_bn(block.conv2, block.bn2, p["conv2"], p["bn2"])
        net.logits.weight.copy_(torch.from_numpy(np.asarray(params["logits"]["kernel"]).T.copy()))
        net.logits.bias.copy_(torch.from_numpy(np.array(params["logits"]["bias"])))


# --------------------------------------------------------------------------- the tasks


def _jax_tasks(batch_size: int) -> tuple[dict[str, Callable[[], Any]], dict]:
    """Zero-argument callables (each blocks until its result is ready) and the shared setup."""
    import jax
    import jax.numpy as jnp
    import optax

    import prospr_jax as pj
    from prospr_jax import models
    from prospr_jax._src import cpu_options
    from prospr_jax._src.cpu_conv import cpu_conv_kernels_enabled, with_cpu_conv_kernels
    from prospr_jax.train import RECIPES, Trainer

    model = models.get("resnet20", num_classes=10)
    params, batch_stats = models.init(model, jax.random.key(0), (1, 32, 32, 3))
    key = jax.random.key(1)
    batches = {
        "image": jax.random.normal(key, (PROSPR_STEPS + 1, batch_size, 32, 32, 3)),
        "label": jax.random.randint(jax.random.fold_in(key, 1), (PROSPR_STEPS + 1, batch_size), 0, 10),
    }
    batch = jax.tree_util.tree_map(lambda b: b[0], batches)
    loss_fn = models.make_loss_fn(model, batch_stats, train=True)

    recipe = RECIPES["prospr"].replace(batch_size=batch_size, lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    trainer = Trainer(model, recipe, steps_per_epoch=100)
    state = trainer.init(params, batch_stats, pj.dense_masks(params), rng=0)

    tx = optax.chain(optax.add_decayed_weights(WEIGHT_DECAY), optax.sgd(LR, momentum=MOMENTUM))
    opt_state = tx.init(params)

    def plain_loss(p, stats, b):
        logits, updates = model.apply(
            {"params": p, "batch_stats": stats}, b["image"], train=True, mutable=["batch_stats"]
        )
        return pj.cross_entropy(logits, b["label"]), updates["batch_stats"]

    @jax.jit
    def plain_step(p, o, stats, b):
        (loss, stats), g = jax.value_and_grad(plain_loss, has_aux=True)(p, stats, b)
        updates, o = tx.update(g, o, p)
        return optax.apply_updates(p, updates), o, stats, loss

    # The project's compiler options and convolution kernels (those of its train step and ProsPr) for
    # the bare programs too.
    kernels = cpu_conv_kernels_enabled()
    own = with_cpu_conv_kernels if kernels else (lambda f: f)
    forward = cpu_options.jit(own(lambda p, x: model.apply({"params": p, "batch_stats": batch_stats}, x, train=False)))
    gradient = cpu_options.jit(jax.grad(own(loss_fn)))
    tangent = jax.tree_util.tree_map(lambda x: jnp.full_like(x, 0.01), params)
    hvp = cpu_options.jit(lambda p, v, b: jax.jvp(lambda q: jax.grad(own(loss_fn))(q, b), (p,), (v,))[1])

    def prospr(p, bs):  # jitted inside, with the project's options
        return pj.prospr_scores(loss_fn, p, bs, num_steps=PROSPR_STEPS, lr=LR)

    block = jax.block_until_ready
    tasks = {
        "train_step": lambda: block(trainer.train_step(state, batch)),
        "train_step_plain": lambda: block(plain_step(params, opt_state, batch_stats, batch)),
        "forward": lambda: block(forward(params, batch["image"])),
        "gradient": lambda: block(gradient(params, batch)),
        "hvp": lambda: block(hvp(params, tangent, batch)),
        "prospr": lambda: block(prospr(params, batches)),
    }
    setup = {"params": params, "batches": batches, "loss": float(loss_fn(params, batch)),
             "compiler_options": cpu_options.cpu_compiler_options(), "conv_kernels": kernels}
    return tasks, setup


def _torch_tasks(setup: dict) -> tuple[dict[str, Callable[[], Any]], float]:
    """The same tasks in PyTorch on the same weights and batches; also the loss on batch 0."""
    import numpy as np
    import torch
    from torch.func import functional_call
    from torch.nn import functional as F

    net = torch_resnet20()
    copy_flax_params_into_torch(setup["params"], net)
    images = torch.from_numpy(np.transpose(np.asarray(setup["batches"]["image"]), (0, 1, 4, 2, 3)).copy())
    labels = torch.from_numpy(np.asarray(setup["batches"]["label"]).astype(np.int64))
    x, y = images[0], labels[0]

    net.train()
    with torch.no_grad():
        loss0 = float(F.cross_entropy(net(x), y))
    # Forward passes in train mode update the running statistics; the timed tasks start from these.
    state0 = {k: v.clone() for k, v in net.state_dict().items()}
    optimizer = torch.optim.SGD(net.parameters(), lr=LR, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY)
    names = [n for n, _ in net.named_parameters()]
    params = [p for _, p in net.named_parameters()]
    tangent = [torch.full_like(p, 0.01) for p in params]
    buffers = {k: v for k, v in net.named_buffers()}

    def train_step():
        net.train()
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(net(x), y).backward()
        optimizer.step()

    def forward():
        net.eval()
        with torch.no_grad():
            return net(x)

    def gradient():
        net.train()
        return torch.autograd.grad(F.cross_entropy(net(x), y), params)

    def hvp():
        net.train()
        g = torch.autograd.grad(F.cross_entropy(net(x), y), params, create_graph=True)
        return torch.autograd.grad(sum((gi * vi).sum() for gi, vi in zip(g, tangent)), params)

    prunable = [n for n in names if n.endswith("weight") and ("conv" in n or n.startswith("logits"))]
    theta0 = {n: p.detach() for n, p in zip(names, params)}

    def prospr():
        # The authors' formulation: w_0 = c * theta_0 on the prunable weights, M steps kept in the
        # graph (create_graph=True), dL(w_M)/dc by one more backward pass.
        net.train()
        masks = {n: torch.ones_like(theta0[n], requires_grad=True) for n in prunable}
        w = {n: (masks[n] * theta0[n] if n in masks else theta0[n].clone().requires_grad_(True)) for n in names}
        for k in range(PROSPR_STEPS):
            loss = F.cross_entropy(functional_call(net, (w, buffers), (images[k],)), labels[k])
            grads = torch.autograd.grad(loss, list(w.values()), create_graph=True)
            w = {n: wn - LR * gn for (n, wn), gn in zip(w.items(), grads)}
        meta = F.cross_entropy(functional_call(net, (w, buffers), (images[PROSPR_STEPS],)), labels[PROSPR_STEPS])
        g = torch.autograd.grad(meta, [masks[n] for n in prunable])
        return [gi.abs() for gi in g]

    tasks = {
        "train_step": train_step,
        "train_step_plain": train_step,
        "forward": forward,
        "gradient": gradient,
        "hvp": hvp,
        "prospr": prospr,
    }
    net.load_state_dict(state0)
    return tasks, loss0


def _timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _worker(args: argparse.Namespace) -> dict:
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: args.worker_threads])
    import torch

    torch.set_num_threads(args.worker_threads)
    import jax

    jax_tasks, setup = _jax_tasks(args.batch_size)
    torch_tasks, torch_loss = _torch_tasks(setup)
    # Same network, same weights, same batch: the losses agree to float32 rounding.
    if abs(torch_loss - setup["loss"]) > 1e-3 * max(1.0, abs(setup["loss"])):
        raise RuntimeError(f"the two networks disagree: JAX loss {setup['loss']:.6f}, PyTorch {torch_loss:.6f}")
    rows = []
    for name in args.tasks:
        j, t = jax_tasks[name], torch_tasks[name]
        compile_s = _timed(j)  # trace + compile + first run
        t()  # warm-up (allocator, thread pool)
        jax_s, torch_s = [], []
        for _ in range(args.repeats):
            jax_s.append(_timed(j))
            torch_s.append(_timed(t))
        rows.append({
            "task": name, "threads": args.worker_threads, "batch_size": args.batch_size,
            "jax_ms": 1e3 * statistics.median(jax_s), "torch_ms": 1e3 * statistics.median(torch_s),
            "ratio": statistics.median(jax_s) / statistics.median(torch_s), "jax_compile_s": compile_s,
            "repeats": args.repeats,
        })
    return {"rows": rows, "jax": jax.__version__, "torch": torch.__version__, "loss": setup["loss"],
            "compiler_options": setup["compiler_options"], "conv_kernels": setup["conv_kernels"]}


# --------------------------------------------------------------------------- per-convolution timings


def _conv_worker(args: argparse.Namespace) -> dict:
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: args.worker_threads])
    import torch

    torch.set_num_threads(args.worker_threads)
    import jax
    import jax.numpy as jnp
    from jax import lax

    from prospr_jax._src.cpu_conv import kernels_available, with_cpu_conv_kernels
    from prospr_jax._src.cpu_options import cpu_compiler_options
    from prospr_jax._src.jaxpr.canonical_convs import canonicalize_convs

    options = cpu_compiler_options()  # what the project's train step and ProsPr are compiled with
    n = args.batch_size
    rows = []
    for size, c_in, c_out, stride, count in RESNET20_CONVS:
        x = jax.random.normal(jax.random.key(0), (n, size, size, c_in))
        w = jax.random.normal(jax.random.key(1), (3, 3, c_in, c_out)) * 0.1

        def conv(x, w, stride=stride):
            return lax.conv_general_dilated(x, w, (stride, stride), ((1, 1), (1, 1)),
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))

        g = jnp.ones_like(conv(x, w))
        fwd = jax.jit(conv)
        d_input = jax.jit(lambda x, w, g: jax.vjp(lambda a: conv(a, w), x)[1](g)[0])
        def weight_grad(x, w, g):
            return jax.vjp(lambda b: conv(x, b), w)[1](g)[0]

        def d_input_fn(x, w, g):
            return jax.vjp(lambda a: conv(a, w), x)[1](g)[0]

        d_weight = jax.jit(weight_grad)
        d_weight_dots = jax.jit(canonicalize_convs(weight_grad, window_dots=True))
        fwd_opt = jax.jit(conv, compiler_options=options)
        d_input_opt = jax.jit(d_input_fn, compiler_options=options)
        d_weight_opt = jax.jit(weight_grad, compiler_options=options)
        # The project's kernels (XLA's convolution where they are unavailable: then equal to "opt").
        kernel_conv = with_cpu_conv_kernels(conv) if kernels_available() else conv
        fwd_kern = jax.jit(kernel_conv)
        d_input_kern = jax.jit(lambda x, w, g: jax.vjp(lambda a: kernel_conv(a, w), x)[1](g)[0])
        d_weight_kern = jax.jit(lambda x, w, g: jax.vjp(lambda b: kernel_conv(x, b), w)[1](g)[0])
        xt = torch.randn(n, c_in, size, size)
        wt = torch.randn(c_out, c_in, 3, 3) * 0.1
        gt = torch.ones_like(torch.nn.functional.conv2d(xt, wt, stride=stride, padding=1))

        def t_backward(mask):
            return lambda: torch.ops.aten.convolution_backward(
                gt, xt, wt, None, [stride, stride], [1, 1], [1, 1], False, [0, 0], 1, mask)

        pairs = {
            "forward": (lambda: jax.block_until_ready(fwd(x, w)),
                        lambda: torch.nn.functional.conv2d(xt, wt, stride=stride, padding=1)),
            "d_input": (lambda: jax.block_until_ready(d_input(x, w, g)), t_backward([True, False, False])),
            "d_weight": (lambda: jax.block_until_ready(d_weight(x, w, g)), t_backward([False, True, False])),
            "d_weight_dots": (lambda: jax.block_until_ready(d_weight_dots(x, w, g)), t_backward([False, True, False])),
            "forward_opt": (lambda: jax.block_until_ready(fwd_opt(x, w)),
                            lambda: torch.nn.functional.conv2d(xt, wt, stride=stride, padding=1)),
            "d_input_opt": (lambda: jax.block_until_ready(d_input_opt(x, w, g)), t_backward([True, False, False])),
            "d_weight_opt": (lambda: jax.block_until_ready(d_weight_opt(x, w, g)), t_backward([False, True, False])),
            "forward_kern": (lambda: jax.block_until_ready(fwd_kern(x, w)),
                             lambda: torch.nn.functional.conv2d(xt, wt, stride=stride, padding=1)),
            "d_input_kern": (lambda: jax.block_until_ready(d_input_kern(x, w, g)), t_backward([True, False, False])),
            "d_weight_kern": (lambda: jax.block_until_ready(d_weight_kern(x, w, g)),
                              t_backward([False, True, False])),
        }
        row = {"shape": f"{size}x{size} {c_in}->{c_out} s{stride}", "count": count}
        for name, (j, t) in pairs.items():
            j(), t()
            js, ts = [], []
            for _ in range(args.repeats):
                js.append(_timed(j))
                ts.append(_timed(t))
            row[f"{name}_jax_ms"] = 1e3 * statistics.median(js)
            row[f"{name}_torch_ms"] = 1e3 * statistics.median(ts)
        rows.append(row)
    return {"conv_rows": rows, "threads": args.worker_threads}


# --------------------------------------------------------------------------- driver


def _table(rows: list[dict]) -> str:
    head = f"{'task':<17} {'threads':>7} {'JAX ms':>9} {'PyTorch ms':>11} {'ratio':>6} {'JAX compile s':>14}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['task']:<17} {r['threads']:>7} {r['jax_ms']:>9.1f} {r['torch_ms']:>11.1f} "
                     f"{r['ratio']:>6.2f} {r['jax_compile_s']:>14.1f}")
    return "\n".join(lines)


_CONV_COLUMNS = (  # (header, row key)
    ("fwd JAX", "forward_jax_ms"), ("fwd opt", "forward_opt_jax_ms"), ("fwd kern", "forward_kern_jax_ms"),
    ("fwd PT", "forward_torch_ms"),
    ("dx JAX", "d_input_jax_ms"), ("dx opt", "d_input_opt_jax_ms"), ("dx kern", "d_input_kern_jax_ms"),
    ("dx PT", "d_input_torch_ms"),
    ("dw JAX", "d_weight_jax_ms"), ("dw opt", "d_weight_opt_jax_ms"), ("dw dots", "d_weight_dots_jax_ms"),
    ("dw kern", "d_weight_kern_jax_ms"), ("dw PT", "d_weight_torch_ms"),
)


def _conv_table(result: dict) -> str:
    head = (f"{'conv (count)':<22} " + " ".join(f"{h:>8}" for h, _ in _CONV_COLUMNS)
            + f"   (ms, {result['threads']} thread(s); JAX: XLA defaults, opt: the project's compiler options, "
            "dots: window matmuls, kern: the project's kernels)")
    lines = [head, "-" * len(head)]
    for r in result["conv_rows"]:
        lines.append(f"{r['shape'] + ' (' + str(r['count']) + ')':<22} "
                     + " ".join(f"{r[k]:>8.1f}" for _, k in _CONV_COLUMNS))
    # Every convolution of one ResNet-20 pass, weighted by its count (the stem's input gradient is not
    # needed in training but is included).
    lines.append(f"{'ResNet-20 total':<22} " + " ".join(
        f"{sum(r[k] * r['count'] for r in result['conv_rows']):>8.1f}" for _, k in _CONV_COLUMNS))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--quick", action="store_true", help="batch 8, 1 repetition: a smoke test")
    parser.add_argument("--convs", action="store_true", help="time every ResNet-20 convolution shape instead")
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--worker-threads", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.batch_size, args.repeats = 8, 1
    if any(t < 1 for t in args.threads) or args.batch_size < 1 or args.repeats < 1:
        parser.error("--threads, --batch-size and --repeats must be >= 1")

    if args.worker_threads:
        print(json.dumps(_conv_worker(args) if args.convs else _worker(args)))
        return []

    available = len(os.sched_getaffinity(0))
    results = []
    for threads in args.threads:
        if threads > available:
            print(f"skipping {threads} threads: only {available} core(s) available", flush=True)
            continue
        cmd = [sys.executable, "-m", "experiments.bench_cpu", "--worker-threads", str(threads),
               "--batch-size", str(args.batch_size), "--repeats", str(args.repeats), "--tasks", *args.tasks]
        if args.convs:
            cmd.append("--convs")
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
        if out.returncode != 0:
            raise RuntimeError(f"worker with {threads} thread(s) failed:\n{out.stderr[-3000:]}")
        result = json.loads(out.stdout.strip().splitlines()[-1])
        results.append(result)
        if args.convs:
            print(_conv_table(result), flush=True)
        else:
            print(f"jax {result['jax']}, torch {result['torch']}; ResNet-20, batch {args.batch_size}, "
                  f"float32, medians of {args.repeats} interleaved repetitions; project compiler options "
                  f"{result['compiler_options']}; project convolution kernels "
                  f"{'on' if result['conv_kernels'] else 'off (XLA convolutions)'}", flush=True)
            print(_table(result["rows"]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
