"""Which parameter leaves are pruned.

Convention (METHODS.md, "Common conventions"): by default every Conv and Dense ``kernel`` (a leaf
named ``kernel`` with ``ndim >= 2``) is prunable, the first conv and the classifier included; biases,
BatchNorm scale/bias and running statistics never are. The default is overridden by a predicate over
``(path, leaf)`` or by an explicit boolean pytree, and the shortcuts ``exclude_first`` /
``exclude_last`` drop the first / last prunable layer *in forward order*.

Forward order is not the pytree's flattening order (dict keys are sorted, so ``Dense_10`` comes
before ``Dense_2``). :func:`forward_order` finds it by tracing the model: a kernel's position is the
first convolution or matrix product whose operands depend on it.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence, Union

import jax
import jax.extend.core as jex
import numpy as np

from prospr_jax.tree import (
    KeyPath,
    PyTree,
    check_same_structure,
    named_leaves,
    names_in_order,
    path_name,
    strip_variable_key,
)

PrunablePredicate = Callable[[KeyPath, Any], bool]
PrunableSpec = Union[None, PrunablePredicate, PyTree]

_PRODUCT_PRIMITIVES = frozenset({"conv_general_dilated", "dot_general"})


def default_prunable(path: KeyPath, leaf: Any) -> bool:
    """True for Conv/Dense kernels: the last key is ``kernel`` and the leaf has ``ndim >= 2``."""
    path = strip_variable_key(path)
    if not path:
        return False
    last = path[-1]
    key = getattr(last, "key", getattr(last, "name", getattr(last, "idx", None)))
    return key == "kernel" and np.ndim(leaf) >= 2


def select_prunable(
    params: PyTree,
    prunable: PrunableSpec = None,
    *,
    exclude_first: bool = False,
    exclude_last: bool = False,
    order: Sequence[str] | None = None,
) -> PyTree:
    """Boolean pytree with ``params``' structure: ``True`` where a leaf is pruned.

    Args:
      params: the parameter pytree.
      prunable: ``None`` (Conv/Dense kernels, :func:`default_prunable`), a predicate
        ``(key_path, leaf) -> bool``, or a pytree of Python bools with ``params``' structure.
      exclude_first: leave the first prunable layer (in forward order) dense.
      exclude_last: leave the last prunable layer (in forward order; usually the classifier) dense.
      order: path names of ``params`` leaves in forward order, as returned by :func:`forward_order`.
        Required when ``exclude_first`` or ``exclude_last`` is set; scorers that get a ``loss_fn``
        and a batch compute it themselves.

    Returns:
      A pytree of Python bools (static: it can be closed over by jitted code).
    """
    if prunable is None or callable(prunable):
        predicate = default_prunable if prunable is None else prunable
        selected = jax.tree_util.tree_map_with_path(lambda p, x: bool(predicate(p, x)), params)
    else:
        check_same_structure(prunable, params, arg="prunable")
        bad = [n for n, v in named_leaves(prunable) if not isinstance(v, (bool, np.bool_))]
        if bad:
            raise TypeError(
                "`prunable` must be None, a predicate (path, leaf) -> bool, or a pytree of Python bools; "
                f"non-bool leaves at {names_in_order(bad)}"
            )
        selected = jax.tree_util.tree_map(bool, prunable)
    chosen = [n for n, v in named_leaves(selected) if v]
    scalar = [n for (n, v), (_, x) in zip(named_leaves(selected), named_leaves(params)) if v and np.ndim(x) == 0]
    if scalar:
        raise ValueError(f"`prunable` selects 0-d leaves, which cannot be pruned: {names_in_order(scalar)}")
    if exclude_first or exclude_last:
        if order is None:
            raise ValueError(
                "`exclude_first`/`exclude_last` need the forward order of the layers: pass "
                "`order=forward_order(loss_fn, params, batch)`"
            )
        position = {name: i for i, name in enumerate(order)}
        unknown = [n for n in chosen if n not in position]
        if unknown:
            raise ValueError(f"`order` does not list the prunable leaves {names_in_order(unknown)}")
        ranked = sorted(chosen, key=position.__getitem__)
        dropped = set()
        if exclude_first and ranked:
            dropped.add(ranked[0])
        if exclude_last and ranked:
            dropped.add(ranked[-1])
        chosen = [n for n in chosen if n not in dropped]
        keep = set(chosen)
        selected = jax.tree_util.tree_map_with_path(
            lambda p, v: v and path_name(p) in keep, selected
        )
    if not chosen:
        raise ValueError(
            "no prunable leaves: the default selects leaves named `kernel` with ndim >= 2; pass "
            "`prunable=` a predicate (path, leaf) -> bool or a pytree of bools"
        )
    return selected


def _abstract(tree: PyTree) -> PyTree:
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(np.shape(x), jax.numpy.result_type(x)), tree)


def _jaxprs_in(params: dict) -> list[Any]:
    found = []
    for value in params.values():
        values = value if isinstance(value, (tuple, list)) else (value,)
        for v in values:
            if isinstance(v, jex.ClosedJaxpr):
                found.append(v.jaxpr)
            elif isinstance(v, jex.Jaxpr):
                found.append(v)
    return found


def _contains_product(jaxpr: Any) -> bool:
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in _PRODUCT_PRIMITIVES:
            return True
        if any(_contains_product(sub) for sub in _jaxprs_in(eqn.params)):
            return True
    return False


def forward_order(fn: Callable[..., Any], params: PyTree, *args: Any) -> list[str]:
    """Path names of ``params`` leaves in forward order, found by tracing ``fn(params, *args)``.

    A leaf's position is the index of the first convolution or ``dot_general`` whose operands depend
    on it (through any chain of operations, so masks multiplied in first or dtype casts do not
    matter). Call-like sub-computations (``jit``, ``custom_jvp``, ``checkpoint``) are followed
    inside; loops and conditionals count as one operation. Leaves that never reach a product come
    last, in flattening order. Nothing is computed: the function is traced on abstract values.
    """
    names = [n for n, _ in named_leaves(params)]
    closed = jax.make_jaxpr(fn)(_abstract(params), *_abstract(args))
    n = len(names)
    first_use: dict[int, int] = {}
    counter = [0]

    def record(deps: int) -> None:
        bit = 0
        while deps:
            if deps & 1 and bit not in first_use:
                first_use[bit] = counter[0]
            deps >>= 1
            bit += 1
        counter[0] += 1

    def walk(jaxpr: Any, in_deps: list[int]) -> list[int]:
        env: dict[Any, int] = {}
        for var, dep in zip(jaxpr.invars, in_deps):
            env[var] = dep
        for eqn in jaxpr.eqns:
            deps = 0
            for v in eqn.invars:
                if not isinstance(v, jex.Literal):
                    deps |= env.get(v, 0)
            subs = _jaxprs_in(eqn.params)
            name = eqn.primitive.name
            if name in _PRODUCT_PRIMITIVES:
                record(deps)
                outs = [deps] * len(eqn.outvars)
            elif len(subs) == 1 and len(subs[0].invars) == len(eqn.invars) and name not in ("scan", "while", "cond"):
                arg_deps = [0 if isinstance(v, jex.Literal) else env.get(v, 0) for v in eqn.invars]
                outs = walk(subs[0], arg_deps)
            else:
                if any(_contains_product(s) for s in subs):
                    record(deps)
                outs = [deps] * len(eqn.outvars)
            for v, d in zip(eqn.outvars, outs):
                env[v] = d
        return [0 if isinstance(v, jex.Literal) else env.get(v, 0) for v in jaxpr.outvars]

    leaf_deps = [1 << i for i in range(n)] + [0] * (len(closed.jaxpr.invars) - n)
    walk(closed.jaxpr, leaf_deps)
    unused = counter[0] + 1
    ranked = sorted(range(n), key=lambda i: (first_use.get(i, unused), i))
    return [names[i] for i in ranked]
