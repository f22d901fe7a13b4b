"""Data parallelism helpers on one process: meshes, process rows, and the loader's per-process rows."""

from __future__ import annotations

import numpy as np
import pytest

import prospr_jax as pj
from prospr_jax import data


def test_one_process_loads_every_row_and_a_bad_split_is_refused():
    mesh = pj.data_mesh()
    assert pj.process_rows(64, mesh) == slice(0, 64)
    assert "1 device(s)" in pj.describe_mesh(mesh)
    with pytest.raises(ValueError, match="`num_devices` must be an integer >= 1 and <= 1"):
        pj.data_mesh(2)
    batch = pj.shard_batch({"image": np.ones((4, 2)), "label": np.arange(4)}, mesh)
    assert batch["image"].shape == (4, 2) and batch["label"].sharding.is_fully_replicated


@pytest.mark.parametrize("split", [2, 4])
def test_rows_of_every_batch_reassemble_the_global_batch(split):
    ds = data.load("digits")
    kw = dict(batch_size=64, epoch=2, seed=5, prefetch=0)
    size = 64 // split
    full = list(data.train_batches(ds, **kw))
    parts = [list(data.train_batches(ds, rows=slice(i * size, (i + 1) * size), **kw)) for i in range(split)]
    assert all(len(p) == len(full) for p in parts)
    for step, batch in enumerate(full):  # same order and the same augmentation draws, row for row
        for key in ("image", "label"):
            np.testing.assert_array_equal(np.concatenate([p[step][key] for p in parts]), batch[key])
    evals = list(data.eval_batches(ds, batch_size=100, pad_remainder=True, prefetch=0))
    halves = [list(data.eval_batches(ds, batch_size=100, pad_remainder=True, prefetch=0, rows=slice(i * 50, (i + 1) * 50)))
              for i in range(2)]
    for step, batch in enumerate(evals):  # the padded last batch splits too; masks mark real examples
        for key in ("image", "label", "mask"):
            np.testing.assert_array_equal(np.concatenate([h[step][key] for h in halves]), batch[key])
    assert sum(float(b["mask"].sum()) for b in evals) == 360


def test_a_grain_pipeline_builds_the_same_batches():
    ds = data.load("digits")
    kw = dict(batch_size=64, epoch=1, seed=2, start_step=3, prefetch=2, rows=slice(0, 32))
    plain = list(data.train_batches(ds, **kw))
    parallel = list(data.train_batches(ds, workers=3, **kw))
    assert len(plain) == len(parallel) == data.steps_per_epoch(ds, 64) - 3
    for a, b in zip(plain, parallel):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
