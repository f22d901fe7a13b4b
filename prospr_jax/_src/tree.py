"""Small pytree helpers shared by the library: path names and structure checks.

Every public function of prospr-jax speaks of a parameter leaf by its *path name*: the keys from the
root of the params tree joined by ``/`` (``'Conv_0/kernel'``, ``'stage1_block0/conv1/kernel'``,
``'layers/0/w'``). These are the names used in sparsity reports, per-layer density mappings and error
messages.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import numpy as np

PyTree = Any
KeyPath = tuple[Any, ...]


def strip_variable_key(path: KeyPath) -> KeyPath:
    """Drop the trailing ``.value`` attribute that a flax.nnx ``Variable`` adds to its leaf's path."""
    path = tuple(path)
    if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == "value":
        return path[:-1]
    return path


def path_name(path: KeyPath) -> str:
    """The ``/``-joined name of a key path from ``jax.tree_util.tree_flatten_with_path``
    (``'Conv_0/kernel'``; an nnx ``Variable``'s trailing ``.value`` is left out)."""
    return jax.tree_util.keystr(strip_variable_key(path), simple=True, separator="/")


def named_leaves(tree: PyTree) -> list[tuple[str, Any]]:
    """``[(path_name, leaf), ...]`` in the tree's flattening order."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [(path_name(path), leaf) for path, leaf in leaves]


def is_traced(x: Any) -> bool:
    """True when ``x`` is an abstract value inside a jax transformation (jit, grad, vmap, ...)."""
    return isinstance(x, jax.core.Tracer)


def any_traced(tree: PyTree) -> bool:
    return any(is_traced(leaf) for leaf in jax.tree_util.tree_leaves(tree))


def leading_axis_sizes(tree: PyTree) -> list[tuple[str, int | None]]:
    """``[(path_name, size of axis 0 or None for a scalar leaf), ...]``."""
    out = []
    for name, leaf in named_leaves(tree):
        shape = np.shape(leaf)
        out.append((name, shape[0] if len(shape) else None))
    return out


def map_with_names(fn: Callable[..., Any], tree: PyTree, *rest: PyTree) -> PyTree:
    """``tree_map`` whose function also receives the leaf's path name as first argument."""
    return jax.tree_util.tree_map_with_path(lambda p, *xs: fn(path_name(p), *xs), tree, *rest)


def names_in_order(names: Sequence[str]) -> str:
    """Short printable list of names for error messages."""
    names = list(names)
    return ", ".join(names[:8]) + (f", ... ({len(names)} in all)" if len(names) > 8 else "")
