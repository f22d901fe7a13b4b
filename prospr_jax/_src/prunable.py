"""Which parameter leaves are pruned.

Convention (docs/methods.md, "Common conventions"): by default every Conv and Dense ``kernel`` (a leaf
named ``kernel`` with ``ndim >= 2``) is prunable, the first conv and the classifier included; biases,
BatchNorm scale/bias and running statistics never are. The default is overridden by a predicate over
``(path, leaf)`` or by an explicit boolean pytree, and the shortcuts ``exclude_first`` /
``exclude_last`` drop the first / last prunable layer *in forward order*.

Forward order is not the pytree's flattening order (dict keys are sorted, so ``Dense_10`` comes
before ``Dense_2``): :func:`prospr_jax.forward_order` finds it by tracing the model.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence, Union

import jax
import numpy as np

from prospr_jax._src.jaxpr.forward_order import forward_order
from prospr_jax._src.tree import KeyPath, PyTree, named_leaves, names_in_order, path_name, strip_variable_key
from prospr_jax._src.validate import check_bool, check_same_structure

PrunablePredicate = Callable[[KeyPath, Any], bool]
PrunableSpec = Union[None, PrunablePredicate, PyTree]


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


def prunable_for_loss(
    loss_fn: Callable[..., Any],
    params: PyTree,
    batch: Any,
    prunable: PrunableSpec = None,
    exclude_first: bool = False,
    exclude_last: bool = False,
) -> PyTree:
    """:func:`select_prunable`, with the forward order traced from ``loss_fn(params, batch)`` when
    ``exclude_first``/``exclude_last`` need it (the scorers that take a loss use this)."""
    exclude_first = check_bool(exclude_first, "exclude_first")
    exclude_last = check_bool(exclude_last, "exclude_last")
    order = forward_order(loss_fn, params, batch) if (exclude_first or exclude_last) else None
    return select_prunable(params, prunable, exclude_first=exclude_first, exclude_last=exclude_last, order=order)
