"""The report of channel-pruned cells: a table of sizes, FLOPs, latency and accuracy, and a plot of
accuracy against FLOPs (records with ``flops_compact``, written by ``--granularity channel``)."""

from __future__ import annotations

import os
from typing import Any, Optional, Sequence

from prospr_jax.experiment.plots import DENSE, _fmt_sparsity, _percent

Record = dict[str, Any]
PLOT_FILE = "accuracy_flops.png"


def _structured(records: Sequence[Record]) -> list[Record]:
    return [r for r in records if r.get("flops_compact") is not None]


def structured_table(records: Sequence[Record]) -> str:
    """Markdown, one row per channel cell: accuracy of the masked and the compact model, parameters,
    FLOPs per example and latency (ms, inference) of the dense and the compact model; ``''`` if none."""
    rows = sorted(_structured(records), key=lambda r: (r["label"] != DENSE, r["label"], r["sparsity"]))
    if not rows:
        return ""
    batch = rows[0].get("latency_batch", 128)
    lines = [
        f"| method | channel sparsity | top-1 % masked | top-1 % compact | params | FLOPs | FLOPs kept | "
        f"latency ms (batch {batch}) dense -> compact | latency ms (batch 1) dense -> compact |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        b1 = (r.get("latency_ms_by_batch") or {}).get("1", {})
        lines.append(
            f"| {r['label']} | {_fmt_sparsity(r['sparsity'])} | {_percent(r.get('test_top1'))} | "
            f"{_percent(r.get('test_top1_compact'))} | "
            f"{r['params_compact']:,} / {r['params_dense']:,} | {r['flops_compact']:.3g} | "
            f"{100 * r['flops_compact'] / r['flops_dense']:.1f}% | "
            f"{r['latency_ms_dense']:.2f} -> {r['latency_ms_compact']:.2f} | "
            f"{b1.get('dense', float('nan')):.2f} -> {b1.get('compact', float('nan')):.2f} |"
        )
    return "\n".join(lines)


def structured_section(records: Sequence[Record]) -> str:
    """The report's section for channel cells (``''`` when the run has none)."""
    table = structured_table(records)
    return f"\n## Channel pruning: compacted models\n\n{table}\n" if table else ""


def plot_accuracy_vs_flops(records: Sequence[Record], path: str | os.PathLike, title: str = "") -> Optional[str]:
    """PNG of test top-1 (%, compact model) against FLOPs per example, one line per method; the dense
    model a star. Returns the path, or ``None`` when no record has FLOPs."""
    rows = [r for r in _structured(records) if r.get("test_top1_compact") is not None]
    if not rows:
        return None
    import matplotlib  # pylint: disable=import-outside-toplevel

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    labels = list(dict.fromkeys(r["label"] for r in rows))
    for label in labels:
        mine = sorted((r for r in rows if r["label"] == label), key=lambda r: r["flops_compact"])
        xs = [r["flops_compact"] for r in mine]
        ys = [100.0 * r["test_top1_compact"] for r in mine]
        if label == DENSE:
            ax.scatter(xs, ys, marker="*", s=120, color="black", label="dense", zorder=3)
        else:
            ax.plot(xs, ys, marker="o", label=label)
    ax.set_xscale("log")
    ax.set_xlabel("FLOPs per example (XLA cost analysis of the compacted model)")
    ax.set_ylabel("test top-1 accuracy (%)")
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = os.fspath(path)
    fig.savefig(path, format="png")
    plt.close(fig)
    return path


__all__ = ["PLOT_FILE", "plot_accuracy_vs_flops", "structured_section", "structured_table"]
