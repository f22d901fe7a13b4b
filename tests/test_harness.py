"""The research harness: seeds with mean ± std, the sanity-check ablations, scores reused across
sparsities. Every expected value is computed here independently (numpy ranking, the statistics
module, a fresh model initialisation), never read back from the code under test."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import statistics

import jax
import numpy as np
import pytest

import prospr_jax as pj
from prospr_jax import data, models
from prospr_jax._src.ablations import inverted_scores, shuffle_masks
from prospr_jax.experiment import aggregate, plots
from prospr_jax.experiment.cells import Cell, cells_of
from prospr_jax.experiment.config import UsageError, resolve_config
from prospr_jax.experiment.runner import Experiment

TINY = {"model": "lenet300_100", "subset": 100, "batch_size": 50, "epochs": 1}


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def _kernels(params):
    """The LeNet kernels (the prunable leaves) in flattening order."""
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(params) if np.ndim(x) == 2]


def _mask_kernels(masks):
    return [np.asarray(m) for m in jax.tree_util.tree_leaves(masks) if np.ndim(m) >= 1]


def _global_keep(values, kept):
    """Boolean masks keeping the ``kept`` largest entries over all arrays (numpy reference)."""
    flat = np.concatenate([v.reshape(-1) for v in values])
    order = np.argsort(-flat, kind="stable")
    keep = np.zeros(flat.size, bool)
    keep[order[:kept]] = True
    out, start = [], 0
    for v in values:
        out.append(keep[start:start + v.size].reshape(v.shape))
        start += v.size
    return out


@pytest.fixture(scope="module")
def digits():
    return data.load("digits", subset=TINY["subset"], seed=0)


def _experiment(settings, dataset, tmp_path):
    config = resolve_config({**TINY, **settings})
    return config, Experiment(config, dataset, str(tmp_path), progress=False)


# --------------------------------------------------------------------------- cells and ids


def test_default_cell_ids_do_not_change_and_seed_and_ablation_enter_only_when_set():
    cell = Cell("snip", 0.9, {})
    old = hashlib.sha1(json.dumps({"config": "abc", "method": "snip", "options": {}, "sparsity": 0.9},
                                  sort_keys=True).encode()).hexdigest()[:12]
    assert cell.cell_id("abc") == old
    ids = {cell.cell_id("abc"), Cell("snip", 0.9, {}, 1).cell_id("abc"), Cell("snip", 0.9, {}, None, "shuffle").cell_id("abc"),
           Cell("snip", 0.9, {}, 1, "shuffle").cell_id("abc")}
    assert len(ids) == 4
    assert Cell("snip", 0.9, {}, 1, "invert").label == "snip (invert)"


def test_cells_of_every_seed_with_ablations_and_no_invert_for_round_methods():
    config = resolve_config({**TINY, "methods": ["dense", "snip", "synflow"], "sparsities": [0.5, 0.9],
                             "seeds": [4, 5], "ablations": ["shuffle", "invert"]})
    assert config.seed == 4 and config.cell_seeds == (4, 5)
    cells = cells_of(config)
    per_seed = 1 + 2 * 3 + 2 * 2  # dense; snip + shuffle + invert; synflow + shuffle
    assert len(cells) == 2 * per_seed
    assert {c.seed for c in cells[:per_seed]} == {None} and {c.seed for c in cells[per_seed:]} == {5}
    assert not any(c.method == "synflow" and c.ablation == "invert" for c in cells)
    assert [c.ablation for c in cells[1:4]] == [None, "shuffle", "invert"]


def test_dynamic_sparse_training_gets_no_ablation_cells():
    config = resolve_config({**TINY, "methods": ["rigl", "snip"], "sparsities": [0.9], "ablations": ["shuffle"]})
    assert [(c.method, c.ablation) for c in cells_of(config)] == [("rigl", None), ("snip", None), ("snip", "shuffle")]


@pytest.mark.parametrize("settings, expected", [
    ({"seeds": [1, 1]}, "`--seeds` lists a seed twice"),
    ({"ablations": ["shuffle", "shuffle"]}, "`--ablations` lists an ablation twice"),
    ({"methods": ["synflow"], "ablations": ["invert"]}, "`--ablations invert` applies to single-shot score methods"),
    ({"methods": ["snip"], "ablations": ["invert"], "density_rule": "lamp"}, "`--density-rule lamp`"),
    ({"methods": ["magnitude"], "ablations": ["reinit"], "prune_at": "end"}, "`--ablations reinit` needs `--prune-at init"),
])
def test_bad_seeds_and_ablations_are_clear_errors(settings, expected):
    with pytest.raises(UsageError, match=expected.replace("(", r"\(").replace("[", r"\[")):
        resolve_config({**TINY, **settings})


# --------------------------------------------------------------------------- mean ± std


def _record(label, sparsity, seed, top1, diverged=None, effective=None):
    return {"label": label, "method": label.split(" ")[0], "sparsity": sparsity, "seed": seed, "test_top1": top1,
            "diverged": diverged, "effective_sparsity": effective}


def test_table_mean_and_std_equal_a_computation_from_the_records():
    rng = np.random.default_rng(0)
    records = [_record(label, s, seed, float(rng.uniform(0.1, 0.9)))
               for label in ("snip", "snip (shuffle)") for s in (0.5, 0.9) for seed in (0, 1, 2)]
    records.append(_record("dense", 0.0, 0, 0.8))
    records.append(_record("dense", 0.0, 1, None, diverged={"epoch": 1, "epoch_step": 1, "step": 1, "loss": "nan"}))
    table = plots.accuracy_table(records)
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in table.splitlines()[2:]}
    for label in ("snip", "snip (shuffle)"):
        for column, s in enumerate((0.5, 0.9), start=1):
            values = [100 * r["test_top1"] for r in records if r["label"] == label and r["sparsity"] == s]
            assert rows[label][column] == f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"
    # dense: one finite seed of two (the other diverged): no std, n=1 and the divergence said.
    assert rows["dense"][0] == "80.00 ± - (n=1, 1 diverged)"
    assert "over 3 seeds" in plots.accuracy_notes(records)


def test_one_seed_keeps_the_plain_table_and_the_effective_sparsity_flag_needs_more_than_a_point():
    records = [_record("snip", 0.9, 0, 0.5, effective=0.9105), _record("random", 0.9, 0, 0.4, effective=0.9095)]
    table = plots.accuracy_table(records)
    assert "| snip | 50.00 ‡ |" in table and "| random | 40.00 |" in table
    assert "±" not in table and "more than 1 point" in plots.accuracy_notes(records)
    groups = aggregate.groups(records)
    assert groups[("snip", 0.9)].flagged and not groups[("random", 0.9)].flagged


# --------------------------------------------------------------------------- ablations (pure)


def test_shuffle_keeps_every_layers_kept_count_and_changes_the_mask():
    rng = np.random.default_rng(1)
    masks = {"a": (rng.uniform(size=(20, 30)) < 0.3).astype(np.float32), "b": np.float32(1.0),
             "c": (rng.uniform(size=(3, 3, 4, 8)) < 0.5).astype(np.float32)}
    shuffled = shuffle_masks(jax.random.PRNGKey(0), masks)
    for name in ("a", "c"):
        before, after = masks[name], np.asarray(shuffled[name])
        assert after.shape == before.shape and after.dtype == before.dtype
        assert set(np.unique(after)) <= {0.0, 1.0}
        assert after.sum() == before.sum()
        assert np.mean(after != before) > 0.1, "the shuffled mask should move many kept positions"
    assert np.asarray(shuffled["b"]) == 1.0
    again = shuffle_masks(jax.random.PRNGKey(0), masks)
    assert all(np.array_equal(x, y) for x, y in zip(_leaves(shuffled), _leaves(again))), "shuffle is seeded"


@pytest.mark.parametrize("sparsity", [0.5, 0.8])
def test_invert_keeps_exactly_the_lowest_scored_weights(sparsity):
    rng = np.random.default_rng(2)
    scores = {"a": rng.uniform(size=(10, 6)), "b": np.float32(0.0), "c": rng.uniform(size=(7, 4))}
    n = 60 + 28
    kept = math.ceil(round((1 - sparsity) * n, 6))
    inverted = pj.masks_from_scores(inverted_scores(scores), sparsity)
    lowest = _global_keep([-scores["a"], -scores["c"]], kept)
    assert np.array_equal(np.asarray(inverted["a"]) > 0, lowest[0])
    assert np.array_equal(np.asarray(inverted["c"]) > 0, lowest[1])
    if sparsity == 0.5:  # The complement ranking: at half sparsity the inverted mask is the complement.
        normal = pj.masks_from_scores(scores, sparsity)
        for name in ("a", "c"):
            assert np.array_equal(np.asarray(inverted[name]), 1 - np.asarray(normal[name]))


# --------------------------------------------------------------------------- the runner's cells


def test_ablation_cells_of_the_runner(digits, tmp_path):
    config, exp = _experiment({"methods": ["magnitude"], "sparsities": [0.8], "ablations": ["shuffle", "reinit", "invert"]},
                              digits, tmp_path)
    results = {c.ablation: exp.prune(c) for c in cells_of(config)}
    theta0 = _kernels(exp.params0)
    n = sum(k.size for k in theta0)
    kept = math.ceil(round(0.2 * n, 6))
    base = _mask_kernels(results[None].masks)
    assert all(np.array_equal(m > 0, ref) for m, ref in zip(base, _global_keep([np.abs(k) for k in theta0], kept)))
    # invert: exactly the `kept` smallest magnitudes.
    inverted = _mask_kernels(results["invert"].masks)
    assert all(np.array_equal(m > 0, ref) for m, ref in zip(inverted, _global_keep([-np.abs(k) for k in theta0], kept)))
    # shuffle: the same count in every layer, other positions.
    shuffled = _mask_kernels(results["shuffle"].masks)
    assert [int(m.sum()) for m in shuffled] == [int(m.sum()) for m in base]
    assert all(np.mean(s != b) > 0.05 for s, b in zip(shuffled, base))
    # reinit: the same mask, a new theta_0 of the same initialiser.
    assert all(np.array_equal(r, b) for r, b in zip(_mask_kernels(results["reinit"].masks), base))
    fresh = _kernels(results["reinit"].start_params)
    assert all(f.shape == t.shape and not np.allclose(f, t) for f, t in zip(fresh, theta0))
    # Same initialiser: the fresh kernels have the scale of theta_0's (LeCun normal, std 1/sqrt(fan_in));
    # 64 * 300 draws at least: the sample std is within 10% of the population's.
    for f, t in zip(fresh, theta0):
        assert abs(f.std() / t.std() - 1) < 0.1
    assert all(np.array_equal(np.asarray(p), np.asarray(q)) for p, q in
               zip(_leaves(results[None].start_params), _leaves(exp.params0))), "the unablated cell trains theta_0"
    assert results["shuffle"].extras["scores_reused"] and not results[None].extras["scores_reused"]


class _CountingMagnitude(pj.methods.Method):
    name, paper, idea, data, cost = "test_harness_counting", "baseline", "|theta|, counted", "none", "one pass"
    calls = 0

    def score(self, problem, options):
        type(self).calls += 1
        return pj.scores_on_prunable(jax.tree_util.tree_map(np.abs, problem.params), problem.prunable_tree())


@pytest.fixture
def counting_method():
    pj.methods.register(_CountingMagnitude)
    _CountingMagnitude.calls = 0
    try:
        yield _CountingMagnitude
    finally:
        pj.methods.unregister(_CountingMagnitude.name)


def test_single_shot_methods_score_once_per_seed_and_every_sparsity_reuses_the_scores(digits, tmp_path, counting_method):
    sparsities = [0.5, 0.9, 0.98]
    config, exp = _experiment({"methods": [counting_method.name], "sparsities": sparsities, "seeds": [0, 1]},
                              digits, tmp_path)
    cells = cells_of(config)
    results = [(c, exp.for_seed(c.seed).prune(c)) for c in cells]
    with pytest.raises(ValueError, match="prune it with experiment.for_seed"):
        exp.prune(cells[-1])
    assert counting_method.calls == 2, "one scoring per seed, not one per sparsity"
    for cell, result in results:
        seed = cell.run_seed(config.seed)
        # theta_0 of this seed, drawn here independently.
        theta0 = _kernels(models.init(exp.model, jax.random.PRNGKey(seed), (1, 8, 8, 1))[0])
        n = sum(k.size for k in theta0)
        reference = _global_keep([np.abs(k) for k in theta0], math.ceil(round((1 - cell.sparsity) * n, 6)))
        assert all(np.array_equal(m > 0, r) for m, r in zip(_mask_kernels(result.masks), reference)), cell.name
        assert result.extras["scores_reused"] == (cell.sparsity != sparsities[0])
        assert result.sparsity == cell.sparsity


def test_each_seed_has_its_own_theta0_data_order_and_random_pruning(digits, tmp_path):
    config, exp = _experiment({"methods": ["random"], "sparsities": [0.9], "seeds": [0, 1]}, digits, tmp_path)
    other = exp.for_seed(1)
    assert exp.for_seed(0) is exp and exp.for_seed(None) is exp and exp.for_seed(1) is other
    fresh = models.init(exp.model, jax.random.PRNGKey(1), (1, 8, 8, 1))[0]
    assert all(np.array_equal(a, b) for a, b in zip(_leaves(other.params0), _leaves(fresh)))
    assert not np.allclose(_kernels(other.params0)[0], _kernels(exp.params0)[0])
    assert not np.array_equal(np.asarray(other.batch_fn(0)["label"]), np.asarray(exp.batch_fn(0)["label"]))
    masks = [_mask_kernels(exp.for_seed(c.seed).prune(c).masks) for c in cells_of(config)]
    assert not all(np.array_equal(a, b) for a, b in zip(*masks)), "random pruning follows the seed"
    assert other.config_id == exp.config_id and other.config.seed == 1


def test_a_run_with_seeds_and_ablations_end_to_end(tmp_path, capsys):
    from prospr_jax import experiment

    out = tmp_path / "run"
    argv = ["--model", "lenet300_100", "--subset", "100", "--batch-size", "50", "--epochs", "1", "--no-progress",
            "--methods", "dense", "snip", "--sparsities", "0.9", "--seeds", "0", "1", "2",
            "--ablations", "shuffle", "reinit", "invert", "--out", str(out)]
    assert experiment.main(argv) == 0, capsys.readouterr().err
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    labels = ["dense", "snip", "snip (shuffle)", "snip (reinit)", "snip (invert)"]
    assert [(r["label"], r["seed"]) for r in records] == [(label, seed) for seed in (0, 1, 2) for label in labels]
    assert [r["ablation"] for r in records[:5]] == [None, None, "shuffle", "reinit", "invert"]
    assert len({r["cell_id"] for r in records}) == 15
    # Cost of LeNet-300-100 by hand: a Dense kernel is applied once per example, so its FLOPs are its
    # kept weights: 64*300 + 300*100 + 100*10 dense, kept_prunable masked (every kernel is pruned).
    for r in records:
        assert r["dense_flops"] == 64 * 300 + 300 * 100 + 100 * 10
        assert r["flops"] == r["kept_prunable"]
        assert r["compression_ratio"] == r["total_all"] / r["kept_all"]
        assert r["theoretical_speedup"] == r["dense_flops"] / r["flops"]
        assert r["effective_sparsity"] >= r["achieved_sparsity"] - 1e-12 and r["metrics_note"] is None
    assert records[0]["effective_sparsity"] == 0.0
    table = (out / "results.md").read_text()
    pivot = table.split("## Details")[0]
    rows = {line.split("|")[1].strip(): line for line in pivot.splitlines() if line.startswith("| ")}
    for label in labels:
        values = [100 * r["test_top1"] for r in records if r["label"] == label]
        column = "| " if label == "dense" else "|  | "  # the 0% column (dense) or the 90% one
        flagged = 100 * statistics.mean(r["effective_sparsity"] - r["sparsity"] for r in records if r["label"] == label) > 1
        expected = f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}" + (" ‡" if flagged else "")
        assert rows[label].startswith(f"| {label} {column}{expected} |"), rows[label]
    assert "over 3 seeds" in table
    # Resuming with one more seed runs only the new seed's cells.
    code = experiment.main(argv[:-10] + ["--seeds", "0", "1", "2", "3", "--ablations", "shuffle", "reinit",
                                                 "invert", "--out", str(out), "--resume"])
    stdout = capsys.readouterr().out
    assert code == 0 and stdout.count("already in results.jsonl: skipped") == 15
    assert len((out / "results.jsonl").read_text().splitlines()) == 20
