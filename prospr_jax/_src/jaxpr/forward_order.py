"""Forward order of parameter leaves, found by tracing.

A pytree's flattening order is not the order in which a model uses its layers (dict keys are sorted,
so ``Dense_10`` comes before ``Dense_2``). :func:`forward_order` traces the function and ranks each leaf
by the first convolution or matrix product whose operands depend on it.
"""

from __future__ import annotations

from typing import Any, Callable

import jax

from prospr_jax._src.jaxpr.walk import abstract, sub_jaxprs, walk
from prospr_jax._src.tree import PyTree, named_leaves

PRODUCT_PRIMITIVES = frozenset({"conv_general_dilated", "dot_general"})


def _contains_product(jaxpr: Any) -> bool:
    return any(
        eqn.primitive.name in PRODUCT_PRIMITIVES or any(_contains_product(sub) for sub in sub_jaxprs(eqn))
        for eqn in jaxpr.eqns
    )


def forward_order(fn: Callable[..., Any], params: PyTree, *args: Any) -> list[str]:
    """Path names of ``params`` leaves in forward order, found by tracing ``fn(params, *args)``.

    A leaf's position is the index of the first convolution or ``dot_general`` whose operands depend
    on it (through any chain of operations, so masks multiplied in first or dtype casts do not
    matter). Call-like sub-computations (``jit``, ``custom_jvp``, ``checkpoint``) are followed
    inside; loops and conditionals count as one operation. Leaves that never reach a product come
    last, in flattening order. Nothing is computed: the function is traced on abstract values.

    Args:
      fn: ``fn(params, *args)``, e.g. a ``loss_fn(params, batch)``.
      params: the parameter pytree (arrays or ``ShapeDtypeStruct`` leaves).
      *args: the other arguments of ``fn`` (only shapes and dtypes are used).

    Returns:
      Every leaf's path name (see :func:`prospr_jax.tree.path_name`), in forward order.
    """
    names = [n for n, _ in named_leaves(params)]
    closed = jax.make_jaxpr(fn)(abstract(params), *abstract(args))
    first_use: dict[int, int] = {}
    products = [0]

    def record(deps: int) -> None:
        bit = 0
        while deps:
            if deps & 1 and bit not in first_use:
                first_use[bit] = products[0]
            deps >>= 1
            bit += 1
        products[0] += 1

    def visit(eqn: Any, in_deps: list) -> list:
        # Values are bit sets: bit i is set when the value depends on leaf i.
        deps = 0
        for d in in_deps:
            deps |= d
        if eqn.primitive.name in PRODUCT_PRIMITIVES or any(_contains_product(s) for s in sub_jaxprs(eqn)):
            record(deps)
        return [deps] * len(eqn.outvars)

    n = len(names)
    leaf_deps = [1 << i for i in range(n)] + [0] * (len(closed.jaxpr.invars) - n)
    walk(closed.jaxpr, [0] * len(closed.consts), leaf_deps, visit, literal=lambda _: 0, const=lambda _: 0)
    unused = products[0] + 1
    ranked = sorted(range(n), key=lambda i: (first_use.get(i, unused), i))
    return [names[i] for i in ranked]


__all__ = ["PRODUCT_PRIMITIVES", "forward_order"]
