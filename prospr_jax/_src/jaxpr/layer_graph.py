"""Layer graphs: which Conv/Dense kernels feed which, found by tracing the model.

Lookahead pruning (:mod:`prospr_jax.methods.lookahead`) scores a weight by the norms of the
weights of the neighbouring layers, so it needs to know, for every kernel, the kernels that
produce its input channels and the kernels that consume its output channels, with the channel
correspondence between them. A :class:`LayerGraph` holds exactly that, as a list of
:class:`Edge` s with static integer index maps.

Conventions (flax layouts): a Dense kernel is ``[in, out]``, a Conv kernel ``[kh, kw, in, out]``;
a *unit* is an input or output channel (the kernel's second-to-last / last axis). Activations
are NHWC or ``[N, features]``: the channel is the LAST axis and the batch the first.

:func:`trace_layer_graph` derives the graph from a jaxpr of the model without model-specific
code. It follows each kernel's output (``conv_general_dilated`` / ``dot_general`` with the
kernel as right operand) through channel-preserving operations to the products that consume it:

* elementwise ops with constants or parameters (bias, BatchNorm arithmetic, ReLU's
  ``max(x, 0)``; a factor computed from parameters must be per-channel so that it can be
  folded), and any elementwise function of ONE activation such as GELU or swish;
* shape ops that keep the batch axis first and the channel axis last: ``broadcast_in_dim``,
  ``reshape`` (also NHWC flattening: feature ``f`` of ``[N, H*W*C]`` is channel ``f mod C``),
  ``squeeze``, ``transpose``; reductions and windows over spatial axes (global average pool,
  ``reduce_window`` max / average pooling); ``pad`` and ``slice`` (a zero-padded channel has no
  producer; option-A shortcuts pad channels at an offset); ``concatenate`` and ``split``;
* call-like sub-computations (``jit``, ``custom_jvp_call``, ``custom_vjp_call``, ``checkpoint``)
  are inlined.

Residual joins: ``add``/``sub`` of two activations that are not functions of the same activation
is a junction; its producers are the union of both operands' producers, except that an operand
that comes from a *fork* (a value used more than once) which the other operand also depends on,
without crossing a product on the way, is an identity skip: it contributes a unit weight ("+1")
to the in-norm of the units it reaches and to the out-norm of the kernels that produced the fork.

Per-channel multipliers computed from parameters or model state (BatchNorm's
``gamma / sqrt(var + eps)`` in inference mode) are recorded on each edge as ``scale`` so that
they can be folded in. Multipliers that are literal constants (``1 / (H * W)`` of an average
pool) are not: they are not weights. A multiplier computed from batch statistics (BatchNorm in
training mode) is flagged (:attr:`LayerTrace.batch_stat_layers`): folding then needs running
statistics, which only an inference-mode trace provides.

Anything else on the way from a kernel to a product (an unsupported primitive, a product of two
activations, a reduction over channels, ...) is reported in :attr:`LayerTrace.unsupported`
naming the primitive; graph-based callers raise it instead of guessing neighbours.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import numpy as np

from prospr_jax._src.jaxpr.forward_order import PRODUCT_PRIMITIVES
from prospr_jax._src.jaxpr.walk import abstract, walk
from prospr_jax._src.tree import PyTree, named_leaves, names_in_order

EDGE_KINDS = ("weight", "identity", "input")

_REDUCTIONS = frozenset(
    {"reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_and", "reduce_or", "argmax", "argmin"}
)
_KERNEL_CASTS = frozenset({"convert_element_type", "copy", "copy_p", "reduce_precision"})
_UNARY = frozenset(
    {"neg", "abs", "sign", "floor", "ceil", "round", "tanh", "logistic", "erf", "erfc", "exp", "exp2",
     "expm1", "log", "log1p", "sqrt", "rsqrt", "cbrt", "integer_pow", "square", "sin", "cos",
     "convert_element_type", "copy", "copy_p", "reduce_precision", "stop_gradient", "is_finite", "not",
     "optimization_barrier"}
)
_JUNCTIONS = frozenset({"add", "sub", "add_any"})
_SCALINGS = frozenset({"mul", "div"})
_ELEMENTWISE = frozenset(
    {"max", "min", "pow", "atan2", "rem", "gt", "ge", "lt", "le", "eq", "ne", "and", "or", "xor",
     "select_n", "clamp", "nextafter"}
)
_WINDOWS = frozenset({"reduce_window_sum", "reduce_window_max", "reduce_window_min", "reduce_window"})


# --------------------------------------------------------------------------------------------
# The graph
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class Edge:
    """One contribution to the neighbour norms of lookahead pruning.

    Attributes:
      src: path name of the producing kernel, or ``None`` for the model input / an identity skip.
      dst: path name of the consuming kernel, or ``None`` for an identity skip leaving ``src``.
      index: int array with one entry per unit on the ``dst`` side (``dst``'s input channels, or
        the channels of the residual sum when ``dst`` is ``None``): the ``src`` output channel
        feeding it, ``-1`` where nothing from ``src`` arrives. For ``src=None`` only the sign
        matters (``>= 0``: the unit receives the input / the skip with weight 1).
      kind: ``'weight'`` (kernel to kernel), ``'identity'`` (parameter-free skip) or ``'input'``.
    """

    src: Optional[str]
    dst: Optional[str]
    index: np.ndarray
    kind: str

    def __post_init__(self):
        if self.kind not in EDGE_KINDS:
            raise ValueError(f"`kind` must be one of {EDGE_KINDS}, got {self.kind!r}")
        if self.src is None and self.dst is None:
            raise ValueError("an Edge needs a `src` or a `dst` kernel")
        object.__setattr__(self, "index", np.asarray(self.index, dtype=np.int64).reshape(-1))


@dataclasses.dataclass(frozen=True, eq=False)
class LayerGraph:
    """Static structure of a network for lookahead pruning.

    Attributes:
      layers: path names of every Conv/Dense kernel in the graph, in forward order (neighbours
        that are not pruned are layers too).
      scored: the pruned kernels (a subset of ``layers``), which get scores.
      edges: the :class:`Edge` s. A kernel without any edge into it has in-norm 1 ("missing
        neighbour"), one without any edge out of it has out-norm 1.
      source: how the graph was obtained: ``'traced'``, ``'chain'`` or ``'explicit'``.
    """

    layers: tuple[str, ...]
    scored: tuple[str, ...]
    edges: tuple[Edge, ...]
    source: str = "traced"

    def in_edges(self, name: str) -> list[Edge]:
        return [e for e in self.edges if e.dst == name]

    def out_edges(self, name: str) -> list[Edge]:
        return [e for e in self.edges if e.src == name]

    def neighbours(self) -> dict[str, dict[str, Any]]:
        """``{name: {'producers', 'consumers', 'identity_in', 'identity_out'}}`` for every layer
        (the format :meth:`from_neighbours` takes)."""
        out = {}
        for name in self.layers:
            ins, outs = self.in_edges(name), self.out_edges(name)
            out[name] = {
                "producers": sorted({e.src for e in ins if e.src is not None}, key=self.layers.index),
                "consumers": sorted({e.dst for e in outs if e.dst is not None}, key=self.layers.index),
                "identity_in": any(e.kind == "identity" for e in ins),
                "identity_out": any(e.kind == "identity" for e in outs),
            }
        return out

    def check(self, params: PyTree) -> None:
        """Raise a ``ValueError`` unless every layer is a leaf of ``params`` with ndim >= 2 and
        every edge's index fits the kernels' unit counts."""
        shapes = {n: np.shape(x) for n, x in named_leaves(params)}
        bad = [n for n in self.layers if n not in shapes or len(shapes[n]) < 2]
        if bad:
            raise ValueError(
                f"`graph` names layers that are not kernels (ndim >= 2) of `params`: {names_in_order(bad)}"
            )
        for e in self.edges:
            for end in (e.src, e.dst):
                if end is not None and end not in self.layers:
                    raise ValueError(f"`graph` edge {e.src} -> {e.dst} names {end!r}, which is not in graph.layers")
            if e.dst is not None and e.index.size != shapes[e.dst][-2]:
                raise ValueError(
                    f"`graph` edge {e.src} -> {e.dst}: index has {e.index.size} entries but {e.dst} has "
                    f"{shapes[e.dst][-2]} input units"
                )
            if e.src is not None and e.index.size and e.index.max() >= shapes[e.src][-1]:
                raise ValueError(
                    f"`graph` edge {e.src} -> {e.dst}: index refers to unit {int(e.index.max())} but {e.src} "
                    f"has {shapes[e.src][-1]} output units"
                )

    @classmethod
    def chain(
        cls, params: PyTree, order: Sequence[str], scored: Sequence[str]
    ) -> tuple["LayerGraph", list[tuple[str, str]]]:
        """The plain chain of the official LAP code: each kernel's neighbours are the previous and
        the next kernel in ``order``.

        Units are matched by count: equal counts map channel to channel; a Dense after a conv
        with ``F = k * C`` inputs maps feature ``f`` to channel ``f mod C`` (NHWC flattening).
        Returns the graph and the pairs whose unit counts do not match (left without that
        neighbour, so the norm counts as missing).
        """
        shapes = {n: np.shape(x) for n, x in named_leaves(params)}
        edges, mismatched = [], []
        for prev, cur in zip(order[:-1], order[1:]):
            index = unit_map(shapes[prev][-1], shapes[cur][-2])
            if index is None:
                mismatched.append((prev, cur))
            else:
                edges.append(Edge(prev, cur, index, "weight"))
        return cls(tuple(order), tuple(scored), tuple(edges), "chain"), mismatched

    @classmethod
    def from_neighbours(
        cls, neighbours: Mapping[str, Mapping[str, Any]], params: PyTree, order: Sequence[str], scored: Sequence[str]
    ) -> "LayerGraph":
        """A graph from an explicit mapping ``{name: {'producers': [...], 'consumers': [...],
        'identity_in': bool, 'identity_out': bool}}`` (every key optional).

        A pair listed on either side (``p`` among ``c``'s producers or ``c`` among ``p``'s
        consumers) is one edge; units are matched as in :meth:`chain` (a mismatch raises).
        ``identity_in``/``identity_out`` add a parameter-free skip (+1) on every input / output
        unit. ``order`` lists the kernels in forward order; layers named in ``neighbours`` must
        be among them.
        """
        if not isinstance(neighbours, Mapping):
            raise TypeError(f"`neighbours` must be a mapping {{path_name: {{...}}}}, got {type(neighbours).__name__}")
        shapes = {n: np.shape(x) for n, x in named_leaves(params)}
        allowed = {"producers", "consumers", "identity_in", "identity_out"}
        named = set(neighbours)
        for spec in neighbours.values():
            if not isinstance(spec, Mapping):
                raise TypeError("each value of `neighbours` must be a mapping with keys " + ", ".join(sorted(allowed)))
            for key in ("producers", "consumers"):
                value = spec.get(key, ())
                if isinstance(value, str):
                    raise TypeError(f"`neighbours` {key!r} must be a list of path names, got the string {value!r}")
                named.update(value)
        unknown = sorted(n for n in named if n not in shapes or len(shapes[n]) < 2)
        if unknown:
            raise ValueError(
                f"`neighbours` names leaves that are not kernels (ndim >= 2) of the params: {names_in_order(unknown)}"
            )
        layers = [n for n in order if n in shapes] + sorted(n for n in named if n not in order)
        pairs: list[tuple[str, str]] = []
        edges = []
        for name, spec in neighbours.items():
            extra = sorted(set(spec) - allowed)
            if extra:
                raise ValueError(f"`neighbours[{name!r}]` has unknown keys {extra}; allowed: {sorted(allowed)}")
            for p in spec.get("producers", ()):
                if (p, name) not in pairs:
                    pairs.append((p, name))
            for c in spec.get("consumers", ()):
                if (name, c) not in pairs:
                    pairs.append((name, c))
            if spec.get("identity_in", False):
                edges.append(Edge(None, name, np.arange(shapes[name][-2]), "identity"))
            if spec.get("identity_out", False):
                edges.append(Edge(name, None, np.arange(shapes[name][-1]), "identity"))
        for p, c in pairs:
            index = unit_map(shapes[p][-1], shapes[c][-2])
            if index is None:
                raise ValueError(
                    f"`neighbours`: {p} has {shapes[p][-1]} output units but {c} has {shapes[c][-2]} input "
                    "units; they must be equal, or a multiple (NHWC flattening)"
                )
            edges.append(Edge(p, c, index, "weight"))
        return cls(tuple(layers), tuple(scored), tuple(edges), "explicit")


def unit_map(out_units: int, in_units: int) -> Optional[np.ndarray]:
    """Index map from a consumer's input units to a producer's output units by count: identity
    when equal, ``f mod C`` when the consumer sees ``k * C`` flattened NHWC features, else None."""
    if in_units == out_units:
        return np.arange(in_units)
    if out_units > 0 and in_units % out_units == 0:
        return np.arange(in_units) % out_units
    return None


# --------------------------------------------------------------------------------------------
# Tracing
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class LayerTrace:
    """What :func:`trace_layer_graph` found.

    Attributes:
      layers: kernels in the order their products run (forward order).
      edges: the graph's edges (see :class:`Edge`).
      scales: one entry per edge: float64 array of the per-unit multipliers (``index``'s length)
        computed from parameters / model state on the way (BatchNorm scale in inference mode), or
        ``None`` when there is none.
      own_scales: per kernel whose output reaches a consumer or junction, the multiplier on its
        output channels on the way there (its own BatchNorm), or ``None`` when there is none. Used
        to fold BN into chain / explicit graphs.
      unsupported: messages for data flows the tracer could not follow (naming the primitive).
      batch_stat_layers: kernels whose input is scaled by statistics of the batch (BatchNorm in
        training mode).
      skip_sources: the identity skips resolved to where they come from: for every ``'identity'``
        edge into a kernel, one edge per kernel (``'weight'``, ``src`` set) or model input
        (``'input'``) whose output channels the skip carries, ``index`` per input unit of ``dst``
        (``-1``: not carried), through any chain of skips. Reachability (effective sparsity) needs
        them; lookahead's norms do not.
      out_shapes: each kernel's output activation shape in the trace (batch first, channels last),
        e.g. ``(N, H', W', C_out)`` of a conv: the positions a kernel is applied at (FLOP counts).
      channel_links: the channel couplings structured pruning needs (see :class:`ChannelLink`):
        the operands of every residual sum, the per-channel parameters and statistics applied to
        each kernel's output, the kernel input rows each channel feeds, and (with
        ``outputs=True``) the model outputs.
    """

    layers: tuple[str, ...]
    edges: tuple[Edge, ...]
    scales: tuple[Optional[np.ndarray], ...]
    own_scales: Mapping[str, Optional[np.ndarray]]
    unsupported: tuple[str, ...]
    batch_stat_layers: tuple[str, ...]
    skip_sources: tuple[Edge, ...] = ()
    out_shapes: Mapping[str, tuple] = dataclasses.field(default_factory=dict)
    channel_links: tuple["ChannelLink", ...] = ()

    def graph(self, scored: Sequence[str]) -> LayerGraph:
        return LayerGraph(self.layers, tuple(scored), self.edges, "traced")


LINK_KINDS = ("out", "in", "param", "state", "input", "output", "alive")


@dataclasses.dataclass(frozen=True, eq=False)
class ChannelLink:
    """Units that are one channel of one value: at channel position ``c`` every member ``(kind,
    name, index)`` with ``index[c] >= 0`` names the same channel, so they live or die together.

    Member kinds: ``'out'`` (output channel ``index[c]`` of kernel ``name``), ``'in'`` (input row
    of kernel ``name``), ``'param'`` / ``'state'`` (entry of a per-channel leaf such as a bias, a
    BatchNorm scale/shift or a running statistic), ``'input'`` (channel of model input ``name``),
    ``'output'`` (channel of model output ``name``) and ``'alive'`` (something makes the channel
    non-zero whatever the kernels do, e.g. ``exp`` or an additive constant; ``name`` says what).
    """

    members: tuple[tuple[str, Any, np.ndarray], ...]
    where: str

    def __post_init__(self):
        for kind, _, _ in self.members:
            if kind not in LINK_KINDS:
                raise ValueError(f"link member kind must be one of {LINK_KINDS}, got {kind!r}")


@dataclasses.dataclass(frozen=True)
class _Term:
    origin: tuple  # ('kernel', name) | ('input', i) | ('identity', fork node)
    idx: np.ndarray  # per channel of the value: unit of the origin, -1 for none
    scale: np.ndarray  # per channel: product of the multipliers since the origin


@dataclasses.dataclass(frozen=True)
class _Flow:
    terms: tuple
    shape: tuple
    skip: Optional[tuple] = None  # the identity view (terms) when this value comes from a fork
    skip_fork: Optional[int] = None
    ancestors: frozenset = frozenset()  # forks this value depends on
    stat_scaled: bool = False
    alive: Optional[str] = None  # why a channel of zero kernels is not zero here (exp, + constant, ...)


@dataclasses.dataclass(frozen=True)
class _Bad:
    reason: str


@dataclasses.dataclass
class _Eqn:
    prim: Any
    params: dict
    ins: list
    outs: list


class _FlatJaxpr:
    """A jaxpr with call-like sub-jaxprs inlined; values are integer node ids."""

    def __init__(self) -> None:
        self.shapes: list[tuple] = []
        self.origin: list[tuple] = []  # ('param', name) ('state',) ('input', i) ('const', value) ('eqn', i)
        self.eqns: list[_Eqn] = []
        self.outs: list[int] = []

    def node(self, shape: tuple, origin: tuple) -> int:
        self.shapes.append(tuple(shape))
        self.origin.append(origin)
        return len(self.shapes) - 1

    def const(self, value: Any) -> int:
        return self.node(np.shape(value), ("const", value))

    @classmethod
    def build(cls, closed: Any, invar_origins: Sequence[tuple]) -> "_FlatJaxpr":
        """The equations of ``closed`` with call-like sub-jaxprs inlined (by the package's walker)."""
        g = cls()
        jaxpr = closed.jaxpr
        ins = [g.node(v.aval.shape, o) for v, o in zip(jaxpr.invars, invar_origins)]

        def visit(eqn: Any, args: list) -> list:
            index = len(g.eqns)
            outs = [g.node(v.aval.shape, ("eqn", index)) for v in eqn.outvars]
            g.eqns.append(_Eqn(eqn.primitive, dict(eqn.params), args, outs))
            return outs

        g.outs = walk(jaxpr, [g.const(c) for c in closed.consts], ins, visit, literal=g.const, const=g.const)
        return g


class _Tracer:
    """Follows activations through a flat jaxpr (see the module docstring)."""

    def __init__(self, g: _FlatJaxpr, values: Mapping[int, Any], outputs: bool = False):
        self.g = g
        self.outputs = outputs
        self.links: list[ChannelLink] = []
        self.values: dict[int, Any] = dict(values)
        self.kind = self._kinds()
        self.kernel_of = self._kernel_products()
        self.live = self._liveness()
        self.uses = self._use_counts()
        self.flows: dict[int, Any] = {}
        self.edges: list[tuple[Edge, Optional[np.ndarray]]] = []
        self.own_scales: dict[str, Optional[np.ndarray]] = {}
        self.fork_terms: dict[int, tuple] = {}
        self.layers: list[str] = []
        self.kernel_units: dict[str, tuple[int, int]] = {}
        self.unsupported: list[str] = []
        self.batch_stat_layers: list[str] = []
        self.skip_sources: list[Edge] = []
        self.out_shapes: dict[str, tuple] = {}

    # -- static analysis ---------------------------------------------------------------------

    def _kinds(self) -> list[str]:
        g = self.g
        kind = []
        for origin in g.origin:
            tag = origin[0]
            kind.append({"param": "param", "state": "param", "input": "act", "const": "const"}.get(tag, "?"))
        for e in g.eqns:
            kinds = {kind[n] for n in e.ins}
            if "act" in kinds:
                axes = tuple(e.params.get("axes", ())) if e.prim.name in _REDUCTIONS else ()
                out = "stat" if 0 in axes else "act"
            elif "stat" in kinds:
                out = "stat"
            elif "param" in kinds:
                out = "param"
            else:
                out = "const"
            for n in e.outs:
                kind[n] = out
        return kind

    def _kernel_products(self) -> dict[int, str]:
        """eqn index -> kernel name, for products of an activation with a parameter kernel."""
        g = self.g
        found: dict[int, str] = {}
        for i, e in enumerate(g.eqns):
            if e.prim.name not in PRODUCT_PRIMITIVES or len(e.ins) != 2 or self.kind[e.ins[0]] != "act":
                continue
            n = e.ins[1]
            while g.origin[n][0] == "eqn" and g.eqns[g.origin[n][1]].prim.name in _KERNEL_CASTS:
                n = g.eqns[g.origin[n][1]].ins[0]
            if g.origin[n][0] == "param" and len(g.shapes[n]) >= 2:
                found[i] = g.origin[n][1]
        return found

    def _liveness(self) -> set:
        g, live = self.g, set()
        if self.outputs:
            live.update(n for n in g.outs if self.kind[n] == "act")
        for i in reversed(range(len(g.eqns))):
            e = g.eqns[i]
            if i in self.kernel_of:
                live.add(e.ins[0])
            elif any(n in live for n in e.outs):
                live.update(n for n in e.ins if self.kind[n] == "act")
        return live

    def _use_counts(self) -> dict[int, int]:
        uses: dict[int, int] = {}
        if self.outputs:
            for n in self.g.outs:
                if n in self.live:
                    uses[n] = uses.get(n, 0) + 1
        for i, e in enumerate(self.g.eqns):
            if i in self.kernel_of:
                uses[e.ins[0]] = uses.get(e.ins[0], 0) + 1
            elif any(n in self.live for n in e.outs):
                for n in e.ins:
                    if n in self.live:
                        uses[n] = uses.get(n, 0) + 1
        return uses

    # -- values ------------------------------------------------------------------------------

    def value(self, node: int) -> Any:
        """Concrete value of a parameter/constant node (evaluated on demand)."""
        g = self.g
        if node in self.values:
            return self.values[node]
        if g.origin[node][0] == "const":
            return g.origin[node][1]
        needed, stack = set(), [node]
        while stack:
            n = stack.pop()
            if n in self.values or g.origin[n][0] != "eqn":
                continue
            i = g.origin[n][1]
            if i in needed:
                continue
            needed.add(i)
            stack.extend(g.eqns[i].ins)
        for i in sorted(needed):
            e = g.eqns[i]
            args = []
            for n in e.ins:
                if n in self.values:
                    args.append(self.values[n])
                elif g.origin[n][0] == "const":
                    args.append(g.origin[n][1])
                else:
                    raise KeyError(n)
            out = e.prim.bind(*args, **e.params)
            outs = out if e.prim.multiple_results else [out]
            for n, v in zip(e.outs, outs):
                self.values[n] = v
        return self.values[node]

    def channel_vector(self, node: int, act_shape: tuple) -> Any:
        """The operand ``node`` of an elementwise op with an activation of ``act_shape``, as one
        value per channel: a float64 array [C]; ``True`` for a per-channel batch statistic (no
        value); ``None`` if it varies along a non-channel axis."""
        shape = self.g.shapes[node]
        r = len(act_shape)
        channels = act_shape[-1] if r else 1
        if len(shape) > r:
            return None
        padded = (1,) * (r - len(shape)) + tuple(shape)
        if padded[-1] not in (1, channels):
            return None
        if self.kind[node] == "stat":
            if all(s == 1 for s in padded[:-1]):
                return True
            origin = self.g.origin[node]
            if origin[0] == "eqn" and self.g.eqns[origin[1]].prim.name == "broadcast_in_dim":
                e = self.g.eqns[origin[1]]
                op_shape = self.g.shapes[e.ins[0]]
                dims = e.params["broadcast_dimensions"]
                last = len(shape) - 1
                if len(shape) == r and all(s == 1 or d == last for s, d in zip(op_shape, dims)):
                    return True
            return None
        try:
            val = np.asarray(self.value(node), dtype=np.float64).reshape(padded)
        except Exception:  # noqa: BLE001 - a value we cannot evaluate is not a known per-channel vector
            return None
        for axis in range(r - 1):
            if padded[axis] > 1 and not np.all(val == np.take(val, [0], axis=axis)):
                return None
        vec = val[(0,) * (r - 1)] if r > 1 else val.reshape(-1)
        return np.broadcast_to(vec.reshape(-1), (channels,)).astype(np.float64)

    # -- flows -------------------------------------------------------------------------------

    def run(self) -> None:
        g = self.g
        for n, origin in enumerate(g.origin):
            if origin[0] == "input" and n in self.live:
                shape = g.shapes[n]
                c = _channels(shape)
                term = _Term(("input", origin[1]), np.arange(c), np.ones(c))
                self._set(n, _Flow((term,), shape))
        for i, e in enumerate(g.eqns):
            if i in self.kernel_of:
                self._kernel(e, self.kernel_of[i])
                continue
            if not any(n in self.live for n in e.outs):
                continue
            acts = [self.flows[n] for n in e.ins if self.kind[n] == "act"]
            bad = next((f for f in acts if isinstance(f, _Bad)), None)
            if bad is not None:
                outs = [bad] * len(e.outs)
            else:
                try:
                    outs = self._step(e)
                except _Unsupported as err:
                    outs = [_Bad(str(err))] * len(e.outs)
            for n, f in zip(e.outs, outs):
                if n in self.live:
                    self._set(n, f)
        if self.outputs:
            for k, n in enumerate(g.outs):
                flow = self.flows.get(n)
                if isinstance(flow, _Flow) and len(g.shapes[n]) >= 1:
                    self._link(f"model output {k}", flow.terms, [("output", k, np.arange(_channels(g.shapes[n])))])

    # -- channel links (structured pruning) --------------------------------------------------

    def _resolve(self, terms: tuple) -> list:
        """``terms`` with every identity view of a fork replaced by the terms that produced the fork."""
        out = []
        for t in terms:
            if t.origin[0] != "identity":
                out.append(t)
                continue
            ok = t.idx >= 0
            pos = np.where(ok, t.idx, 0)
            for u in self._resolve(self.fork_terms[t.origin[1]]):
                idx = np.where(ok, u.idx[pos], -1)
                if np.any(idx >= 0):
                    out.append(_Term(u.origin, idx, u.scale[pos]))
        return out

    def _link(self, where: str, terms: tuple, extra: Sequence[tuple] = ()) -> None:
        members = list(extra)
        for t in self._resolve(terms):
            kind = "out" if t.origin[0] == "kernel" else "input"
            members.append((kind, t.origin[1], np.asarray(t.idx, np.int64)))
        if len(members) > 1 or any(m[0] == "alive" for m in members):
            self.links.append(ChannelLink(tuple(members), where))

    def _leaves_of(self, node: int) -> list[tuple[str, str, int]]:
        """``(kind, name, size)`` of the parameter / state leaves a non-activation value is computed
        from (not looking through activations)."""
        g, found, seen, stack = self.g, [], set(), [node]
        while stack:
            n = stack.pop()
            if n in seen or self.kind[n] in ("act", "const"):
                continue
            seen.add(n)
            origin = g.origin[n]
            if origin[0] in ("param", "state"):
                found.append((origin[0], origin[1], int(np.prod(g.shapes[n], dtype=np.int64))))
            elif origin[0] == "eqn":
                stack.extend(g.eqns[origin[1]].ins)
        return found

    def _link_operands(self, e: _Eqn, others: list, out: _Flow, out_shape: tuple) -> Optional[str]:
        """Link the per-channel leaves among the non-activation operands of an elementwise op to
        ``out``'s channels, and return whether a channel whose kernels are zero is non-zero after
        it (``out.alive`` updated: a non-zero constant or running statistic added makes it alive,
        a factor from a per-channel parameter, which a dead channel's mask zeroes, makes it dead)."""
        name, c = e.prim.name, _channels(out_shape)
        alive = out.alive
        for k in others:
            n = e.ins[k]
            multiplier = name == "mul" or (name == "div" and k == 1)
            if self.kind[n] == "const":
                value = np.asarray(self.g.origin[n][1])
                if not multiplier and value.dtype.kind in "biuf" and np.any(value != 0):
                    alive = f"primitive '{name}' with a non-zero constant"
                continue
            members, masked = [], False
            for kind, leaf, size in self._leaves_of(n):
                if size == c and c > 1:
                    members.append((kind, leaf, np.arange(c)))
                    masked = masked or kind == "param"
                elif not multiplier:
                    alive = f"primitive '{name}' with {kind} leaf {leaf!r} that is not per channel"
            if members:
                self._link(f"primitive '{name}'", out.terms, members)
            if multiplier and masked:
                alive = None
            elif not multiplier and any(m[0] == "state" for m in members):
                alive = f"primitive '{name}' with a running statistic"
        return alive

    def _set(self, node: int, flow: Any) -> None:
        if isinstance(flow, _Flow) and self.uses.get(node, 0) >= 2:
            self._record_own(flow.terms)
            self.fork_terms[node] = flow.terms
            c = _channels(flow.shape)
            fed = np.zeros(c, bool)
            for t in flow.terms:
                fed |= t.idx >= 0
            skip = (_Term(("identity", node), np.where(fed, np.arange(c), -1), np.ones(c)),)
            flow = dataclasses.replace(flow, skip=skip, skip_fork=node, ancestors=flow.ancestors | {node})
        self.flows[node] = flow

    def _record_own(self, terms: tuple) -> None:
        for t in terms:
            if t.origin[0] == "kernel" and t.origin[1] not in self.own_scales:
                units = self.kernel_units[t.origin[1]][1]
                own = np.ones(units)
                ok = t.idx >= 0
                own[t.idx[ok]] = t.scale[ok]
                self.own_scales[t.origin[1]] = None if np.all(own == 1.0) else own

    def _kernel(self, e: _Eqn, name: str) -> None:
        lhs = self.flows[e.ins[0]]
        out_shape = self.g.shapes[e.outs[0]]
        kernel_shape = self.g.shapes[e.ins[1]]
        if name in self.layers:
            self.unsupported.append(
                f"kernel {name!r} is used by more than one product (shared weights): its neighbours are not defined"
            )
        else:
            self.layers.append(name)
            self.kernel_units[name] = (kernel_shape[-2], kernel_shape[-1])
            self.out_shapes[name] = tuple(out_shape)
        problem = None
        if isinstance(lhs, _Bad):
            problem = lhs.reason
        else:
            problem = _check_product(e, self.g.shapes[e.ins[0]], kernel_shape)
        if problem is not None:
            self.unsupported.append(f"the input of kernel {name!r}: {problem}")
        else:
            if lhs.stat_scaled:
                self.batch_stat_layers.append(name)
            self._record_own(lhs.terms)
            units = np.arange(_channels(self.g.shapes[e.ins[0]]))
            extra = [("in", name, units)] + ([("alive", lhs.alive, units)] if lhs.alive else [])
            self._link(f"input of kernel {name!r}", lhs.terms, extra)
            for t in lhs.terms:
                kind = {"kernel": "weight", "input": "input", "identity": "identity"}[t.origin[0]]
                src = t.origin[1] if kind == "weight" else None
                self.edges.append((Edge(src, name, t.idx, kind), _scale_or_none(t.scale)))
                if kind == "identity":
                    for origin, idx in self._skip_origins(t.origin[1], t.idx):
                        src = origin[1] if origin[0] == "kernel" else None
                        self.skip_sources.append(Edge(src, name, idx, "weight" if src else "input"))
        c = kernel_shape[-1]
        ancestors = lhs.ancestors if isinstance(lhs, _Flow) else frozenset()
        term = _Term(("kernel", name), np.arange(c), np.ones(c))
        self._set(e.outs[0], _Flow((term,), out_shape, ancestors=ancestors))

    def _skip_origins(self, fork: int, idx: np.ndarray) -> list:
        """``(origin, index)`` of every kernel or input that the skip from ``fork`` carries, through
        chains of skips; ``idx``: per unit, the fork channel it receives (``-1``: none)."""
        out = []
        ok = idx >= 0
        for t in self.fork_terms[fork]:
            through = np.where(ok, t.idx[np.where(ok, idx, 0)], -1)
            if t.origin[0] == "identity":
                out += self._skip_origins(t.origin[1], through)
            elif np.any(through >= 0):
                out.append((t.origin, through))
        return out

    def _step(self, e: _Eqn) -> list:
        name = e.prim.name
        out_shape = self.g.shapes[e.outs[0]]
        act_pos = [k for k, n in enumerate(e.ins) if self.kind[n] == "act"]
        flows = [self.flows[e.ins[k]] for k in act_pos]
        if name in _JUNCTIONS | _SCALINGS | _ELEMENTWISE:
            return [self._elementwise(e, act_pos, flows, out_shape)]
        if name in _UNARY:
            out = _same(flows[0], out_shape)
            if _maps_zero_to_nonzero(e):
                out = dataclasses.replace(out, alive=f"primitive '{name}' (it maps 0 to a non-zero value)")
            return [out]
        if len(act_pos) != 1 and name != "concatenate":
            raise _Unsupported(f"primitive '{name}' combines {len(act_pos)} activations")
        if name == "concatenate":
            return [self._concatenate(e, out_shape)]
        if act_pos[0] != 0:
            raise _Unsupported(f"primitive '{name}' with the activation as operand {act_pos[0]}")
        flow, in_shape = flows[0], self.g.shapes[e.ins[0]]
        handler = _SHAPE_OPS.get(name)
        if handler is None:
            raise _Unsupported(f"primitive '{name}'")
        return handler(flow, in_shape, e, [self.g.shapes[n] for n in e.outs])

    def _elementwise(self, e: _Eqn, act_pos: list, flows: list, out_shape: tuple) -> _Flow:
        name = e.prim.name
        fitted = [_fit_channels(f, self.g.shapes[e.ins[k]], out_shape, name) for k, f in zip(act_pos, flows)]
        others = [k for k in range(len(e.ins)) if k not in act_pos]
        scale = None
        stat = False
        for k in others:
            n = e.ins[k]
            if not (name == "mul" or (name == "div" and k == 1)) or self.kind[n] == "const":
                continue  # an additive term, a threshold or a constant factor: not a weight
            vec = self.channel_vector(n, out_shape)
            if vec is None:
                raise _Unsupported(
                    f"primitive '{name}' by a factor computed from parameters or batch statistics that varies "
                    "along a non-channel axis (only per-channel factors, such as BatchNorm's, can be folded)"
                )
            if vec is True:
                stat = True
            else:
                with np.errstate(divide="ignore"):
                    vec = 1.0 / vec if name == "div" else vec
                scale = vec if scale is None else scale * vec
        if name == "mul" or (name == "div" and act_pos == [0]):
            alive = next((f.alive for f in fitted if f.alive is None), fitted[0].alive)  # 0 * anything = 0
        else:
            alive = next((f.alive for f in fitted if f.alive is not None), None)
        fitted = [dataclasses.replace(f, alive=alive) for f in fitted]
        if len(fitted) == 1:
            out = _same(fitted[0], out_shape)
        elif all(_equivalent(fitted[0], f) for f in fitted[1:]):
            first = fitted[0]
            same_fork = all(f.skip_fork == first.skip_fork for f in fitted)
            out = dataclasses.replace(
                first,
                shape=out_shape,
                skip=first.skip if same_fork else None,
                skip_fork=first.skip_fork if same_fork else None,
                ancestors=frozenset().union(*(f.ancestors for f in fitted)),
                stat_scaled=any(f.stat_scaled for f in fitted),
            )
        elif name in _JUNCTIONS and len(fitted) == 2:
            out = self._junction(fitted[0], fitted[1], out_shape)
        else:
            raise _Unsupported(f"primitive '{name}' of two different activations")
        out = dataclasses.replace(out, alive=self._link_operands(e, others, out, out_shape))
        if scale is not None:
            out = _scaled(out, scale)
        if stat:
            out = dataclasses.replace(out, stat_scaled=True)
        return out

    def _junction(self, a: _Flow, b: _Flow, out_shape: tuple) -> _Flow:
        self._link("residual sum", a.terms + b.terms)
        terms: list = []
        for x, other in ((a, b), (b, a)):
            if x.skip is not None and x.skip_fork in other.ancestors:
                terms.extend(x.skip)
                self._record_identity_out(x.skip_fork, x.skip)
            else:
                self._record_own(x.terms)
                terms.extend(x.terms)
        return _Flow(
            tuple(terms), out_shape, ancestors=a.ancestors | b.ancestors, stat_scaled=a.stat_scaled or b.stat_scaled,
            alive=a.alive or b.alive,
        )

    def _record_identity_out(self, fork: int, skip: tuple) -> None:
        for ident in skip:
            ok = ident.idx >= 0
            pos = np.where(ok, ident.idx, 0)
            for t in self.fork_terms[fork]:
                if t.origin[0] != "kernel":
                    continue
                index = np.where(ok, t.idx[pos], -1)
                scale = np.where(ok, t.scale[pos] * ident.scale, 1.0)
                if np.any(index >= 0):
                    self.edges.append((Edge(t.origin[1], None, index, "identity"), _scale_or_none(scale)))

    def _concatenate(self, e: _Eqn, out_shape: tuple) -> _Flow:
        dim = e.params["dimension"]
        r = len(out_shape)
        flows = [(self.flows[n] if self.kind[n] == "act" else None, self.g.shapes[n]) for n in e.ins]
        if dim == 0 or r < 2:
            raise _Unsupported("primitive 'concatenate' along the batch axis")
        if dim != r - 1:
            acts = [f for f, _ in flows if f is not None]
            if len(acts) != len(flows) or not all(_equivalent(acts[0], f) for f in acts[1:]):
                raise _Unsupported("primitive 'concatenate' of different activations along a spatial axis")
            return dataclasses.replace(acts[0], shape=out_shape, skip=None, skip_fork=None)
        total, offset, terms = out_shape[-1], 0, []
        ancestors, stat, alive = frozenset(), False, None
        for f, shape in flows:
            width = shape[-1]
            if f is not None:
                take = np.full(total, -1)
                take[offset:offset + width] = np.arange(width)
                terms.extend(_reindex_terms(f.terms, take))
                ancestors |= f.ancestors
                stat = stat or f.stat_scaled
                alive = alive or f.alive
            offset += width
        return _Flow(tuple(terms), out_shape, ancestors=ancestors, stat_scaled=stat, alive=alive)


class _Unsupported(Exception):
    pass


def _maps_zero_to_nonzero(e: _Eqn) -> bool:
    """Whether a unary primitive sends 0 to a non-zero value (``exp``, ``logistic``, ``cos``, ...)."""
    try:
        with jax.ensure_compile_time_eval():
            value = e.prim.bind(np.zeros((), np.float32), **e.params)
        return bool(np.any(np.asarray(value) != 0))
    except Exception:  # noqa: BLE001 - a primitive that cannot be probed on a scalar: assume it keeps 0
        return False


def _channels(shape: tuple) -> int:
    return shape[-1] if len(shape) >= 2 else 1


def _scale_or_none(scale: np.ndarray) -> Optional[np.ndarray]:
    return None if np.all(scale == 1.0) else np.asarray(scale, np.float64)


def _equivalent(a: _Flow, b: _Flow) -> bool:
    """Two flows are functions of the same activation (same origins and channel maps)."""
    if len(a.terms) != len(b.terms):
        return False
    return all(s.origin == t.origin and np.array_equal(s.idx, t.idx) for s, t in zip(a.terms, b.terms))


def _same(flow: _Flow, shape: tuple) -> _Flow:
    return dataclasses.replace(flow, shape=shape)


def _scaled(flow: _Flow, vec: np.ndarray) -> _Flow:
    def one(terms: Optional[tuple]) -> Optional[tuple]:
        if terms is None:
            return None
        return tuple(_Term(t.origin, t.idx, t.scale * vec) for t in terms)

    return dataclasses.replace(flow, terms=one(flow.terms), skip=one(flow.skip))


def _reindex_terms(terms: tuple, take: np.ndarray) -> list:
    ok = take >= 0
    pos = np.where(ok, take, 0)
    out = []
    for t in terms:
        idx = np.where(ok, t.idx[pos], -1)
        if np.any(idx >= 0):
            out.append(_Term(t.origin, idx, np.where(ok, t.scale[pos], 1.0)))
    return out


def _reindex(flow: _Flow, take: np.ndarray, shape: tuple) -> _Flow:
    """New flow whose channel k is the old channel ``take[k]`` (-1: no producer)."""
    take = np.asarray(take, np.int64)
    skip = None if flow.skip is None else tuple(_reindex_terms(flow.skip, take)) or None
    return dataclasses.replace(
        flow, terms=tuple(_reindex_terms(flow.terms, take)), shape=shape, skip=skip,
        skip_fork=flow.skip_fork if skip is not None else None,
    )


def _fit_channels(flow: _Flow, in_shape: tuple, out_shape: tuple, name: str) -> _Flow:
    if len(in_shape) != len(out_shape) or (len(in_shape) >= 2 and in_shape[0] != out_shape[0]):
        raise _Unsupported(f"primitive '{name}' broadcasting an activation along the batch axis")
    c_in, c_out = _channels(in_shape), _channels(out_shape)
    if c_in == c_out:
        return _same(flow, out_shape)
    if c_in == 1:
        return _reindex(flow, np.zeros(c_out, np.int64), out_shape)
    raise _Unsupported(f"primitive '{name}' with {c_in} vs {c_out} channels")


def _check_product(e: _Eqn, lhs_shape: tuple, kernel_shape: tuple) -> Optional[str]:
    r = len(lhs_shape)
    if e.prim.name == "dot_general":
        (lc, rc), (lb, rb) = e.params["dimension_numbers"]
        if len(kernel_shape) != 2 or tuple(lc) != (r - 1,) or tuple(rc) != (0,) or lb or rb:
            return (
                "primitive 'dot_general' is not a Dense layer (activation [..., in] times kernel [in, out]); "
                f"dimension_numbers={e.params['dimension_numbers']}"
            )
        return None
    dn = e.params["dimension_numbers"]
    lhs_spec, rhs_spec, out_spec = dn.lhs_spec, dn.rhs_spec, dn.out_spec
    k = len(kernel_shape)
    ok = (
        lhs_spec[0] == 0 and lhs_spec[1] == r - 1 and out_spec[0] == 0 and out_spec[1] == r - 1
        and rhs_spec[0] == k - 1 and rhs_spec[1] == k - 2
        and e.params.get("feature_group_count", 1) == 1 and e.params.get("batch_group_count", 1) == 1
    )
    if not ok:
        return (
            "primitive 'conv_general_dilated' is not a channels-last convolution with an [..., in, out] kernel "
            "and feature_group_count=1 (grouped / depthwise convolutions are not supported)"
        )
    return None


# -- shape ops: (flow, in_shape, eqn, out_shapes) -> [flows] ---------------------------------


def _batch_kept(in_shape: tuple, out_shape: tuple) -> bool:
    return len(in_shape) >= 2 and len(out_shape) >= 2 and in_shape[0] == out_shape[0]


def _op_broadcast(flow, in_shape, e, out_shapes):
    out = out_shapes[0]
    dims = tuple(e.params["broadcast_dimensions"])
    if not _batch_kept(in_shape, out) or dims[0] != 0 or dims[-1] != len(out) - 1:
        raise _Unsupported("primitive 'broadcast_in_dim' moving the batch or channel axis")
    if in_shape[-1] == out[-1]:
        return [_same(flow, out)]
    if in_shape[-1] == 1:
        return [_reindex(flow, np.zeros(out[-1], np.int64), out)]
    raise _Unsupported("primitive 'broadcast_in_dim' changing the channel count")


def _op_reshape(flow, in_shape, e, out_shapes):
    out = out_shapes[0]
    if e.params.get("dimensions") is not None or not _batch_kept(in_shape, out):
        raise _Unsupported(f"primitive 'reshape' from {in_shape} to {out} (the batch axis must stay first)")
    c = in_shape[-1]
    for j in range(len(in_shape) - 1, 0, -1):
        if math.prod(in_shape[j:]) == out[-1] and math.prod(out[:-1]) == math.prod(in_shape[:j]):
            return [_reindex(flow, np.arange(out[-1]) % c, out)]
    if c == 1:
        return [_reindex(flow, np.zeros(out[-1], np.int64), out)]
    raise _Unsupported(
        f"primitive 'reshape' from {in_shape} to {out}: only merging trailing axes into the channel axis "
        "(NHWC flattening) or reshaping the axes before the channel axis is supported"
    )


def _op_squeeze(flow, in_shape, e, out_shapes):
    dims = tuple(d % len(in_shape) for d in e.params["dimensions"])
    if 0 in dims or len(in_shape) - 1 in dims or len(out_shapes[0]) < 2:
        raise _Unsupported("primitive 'squeeze' of the batch or channel axis")
    return [_same(flow, out_shapes[0])]


def _op_transpose(flow, in_shape, e, out_shapes):
    perm = tuple(e.params["permutation"])
    if len(perm) < 2 or perm[0] != 0 or perm[-1] != len(perm) - 1:
        raise _Unsupported(f"primitive 'transpose' with permutation {perm} (moves the batch or channel axis)")
    return [_same(flow, out_shapes[0])]


def _op_reduce(flow, in_shape, e, out_shapes):
    axes = tuple(e.params["axes"])
    if e.prim.name in ("argmax", "argmin") or len(in_shape) - 1 in axes or len(out_shapes[0]) < 2:
        raise _Unsupported(f"primitive '{e.prim.name}' over the channel axis")
    return [_same(flow, out_shapes[0])]


def _op_window(flow, in_shape, e, out_shapes):
    p = e.params
    r = len(in_shape)
    for key in ("window_dimensions", "window_strides", "base_dilation", "window_dilation"):
        value = p.get(key)
        if value is not None and (value[0] != 1 or value[r - 1] != 1):
            raise _Unsupported(f"primitive '{e.prim.name}' with a window over the batch or channel axis")
    padding = p.get("padding")
    if padding is not None and (tuple(padding[0]) != (0, 0) or tuple(padding[r - 1]) != (0, 0)):
        raise _Unsupported(f"primitive '{e.prim.name}' padding the batch or channel axis")
    if e.prim.name == "reduce_window" and len(e.ins) != 2:
        raise _Unsupported("primitive 'reduce_window' over several operands")
    return [_same(flow, out_shapes[0])]


def _op_pad(flow, in_shape, e, out_shapes):
    config = e.params["padding_config"]
    if tuple(int(v) for v in config[0]) != (0, 0, 0):
        raise _Unsupported("primitive 'pad' on the batch axis")
    lo, hi, interior = (int(v) for v in config[-1])
    if interior:
        raise _Unsupported("primitive 'pad' with interior padding of the channel axis")
    take = np.arange(in_shape[-1])
    take = np.concatenate([np.full(max(lo, 0), -1), take[max(-lo, 0):]])
    take = np.concatenate([take, np.full(max(hi, 0), -1)]) if hi >= 0 else take[: len(take) + hi]
    return [_reindex(flow, take, out_shapes[0])]


def _op_slice(flow, in_shape, e, out_shapes):
    start, limit = e.params["start_indices"], e.params["limit_indices"]
    strides = e.params.get("strides") or (1,) * len(in_shape)
    if (start[0], limit[0], strides[0]) != (0, in_shape[0], 1):
        raise _Unsupported("primitive 'slice' of the batch axis")
    take = np.arange(in_shape[-1])[start[-1]:limit[-1]:strides[-1]]
    return [_reindex(flow, take, out_shapes[0])]


def _op_split(flow, in_shape, e, out_shapes):
    axis = e.params["axis"] % len(in_shape)
    if axis == 0:
        raise _Unsupported("primitive 'split' of the batch axis")
    if axis != len(in_shape) - 1:
        return [_same(flow, s) for s in out_shapes]
    outs, offset = [], 0
    for s in out_shapes:
        outs.append(_reindex(flow, np.arange(offset, offset + s[-1]), s))
        offset += s[-1]
    return outs


_SHAPE_OPS: dict[str, Callable] = {
    "broadcast_in_dim": _op_broadcast,
    "reshape": _op_reshape,
    "squeeze": _op_squeeze,
    "transpose": _op_transpose,
    "pad": _op_pad,
    "slice": _op_slice,
    "split": _op_split,
    **{name: _op_reduce for name in _REDUCTIONS},
    **{name: _op_window for name in _WINDOWS},
}


def trace_layer_graph(
    fn: Callable[[PyTree, PyTree, PyTree], Any], params: PyTree, state: PyTree, inputs: PyTree, *,
    outputs: bool = False,
) -> LayerTrace:
    """Trace ``fn(params, state, inputs)`` and return the layer graph of its Conv/Dense kernels.

    Args:
      fn: the model, e.g. ``lambda p, s, x: apply_fn(p, s, x, False)`` (inference mode, so that
        BatchNorm uses the running statistics in ``state``) or a loss ``lambda p, s, b:
        loss_fn(p, b)``.
      params: parameter pytree (concrete arrays: per-channel multipliers computed from them are
        evaluated). A *kernel* is a leaf with ndim >= 2 used as the right operand of a
        ``dot_general`` / ``conv_general_dilated`` whose left operand is an activation.
      state: model state pytree (running statistics), concrete; ``{}`` if none.
      inputs: the model inputs (arrays or ``jax.ShapeDtypeStruct``; only shapes are used). Every
        leaf is an activation with the batch on axis 0 and channels on the last axis.

      outputs: also follow the activations to ``fn``'s outputs and record which channels reach them
        (``'output'`` members of :attr:`LayerTrace.channel_links`).

    Returns:
      A :class:`LayerTrace`; its ``unsupported`` entries name what could not be followed.
    """
    param_leaves = named_leaves(params)
    state_named = named_leaves(state)
    state_leaves = [leaf for _, leaf in state_named]
    input_leaves = jax.tree_util.tree_leaves(inputs)
    closed = jax.make_jaxpr(fn)(abstract(params), abstract(state), abstract(inputs))
    origins = (
        [("param", name) for name, _ in param_leaves]
        + [("state", name) for name, _ in state_named]
        + [("input", i) for i in range(len(input_leaves))]
    )
    g = _FlatJaxpr.build(closed, origins)
    values = {}
    for n, (_, leaf) in enumerate(param_leaves):
        values[n] = leaf
    for k, leaf in enumerate(state_leaves):
        values[len(param_leaves) + k] = leaf
    tracer = _Tracer(g, values, outputs=outputs)
    tracer.run()
    return LayerTrace(
        layers=tuple(tracer.layers),
        edges=tuple(e for e, _ in tracer.edges),
        scales=tuple(s for _, s in tracer.edges),
        own_scales=dict(tracer.own_scales),
        unsupported=tuple(tracer.unsupported),
        batch_stat_layers=tuple(tracer.batch_stat_layers),
        skip_sources=tuple(tracer.skip_sources),
        out_shapes=dict(tracer.out_shapes),
        channel_links=tuple(tracer.links),
    )


__all__ = ["ChannelLink", "Edge", "LayerGraph", "LayerTrace", "trace_layer_graph", "unit_map"]
