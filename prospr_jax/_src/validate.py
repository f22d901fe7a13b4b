"""Argument validation: one place for the checks every public function makes.

Every check raises a ``TypeError`` (wrong kind of value) or ``ValueError`` (right kind, bad value) whose
message names the argument in backticks and says what is allowed, e.g.
``ValueError: `num_steps` must be an integer >= 0, got -1``. Checks that look at array VALUES (0/1
masks, finite scores) run only on concrete arrays; under ``jit`` they are skipped and the caller
documents what happens to bad values instead.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Optional, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np

from prospr_jax._src.tree import PyTree, is_traced, named_leaves, names_in_order


def _got(value: Any) -> str:
    return f"got {value!r}"


def check_int(value: Any, arg: str, *, low: Optional[int] = None, high: Optional[int] = None) -> int:
    """``value`` as a Python ``int``; ``TypeError`` unless it is an integer (bools are not), ``ValueError``
    unless ``low <= value <= high`` (each bound optional)."""
    bounds = _bounds_text(low, high)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"`{arg}` must be an integer{bounds}, {_got(value)}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"`{arg}` must be an integer{bounds}, {_got(value)}")
    return int(value)


def check_optional_int(value: Any, arg: str, *, low: Optional[int] = None) -> Optional[int]:
    """``None``, or :func:`check_int` of ``value``."""
    return None if value is None else check_int(value, arg, low=low)


def _bounds_text(low: Any, high: Any, *, low_open: bool = False, high_open: bool = False) -> str:
    parts = []
    if low is not None:
        parts.append(f"{'>' if low_open else '>='} {low:g}" if isinstance(low, float) else f"{'>' if low_open else '>='} {low}")
    if high is not None:
        parts.append(f"{'<' if high_open else '<='} {high:g}" if isinstance(high, float) else f"{'<' if high_open else '<='} {high}")
    return (" " + " and ".join(parts)) if parts else ""


def check_real(
    value: Any,
    arg: str,
    *,
    low: Optional[float] = None,
    high: Optional[float] = None,
    low_open: bool = False,
    high_open: bool = False,
    traced_ok: bool = False,
) -> Any:
    """``value`` as a finite Python ``float`` within the bounds (``low < value`` with ``low_open``, else
    ``low <= value``; likewise ``high``).

    With ``traced_ok``, a traced scalar (inside ``jit``/``vmap``/``grad``) is returned unchanged: its
    value cannot be checked, only its shape (0-d) and dtype (real).
    """
    bounds = _bounds_text(low, high, low_open=low_open, high_open=high_open)
    what = f"a finite real number{bounds}"
    if is_traced(value):
        if not traced_ok:
            raise TypeError(f"`{arg}` must be a Python number (static under jit), got a traced value")
        if np.ndim(value) != 0 or not jnp.issubdtype(jnp.result_type(value), jnp.floating) and not jnp.issubdtype(
            jnp.result_type(value), jnp.integer
        ):
            raise TypeError(f"`{arg}` must be a real scalar, got a traced {jnp.result_type(value)} of shape {np.shape(value)}")
        return value
    if isinstance(value, (bool, np.bool_, str, bytes)) or np.iscomplexobj(value):
        raise TypeError(f"`{arg}` must be {what}, {_got(value)}")
    try:
        if np.ndim(value) != 0:
            raise TypeError
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"`{arg}` must be {what}, {_got(value)}") from None
    bad = not math.isfinite(v)
    bad = bad or (low is not None and (v <= low if low_open else v < low))
    bad = bad or (high is not None and (v >= high if high_open else v > high))
    if bad:
        raise ValueError(f"`{arg}` must be {what}, {_got(value)}")
    return v


def check_bool(value: Any, arg: str) -> bool:
    """``value`` as a Python ``bool``; ``TypeError`` unless it is ``True``/``False`` (numpy bools too)."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"`{arg}` must be True or False, {_got(value)}")
    return bool(value)


def check_choice(value: Any, arg: str, choices: Sequence[Any]) -> Any:
    """``value`` unchanged if it is one of ``choices``; a ``ValueError`` listing them otherwise."""
    try:
        ok = value in tuple(choices)
    except TypeError:  # unhashable / incomparable values are not among the choices
        ok = False
    if not ok or isinstance(value, bool) and not any(c is value for c in choices):
        allowed = ", ".join(repr(c) for c in choices)
        raise ValueError(f"`{arg}` must be one of {allowed}; {_got(value)}")
    return value


def check_sparsity(value: Any, arg: str = "sparsity") -> float:
    """``value`` as a Python float in [0, 1) (static: a traced value is a ``TypeError``)."""
    if is_traced(value):
        raise TypeError(f"`{arg}` must be a Python number in [0, 1) (static under jit), got a traced value")
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"`{arg}` must be a number in [0, 1), {_got(value)}")
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"`{arg}` must be a number in [0, 1), {_got(value)}") from None
    if not 0.0 <= v < 1.0:
        raise ValueError(f"`{arg}` must be in [0, 1), {_got(value)}")
    return v


def check_shape(value: Any, arg: str, *, what: str = "one example, no batch axis") -> tuple[int, ...]:
    """``value`` as a non-empty tuple of positive Python ints; a ``ValueError`` naming ``arg`` (and
    ``what`` the shape describes) otherwise."""
    try:
        ok = isinstance(value, (tuple, list)) and len(value) > 0 and all(
            not isinstance(d, (bool, np.bool_)) and isinstance(d, (int, np.integer)) and d >= 1 for d in value
        )
    except TypeError:
        ok = False
    if not ok:
        raise ValueError(f"`{arg}` must be a non-empty tuple of positive ints ({what}), {_got(value)}")
    return tuple(int(d) for d in value)


def check_callable(value: Any, arg: str, signature: str) -> Any:
    """``value`` unchanged if it is callable; a ``TypeError`` naming the expected ``signature``."""
    if not callable(value):
        raise TypeError(f"`{arg}` must be a callable {signature}, {_got(value)}")
    return value


def check_same_structure(tree: PyTree, reference: PyTree, *, arg: str, ref_arg: str = "params") -> None:
    """``ValueError`` naming ``arg`` unless ``tree`` has ``reference``'s tree structure (the message lists
    the missing and the unexpected leaves by path name)."""
    try:
        chex.assert_trees_all_equal_structs(tree, reference)
        return
    except AssertionError:
        pass
    names = {n for n, _ in named_leaves(tree)}
    ref_names = {n for n, _ in named_leaves(reference)}
    missing = sorted(ref_names - names)
    extra = sorted(names - ref_names)
    detail = []
    if missing:
        detail.append(f"missing leaves {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if extra:
        detail.append(f"unexpected leaves {extra[:5]}{' ...' if len(extra) > 5 else ''}")
    if not detail:
        detail.append(
            f"structure {jax.tree_util.tree_structure(tree)} differs from {jax.tree_util.tree_structure(reference)}"
        )
    raise ValueError(f"`{arg}` must have the same tree structure as `{ref_arg}`: " + "; ".join(detail))


def check_real_dtype(named: Iterable[tuple[str, Any]], arg: str) -> None:
    """``TypeError`` naming ``arg`` and the leaves whose dtype is not real (complex, strings, objects)."""
    bad = []
    for name, leaf in named:
        dtype = getattr(leaf, "dtype", None)
        if dtype is None:
            dtype = np.asarray(leaf).dtype
        ok = jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer) or dtype == jnp.bool_
        if not ok:
            bad.append(f"{name} ({dtype})")
    if bad:
        raise TypeError(f"`{arg}` must hold real numbers (float, int or bool arrays); not real: {names_in_order(bad)}")


def check_finite(named: Sequence[tuple[str, Any]], arg: str) -> None:
    """``ValueError`` naming ``arg`` and the leaves holding NaN or Inf (concrete arrays only; traced leaves
    are skipped)."""
    # numpy, not jax.numpy: these checks may run while a caller's function is being traced, where a
    # jax operation on a concrete array would itself be staged.
    bad = [n for n, x in named if not is_traced(x) and not np.all(np.isfinite(np.asarray(x)))]
    if bad:
        raise ValueError(f"`{arg}` contain NaN or Inf in {names_in_order(bad)}")


def check_zero_one(named: Sequence[tuple[str, Any]], arg: str) -> None:
    """``ValueError`` naming ``arg`` and the leaves with entries other than 0 and 1 (NaN included).

    Bool leaves pass. Traced leaves cannot be read and are skipped (see :func:`prospr_jax.apply_masks`
    for what a bad traced mask does).
    """
    concrete = [(n, np.asarray(x)) for n, x in named if not is_traced(x)]
    check_real_dtype(concrete, arg)
    bad = []
    for name, x in concrete:
        if not np.all((x == 0) | (x == 1)):
            others = [v for v in np.unique(x).tolist() if not (v == 0 or v == 1)]
            bad.append(f"{name} (values {others[:3]})")
    if bad:
        raise ValueError(f"`{arg}` must hold only 0 and 1 (or booleans); other values in {names_in_order(bad)}")


__all__ = [
    "check_bool",
    "check_callable",
    "check_choice",
    "check_finite",
    "check_int",
    "check_optional_int",
    "check_real",
    "check_real_dtype",
    "check_same_structure",
    "check_shape",
    "check_sparsity",
    "check_zero_one",
]
