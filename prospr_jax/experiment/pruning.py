"""The runner's only door into :mod:`prospr_jax.methods`: method names, option checks, pruning.

Every call the experiment harness makes into the method registry goes through this module, so that
every check a method declares (its options, the mask-rule settings it supports) runs when the run's
configuration is read, before any data is loaded.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping, Optional

from prospr_jax import methods as registry
from prospr_jax._src.ablations import inverted_scores
from prospr_jax.methods import MaskRule, PruneResult


def method_names() -> tuple[str, ...]:
    """The registered pruning method names, in registration order."""
    return registry.names()


def produces_masks(name: str) -> bool:
    """Whether method ``name`` computes masks itself (multi-round or layer-by-layer methods).

    Raises:
      ValueError: ``name`` is not a registered method (the message lists them).
    """
    return registry.get(name).kind == "masks"


def check_method_options(name: str, options: Mapping[str, Any]) -> None:
    """Check the options of method ``name`` (names and values, from its declared ``Options``) without
    running it.

    Raises:
      ValueError, TypeError: unknown method, unknown option (the message lists the method's options
        with their defaults) or a bad value.
    """
    registry.check_call(name, None, dict(options), MaskRule())


def check_rules(name: str, *, density_rule: Optional[str], scope: str, min_per_layer: int) -> None:
    """Check that method ``name`` supports the mask rule the run sets.

    Raises:
      ValueError: a bad rule, or a rule setting the method does not support.
    """
    registry.check_call(name, None, {}, MaskRule(density_rule, scope, min_per_layer))


def is_dynamic(name: str) -> bool:
    """Whether method ``name`` trains with a changing mask (dynamic sparse training: SET, RigL)."""
    return isinstance(registry.get(name), registry.DynamicSparseMethod)


def trains_while_pruning(name: str) -> bool:
    """Whether method ``name`` trains the network itself while it prunes (IMP, DRIVE: ``train_fn``)."""
    return "train_fn" in registry.get(name).needs


def mask_updater(name: str, problem: Any, options: Mapping[str, Any], total_steps: int) -> Any:
    """The :class:`prospr_jax.methods.MaskUpdater` of dynamic method ``name`` for a run of ``total_steps``."""
    method = registry.get(name)
    return method.updater(problem, method.parse_options(dict(options)), total_steps)


def prune(
    name: str,
    problem: Any,
    sparsity: float,
    *,
    density_rule: Optional[str],
    scope: str,
    min_per_layer: int,
    options: Mapping[str, Any],
) -> PruneResult:
    """``prospr_jax.methods.prune``: the :class:`prospr_jax.methods.PruneResult` of method ``name``."""
    return registry.prune(
        name, problem, sparsity, density_rule=density_rule, scope=scope, min_per_layer=min_per_layer, **options
    )


class ScoreCache:
    """Prunes single-shot score methods once per method and option set, and derives every other
    sparsity's masks from the same scores (:func:`prospr_jax.methods.masks_for`).

    The cache holds the last result only (the runner runs one method's sparsities one after the
    other), so it costs one scores pytree of memory. Methods that prune in rounds or while training
    (their result holds no scores) are pruned afresh for every sparsity; their result is reused only
    at the same sparsity (the ablation cells that follow a cell). Use one cache per problem: the
    scores are those of its theta_0 and data.
    """

    def __init__(self) -> None:
        self._key: Optional[str] = None
        self._result: Optional[PruneResult] = None

    def prune(self, name: str, problem: Any, sparsity: float, *, density_rule: Optional[str], scope: str,
              min_per_layer: int, options: Mapping[str, Any], invert: bool = False,
              problem_key: str = "init") -> tuple[PruneResult, bool]:
        """``(result, reused)``: the result of method ``name`` at ``sparsity``; ``reused``: the scores came
        from an earlier call (``result.seconds`` is then the first call's scoring time plus this
        thresholding).

        ``invert``: keep the LOWEST-scored weights at ``sparsity`` (the ``invert`` sanity check);
        only for single-shot score methods (a ``ValueError`` otherwise). ``problem_key`` names the
        problem scored (the cell's ``prune_at``: theta_0, theta_K or the trained weights), so scores
        of one problem never stand in for another's.
        """
        rule = {"density_rule": density_rule, "scope": scope, "min_per_layer": min_per_layer}
        # A method that prunes in rounds is reused only at the same sparsity (its ablation cells).
        at = round(float(sparsity), 9) if produces_masks(name) else None
        key = json.dumps([name, dict(options), at, problem_key], sort_keys=True, default=str)
        reused = key == self._key and self._result is not None
        if reused:
            scored = self._result
        else:
            scored = prune(name, problem, sparsity, options=options, **rule)
            self._key, self._result = key, scored
        if invert and scored.scores is None:
            raise ValueError(f"`invert` needs a single-shot score method; {name!r} prunes in rounds or while training")
        if scored.scores is None:
            return scored, reused
        if invert:
            flipped = dataclasses.replace(scored, scores=inverted_scores(scored.scores))
            return dataclasses.replace(registry.masks_for(flipped, problem, sparsity, **rule), scores=scored.scores), reused
        if reused:
            return registry.masks_for(scored, problem, sparsity, **rule), reused
        return scored, False


__all__ = ["ScoreCache", "check_method_options", "check_rules", "is_dynamic", "mask_updater", "method_names",
           "produces_masks", "prune", "trains_while_pruning"]
