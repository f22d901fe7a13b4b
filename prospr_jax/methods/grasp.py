"""GraSP: gradient signal preservation (Wang et al., ICLR 2020).

Saliency ``S = -theta * (H g)``, ``g`` the gradient and ``H`` the Hessian of the loss at
initialization; GraSP REMOVES the weights with the LARGEST ``S`` (keeps the smallest). This module
returns scores in the library's convention (higher = keep)::

    scores = -S = theta * (H g)

so ``masks_from_scores(grasp_scores(...), sparsity)`` removes the largest ``S`` first, as the paper
does. Scores can be negative.

The two passes follow the official code (``pruner/GraSP.py``):

1. ``g`` = gradient of the loss w.r.t. the prunable weights, accumulated over the batches;
2. ``H g`` = gradient of ``<stop_gradient(g), dL/dtheta>`` (double backprop), accumulated over the
   same batches; ``H`` is the block of the Hessian over the prunable weights only (``g`` is zero on
   biases and BatchNorm parameters, as the official code differentiates w.r.t. the weights only;
   ``full_gradient=True`` uses ``g`` over every parameter instead).

The official code sums per-half-batch gradients; averaging over equal-sized batches, as done here,
multiplies ``g`` and ``H g`` by positive constants and leaves the ranking unchanged.

Temperature: the official code divides the logits by ``T = 200`` in BOTH passes (gradient and
Hessian-gradient product); so does the registry adapter (:func:`grasp_method`), which needs
``problem.apply_fn`` for it. Without ``apply_fn`` it falls back to ``problem.loss_fn`` with ``T = 1``
and says so. Data: the official code draws a class-balanced set, 10 samples per class on CIFAR-10
(:func:`balanced_batch`). BatchNorm runs in training mode (batch statistics), as in the official code.

Not reproduced: the official code re-initialises every Linear layer with Xavier-normal before scoring
(``reinit=True``) and then trains the network with the ORIGINAL Linear weights; this project scores the
weights it trains.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from prospr_jax.masks import scores_on_prunable
from prospr_jax.problem import PruningProblem
from prospr_jax.prospr import LossFn, first_batch, resolve_prunable, stack_batches
from prospr_jax.prunable import PrunableSpec
from prospr_jax.tree import PyTree, leading_axis_sizes

HVP_MODES = ("double_backprop", "jvp")
DEFAULT_TEMPERATURE = 200.0

_tmap = jax.tree_util.tree_map


def _vdot(a: PyTree, b: PyTree) -> jax.Array:
    return sum(jnp.sum(x * y) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def _mean_over_batches(fn, batches: PyTree, single_batch: bool) -> PyTree:
    if single_batch:
        return fn(batches)
    n = leading_axis_sizes(batches)[0][1]
    # A Python loop (unrolled), not lax.scan: on XLA:CPU a scan over batches ran convolutions much
    # slower (25x for the Iter-SNIP/FORCE round on ResNet-20), and the number of batches is small.
    total = fn(_tmap(lambda b: b[0], batches))
    for k in range(1, n):
        total = _tmap(jnp.add, total, fn(_tmap(lambda b: b[k], batches)))
    return _tmap(lambda t: t / n, total)


@functools.partial(jax.jit, static_argnames=("loss_fn", "single_batch", "hvp"))
def _theta_times_hg(loss_fn, params, batches, direction, *, single_batch, hvp):
    grad_fn = jax.grad(loss_fn)
    g = _mean_over_batches(lambda b: grad_fn(params, b), batches, single_batch)
    v = jax.lax.stop_gradient(_tmap(lambda gi, di: gi * di, g, direction))

    def hg_on(batch):
        if hvp == "jvp":
            return jax.jvp(lambda p: grad_fn(p, batch), (params,), (v,))[1]
        return jax.grad(lambda p: _vdot(v, grad_fn(p, batch)))(params)

    hg = _mean_over_batches(hg_on, batches, single_batch)
    return _tmap(jnp.multiply, params, hg)


def grasp_scores(
    loss_fn: LossFn,
    params: PyTree,
    batches: PyTree,
    *,
    single_batch: bool = False,
    hvp: str = "double_backprop",
    full_gradient: bool = False,
    prunable: PrunableSpec = None,
    exclude_first: bool = False,
    exclude_last: bool = False,
) -> PyTree:
    """GraSP scores ``-S = theta * (H g)`` of every prunable weight (higher = keep).

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``; put the temperature in it (logits / T) to follow
        the official code (see :func:`temperature_loss`).
      params: initial parameters ``theta``.
      batches: pytree whose leaves have a leading axis of B batches; ``g`` and ``H g`` are averaged over
        them (two passes). With ``single_batch=True``, one batch.
      single_batch: ``batches`` is a single batch.
      hvp: ``'double_backprop'`` (reverse-over-reverse, the official code's ``create_graph=True``) or
        ``'jvp'`` (forward-over-reverse). Both give ``H g`` exactly (H is symmetric).
      full_gradient: use ``g`` over ALL parameters in ``H g`` (default False: ``g`` over the prunable
        weights only, the Hessian block the official code uses).
      prunable, exclude_first, exclude_last: which leaves are scored (see
        :func:`prospr_jax.prospr.prospr_scores`).

    Returns:
      Scores pytree: ``theta * (H g)`` on pruned leaves (may be negative), 0-d zero elsewhere. Remove
      the lowest (= the largest GraSP saliency ``S``). Jitted; can be wrapped in ``jax.jit``.
    """
    if hvp not in HVP_MODES:
        raise ValueError(f"`hvp` must be one of {HVP_MODES}, got {hvp!r}")
    if not single_batch:
        _check_stacked(batches)
    selected = resolve_prunable(
        loss_fn, params, first_batch(batches, single_batch), prunable, exclude_first, exclude_last
    )
    direction = _tmap(
        lambda keep, p: jnp.asarray(1.0 if (keep or full_gradient) else 0.0, jnp.result_type(p)), selected, params
    )
    theta_hg = _theta_times_hg(loss_fn, params, batches, direction, single_batch=bool(single_batch), hvp=hvp)
    return scores_on_prunable(theta_hg, selected)


def _check_stacked(batches: PyTree) -> None:
    sizes = leading_axis_sizes(batches)
    if not sizes:
        raise ValueError("`batches` has no array leaves")
    lengths = {s for _, s in sizes}
    if None in lengths or len(lengths) != 1:
        raise ValueError(
            "every leaf of `batches` must have the same leading axis (the number of batches); got "
            f"{dict(sizes)}. For one batch pass `single_batch=True`."
        )


class TemperatureLoss:
    """Mean softmax cross-entropy of ``apply_fn(params, model_state, image, train=True) / temperature``
    on ``{'image', 'label'}`` batches (integer labels), BatchNorm in training mode.

    Equal (and equally hashed) for the same ``apply_fn`` and ``model_state`` objects and temperature,
    so building it again for the same problem reuses the compiled GraSP computation.
    """

    def __init__(self, apply_fn: Any, model_state: PyTree, temperature: float):
        self.apply_fn, self.model_state, self.temperature = apply_fn, model_state, float(temperature)

    def __call__(self, params: PyTree, batch: Mapping[str, Any]) -> jax.Array:
        logits = self.apply_fn(params, self.model_state, batch["image"], True) / self.temperature
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()

    def _key(self) -> tuple:
        return (id(self.apply_fn), id(self.model_state), self.temperature)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TemperatureLoss) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())


def temperature_loss(apply_fn: Any, model_state: PyTree, temperature: float) -> LossFn:
    """:class:`TemperatureLoss`: cross-entropy of the logits divided by ``temperature``."""
    return TemperatureLoss(apply_fn, model_state, temperature)


def balanced_batch(
    batch_fn: Any,
    num_classes: int,
    samples_per_class: int,
    *,
    start: int = 0,
    max_batches: int = 1000,
) -> tuple[dict, int]:
    """A class-balanced batch: the first ``samples_per_class`` examples of each class met in
    ``batch_fn(start), batch_fn(start + 1), ...`` (the official ``GraSP_fetch_data``).

    Args:
      batch_fn: ``batch_fn(i) -> {'label': int [B], ...}``; every leaf has the leading axis B.
      num_classes: labels are in ``[0, num_classes)``.
      samples_per_class: examples to take per class (10 for CIFAR-10 in the paper).
      start: first batch index to read.
      max_batches: give up (ValueError) after reading this many batches.

    Returns:
      ``(batch, next_start)``: the balanced batch (``num_classes * samples_per_class`` examples, in the
      order met) and the index of the first batch not read.
    """
    for name, value in (("num_classes", num_classes), ("samples_per_class", samples_per_class)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"`{name}` must be an integer >= 1, got {value!r}")
    counts = np.zeros(int(num_classes), int)
    pieces = []
    i = start
    while counts.min() < samples_per_class:
        if i - start >= max_batches:
            short = [int(c) for c in np.flatnonzero(counts < samples_per_class)]
            raise ValueError(
                f"read {max_batches} batches and still miss examples of classes {short[:10]} for a balanced "
                f"set of {samples_per_class} per class; check `num_classes` or pass samples_per_class=None"
            )
        batch = batch_fn(i)
        i += 1
        if not isinstance(batch, Mapping) or "label" not in batch:
            raise ValueError(
                "class-balanced sampling needs batches that are dicts with a 'label' entry; pass "
                "samples_per_class=None to use the batches as they are"
            )
        labels = np.asarray(batch["label"])
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"batch['label'] must be integer class indices of shape [B], got {labels.dtype} {labels.shape}")
        if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(f"labels must be in [0, num_classes={num_classes}), got range [{labels.min()}, {labels.max()}]")
        take = []
        for idx, c in enumerate(labels):
            if counts[c] < samples_per_class:
                counts[c] += 1
                take.append(idx)
        if take:
            sel = np.asarray(take)
            pieces.append(_tmap(lambda x: np.asarray(x)[sel], dict(batch)))
    merged = _tmap(lambda *xs: jnp.asarray(np.concatenate(xs)), *pieces)
    return merged, i


def _resolve_temperature(problem: PruningProblem, temperature: Optional[float]) -> tuple[float, LossFn, str]:
    if temperature is None:
        if problem.apply_fn is None:
            return 1.0, problem.loss_fn, (
                "problem has no apply_fn: GraSP used problem.loss_fn without the official temperature "
                f"(T = 1 instead of {DEFAULT_TEMPERATURE:g})"
            )
        temperature = DEFAULT_TEMPERATURE
    try:
        temperature = float(temperature)
    except (TypeError, ValueError):
        raise TypeError(f"`temperature` must be a positive number, got {temperature!r}") from None
    if not np.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"`temperature` must be a positive finite number, got {temperature!r}")
    if temperature == 1.0:
        return 1.0, problem.loss_fn, "T = 1: problem.loss_fn used as is"
    if problem.apply_fn is None:
        raise ValueError(
            f"GraSP with temperature={temperature:g} needs `problem.apply_fn` (logits / T); pass temperature=1 "
            "to use problem.loss_fn"
        )
    return temperature, temperature_loss(problem.apply_fn, problem.model_state, temperature), (
        f"cross-entropy of logits / {temperature:g} (official GraSP temperature)"
    )


def grasp_describe(problem: PruningProblem, *, temperature: Optional[float] = None, **_: Any) -> dict:
    """Info entries the registry adds for ``'grasp'``: the temperature used and how."""
    t, _, note = _resolve_temperature(problem, temperature)
    return {"temperature": t, "temperature_note": note}


def grasp_method(
    problem: PruningProblem,
    *,
    temperature: Optional[float] = None,
    num_batches: int = 1,
    samples_per_class: Optional[int] = 10,
    hvp: str = "double_backprop",
    full_gradient: bool = False,
) -> PyTree:
    """Registry adapter of ``'grasp'``.

    Args:
      problem: needs ``batch_fn``; ``apply_fn`` for the temperature; ``num_classes`` for balanced sets.
      temperature: logits divisor; ``None`` = 200 (official) when ``problem.apply_fn`` exists, else 1
        with a warning (and ``info['temperature_note']`` from ``prune``).
      num_batches: number of batches (the official ``num_iters``, default 1) over which ``g`` and
        ``H g`` are averaged.
      samples_per_class: build each batch class-balanced with this many examples per class from
        ``problem.batch(0), problem.batch(1), ...`` (official: 10 on CIFAR-10); ``None`` uses
        ``problem.batch(0 .. num_batches - 1)`` as they are.
      hvp, full_gradient: see :func:`grasp_scores`.
    """
    problem.require("batch_fn", method="grasp")
    if isinstance(num_batches, bool) or not isinstance(num_batches, (int, np.integer)) or num_batches < 1:
        raise ValueError(f"`num_batches` must be an integer >= 1, got {num_batches!r}")
    t, loss_fn, note = _resolve_temperature(problem, temperature)
    if temperature is None and problem.apply_fn is None:
        warnings.warn(note, UserWarning, stacklevel=2)
    if samples_per_class is None:
        batches = [problem.batch(i) for i in range(num_batches)]
    else:
        if problem.num_classes is None:
            raise ValueError(
                "method 'grasp' with class-balanced batches needs `PruningProblem(num_classes=...)`; "
                "or pass samples_per_class=None"
            )
        batches, start = [], 0
        for _ in range(num_batches):
            batch, start = balanced_batch(problem.batch, problem.num_classes, samples_per_class, start=start)
            batches.append(batch)
    return grasp_scores(
        loss_fn,
        problem.params,
        stack_batches(batches),
        hvp=hvp,
        full_gradient=full_gradient,
        prunable=problem.prunable_tree(),
    )
