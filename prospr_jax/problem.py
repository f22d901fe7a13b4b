"""``PruningProblem``: everything a pruning method may need, in one value.

Single-shot scorers of the core (:func:`prospr_jax.prospr_scores`, :func:`prospr_jax.snip_scores`)
take a ``loss_fn`` and a params pytree directly. Methods that need more (SynFlow feeds an all-ones
input through the model in inference mode with absolute parameters and statistics; GraSP divides the
logits by a temperature; DRIVE and IMP train) get it from a :class:`PruningProblem`, so that the
method registry can call every method the same way::

    problem = PruningProblem.from_flax(model, variables, batch_fn, input_shape=(32, 32, 3), num_classes=10)
    masks, info = prospr_jax.methods.prune("synflow", problem, sparsity=0.98)

Batch convention for model-based helpers: a dict ``{'image': float [B, H, W, C], 'label': int [B]}``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional

import jax
import optax

from prospr_jax.prunable import PrunableSpec, forward_order, select_prunable
from prospr_jax.tree import PyTree

LossFn = Callable[[PyTree, Any], jax.Array]
BatchFn = Callable[[int], Any]
ApplyFn = Callable[[PyTree, PyTree, jax.Array, bool], jax.Array]
TrainFn = Callable[..., PyTree]


@dataclasses.dataclass(frozen=True)
class PruningProblem:
    """The model, its data and its training loop, as pure functions.

    Attributes:
      params: initial parameters ``theta_0``.
      loss_fn: ``loss_fn(params, batch) -> scalar``: BatchNorm in training mode, updated statistics
        thrown away (the convention of ProsPr, SNIP, GraSP, ...).
      batch_fn: ``batch_fn(i) -> batch``: the i-th training batch, deterministic in ``i``. Methods
        take batches 0, 1, 2, ... as they need them (ProsPr: M + 1; SNIP: 1; iterative methods: one
        per round unless told otherwise). ``None`` for data-free use.
      apply_fn: ``apply_fn(params, model_state, x, train) -> logits``; needed by SynFlow (inference
        mode on an all-ones input), GraSP's temperature and LAP's BatchNorm folding via
        ``model_state``.
      model_state: the non-trainable model state ``apply_fn`` takes (for flax.linen:
        ``{'batch_stats': ...}`` or ``{}``).
      input_shape: shape of ONE input example, e.g. ``(32, 32, 3)`` (data-free methods build inputs).
      num_classes: number of classes (GraSP's balanced sampling, reports).
      prunable, exclude_first, exclude_last: which leaves are pruned (see
        :func:`prospr_jax.prunable.select_prunable`).
      train_fn: for methods that train (DRIVE, IMP): ``train_fn(params, masks, *, steps=None,
        key=None) -> params`` trains the masked network from ``params`` for ``steps`` optimiser steps
        (``None``: the full budget of the caller's recipe) with pruned weights held at zero, and
        returns the trained params (model state updates stay inside the callable). IMP with
        ``rewind_step=k > 0`` also passes ``start_step=k``: continue the learning-rate schedule (and
        data stream) from global step k, and with ``steps=None`` train the remaining ``T - k`` steps
        (Frankle et al. 2020); :func:`prospr_jax.experiment.make_train_fn` does this.
      key: PRNG key for randomised methods.
    """

    params: PyTree
    loss_fn: LossFn
    batch_fn: Optional[BatchFn] = None
    apply_fn: Optional[ApplyFn] = None
    model_state: PyTree = dataclasses.field(default_factory=dict)
    input_shape: Optional[tuple[int, ...]] = None
    num_classes: Optional[int] = None
    prunable: PrunableSpec = None
    exclude_first: bool = False
    exclude_last: bool = False
    train_fn: Optional[TrainFn] = None
    key: Any = None

    def batch(self, i: int) -> Any:
        """The i-th training batch; a clear error when the problem has no data."""
        if self.batch_fn is None:
            raise ValueError("this method needs training data: build the PruningProblem with `batch_fn=`")
        return self.batch_fn(i)

    def prunable_tree(self) -> PyTree:
        """Bool pytree of pruned leaves (forward order traced on batch 0 when excluding layers)."""
        order = None
        if self.exclude_first or self.exclude_last:
            order = forward_order(self.loss_fn, self.params, self.batch(0))
        return select_prunable(
            self.params, self.prunable, exclude_first=self.exclude_first, exclude_last=self.exclude_last, order=order
        )

    def require(self, *fields: str, method: str) -> None:
        """Raise a ``ValueError`` naming ``method`` and the missing fields if any is ``None``."""
        missing = [f for f in fields if getattr(self, f) is None]
        if missing:
            raise ValueError(f"method {method!r} needs PruningProblem field(s) {missing}; they are not set")

    def reject_problem_options(self, options: Mapping[str, Any], *, method: str) -> None:
        """Raise if ``options`` set a field that belongs to the problem (which leaves are pruned)."""
        for key in ("prunable", "exclude_first", "exclude_last"):
            if key in options:
                raise ValueError(f"set `{key}` on the PruningProblem, not as an option of {method!r}")

    def replace(self, **changes: Any) -> "PruningProblem":
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_flax(
        cls,
        model: Any,
        variables: dict,
        batch_fn: Optional[BatchFn] = None,
        *,
        input_shape: Optional[tuple[int, ...]] = None,
        num_classes: Optional[int] = None,
        **kwargs: Any,
    ) -> "PruningProblem":
        """A problem for a flax.linen classifier called as ``model.apply(variables, x, train=...)``.

        ``variables`` holds ``'params'`` and optionally ``'batch_stats'``. The loss is mean softmax
        cross-entropy with integer labels on ``{'image', 'label'}`` batches, BatchNorm in training
        mode with the updated statistics thrown away. Extra keyword arguments set the other fields.
        """
        params = variables["params"]
        state = {k: v for k, v in variables.items() if k != "params"}

        def apply_fn(p: PyTree, s: PyTree, x: jax.Array, train: bool) -> jax.Array:
            if train and s:
                logits, _ = model.apply({"params": p, **s}, x, train=True, mutable=list(s))
                return logits
            return model.apply({"params": p, **s}, x, train=train)

        def loss_fn(p: PyTree, batch: Any) -> jax.Array:
            logits = apply_fn(p, state, batch["image"], True)
            return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()

        return cls(
            params=params,
            loss_fn=loss_fn,
            batch_fn=batch_fn,
            apply_fn=apply_fn,
            model_state=state,
            input_shape=input_shape,
            num_classes=num_classes,
            **kwargs,
        )
