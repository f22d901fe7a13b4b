"""Tables and plots of prune-then-train results (records of ``experiments.prune_train``).

A record is one finished method x sparsity cell (one line of ``results.jsonl``) with at least
``label``, ``method``, ``sparsity``, ``test_top1`` (fraction), ``test_top5`` (fraction or ``None``),
``kept_prunable``, ``total_prunable``, ``kept_all``, ``total_all``, ``empty_layers`` (list),
``prune_seconds``, ``train_seconds``, ``epochs``.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

Record = dict[str, Any]

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


def accuracy_table(records: Sequence[Record]) -> str:
    """Markdown pivot: one row per method, one column per sparsity, final test top-1 (%)."""
    if not records:
        return "(no results)"
    sparsities = sorted({r["sparsity"] for r in records})
    cells = {(r["label"], r["sparsity"]): r for r in records}
    header = "| method | " + " | ".join(_fmt_sparsity(s) for s in sparsities) + " |"
    lines = [header, "|---|" + "---:|" * len(sparsities)]
    for label in _labels_in_order(records):
        row = [_percent(cells[(label, s)]["test_top1"]) if (label, s) in cells else "" for s in sparsities]
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
            f"| {r['label']} | {_fmt_sparsity(r['sparsity'])} | {_percent(r['test_top1'])} | "
            f"{_percent(r.get('test_top5'))} | {r['kept_prunable']:,} / {r['total_prunable']:,} | "
            f"{r['kept_all']:,} / {r['total_all']:,} | {len(r['empty_layers'])} | "
            f"{r['prune_seconds']:.1f} | {r['train_seconds']:.1f} | {r['epochs']} |"
        )
    return "\n".join(lines)


def results_markdown(records: Sequence[Record], title: str) -> str:
    """The whole report: title, accuracy pivot and details table."""
    return (
        f"# {title}\n\n## Final test top-1 accuracy (%)\n\n{accuracy_table(records)}\n\n"
        f"## Details\n\n{details_table(records)}\n"
    )


def plot_accuracy(records: Sequence[Record], path: str | os.PathLike, title: str = "") -> str:
    """Save a PNG of final test top-1 (%) vs sparsity, one line per method; dense as a dashed line.

    Returns the path written. Uses matplotlib's Agg backend (no display needed).
    """
    import matplotlib  # pylint: disable=import-outside-toplevel

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    sparsities = sorted({r["sparsity"] for r in records if r["label"] != DENSE})
    for label in _labels_in_order(records):
        rows = sorted((r for r in records if r["label"] == label), key=lambda r: r["sparsity"])
        if label == DENSE:
            for r in rows:
                ax.axhline(100.0 * r["test_top1"], color="black", linestyle="--", linewidth=1, label="dense")
            continue
        xs = [100.0 * r["sparsity"] for r in rows]
        ys = [100.0 * r["test_top1"] for r in rows]
        ax.plot(xs, ys, marker="o", label=label)
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


__all__ = ["accuracy_table", "details_table", "plot_accuracy", "results_markdown"]
