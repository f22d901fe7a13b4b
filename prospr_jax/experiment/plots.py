"""Tables and plots of prune-then-train results (the records of the runner's ``results.jsonl``).

A record is one finished method x sparsity cell with at least ``label``, ``method``, ``sparsity``,
``test_top1`` (fraction, ``None`` if the cell diverged), ``test_top5`` (fraction or ``None``),
``kept_prunable``, ``total_prunable``, ``kept_all``, ``total_all``, ``empty_layers`` (list),
``prune_seconds``, ``train_seconds``, ``epochs`` and optionally ``diverged`` (``None``, or
``{'epoch', 'epoch_step', 'step', 'loss'}`` where the training loss became non-finite). A diverged cell
reads ``diverged`` in the tables and is a cross at the bottom of the plot, never an accuracy.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

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


def _top1(record: Record) -> str:
    return DIVERGED if record.get("diverged") else _percent(record["test_top1"])


def accuracy_table(records: Sequence[Record]) -> str:
    """Markdown pivot: one row per method, one column per sparsity, final test top-1 (%)."""
    if not records:
        return "(no results)"
    sparsities = sorted({r["sparsity"] for r in records})
    cells = {(r["label"], r["sparsity"]): r for r in records}
    header = "| method | " + " | ".join(_fmt_sparsity(s) for s in sparsities) + " |"
    lines = [header, "|---|" + "---:|" * len(sparsities)]
    for label in _labels_in_order(records):
        row = [_top1(cells[(label, s)]) if (label, s) in cells else "" for s in sparsities]
        lines.append(f"| {label} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def details_table(records: Sequence[Record]) -> str:
    """Markdown table, one row per cell: accuracies, kept weights, empty layers and timings."""
    if not records:
        return "(no results)"
    lines = [
        "| method | sparsity | top-1 % | top-5 % | kept prunable | kept all params | empty layers | prune s | train s | epochs |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    order = {label: i for i, label in enumerate(_labels_in_order(records))}
    for r in sorted(records, key=lambda r: (order[r["label"]], r["sparsity"])):
        lines.append(
            f"| {r['label']} | {_fmt_sparsity(r['sparsity'])} | {_top1(r)} | "
            f"{_percent(r.get('test_top5'))} | {r['kept_prunable']:,} / {r['total_prunable']:,} | "
            f"{r['kept_all']:,} / {r['total_all']:,} | {len(r['empty_layers'])} | "
            f"{r['prune_seconds']:.1f} | {r['train_seconds']:.1f} | {r['epochs']} |"
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
    """The whole report: title, accuracy pivot, details table and the diverged cells."""
    from prospr_jax.experiment.structured_report import structured_section  # pylint: disable=import-outside-toplevel

    notes = divergence_notes(records)
    return (
        f"# {title}\n\n## Final test top-1 accuracy (%)\n\n{accuracy_table(records)}\n\n"
        f"## Details\n\n{details_table(records)}\n" + (f"\n{notes}\n" if notes else "")
        + structured_section(records)
    )


def plot_accuracy(records: Sequence[Record], path: str | os.PathLike, title: str = "") -> str:
    """Save a PNG of final test top-1 (%) vs sparsity, one line per method; dense as a dashed line.

    Diverged cells are red crosses at the bottom of the axes (labelled ``diverged``), not points of
    their method's line. Returns the path written. Uses matplotlib's Agg backend (no display needed).

    Args:
      records: the records to plot.
      path: the PNG file to write.
      title: the plot's title.

    Returns:
      ``path`` as a string.
    """
    # matplotlib is imported here, on first use: it costs about a second, which the runner's
    # command line (``--help``, refused runs) should not pay.
    import matplotlib  # pylint: disable=import-outside-toplevel

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    sparsities = sorted({r["sparsity"] for r in records if r["label"] != DENSE})
    diverged: list[Record] = []
    finite_ys: list[float] = []
    for label in _labels_in_order(records):
        rows = sorted((r for r in records if r["label"] == label), key=lambda r: r["sparsity"])
        if label == DENSE:
            for r in rows:
                if r.get("diverged"):
                    ax.plot([], [], color="black", linestyle="--", linewidth=1, label=f"dense ({DIVERGED})")
                else:
                    ax.axhline(100.0 * r["test_top1"], color="black", linestyle="--", linewidth=1, label="dense")
                    finite_ys.append(100.0 * r["test_top1"])
            continue
        finite = [r for r in rows if not r.get("diverged")]
        diverged += [r for r in rows if r.get("diverged")]
        if finite:
            ys = [100.0 * r["test_top1"] for r in finite]
            ax.plot([100.0 * r["sparsity"] for r in finite], ys, marker="o", label=label)
            finite_ys += ys
    if not finite_ys:
        ax.set_ylim(0.0, 100.0)
    if diverged:
        xs = [100.0 * r["sparsity"] for r in diverged]
        ax.scatter(xs, [0.03] * len(xs), marker="x", color="red", s=60, zorder=3,
                   transform=ax.get_xaxis_transform(), label=DIVERGED)
        for x, r in zip(xs, diverged):
            ax.annotate(r["label"], (x, 0.03), xycoords=ax.get_xaxis_transform(), xytext=(5, 3),
                        textcoords="offset points", fontsize=7, color="red")
    if sparsities:
        ax.set_xticks([100.0 * s for s in sparsities])
        ax.set_xticklabels([_fmt_sparsity(s) for s in sparsities])
    ax.set_xlabel("sparsity of the prunable weights")
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


__all__ = ["DIVERGED", "accuracy_table", "details_table", "divergence_notes", "plot_accuracy", "results_markdown"]
