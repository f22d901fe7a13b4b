"""The runner on many processes (jax.distributed on 127.0.0.1, CPU collectives) and on many devices.

Two processes with 2 simulated CPU devices each run the same command; their one results file must
equal a single-process run on 4 devices (the same global batches, so the same numbers up to float
summation order), and the pair must resume after one of them is killed.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
RUN = ["--model", "lenet300_100", "--subset", "200", "--batch-size", "40", "--epochs", "3", "--seed", "1",
       "--methods", "dense", "snip", "--sparsities", "0.9", "--no-progress", "--keep-checkpoints"]
METRICS = ("test_top1", "test_loss", "final_train_loss", "kept_prunable")


def _env(devices: int) -> dict:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _command(out, *extra):
    return [sys.executable, "-m", "experiments.prune_train", *RUN, "--out", str(out), *extra]


def _pair(out, *extra):
    port = _free_port()
    return [
        subprocess.Popen(
            _command(out, "--coordinator-address", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id",
                     str(i), "--initialization-timeout", "120", *extra),
            cwd=ROOT, env=_env(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for i in range(2)
    ]


def _records(out):
    lines = (out / "results.jsonl").read_text().splitlines()
    return {(r["method"], r["sparsity"]): r for r in map(json.loads, lines)}


def _close(a, b):
    for key in ("dense", 0.0), ("snip", 0.9):
        for metric in METRICS:
            # The same global batches on 4 devices in one or two processes: equal up to float32
            # summation order over 3 epochs of a small MLP.
            assert a[key][metric] == pytest.approx(b[key][metric], rel=2e-3, abs=2e-3), (key, metric)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    proc = subprocess.run(_command(out), cwd=ROOT, env=_env(4), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "mesh {'data': 4}: 4 device(s)" in proc.stdout
    return _records(out)


def test_two_processes_write_one_results_file_equal_to_one_process(single, tmp_path):
    out = tmp_path / "pair"
    procs = _pair(out)
    outputs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outputs]
    assert "results:" in outputs[0][0] and "results:" not in outputs[1][0]  # only process 0 reports
    records = _records(out)
    assert len((out / "results.jsonl").read_text().splitlines()) == 2  # one file, one record per cell
    assert all(r["num_devices"] == 4 and r["num_processes"] == 2 for r in records.values())
    assert all(r["num_devices"] == 4 and r["num_processes"] == 1 for r in single.values())
    _close(records, single)


def test_the_pair_resumes_after_one_process_is_killed(single, tmp_path):
    out = tmp_path / "killed"
    procs = _pair(out)
    deadline = time.monotonic() + 600
    checkpoints = out / "checkpoints"
    # Wait for the first cell's first checkpoint, then kill process 1; process 0 cannot go on alone.
    while time.monotonic() < deadline and not any(checkpoints.glob("*/1")):
        time.sleep(0.5)
        assert all(p.poll() is None for p in procs), [p.communicate()[1][-2000:] for p in procs]
    procs[1].send_signal(signal.SIGKILL)
    procs[1].wait(timeout=60)
    procs[0].send_signal(signal.SIGKILL)
    procs[0].wait(timeout=60)
    assert not (out / "results.jsonl").exists() or len((out / "results.jsonl").read_text().splitlines()) < 2
    resumed = _pair(out, "--resume")
    outputs = [p.communicate(timeout=600) for p in resumed]
    assert [p.returncode for p in resumed] == [0, 0], [o[1][-2000:] for o in outputs]
    assert "resumed from the checkpoint of epoch" in outputs[0][0]
    _close(_records(out), single)


def test_bad_process_flags_are_clear_errors(tmp_path):
    cases = [
        (["--num-processes", "2", "--process-id", "0"], "missing: --coordinator-address"),
        (["--coordinator-address", "127.0.0.1:1", "--num-processes", "2", "--process-id", "2"],
         r"`--process-id` must be in [0, 2)"),
        (["--coordinator-address", "localhost", "--num-processes", "2", "--process-id", "0"], "HOST:PORT"),
        (["--num-devices", "3"], "`--batch-size` 40: the global batch of 40 examples does not split over 3 devices"),
    ]
    for extra, message in cases:
        proc = subprocess.run(_command(tmp_path / "bad", *extra), cwd=ROOT, env=_env(4), capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 2 and message in proc.stderr, (extra, proc.stderr[-1500:])
