"""The prepared accelerator check runs at its CI size and reports every figure it promises."""

from __future__ import annotations

import json

from experiments import accelerator_check


def test_smoke_size_runs_and_writes_every_figure(tmp_path, capsys):
    out = tmp_path / "check.json"
    assert accelerator_check.main(["--smoke", "--repeats", "1", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["num_devices"] >= 1 and report["device"]
    assert [(r["model"], r["num_steps"]) for r in report["rows"]] == [("resnet20", 0), ("resnet20", 1)]
    for row in report["rows"]:
        assert row["scoring_s"] > 0 and row["sgd_steps_s"] > 0 and row["train_images_per_s"] > 0
        assert row["ratio"] == row["scoring_s"] / row["sgd_steps_s"]
        assert row["trace_compile_s"] > 0 and row["peak_memory_mb"] > 0
    printed = capsys.readouterr().out
    assert "| resnet20 | 8 | 1 |" in printed
