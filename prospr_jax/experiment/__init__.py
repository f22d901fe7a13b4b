"""The prune-then-train experiment harness: glue between the trainer, the data pipeline and the pruners."""

from prospr_jax.experiment.training import batch_at_step, make_train_fn

__all__ = ["batch_at_step", "make_train_fn"]
