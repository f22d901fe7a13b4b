"""The runner's sanity-check ablations (``--ablations shuffle reinit invert``).

Every pruned cell of a run gets one extra cell per ablation, with the same method, options, sparsity
and seed (Frankle et al., ICLR 2021):

* ``shuffle``: the method's mask permuted within each layer (:func:`prospr_jax._src.ablations.shuffle_masks`):
  the same per-layer density, random positions;
* ``reinit``: the method's mask, trained from a fresh draw of the initial weights (a new theta_0 of
  the same initialiser) instead of the weights the method pruned; methods that rewind (IMP) keep
  their rewind step;
* ``invert``: the weights the method ranks LOWEST kept, at the same sparsity and mask rule
  (single-shot score methods only: methods that prune in rounds or while training have no single
  ranking to invert, so they get no ``invert`` cell).

The random draws follow the cell's seed: stream :data:`SHUFFLE_STREAM` (shuffle) and
:data:`REINIT_STREAM` (reinit) of ``jax.random.PRNGKey(seed)``.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Sequence

import jax

from prospr_jax._src.ablations import shuffle_masks
from prospr_jax._src.tree import PyTree
from prospr_jax.experiment.pruning import is_dynamic, produces_masks
from prospr_jax.methods import PruneResult

ABLATIONS = ("shuffle", "reinit", "invert")
# Streams of jax.random.PRNGKey(seed) (1: the problem's key, 2: training dropout/augmentation).
REINIT_STREAM, SHUFFLE_STREAM = 3, 4


def check_ablations(ablations: Sequence[str], methods: Sequence[str], *, density_rule: Optional[str],
                    prune_at: str = "init", after: str = "rewind") -> None:
    """Check ``--ablations`` against the run's pruning methods and density rule.

    Raises:
      ValueError: an unknown or repeated ablation; ``invert`` with ``--density-rule lamp`` (LAMP's
        normalisation needs non-negative scores, so it cannot rank the inverted ones); ``invert``
        when no method of the run is a single-shot score method; ``reinit`` unless the mask is
        chosen at initialisation and training rewinds (``--prune-at init --after rewind``: the other
        paradigms choose the weights training starts from themselves).
    """
    for a in ablations:
        if a not in ABLATIONS:
            raise ValueError(f"`--ablations`: unknown ablation {a!r}; choose from {', '.join(ABLATIONS)}")
    if len(set(ablations)) != len(ablations):
        raise ValueError(f"`--ablations` lists an ablation twice: {list(ablations)}")
    if "reinit" in ablations and (prune_at, after) != ("init", "rewind"):
        raise ValueError(f"`--ablations reinit` needs `--prune-at init --after rewind` (got --prune-at {prune_at} "
                         f"--after {after}: that paradigm sets the weights training starts from)")
    if "invert" in ablations:
        if density_rule == "lamp":
            raise ValueError("`--ablations invert` cannot be combined with `--density-rule lamp` "
                             "(LAMP normalises non-negative scores)")
        if methods and not any(applies("invert", m) for m in methods):
            raise ValueError(f"`--ablations invert` applies to single-shot score methods; {list(methods)} "
                             "prune in rounds or while training")


def applies(ablation: str, method: str) -> bool:
    """Whether ``ablation`` makes a cell for ``method`` (``invert``: single-shot score methods only; none
    for dynamic sparse training, whose mask moves during training)."""
    if is_dynamic(method):
        return False
    return ablation != "invert" or not produces_masks(method)


def ablate(ablation: Optional[str], result: PruneResult, *, seed: int,
           init_params: Callable[[jax.Array], PyTree]) -> PruneResult:
    """``result`` with ``shuffle`` or ``reinit`` applied (``None`` and ``invert``: unchanged; ``invert``
    is applied when the masks are made from the scores).

    Args:
      ablation: ``None`` or one of :data:`ABLATIONS`.
      result: the method's result.
      seed: the cell's seed.
      init_params: ``key -> params``: the model's initialiser (``reinit`` draws from it).
    """
    if ablation == "shuffle":
        key = jax.random.fold_in(jax.random.PRNGKey(seed), SHUFFLE_STREAM)
        return dataclasses.replace(result, masks=shuffle_masks(key, result.masks))
    if ablation == "reinit":
        key = jax.random.fold_in(jax.random.PRNGKey(seed), REINIT_STREAM)
        return dataclasses.replace(result, start_params=init_params(key))
    return result


__all__ = ["ABLATIONS", "REINIT_STREAM", "SHUFFLE_STREAM", "ablate", "applies", "check_ablations"]
