"""Layer graphs: which Conv/Dense kernels feed which, traced from the model.

Lookahead pruning scores a weight by the norms of its neighbouring layers, and structured pruning ties
the channels that meet in a residual sum: both need, for every kernel, the kernels that produce its
input channels and the kernels that consume its output channels, with the channel correspondence.
:func:`trace_layer_graph` derives it from a jaxpr of the model; :class:`LayerGraph` holds it.
"""

from prospr_jax._src.jaxpr.layer_graph import Edge, LayerGraph, LayerTrace, trace_layer_graph, unit_map

__all__ = ["Edge", "LayerGraph", "LayerTrace", "trace_layer_graph", "unit_map"]
