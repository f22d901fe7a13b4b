"""The prune-then-train runner: end to end, resume after a kill, and clear errors on bad input."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import prune_train
from prospr_jax import apply_masks, data, models
from prospr_jax.checkpoint import Checkpointer
from tiny_models import topk_accuracy_bounds

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--model", "lenet300_100", "--subset", "300", "--batch-size", "50", "--no-progress"]
# LeNet-300-100 on 8x8x1 inputs: 64*300 + 300*100 + 100*10 prunable kernel weights.
LENET_KERNELS = 64 * 300 + 300 * 100 + 100 * 10
LENET_ALL = LENET_KERNELS + 300 + 100 + 10


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def run_main(argv, capsys):
    """main(argv) in-process; returns (exit code, stdout, stderr)."""
    try:
        code = prune_train.main(argv)
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


FOREIGN = '{"note": "a record from an earlier experiment"}\n'
# The reference run (in-process) and the killed run (a subprocess) share everything but the cells.
RUN = TINY + ["--epochs", "6", "--seed", "3", "--eval-every", "2", "--keep-checkpoints"]
REFERENCE_CELLS = ["--methods", "dense", "snip", "random", "--sparsities", "0.5", "0.9"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted run into a directory whose results file already holds a foreign line."""
    out = tmp_path_factory.mktemp("reference")
    (out / "results.jsonl").write_text(FOREIGN)
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = prune_train.main(RUN + REFERENCE_CELLS + ["--out", str(out)])
    return out, code, stdout.getvalue()


def test_end_to_end_writes_records_table_and_png_and_keeps_old_results(reference, capsys):
    out, code, stdout = reference
    assert code == 0

    lines = (out / "results.jsonl").read_text().splitlines()
    assert lines[0] + "\n" == FOREIGN, "the existing results file was truncated or rewritten"
    records = [json.loads(line) for line in lines[1:]]
    assert [(r["method"], r["sparsity"]) for r in records] == [
        ("dense", 0.0), ("snip", 0.5), ("snip", 0.9), ("random", 0.5), ("random", 0.9)
    ]
    for r in records:
        kept = LENET_KERNELS if r["method"] == "dense" else math.ceil((1 - r["sparsity"]) * LENET_KERNELS)
        assert (r["kept_prunable"], r["total_prunable"]) == (kept, LENET_KERNELS)
        assert (r["kept_all"], r["total_all"]) == (kept + 410, LENET_ALL)
        assert r["dataset"] == "digits" and r["model"] == "lenet300_100" and r["seed"] == 3
        assert r["epochs"] == 6 and r["empty_layers"] == []
        assert [h["epoch"] for h in r["history"] if "test" in h] == [2, 4, 6]
        assert 0.0 <= r["test_top1"] <= r["test_top5"] <= 1.0
        assert r["prune_seconds"] >= 0 and r["train_seconds"] > 0
        assert r["config"]["recipe"]["batch_size"] == 50 and r["config"]["subset"] == 300
    dense = records[0]
    assert dense["test_top1"] > 0.5, "six epochs of the dense LeNet should be well above chance"

    # The recorded accuracy is that of the final checkpointed params, recomputed here with numpy.
    ds = data.load("digits")
    images = np.concatenate([b["image"] for b in data.eval_batches(ds, batch_size=360)])
    labels = np.asarray(ds.test.labels)
    model = models.get("lenet300_100", 10)
    for r in records[1:3]:
        cell = prune_train.Cell(r["method"], r["sparsity"], {})
        ckpt = Checkpointer(out / "checkpoints" / cell.dirname(r["config_id"]))
        assert ckpt.latest_step() == 6
        masks = ckpt.restore(None, {"masks": None})[0]["masks"]
        params = ckpt.restore(None, {"state": None})[0]["state"]["params"]
        kernels = [np.asarray(m) for m in jax.tree_util.tree_leaves(masks) if np.ndim(m)]
        assert sum(int(k.sum()) for k in kernels) == r["kept_prunable"]
        pruned = [np.asarray(p)[np.asarray(m) == 0] for p, m in
                  zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(masks)) if np.ndim(m)]
        assert all(np.all(v == 0.0) for v in pruned), "a pruned weight moved during training"
        logits = np.asarray(model.apply({"params": params}, jnp.asarray(images), train=False))
        # The runner evaluated in batches (another program): an image whose top two logits are
        # within float32 rounding (< 1e-5 of the logits' scale) may be counted either way.
        lowest, highest, ambiguous = topk_accuracy_bounds(logits, labels, 1, 1e-5 * np.abs(logits).max())
        assert ambiguous <= 3
        assert lowest - 1e-6 <= r["test_top1"] <= highest + 1e-6, (r["test_top1"], lowest, highest)

    table = (out / "results.md").read_text()
    for name in ("dense", "snip", "random", "50%", "90%"):
        assert name in table
    accuracy = f"{100 * records[1]['test_top1']:.2f}"
    assert accuracy in table and accuracy in stdout
    import matplotlib.image

    png = matplotlib.image.imread(out / "accuracy.png")
    assert png.ndim == 3 and png.shape[0] > 100 and png.shape[1] > 100 and png.std() > 0

    # --resume with every cell finished recomputes nothing and appends nothing.
    code, stdout, _ = run_main(RUN + REFERENCE_CELLS + ["--out", str(out), "--resume"], capsys)
    assert code == 0 and stdout.count("already in results.jsonl: skipped") == 5
    assert len((out / "results.jsonl").read_text().splitlines()) == 6


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--dataset", "no_such_data"], r"unknown data set 'no_such_data'.*Choices: 'digits'"),
        (["--model", "resnet9000"], r"invalid choice: 'resnet9000'.*resnet20.*lenet300_100"),
        (["--preset", "nope"], r"invalid choice: 'nope'.*demo.*prospr-resnet20-cifar10"),
        (["--methods", "snip", "magic"], r"invalid choice: 'magic'.*dense.*prospr"),
        (["--sparsities", "0.5", "1.0"], r"\[0, 1\)"),
        (["--sparsities", "-0.1"], r"\[0, 1\)"),
        (["--sparsities", "abc"], r"\[0, 1\)"),
        (["--epochs", "0"], r"--epochs.*>= 1"),
        (["--method-options", '{"bogus": {}}'], r"keys must be method names"),
        (["--method-options", "[1]"], r"JSON object"),
        (["--num-steps", "2", "--methods", "snip"], r"not in --methods"),
        (["--preset", "prospr-resnet18-tinyimagenet"], r"--dataset is required.*Tiny-ImageNet"),
        (["--density-rule", "erk", "--methods", "synflow"], r"--density-rule"),
        (["--lr", "-1"], r"lr"),
    ],
)
def test_bad_input_is_a_clear_error(argv, expected, tmp_path, capsys):
    code, _, err = run_main(argv + ["--out", str(tmp_path / "o"), "--no-progress"], capsys)
    assert code == 2
    assert re.search(expected, err, re.S), err
    assert not (tmp_path / "o" / "results.jsonl").exists()


def test_out_that_is_a_file_and_resume_without_checkpoint_are_errors(tmp_path, capsys):
    target = tmp_path / "a_file"
    target.write_text("keep me")
    code, _, err = run_main(TINY + ["--out", str(target)], capsys)
    assert code == 2 and "is not a directory" in err
    assert target.read_text() == "keep me"
    code, _, err = run_main(TINY + ["--out", str(tmp_path / "empty"), "--resume"], capsys)
    assert code == 2 and "nothing to resume" in err
    # Results of another configuration are not something to resume either.
    other = tmp_path / "other"
    other.mkdir()
    (other / "results.jsonl").write_text('{"config_id": "0123", "cell_id": "x"}\n')
    code, _, err = run_main(TINY + ["--out", str(other), "--resume"], capsys)
    assert code == 2 and "nothing to resume" in err
    assert (other / "results.jsonl").read_text() == '{"config_id": "0123", "cell_id": "x"}\n'


def _finished_steps(out):
    root = out / "checkpoints"
    if not root.is_dir():
        return []
    return [int(s.name) for cell in root.iterdir() for s in cell.iterdir() if re.fullmatch(r"\d+", s.name)]


@pytest.mark.slow
def test_kill_and_resume_gives_the_uninterrupted_result(reference, tmp_path, capsys):
    """A subprocess is SIGKILLed after its first epoch checkpoint; --resume (in-process) must end
    with the records and final params of the uninterrupted reference run (same seed)."""
    cells = ["--methods", "snip", "random", "--sparsities", "0.9"]
    out = tmp_path / "killed"
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu")
    argv = [sys.executable, "-m", "experiments.prune_train", *RUN, *cells, "--out", str(out)]
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not _finished_steps(out):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "results.jsonl").exists(), "the run finished a cell before it was killed"
    assert 1 <= max(_finished_steps(out)) < 6

    code, stdout, err = run_main(RUN + cells + ["--out", str(out), "--resume"], capsys)
    assert code == 0, err
    assert "resumed from the checkpoint of epoch" in stdout

    ref_out = reference[0]
    want = {r["cell_id"]: r for r in read_jsonl(ref_out / "results.jsonl")[1:]}
    got = read_jsonl(out / "results.jsonl")
    assert [(r["method"], r["sparsity"]) for r in got] == [("snip", 0.9), ("random", 0.9)]
    for g in got:
        w = want[g["cell_id"]]
        for key in ("test_top1", "test_top5", "test_loss", "final_train_loss", "kept_prunable"):
            assert g[key] == pytest.approx(w[key], rel=1e-6, abs=1e-7), key
        np.testing.assert_allclose([h["train_loss"] for h in g["history"]],
                                   [h["train_loss"] for h in w["history"]], rtol=1e-6)
        cell = prune_train.Cell(g["method"], g["sparsity"], {}).dirname(g["config_id"])
        p_got = Checkpointer(out / "checkpoints" / cell).restore(6, {"state": None})[0]["state"]
        p_want = Checkpointer(ref_out / "checkpoints" / cell).restore(6, {"state": None})[0]["state"]
        for a, b in zip(jax.tree_util.tree_leaves(p_got), jax.tree_util.tree_leaves(p_want)):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_imp_ticket_rewound_to_step_k_trains_the_remaining_steps(tmp_path, capsys):
    """IMP with rewind_step=k: the ticket starts at theta_k and continues the schedule from step k."""
    spe = 300 // 50  # --subset 300, --batch-size 50
    k = spe + 2  # inside the second epoch
    options = json.dumps({"imp": {"rewind_step": k, "round_steps": 2}})
    code, out, err = run_main(
        TINY + ["--epochs", "3", "--methods", "imp", "--sparsities", "0.5", "--method-options", options,
                "--out", str(tmp_path)],
        capsys,
    )
    assert code == 0, out + err
    (record,) = read_jsonl(tmp_path / "results.jsonl")
    assert record["prune_info"]["start_step"] == k
    # Epoch 1 was part of reaching theta_k; training covered epochs 2 (from its 3rd step) and 3.
    assert [h["epoch"] for h in record["history"]] == [2, 3]
    assert record["kept_prunable"] == math.ceil(0.5 * LENET_KERNELS)
