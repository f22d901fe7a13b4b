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


def _mean_of(group: Group, field: str) -> Optional[float]:
    values = [r[field] for r in group.records if r.get(field) is not None]
    return float(np.mean(values)) if values else None


def _fmt(value: Optional[float], spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _fmt_flops(value: Optional[float]) -> str:
    if value is None:
        return "-"
    for scale, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= scale:
            return f"{value / scale:.3g}{unit}"
    return f"{value:.0f}"


def cost_table(records: Sequence[Record], order: Sequence[str]) -> str:
    """Markdown table, one row per label and sparsity (means over the seeds): nominal and effective
    sparsity (%), FLOPs per example of the kept and of the effective weights, dense FLOPs, the
    theoretical speed-up and the compression ratio; ``''`` when no record has these metrics.

    Args:
      records: the records.
      order: the labels in the order of the rows.
    """
    if not any(r.get("flops") is not None or r.get("effective_sparsity") is not None for r in records):
        return ""
    lines = ["| method | sparsity | effective sparsity | FLOPs | effective FLOPs | dense FLOPs | speed-up | compression |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    rank = {label: i for i, label in enumerate(order)}
    for g in sorted(groups(records).values(), key=lambda g: (rank.get(g.label, len(rank)), g.sparsity)):
        eff = g.effective_sparsity
        lines.append(
            f"| {g.label} | {100.0 * g.sparsity:g}% | {_fmt(None if eff is None else 100.0 * eff, '.2f')}"
            f"{' ' + FLAG if g.flagged else ''} | {_fmt_flops(_mean_of(g, 'flops'))} | "
            f"{_fmt_flops(_mean_of(g, 'effective_flops'))} | {_fmt_flops(_mean_of(g, 'dense_flops'))} | "
            f"{_fmt(_mean_of(g, 'theoretical_speedup'), '.3g')}x | {_fmt(_mean_of(g, 'compression_ratio'), '.3g')}x |"
        )
    notes = sorted({r["metrics_note"] for r in records if r.get("metrics_note")})
    return "\n".join(lines + [""] + [f"* {n}" for n in notes] if notes else lines)


__all__ = ["EFFECTIVE_FLAG_POINTS", "FLAG", "Group", "cost_table", "format_group", "groups", "max_seeds"]
