"""The runner with --granularity channel: prune channels, train, compact, record, report."""

from __future__ import annotations

import json
import os

import jax
import numpy as np

from prospr_jax.experiment.cells import Cell
from prospr_jax.experiment.structured_cells import load_compact
from tests.test_runner import run_main

TINY = ["--model", "lenet300_100", "--subset", "300", "--batch-size", "50", "--no-progress", "--epochs", "1"]


def test_channel_cells_are_compacted_and_recorded(tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, err = run_main(TINY + ["--methods", "dense", "snip", "random", "--sparsities", "0.5",
                                         "--granularity", "channel", "--out", str(out)], capsys)
    assert code == 0, err
    with open(out / "results.jsonl", encoding="utf-8") as f:
        records = {r["label"]: r for r in map(json.loads, f)}
    assert set(records) == {"dense", "snip@channel", "random@channel"}
    for label in ("snip@channel", "random@channel"):
        r = records[label]
        layers = {l["name"]: l for l in r["layers"]}
        # Kept hidden units of the two hidden layers, read off the kernels' channel masks.
        k1 = layers["fc1/kernel"]["kept"] // 64
        k2 = layers["fc2/kernel"]["kept"] // 300
        assert k1 + k2 == 200  # ceil(0.5 * 400) hidden units; the 10 logits are never pruned
        assert r["params_compact"] == 64 * k1 + k1 + k1 * k2 + k2 + k2 * 10 + 10
        assert r["params_dense"] == 64 * 300 + 300 + 300 * 100 + 100 + 100 * 10 + 10
        assert 0 < r["flops_compact"] < r["flops_dense"]
        assert r["latency_ms_dense"] > 0 and r["latency_ms_compact"] > 0
        # The compact model is the masked model: the same test accuracy (60 test examples here).
        assert abs(r["test_top1_compact"] - r["test_top1"]) <= 1 / 60 + 1e-9
        # The trained compact model is on disk: the narrow LeNet of the record, with its variables.
        model, variables = load_compact(str(out), r)
        assert model.hidden == (k1, k2)
        assert variables["params"]["fc1"]["kernel"].shape == (64, k1)
        assert sum(np.size(v) for v in jax.tree_util.tree_leaves(variables)) == r["params_compact"]
        logits = model.apply(variables, np.ones((3, 8, 8, 1), np.float32), train=False)
        assert logits.shape == (3, 10) and np.all(np.isfinite(logits))
    assert records["dense"]["params_compact"] == records["dense"]["params_dense"]
    report = (out / "results.md").read_text()
    assert "Channel pruning: compacted models" in report and "snip@channel" in report
    assert os.path.exists(out / "accuracy_flops.png")


def test_channel_granularity_refuses_methods_and_rules_it_cannot_honour(tmp_path, capsys):
    code, _, err = run_main(TINY + ["--methods", "grasp", "--granularity", "channel", "--out", str(tmp_path)], capsys)
    assert code == 2 and "--granularity channel" in err and "grasp" in err
    code, _, err = run_main(TINY + ["--methods", "snip", "--granularity", "channel", "--scope", "layerwise",
                                    "--out", str(tmp_path)], capsys)
    assert code == 2 and "layerwise" in err


def test_weight_cells_keep_their_ids():
    cell = Cell("snip", 0.9, {})
    assert cell.cell_id("abc") == Cell("snip", 0.9, {}, granularity="weight").cell_id("abc")
    assert cell.cell_id("abc") != Cell("snip", 0.9, {}, granularity="channel").cell_id("abc")
    assert Cell("snip", 0.9, {}, granularity="channel").label == "snip@channel"
