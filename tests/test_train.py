"""Masked training: zeros stay zero, PyTorch SGD semantics, schedules, metrics, train_fn, checkpoints."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import prospr_jax as pj
from prospr_jax import data
from prospr_jax.checkpoint import Checkpointer
from prospr_jax.experiment import make_train_fn
from prospr_jax.train import (
    RECIPES,
    Recipe,
    Trainer,
    get_recipe,
    make_schedule,
    milestone_steps,
)
from tiny_models import topk_accuracy_bounds

TRACES = {"count": 0}


class TinyMLP(nn.Module):
    """8x8x1 -> 32 -> 10, no BatchNorm (its loss is easy to write independently)."""

    @nn.compact
    def __call__(self, x, train: bool):
        TRACES["count"] += 1  # Runs only while jax traces the model.
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(32, name="hidden")(x))
        return nn.Dense(10, name="logits")(x)


class TinyBNNet(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Conv(8, (3, 3), use_bias=False, name="conv")(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, name="bn")(x)
        x = nn.relu(x).reshape(x.shape[0], -1)
        return nn.Dense(10, name="logits")(x)


def mlp_logits(params, images):
    """TinyMLP's forward pass written out by hand (independent of flax)."""
    h = images.reshape(images.shape[0], -1) @ params["hidden"]["kernel"] + params["hidden"]["bias"]
    return jnp.maximum(h, 0) @ params["logits"]["kernel"] + params["logits"]["bias"]


def mlp_loss(params, batch):
    logits = mlp_logits(params, batch["image"])
    logp = logits - jax.scipy.special.logsumexp(logits, axis=-1, keepdims=True)
    return -jnp.mean(jnp.take_along_axis(logp, batch["label"][:, None], axis=-1))


@pytest.fixture(scope="module")
def digits():
    return data.load("digits")


def random_masks(params, sparsity, seed=0):
    """Kernels: each weight kept with probability 1 - sparsity (numpy draw); other leaves unpruned."""
    rng = np.random.default_rng(seed)

    def leaf(path, p):
        if jax.tree_util.keystr(path).endswith("['kernel']"):
            return jnp.asarray(rng.uniform(size=p.shape) >= sparsity, jnp.float32)
        return jnp.asarray(1.0, jnp.float32)

    return jax.tree_util.tree_map_with_path(leaf, params)


def pruned_values(params, masks):
    """All parameter entries whose mask is 0, as one vector."""
    out = [np.asarray(p)[np.broadcast_to(np.asarray(m), p.shape) == 0]
           for p, m in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(masks))]
    return np.concatenate(out)


def first_batch(ds, *, batch_size, epoch, seed, augment=False):
    return next(iter(data.train_batches(ds, batch_size=batch_size, epoch=epoch, seed=seed, augment=augment)))


def test_masked_training_reduces_loss_keeps_zeros_and_updates_batchnorm(digits):
    model = TinyBNNet()
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)), train=False)
    params, stats = variables["params"], variables["batch_stats"]
    masks = random_masks(params, 0.7)
    recipe = RECIPES["prospr"].replace(epochs=3, batch_size=64, lr=0.05, augment=False)
    trainer = Trainer(model, recipe, data.steps_per_epoch(digits, 64))
    # A non-zero start for the pruned weights must not leak: init zeroes them.
    state = trainer.init(params, stats, masks, rng=0)
    assert np.all(pruned_values(state.params, masks) == 0.0)
    evals = lambda s: trainer.evaluate(s, data.eval_batches(digits, batch_size=100, pad_remainder=True))
    before = evals(state)
    for epoch in range(recipe.epochs):
        for batch in data.train_batches(digits, batch_size=64, epoch=epoch, seed=0, augment=False):
            state, metrics = trainer.train_step(state, batch)
            assert np.all(pruned_values(state.params, masks) == 0.0)
    after = evals(state)
    assert after["loss"] < 0.7 * before["loss"]
    assert after["top1"] > before["top1"] + 0.3
    # Momentum buffers of pruned weights stay zero too.
    assert isinstance(state.opt_state, pj.MaskedOptimizerState)
    momentum = state.opt_state.inner_state[1][0].trace
    assert np.any(np.asarray(momentum["conv"]["kernel"]) != 0.0)  # the buffers are live ...
    assert np.all(pruned_values(momentum, masks) == 0.0)  # ... except at pruned weights
    # BatchNorm statistics were updated in train mode.
    assert not np.allclose(state.batch_stats["bn"]["mean"], stats["bn"]["mean"])
    assert int(state.step) == recipe.epochs * trainer.steps_per_epoch


def test_new_mask_does_not_recompile_the_train_or_eval_step(digits):
    model = TinyMLP()
    params = model.init(jax.random.PRNGKey(1), jnp.zeros((1, 8, 8, 1)), train=False)["params"]
    trainer = Trainer(model, RECIPES["prospr"].replace(epochs=1, batch_size=32), 10)
    batch = first_batch(digits, batch_size=32, epoch=0, seed=0)
    eval_batch = next(iter(data.eval_batches(digits, batch_size=64, pad_remainder=True)))
    TRACES["count"] = 0
    state_a = trainer.init(params, {}, random_masks(params, 0.5, seed=1), rng=0)
    state_a, _ = trainer.train_step(state_a, batch)
    trainer.eval_step(state_a, eval_batch)
    traced = TRACES["count"]
    assert traced >= 1
    masks_b = random_masks(params, 0.9, seed=2)
    state_b = trainer.init(params, {}, masks_b, rng=3)
    state_b, _ = trainer.train_step(state_b, batch)
    trainer.eval_step(state_b, eval_batch)
    state_b = state_b._replace(opt_state=pj.set_masks(state_b.opt_state, random_masks(params, 0.3, seed=4)))
    state_b, _ = trainer.train_step(state_b, batch)
    assert TRACES["count"] == traced, "a new mask recompiled a step"


def test_sgd_step_matches_pytorch_semantics_by_hand(digits):
    """Two steps of coupled weight decay + heavy-ball momentum, computed independently."""
    model = TinyMLP()
    params = model.init(jax.random.PRNGKey(2), jnp.zeros((1, 8, 8, 1)), train=False)["params"]
    masks = random_masks(params, 0.6, seed=5)
    lr, mu, wd = 0.05, 0.9, 1e-2
    recipe = Recipe(epochs=1, batch_size=32, lr=lr, momentum=mu, weight_decay=wd, schedule="constant")
    trainer = Trainer(model, recipe, 10)
    state = trainer.init(params, {}, masks, rng=0)
    b0 = first_batch(digits, batch_size=32, epoch=0, seed=0)
    b1 = first_batch(digits, batch_size=32, epoch=1, seed=0)
    state, _ = trainer.train_step(state, b0)
    state, _ = trainer.train_step(state, b1)

    m = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float64), masks)
    w = jax.tree_util.tree_map(lambda p, k: np.asarray(p, np.float64) * k, params, m)
    buf = None
    for b in (b0, b1):
        wj = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), w)
        g = jax.grad(lambda p: mlp_loss(jax.tree_util.tree_map(lambda a, k: a * k, p, masks), b))(wj)
        d = jax.tree_util.tree_map(lambda gi, wi, k: (np.asarray(gi, np.float64) + wd * wi) * k, g, w, m)
        buf = d if buf is None else jax.tree_util.tree_map(lambda bi, di: mu * bi + di, buf, d)
        w = jax.tree_util.tree_map(lambda wi, bi: wi - lr * bi, w, buf)
    for got, want in zip(jax.tree_util.tree_leaves(state.params), jax.tree_util.tree_leaves(w)):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
    assert np.all(pruned_values(state.params, masks) == 0.0)


def test_multistep_and_cosine_schedules():
    prospr = RECIPES["prospr"]
    assert milestone_steps(prospr, 10) == (1000, 1500)
    schedule = make_schedule(prospr, 10)
    np.testing.assert_allclose([schedule(s) for s in (0, 999, 1000, 1499, 1500, 1999)],
                               [0.1, 0.1, 0.01, 0.01, 0.001, 0.001], rtol=1e-6)
    frankle = get_recipe("frankle")
    assert (frankle.epochs, frankle.batch_size, frankle.weight_decay) == (160, 128, 1e-4)
    assert milestone_steps(frankle, 391) == (80 * 391, 120 * 391)
    cosine = make_schedule(Recipe(epochs=4, lr=0.2, schedule="cosine"), 25)
    np.testing.assert_allclose([cosine(0), cosine(50), cosine(100)], [0.2, 0.1, 0.0], atol=1e-7)
    warm = make_schedule(Recipe(epochs=4, lr=0.2, schedule="constant", warmup_epochs=1), 10)
    np.testing.assert_allclose([warm(0), warm(4), warm(9), warm(10)], [0.02, 0.1, 0.2, 0.2], rtol=1e-6)
    # A run too short for a milestone epoch decays at the fraction of its steps.
    assert milestone_steps(Recipe(epochs=1, milestones=(0.5,)), 8) == (4,)


def test_recipe_and_trainer_reject_bad_input():
    with pytest.raises(ValueError, match="choices: prospr, frankle, imagenet"):
        get_recipe("adam")
    with pytest.raises(ValueError, match="schedule"):
        Recipe(schedule="linear")
    with pytest.raises(ValueError, match="milestones"):
        Recipe(milestones=(0.75, 0.5))
    with pytest.raises(ValueError, match="epochs"):
        Recipe(epochs=0)
    with pytest.raises(ValueError, match="momentum"):
        Recipe(momentum=1.0)
    with pytest.raises(TypeError, match="recipe"):
        Trainer(TinyMLP(), "prospr", 10)
    params = TinyMLP().init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)), train=False)["params"]
    trainer = Trainer(TinyMLP(), Recipe(epochs=1), 10)
    with pytest.raises(ValueError, match="masks"):
        trainer.init(params, {}, {"hidden": {"kernel": jnp.ones((3, 3))}}, rng=0)


def test_top1_top5_against_numpy(digits):
    model = TinyMLP()
    params = model.init(jax.random.PRNGKey(3), jnp.zeros((1, 8, 8, 1)), train=False)["params"]
    masks = random_masks(params, 0.5, seed=7)
    trainer = Trainer(model, Recipe(epochs=1, batch_size=32), 10)
    state = trainer.init(params, {}, masks, rng=0)
    # 360 test images in batches of 100: the last batch is padded and must not count.
    metrics = trainer.evaluate(state, data.eval_batches(digits, batch_size=100, pad_remainder=True))
    images = np.concatenate([b["image"] for b in data.eval_batches(digits, batch_size=360)])
    labels = np.asarray(digits.test.labels)
    logits = np.asarray(mlp_logits(pj.apply_masks(params, masks), jnp.asarray(images)), np.float64)
    assert metrics["count"] == 360
    # The trainer's logits come from another program (flax, batches of 100): each may differ from
    # these by rounding of its 64- and 32-term sums, well under 1e-5 of the logits' scale. Examples
    # whose label is that close to the k-th logit may go either way; all others must agree.
    tol = 1e-5 * np.abs(logits).max()
    for k, key in ((1, "top1"), (5, "top5")):
        lowest, highest, ambiguous = topk_accuracy_bounds(logits, labels, k, tol)
        assert ambiguous <= 3
        assert lowest - 1e-6 <= metrics[key] <= highest + 1e-6, (key, metrics[key], lowest, highest)
    logp = logits - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True)) - logits.max(1, keepdims=True)
    np.testing.assert_allclose(metrics["loss"], -np.mean(logp[np.arange(360), labels]), rtol=1e-4)


def test_train_fn_honours_steps_and_start_step(digits):
    """Plain SGD (no momentum / decay) with lr x0.1 at step S: one step from start_step=S uses
    lr/10 and batch S of the data stream; three steps from 0 use lr and batches 0, 1, 2."""
    model = TinyMLP()
    params = model.init(jax.random.PRNGKey(4), jnp.zeros((1, 8, 8, 1)), train=False)["params"]
    masks = random_masks(params, 0.5, seed=8)
    bs, lr = 64, 0.5
    spe = data.steps_per_epoch(digits, bs)
    recipe = Recipe(epochs=2, batch_size=bs, lr=lr, momentum=0.0, weight_decay=0.0, milestones=(0.5,), augment=False)
    train_fn = make_train_fn(Trainer(model, recipe, spe), digits, batch_stats={}, seed=3)
    masked0 = pj.apply_masks(params, masks)
    loss = lambda p, b: mlp_loss(pj.apply_masks(p, masks), b)

    def sgd(p, batch, rate):
        g = jax.grad(loss)(p, batch)
        return jax.tree_util.tree_map(lambda a, b: a - rate * b, p, g)

    expected = sgd(masked0, first_batch(digits, batch_size=bs, epoch=1, seed=3), lr * 0.1)
    got = train_fn(params, masks, steps=1, start_step=spe)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(expected)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)

    batches = iter(data.train_batches(digits, batch_size=bs, epoch=0, seed=3, augment=False))
    expected = masked0
    for _ in range(3):
        expected = sgd(expected, next(batches), lr)
    got = train_fn(params, masks, steps=3)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(expected)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert np.all(pruned_values(got, masks) == 0.0)
    # steps=0 returns the masked start; steps crossing an epoch boundary continue the data stream.
    for a, b in zip(jax.tree_util.tree_leaves(train_fn(params, masks, steps=0)), jax.tree_util.tree_leaves(masked0)):
        np.testing.assert_array_equal(a, b)
    two_epochs = train_fn(params, masks, steps=spe + 1)
    split = train_fn(train_fn(params, masks, steps=spe), masks, steps=1, start_step=spe)
    for a, b in zip(jax.tree_util.tree_leaves(two_epochs), jax.tree_util.tree_leaves(split)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    # steps=None trains to the end of the budget (2 epochs): from step T - 1 that is one step.
    last = train_fn(params, masks, start_step=2 * spe - 1)
    one = train_fn(params, masks, steps=1, start_step=2 * spe - 1)
    for a, b in zip(jax.tree_util.tree_leaves(last), jax.tree_util.tree_leaves(one)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="steps"):
        train_fn(params, masks, steps=-1)


def test_train_fn_drives_imp_through_the_registry(digits):
    """The registry's IMP trains through train_fn and returns masks; training keeps them at zero."""
    pytest.importorskip("prospr_jax.methods.imp")
    model = TinyMLP()
    params = model.init(jax.random.PRNGKey(5), jnp.zeros((1, 8, 8, 1)), train=False)["params"]
    recipe = Recipe(epochs=1, batch_size=64, lr=0.1, augment=False)
    trainer = Trainer(model, recipe, data.steps_per_epoch(digits, 64))
    train_fn = make_train_fn(trainer, digits, batch_stats={}, seed=0)
    problem = pj.PruningProblem(params=params, loss_fn=mlp_loss, train_fn=train_fn)
    result = pj.methods.prune("imp", problem, 0.36, round_steps=3)
    masks = result.masks
    report = pj.sparsity_report(masks, params)
    assert report.prunable_kept == pj.kept_count(0.64, report.prunable_total)
    trained = train_fn(result.start_params, masks, steps=2)
    assert np.all(pruned_values(trained, masks) == 0.0)


def test_checkpointer_round_trip_keeps_newest_and_errors(tmp_path):
    params = {"a": jnp.arange(3.0), "b": {"k": jnp.ones((2, 2))}}
    masks = {"a": jnp.asarray([1.0, 0.0, 1.0]), "b": {"k": jnp.asarray(1.0)}}
    trainer = Trainer(TinyMLP(), Recipe(epochs=1), 10)
    state = trainer.init(params, {}, masks, rng=7)
    ckpt = Checkpointer(tmp_path / "ck", keep=2)
    assert ckpt.latest_step() is None
    with pytest.raises(FileNotFoundError):
        ckpt.restore(None, {"masks": None})
    for step in (1, 2, 3):
        ckpt.save(step, {"state": state._replace(step=jnp.asarray(step, jnp.int32)), "masks": masks}, {"epoch": step})
    assert Checkpointer(tmp_path / "ck").all_steps() == (2, 3)
    items, meta = Checkpointer(tmp_path / "ck").restore(None, {"masks": None})
    assert meta == {"epoch": 3}
    np.testing.assert_array_equal(items["masks"]["a"], [1.0, 0.0, 1.0])
    items, _ = Checkpointer(tmp_path / "ck").restore(2, {"state": state})
    restored = items["state"]
    assert type(restored) is type(state) and int(restored.step) == 2
    assert isinstance(restored.opt_state, pj.MaskedOptimizerState)
    np.testing.assert_array_equal(restored.rng, jax.random.PRNGKey(7))
    np.testing.assert_array_equal(restored.params["a"], [0.0, 0.0, 2.0])
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        Checkpointer(tmp_path / "file")
