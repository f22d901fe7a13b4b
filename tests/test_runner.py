"""The prune-then-train runner: end to end, resume after a kill, clear errors on bad input, and the
faults a long run meets: a second run on the same --out, divergence, an unwritable --out, a model too
big for the images, Ctrl-C / SIGTERM, leftovers of an interrupted run, resuming with other flags."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import prospr_jax as pj
from prospr_jax import apply_masks, data, experiment, models
from prospr_jax.checkpoint import Checkpointer
from prospr_jax.experiment.checks import check_model_input
from prospr_jax.experiment.rundir import RunLock
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
        code = experiment.main(argv)
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
        code = experiment.main(RUN + REFERENCE_CELLS + ["--out", str(out)])
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
        cell = experiment.Cell(r["method"], r["sparsity"], {})
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
        (["--preset", "prospr-resnet18-tinyimagenet"], r"--dataset`? is required.*Tiny-ImageNet"),
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


def _cell_dirs(out):
    root = out / "checkpoints"
    return sorted(p.name for p in root.iterdir()) if root.is_dir() else []


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
        cell = experiment.Cell(g["method"], g["sparsity"], {}).dirname(g["config_id"])
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


# --------------------------------------------------------------------------- faults of long runs


def strict_jsonl(path):
    """Records of a results file, parsed as strict JSON (NaN / Infinity are errors)."""

    def reject(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    with open(path, encoding="utf-8") as f:
        return [json.loads(line, parse_constant=reject) for line in f if line.strip()]


# Runs the runner as `python -m experiments.prune_train` does, with SIGINT raising KeyboardInterrupt even
# when this process was started with SIGINT ignored (as a shell does for background jobs).
_AS_MAIN = (
    "import runpy, signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "runpy.run_module('experiments.prune_train', run_name='__main__', alter_sys=True)"
)


def runner_process(argv):
    """The runner in a subprocess, its output piped."""
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu")
    return subprocess.Popen([sys.executable, "-c", _AS_MAIN, *argv], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.fixture
def no_data_loading(monkeypatch):
    """Fail the test if the runner loads a data set (the checks must come first)."""

    def load(*args, **kwargs):
        raise AssertionError("the data set was loaded before the run was checked")

    monkeypatch.setattr(data, "load", load)


def test_second_run_into_a_busy_out_is_refused_at_once_and_the_first_loses_nothing(tmp_path, capsys):
    out = tmp_path / "busy"
    argv = TINY + ["--epochs", "2", "--methods", "dense", "--out", str(out)]
    first = runner_process(argv)
    try:
        deadline = time.monotonic() + 120
        while not ((out / ".lock").exists() and (out / ".lock").read_text().strip() == str(first.pid)):
            assert first.poll() is None, first.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "the first run never took the lock"
            time.sleep(0.01)
        first.send_signal(signal.SIGSTOP)  # Hold it mid-run, so both runs overlap for sure.
        try:
            began = time.monotonic()
            second = runner_process(argv)
            _, err = second.communicate(timeout=120)
            assert second.returncode == 2, err
            assert re.search(rf"`--out` '{re.escape(str(out))}' is in use by another run \(pid {first.pid}\)", err), err
            # The same in-process, with --resume: refused as well, nothing touched.
            code, stdout, err = run_main(["--out", str(out), "--resume", "--no-progress"], capsys)
            assert code == 2 and f"pid {first.pid}" in err and "prune_train:" not in stdout
        finally:
            first.send_signal(signal.SIGCONT)
        assert time.monotonic() - began < 90
        stdout, err = first.communicate(timeout=240)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, err[-3000:]
    records = strict_jsonl(out / "results.jsonl")
    assert [(r["method"], r["epochs"]) for r in records] == [("dense", 2)]
    assert [h["epoch"] for h in records[0]["history"]] == [1, 2]
    assert _cell_dirs(out) == [], "the first run left a checkpoint behind"
    RunLock(str(out)).acquire().release()  # The lock went with the first run.


def test_diverging_cells_are_marked_stop_early_and_keep_the_json_strict(tmp_path, capsys):
    code, stdout, err = run_main(
        TINY + ["--epochs", "3", "--lr", "1000", "--methods", "dense", "snip", "--sparsities", "0.9",
                "--out", str(tmp_path)],
        capsys,
    )
    assert code == experiment.EXIT_DIVERGED == 3, err
    records = strict_jsonl(tmp_path / "results.jsonl")
    assert len(records) == 2
    for r in records:
        d = r["diverged"]
        assert d["epoch"] == 1 and 1 <= d["epoch_step"] <= 6 and d["step"] == d["epoch_step"], d
        assert d["loss"] in ("nan", "inf", "-inf")
        assert r["test_top1"] is None and r["test_top5"] is None and r["test_loss"] is None
        assert [h["epoch"] for h in r["history"]] == [1], "training went on after the loss diverged"
    assert stdout.count("DIVERGED: non-finite training loss at epoch 1") == 2
    assert "2 cell(s) diverged" in err
    table = (tmp_path / "results.md").read_text()
    assert "| dense | diverged |" in table and "10.00" not in table
    assert table.count("the training loss became non-finite") == 2
    assert _cell_dirs(tmp_path) == []


@pytest.fixture
def read_only(monkeypatch):
    """Make a directory read-only: its permission bits, and, for root (which ignores them), file
    creation under it fails as on a read-only file system."""

    def make(path):
        path.mkdir(parents=True, exist_ok=True)
        path.chmod(0o555)
        if os.geteuid() == 0:
            root = str(path)

            def inside(p):
                return os.path.abspath(os.fspath(p)).startswith(root + os.sep)

            def guard(real):
                def call(p, *args, **kwargs):
                    if inside(p):
                        raise PermissionError(13, "Permission denied", os.fspath(p))
                    return real(p, *args, **kwargs)
                return call

            real_open = open
            monkeypatch.setattr(os, "mkdir", guard(os.mkdir))
            monkeypatch.setattr(os, "open", guard(os.open))
            monkeypatch.setattr("builtins.open", lambda p, mode="r", *a, **k: (
                guard(real_open)(p, mode, *a, **k) if set(mode) & set("wax+") else real_open(p, mode, *a, **k)))
        return path

    yield make


def test_unwritable_out_is_a_clear_error_before_any_work(tmp_path, read_only, no_data_loading, capsys):
    locked = read_only(tmp_path / "ro")
    try:
        code, _, err = run_main(TINY + ["--out", str(locked)], capsys)
        assert code == 2 and f"`--out` '{locked}' is not writable" in err, err
        code, _, err = run_main(TINY + ["--out", str(locked / "sub" / "run")], capsys)
        assert code == 2 and f"`--out` '{locked / 'sub' / 'run'}' cannot be created" in err, err
        assert "Traceback" not in err
    finally:
        locked.chmod(0o755)


def test_model_too_big_for_the_images_is_named_before_init(tmp_path, no_data_loading, capsys):
    code, _, err = run_main(["--model", "lenet5", "--out", str(tmp_path), "--no-progress"], capsys)
    assert code == 2, err
    assert "`--model` lenet5 on inputs of shape (8, 8, 1)" in err and "at least 16x16" in err, err
    # The same general check for any model: VGG-16's five poolings empty an 8x8 image.
    code, _, err = run_main(["--model", "vgg16", "--out", str(tmp_path), "--no-progress"], capsys)
    assert code == 2 and "vgg16 on inputs of shape (8, 8, 1)" in err and "empty" in err, err
    check_model_input("lenet5", {}, 10, (16, 16, 1))  # LeNet-5's smallest input: 16 -> 12 -> 6 -> 2 -> 1.
    with pytest.raises(ValueError, match="at least 16x16"):
        check_model_input("lenet5", {}, 10, (15, 15, 1))


@pytest.mark.slow
def test_ctrl_c_prints_one_line_keeps_the_checkpoint_and_resumes(reference, tmp_path, capsys):
    cells = ["--methods", "snip", "--sparsities", "0.9"]
    out = tmp_path / "interrupted"
    proc = runner_process([*RUN, *cells, "--out", str(out)])
    deadline = time.monotonic() + 240
    while not _finished_steps(out):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    match = re.fullmatch(
        r"interrupted \(SIGINT\) in cell (snip) s=0\.9, epoch (\d) of 6: kept its checkpoint of epoch (\d); "
        r"resume with: (python -m experiments\.prune_train --out \S+ --resume)", line)
    assert match, line
    epoch, kept, command = int(match[2]), int(match[3]), match[4]
    assert kept in (epoch - 1, epoch) and kept in _finished_steps(out)
    # The lock is free, and the printed command resumes the run as it was started (run.json).
    RunLock(str(out)).acquire().release()
    code, stdout, err = run_main(command.split()[3:], capsys)
    assert code == 0, err
    assert "resumed from the checkpoint of epoch" in stdout
    want = {r["cell_id"]: r for r in read_jsonl(reference[0] / "results.jsonl")[1:]}
    got = read_jsonl(out / "results.jsonl")
    assert [r["method"] for r in got] == ["snip"]
    for g in got:
        assert g["test_top1"] == pytest.approx(want[g["cell_id"]]["test_top1"], abs=1e-7)


def test_sigterm_is_handled_as_ctrl_c(tmp_path):
    out = tmp_path / "terminated"
    proc = runner_process(TINY + ["--epochs", "100000", "--methods", "dense", "--out", str(out)])
    deadline = time.monotonic() + 240
    while not _finished_steps(out):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    assert "Traceback" not in err
    assert re.search(r"interrupted \(SIGTERM\) in cell dense s=0, epoch \d+ of 100000: kept its checkpoint", err), err
    assert _finished_steps(out)


def test_leftovers_of_a_run_are_not_discarded_without_restart(reference, tmp_path, capsys):
    # Finished cells of the same configuration: refused, nothing appended.
    ref_out = reference[0]
    before = (ref_out / "results.jsonl").read_text()
    code, _, err = run_main(RUN + REFERENCE_CELLS + ["--out", str(ref_out)], capsys)
    assert code == 2 and "5 finished cell(s) of this configuration" in err and "--resume" in err and "--restart" in err
    assert (ref_out / "results.jsonl").read_text() == before

    # The checkpoint of an interrupted cell (one without a record): refused, the checkpoint kept.
    out = tmp_path / "left"
    argv = TINY + ["--epochs", "1", "--methods", "snip", "--sparsities", "0.9", "--out", str(out)]
    assert run_main(argv + ["--keep-checkpoints"], capsys)[0] == 0
    (out / "results.jsonl").unlink()  # As if the run had been killed before writing its record.
    code, _, err = run_main(argv, capsys)
    assert code == 2 and "checkpoints of 1 unfinished cell(s) of an interrupted run (snip-s0.9)" in err, err
    assert _finished_steps(out) == [1]
    assert not (out / "results.jsonl").exists()

    # --restart discards them and runs the cell again.
    code, stdout, err = run_main(argv + ["--restart"], capsys)
    assert code == 0, err
    assert len(read_jsonl(out / "results.jsonl")) == 1 and _finished_steps(out) == []


def test_resume_alone_reloads_the_stored_run_and_names_the_differing_settings(reference, tmp_path, capsys):
    # A copy: --resume without --keep-checkpoints removes the finished cells' checkpoints, which the
    # other tests of the reference run read.
    out = tmp_path / "reference"
    shutil.copytree(reference[0], out)
    code, stdout, err = run_main(["--out", str(out), "--resume", "--no-progress"], capsys)
    assert code == 0, err
    assert stdout.count("already in results.jsonl: skipped") == 5
    # Flags that agree with the stored run are fine.
    code, stdout, _ = run_main(["--out", str(out), "--resume", "--epochs", "6", "--seed", "3", "--no-progress"], capsys)
    assert code == 0 and stdout.count("skipped") == 5
    code, _, err = run_main(["--out", str(out), "--resume", "--epochs", "3", "--seed", "4", "--lr", "0.05"], capsys)
    assert code == 2
    assert "`--epochs`: stored 6, given 3" in err and "`--seed`: stored 3, given 4" in err, err
    assert "`--lr`: stored 0.1, given 0.05" in err
    assert len((out / "results.jsonl").read_text().splitlines()) == 6


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--method-options", '{"snip": {"batches": 2}}', "--methods", "snip"], r"method 'snip' has no option\(s\) \['batches'\]"),
        (["--method-options", '{"prospr": {"bogus": 1}}', "--methods", "prospr"],
         r"'prospr' has no option\(s\) \['bogus'\]; its options: .*num_steps"),
        (["--method-options", '{"prospr": {"num_steps": -1}}', "--methods", "prospr"], r"method 'prospr': `num_steps` must be an integer >= 0, got -1"),
        (["--method-options", '{"synflow": {"rounds": "many"}}', "--methods", "synflow"], r"method 'synflow': `rounds` must be an integer >= 1, got 'many'"),
        (["--method-options", '{"bogus": {}}'], r"keys must be method names"),
        (["--scope", "layerwise", "--methods", "lap"], r"'lap' does not support `scope`"),
        (["--batch-size", "2000"], r"`--batch-size` 2000 is larger than the training set \(1,437 examples\)"),
        (["--subset", "300", "--batch-size", "400"], r"`--batch-size` 400 is larger than the training set \(300 examples"),
        (["--subset", "300", "--prune-batch-size", "301"], r"`--prune-batch-size` 301 is larger"),
        (["--subset", "2000"], r"`--subset` 2000 is larger than the training set"),
        (["--dataset", "no_such_data"], r"unknown data set 'no_such_data'"),
        (["--model-options", '{"widen": 2}'], r"`--model-options`.*widen"),
    ],
)
def test_configuration_errors_come_before_loading_data(argv, expected, tmp_path, no_data_loading, capsys):
    began = time.monotonic()
    code, _, err = run_main(argv + ["--out", str(tmp_path / "o"), "--no-progress"], capsys)
    assert code == 2 and re.search(expected, err, re.S), err
    assert time.monotonic() - began < 15
    assert not (tmp_path / "o").exists(), "a refused configuration created --out"


def test_subset_smaller_than_the_classes_is_an_error(tmp_path, no_data_loading, capsys):
    code, _, err = run_main(["--subset", "5", "--out", str(tmp_path), "--no-progress"], capsys)
    assert code == 2
    assert "`--subset` 5 is smaller than the number of classes of 'digits' (10)" in err, err


def test_train_subset_never_drops_a_class():
    images = np.zeros((100, 2, 2, 1), np.uint8)
    labels = np.repeat(np.arange(4), [50, 30, 15, 5])
    ds = data.Dataset("toy", {"train": data.ArraySource(images, labels)}, ("a", "b", "c", "d"),
                      mean=[0.0], std=[1.0], eval_split=None)
    with pytest.raises(ValueError, match=r"`subset` 3 is smaller than the number of classes \(4\)"):
        data.train_subset(ds, 3)
    with pytest.raises(ValueError, match=r"`subset` 7 would have no example of 1 of the 4 classes \(e\.g\. d"):
        data.train_subset(ds, 7)  # Proportional shares of 7: 4, 2, 1, 0.
    assert sorted(set(data.train_subset(ds, 20).train.labels)) == [0, 1, 2, 3]


def test_no_package_named_experiments_is_installed_and_the_trainer_needs_no_data():
    import configparser

    import setuptools

    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(REPO, "setup.cfg"))
    include = cfg["options.packages.find"]["include"].split()
    packages = setuptools.find_packages(REPO, include=include)
    assert "prospr_jax.experiment" in packages and not any(p.split(".")[0] == "experiments" for p in packages)
    assert cfg["options.entry_points"]["console_scripts"].strip() == "prospr-prune-train = prospr_jax.experiment:main"
    code = "import sys, prospr_jax.train; print('prospr_jax.data' in sys.modules)"
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "False", result.stderr


USER_METHOD = '''
import dataclasses
import jax, jax.numpy as jnp
import prospr_jax as pj


@pj.methods.register
class GradientNorm(pj.methods.Method):
    name, paper, idea, data, cost = "test_runner_gradnorm", "baseline", "|dL/dtheta|", "1 batch", "1 backward pass"
    needs = ("batch_fn",)

    @dataclasses.dataclass(frozen=True)
    class Options:
        batch_index: int = 0

    def score(self, problem, options):
        g = jax.grad(problem.loss_fn)(problem.params, problem.batch(options.batch_index))
        return pj.scores_on_prunable(jax.tree_util.tree_map(jnp.abs, g), problem.prunable_tree())
'''


def test_a_user_method_runs_by_name_in_the_runner(tmp_path, monkeypatch, capsys):
    (tmp_path / "my_methods_for_runner.py").write_text(USER_METHOD)
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "run"
    try:
        code, stdout, err = run_main(
            TINY + ["--import", "my_methods_for_runner", "--methods", "test_runner_gradnorm", "--sparsities", "0.8",
                    "--method-options", '{"test_runner_gradnorm": {"batch_index": 1}}', "--epochs", "1",
                    "--out", str(out)], capsys)
        assert code == 0, err
        (record,) = read_jsonl(out / "results.jsonl")
        assert record["method"] == "test_runner_gradnorm" and record["method_options"] == {"batch_index": 1}
        assert record["kept_prunable"] == math.ceil(0.2 * LENET_KERNELS)
        code, _, err = run_main(TINY + ["--import", "no_such_module_here", "--out", str(tmp_path / "x")], capsys)
        assert code == 2 and "`--import` no_such_module_here: ModuleNotFoundError" in err
    finally:
        if "test_runner_gradnorm" in pj.methods.names():
            pj.methods.unregister("test_runner_gradnorm")


def test_a_signal_during_a_checkpoint_write_waits_for_the_write():
    from prospr_jax.experiment.interrupts import Terminated, signals_as_interrupts, uninterrupted

    done = []
    with signals_as_interrupts():
        with pytest.raises(Terminated):
            with uninterrupted():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.05)  # the handler has run by now, and held the signal back
                done.append("write finished")
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
    assert done == ["write finished"]
