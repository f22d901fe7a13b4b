"""``python -m experiments.report``: runs of one protocol merged into one table (mean ± std over
seeds, each seed once) and one ladder plot; runs of different protocols refused."""

from __future__ import annotations

import statistics

import pytest

from experiments import report
from prospr_jax.experiment.plots import ladder_step
from prospr_jax.experiment.results import append_record

CONFIG = {"dataset": "digits", "subset": None, "image_size": None, "model": "resnet20", "model_options": {},
          "density_rule": None, "scope": "global", "min_per_layer": 0, "prune_batch_size": 64,
          "prune_augment": False, "recipe": {"epochs": 2}}


def _record(label, sparsity, seed, top1, config_id, finished, **config):
    return {"label": label, "method": label, "sparsity": sparsity, "seed": seed, "test_top1": top1, "diverged": None,
            "cell_id": f"{label}-{sparsity}-{seed}", "config_id": config_id, "finished": finished,
            "config": {**CONFIG, **config}, "kept_prunable": 1, "total_prunable": 2, "kept_all": 1, "total_all": 2,
            "empty_layers": [], "prune_seconds": 0.0, "train_seconds": 0.0, "epochs": 2, "test_top5": None}


def _pivot_rows(text):
    pivot = text.split("## Details")[0]
    return {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in pivot.splitlines() if line.startswith("| ") and not line.startswith("| method")}


def test_runs_merge_into_one_table_with_each_seed_once(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    sparsities = (1 - 0.8 ** 10, 1 - 0.8 ** 20)
    top1 = {}
    for i, s in enumerate(sparsities):
        for seed in (0, 1):
            top1[("snip", s, seed)] = 0.5 + 0.1 * seed - 0.2 * i
            append_record(a / "results.jsonl", _record("snip", s, seed, 0.0, "cfgA", "2026-01-01T00:00:00"))
            # A later line of the same cell supersedes the earlier one.
            append_record(a / "results.jsonl", _record("snip", s, seed, top1[("snip", s, seed)], "cfgA", "2026-01-01T00:00:01"))
        top1[("snip", s, 2)] = 0.45 - 0.2 * i
        append_record(b / "results.jsonl", _record("snip", s, 2, top1[("snip", s, 2)], "cfgB", "2026-01-02T00:00:00"))
    # Seed 1 at the first sparsity again, from another configuration and newer: it replaces A's.
    top1[("snip", sparsities[0], 1)] = 0.66
    append_record(b / "results.jsonl", _record("snip", sparsities[0], 1, 0.66, "cfgB", "2026-01-03T00:00:00"))
    out = tmp_path / "merged"
    assert report.main([str(a), str(b), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "seed 1 is in more than one configuration" in captured.err
    rows = _pivot_rows((out / "report.md").read_text())
    for column, s in enumerate(sparsities):
        values = [100 * top1[("snip", s, seed)] for seed in (0, 1, 2)]
        assert rows["snip"][column] == f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"
    text = (out / "report.md").read_text()
    assert "over 3 seeds" in text and "k=10.00" in text and "k=20.00" in text
    assert (out / "accuracy.png").stat().st_size > 1000


def test_runs_of_different_protocols_are_refused(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    append_record(a / "results.jsonl", _record("snip", 0.9, 0, 0.5, "x", "1"))
    append_record(b / "results.jsonl", _record("snip", 0.9, 1, 0.5, "y", "2", model="vgg11"))
    with pytest.raises(SystemExit) as e:
        report.main([str(a), str(b), "--out", str(tmp_path / "m")])
    assert e.value.code == 2 and "differ in model" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        report.main([str(tmp_path / "nowhere")])
    assert "neither a run directory" in capsys.readouterr().err


def test_ladder_step():
    assert ladder_step(1 - 0.8 ** 10) == pytest.approx(10.0, abs=1e-12)
    assert ladder_step(0.0) == 0.0
