"""Score a small flax CNN with ProsPr on synthetic data and print the per-layer sparsity report.

    python -m experiments.score_demo [--sparsity 0.9] [--num-steps 3]

Offline and fast (a few seconds on a laptop core): it shows the core API end to end:
``prospr_scores`` -> ``masks_from_scores`` -> ``apply_masks`` -> ``sparsity_report``.
"""

from __future__ import annotations

import argparse
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import prospr_jax as pj


class SmallCNN(nn.Module):
    num_classes: int = 10

    @nn.compact
    def __call__(self, x, train: bool):
        for features in (16, 32):
            x = nn.Conv(features, (3, 3), use_bias=False)(x)
            x = nn.BatchNorm(use_running_average=not train)(x)
            x = nn.max_pool(nn.relu(x), (2, 2), strides=(2, 2))
        return nn.Dense(self.num_classes)(x.reshape(x.shape[0], -1))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--num-steps", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    model = SmallCNN()
    key = jax.random.key(args.seed)
    images = jax.random.normal(key, (args.num_steps + 1, 64, 16, 16, 3))
    labels = jax.random.randint(jax.random.fold_in(key, 1), (args.num_steps + 1, 64), 0, 10)
    batches = {"image": images, "label": labels}
    variables = model.init(jax.random.fold_in(key, 2), images[0], train=False)
    params, batch_stats = variables["params"], variables["batch_stats"]

    def loss_fn(p, batch):
        # BatchNorm in training mode; the updated statistics are thrown away.
        logits, _ = model.apply(
            {"params": p, "batch_stats": batch_stats}, batch["image"], train=True, mutable=["batch_stats"]
        )
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()

    start = time.perf_counter()
    scores = jax.block_until_ready(pj.prospr_scores(loss_fn, params, batches, num_steps=args.num_steps))
    elapsed = time.perf_counter() - start
    masks = pj.masks_from_scores(scores, args.sparsity)
    pruned = pj.apply_masks(params, masks)
    print(f"ProsPr (M={args.num_steps}) scored {pj.sparsity_report(masks, params).prunable_total:,} weights "
          f"in {elapsed:.2f} s (compile included)")
    print(pj.sparsity_report(masks, pruned))


if __name__ == "__main__":
    main()
