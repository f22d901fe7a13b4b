"""The paradigms in the runner: when the mask is scored (--prune-at), what training starts from
(--after), dynamic sparse training through the Trainer, and the combinations refused up front.

The references are computed here, independently of :mod:`prospr_jax.experiment.paradigms`: the
dense training by a plain loop of ``Trainer.train_epoch`` over the data pipeline's batches, the
magnitude masks by a numpy sort."""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest

import prospr_jax as pj
from prospr_jax import data
from prospr_jax.experiment import paradigms
from prospr_jax.experiment.cells import Cell, cells_of
from prospr_jax.experiment.config import UsageError, digest, resolve_config
from prospr_jax.experiment.runner import Experiment, run_cell, start_cell

SETTINGS = {"model": "lenet300_100", "subset": 300, "batch_size": 50, "epochs": 2, "seed": 0}
SPARSITY = 0.9


@pytest.fixture(scope="module")
def exp(tmp_path_factory):
    config = resolve_config({**SETTINGS, "methods": ["magnitude"], "sparsities": [SPARSITY], "prune_at": "end",
                             "after": "finetune", "finetune_epochs": 1, "finetune_lr": 0.01})
    dataset = data.load("digits", subset=300, seed=0)
    return Experiment(config, dataset, str(tmp_path_factory.mktemp("paradigms")), progress=False)


def _dense_reference(exp, steps):
    """theta after ``steps`` dense steps: a plain epoch loop (the dense cell's training)."""
    masks = pj.dense_masks(exp.params0, exp.problem().prunable_tree())
    state = exp.trainer.init(exp.params0, exp.batch_stats0, masks, rng=jax.random.fold_in(jax.random.PRNGKey(0), 2))
    done, epoch = 0, 0
    while done < steps:
        batches = list(data.train_batches(exp.dataset, batch_size=50, epoch=epoch, seed=0, augment=exp.config.recipe.augment))
        batches = batches[: steps - done]
        state, _ = exp.trainer.train_epoch(state, batches)
        done += len(batches)
        epoch += 1
    return state.params


def _numpy_magnitude_masks(params, sparsity):
    """Global top-ceil(d N) of |kernel| by a numpy sort (the kernels are the prunable leaves)."""
    kernels = {n: np.abs(np.asarray(p)) for n, p in pj.named_leaves(params) if n.endswith("kernel")}
    flat = np.concatenate([k.ravel() for k in kernels.values()])
    keep = math.ceil((1 - sparsity) * flat.size)
    threshold = np.sort(flat)[::-1][keep - 1]
    return {n: (k >= threshold) for n, k in kernels.items()}


def _kernel_masks(masks):
    return {n: np.asarray(m) != 0 for n, m in pj.named_leaves(masks) if np.ndim(m) >= 1}


def _same_masks(a, b):
    return all(np.array_equal(a[n], b[n]) for n in a)


def test_prune_at_end_finetune_starts_from_the_trained_weights(exp):
    total = exp.trainer.total_steps
    theta_t = _dense_reference(exp, total)
    cell = Cell("magnitude", SPARSITY, {}, prune_at="end", after="finetune")
    start = start_cell(exp, cell)
    masks = _kernel_masks(start.masks)
    assert _same_masks(masks, _numpy_magnitude_masks(theta_t, SPARSITY)), "the mask is not |theta_T|'s"
    assert not _same_masks(masks, _numpy_magnitude_masks(exp.params0, SPARSITY))
    expected = pj.apply_masks(theta_t, start.masks)
    for got, want, theta0 in zip(jax.tree.leaves(start.state.params), jax.tree.leaves(expected),
                                 jax.tree.leaves(pj.apply_masks(exp.params0, start.masks))):
        # Same compiled steps on the same batches: equal up to float32 reassociation at most.
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
        assert not np.allclose(np.asarray(got), np.asarray(theta0))
    assert int(start.state.step) == 0
    trainer = paradigms.trainer_for(exp, cell)
    assert (trainer.recipe.epochs, trainer.recipe.lr, trainer.recipe.schedule) == (1, 0.01, "constant")
    assert float(trainer.schedule(0)) == pytest.approx(0.01)


def test_prune_at_end_rewind_starts_from_theta0_and_reinit_from_new_weights(exp):
    rewind = start_cell(exp, Cell("magnitude", SPARSITY, {}, prune_at="end"))
    reinit = start_cell(exp, Cell("magnitude", SPARSITY, {}, prune_at="end", after="reinit"))
    assert _same_masks(_kernel_masks(rewind.masks), _kernel_masks(reinit.masks))
    theta0 = pj.apply_masks(exp.params0, rewind.masks)
    theta_t = pj.apply_masks(_dense_reference(exp, exp.trainer.total_steps), rewind.masks)
    for a, b in zip(jax.tree.leaves(rewind.state.params), jax.tree.leaves(theta0)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for name, new in pj.named_leaves(reinit.state.params):
        old = dict(pj.named_leaves(exp.params0))[name]
        if name.endswith("kernel"):
            kept = np.asarray(dict(pj.named_leaves(reinit.masks))[name]) != 0
            new_kept, old_kept = np.asarray(new)[kept], np.asarray(old)[kept]
            assert not np.allclose(new_kept, old_kept), f"{name}: reinit kept theta_0"
            # A fresh draw of the same initialiser, independent of the mask: its kept entries are an
            # unbiased sample of it, so their spread is that of a whole theta_0 kernel (100+ samples: 30%).
            assert 0.7 < np.std(new_kept) / np.std(np.asarray(old)) < 1.3
            assert np.all(np.asarray(new)[~kept] == 0)
    for a, b in zip(jax.tree.leaves(reinit.state.params), jax.tree.leaves(theta_t)):
        if np.size(a) > 1:
            assert not np.allclose(np.asarray(a), np.asarray(b))
    assert int(reinit.state.step) == 0


def test_prune_at_step_k_scores_the_weights_after_k_steps_and_continues_from_k(exp):
    k = 4
    theta_k = _dense_reference(exp, k)
    start = start_cell(exp, Cell("magnitude", SPARSITY, {}, prune_at=f"step:{k}"))
    masks = _kernel_masks(start.masks)
    assert _same_masks(masks, _numpy_magnitude_masks(theta_k, SPARSITY))
    assert not _same_masks(masks, _numpy_magnitude_masks(exp.params0, SPARSITY))
    assert int(start.state.step) == k
    for got, want in zip(jax.tree.leaves(start.state.params), jax.tree.leaves(pj.apply_masks(theta_k, start.masks))):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)


def test_rigl_cell_updates_its_mask_during_training_without_recompiling(exp, monkeypatch):
    cell = Cell("rigl", SPARSITY, {"update_every": 2})
    record = run_cell(exp, cell, resume=False, keep_checkpoints=False)
    steps = exp.trainer.total_steps  # 2 epochs x 6 steps
    end = math.floor(0.75 * steps)
    assert record["mask_updates"] == len([t for t in range(1, steps + 1) if t % 2 == 0 and t < end]) == 4
    assert 0.0 < record["mask_changed_fraction"] < 1.0
    assert record["kept_prunable"] == math.ceil((1 - SPARSITY) * record["total_prunable"])
    # Count the model's traces from here on (flax calls __call__ only while jax traces a program).
    traces = [0]
    model_call = type(exp.model).__call__

    def counting_call(self, *args, **kwargs):
        traces[0] += 1
        return model_call(self, *args, **kwargs)

    monkeypatch.setattr(type(exp.model), "__call__", counting_call)
    static = run_cell(exp, Cell("magnitude", SPARSITY, {}), resume=False, keep_checkpoints=False)
    assert static["mask_updates"] == 0 and static["mask_changed_fraction"] == 0.0
    assert (static["prune_at"], static["after"], static["dense_steps_before_pruning"]) == ("init", "rewind", 0)
    assert static["train_epochs"] == 2
    # One compiled train and eval step for every cell and mask: a new cell's masks are data, so
    # nothing was traced again (per-update retracing is tested with a trace counter in test_dst).
    assert traces[0] == 0


def test_changed_fraction_counts_new_kept_entries():
    first = {"a": np.array([1, 1, 0, 0.0]), "b": np.array(1.0)}
    final = {"a": np.array([0, 1, 1, 0.0]), "b": np.array(1.0)}
    assert paradigms.changed_fraction(first, final) == 0.5


@pytest.mark.parametrize("settings, message", [
    ({"methods": ["snip"], "after": "finetune"}, "nothing has been trained"),
    ({"methods": ["rigl"], "prune_at": "end"}, "dynamic sparse training"),
    ({"methods": ["set"], "after": "reinit"}, "dynamic sparse training"),
    ({"methods": ["imp"], "prune_at": "step:3"}, "trains the network itself"),
    ({"methods": ["drive"], "prune_at": "end"}, "trains the network itself"),
    ({"methods": ["snip"], "finetune_epochs": 2}, "`--finetune-epochs` applies only with `--after finetune`"),
])
def test_impossible_combinations_are_refused_when_the_configuration_is_read(settings, message):
    with pytest.raises(UsageError, match=message):
        resolve_config({**SETTINGS, **settings})


def test_possible_combinations_resolve_and_default_cells_keep_their_ids():
    config = resolve_config({**SETTINGS, "methods": ["dense", "synflow", "magnitude"], "prune_at": "end",
                             "after": "finetune"})
    assert (config.finetune_epochs, config.finetune_lr) == (2, pytest.approx(0.1 * config.recipe.lr))
    cells = cells_of(config)
    assert [(c.method, c.prune_at, c.after) for c in cells][:2] == [("dense", "init", "rewind"), ("synflow", "end", "finetune")]
    assert cells[1].label == "synflow@end+finetune"
    plain = Cell("snip", 0.9, {})
    assert plain.cell_id("abc") == digest({"config": "abc", "method": "snip", "options": {}, "sparsity": 0.9})
    assert Cell("snip", 0.9, {}, prune_at="end").cell_id("abc") != plain.cell_id("abc")
    default = resolve_config({**SETTINGS, "methods": ["snip"]})
    assert "finetune_epochs" not in default.fingerprint_dict()
    assert paradigms.parse_prune_at("step:7") == "step:7"
    with pytest.raises(Exception, match="step:K"):
        paradigms.parse_prune_at("step:-1")


def test_a_resumed_set_cell_gives_the_uninterrupted_result(exp):
    """Resume from the epoch-1 checkpoint: the update count continues from the step, SET's random
    growth depends only on the step, so masks, counts and metrics are those of the whole run."""
    import os
    import shutil

    from prospr_jax.experiment.cells import checkpoint_path

    cell = Cell("set", SPARSITY, {"update_every": 2})
    whole = run_cell(exp, cell, resume=False, keep_checkpoints=True)
    directory = checkpoint_path(exp.out, cell, exp.config_id)
    assert {"1", "2"} <= set(os.listdir(directory))
    shutil.rmtree(os.path.join(directory, "2"))
    resumed = run_cell(exp, cell, resume=True, keep_checkpoints=False)
    assert resumed["history"][0] == whole["history"][0]
    for key in ("mask_updates", "mask_changed_fraction", "kept_prunable", "test_top1", "test_loss"):
        assert resumed[key] == pytest.approx(whole[key], rel=1e-6), key
    assert whole["mask_updates"] == 4


def test_a_finetune_cell_records_its_paradigm_and_trains_the_finetune_epochs(exp):
    record = run_cell(exp, Cell("magnitude", SPARSITY, {}, prune_at="end", after="finetune"), resume=False,
                      keep_checkpoints=False)
    assert record["label"] == "magnitude@end+finetune"
    assert (record["prune_at"], record["after"]) == ("end", "finetune")
    assert record["dense_steps_before_pruning"] == exp.trainer.total_steps == 12
    assert record["train_epochs"] == len(record["history"]) == 1
    assert record["history"][0]["test"]["top1"] is not None


def test_prune_step_beyond_the_recipe_is_refused_before_loading_data():
    from prospr_jax.experiment.checks import check_run

    config = resolve_config({**SETTINGS, "methods": ["snip"], "prune_at": "step:12"})
    with pytest.raises(UsageError, match="only 12 training steps"):  # 2 epochs x 300 // 50
        check_run(config, num_train=1437, num_classes=10, image_shape=None)
    check_run(config.__class__(**{**config.__dict__, "prune_at": "step:11"}), num_train=1437, num_classes=10,
              image_shape=None)
