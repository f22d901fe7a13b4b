"""Structured (channel) pruning that really removes channels.

* :mod:`~prospr_jax.structured.groups`: the channels that must be pruned together (residual sums,
  the BatchNorm and bias after a kernel), found by tracing the model;
* :mod:`~prospr_jax.structured.scores`: one score per channel group (ProsPr, SNIP, filter L1 norm,
  random), global ranking, and the masks that make a dropped channel exactly zero;
* :mod:`~prospr_jax.structured.compaction`: the physically smaller model whose outputs equal the
  masked model's; :mod:`~prospr_jax.structured.measure`: its parameters, FLOPs and latency.

Everything here is core: it needs jax and numpy only (no flax).
"""

from prospr_jax.structured.compaction import CompactModel, CompactionError, compact, param_count
from prospr_jax.structured.groups import ChannelGroups, channel_groups, groups_from_trace, model_channel_groups
from prospr_jax.structured.measure import compaction_effect
from prospr_jax.structured.scores import (
    CHANNEL_METHODS,
    GRANULARITIES,
    channel_magnitude_scores,
    channel_meta_gradient,
    channel_prospr_scores,
    channel_random_scores,
    channel_scores,
    channel_snip_scores,
    group_mask,
    problem_groups,
    prune_channels,
)

__all__ = [
    "CHANNEL_METHODS",
    "CompactModel",
    "CompactionError",
    "compact",
    "compaction_effect",
    "param_count",
    "ChannelGroups",
    "GRANULARITIES",
    "channel_groups",
    "channel_magnitude_scores",
    "channel_meta_gradient",
    "channel_prospr_scores",
    "channel_random_scores",
    "channel_scores",
    "channel_snip_scores",
    "group_mask",
    "groups_from_trace",
    "model_channel_groups",
    "problem_groups",
    "prune_channels",
]
