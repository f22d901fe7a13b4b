"""Merging the records of several run directories into one paper-style report.

Runs of the same protocol (several seeds, several machines, runs resumed with more cells) each hold a
``results.jsonl``. :func:`merge_records` reads them all and keeps one record per seed of each cell:

* the newest record of each cell of each configuration (as a run's own table does);
* records of the same label, sparsity and seed from different configurations (a run with ``--seed 1``
  and a run with ``--seeds 0 1``): the newest, with a warning, so that no seed counts twice;
* every record must come from the same protocol: the settings that decide a result other than the
  seed (:data:`PROTOCOL_KEYS` of the stored configuration); runs of different protocols are an error
  naming the settings that differ.

:func:`write_merged_report` writes ``report.md`` (accuracy pivot with mean ± std over the seeds,
details, effective sparsity and cost) and ``accuracy.png`` with the sparsity axis on the papers'
``1 - 0.8**k`` ladder.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Sequence

from prospr_jax.experiment import plots
from prospr_jax.experiment.results import RESULTS_FILE, read_records

REPORT_FILE = "report.md"
PLOT_FILE = "accuracy.png"
# The stored configuration's settings that, with the seed, decide a cell's result.
PROTOCOL_KEYS = ("dataset", "subset", "image_size", "model", "model_options", "density_rule", "scope",
                 "min_per_layer", "prune_batch_size", "prune_augment", "recipe")


def results_path(run: str) -> str:
    """``run/results.jsonl`` for a run directory, ``run`` itself for a file.

    Raises:
      FileNotFoundError: neither exists.
    """
    path = os.path.join(run, RESULTS_FILE) if os.path.isdir(run) else run
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{run!r} is neither a run directory with {RESULTS_FILE} nor a results file")
    return path


def protocol_of(record: dict) -> dict:
    """The :data:`PROTOCOL_KEYS` of the record's stored configuration."""
    config = record.get("config") or {}
    return {k: config.get(k) for k in PROTOCOL_KEYS}


def merge_records(runs: Sequence[str]) -> list[dict]:
    """One record per label, sparsity and seed over the runs ``runs`` (directories or results files).

    Raises:
      FileNotFoundError: a run has no results file.
      ValueError: no records, or records of different protocols (the message names the settings).
    """
    newest: dict[tuple, dict] = {}
    for run in runs:
        for r in read_records(results_path(run)):
            if "cell_id" in r and "label" in r and "sparsity" in r:
                newest[(r.get("config_id"), r["cell_id"])] = r  # later lines supersede earlier ones
    if not newest:
        raise ValueError(f"no records in {', '.join(runs)}")
    protocols = {json.dumps(protocol_of(r), sort_keys=True) for r in newest.values()}
    if len(protocols) > 1:
        decoded = [json.loads(p) for p in sorted(protocols)]
        differ = [k for k in PROTOCOL_KEYS if len({json.dumps(d[k], sort_keys=True) for d in decoded}) > 1]
        raise ValueError(f"the runs are of {len(protocols)} different protocols (they differ in {', '.join(differ)}); "
                         "merge runs of one protocol")
    by_seed: dict[tuple, dict] = {}
    for r in sorted(newest.values(), key=lambda r: r.get("finished", "")):
        key = (r["label"], r["sparsity"], r.get("seed"))
        if key in by_seed:
            print(f"warning: {r['label']} s={r['sparsity']:g} seed {r.get('seed')} is in more than one configuration; "
                  "the newest record is used", file=sys.stderr)
        by_seed[key] = r
    return list(by_seed.values())


def write_merged_report(records: Sequence[dict], out: str, title: str) -> tuple[str, str, str]:
    """Write ``report.md`` and ``accuracy.png`` (ladder axis) in ``out`` (created if needed).

    Returns:
      ``(markdown text, markdown path, png path)``.
    """
    os.makedirs(out, exist_ok=True)
    seeds = sorted({r.get("seed") for r in records if r.get("seed") is not None})
    ladder = ", ".join(f"{100 * s:g}% (k={plots.ladder_step(s):.2f})" for s in sorted({r["sparsity"] for r in records}) if s > 0)
    text = plots.results_markdown(records, title) + (
        f"\nSeeds: {', '.join(map(str, seeds)) or '-'}. Sparsities on the 1 - 0.8^k ladder: {ladder or '-'}.\n")
    md_path = os.path.join(out, REPORT_FILE)
    with open(md_path, "w", encoding="utf-8") as f:
        f.write(text)
    png_path = plots.plot_accuracy(records, os.path.join(out, PLOT_FILE), title, ladder=True)
    return text, md_path, png_path


def default_title(records: Sequence[dict]) -> str:
    """``model on dataset, E epochs, n seeds`` from the records."""
    first = records[0]
    seeds = {r.get("seed") for r in records}
    return f"{first.get('model')} on {first.get('dataset')}, {first.get('epochs')} epochs, {len(seeds)} seed(s)"


__all__ = ["PLOT_FILE", "PROTOCOL_KEYS", "REPORT_FILE", "default_title", "merge_records", "protocol_of",
           "results_path", "write_merged_report"]
