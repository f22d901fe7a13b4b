"""RigL, Rigging the Lottery (Evci et al., ICML 2020).

Train a sparse network from a random mask at ERK densities and, every ``update_every`` steps (100),
drop the fraction ``f_t`` of each layer's kept weights with the smallest magnitude and regrow as many
where the dense gradient ``|dL/dw|`` (on the step's batch, at every position) is largest; regrown
weights start at 0 with clean optimiser state. ``f_t`` decays as a cosine from ``drop_fraction`` (0.3)
to 0 at ``end_fraction`` (75%) of training, after which the mask is fixed. The drop-and-grow machinery
is shared with SET in :mod:`prospr_jax.methods.dst`.
"""

from __future__ import annotations

from prospr_jax.methods.base import register
from prospr_jax.methods.dst import DstOptions, DynamicSparseMethod


@register
class Rigl(DynamicSparseMethod):
    name = "rigl"
    paper = "Evci et al., ICML 2020"
    idea = "ERK random mask; every DeltaT steps drop the smallest |w| per layer, regrow the largest |dL/dw|, cosine drop fraction"
    cost = "sparse training + one dense gradient per update"
    Options = DstOptions
    regrow = "gradient"


__all__ = ["Rigl"]
