"""The runner's only door into :mod:`prospr_jax.methods`: method names, option checks, pruning.

Every call the experiment harness makes into the method registry goes through the functions of this
module (:func:`method_names`, :func:`produces_masks`, :func:`check_method_options`,
:func:`check_rules`, :func:`prune`), so that a change of the registry's interface is absorbed here.

Options are checked against the keyword parameters of the registered function (what the registry's
own check does when a method is called). Three adapters take ``**options`` and pass them on to a
core function; :data:`_FORWARDED_TO` names that function, so their options are checked before any
work too. Values are checked against the type of the option's default (an option whose default is a
non-negative number must not be negative); the method itself checks the rest when it runs.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Callable, Mapping, Optional

from prospr_jax import methods as registry
from prospr_jax.methods import iterative_snip
from prospr_jax.prospr import prospr_scores
from prospr_jax.tree import PyTree

# Adapters that take ``**options`` and the function those options go to, with the parameters the
# adapter fills itself (not options). Remove an entry once the registry declares the method's options.
_FORWARDED_TO: dict[str, tuple[Callable[..., Any], frozenset[str]]] = {
    "prospr": (prospr_scores, frozenset({"loss_fn", "params", "batches", "prunable", "exclude_first", "exclude_last"})),
    "iterative_snip": (
        iterative_snip.iterative_masks,
        frozenset({"loss_fn", "params", "batch_fn", "sparsity", "revive", "prunable", "exclude_first", "exclude_last",
                   "density_rule", "scope", "min_per_layer"}),
    ),
    "force": (
        iterative_snip.iterative_masks,
        frozenset({"loss_fn", "params", "batch_fn", "sparsity", "revive", "prunable", "exclude_first", "exclude_last",
                   "density_rule", "scope", "min_per_layer"}),
    ),
}
# Arguments of ``registry.prune`` itself, never method options.
_RULES = ("density_rule", "scope", "min_per_layer")
_RULE_DEFAULTS = {"density_rule": None, "scope": "global", "min_per_layer": 0}


def method_names() -> tuple[str, ...]:
    """The registered pruning method names, in registration order."""
    return registry.names()


def produces_masks(name: str) -> bool:
    """Whether method ``name`` computes masks itself (multi-round or layer-by-layer methods).

    Raises:
      ValueError: ``name`` is not a registered method (the message lists them).
    """
    return registry.get(name).kind == "masks"


def _function(name: str) -> tuple[Callable[..., Any], int, frozenset[str]]:
    """``(function, leading positional parameters to skip, parameters that are not options)``."""
    method = registry.get(name)
    # Lazily imported methods (LAP, DRIVE, IMP) are registered as a loader with ``resolve()``.
    target = method.fn.resolve() if hasattr(method.fn, "resolve") else method.fn
    skip = 1 if method.kind == "scores" else 2
    fixed = frozenset(getattr(method.fn, "fixed", {}) or {})
    return target, skip, fixed


def _options_of(name: str) -> dict[str, inspect.Parameter]:
    """Option name -> the parameter that declares it (its default tells the expected type)."""
    target, skip, fixed = _function(name)
    params = list(inspect.signature(target).parameters.values())[skip:]
    options = {
        p.name: p for p in params
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in fixed and p.name not in _RULES
    }
    if any(p.kind == p.VAR_KEYWORD for p in params) and name in _FORWARDED_TO:
        forwarded, filled = _FORWARDED_TO[name]
        for p in inspect.signature(forwarded).parameters.values():
            if p.kind == p.KEYWORD_ONLY and p.name not in filled and p.name not in _RULES:
                options.setdefault(p.name, p)
    return options


def _accepts_any_option(name: str) -> bool:
    target, skip, _ = _function(name)
    params = list(inspect.signature(target).parameters.values())[skip:]
    return any(p.kind == p.VAR_KEYWORD for p in params) and name not in _FORWARDED_TO


def _check_value(name: str, option: str, value: Any, default: Any) -> None:
    """Raise ValueError if ``value`` does not have the kind of value ``default`` is."""
    where = f"option `{option}` of method {name!r}"
    if value is None or default is inspect.Parameter.empty or default is None:
        return
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ValueError(f"{where} must be true or false (its default is {default!r}), got {value!r}")
        return
    if isinstance(default, (int, float)):
        is_int = isinstance(value, int) and not isinstance(value, bool)
        if isinstance(default, int) and not is_int:
            raise ValueError(f"{where} must be an integer (its default is {default!r}), got {value!r}")
        if not is_int and not (isinstance(value, float) and math.isfinite(value)):
            raise ValueError(f"{where} must be a finite number (its default is {default!r}), got {value!r}")
        if default >= 0 and value < 0:
            raise ValueError(f"{where} must be >= 0 (its default is {default!r}), got {value!r}")
        return
    if isinstance(default, str) and not isinstance(value, str):
        raise ValueError(f"{where} must be a string (its default is {default!r}), got {value!r}")
    if isinstance(default, (tuple, list)) and not isinstance(value, (tuple, list)):
        raise ValueError(f"{where} must be a list (its default is {list(default)!r}), got {value!r}")


def check_method_options(name: str, options: Mapping[str, Any]) -> None:
    """Check the options of method ``name`` without running it.

    Args:
      name: a registered method name.
      options: option name -> value, as given to :func:`prune`.

    Raises:
      ValueError: unknown method, unknown option (the message lists the method's options) or a value
        of the wrong kind.
    """
    registry.get(name)
    if _accepts_any_option(name):
        return
    declared = _options_of(name)
    unknown = sorted(set(options) - set(declared))
    if unknown:
        raise ValueError(
            f"method {name!r} has no option(s) {unknown}; its options: {', '.join(sorted(declared)) or 'none'}"
        )
    for option, value in options.items():
        _check_value(name, option, value, declared[option].default)


def check_rules(name: str, *, density_rule: Optional[str], scope: str, min_per_layer: int) -> None:
    """Check that method ``name`` supports the ranking rules the run sets (what ``prune`` checks).

    Raises:
      ValueError: a method that computes masks itself does not take a rule set to a non-default value.
    """
    if not produces_masks(name):
        return
    target, _, _ = _function(name)
    accepted = set(inspect.signature(target).parameters)
    for rule, value in (("density_rule", density_rule), ("scope", scope), ("min_per_layer", min_per_layer)):
        if rule not in accepted and value != _RULE_DEFAULTS[rule]:
            raise ValueError(f"method {name!r} does not support `{rule}` (got {value!r})")


def prune(
    name: str,
    problem: Any,
    sparsity: float,
    *,
    density_rule: Optional[str],
    scope: str,
    min_per_layer: int,
    options: Mapping[str, Any],
) -> tuple[PyTree, dict]:
    """Masks of method ``name`` at ``sparsity`` on ``problem``: ``prospr_jax.methods.prune``.

    Returns:
      ``(masks, info)`` as the registry returns them (``info['seconds']``: the pruning wall time).
    """
    return registry.prune(
        name, problem, sparsity, density_rule=density_rule, scope=scope, min_per_layer=min_per_layer, **options
    )


__all__ = ["check_method_options", "check_rules", "method_names", "produces_masks", "prune"]
