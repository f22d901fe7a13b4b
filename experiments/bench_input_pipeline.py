"""Input pipeline throughput against the throughput of a jitted train step.

Prints one row per data set and batch size:

* pipeline, no aug / aug: images/s of ``train_batches`` alone (background prefetch thread on),
  without and with random crop + flip;
* grain aug (K): the augmented pipeline read by a grain pipeline of K threads (``workers=K``,
  the runner's ``--data-workers K``), the same batches;
* train step: images/s of a jitted forward + backward + SGD update of ResNet-20 (from
  ``prospr_jax.models``; a small flax CNN if the model zoo is not importable) on a fixed batch
  (measured once per input shape);
* step fed: images/s of that step consuming the augmented pipeline's batches, i.e. what a
  training loop gets. When "step fed" is close to "train step", the pipeline keeps up.

Data sets: 'digits' (always available) and the shared CIFAR-10 archive
``../shared/data/cifar10-jpeg.tar.gz`` relative to the repo root, when present (its tfds cache
is built on first use, under --cache-dir or the default cache dir), read through the tfds
data source and, on a second row, after ``in_memory=True``.

Usage: python -m experiments.bench_input_pipeline [--batch-size 128] [--steps 8] [--workers 4]
"""

from __future__ import annotations

import argparse
import functools
import itertools
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

import prospr_jax.data as pdata

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_CIFAR10 = os.path.join(REPO_ROOT, "..", "shared", "data", "cifar10-jpeg.tar.gz")


def _small_cnn_train_setup(num_classes: int, image_shape: tuple[int, int, int]):
    """Fallback model: two 3x3 convs + dense head, plain flax."""
    import flax.linen as nn
    import optax

    class SmallCNN(nn.Module):
        num_classes: int

        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Conv(16, (3, 3))(x))
            x = nn.relu(nn.Conv(32, (3, 3), strides=2)(x))
            return nn.Dense(self.num_classes)(x.mean(axis=(1, 2)))

    model = SmallCNN(num_classes)
    params = model.init(jax.random.PRNGKey(0), jnp.zeros((1, *image_shape)))["params"]

    def loss_fn(p, batch):
        logits = model.apply({"params": p}, batch["image"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()

    return "small CNN", params, loss_fn


def _train_setup(num_classes: int, image_shape: tuple[int, int, int]):
    """(model name, params, loss_fn(params, batch)) of ResNet-20, or the fallback CNN."""
    try:
        from prospr_jax import models
    except ImportError:
        return _small_cnn_train_setup(num_classes, image_shape)
    model = models.get("resnet20", num_classes)
    params, batch_stats = models.init(model, jax.random.PRNGKey(0), (1, *image_shape))
    return "resnet20", params, models.make_loss_fn(model, batch_stats, train=True)


def _make_sgd_step(loss_fn: Callable, lr: float = 0.1) -> Callable:
    @jax.jit
    def step(params, batch):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch)
        params = jax.tree_util.tree_map(lambda p, g: p - lr * g, params, grads)
        return params, loss

    return step


def _epochs(dataset, batch_size: int, augment: bool = True, workers: int = 0):
    """Training batches of epochs 0, 1, 2, ... (small sets hold few batches per epoch)."""
    for epoch in itertools.count():
        yield from pdata.train_batches(dataset, batch_size=batch_size, epoch=epoch,
                                       augment=augment, workers=workers)


def _pipeline_rate(dataset, batch_size: int, steps: int, augment: bool, workers: int = 0) -> float:
    """Images/s of ``steps`` training batches (after one warm-up batch)."""
    batches = _epochs(dataset, batch_size, augment, workers)
    next(batches)
    start = time.perf_counter()
    count = 0
    for _ in range(steps):
        count += next(batches)["image"].shape[0]
    elapsed = time.perf_counter() - start
    batches.close()
    return count / elapsed


@functools.lru_cache(maxsize=None)
def _step_alone(num_classes: int, image_shape: tuple[int, int, int], batch_size: int, steps: int):
    """(model name, jitted step, params, images/s of the step alone on a fixed batch).

    Cached per input shape: the two CIFAR-10 rows share one compilation and one timing.
    """
    name, params, loss_fn = _train_setup(num_classes, image_shape)
    step = _make_sgd_step(loss_fn)
    rng = np.random.default_rng(0)
    fixed = {
        "image": jnp.asarray(rng.standard_normal((batch_size, *image_shape)), jnp.float32),
        "label": jnp.asarray(rng.integers(0, num_classes, batch_size), jnp.int32),
    }
    for _ in range(2):  # Compile, then one more call to settle allocations.
        params, loss = step(params, fixed)
    loss.block_until_ready()
    start = time.perf_counter()
    for _ in range(steps):
        params, loss = step(params, fixed)
    loss.block_until_ready()
    return name, step, params, steps * batch_size / (time.perf_counter() - start)


def _step_rates(dataset, batch_size: int, steps: int) -> tuple[str, float, float]:
    """(model name, images/s of the step alone, images/s of the step fed by the pipeline)."""
    name, step, params, alone = _step_alone(
        dataset.num_classes, dataset.image_shape, batch_size, steps
    )
    batches = _epochs(dataset, batch_size)
    params, loss = step(params, next(batches))  # Starts the prefetch thread.
    loss.block_until_ready()
    start = time.perf_counter()
    for _ in range(steps):
        params, loss = step(params, next(batches))
    loss.block_until_ready()
    fed = steps * batch_size / (time.perf_counter() - start)
    batches.close()
    return name, alone, fed


def main(argv: Any = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=6, help="timed train steps per data set")
    parser.add_argument("--pipeline-batches", type=int, default=40,
                        help="timed pipeline batches per measurement")
    parser.add_argument("--cache-dir", default=None, help="cache of the CIFAR-10 archive")
    parser.add_argument("--workers", type=int, default=4, help="threads of the grain pipeline column")
    args = parser.parse_args(argv)

    sources = [("digits", lambda: pdata.load("digits"))]
    if os.path.exists(SHARED_CIFAR10):
        sources.append(("cifar10 archive",
                        lambda: pdata.load(SHARED_CIFAR10, cache_dir=args.cache_dir)))
        sources.append(("  in memory", lambda: pdata.load(
            SHARED_CIFAR10, cache_dir=args.cache_dir, in_memory=True)))
    else:
        print("(shared CIFAR-10 archive not found: digits only)")

    print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} CPU cores, "
          f"batch size {args.batch_size}")
    grain_column = f"grain aug ({args.workers})"
    header = (f"{'data set':<16}{'shape':>12}{'pipeline no aug':>17}{'pipeline aug':>14}{grain_column:>16}"
              f"{'model':>10}{'train step':>12}{'step fed':>10}")
    rows = []
    for label, make in sources:
        start = time.perf_counter()
        dataset = make()
        load_s = time.perf_counter() - start
        no_aug = _pipeline_rate(dataset, args.batch_size, args.pipeline_batches, augment=False)
        aug = _pipeline_rate(dataset, args.batch_size, args.pipeline_batches, augment=True)
        grained = _pipeline_rate(dataset, args.batch_size, args.pipeline_batches, augment=True,
                                 workers=args.workers)
        model, alone, fed = _step_rates(dataset, args.batch_size, args.steps)
        shape = "x".join(str(d) for d in dataset.image_shape)
        rows.append(f"{label:<16}{shape:>12}{no_aug:>17,.0f}{aug:>14,.0f}{grained:>16,.0f}"
                    f"{model:>10}{alone:>12,.0f}{fed:>10,.0f}")
        print(f"loaded {label.strip()} in {load_s:.1f} s", flush=True)
    print("images/s:")
    print(header)
    for row in rows:
        print(row)


if __name__ == "__main__":
    main()
