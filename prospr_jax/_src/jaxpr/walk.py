"""The one jaxpr walker of the package.

Three parts of prospr-jax read a traced program: :func:`prospr_jax.forward_order` (the order in which
kernels are used), the convolution rewrite (:mod:`prospr_jax._src.jaxpr.canonical_convs`) and the
layer graph (:mod:`prospr_jax._src.jaxpr.layer_graph`). They share this module: one list of the
call-like primitives whose bodies are inlined, one abstract-value helper and one walk over the
equations. jax renames primitives from release to release (``xla_call`` -> ``pjit`` -> ``jit``,
``remat`` -> ``remat2`` -> ``checkpoint``); this list is the only place to update.

:func:`walk` evaluates a jaxpr equation by equation in an arbitrary value domain (real arrays,
dependency bit sets, graph node ids): call-like equations are inlined (their body is walked with the
same ``visit``), every other equation is handed to ``visit``. Control flow (``scan``, ``while``,
``cond``) is not inlined: ``visit`` sees it as one equation and can look inside with
:func:`sub_jaxprs`.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Sequence

import jax
import jax.extend.core as jex
import numpy as np

from prospr_jax._src.tree import PyTree

# Primitives that call a sub-jaxpr once with (a suffix of) their operands and return its results.
# Custom-derivative calls are inlined to their primal computation: walkers read or re-evaluate the
# forward program, and the convolution rewrite is applied to already differentiated functions.
CUSTOM_DERIVATIVE_PRIMITIVES = frozenset({"custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr", "custom_lin"})
CALL_PRIMITIVES = frozenset({"pjit", "jit", "closed_call", "core_call", "remat", "remat2", "checkpoint"}) | \
    CUSTOM_DERIVATIVE_PRIMITIVES

Visit = Callable[[Any, list], Sequence[Any]]


def abstract(tree: PyTree) -> PyTree:
    """``jax.ShapeDtypeStruct`` leaves with the shapes and dtypes of ``tree``'s leaves (arrays, numpy
    values or ShapeDtypeStructs), for tracing without computing."""
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(np.shape(x), jax.numpy.result_type(x)), tree)


def abstract_var(var: Any) -> jax.ShapeDtypeStruct:
    """The ``ShapeDtypeStruct`` of a jaxpr variable (weak type kept)."""
    aval = var.aval
    return jax.ShapeDtypeStruct(aval.shape, aval.dtype, weak_type=getattr(aval, "weak_type", False))


def sub_jaxprs(eqn: Any) -> list[Any]:
    """The (open) jaxprs in an equation's parameters: a loop's body, a conditional's branches, ..."""
    found = []
    for value in eqn.params.values():
        for v in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(v, jex.ClosedJaxpr):
                found.append(v.jaxpr)
            elif isinstance(v, jex.Jaxpr):
                found.append(v)
    return found


def call_body(eqn: Any, inline: frozenset = CALL_PRIMITIVES) -> Optional[tuple[Any, list, int]]:
    """``(jaxpr, consts, skip)`` when ``eqn`` is a call to inline (a primitive named in ``inline``): its
    body is called with the operands after the first ``skip`` ones (a custom VJP passes its rule's
    residual inputs first) and returns exactly the equation's results. ``None`` for every other
    equation."""
    if eqn.primitive.name not in inline:
        return None
    bodies = []
    for value in eqn.params.values():
        if isinstance(value, jex.ClosedJaxpr):
            bodies.append((value.jaxpr, list(value.consts)))
        elif isinstance(value, jex.Jaxpr):
            bodies.append((value, []))
    if len(bodies) != 1:
        return None
    jaxpr, consts = bodies[0]
    skip = len(eqn.invars) - len(jaxpr.invars)
    if skip < 0 or len(jaxpr.outvars) != len(eqn.outvars):
        return None
    return jaxpr, consts, skip


def walk(
    jaxpr: Any,
    consts: Sequence[Any],
    args: Sequence[Any],
    visit: Visit,
    *,
    literal: Callable[[Any], Any] = lambda value: value,
    const: Callable[[Any], Any] = lambda value: value,
    inline: frozenset = CALL_PRIMITIVES,
) -> list[Any]:
    """Evaluate ``jaxpr`` in the value domain of ``visit``.

    Args:
      jaxpr: an open ``Jaxpr``.
      consts: values (already in the walker's domain) of its ``constvars``.
      args: values of its ``invars``.
      visit: ``visit(eqn, invals) -> outvals`` for every equation that is not an inlined call
        (``outvals`` has one value per ``eqn.outvars``).
      literal: maps the Python/numpy value of a literal operand into the domain.
      const: maps the value of an inlined call's closed-over constant into the domain.
      inline: the call primitives whose bodies are walked (default :data:`CALL_PRIMITIVES`); other
        calls are handed to ``visit`` like any equation.

    Returns:
      The values of ``jaxpr.outvars``.
    """
    env: dict[Any, Any] = {}

    def read(v: Any) -> Any:
        return literal(v.val) if isinstance(v, jex.Literal) else env[v]

    env.update(zip(jaxpr.constvars, consts))
    env.update(zip(jaxpr.invars, args))
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        body = call_body(eqn, inline)
        if body is not None:
            sub, sub_consts, skip = body
            outvals = walk(sub, [const(c) for c in sub_consts], invals[skip:], visit, literal=literal, const=const,
                           inline=inline)
        else:
            outvals = visit(eqn, invals)
        for var, val in zip(eqn.outvars, outvals):
            if not isinstance(var, jex.DropVar):
                env[var] = val
    return [read(v) for v in jaxpr.outvars]


Evaluate = Callable[..., list]  # evaluate(jaxpr, consts, *args) -> output values


def retrace_params(params: dict, evaluate: Evaluate) -> dict:
    """An equation's parameters with every ``ClosedJaxpr`` in them (a loop's body, a conditional's
    branches) traced again through ``evaluate`` (a rewriting evaluator); other values unchanged."""

    def retrace(closed: jex.ClosedJaxpr) -> jex.ClosedJaxpr:
        return jax.make_jaxpr(lambda *args: evaluate(closed.jaxpr, closed.consts, *args))(
            *[abstract_var(v) for v in closed.jaxpr.invars]
        )

    def one(value: Any) -> Any:
        if isinstance(value, jex.ClosedJaxpr):
            return retrace(value)
        if isinstance(value, tuple) and value and all(isinstance(v, jex.ClosedJaxpr) for v in value):
            return tuple(retrace(v) for v in value)
        return value

    return {k: one(v) for k, v in params.items()}


def reevaluated(fn: Callable[..., Any], evaluate: Evaluate) -> Callable[..., Any]:
    """``fn`` traced to a jaxpr at each call and evaluated again by ``evaluate`` (same arguments,
    keyword arguments included, and same output tree)."""

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args, **kwargs)
        out = evaluate(closed.jaxpr, closed.consts, *jax.tree_util.tree_leaves((args, kwargs)))
        return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(out_shape), out)

    return functools.wraps(fn)(wrapped)


__all__ = ["CALL_PRIMITIVES", "CUSTOM_DERIVATIVE_PRIMITIVES", "reevaluated", "retrace_params", "abstract", "abstract_var", "call_body", "sub_jaxprs", "walk"]
