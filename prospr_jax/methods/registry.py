"""The method registry: every pruning method behind one call.

Two kinds of methods (METHODS.md gives what each computes):

* ``'scores'``: single-shot scorers, ``fn(problem, **options) -> scores``; :func:`prune` turns the
  scores into masks (optionally under a density rule, ``'erk'`` or ``'lamp'``).
* ``'masks'``: multi-round or layer-by-layer methods, ``fn(problem, sparsity, **options) -> (masks,
  info)``.

::

    problem = PruningProblem.from_flax(model, variables, batch_fn, input_shape=(32, 32, 3), num_classes=10)
    masks, info = prospr_jax.methods.prune("prospr", problem, sparsity=0.98)
    masks, info = prospr_jax.methods.prune("random", problem, 0.98, density_rule="erk")   # random-ERK

=================  ===============================  =============  ===========
name               paper                            data           kind
=================  ===============================  =============  ===========
prospr             Alizadeh et al., ICLR 2022       M+1 batches    scores
snip               Lee et al., ICLR 2019            1 batch        scores
iterative_snip     de Jorge et al., ICLR 2021       T batches      masks
force              de Jorge et al., ICLR 2021       T batches      masks
grasp              Wang et al., ICLR 2020           1 batch        scores
synflow            Tanaka et al., NeurIPS 2020      none           masks
magnitude          baseline                         none           scores
random             baseline                         none           scores
lamp               Lee et al., ICLR 2021            none           scores
lap, lap_forward,  Park et al., ICLR 2020           none           masks
lap_backward
drive              Saikumar & Varghese, 2024        training       masks
imp                Frankle & Carbin, ICLR 2019;     training       masks
                   Frankle et al., ICML 2020
=================  ===============================  =============  ===========

:func:`table` returns the full rows (with the idea and the cost of each method); :func:`markdown_table`
renders them for the README. The methods of ``lookahead``, ``drive`` and ``imp`` are imported when
first called, which keeps ``import prospr_jax.methods`` light.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import time
from typing import Any, Callable, Mapping, Optional

import jax
import numpy as np

from prospr_jax.masks import check_sparsity, sparsity_report
from prospr_jax.methods.densities import DENSITY_RULES, rule_masks
from prospr_jax.methods.grasp import grasp_describe, grasp_method
from prospr_jax.methods.iterative_snip import force_method, iterative_snip_method
from prospr_jax.methods.magnitude import lamp_method, magnitude_method
from prospr_jax.methods.prospr_method import prospr_method, snip_method
from prospr_jax.methods.random_pruning import random_method
from prospr_jax.methods.synflow import synflow_method
from prospr_jax.problem import PruningProblem
from prospr_jax.tree import PyTree

KINDS = ("scores", "masks")
SCOPES = ("global", "layerwise")


@dataclasses.dataclass(frozen=True)
class Method:
    """One registered pruning method.

    Attributes:
      name: registry name.
      paper: authors, venue and year of the original.
      idea: one line: what the score or procedure is.
      data: what data it needs: ``'none'``, ``'1 batch'``, ``'M+1 batches'``, ``'T batches'``,
        ``'training'``.
      cost: one line: the compute it takes.
      kind: ``'scores'`` (``fn(problem, **options) -> scores``) or ``'masks'``
        (``fn(problem, sparsity, **options) -> (masks, info)``).
      fn: the adapter.
      describe: optional ``describe(problem, **options) -> dict`` of entries :func:`prune` adds to
        ``info`` (e.g. GraSP's temperature).
    """

    name: str
    paper: str
    idea: str
    data: str
    cost: str
    kind: str
    fn: Callable[..., Any]
    describe: Optional[Callable[..., dict]] = None


class _Lazy:
    """Adapter imported from ``module.attr`` at call time, with fixed keyword arguments."""

    def __init__(self, method: str, module: str, attr: str, **fixed: Any):
        self.method, self.module, self.attr, self.fixed = method, module, attr, fixed

    def resolve(self) -> Callable[..., Any]:
        try:
            mod = importlib.import_module(self.module)
        except ImportError as e:
            raise ImportError(
                f"method {self.method!r} is implemented in `{self.module}`, which cannot be imported: {e}"
            ) from e
        fn = getattr(mod, self.attr, None)
        if fn is None:
            raise ImportError(f"method {self.method!r}: `{self.module}` has no function `{self.attr}`")
        return fn

    def __call__(self, problem: PruningProblem, sparsity: float, **options: Any) -> Any:
        clash = sorted(set(options) & set(self.fixed))
        if clash:
            raise ValueError(f"method {self.method!r} fixes {clash} (= {self.fixed}); do not pass them")
        return self.resolve()(problem, sparsity, **self.fixed, **options)

    def __repr__(self) -> str:
        fixed = "".join(f", {k}={v!r}" for k, v in self.fixed.items())
        return f"<lazy {self.module}.{self.attr}{fixed}>"


_METHODS: dict[str, Method] = {}


def _register(method: Method) -> None:
    if method.kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {method.kind!r}")
    _METHODS[method.name] = method


for _m in (
    Method(
        "prospr", "Alizadeh et al., ICLR 2022",
        "|dL(w_M)/dc| at c = 1: saliency of the mask through M = 3 inner SGD steps (meta-gradient)",
        "M+1 batches", "M+1 forward/backward passes + M Hessian-vector products", "scores", prospr_method,
    ),
    Method(
        "snip", "Lee et al., ICLR 2019", "connection sensitivity |theta * dL/dtheta| on one batch",
        "1 batch", "1 forward/backward pass", "scores", snip_method,
    ),
    Method(
        "iterative_snip", "de Jorge et al., ICLR 2021",
        "SNIP re-scored on the masked net over T rounds (d_t = d^(t/T)); pruned weights stay pruned",
        "T batches", "T forward/backward passes (T = 60)", "masks", iterative_snip_method,
    ),
    Method(
        "force", "de Jorge et al., ICLR 2021",
        "|theta_0 * dL/dw| at w = theta_0 * m over T rounds; pruned weights can come back",
        "T batches", "T forward/backward passes (T = 60)", "masks", force_method,
    ),
    Method(
        "grasp", "Wang et al., ICLR 2020",
        "remove the largest S = -theta * (H g) (keep gradient flow); logits / 200, 10 samples per class",
        "1 batch", "2 forward/backward passes + 1 Hessian-vector product", "scores", grasp_method, grasp_describe,
    ),
    Method(
        "synflow", "Tanaka et al., NeurIPS 2020",
        "|theta * dR/dtheta|, R = sum f(ones; |theta|), 100 rounds (d_k = d^(k/100)); no layer collapse",
        "none", "100 forward/backward passes on one all-ones example", "masks", synflow_method,
    ),
    Method(
        "magnitude", "baseline", "|theta_0|, global or layerwise", "none", "one pass over the weights",
        "scores", magnitude_method,
    ),
    Method(
        "random", "baseline", "uniform random scores (seeded); random-ERK with density_rule='erk'", "none",
        "one random draw per weight", "scores", random_method,
    ),
    Method(
        "lamp", "Lee et al., ICLR 2021",
        "|w_u|^2 / sum of |w_v|^2 over the layer's weights v not smaller than u; one global threshold",
        "none", "one sort per layer", "scores", lamp_method,
    ),
    Method(
        "lap", "Park et al., ICLR 2020",
        "lookahead distortion W[j,k]^2 * ||W_prev[k,:]||^2 * ||W_next[:,j]||^2, layerwise",
        "none", "one pass over the weights", "masks", _Lazy("lap", "prospr_jax.methods.lookahead", "lap_masks", variant="lap"),
    ),
    Method(
        "lap_forward", "Park et al., ICLR 2020",
        "LAP pruning layers first to last, each with its already pruned predecessor",
        "none", "one pass per layer, sequential", "masks",
        _Lazy("lap_forward", "prospr_jax.methods.lookahead", "lap_masks", variant="forward"),
    ),
    Method(
        "lap_backward", "Park et al., ICLR 2020",
        "LAP pruning layers last to first, each with its already pruned successor",
        "none", "one pass per layer, sequential", "masks",
        _Lazy("lap_backward", "prospr_jax.methods.lookahead", "lap_masks", variant="backward"),
    ),
    Method(
        "drive", "Saikumar & Varghese, 2024",
        "dense training for a few epochs, then iterative pruning by |theta| + |theta g| + |g| (per-layer normalised)",
        "training", "a few epochs of dense training + scoring rounds", "masks",
        _Lazy("drive", "prospr_jax.methods.drive", "drive_masks"),
    ),
    Method(
        "imp", "Frankle & Carbin, ICLR 2019; Frankle et al., ICML 2020",
        "train, remove 20% of the remaining weights by |theta|, rewind to theta_k, repeat",
        "training", "ceil(ln(1-s)/ln 0.8) full trainings (11 for 90%, 18 for 98%)", "masks",
        _Lazy("imp", "prospr_jax.methods.imp", "imp_masks"),
    ),
):
    _register(_m)
del _m


def names() -> tuple[str, ...]:
    """Registered method names, in registration order."""
    return tuple(_METHODS)


def get(name: str) -> Method:
    """The :class:`Method` registered as ``name``; a ValueError lists the known names otherwise."""
    if not isinstance(name, str) or name not in _METHODS:
        raise ValueError(f"unknown pruning method {name!r}; known methods: {', '.join(names())}")
    return _METHODS[name]


def _target(method: Method) -> Callable[..., Any]:
    return method.fn.resolve() if isinstance(method.fn, _Lazy) else method.fn


def _keyword_names(fn: Callable[..., Any]) -> tuple[set[str], bool]:
    params = inspect.signature(fn).parameters.values()
    named = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return named, any(p.kind == p.VAR_KEYWORD for p in params)


def _check_options(method: Method, fn: Callable[..., Any], options: Mapping[str, Any], skip: int) -> None:
    named, var_kw = _keyword_names(fn)
    if var_kw:
        return
    allowed = sorted(set(list(inspect.signature(fn).parameters)[skip:]) & named)
    if isinstance(method.fn, _Lazy):
        allowed = [a for a in allowed if a not in method.fn.fixed]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"method {method.name!r} has no option(s) {unknown}; its options: {allowed or 'none'}")


def _check_problem(problem: Any) -> None:
    if not isinstance(problem, PruningProblem):
        raise TypeError(f"`problem` must be a prospr_jax.PruningProblem, got {type(problem).__name__}")


def score(name: str, problem: PruningProblem, **options: Any) -> PyTree:
    """Scores of a single-shot scorer (kind ``'scores'``) on ``problem``; higher = keep."""
    method = get(name)
    _check_problem(problem)
    if method.kind != "scores":
        raise ValueError(
            f"method {name!r} produces masks directly (kind 'masks'), it has no scores: use "
            f"prune({name!r}, problem, sparsity)"
        )
    _check_options(method, method.fn, options, skip=1)
    return method.fn(problem, **options)


def prune(
    name: str,
    problem: PruningProblem,
    sparsity: float,
    *,
    density_rule: Optional[str] = None,
    scope: Any = "global",
    min_per_layer: int = 0,
    **options: Any,
) -> tuple[PyTree, dict]:
    """Masks of method ``name`` at ``sparsity`` (over the prunable weights).

    Args:
      name: a registered name (:func:`names`).
      problem: the :class:`prospr_jax.PruningProblem`.
      sparsity: fraction of the prunable weights removed, in [0, 1).
      density_rule: ``None``, ``'erk'`` (ERK layer densities, the score ranks within each layer) or
        ``'lamp'`` (LAMP-normalised scores, one global threshold). Methods of kind ``'masks'`` accept it
        only if they support it.
      scope: ``'global'`` (one threshold, default) or ``'layerwise'`` (same density everywhere).
      min_per_layer: every pruned layer keeps at least this many weights (layer-collapse guard).
      **options: the method's own options (e.g. ``num_steps=`` for ProsPr, ``rounds=`` for SynFlow).

    Returns:
      ``(masks, info)``; ``info`` has ``'method'``, ``'sparsity'`` (requested), ``'seconds'`` (wall time
      of the pruning, results blocked until ready), ``'achieved_sparsity'``, ``'empty_layers'``, and the
      method's own entries (e.g. ``'history'`` of the iterative methods).
    """
    method = get(name)
    _check_problem(problem)
    sparsity = check_sparsity(sparsity)
    if density_rule not in DENSITY_RULES:
        raise ValueError(f"`density_rule` must be one of {DENSITY_RULES}, got {density_rule!r}")
    if not isinstance(scope, Mapping) and scope not in SCOPES:
        raise ValueError(f"`scope` must be one of {SCOPES} (or a per-layer density mapping), got {scope!r}")
    if isinstance(min_per_layer, bool) or not isinstance(min_per_layer, (int, np.integer)) or min_per_layer < 0:
        raise ValueError(f"`min_per_layer` must be an integer >= 0, got {min_per_layer!r}")

    start = time.perf_counter()
    if method.kind == "scores":
        _check_options(method, method.fn, options, skip=1)
        scores = jax.block_until_ready(method.fn(problem, **options))
        masks = rule_masks(scores, sparsity, density_rule=density_rule, scope=scope, min_per_layer=min_per_layer)
        info: dict = {}
    else:
        target = _target(method)
        named, _ = _keyword_names(target)
        rules = {}
        for key, value, default in (
            ("density_rule", density_rule, None),
            ("scope", scope, "global"),
            ("min_per_layer", min_per_layer, 0),
        ):
            if key in named:
                rules[key] = value
            elif value != default:
                raise ValueError(f"method {name!r} does not support `{key}` (got {value!r})")
        _check_options(method, target, options, skip=2)
        masks, info = method.fn(problem, sparsity, **rules, **options)
        info = dict(info)
    masks = jax.block_until_ready(masks)
    seconds = time.perf_counter() - start

    report = sparsity_report(masks, problem.params)
    if method.describe is not None:
        info.update(method.describe(problem, **options))
    info.update(
        method=name,
        sparsity=sparsity,
        seconds=seconds,
        achieved_sparsity=report.sparsity,
        empty_layers=list(report.empty_layers),
    )
    return masks, info


def table() -> list[dict[str, str]]:
    """One row per method: ``{'name', 'paper', 'idea', 'data', 'cost', 'kind'}`` (the README's table)."""
    return [
        {"name": m.name, "paper": m.paper, "idea": m.idea, "data": m.data, "cost": m.cost, "kind": m.kind}
        for m in _METHODS.values()
    ]


def markdown_table() -> str:
    """:func:`table` as a Markdown table."""
    columns = ("name", "paper", "idea", "data", "cost")
    lines = ["| " + " | ".join(c.capitalize() for c in columns) + " |", "|" + "---|" * len(columns)]
    for row in table():
        cells = [f"`{row['name']}`"] + [row[c].replace("|", "\\|") for c in columns[1:]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
