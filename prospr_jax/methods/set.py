"""SET, Sparse Evolutionary Training (Mocanu et al., Nature Communications 2018).

Train a sparse network from a random Erdős–Rényi mask and, every ``update_every`` steps, drop the
fraction ``zeta`` (``drop_fraction``, 0.3 in the paper) of each layer's kept weights with the smallest
magnitude and regrow as many at random positions of the same layer; regrown weights start at 0 with
clean optimiser state. The drop-and-grow machinery, the schedule and the options are shared with RigL
in :mod:`prospr_jax.methods.dst`; SET's defaults: constant drop fraction, Erdős–Rényi densities.
Departure: the paper updates once per epoch; ``update_every`` counts steps (RigL's SET baseline: 100).
"""

from __future__ import annotations

import dataclasses

from prospr_jax.methods.base import register
from prospr_jax.methods.dst import DstOptions, DynamicSparseMethod


@dataclasses.dataclass(frozen=True)
class SetOptions(DstOptions):
    """:class:`prospr_jax.methods.dst.DstOptions` with SET's defaults (constant fraction, ER densities)."""

    schedule: str = "constant"
    distribution: str = "er"


@register
class Set(DynamicSparseMethod):
    name = "set"
    paper = "Mocanu et al., Nature Communications 2018"
    idea = "random sparse mask; every DeltaT steps drop the smallest |w| per layer, regrow as many at random"
    cost = "sparse training + one drop/grow pass per update"
    Options = SetOptions
    regrow = "random"


__all__ = ["Set", "SetOptions"]
