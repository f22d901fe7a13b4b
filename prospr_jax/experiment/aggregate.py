"""Seeds of a cell pooled into one entry: mean ± std of the final test accuracy, and the flags.

Records of the same ``label`` (method, options, ablation) and ``sparsity`` are one *group*: the seeds
of one cell (``--seeds``, or runs merged by ``experiments/report.py``). A group's accuracy is the
mean over its seeds that did not diverge, with the sample standard deviation (``ddof=1``, the
convention of the pruning-at-initialisation papers' error bars; undefined for one seed).

Effective sparsity (:mod:`prospr_jax._src.effective`): a group is *flagged* when its mean
``effective_sparsity`` exceeds its nominal sparsity by more than :data:`EFFECTIVE_FLAG_POINTS`
percentage points (weights cut off from the input or the output prune more than was asked).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import numpy as np

Record = dict[str, Any]

EFFECTIVE_FLAG_POINTS = 1.0
FLAG = "‡"


@dataclasses.dataclass(frozen=True)
class Group:
    """The records of one label at one sparsity.

    Attributes:
      label, sparsity: the group's key.
      records: its records, in the order given.
      top1: the final test top-1 of the seeds that did not diverge.
      seeds: the seeds of ``records`` (``None`` where a record has none).
      diverged: how many records diverged.
    """

    label: str
    sparsity: float
    records: tuple
    top1: tuple
    seeds: tuple
    diverged: int

    @property
    def n(self) -> int:
        """The number of seeds with a finite accuracy."""
        return len(self.top1)

    @property
    def mean(self) -> Optional[float]:
        return float(np.mean(self.top1)) if self.top1 else None

    @property
    def std(self) -> Optional[float]:
        """The sample standard deviation (``ddof=1``); ``None`` for fewer than two seeds."""
        return float(np.std(self.top1, ddof=1)) if len(self.top1) > 1 else None

    @property
    def effective_sparsity(self) -> Optional[float]:
        """The mean ``effective_sparsity`` of the records that have one (``None`` if none has)."""
        values = [r["effective_sparsity"] for r in self.records if r.get("effective_sparsity") is not None]
        return float(np.mean(values)) if values else None

    @property
    def flagged(self) -> bool:
        """Effective sparsity more than :data:`EFFECTIVE_FLAG_POINTS` points above the nominal one."""
        eff = self.effective_sparsity
        return eff is not None and 100.0 * (eff - self.sparsity) > EFFECTIVE_FLAG_POINTS


def groups(records: Sequence[Record]) -> dict[tuple[str, float], Group]:
    """``(label, sparsity) -> Group`` of ``records``, in first-seen order."""
    found: dict[tuple[str, float], list] = {}
    for r in records:
        found.setdefault((r["label"], r["sparsity"]), []).append(r)
    out = {}
    for (label, sparsity), rs in found.items():
        finite = [r for r in rs if not r.get("diverged") and r.get("test_top1") is not None]
        out[(label, sparsity)] = Group(
            label, sparsity, tuple(rs), tuple(float(r["test_top1"]) for r in finite),
            tuple(r.get("seed") for r in rs), sum(1 for r in rs if r.get("diverged")),
        )
    return out


def max_seeds(records: Sequence[Record]) -> int:
    """The largest number of records in one group (1 for a single-seed run, 0 for none)."""
    return max((len(g.records) for g in groups(records).values()), default=0)


def format_group(group: Group, seeds: int) -> str:
    """The table entry of ``group`` in a table whose groups have up to ``seeds`` seeds: accuracy in %
    (``mean ± std`` when ``seeds > 1``), ``(n=k)`` when the group has fewer finite seeds, the number
    of diverged seeds, and :data:`FLAG` when effective sparsity is flagged."""
    if group.n == 0:
        text = "diverged" if group.diverged else "-"
    else:
        text = f"{100.0 * group.mean:.2f}"
        if seeds > 1:
            text += " ± " + ("-" if group.std is None else f"{100.0 * group.std:.2f}")
        notes = []
        if seeds > 1 and group.n != seeds:
            notes.append(f"n={group.n}")
        if group.diverged:
            notes.append(f"{group.diverged} diverged")
        if notes:
            text += f" ({', '.join(notes)})"
    return text + (f" {FLAG}" if group.flagged else "")


__all__ = ["EFFECTIVE_FLAG_POINTS", "FLAG", "Group", "format_group", "groups", "max_seeds"]
