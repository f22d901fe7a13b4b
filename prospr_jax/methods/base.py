"""The method contract: one base class, one result type, one public registry.

Every pruning method is ONE module of :mod:`prospr_jax.methods` holding its math, its adapter and its
registry row. The row is a subclass of :class:`Method` whose class attributes declare what the method
is and what it needs; the adapter is the one method it overrides:

* single-shot scorers override :meth:`Method.score` (``problem, options -> scores``); the registry
  turns the scores into masks under the caller's density rule, scope and layer floor;
* methods that prune in rounds, layer by layer or while training override :meth:`Method.prune`
  (``problem, sparsity, options, rule -> PruneResult``).

Options are a frozen dataclass per method (its fields are the option names with their defaults, its
``__post_init__`` validates them), so an unknown option or a bad value is a clear error before any
work, the same for every method. Registering is public: a user's method runs by name in
:func:`prospr_jax.methods.prune` and in the experiment runner::

    @prospr_jax.methods.register
    class GradientNorm(prospr_jax.methods.Method):
        name = "gradnorm"
        paper = "baseline"
        idea = "|dL/dtheta| on one batch"
        data = "1 batch"
        cost = "1 forward/backward pass"
        needs = ("batch_fn",)

        def score(self, problem, options):
            g = jax.grad(problem.loss_fn)(problem.params, problem.batch(0))
            return prospr_jax.scores_on_prunable(jax.tree.map(jnp.abs, g), problem.prunable_tree())
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Mapping, Optional

from prospr_jax._src.problem import PruningProblem
from prospr_jax._src.tree import PyTree

PROBLEM_FIELDS = ("batch_fn", "apply_fn", "input_shape", "num_classes", "train_fn", "key")
# Options that select the pruned leaves belong to the problem, for every method alike.
PROBLEM_OPTIONS = ("prunable", "exclude_first", "exclude_last")
RULE_FIELDS = ("density_rule", "scope", "min_per_layer")


@dataclasses.dataclass(frozen=True)
class NoOptions:
    """The options of a method that has none."""


@dataclasses.dataclass(frozen=True)
class PruneResult:
    """What a pruning method produced.

    Attributes:
      masks: the mask pytree (the params' structure; see :func:`prospr_jax.masks_from_scores`).
      start_params: the params training starts from, unmasked: ``theta_0`` for pruning at
        initialisation, the rewound ``theta_k`` for IMP, DRIVE's choice (train from
        ``apply_masks(start_params, masks)``).
      start_step: the global optimiser step training continues from (IMP rewinding to step k > 0
        continues the schedule from k); 0 otherwise.
      history: one record per round of a multi-round method (plain data), empty for one-shot ones.
      extras: the method's own information (plain data, e.g. GraSP's temperature, SynFlow's
        rescaled rounds; arrays such as IMP's last trained params may be included).
      scores: the scores of a single-shot method (``None`` for the others), reusable for other
        sparsities with :func:`prospr_jax.methods.masks_for`.
      method, options, sparsity: what was asked (the options with their defaults filled in).
      achieved_sparsity: sparsity of ``masks`` over the prunable weights.
      empty_layers: pruned layers that kept no weight.
      seconds: wall time of the pruning (results ready).
    """

    masks: PyTree
    start_params: Optional[PyTree] = None
    start_step: int = 0
    history: tuple = ()
    extras: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    scores: Optional[PyTree] = None
    method: str = ""
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    sparsity: float = 0.0
    achieved_sparsity: float = 0.0
    empty_layers: tuple = ()
    seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        """The plain-data fields (no arrays): method, options, sparsities, seconds, history, extras
        entries that are numbers, strings, bools or lists of them."""
        return {
            "method": self.method,
            "options": dict(self.options),
            "sparsity": self.sparsity,
            "achieved_sparsity": self.achieved_sparsity,
            "empty_layers": list(self.empty_layers),
            "seconds": self.seconds,
            "start_step": self.start_step,
            "history": [dict(h) for h in self.history],
            "extras": {k: v for k, v in self.extras.items() if _plain(v)},
        }


def _plain(value: Any) -> bool:
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    if isinstance(value, Mapping):
        return all(isinstance(k, str) and _plain(v) for k, v in value.items())
    return False


class Method:
    """Base class of every pruning method (see the module docstring).

    Class attributes (the declaration):
      name: registry name (lower case, digits and ``_``).
      paper: authors, venue and year of the original (``'baseline'`` for baselines).
      idea: one line: what the score or the procedure is.
      data: what data it takes: ``'none'``, ``'1 batch'``, ``'M+1 batches'``, ``'T batches'``,
        ``'training'``.
      cost: one line: the compute it takes.
      needs: the :class:`prospr_jax.PruningProblem` fields that must be set (``'batch_fn'``,
        ``'apply_fn'``, ``'input_shape'``, ``'num_classes'``, ``'train_fn'``, ``'key'``); checked before
        any work. :meth:`requirements` can make them depend on the options.
      Options: a frozen dataclass: the option names, their defaults and (``__post_init__``) their
        validation. Default: no options.
      rules: which of the mask rule's settings (``'density_rule'``, ``'scope'``, ``'min_per_layer'``) the
        method honours; single-shot scorers honour all three (the registry applies them).
    """

    name: ClassVar[str]
    paper: ClassVar[str]
    idea: ClassVar[str]
    data: ClassVar[str]
    cost: ClassVar[str]
    needs: ClassVar[tuple[str, ...]] = ()
    Options: ClassVar[type] = NoOptions
    rules: ClassVar[tuple[str, ...]] = RULE_FIELDS

    @property
    def kind(self) -> str:
        """``'scores'`` for single-shot scorers (they override :meth:`score`), else ``'masks'``."""
        return "scores" if type(self).score is not Method.score else "masks"

    def requirements(self, options: Any) -> tuple[str, ...]:
        """The problem fields needed with these ``options`` (default: :attr:`needs`)."""
        return tuple(self.needs)

    def extras(self, problem: PruningProblem, options: Any) -> dict[str, Any]:
        """Plain-data information the registry adds to the result's ``extras`` (default none), e.g.
        the temperature GraSP used."""
        return {}

    def score(self, problem: PruningProblem, options: Any) -> PyTree:
        """Scores of every prunable weight (higher = keep; the scores convention of
        :func:`prospr_jax.masks_from_scores`). Override in single-shot scorers."""
        raise NotImplementedError(f"method {self.name!r} does not produce scores; it prunes with prune()")

    def prune(self, problem: PruningProblem, sparsity: float, options: Any, rule: Any) -> PruneResult:
        """Masks at ``sparsity``; ``rule`` is the caller's :class:`prospr_jax.methods.MaskRule`.

        The default scores once and applies ``rule``; methods that prune in rounds override it (and
        apply ``rule`` at each round) and return their history, start params and extras.
        """
        scores = self.score(problem, options)
        return PruneResult(masks=rule.masks(scores, sparsity), scores=scores)

    def parse_options(self, options: Mapping[str, Any]) -> Any:
        """``self.Options(**options)``; a ``ValueError`` naming the method and listing its options (with
        their defaults) for an unknown name, or pointing to the problem for the prunable selection."""
        for key in PROBLEM_OPTIONS:
            if key in options:
                raise ValueError(f"set `{key}` on the PruningProblem, not as an option of method {self.name!r}")
        fields = {f.name: f for f in dataclasses.fields(self.Options)}
        unknown = sorted(set(options) - set(fields))
        if unknown:
            raise ValueError(
                f"method {self.name!r} has no option(s) {unknown}; its options: {describe_options(self.Options)}"
            )
        try:
            return self.Options(**options)
        except (TypeError, ValueError) as err:
            raise type(err)(f"method {self.name!r}: {err}") from None


def describe_options(options_cls: type) -> str:
    """``'name=default, ...'`` of an options dataclass (``'none'`` when it has no field)."""
    parts = []
    for f in dataclasses.fields(options_cls):
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else "required"  # type: ignore[misc]
        )
        parts.append(f"{f.name}={default!r}")
    return ", ".join(parts) or "none"


_REGISTRY: dict[str, Method] = {}


def register(method: Any, *, replace: bool = False) -> Any:
    """Register a :class:`Method` subclass (or instance) under its ``name``; usable as a class decorator.

    The declaration is checked here: a ``name`` made of lower-case letters, digits and ``_``; the text
    attributes; ``Options`` a dataclass; ``needs`` and ``rules`` known field names; exactly one of
    ``score``/``prune`` overridden. A name already registered is an error unless ``replace=True``.

    Returns:
      ``method`` unchanged (so ``@register`` keeps the class).
    """
    instance = method() if isinstance(method, type) else method
    if not isinstance(instance, Method):
        raise TypeError(f"`method` must be a prospr_jax.methods.Method subclass or instance, got {method!r}")
    cls = type(instance)
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name or not all(c.islower() or c.isdigit() or c == "_" for c in name):
        raise ValueError(f"a method's `name` must be a non-empty string of lower-case letters, digits and _, got {name!r}")
    for attr in ("paper", "idea", "data", "cost"):
        if not isinstance(getattr(cls, attr, None), str):
            raise ValueError(f"method {name!r} must declare `{attr}` as a string")
    if not dataclasses.is_dataclass(cls.Options):
        raise TypeError(f"method {name!r}: `Options` must be a dataclass, got {cls.Options!r}")
    unknown = sorted(set(cls.needs) - set(PROBLEM_FIELDS))
    if unknown:
        raise ValueError(f"method {name!r}: `needs` names unknown problem fields {unknown}; known: {PROBLEM_FIELDS}")
    unknown = sorted(set(cls.rules) - set(RULE_FIELDS))
    if unknown:
        raise ValueError(f"method {name!r}: `rules` names unknown settings {unknown}; known: {RULE_FIELDS}")
    overrides_score = cls.score is not Method.score
    overrides_prune = cls.prune is not Method.prune
    if overrides_score == overrides_prune:
        raise TypeError(f"method {name!r} must override exactly one of `score` (single shot) or `prune` (rounds)")
    if name in _REGISTRY and not replace:
        raise ValueError(f"a method named {name!r} is already registered; pass replace=True to replace it")
    _REGISTRY[name] = instance
    return method


def unregister(name: str) -> None:
    """Remove the method registered as ``name`` (a ``ValueError`` if there is none)."""
    get(name)
    del _REGISTRY[name]


def names() -> tuple[str, ...]:
    """Registered method names, in registration order."""
    return tuple(_REGISTRY)


def get(name: str) -> Method:
    """The :class:`Method` registered as ``name``; a ``ValueError`` lists the known names otherwise."""
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"unknown pruning method {name!r}; known methods: {', '.join(names())}")
    return _REGISTRY[name]


__all__ = [
    "Method",
    "NoOptions",
    "PROBLEM_FIELDS",
    "PROBLEM_OPTIONS",
    "PruneResult",
    "RULE_FIELDS",
    "describe_options",
    "get",
    "names",
    "register",
    "unregister",
]
