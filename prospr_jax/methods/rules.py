"""Mask rules: how scores become masks (density rule, scope, layer floor).

:class:`MaskRule` bundles the three choices every score-based method leaves to the caller:

* ``density_rule``: ``None`` (the ``scope`` decides), ``'erk'`` (ERK layer densities,
  :mod:`prospr_jax.methods.erk`; the scores rank within each layer) or ``'lamp'`` (LAMP-normalised
  scores, :mod:`prospr_jax.methods.lamp`; one global threshold);
* ``scope``: ``'global'`` (one threshold over all layers) or ``'layerwise'`` (the same density in
  every layer), or a per-layer density mapping ``{path_name: density}``;
* ``min_per_layer``: the layer-collapse guard of :func:`prospr_jax.masks_from_scores`.

Multi-round methods apply the rule at every round.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp

from prospr_jax._src.masks import SCOPES, is_pruned_leaf, masks_from_scores
from prospr_jax._src.tree import PyTree
from prospr_jax._src.validate import check_choice, check_int
from prospr_jax.methods.erk import erk_densities
from prospr_jax.methods.lamp import lamp_scores

DENSITY_RULES = (None, "erk", "lamp")


@dataclasses.dataclass(frozen=True)
class MaskRule:
    """How scores become masks (see the module docstring).

    Attributes:
      density_rule: ``None``, ``'erk'`` or ``'lamp'``.
      scope: ``'global'``, ``'layerwise'`` or a ``{path_name: density}`` mapping (then the sparsity
        passed to :meth:`masks` must be ``None``); must stay ``'global'`` with a density rule.
      min_per_layer: every pruned layer keeps at least this many entries (integer >= 0).
      erk_options: keyword arguments of :func:`prospr_jax.methods.erk_densities`
        (``erdos_renyi_kernel``, ``power_scale``); only with ``density_rule='erk'``.
    """

    density_rule: Optional[str] = None
    scope: Any = "global"
    min_per_layer: int = 0
    erk_options: Optional[Mapping[str, Any]] = None

    def __post_init__(self) -> None:
        check_choice(self.density_rule, "density_rule", DENSITY_RULES)
        if not isinstance(self.scope, Mapping):
            check_choice(self.scope, "scope", SCOPES)
        object.__setattr__(self, "min_per_layer", check_int(self.min_per_layer, "min_per_layer", low=0))
        if self.erk_options and self.density_rule != "erk":
            raise ValueError("`erk_options` only apply with density_rule='erk'")
        if self.density_rule is not None and (isinstance(self.scope, Mapping) or self.scope != "global"):
            raise ValueError(
                f"density_rule={self.density_rule!r} sets the layer densities itself; leave `scope` at 'global' "
                f"(got {self.scope!r})"
            )

    def masks(self, scores: PyTree, sparsity: Optional[float], *, negative_means_pruned: bool = False) -> PyTree:
        """Masks from ``scores`` (higher = keep) at ``sparsity`` over the pruned leaves.

        ``negative_means_pruned``: the round-based pruners mark already pruned entries with a negative
        score so they rank below every live one; with ``'lamp'`` such entries are left out of the LAMP
        normalisation and keep their negative score (otherwise LAMP rejects negative scores).
        """
        floor = self.min_per_layer
        if self.density_rule is None:
            if isinstance(self.scope, Mapping):
                return masks_from_scores(scores, None, scope=self.scope, min_per_layer=floor)
            return masks_from_scores(scores, sparsity, scope=self.scope, min_per_layer=floor)
        if self.density_rule == "lamp":
            if negative_means_pruned:
                clipped = jax.tree_util.tree_map(lambda s: jnp.maximum(s, 0) if is_pruned_leaf(s) else s, scores)
                lamp = jax.tree_util.tree_map(
                    lambda s, l: jnp.where(s < 0, s, l) if is_pruned_leaf(s) else l, scores, lamp_scores(clipped)
                )
            else:
                lamp = lamp_scores(scores)
            return masks_from_scores(lamp, sparsity, scope="global", min_per_layer=floor)
        pruned = jax.tree_util.tree_map(is_pruned_leaf, scores)
        densities = erk_densities(scores, pruned, sparsity, **dict(self.erk_options or {}))
        return masks_from_scores(scores, None, scope=densities, min_per_layer=floor)

    def require_ranked_scope(self, method: str) -> None:
        """Methods that prune in rounds with their own schedule (DRIVE, IMP) rank with one threshold or
        per layer at each round's density: a per-layer density mapping or a density rule cannot follow
        their schedule."""
        if not isinstance(self.scope, str) or self.density_rule is not None:
            raise ValueError(
                f"method {method!r} supports scope 'global' or 'layerwise' without a density rule, "
                f"got scope={self.scope!r}, density_rule={self.density_rule!r}"
            )

    def settings(self) -> dict[str, Any]:
        """The rule's non-default settings by name (the ones a method must support)."""
        out = {}
        if self.density_rule is not None:
            out["density_rule"] = self.density_rule
        if isinstance(self.scope, Mapping) or self.scope != "global":
            out["scope"] = self.scope
        if self.min_per_layer:
            out["min_per_layer"] = self.min_per_layer
        return out


__all__ = ["DENSITY_RULES", "MaskRule"]
