"""``PruningProblem``: everything a pruning method may need, in one value.

Single-shot scorers of the core (:func:`prospr_jax.prospr_scores`, :func:`prospr_jax.snip_scores`)
take a ``loss_fn`` and a params pytree directly. Methods that need more (SynFlow feeds an all-ones
input through the model in inference mode with absolute parameters and statistics; GraSP divides the
logits by a temperature; DRIVE and IMP train) get it from a :class:`PruningProblem`, so that the
method registry can call every method the same way::

    problem = PruningProblem.from_flax(model, variables, batch_fn, input_shape=(32, 32, 3), num_classes=10)
    result = prospr_jax.methods.prune("synflow", problem, sparsity=0.98)   # result.masks, result.history

The problem's functions are the static arguments of the methods' compiled computations: build the
problem once and reuse it, and every method compiles once for it (not once per call).

Batch convention for model-based helpers: a dict ``{'image': float [B, H, W, C], 'label': int [B]}``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional

import jax.numpy as jnp

from prospr_jax._src.jaxpr.forward_order import forward_order
from prospr_jax._src.losses import ApplyFn, LossFn, classifier_loss_fn, flax_apply_fn
from prospr_jax._src.prunable import PrunableSpec, select_prunable
from prospr_jax._src.tree import PyTree
from prospr_jax._src.validate import check_bool, check_callable, check_int, check_shape

BatchFn = Callable[[int], Any]
TrainFn = Callable[..., PyTree]


@dataclasses.dataclass(frozen=True, eq=False)
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
        :func:`prospr_jax.select_prunable`).
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

    def __post_init__(self) -> None:
        check_callable(self.loss_fn, "loss_fn", "(params, batch) -> scalar")
        for name, signature in (
            ("batch_fn", "(i) -> batch"),
            ("apply_fn", "(params, model_state, x, train) -> logits"),
            ("train_fn", "(params, masks, *, steps=None, key=None) -> params"),
        ):
            if getattr(self, name) is not None:
                check_callable(getattr(self, name), name, signature)
        if self.input_shape is not None:
            object.__setattr__(self, "input_shape", check_shape(self.input_shape, "input_shape"))
        if self.num_classes is not None:
            check_int(self.num_classes, "num_classes", low=1)
        check_bool(self.exclude_first, "exclude_first")
        check_bool(self.exclude_last, "exclude_last")
        if self.model_state is None:
            object.__setattr__(self, "model_state", {})

    def batch(self, i: int) -> Any:
        """The i-th training batch; a clear error when the problem has no data."""
        if self.batch_fn is None:
            raise ValueError("this method needs training data: build the PruningProblem with `batch_fn=`")
        return self.batch_fn(i)

    def missing(self, fields: tuple[str, ...]) -> list[str]:
        """The names among ``fields`` that are not set (``None``) on this problem."""
        return [f for f in fields if getattr(self, f) is None]

    def prunable_tree(self) -> PyTree:
        """Bool pytree of the pruned leaves (see :func:`prospr_jax.select_prunable`).

        ``exclude_first``/``exclude_last`` need the forward order of the layers: it is traced through
        ``loss_fn`` on batch 0 when the problem has data, otherwise through ``apply_fn`` on an all-ones
        input of ``input_shape`` (inference mode), so data-free methods need no batch.
        """
        order = None
        if self.exclude_first or self.exclude_last:
            if self.batch_fn is not None:
                order = forward_order(self.loss_fn, self.params, self.batch(0))
            elif self.apply_fn is not None and self.input_shape is not None:
                x = jnp.ones((1, *self.input_shape), jnp.float32)
                order = forward_order(lambda p: self.apply_fn(p, self.model_state, x, False), self.params)
            else:
                raise ValueError(
                    "exclude_first/exclude_last need the layer order: give the PruningProblem a `batch_fn`, "
                    "or `apply_fn` and `input_shape`"
                )
        return select_prunable(
            self.params, self.prunable, exclude_first=self.exclude_first, exclude_last=self.exclude_last, order=order
        )

    def replace(self, **changes: Any) -> "PruningProblem":
        """A copy with ``changes`` applied (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_flax(
        cls,
        model: Any,
        variables: Mapping[str, Any],
        batch_fn: Optional[BatchFn] = None,
        *,
        input_shape: Optional[tuple[int, ...]] = None,
        num_classes: Optional[int] = None,
        **kwargs: Any,
    ) -> "PruningProblem":
        """A problem for a flax.linen classifier called as ``model.apply(variables, x, train=...)``.

        ``variables`` holds ``'params'`` and optionally ``'batch_stats'``. The loss is mean softmax
        cross-entropy with integer labels on ``{'image', 'label'}`` batches, BatchNorm in training
        mode with the updated statistics thrown away (:func:`prospr_jax.classifier_loss_fn`). Extra
        keyword arguments set the other fields.
        """
        state = {k: v for k, v in variables.items() if k != "params"}
        apply_fn = flax_apply_fn(model)
        return cls(
            params=variables["params"],
            loss_fn=classifier_loss_fn(apply_fn, state),
            batch_fn=batch_fn,
            apply_fn=apply_fn,
            model_state=state,
            input_shape=input_shape,
            num_classes=num_classes,
            **kwargs,
        )
