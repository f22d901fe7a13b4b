"""SynFlow: iterative synaptic flow pruning (Tanaka et al., NeurIPS 2020). Data-free.

Replace every parameter and every model-state entry (BatchNorm running statistics) by its absolute
value, feed ONE all-ones input (batch 1) in inference mode, ``R = sum of the outputs``, and score
``|theta * dR/dtheta|``. Iterate n = 100 rounds to densities ``d_k = d ** (k / n)``, re-scoring the
masked network each round (pruned weights are zero, so they score zero and stay pruned).

Overflow. ``R`` is a product over layers of sums of absolute weights: a 35-layer net of width 256
reaches ~1e43 and overflows float32 (ResNet-20 stays near 1e21). ``precision`` chooses the guard:

* ``'float64'``: compute in float64 (needs ``jax.config.update('jax_enable_x64', True)`` or
  ``with jax.enable_x64(True)``); exact; the scores are float64.
* ``'float32'``: plain float32 (exact while nothing overflows; deep nets give inf/NaN).
* ``'rescale'``: before the forward pass each kernel leaf (``ndim >= 2``, pruned or not) is multiplied
  by the constant ``c_l = C_out / sum|W_l * m_l|`` (``C_out`` its last axis): the layer then maps an
  all-ones input to outputs of mean 1, so activations stay O(1) at any depth. A network that is
  positively homogeneous in each kernel has ``R(c * theta) = (prod c) R(theta)``, every score is
  multiplied by the same ``prod c`` and the ranking is unchanged: a plain chain of Conv/Dense layers,
  ReLU, pooling and BatchNorm with zero biases, shifts and running means (flax initialisation).
  NOT exact with skip connections (``f(x; c W) + x`` does not scale with ``c``) or non-zero biases:
  there the rescaled scores only approximate SynFlow (on ResNet-20 at 98% sparsity about half of
  the kept weights differ from float64).
* ``'auto'`` (default): ``'float64'`` if x64 is enabled; else float32, and ``'rescale'`` only for a
  round whose float32 scores are not all finite (chosen inside the jitted round with ``lax.cond``;
  :func:`synflow_masks` reports such rounds in ``info['rescaled_rounds']`` and warns).

Entries whose mask is 0 get score ``-1`` (below every live weight) so the masks are monotone, as in
the official code where pruned weights score 0 and stay below the threshold.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Any, Optional

import jax
import jax.numpy as jnp

from prospr_jax._src.losses import ApplyFn
from prospr_jax._src.masks import apply_masks, check_masks, dense_masks, is_pruned_leaf, rank_below_kept
from prospr_jax._src.problem import PruningProblem
from prospr_jax._src.prunable import PrunableSpec, select_prunable
from prospr_jax._src.tree import PyTree
from prospr_jax._src.validate import check_bool, check_choice, check_int, check_shape, check_sparsity
from prospr_jax.methods.base import Method, PruneResult, register
from prospr_jax.methods.rounds import SCHEDULES, progressive_prune
from prospr_jax.methods.rules import MaskRule

PRECISIONS = ("auto", "float64", "float32", "rescale")
DEFAULT_ROUNDS = 100

_tmap = jax.tree_util.tree_map


def x64_enabled() -> bool:
    """True when jax computes in float64 (``jax_enable_x64`` on, globally or in a context)."""
    return jax.dtypes.canonicalize_dtype(jnp.float64) == jnp.float64


def resolve_precision(precision: str) -> str:
    """Check ``precision``; ``'auto'`` becomes ``'float64'`` when x64 is enabled, else
    ``'float32_or_rescale'`` (float32, rescaled only on overflow)."""
    check_choice(precision, "precision", PRECISIONS)
    if precision == "auto":
        return "float64" if x64_enabled() else "float32_or_rescale"
    if precision == "float64" and not x64_enabled():
        raise ValueError(
            "precision='float64' needs 64-bit jax: jax.config.update('jax_enable_x64', True) or "
            "`with jax.enable_x64(True):`; or use precision='auto' or 'rescale'"
        )
    return precision


def _to_float64(tree: PyTree) -> PyTree:
    return _tmap(lambda x: x.astype(jnp.float64) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def _rescale_kernels(theta: PyTree) -> PyTree:
    def one(w):
        if w.ndim < 2:
            return w
        gain = jnp.sum(w) / w.shape[-1]
        return w * jax.lax.stop_gradient(jnp.where(gain > 0, 1.0 / jnp.where(gain > 0, gain, 1.0), 1.0))

    return _tmap(one, theta)


def _scores(apply_fn, theta, state, masks, input_shape, dtype):
    x = jnp.ones((1, *input_shape), dtype)

    def synaptic_flow(t):
        out = apply_fn(t, state, x, False)
        return sum(jnp.sum(o) for o in jax.tree_util.tree_leaves(out))

    grads = jax.grad(synaptic_flow)(theta)
    scores = _tmap(
        lambda m, t, g: jnp.abs(t * g) if is_pruned_leaf(m) else jnp.zeros((), t.dtype), masks, theta, grads
    )
    return rank_below_kept(scores, masks)


def _all_finite(tree: PyTree) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)]))


@functools.partial(jax.jit, static_argnames=("apply_fn", "input_shape", "precision"))
def _synflow_round(apply_fn, params, model_state, masks, *, input_shape, precision):
    """(scores, rescaled): ``rescaled`` is True when the rescaling guard was used."""
    theta = _tmap(jnp.abs, apply_masks(params, masks))
    state = _tmap(jnp.abs, model_state)
    dtype = jnp.result_type(*[m for m in jax.tree_util.tree_leaves(params) if jnp.issubdtype(m.dtype, jnp.floating)])
    if precision == "float64":
        theta, state, dtype = _to_float64(theta), _to_float64(state), jnp.float64
    if precision == "rescale":
        return _scores(apply_fn, _rescale_kernels(theta), state, masks, input_shape, dtype), jnp.asarray(True)
    plain = _scores(apply_fn, theta, state, masks, input_shape, dtype)
    if precision != "float32_or_rescale":
        return plain, jnp.asarray(False)
    ok = _all_finite(plain)
    scores = jax.lax.cond(
        ok,
        lambda: plain,
        lambda: _scores(apply_fn, _rescale_kernels(theta), state, masks, input_shape, dtype),
    )
    return scores, jnp.logical_not(ok)


def synflow_scores(
    apply_fn: ApplyFn,
    params: PyTree,
    model_state: PyTree,
    input_shape: tuple[int, ...],
    *,
    masks: Optional[PyTree] = None,
    prunable: PrunableSpec = None,
    precision: str = "auto",
) -> PyTree:
    """One round of SynFlow scores ``|theta * dR/dtheta|`` (data-free).

    Args:
      apply_fn: the model, ``apply_fn(params, model_state, x, train) -> outputs`` (the library's model
        convention); called with ``train=False`` (INFERENCE mode: BatchNorm with running statistics);
        outputs may be any pytree, ``R`` sums all of it. Static argument of the compiled round.
      params: parameters; their absolute values are used.
      model_state: non-trainable state (e.g. ``{'batch_stats': ...}``, or ``{}``); absolute values used.
      input_shape: shape of ONE input example; the input is ``ones((1, *input_shape))``.
      masks: current mask pytree (the network is scored masked; masked entries score -1); default
        dense masks on ``prunable``.
      prunable: which leaves are scored when ``masks`` is None (default Conv/Dense kernels).
      precision: overflow guard, see the module docstring (default ``'auto'``: float64 with x64, else
        float32 with rescaling only if float32 overflows).

    Returns:
      Scores pytree with the masks' structure: ``|theta * dR/dtheta|`` on pruned leaves (multiplied by
      one common positive constant when rescaled), 0-d zero elsewhere. Jitted; can be wrapped in
      ``jax.jit``.
    """
    precision = resolve_precision(precision)
    shape = check_shape(input_shape, "input_shape")
    if masks is None:
        masks = dense_masks(params, select_prunable(params, prunable))
    else:
        if prunable is not None:
            raise ValueError("pass `masks` or `prunable`, not both (the masks say which leaves are pruned)")
        check_masks(masks, params)
    return _synflow_round(apply_fn, params, model_state, masks, input_shape=shape, precision=precision)[0]


@dataclasses.dataclass(frozen=True)
class SynflowOptions:
    """Options of iterative SynFlow (see :func:`synflow_masks`)."""

    rounds: int = DEFAULT_ROUNDS
    schedule: str = "exponential"
    precision: str = "auto"
    keep_history_masks: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "rounds", check_int(self.rounds, "rounds", low=1))
        check_choice(self.schedule, "schedule", SCHEDULES)
        check_choice(self.precision, "precision", PRECISIONS)
        check_bool(self.keep_history_masks, "keep_history_masks")


def _synflow(
    apply_fn: ApplyFn, params: PyTree, model_state: PyTree, input_shape: tuple[int, ...], selected: PyTree,
    sparsity: float, options: SynflowOptions, rule: MaskRule,
) -> PruneResult:
    check_sparsity(sparsity)
    precision = resolve_precision(options.precision)
    shape = check_shape(input_shape, "input_shape")
    rescaled = []

    def round_scores(_: int, current: PyTree) -> PyTree:
        scores, used = _synflow_round(apply_fn, params, model_state, current, input_shape=shape, precision=precision)
        rescaled.append(used)
        return scores

    result = progressive_prune(
        round_scores, dense_masks(params, selected), sparsity, rule, rounds=options.rounds,
        schedule=options.schedule, keep_history_masks=options.keep_history_masks,
    )
    rescaled_rounds = int(sum(bool(u) for u in jax.device_get(rescaled)))
    if precision == "float32_or_rescale" and rescaled_rounds:
        warnings.warn(
            f"SynFlow overflowed float32 in {rescaled_rounds} of {options.rounds} rounds; those rounds used "
            "per-layer rescaling, exact only for networks without skip connections or biases. Enable "
            "x64 (jax.config.update('jax_enable_x64', True)) for exact scores.",
            UserWarning,
            stacklevel=3,
        )
    extras = {**result.extras, "precision": precision, "rescaled_rounds": rescaled_rounds}
    return dataclasses.replace(result, extras=extras)


def synflow_masks(
    apply_fn: ApplyFn,
    params: PyTree,
    model_state: PyTree,
    input_shape: tuple[int, ...],
    sparsity: float,
    *,
    rounds: int = DEFAULT_ROUNDS,
    schedule: str = "exponential",
    precision: str = "auto",
    keep_history_masks: bool = False,
    prunable: PrunableSpec = None,
    density_rule: Optional[str] = None,
    scope: Any = "global",
    min_per_layer: int = 0,
) -> PruneResult:
    """Iterative SynFlow: ``rounds`` rounds (default 100, the paper's) to ``d_k = d ** (k / rounds)``.

    Each round re-scores the masked network with :func:`synflow_scores` (one jitted function, the mask
    is data, so all rounds compile once) and keeps the top ``ceil(d_k N)`` under the mask rule
    (default one global threshold, the paper's). ``rounds=1`` is single-shot SynFlow.

    Returns:
      A :class:`prospr_jax.methods.PruneResult` as :func:`prospr_jax.methods.rounds.progressive_prune`,
      plus ``extras['precision']`` (the resolved overflow guard: ``'float64'``, ``'float32'``,
      ``'rescale'`` or ``'float32_or_rescale'``) and ``extras['rescaled_rounds']`` (rounds scored with
      rescaling).
    """
    options = SynflowOptions(rounds, schedule, precision, keep_history_masks)
    rule = MaskRule(density_rule, scope, min_per_layer)
    selected = select_prunable(params, prunable)
    return _synflow(apply_fn, params, model_state, input_shape, selected, sparsity, options, rule)


@register
class Synflow(Method):
    """Registry row of SynFlow: needs ``problem.apply_fn`` and ``problem.input_shape``; no data.
    ``problem.model_state`` (BatchNorm statistics) is used in absolute value."""

    name = "synflow"
    paper = "Tanaka et al., NeurIPS 2020"
    idea = "|theta * dR/dtheta|, R = sum f(ones; |theta|), 100 rounds (d_k = d^(k/100)); no layer collapse"
    data = "none"
    cost = "100 forward/backward passes on one all-ones example"
    needs = ("apply_fn", "input_shape")
    Options = SynflowOptions

    def prune(self, problem: PruningProblem, sparsity: float, options: SynflowOptions, rule: MaskRule) -> PruneResult:
        return _synflow(
            problem.apply_fn, problem.params, problem.model_state, problem.input_shape, problem.prunable_tree(),
            sparsity, options, rule,
        )


__all__ = ["DEFAULT_ROUNDS", "PRECISIONS", "Synflow", "SynflowOptions", "synflow_masks", "synflow_scores", "x64_enabled"]
