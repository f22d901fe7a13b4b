"""Cost metrics of a masked network, as ShrinkBench reports them (Blalock et al., MLSys 2020).

* FLOPs: multiply-accumulates of the Conv/Dense kernels for ONE example, counting only kept weights:
  a kept weight of a kernel applied at ``P`` output positions costs ``P`` (``P = H' * W'`` of a conv's
  output, 1 for a Dense layer on ``[N, features]``). Biases, normalisation, activations and pooling
  are not counted (ShrinkBench's convention). The dense count is the same sum with every weight kept,
  so their ratio is the theoretical speed-up a kernel that skips zero weights could reach.
* Compression ratio: all parameters / kept parameters (unpruned leaves count in both).

The positions come from the layer trace (:attr:`LayerTrace.out_shapes`), so any model the tracer can
follow is counted without model-specific code.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import numpy as np

from prospr_jax._src.jaxpr.layer_graph import LayerTrace
from prospr_jax._src.tree import PyTree, named_leaves
from prospr_jax._src.validate import check_same_structure


@dataclasses.dataclass(frozen=True)
class Cost:
    """Cost of a masked network for one example.

    Attributes:
      flops: multiply-accumulates of the kept kernel weights.
      dense_flops: multiply-accumulates with every weight kept.
      layer_flops: ``{kernel: (flops, dense_flops)}``.
      kept_params, total_params: kept and all parameters (every leaf).
    """

    flops: int
    dense_flops: int
    layer_flops: dict
    kept_params: int
    total_params: int

    @property
    def compression_ratio(self) -> Optional[float]:
        """``total_params / kept_params`` (``None`` when nothing is kept)."""
        return self.total_params / self.kept_params if self.kept_params else None

    @property
    def theoretical_speedup(self) -> Optional[float]:
        """``dense_flops / flops`` (``None`` when no kept weight is left)."""
        return self.dense_flops / self.flops if self.flops else None


def masked_cost(masks: PyTree, params: PyTree, trace: LayerTrace) -> Cost:
    """The :class:`Cost` of ``params`` under ``masks`` (0-d mask leaves: all kept).

    Args:
      masks: mask pytree of ``params``' structure.
      params: the parameters (shapes only).
      trace: the model's layer trace (:func:`prospr_jax._src.effective.model_trace`), traced with a
        batch of one: its ``out_shapes`` give each kernel's output positions.

    Raises:
      ValueError: a kernel of the trace is not a leaf of ``params``.
    """
    check_same_structure(masks, params, arg="masks")
    shapes = {n: np.shape(p) for n, p in named_leaves(params)}
    kept_of = {n: int(np.count_nonzero(np.broadcast_to(np.asarray(m) != 0, shapes[n]))) for n, m in named_leaves(masks)}
    missing = [n for n in trace.layers if n not in shapes]
    if missing:
        raise ValueError(f"`trace` names kernels that are not leaves of `params`: {missing}")
    layer_flops = {}
    for name in trace.layers:
        positions = math.prod(trace.out_shapes[name][1:-1])
        layer_flops[name] = (kept_of[name] * positions, math.prod(shapes[name]) * positions)
    return Cost(
        flops=sum(f for f, _ in layer_flops.values()),
        dense_flops=sum(d for _, d in layer_flops.values()),
        layer_flops=layer_flops,
        kept_params=sum(kept_of.values()),
        total_params=sum(math.prod(s) for s in shapes.values()),
    )


__all__ = ["Cost", "masked_cost"]
