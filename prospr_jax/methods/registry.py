"""Every registered method behind one call: :func:`prune`, :func:`score`, :func:`masks_for`, the table.

::

    problem = PruningProblem.from_flax(model, variables, batch_fn, input_shape=(32, 32, 3), num_classes=10)
    result = prospr_jax.methods.prune("prospr", problem, sparsity=0.98)
    result = prospr_jax.methods.prune("random", problem, 0.98, density_rule="erk")   # random-ERK
    masks = result.masks

A call checks everything it can before any work: the method name, its options (names and values,
from the method's declared ``Options``), the mask rule, and that the problem has the fields the method
needs with these options.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Optional

import jax

from prospr_jax._src.masks import sparsity_report
from prospr_jax._src.problem import PruningProblem
from prospr_jax._src.tree import PyTree
from prospr_jax._src.validate import check_sparsity
from prospr_jax.methods.base import Method, PruneResult, get, names
from prospr_jax.methods.rules import MaskRule


_FIELD_MEANING = {
    "batch_fn": "training batches",
    "apply_fn": "the model, (params, model_state, x, train) -> logits",
    "input_shape": "the shape of one input example",
    "num_classes": "the number of classes",
    "train_fn": "a training loop",
    "key": "a PRNG key",
}


def _check_problem(problem: Any) -> PruningProblem:
    if not isinstance(problem, PruningProblem):
        raise TypeError(f"`problem` must be a prospr_jax.PruningProblem, got {type(problem).__name__}")
    return problem


def check_call(name: str, problem: Optional[PruningProblem], options: dict, rule: MaskRule) -> tuple[Method, Any]:
    """``(method, parsed options)`` for a call of ``name``, after every check that needs no work: the
    options, the mask rule's settings the method supports and (when ``problem`` is given) the problem
    fields the method needs. A long run calls this for each of its cells before it starts."""
    method = get(name)
    parsed = method.parse_options(options)
    unsupported = sorted(set(rule.settings()) - set(method.rules))
    if unsupported:
        raise ValueError(
            f"method {name!r} does not support {', '.join(f'`{u}`' for u in unsupported)} "
            f"(it supports: {', '.join(method.rules) or 'none'})"
        )
    if problem is not None:
        missing = _check_problem(problem).missing(method.requirements(parsed))
        if missing:
            fields = ", ".join(f"`{f}` ({_FIELD_MEANING[f]})" for f in missing)
            raise ValueError(f"method {name!r} needs the PruningProblem field(s) {fields}; they are not set")
    return method, parsed


def score(name: str, problem: PruningProblem, **options: Any) -> PyTree:
    """Scores of a single-shot scorer on ``problem`` (higher = keep; see :func:`prospr_jax.masks_from_scores`)."""
    method, parsed = check_call(name, problem, options, MaskRule())
    if method.kind != "scores":
        raise ValueError(
            f"method {name!r} prunes in rounds (kind 'masks'), it has no scores: use prune({name!r}, problem, sparsity)"
        )
    return method.score(problem, parsed)


def prune(
    name: str,
    problem: PruningProblem,
    sparsity: float,
    *,
    density_rule: Optional[str] = None,
    scope: Any = "global",
    min_per_layer: int = 0,
    **options: Any,
) -> PruneResult:
    """Masks of method ``name`` at ``sparsity`` (over the prunable weights).

    Args:
      name: a registered name (:func:`names`).
      problem: the :class:`prospr_jax.PruningProblem`.
      sparsity: fraction of the prunable weights removed, in [0, 1).
      density_rule: ``None``, ``'erk'`` (ERK layer densities, the score ranks within each layer) or
        ``'lamp'`` (LAMP-normalised scores, one global threshold); see :class:`MaskRule`.
      scope: ``'global'`` (one threshold, default) or ``'layerwise'`` (same density everywhere).
      min_per_layer: every pruned layer keeps at least this many weights (layer-collapse guard).
      **options: the method's own options (its ``Options`` dataclass: e.g. ``num_steps=`` for ProsPr,
        ``rounds=`` for SynFlow). Multi-round methods accept the rule settings they declare.

    Returns:
      A :class:`PruneResult`: ``masks``, ``start_params`` (``problem.params`` unless the method trains
      or rewinds), ``start_step``, ``history``, ``extras``, ``scores`` (single-shot methods), and what
      was asked and achieved (``method``, ``options``, ``sparsity``, ``achieved_sparsity``,
      ``empty_layers``, ``seconds``).
    """
    sparsity = check_sparsity(sparsity)
    rule = MaskRule(density_rule, scope, min_per_layer)
    method, parsed = check_call(name, problem, options, rule)
    start = time.perf_counter()
    result = method.prune(problem, sparsity, parsed, rule)
    jax.block_until_ready(result.masks)
    return _finish(result, method, parsed, problem, sparsity, time.perf_counter() - start)


def masks_for(result: PruneResult, problem: PruningProblem, sparsity: float, **rule: Any) -> PruneResult:
    """The result of the same single-shot method at another ``sparsity``, from ``result.scores``
    (scoring is not repeated; ``seconds`` is the scoring time plus this thresholding).

    ``rule``: ``density_rule``, ``scope``, ``min_per_layer`` as in :func:`prune`.
    """
    if result.scores is None:
        raise ValueError(f"the result of method {result.method!r} holds no scores to reuse (it prunes in rounds)")
    sparsity = check_sparsity(sparsity)
    method = get(result.method)
    start = time.perf_counter()
    masks = jax.block_until_ready(MaskRule(**rule).masks(result.scores, sparsity))
    fresh = PruneResult(masks=masks, scores=result.scores, extras=result.extras)
    options = method.parse_options(result.options)
    return _finish(fresh, method, options, problem, sparsity, result.seconds + time.perf_counter() - start)


def _finish(result: PruneResult, method: Method, options: Any, problem: PruningProblem, sparsity: float,
            seconds: float) -> PruneResult:
    report = sparsity_report(result.masks, problem.params)
    return dataclasses.replace(
        result,
        start_params=problem.params if result.start_params is None else result.start_params,
        extras={**result.extras, **method.extras(problem, options)},
        method=method.name,
        options={f.name: getattr(options, f.name) for f in dataclasses.fields(options)},
        sparsity=sparsity,
        achieved_sparsity=report.sparsity,
        empty_layers=tuple(report.empty_layers),
        seconds=seconds,
    )


def table() -> list[dict[str, str]]:
    """One row per method: ``{'name', 'paper', 'idea', 'data', 'cost', 'kind'}`` (the README's table)."""
    return [
        {"name": n, "paper": m.paper, "idea": m.idea, "data": m.data, "cost": m.cost, "kind": m.kind}
        for n, m in ((n, get(n)) for n in names())
    ]


def markdown_table() -> str:
    """:func:`table` as a Markdown table."""
    columns = ("name", "paper", "idea", "data", "cost")
    lines = ["| " + " | ".join(c.capitalize() for c in columns) + " |", "|" + "---|" * len(columns)]
    for row in table():
        cells = [f"`{row['name']}`"] + [row[c].replace("|", "\\|") for c in columns[1:]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


__all__ = ["check_call", "markdown_table", "masks_for", "prune", "score", "table"]
