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
Hessian-gradient product); so does the registry row (:class:`Grasp`), which needs
``problem.apply_fn`` for it. Without ``apply_fn`` it falls back to ``problem.loss_fn`` with ``T = 1``
and says so. Data: the official code draws a class-balanced set, 10 samples per class on CIFAR-10
(:func:`balanced_batch`). BatchNorm runs in training mode (batch statistics), as in the official code.

Not reproduced: the official code re-initialises every Linear layer with Xavier-normal before scoring
(``reinit=True``) and then trains the network with the ORIGINAL Linear weights; this project scores the
weights it trains.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from prospr_jax._src.losses import ApplyFn, LossFn, classifier_loss
from prospr_jax._src.masks import scores_on_prunable
from prospr_jax._src.problem import PruningProblem
from prospr_jax._src.prunable import PrunableSpec, prunable_for_loss
from prospr_jax._src.tree import PyTree, leading_axis_sizes
from prospr_jax._src.validate import check_bool, check_choice, check_int, check_optional_int, check_real
from prospr_jax.methods.base import Method, register
from prospr_jax.methods.prospr import first_batch, stack_batches

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


@functools.partial(jax.jit, static_argnames=("loss_fn", "single_batch", "hvp"))
def _grasp_of_loss(loss_fn, params, batches, direction, *, single_batch, hvp):
    return _theta_times_hg(loss_fn, params, batches, direction, single_batch=single_batch, hvp=hvp)


@functools.partial(jax.jit, static_argnames=("apply_fn", "single_batch", "hvp"))
def _grasp_of_logits(apply_fn, params, model_state, temperature, batches, direction, *, single_batch, hvp):
    # The model (static) and the temperature (data) instead of a loss closure built per call: the
    # computation compiles once per apply_fn, whatever the temperature.
    def loss_fn(p, batch):
        return classifier_loss(apply_fn, p, model_state, batch, train=True, temperature=temperature)

    return _theta_times_hg(loss_fn, params, batches, direction, single_batch=single_batch, hvp=hvp)


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
        the official code (as the registry row does from ``problem.apply_fn``).
      params: initial parameters ``theta``.
      batches: pytree whose leaves have a leading axis of B batches; ``g`` and ``H g`` are averaged over
        them (two passes). With ``single_batch=True``, one batch.
      single_batch: ``batches`` is a single batch.
      hvp: ``'double_backprop'`` (reverse-over-reverse, the official code's ``create_graph=True``) or
        ``'jvp'`` (forward-over-reverse). Both give ``H g`` exactly (H is symmetric).
      full_gradient: use ``g`` over ALL parameters in ``H g`` (default False: ``g`` over the prunable
        weights only, the Hessian block the official code uses).
      prunable, exclude_first, exclude_last: which leaves are scored (see
        :func:`prospr_jax.prospr_scores`).

    Returns:
      Scores pytree: ``theta * (H g)`` on pruned leaves (may be negative), 0-d zero elsewhere. Remove
      the lowest (= the largest GraSP saliency ``S``). Jitted; can be wrapped in ``jax.jit``.
    """
    check_choice(hvp, "hvp", HVP_MODES)
    single_batch = check_bool(single_batch, "single_batch")
    if not single_batch:
        _check_stacked(batches)
    selected = prunable_for_loss(
        loss_fn, params, first_batch(batches, single_batch), prunable, exclude_first, exclude_last
    )
    theta_hg = _grasp_of_loss(
        loss_fn, params, batches, _direction(selected, params, full_gradient), single_batch=single_batch, hvp=hvp
    )
    return scores_on_prunable(theta_hg, selected)


def _direction(selected: PyTree, params: PyTree, full_gradient: bool) -> PyTree:
    """1 on the leaves whose gradient enters ``H g`` (the prunable ones, or all), 0 elsewhere."""
    full_gradient = check_bool(full_gradient, "full_gradient")
    return _tmap(
        lambda keep, p: jnp.asarray(1.0 if (keep or full_gradient) else 0.0, jnp.result_type(p)), selected, params
    )


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
    num_classes = check_int(num_classes, "num_classes", low=1)
    samples_per_class = check_int(samples_per_class, "samples_per_class", low=1)
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


@dataclasses.dataclass(frozen=True)
class GraspOptions:
    """Options of GraSP's registry row.

    Attributes:
      temperature: logits divisor; ``None`` = 200 (official) when ``problem.apply_fn`` exists, else 1
        with a warning (and ``extras['temperature_note']``).
      num_batches: number of batches (the official ``num_iters``, default 1) over which ``g`` and
        ``H g`` are averaged.
      samples_per_class: build each batch class-balanced with this many examples per class from
        ``problem.batch(0), problem.batch(1), ...`` (official: 10 on CIFAR-10); ``None`` uses
        ``problem.batch(0 .. num_batches - 1)`` as they are.
      hvp, full_gradient: see :func:`grasp_scores`.
    """

    temperature: Optional[float] = None
    num_batches: int = 1
    samples_per_class: Optional[int] = 10
    hvp: str = "double_backprop"
    full_gradient: bool = False

    def __post_init__(self) -> None:
        if self.temperature is not None:
            object.__setattr__(self, "temperature", check_real(self.temperature, "temperature", low=0.0, low_open=True))
        object.__setattr__(self, "num_batches", check_int(self.num_batches, "num_batches", low=1))
        object.__setattr__(self, "samples_per_class", check_optional_int(self.samples_per_class, "samples_per_class", low=1))
        check_choice(self.hvp, "hvp", HVP_MODES)
        check_bool(self.full_gradient, "full_gradient")


def _temperature(problem: PruningProblem, options: GraspOptions) -> tuple[float, str]:
    """The temperature used on ``problem`` and how it was chosen."""
    if options.temperature is None:
        if problem.apply_fn is None:
            return 1.0, (
                "problem has no apply_fn: GraSP used problem.loss_fn without the official temperature "
                f"(T = 1 instead of {DEFAULT_TEMPERATURE:g})"
            )
        return DEFAULT_TEMPERATURE, f"cross-entropy of logits / {DEFAULT_TEMPERATURE:g} (official GraSP temperature)"
    if options.temperature == 1.0:
        return 1.0, "T = 1: problem.loss_fn used as is"
    return options.temperature, f"cross-entropy of logits / {options.temperature:g}"


@register
class Grasp(Method):
    """Registry row of GraSP on a :class:`prospr_jax.PruningProblem` (see :class:`GraspOptions`)."""

    name = "grasp"
    paper = "Wang et al., ICLR 2020"
    idea = "remove the largest S = -theta * (H g) (keep gradient flow); logits / 200, 10 samples per class"
    data = "1 batch"
    cost = "2 forward/backward passes + 1 Hessian-vector product"
    needs = ("batch_fn",)
    Options = GraspOptions

    def requirements(self, options: GraspOptions) -> tuple[str, ...]:
        needs = list(self.needs)
        if options.samples_per_class is not None:
            needs.append("num_classes")
        if options.temperature not in (None, 1.0):
            needs.append("apply_fn")
        return tuple(needs)

    def extras(self, problem: PruningProblem, options: GraspOptions) -> dict:
        temperature, note = _temperature(problem, options)
        return {"temperature": temperature, "temperature_note": note}

    def score(self, problem: PruningProblem, options: GraspOptions) -> PyTree:
        temperature, note = _temperature(problem, options)
        if options.temperature is None and problem.apply_fn is None:
            warnings.warn(note, UserWarning, stacklevel=3)
        if options.samples_per_class is None:
            batches = [problem.batch(i) for i in range(options.num_batches)]
        else:
            batches, start = [], 0
            for _ in range(options.num_batches):
                batch, start = balanced_batch(problem.batch, problem.num_classes, options.samples_per_class, start=start)
                batches.append(batch)
        batches = stack_batches(batches)
        selected = problem.prunable_tree()
        direction = _direction(selected, problem.params, options.full_gradient)
        kwargs = dict(single_batch=False, hvp=options.hvp)
        if temperature == 1.0:
            theta_hg = _grasp_of_loss(problem.loss_fn, problem.params, batches, direction, **kwargs)
        else:
            theta_hg = _grasp_of_logits(
                problem.apply_fn, problem.params, problem.model_state, jnp.asarray(temperature, jnp.float32),
                batches, direction, **kwargs,
            )
        return scores_on_prunable(theta_hg, selected)


__all__ = ["DEFAULT_TEMPERATURE", "Grasp", "GraspOptions", "HVP_MODES", "balanced_batch", "grasp_scores"]
