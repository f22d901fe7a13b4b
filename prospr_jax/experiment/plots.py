"""Tables and plots of prune-then-train results (the records of the runner's ``results.jsonl``).

A record is one finished method x sparsity cell with at least ``label``, ``method``, ``sparsity``,
``test_top1`` (fraction, ``None`` if the cell diverged), ``test_top5`` (fraction or ``None``),
``kept_prunable``, ``total_prunable``, ``kept_all``, ``total_all``, ``empty_layers`` (list),
``prune_seconds``, ``train_seconds``, ``epochs`` and optionally ``diverged`` (``None``, or
``{'epoch', 'epoch_step', 'step', 'loss'}`` where the training loss became non-finite). A diverged cell
reads ``diverged`` in the tables and is a cross at the bottom of the plot, never an accuracy.
"""

from __future__ import annotations

import math
import os
from typing import Any, Sequence

from prospr_jax.experiment.aggregate import EFFECTIVE_FLAG_POINTS, FLAG, cost_table, format_group, groups, max_seeds

Record = dict[str, Any]

DIVERGED = "diverged"

DENSE = "dense"


def _labels_in_order(records: Sequence[Record]) -> list[str]:
    labels: list[str] = []
    for r in records:
        if r["label"] not in labels:
            labels.append(r["label"])
    return sorted(labels, key=lambda label: (label != DENSE, labels.index(label)))


def _percent(value: Any) -> str:
    return "-" if value is None else f"{100.0 * value:.2f}"


def _fmt_sparsity(s: float) -> str:
    return f"{100.0 * s:g}%"


def _seed_key(record: Record) -> tuple:
    seed = record.get("seed")
    return (seed is None, seed if isinstance(seed, int) else 0)


def _top1(record: Record) -> str:
    return DIVERGED if record.get("diverged") else _percent(record["test_top1"])


def accuracy_table(records: Sequence[Record]) -> str:
    """Markdown pivot: one row per label (method, options, ablation), one column per sparsity, final
    test top-1 (%): the value of the one seed, or ``mean ± std`` over the seeds of the cell
    (:mod:`prospr_jax.experiment.aggregate`); flagged effective sparsity is marked."""
    if not records:
        return "(no results)"
    sparsities = sorted({r["sparsity"] for r in records})
    cells = groups(records)
    seeds = max_seeds(records)
    header = "| method | " + " | ".join(_fmt_sparsity(s) for s in sparsities) + " |"
    lines = [header, "|---|" + "---:|" * len(sparsities)]
    for label in _labels_in_order(records):
        row = [format_group(cells[(label, s)], seeds) if (label, s) in cells else "" for s in sparsities]
        lines.append(f"| {label} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def accuracy_notes(records: Sequence[Record]) -> str:
    """What the pivot's entries are (seeds, std convention) and what its flag means; ``''`` if nothing
    needs saying (one seed, nothing flagged)."""
    lines = []
    seeds = max_seeds(records)
    if seeds > 1:
        lines.append(f"Mean ± sample standard deviation (ddof=1) over {seeds} seeds; (n=k): k seeds only.")
    if any(g.flagged for g in groups(records).values()):
        lines.append(f"{FLAG}: effective sparsity (weights cut off from the input or the output count as pruned) "
                     f"exceeds the nominal sparsity by more than {EFFECTIVE_FLAG_POINTS:g} point(s).")
    return "\n".join(lines)


def details_table(records: Sequence[Record]) -> str:
    """Markdown table, one row per cell: accuracies, kept weights, empty layers and timings."""
    if not records:
        return "(no results)"
    lines = [
        "| method | sparsity | top-1 % | top-5 % | kept prunable | kept all params | empty layers | prune s | train s | epochs | seed |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    order = {label: i for i, label in enumerate(_labels_in_order(records))}
    for r in sorted(records, key=lambda r: (order[r["label"]], r["sparsity"], _seed_key(r))):
        lines.append(
            f"| {r['label']} | {_fmt_sparsity(r['sparsity'])} | {_top1(r)} | "
            f"{_percent(r.get('test_top5'))} | {r['kept_prunable']:,} / {r['total_prunable']:,} | "
            f"{r['kept_all']:,} / {r['total_all']:,} | {len(r['empty_layers'])} | "
            f"{r['prune_seconds']:.1f} | {r['train_seconds']:.1f} | {r['epochs']} | {r.get('seed', '-')} |"
        )
    return "\n".join(lines)


def divergence_notes(records: Sequence[Record]) -> str:
    """One Markdown bullet per diverged cell (where its training loss became non-finite); ``''`` if none."""
    lines = []
    for r in records:
        d = r.get("diverged")
        if d:
            lines.append(
                f"* {r['label']} {_fmt_sparsity(r['sparsity'])}: {DIVERGED}: the training loss became non-finite "
                f"({d.get('loss')}) at epoch {d['epoch']}, step {d['epoch_step']} (global step {d['step']}); "
                "training stopped there, no test accuracy"
            )
    return "\n".join(lines)


def results_markdown(records: Sequence[Record], title: str) -> str:
    """The whole report: title, accuracy pivot (with its notes), details table, the diverged cells, the
    effective sparsity and cost table and, for channel cells, the structured section."""
    from prospr_jax.experiment.structured_report import structured_section  # pylint: disable=import-outside-toplevel

    notes = divergence_notes(records)
    about = accuracy_notes(records)
    cost = cost_table(records, _labels_in_order(records))
    return (
        f"# {title}\n\n## Final test top-1 accuracy (%)\n\n{accuracy_table(records)}\n\n"
        + (f"{about}\n\n" if about else "")
        + f"## Details\n\n{details_table(records)}\n" + (f"\n{notes}\n" if notes else "")
        + (f"\n## Effective sparsity and cost (per example; means over seeds)\n\n{cost}\n" if cost else "")
        + structured_section(records)
    )


def ladder_step(sparsity: float) -> float:
    """``k`` with ``sparsity = 1 - 0.8**k``: the position of ``sparsity`` on the papers' ladder (each
    step prunes 20% of the remaining weights; 0.8**10 leaves 10.7%, 0.8**20 leaves 1.2%)."""
    return math.log(1.0 - sparsity) / math.log(0.8)


def plot_accuracy(records: Sequence[Record], path: str | os.PathLike, title: str = "", *, ladder: bool = False) -> str:
    """Save a PNG of final test top-1 (%) vs sparsity, one line per method; dense as a dashed line.

    With several seeds per cell a point is the mean and its error bar the sample standard deviation
    (the dense line gets a shaded band). Ablation cells (labels such as ``snip (shuffle)``) are dotted.

    Diverged cells are red crosses at the bottom of the axes (labelled ``diverged``), not points of
    their method's line. Returns the path written. Uses matplotlib's Agg backend (no display needed).

    Args:
      records: the records to plot.
      path: the PNG file to write.
      title: the plot's title.
      ladder: put sparsity ``s`` at ``k = log(1 - s) / log(0.8)`` (:func:`ladder_step`), the papers'
        ``1 - 0.8**k`` axis, instead of at ``100 * s``.

    Returns:
      ``path`` as a string.
    """
    # matplotlib is imported here, on first use: it costs about a second, which the runner's
    # command line (``--help``, refused runs) should not pay.
    import matplotlib  # pylint: disable=import-outside-toplevel

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

    def x_of(sparsity: float) -> float:
        return ladder_step(sparsity) if ladder else 100.0 * sparsity

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    sparsities = sorted({r["sparsity"] for r in records if r["label"] != DENSE})
    diverged: list[Record] = []
    finite_ys: list[float] = []
    pooled = groups(records)
    for label in _labels_in_order(records):
        rows = sorted((g for (l, _), g in pooled.items() if l == label), key=lambda g: g.sparsity)
        if label == DENSE:
            for g in rows:
                if g.n == 0:
                    ax.plot([], [], color="black", linestyle="--", linewidth=1, label=f"dense ({DIVERGED})")
                else:
                    ax.axhline(100.0 * g.mean, color="black", linestyle="--", linewidth=1, label="dense")
                    if g.std is not None:
                        ax.axhspan(100.0 * (g.mean - g.std), 100.0 * (g.mean + g.std), color="black", alpha=0.08)
                    finite_ys.append(100.0 * g.mean)
            continue
        finite = [g for g in rows if g.n]
        diverged += [r for g in rows if not g.n for r in g.records[:1]]
        if finite:
            ys = [100.0 * g.mean for g in finite]
            errors = [0.0 if g.std is None else 100.0 * g.std for g in finite]
            xs = [x_of(g.sparsity) for g in finite]
            style = {"linestyle": ":"} if label.endswith(")") else {}  # the ablations: "snip (shuffle)"
            if any(errors):
                ax.errorbar(xs, ys, yerr=errors, marker="o", capsize=3, label=label, **style)
            else:
                ax.plot(xs, ys, marker="o", label=label, **style)
            finite_ys += ys
    if not finite_ys:
        ax.set_ylim(0.0, 100.0)
    if diverged:
        xs = [x_of(r["sparsity"]) for r in diverged]
        ax.scatter(xs, [0.03] * len(xs), marker="x", color="red", s=60, zorder=3,
                   transform=ax.get_xaxis_transform(), label=DIVERGED)
        for x, r in zip(xs, diverged):
            ax.annotate(r["label"], (x, 0.03), xycoords=ax.get_xaxis_transform(), xytext=(5, 3),
                        textcoords="offset points", fontsize=7, color="red")
    if sparsities:
        ax.set_xticks([x_of(s) for s in sparsities])
        ax.set_xticklabels([_fmt_sparsity(s) for s in sparsities], rotation=45 if ladder else 0, fontsize=8 if ladder else None)
    ax.set_xlabel("sparsity of the prunable weights" + (" (axis: k of 1 - 0.8^k)" if ladder else ""))
    ax.set_ylabel("final test top-1 accuracy (%)")
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    if records:
        ax.legend()
    fig.tight_layout()
    path = os.fspath(path)
    fig.savefig(path, format="png")
    plt.close(fig)
    return path


__all__ = ["DIVERGED", "accuracy_notes", "accuracy_table", "details_table", "divergence_notes", "ladder_step", "plot_accuracy", "results_markdown"]
