"""Compaction: a physically smaller model whose outputs equal the channel-masked model's.

:func:`compact` takes a model ``apply_fn(params, state, x, train)``, its variables and the masks of
:mod:`prospr_jax.structured.scores` and returns a :class:`CompactModel` with smaller variables: every
dropped channel's kernel column, the kernel rows that read it, its bias, BatchNorm scale, shift and
running statistics are removed from the arrays. No model code is rewritten by hand: the compact model
re-runs the model's own program (its jaxpr, traced at the original shapes for the input's shape) on
the small arrays, carrying for each value the original channel indices its last axis still holds.

How every operation reads the small arrays: a Conv/Dense kernel product uses the small kernel (its
kept input rows and output columns); per-channel operations take the kept entries; ``pad`` on the
channel axis (option-A shortcuts) pads nothing and shifts the indices instead; ``slice`` and
``concatenate`` map the indices; an elementwise op of two values that hold different channels (the
option-A residual sum) scatters both onto the union. Where the masked model has a dropped channel
that is NOT exactly zero and it would matter (a kernel reads it, a residual sum mixes it in, a
reduction over channels sees it), compaction stops with an error naming the operation; so do
operations it does not know on a pruned channel axis (grouped / depthwise convolutions, sorting,
gathers along channels, ...). Those cannot be compacted without changing the outputs.

Outputs are equal to the masked model's up to float summation order (the small convolutions add fewer
zero terms), in inference mode and in training mode (BatchNorm with batch statistics: a dropped
channel is zero and its statistics do not enter any kept channel).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from prospr_jax._src.jaxpr.walk import abstract, walk
from prospr_jax._src.tree import PyTree, named_leaves
from prospr_jax.structured.groups import ChannelGroups, model_channel_groups

_PRODUCTS = ("conv_general_dilated", "dot_general")
_PASS_THROUGH = frozenset({"reduce_window_sum", "reduce_window_max", "reduce_window_min", "reduce_window",
                           "convert_element_type", "copy", "copy_p", "reduce_precision", "stop_gradient",
                           "optimization_barrier"})


class CompactionError(ValueError):
    """The masked model cannot be made smaller without changing its outputs (the message says where)."""


@dataclasses.dataclass(frozen=True)
class _V:
    """A value of the compact program: ``arr`` holds original channels ``chan`` on its last axis
    (and, for a kernel, original input rows ``rows`` on its second-to-last axis); ``zero``: the
    dropped channels are exactly zero in the masked model."""

    arr: Any
    chan: Optional[np.ndarray]
    orig: int
    zero: bool
    rows: Optional[np.ndarray] = None
    rows_orig: int = 0


def _wrap(arr: Any, chan: Optional[np.ndarray], orig: int, zero: bool, **kw: Any) -> Any:
    if chan is not None and kw.get("rows") is None and len(chan) == orig and np.array_equal(chan, np.arange(orig)):
        return arr
    return _V(arr, None if chan is None else np.asarray(chan, np.int64), orig, zero, **kw)


def _arr(v: Any) -> Any:
    return v.arr if isinstance(v, _V) else v


def _known_zero(v: Any) -> bool:
    if isinstance(v, _V):
        return v.zero
    try:
        return bool(np.all(np.asarray(v) == 0))
    except Exception:  # noqa: BLE001 - a traced value: not known
        return False


def _zero_probe(v: Any) -> Any:
    """The operand's value at a dropped channel for the zero check (``None``: unknown)."""
    if isinstance(v, _V):
        return 0.0 if v.zero else None
    try:
        a = np.asarray(v)
    except Exception:  # noqa: BLE001
        return None
    if a.size == 1:
        return a.reshape(())
    return None


class _Program:
    """The visitor of :func:`prospr_jax._src.jaxpr.walk.walk` that runs a program on small arrays."""

    def fail(self, eqn: Any, why: str) -> None:
        raise CompactionError(f"cannot compact at primitive '{eqn.primitive.name}': {why}")

    # -- the visitor ---------------------------------------------------------------------------

    def visit(self, eqn: Any, invals: list) -> list:
        name = eqn.primitive.name
        if name == "pad" and not isinstance(invals[0], _V) and any(eqn.params["padding_config"][-1][:2]):
            # Zero channels padded onto a whole value: keep them implicit (they are dropped channels
            # that are exactly zero), so that a residual sum with pruned channels can drop them too.
            c = np.shape(invals[0])[-1]
            invals = [_V(invals[0], np.arange(c), c, True)] + list(invals[1:])
        if not any(isinstance(v, _V) for v in invals):
            if any(isinstance(v, jax.core.Tracer) for v in invals):
                out = eqn.primitive.bind(*invals, **eqn.params)
            else:
                with jax.ensure_compile_time_eval():  # constants stay concrete (pad values, ...)
                    out = eqn.primitive.bind(*invals, **eqn.params)
            return list(out) if eqn.primitive.multiple_results else [out]
        out_avals = [v.aval for v in eqn.outvars]
        if name in _PRODUCTS:
            return [self.product(eqn, invals)]
        handler = getattr(self, "op_" + name, None)
        if handler is not None:
            return handler(eqn, invals, out_avals)
        if name in _PASS_THROUGH:
            return self.pass_through(eqn, invals, out_avals)
        if not eqn.primitive.multiple_results and all(
            not isinstance(v, _V) or len(out_avals[0].shape) == v.arr.ndim for v in invals
        ) and self._is_elementwise(eqn, invals, out_avals[0]):
            return [self.elementwise(eqn, invals, out_avals[0])]
        self.fail(eqn, "this operation is not supported on a pruned channel axis")
        return []

    @staticmethod
    def _is_elementwise(eqn: Any, invals: list, out_aval: Any) -> bool:
        if eqn.params and eqn.primitive.name not in ("integer_pow", "select_n", "clamp", "pow", "max", "min",
                                                     "nextafter", "rem", "atan2", "erf_inv"):
            return not any(isinstance(p, (tuple, list, np.ndarray)) or hasattr(p, "shape") for p in eqn.params.values())
        return True

    def pass_through(self, eqn: Any, invals: list, out_avals: list) -> list:
        v = invals[0]
        if isinstance(v, _V) and v.rows is None and eqn.primitive.name.startswith("reduce_window"):
            r = v.arr.ndim
            dims = eqn.params.get("window_dimensions")
            if dims is not None and dims[r - 1] != 1:
                self.fail(eqn, "a window over the channel axis")
        args = [_arr(x) for x in invals]
        out = eqn.primitive.bind(*args, **eqn.params)
        outs = list(out) if eqn.primitive.multiple_results else [out]
        if not isinstance(v, _V):
            return outs
        return [_V(o, v.chan, v.orig, v.zero, v.rows, v.rows_orig) for o in outs]

    # -- products -------------------------------------------------------------------------------

    def product(self, eqn: Any, invals: list) -> Any:
        lhs, rhs = invals
        if not isinstance(rhs, _V) or rhs.rows is None:
            self.fail(eqn, "a product that is not an activation times a Conv/Dense kernel reads a pruned channel")
        if eqn.primitive.name == "conv_general_dilated" and eqn.params.get("feature_group_count", 1) != 1:
            self.fail(eqn, "grouped / depthwise convolutions cannot be compacted")
        if isinstance(lhs, _V):
            if lhs.rows is not None:
                self.fail(eqn, "a kernel used as an activation")
            if not lhs.zero:
                self.fail(eqn, "a dropped channel this kernel reads is not zero in the masked model "
                               "(something after its kernels makes it non-zero)")
            if eqn.primitive.name == "dot_general":
                (lc, _), _ = eqn.params["dimension_numbers"]
                if tuple(lc) != (lhs.arr.ndim - 1,):
                    self.fail(eqn, "a product that does not contract the channel axis")
        have = lhs.chan if isinstance(lhs, _V) else np.arange(np.shape(lhs)[-1])
        if not np.array_equal(have, rhs.rows):
            self.fail(eqn, "the kernel's kept input rows are not the channels its input keeps (the masks do not "
                           "come from this model's channel groups)")
        out = eqn.primitive.bind(_arr(lhs), rhs.arr, **eqn.params)
        return _wrap(out, rhs.chan, eqn.outvars[0].aval.shape[-1], True)

    # -- elementwise ----------------------------------------------------------------------------

    def elementwise(self, eqn: Any, invals: list, out_aval: Any) -> Any:
        name = eqn.primitive.name
        c = out_aval.shape[-1] if out_aval.shape else 1
        chans = [v.chan for v in invals if isinstance(v, _V)]
        for k, v in enumerate(invals):
            # A whole per-channel operand holds every channel, unless it only scales (a factor keeps
            # a dropped channel at zero).
            factor = name == "mul" or (name == "div" and k == 1)
            shape = np.shape(v)
            if not isinstance(v, _V) and not factor and len(shape) == len(out_aval.shape) and len(shape) and shape[-1] == c > 1:
                chans.append(np.arange(c))
        target = np.unique(np.concatenate(chans)) if chans else None
        if target is not None and len(target) == c and not any(isinstance(v, _V) and v.rows is not None for v in invals):
            target = np.arange(c)
        args = []
        for v in invals:
            if isinstance(v, _V):
                if v.rows is not None:
                    args.append(v.arr)  # elementwise on a kernel (a cast): rows and columns pass through
                    continue
                if np.array_equal(v.chan, target):
                    args.append(v.arr)
                    continue
                if not v.zero:
                    self.fail(eqn, "values holding different channels meet, and a dropped one is not zero")
                pos = np.searchsorted(target, v.chan)
                shape = v.arr.shape[:-1] + (len(target),)
                args.append(jnp.zeros(shape, v.arr.dtype).at[..., pos].set(v.arr))
                continue
            shape = np.shape(v)
            if len(shape) and shape[-1] == c and c > 1 and len(shape) == len(out_aval.shape):
                args.append(jnp.take(v, target, axis=-1))  # a full per-channel operand: its kept entries
            else:
                args.append(v)
        out = eqn.primitive.bind(*args, **eqn.params)
        kernel = next((v for v in invals if isinstance(v, _V) and v.rows is not None), None)
        if kernel is not None:
            return _V(out, kernel.chan, kernel.orig, kernel.zero, kernel.rows, kernel.rows_orig)
        return _wrap(out, target, c, self._zero_after(eqn, invals))

    @staticmethod
    def _zero_after(eqn: Any, invals: list) -> bool:
        name = eqn.primitive.name
        if name == "mul":
            return any(_known_zero(v) for v in invals)
        if name == "div":
            return _known_zero(invals[0])
        probes = [_zero_probe(v) for v in invals]
        if any(p is None for p in probes):
            return False
        try:
            with jax.ensure_compile_time_eval():  # evaluate now, also while the compact program is traced
                value = eqn.primitive.bind(*[np.asarray(p, np.float32) if not hasattr(p, "dtype") or np.asarray(p).dtype.kind == "f"
                                             else p for p in probes], **eqn.params)
            return bool(np.all(np.asarray(value) == 0))
        except Exception:  # noqa: BLE001 - cannot evaluate on scalars: not known
            return False

    # -- shape operations ---------------------------------------------------------------------------

    def op_broadcast_in_dim(self, eqn, invals, out_avals):
        v = invals[0]
        shape, dims = tuple(eqn.params["shape"]), tuple(eqn.params["broadcast_dimensions"])
        if v.rows is not None:
            self.fail(eqn, "broadcasting a kernel")
        r = v.arr.ndim
        if r == 0 or dims[r - 1] != len(shape) - 1 or v.orig != shape[-1]:
            self.fail(eqn, "broadcasting that moves the channel axis")
        new = shape[:-1] + (len(v.chan),)
        out = jax.lax.broadcast_in_dim(v.arr, new, dims, out_sharding=eqn.params.get("sharding"))
        return [_V(out, v.chan, v.orig, v.zero)]

    def op_reshape(self, eqn, invals, out_avals):
        v = invals[0]
        if v.rows is not None or eqn.params.get("dimensions") is not None:
            self.fail(eqn, "reshaping a kernel")
        in_shape = eqn.invars[0].aval.shape
        out_shape = tuple(eqn.params["new_sizes"])
        c = in_shape[-1]
        if out_shape[-1] == c and int(np.prod(out_shape[:-1])) == int(np.prod(in_shape[:-1])):
            out = v.arr.reshape(out_shape[:-1] + (len(v.chan),))
            return [_V(out, v.chan, v.orig, v.zero)]
        for j in range(len(in_shape) - 1, 0, -1):
            merged = int(np.prod(in_shape[j:]))
            if merged == out_shape[-1] and tuple(out_shape[:-1]) == tuple(in_shape[:j]):
                positions = merged // c
                chan = (np.arange(positions)[:, None] * c + v.chan[None, :]).reshape(-1)
                out = v.arr.reshape(tuple(out_shape[:-1]) + (positions * len(v.chan),))
                return [_wrap(out, chan, merged, v.zero)]
        self.fail(eqn, f"reshape from {in_shape} to {out_shape} of a pruned channel axis")

    def op_squeeze(self, eqn, invals, out_avals):
        v = invals[0]
        dims = tuple(d % v.arr.ndim for d in eqn.params["dimensions"])
        if v.arr.ndim - 1 in dims:
            self.fail(eqn, "squeezing the channel axis")
        return [_V(jax.lax.squeeze(v.arr, dims), v.chan, v.orig, v.zero)]

    def op_expand_dims(self, eqn, invals, out_avals):
        self.fail(eqn, "expand_dims on a pruned channel axis")

    def op_transpose(self, eqn, invals, out_avals):
        v = invals[0]
        perm = tuple(eqn.params["permutation"])
        if perm[-1] != len(perm) - 1 or v.rows is not None:
            self.fail(eqn, f"transpose {perm} moves the channel axis")
        return [_V(jax.lax.transpose(v.arr, perm), v.chan, v.orig, v.zero)]

    def _reduce(self, eqn, invals, out_avals):
        v = invals[0]
        axes = tuple(eqn.params["axes"])
        r = v.arr.ndim
        out = eqn.primitive.bind(v.arr, **eqn.params)
        if r - 1 not in axes:
            return [_V(out, v.chan, v.orig, v.zero)]
        if eqn.primitive.name == "reduce_sum" and v.zero:
            return [out]
        self.fail(eqn, "a reduction over the pruned channel axis")

    op_reduce_sum = op_reduce_max = op_reduce_min = _reduce

    def op_argmax(self, eqn, invals, out_avals):
        self.fail(eqn, "argmax over a pruned channel axis")

    op_argmin = op_argmax

    def op_pad(self, eqn, invals, out_avals):
        v, value = invals
        if not isinstance(v, _V):
            self.fail(eqn, "padding with a pruned value")
        config = [tuple(int(x) for x in c) for c in eqn.params["padding_config"]]
        lo, hi, interior = config[-1]
        if interior:
            self.fail(eqn, "interior padding of the channel axis")
        if (lo or hi) and not _known_zero(value):
            self.fail(eqn, "padding the channel axis with a non-zero value")
        out_c = out_avals[0].shape[-1]
        chan = v.chan + lo
        ok = (chan >= 0) & (chan < out_c)
        arr = v.arr if np.all(ok) else jnp.take(v.arr, np.flatnonzero(ok), axis=-1)
        out = jax.lax.pad(arr, _arr(value), config[:-1] + [(0, 0, 0)])
        return [_wrap(out, chan[ok], out_c, v.zero)]

    def op_slice(self, eqn, invals, out_avals):
        v = invals[0]
        start, limit = list(eqn.params["start_indices"]), list(eqn.params["limit_indices"])
        strides = list(eqn.params.get("strides") or [1] * len(start))
        a, b, s = start[-1], limit[-1], strides[-1]
        sel = (v.chan >= a) & (v.chan < b) & ((v.chan - a) % s == 0)
        arr = jnp.take(v.arr, np.flatnonzero(sel), axis=-1)
        start[-1], limit[-1], strides[-1] = 0, int(sel.sum()), 1
        out = jax.lax.slice(arr, start, limit, strides)
        return [_wrap(out, (v.chan[sel] - a) // s, out_avals[0].shape[-1], v.zero)]

    def op_concatenate(self, eqn, invals, out_avals):
        dim = eqn.params["dimension"]
        r = len(out_avals[0].shape)
        if dim != r - 1:
            return [self.elementwise_like_concat(eqn, invals, out_avals)]
        arrs, chans, offset, zero = [], [], 0, True
        for v, var in zip(invals, eqn.invars):
            width = var.aval.shape[-1]
            if isinstance(v, _V):
                arrs.append(v.arr)
                chans.append(v.chan + offset)
                zero = zero and v.zero
            else:
                arrs.append(v)
                chans.append(np.arange(width) + offset)
            offset += width
        out = jax.lax.concatenate(arrs, dim)
        return [_wrap(out, np.concatenate(chans), offset, zero)]

    def elementwise_like_concat(self, eqn, invals, out_avals):
        chans = [v.chan for v in invals if isinstance(v, _V)]
        if not all(isinstance(v, _V) and np.array_equal(v.chan, chans[0]) for v in invals):
            self.fail(eqn, "concatenating along a non-channel axis values that hold different channels")
        out = eqn.primitive.bind(*[v.arr for v in invals], **eqn.params)
        return _V(out, chans[0], invals[0].orig, all(v.zero for v in invals))


def _same_index(a: Optional[np.ndarray], b: Optional[np.ndarray], n: int) -> bool:
    a = np.arange(n) if a is None else a
    b = np.arange(n) if b is None else b
    return a.shape == b.shape and np.array_equal(a, b)


# ------------------------------------------------------------------------------------------------
# The compact model
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LeafSlice:
    """Which entries of one leaf the compact model keeps: original indices along the last axis
    (``chan``) and, for a kernel, along the second-to-last (``rows``); ``None``: all."""

    shape: tuple[int, ...]
    dtype: Any
    chan: Optional[tuple[int, ...]] = None
    rows: Optional[tuple[int, ...]] = None
    masked: bool = True  # dropped entries are zero in the masked model (False: running statistics)

    @property
    def compact_shape(self) -> tuple[int, ...]:
        """The leaf's shape in the compact model."""
        out = list(self.shape)
        if self.chan is not None:
            out[-1] = len(self.chan)
        if self.rows is not None:
            out[-2] = len(self.rows)
        return tuple(out)


@dataclasses.dataclass(frozen=True, eq=False)
class CompactModel:
    """A model computed on smaller variables (see the module docstring).

    ``apply(params, state, x, train=False)`` takes the compact ``params``/``state`` that
    :func:`compact` returned and any input of the original model's input shape (any batch size);
    it returns what the original ``apply_fn`` returns. It is a pure function of arrays: jit it,
    differentiate it, measure it.
    """

    apply_fn: Callable[..., Any]
    param_slices: Mapping[str, LeafSlice]
    state_slices: Mapping[str, LeafSlice]
    param_tree: Any
    state_tree: Any

    @staticmethod
    def _wrap_leaves(tree: PyTree, slices: Mapping[str, LeafSlice]) -> list:
        out = []
        for name, leaf in named_leaves(tree):
            s = slices[name]
            if s.rows is not None:  # a kernel: always tracked, its rows must meet its input's channels
                chan = np.arange(s.shape[-1]) if s.chan is None else np.asarray(s.chan)
                out.append(_V(leaf, chan, s.shape[-1], True, np.asarray(s.rows, np.int64), s.shape[-2]))
            elif s.chan is not None:
                out.append(_wrap(leaf, np.asarray(s.chan), s.shape[-1], s.masked))
            else:
                out.append(leaf)
        return out

    @staticmethod
    def _original_abstract(slices: Mapping[str, LeafSlice], treedef: Any) -> Any:
        # ``slices`` is in the tree's flattening order.
        leaves = [jax.ShapeDtypeStruct(s.shape, s.dtype) for s in slices.values()]
        return jax.tree_util.tree_unflatten(treedef, leaves)

    def apply(self, params: PyTree, state: PyTree, x: Any, train: bool = False) -> Any:
        p0 = self._original_abstract(self.param_slices, self.param_tree)
        s0 = self._original_abstract(self.state_slices, self.state_tree)
        closed, out_shape = jax.make_jaxpr(lambda p, s, xx: self.apply_fn(p, s, xx, train), return_shape=True)(
            p0, s0, abstract(x)
        )
        args = (self._wrap_leaves(params, self.param_slices) + self._wrap_leaves(state, self.state_slices)
                + jax.tree_util.tree_leaves(x))
        outs = walk(closed.jaxpr, list(closed.consts), args, _Program().visit)
        outs = [o.arr if isinstance(o, _V) else o for o in outs]
        return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(out_shape), outs)


def _slices_for(tree: PyTree, groups: ChannelGroups, kept: np.ndarray, kind: str) -> dict[str, LeafSlice]:
    out = {}
    for name, leaf in named_leaves(tree):
        shape, dtype = tuple(np.shape(leaf)), jnp.result_type(leaf)
        chan = rows = None
        out_ids = groups.units.get(("out", name)) if kind == "param" else None
        if out_ids is not None and len(shape) >= 2:
            chan = tuple(int(u) for u in np.flatnonzero(kept[out_ids]))
            in_ids = groups.units.get(("in", name))
            if in_ids is not None:  # rows reading a kept channel; rows fed by nothing (zero padding) go
                rows = tuple(int(u) for u in np.flatnonzero((in_ids >= 0) & kept[np.maximum(in_ids, 0)]))
            else:
                rows = tuple(range(shape[-2]))
        else:
            ids = groups.units.get((kind, name))
            if ids is not None and len(ids) == int(np.prod(shape)) and len(shape) >= 1:
                chan = tuple(int(u) for u in np.flatnonzero(kept[ids]))
        out[name] = LeafSlice(shape, dtype, chan, rows, masked=(kind == "param"))
    return out


def _take(leaf: Any, s: LeafSlice) -> Any:
    arr = jnp.asarray(leaf)
    if s.rows is not None:
        arr = jnp.take(arr, np.asarray(s.rows, np.int64), axis=-2)
    if s.chan is not None:
        arr = jnp.take(arr, np.asarray(s.chan, np.int64), axis=-1)
    return arr


def compact(
    apply_fn: Callable[..., Any],
    params: PyTree,
    state: PyTree,
    masks: PyTree,
    example_input: Any,
    *,
    groups: Optional[ChannelGroups] = None,
) -> tuple[CompactModel, PyTree, PyTree]:
    """The compact model of the channel-masked model ``apply_masks(params, masks)``.

    Args:
      apply_fn: ``apply_fn(params, state, x, train) -> outputs`` (e.g.
        :func:`prospr_jax.flax_apply_fn` of a flax.linen model).
      params: the parameters (trained or not; the masked entries are dropped whatever they hold).
      state: the model state (``{'batch_stats': ...}`` or ``{}``).
      masks: channel masks of whole groups (:func:`prospr_jax.structured.prune_channels`); a
        group partly kept is an error.
      example_input: an input batch (only its shape and dtype are used) for tracing the groups.
      groups: the groups of the model in inference mode (default: traced here).

    Returns:
      ``(compact_model, compact_params, compact_state)``;
      ``compact_model.apply(compact_params, compact_state, x, train)`` equals
      ``apply_fn(apply_masks(params, masks), state, x, train)`` up to float rounding.

    Raises:
      CompactionError: an operation that keeps a dropped channel alive or that cannot be compacted
        (named in the message); ValueError for masks that are not channel masks of whole groups.
    """
    if groups is None:
        groups = model_channel_groups(apply_fn, params, state, example_input)
    kept = groups.kept_groups(masks)
    param_slices = _slices_for(params, groups, kept, "param")
    state_slices = _slices_for(state, groups, kept, "state")
    small_params = jax.tree_util.tree_unflatten(
        jax.tree_util.tree_structure(params), [_take(leaf, param_slices[n]) for n, leaf in named_leaves(params)]
    )
    small_state = jax.tree_util.tree_unflatten(
        jax.tree_util.tree_structure(state), [_take(leaf, state_slices[n]) for n, leaf in named_leaves(state)]
    )
    model = CompactModel(apply_fn, param_slices, state_slices, jax.tree_util.tree_structure(params),
                         jax.tree_util.tree_structure(state))
    return model, small_params, small_state


def param_count(tree: PyTree) -> int:
    """The number of entries of every leaf of ``tree``."""
    return int(sum(int(np.prod(np.shape(x), dtype=np.int64)) for x in jax.tree_util.tree_leaves(tree)))


__all__ = ["CompactModel", "CompactionError", "LeafSlice", "compact", "param_count"]
