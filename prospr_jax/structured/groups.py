"""Channel groups: the output channels that must live or die together, found by tracing the model.

A *channel group* is a set of units that are one channel of the network:

* the output channels of every kernel whose outputs are added together at the same position of a
  residual sum (identity and projection shortcuts; option-A shortcuts, which zero-pad the skip, tie
  input channel ``c`` to sum channel ``c + offset``);
* the per-channel parameters applied to that channel on the way (conv/dense bias, BatchNorm scale
  and shift) and, in an inference-mode trace, the running statistics;
* the input rows of the kernels that read the channel.

Each group has ONE mask entry. Pruning a group zeroes every kernel column, bias and BatchNorm scale
and shift in it, so its channel is exactly zero everywhere (BatchNorm of an all-zero channel is zero
in training mode too: its batch mean and variance are zero and its scale and shift are zero).

The groups come from :func:`prospr_jax.graph.trace_layer_graph`'s channel links (a union-find over
units), not from module names, so any model made of Conv/Dense kernels, per-channel affine layers,
residual adds, pooling, flattening and concatenation works. A group is *protected* (never pruned)
when it reaches the model input or output, when no kernel reads it (the classifier's logits), when
something keeps it alive whatever its kernels do (``exp`` of it, an added constant, ...) or when one
of its kernels is not prunable.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

from prospr_jax._src.jaxpr.layer_graph import LayerTrace, trace_layer_graph
from prospr_jax._src.prunable import PrunableSpec, select_prunable
from prospr_jax._src.tree import PyTree, named_leaves, names_in_order, path_name

# Member kinds that make a group unprunable.
_PROTECTING = ("input", "output", "alive")


class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict[Any, Any] = {}

    def find(self, x: Any) -> Any:
        self.parent.setdefault(x, x)
        root = x
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[x] != root:
            self.parent[x], x = root, self.parent[x]
        return root

    def union(self, a: Any, b: Any) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra


@dataclasses.dataclass(frozen=True, eq=False)
class ChannelGroups:
    """The channel groups of a model (see the module docstring).

    Attributes:
      num_groups: G, the number of groups (protected ones included).
      prunable: bool [G]: the groups that may be pruned.
      units: ``{(kind, leaf name): int array}``: for every kernel output (``('out', name)``, one entry
        per output channel), kernel input (``('in', name)``, one per input row) and per-channel leaf
        (``('param', name)`` / ``('state', name)``, one per entry), the group of each unit, ``-1``
        for a unit in no group (an input row fed only by zero padding).
      why_protected: ``{group: reason}`` for the groups that are not prunable.
      layers: the kernels in forward order.
    """

    num_groups: int
    prunable: np.ndarray
    units: Mapping[tuple[str, str], np.ndarray]
    why_protected: Mapping[int, str]
    layers: tuple[str, ...]

    @property
    def num_prunable(self) -> int:
        return int(np.sum(self.prunable))

    def members(self, group: int) -> list[tuple[str, str, int]]:
        """``(kind, leaf, unit)`` of every unit of ``group``."""
        out = []
        for (kind, name), ids in self.units.items():
            out += [(kind, name, int(u)) for u in np.flatnonzero(ids == group)]
        return out

    def group_sums(self, per_leaf: Mapping[str, Any], kinds: tuple[str, ...] = ("out", "param")) -> jax.Array:
        """``[G]``: for every group, the sum over its units of ``per_leaf``'s values.

        ``per_leaf`` maps leaf names to arrays with the leaf's shape; a kernel's ``'out'`` unit sums
        its whole output column (every axis but the last), a per-channel leaf's unit is one entry.
        Units of other kinds, and leaves missing from ``per_leaf``, are left out. Differentiable.
        """
        total = jnp.zeros((self.num_groups,), jnp.result_type(*[jnp.asarray(v) for v in per_leaf.values()]))
        for (kind, name), ids in self.units.items():
            if kind not in kinds or name not in per_leaf:
                continue
            value = jnp.asarray(per_leaf[name])
            per_unit = value.reshape(-1, value.shape[-1]).sum(axis=0) if kind == "out" else value.reshape(-1)
            ok = ids >= 0
            total = total.at[ids[ok]].add(per_unit[np.flatnonzero(ok)])
        return total

    def leaf_masks(self, group_mask: Any, params: PyTree) -> PyTree:
        """The per-leaf masks of a group mask: every unit dead that belongs to a dropped group.

        Args:
          group_mask: ``[G]`` 0/1 (1 = keep); protected groups must be 1.
          params: the parameter pytree (or its shapes).

        Returns:
          A mask pytree with ``params``' structure: ``[1, ..., 1, C]`` channel masks on kernels with a
          prunable output channel, full-shape masks on the per-channel leaves (bias, BatchNorm scale
          and shift) of prunable groups, a 0-d ``1.0`` elsewhere. :func:`prospr_jax.apply_masks`
          with it makes the dropped channels exactly zero; kernel input rows are left as they are
          (they read a zero channel).
        """
        group_mask = jnp.asarray(group_mask)
        prunable = jnp.asarray(self.prunable)
        keep = jnp.where(prunable, group_mask, 1).astype(group_mask.dtype if jnp.issubdtype(group_mask.dtype, jnp.floating) else jnp.float32)

        def one(path: Any, leaf: Any) -> Any:
            name = path_name(path)
            shape = np.shape(leaf)
            dtype = jnp.result_type(leaf) if jnp.issubdtype(jnp.result_type(leaf), jnp.floating) else jnp.float32
            ids = self.units.get(("out", name))
            if ids is not None and len(shape) >= 2:
                if not np.any(self.prunable[ids[ids >= 0]]):
                    return jnp.ones((), dtype)
                m = jnp.where(ids >= 0, keep[np.maximum(ids, 0)], 1)
                return m.reshape((1,) * (len(shape) - 1) + (shape[-1],)).astype(dtype)
            ids = self.units.get(("param", name))
            if ids is not None and np.any(self.prunable[ids[ids >= 0]]):
                m = jnp.where(ids >= 0, keep[np.maximum(ids, 0)], 1)
                return m.reshape(shape).astype(dtype)
            return jnp.ones((), dtype)

        return jax.tree_util.tree_map_with_path(one, params)

    def kept_groups(self, leaf_masks: PyTree) -> np.ndarray:
        """bool ``[G]``: the groups that ``leaf_masks`` keeps (read back from the kernels' output
        channel masks, which must agree within every group).

        Raises:
          ValueError: a group whose members the masks keep partly (not channel masks of whole
            groups), naming the group's units.
        """
        votes = np.zeros((self.num_groups, 2), np.int64)  # [dropped, kept] columns seen
        for name, m in named_leaves(leaf_masks):
            ids = self.units.get(("out", name))
            if ids is None:
                continue
            m = np.asarray(m)
            if m.ndim == 0:
                col = np.full(ids.shape, bool(m != 0))
            else:
                m = m.reshape(-1, m.shape[-1])
                col = np.any(m != 0, axis=0)
                if m.shape[-1] == 1 and ids.size > 1:
                    col = np.full(ids.shape, bool(col[0]))
                elif m.shape[0] > 1 and not np.all(np.all(m != 0, axis=0) | ~col):
                    raise ValueError(f"`masks` prunes single weights of {name!r}; compaction needs channel masks")
            ok = ids >= 0
            np.add.at(votes, (ids[ok], col[ok].astype(np.int64)), 1)
        mixed = np.flatnonzero((votes[:, 0] > 0) & (votes[:, 1] > 0))
        if mixed.size:
            g = int(mixed[0])
            units = [f"{k}:{n}[{u}]" for k, n, u in self.members(g) if k == "out"]
            raise ValueError(
                f"`masks` keeps part of channel group {g} and drops the rest ({names_in_order(units)}); "
                "channels added together in a residual sum must be pruned together (use channel masks from "
                "prospr_jax.structured)"
            )
        kept = votes[:, 0] == 0
        if np.any(~kept & ~self.prunable):
            g = int(np.flatnonzero(~kept & ~self.prunable)[0])
            raise ValueError(f"`masks` drops channel group {g}, which is protected: {self.why_protected[g]}")
        return kept


def groups_from_trace(trace: LayerTrace, prunable_kernels: Optional[set] = None) -> ChannelGroups:
    """Union-find over the trace's channel links (see the module docstring).

    Args:
      trace: a trace with channel links (:func:`prospr_jax.graph.trace_layer_graph`).
      prunable_kernels: the kernels whose output channels may be pruned (default: every traced one).

    Raises:
      ValueError: the trace has data flows it could not follow (naming the operations).
    """
    if trace.unsupported:
        raise ValueError(
            "channel groups need a model the tracer can follow; it could not follow: "
            + "; ".join(dict.fromkeys(trace.unsupported))
        )
    uf = _UnionFind()
    sizes: dict[tuple[str, str], int] = {}
    for link in trace.channel_links:
        width = max(len(idx) for _, _, idx in link.members)
        for kind, name, idx in link.members:
            if kind in ("out", "in", "param", "state"):
                key = (kind, name)
                if len(idx) and idx.max() >= 0:
                    sizes[key] = max(sizes.get(key, 0), int(idx.max()) + 1)
        for c in range(width):
            nodes = [(kind, name, int(idx[c])) for kind, name, idx in link.members if c < len(idx) and idx[c] >= 0]
            for node in nodes[1:]:
                uf.union(nodes[0], node)
            if nodes:
                uf.find(nodes[0])
    # Every output channel of every traced kernel is a unit, linked or not.
    for e in trace.edges:
        if e.src is not None and len(e.index) and e.index.max() >= 0:
            key = ("out", e.src)
            sizes[key] = max(sizes.get(key, 0), int(e.index.max()) + 1)
    roots: dict[Any, int] = {}
    units: dict[tuple[str, str], np.ndarray] = {}
    for key, size in sorted(sizes.items(), key=lambda kv: (kv[0][0] != "out", kv[0][1])):
        ids = np.full(size, -1, np.int64)
        for u in range(size):
            node = (key[0], key[1], u)
            if node in uf.parent or key[0] == "out":
                ids[u] = roots.setdefault(uf.find(node), len(roots))
        units[key] = ids
    num = len(roots)
    why: dict[int, str] = {}
    root_of = {v: k for k, v in roots.items()}
    protecting: dict[Any, str] = {}
    for node in uf.parent:
        if node[0] in _PROTECTING:
            r = uf.find(node)
            if r in roots and roots[r] not in why:
                why[roots[r]] = {"input": "it carries a channel of the model input",
                                 "output": "it reaches the model output",
                                 "alive": f"it is kept non-zero by {node[1]}"}[node[0]]
    read = np.zeros(num, bool)
    for (kind, _), ids in units.items():
        if kind == "in":
            read[ids[ids >= 0]] = True
    for g in range(num):
        if g not in why and not read[g]:
            why[g] = "no kernel reads it (an output channel such as the classifier's logits)"
    for (kind, name), ids in units.items():
        if kind == "out" and prunable_kernels is not None and name not in prunable_kernels:
            for g in ids[ids >= 0]:
                why.setdefault(int(g), f"kernel {name!r} is not prunable")
    del root_of, protecting
    prunable = np.ones(num, bool)
    prunable[list(why)] = False
    return ChannelGroups(num, prunable, units, why, tuple(trace.layers))


def channel_groups(
    loss_fn: Callable[[PyTree, Any], Any], params: PyTree, batch: Any, *, prunable: PrunableSpec = None
) -> ChannelGroups:
    """The channel groups of the model inside ``loss_fn(params, batch)``.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar`` (BatchNorm in training mode is fine).
      params: the parameters (concrete: per-channel factors are evaluated).
      batch: one batch (only shapes matter).
      prunable: which kernels' output channels may be pruned (see :func:`prospr_jax.select_prunable`;
        default every Conv/Dense kernel). Channels no kernel reads (the classifier's) never are.

    Raises:
      ValueError: an operation the tracer cannot follow (named in the message).
    """
    selected = select_prunable(params, prunable)
    names = {name for name, keep in named_leaves(selected) if keep}
    trace = trace_layer_graph(lambda p, s, b: loss_fn(p, b), params, {}, batch)
    return groups_from_trace(trace, names)


def model_channel_groups(
    apply_fn: Callable[..., Any], params: PyTree, state: PyTree, inputs: Any, *, prunable: PrunableSpec = None
) -> ChannelGroups:
    """The channel groups of ``apply_fn(params, state, inputs, False)`` (inference mode): the same
    groups as :func:`channel_groups`, with the running statistics in ``state`` as members and the
    channels that reach the model output protected."""
    selected = select_prunable(params, prunable)
    names = {name for name, keep in named_leaves(selected) if keep}
    trace = trace_layer_graph(lambda p, s, x: apply_fn(p, s, x, False), params, state, inputs, outputs=True)
    return groups_from_trace(trace, names)


__all__ = ["ChannelGroups", "channel_groups", "groups_from_trace", "model_channel_groups"]
