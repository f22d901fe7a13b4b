"""Records of finished cells: strict JSON, the append-only ``results.jsonl``, the report files.

A record is one finished method x sparsity cell. Its floats are finite or ``null``: a diverged cell
(non-finite training loss) has ``null`` test metrics and a ``diverged`` entry saying where the loss
became non-finite; every record has the ``diverged`` field (``null`` when training stayed finite).
Lines are written with ``allow_nan=False``, so ``results.jsonl`` is JSON that any parser reads.
"""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Any, Iterable, Sequence

import numpy as np

from prospr_jax.experiment import plots, structured_report

RESULTS_FILE = "results.jsonl"
TABLE_FILE = "results.md"
PLOT_FILE = "accuracy.png"
# Arrays with more entries than this are left out of records and checkpoint metadata.
_MAX_ARRAY_ENTRIES = 64


def jsonable(value: Any, depth: int = 0) -> Any:
    """``value`` as strict JSON data.

    Non-finite floats become ``None``; arrays of more than 64 entries and objects JSON has no type
    for are left out (``None`` in lists, the key dropped in dicts).
    """
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, np.integer)) and not isinstance(value, np.bool_):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.bool_):
        return bool(value)
    if depth > 6:
        return None
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            converted = jsonable(v, depth + 1)
            if converted is not None or v is None or _is_non_finite(v):
                out[str(k)] = converted
        return out
    if isinstance(value, (list, tuple)):
        return [jsonable(v, depth + 1) for v in value]
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        arr = np.asarray(value)
        if arr.size <= _MAX_ARRAY_ENTRIES and arr.dtype.kind in "biuf":
            return jsonable(arr.tolist(), depth + 1)
    return None


def _is_non_finite(value: Any) -> bool:
    return isinstance(value, (float, np.floating)) and not math.isfinite(value)


def dumps(record: Any) -> str:
    """One strict JSON line (sorted keys; non-finite floats as ``null``)."""
    return json.dumps(jsonable(record), sort_keys=True, allow_nan=False)


def read_records(path: str | os.PathLike) -> list[dict]:
    """The records of a results file.

    A missing file has none; lines that are not JSON objects are skipped with a warning (e.g. a
    line cut by a crash mid-write).
    """
    if not os.path.exists(path):
        return []
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                record = None
            if not isinstance(record, dict):
                print(f"warning: {os.fspath(path)}:{number} is not a JSON record; ignored", file=sys.stderr)
                continue
            records.append(record)
    return records


def append_record(path: str | os.PathLike, record: dict) -> None:
    """Append ``record`` as one strict JSON line to ``path`` (created if missing), flushed to disk."""
    line = dumps(record)
    with open(path, "a", encoding="utf-8") as f:
        if f.tell() > 0:
            with open(path, "rb") as g:  # A previous writer killed mid-line: start a fresh line.
                g.seek(-1, os.SEEK_END)
                if g.read(1) != b"\n":
                    f.write("\n")
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())


def finished_cell_ids(records: Iterable[dict], config_id: str | None = None) -> set[str]:
    """The ``cell_id`` of every record (of configuration ``config_id`` if given)."""
    return {
        r["cell_id"] for r in records
        if "cell_id" in r and (config_id is None or r.get("config_id") == config_id)
    }


def latest_records(records: Iterable[dict], config_id: str) -> list[dict]:
    """The newest record of each cell of configuration ``config_id``, in first-finished order."""
    latest: dict[str, dict] = {}
    for r in records:
        if r.get("config_id") == config_id and "cell_id" in r:
            latest[r["cell_id"]] = r
    return list(latest.values())


def write_report(out: str, records: Sequence[dict], title: str) -> tuple[str, str, str]:
    """Write ``results.md`` and ``accuracy.png`` in ``out``.

    Returns:
      ``(markdown text, markdown path, png path)``.
    """
    text = plots.results_markdown(records, title)
    md_path = os.path.join(out, TABLE_FILE)
    tmp = md_path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, md_path)
    png_path = plots.plot_accuracy(records, os.path.join(out, PLOT_FILE), title)
    structured_report.plot_accuracy_vs_flops(records, os.path.join(out, structured_report.PLOT_FILE), title)
    return text, md_path, png_path


def summary_line(record: dict) -> str:
    """One line about a finished cell: accuracy (or where it diverged), kept weights, timings."""
    head = f"[{record['label']} s={record['sparsity']:g}]"
    tail = (
        f"kept {record['kept_prunable']:,}/{record['total_prunable']:,} prunable weights  "
        f"prune {record['prune_seconds']:.1f} s  train {record['train_seconds']:.1f} s"
    )
    diverged = record.get("diverged")
    if diverged:
        return (
            f"{head} DIVERGED: non-finite training loss at epoch {diverged['epoch']}, step {diverged['epoch_step']} "
            f"(global step {diverged['step']}); training stopped  {tail}"
        )
    top5 = "" if record.get("test_top5") is None else f"  top-5 {100 * record['test_top5']:.2f}%"
    return f"{head} test top-1 {100 * record['test_top1']:.2f}%{top5}  {tail}"


__all__ = [
    "PLOT_FILE",
    "RESULTS_FILE",
    "TABLE_FILE",
    "append_record",
    "dumps",
    "finished_cell_ids",
    "jsonable",
    "latest_records",
    "read_records",
    "summary_line",
    "write_report",
]
