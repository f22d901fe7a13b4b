"""Data-parallel scoring: ProsPr on a batch sharded over 8 (simulated CPU) devices.

The device count must be set before JAX starts, so the check runs in a fresh Python process with
``XLA_FLAGS=--xla_force_host_platform_device_count=8``.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import textwrap

ROOT = pathlib.Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import prospr_jax as pj
    from tiny_models import mlp_batches, mlp_loss, mlp_params

    assert jax.device_count() == 8, jax.devices()
    params = mlp_params(jax.random.key(0), sizes=(6, 16, 4), dtype=jnp.float32)
    batches = mlp_batches(jax.random.key(1), 4, batch_size=64, sizes=(6, 16, 4), dtype=jnp.float32)
    reference = pj.prospr_scores(mlp_loss, params, batches, num_steps=3, momentum=0.9)

    mesh = Mesh(np.array(jax.devices()), ("data",))
    sharded = jax.device_put(batches, NamedSharding(mesh, P(None, "data")))  # [M+1, B/8 per device, ...]
    replicated = jax.device_put(params, NamedSharding(mesh, P()))
    for implementation in ("hvp", "unrolled"):
        scores = pj.prospr_scores(mlp_loss, replicated, sharded, num_steps=3, momentum=0.9,
                                  implementation=implementation)
        for a, b in zip(jax.tree_util.tree_leaves(reference), jax.tree_util.tree_leaves(scores)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-7)
        leaf = scores["layer0"]["kernel"]
        assert len(leaf.sharding.device_set) == 8, leaf.sharding
    masks = pj.masks_from_scores(scores, 0.9)
    assert sum(int(np.count_nonzero(m)) for m in jax.tree_util.tree_leaves(masks) if m.ndim) == 16  # ceil(0.1 * 160)
    print("OK")
    """
)


def test_prospr_scores_with_batch_sharded_over_eight_devices():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests"), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("OK")


TRAINING_SCRIPT = textwrap.dedent(
    """
    import flax.linen as nn, jax, jax.numpy as jnp, numpy as np
    import prospr_jax as pj
    from prospr_jax.train import Recipe, Trainer

    assert jax.device_count() == 8, jax.devices()

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, train):
            x = nn.Conv(6, (3, 3), use_bias=False)(x)
            x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(x))
            return nn.Dense(3)(x.mean(axis=(1, 2)))

    model = Net()
    variables = model.init(jax.random.key(0), jnp.ones((1, 6, 6, 2)), train=False)
    params, stats = variables["params"], variables["batch_stats"]

    def batch(i):
        k = jax.random.fold_in(jax.random.key(1), i)
        return {"image": np.asarray(jax.random.normal(k, (32, 6, 6, 2))), "label": np.arange(32) % 3}

    # Training: the same global batches on 1 and on 8 devices. BatchNorm statistics are global in
    # both, so losses and parameters agree up to float32 summation order (O(1) values, 5 steps).
    recipe = Recipe(epochs=1, batch_size=32, lr=0.1, schedule="constant", augment=False)
    masks = pj.dense_masks(params)
    runs = []
    for mesh in (None, pj.data_mesh()):
        trainer = Trainer(model, recipe, steps_per_epoch=5, mesh=mesh)
        state = trainer.init(params, stats, masks, rng=0)
        losses = []
        for i in range(5):
            state, metrics = trainer.train_step(state, trainer.place_batch(batch(i)))
            losses.append(float(metrics["loss"]))
        runs.append((losses, state))
    (l1, s1), (l8, s8) = runs
    np.testing.assert_allclose(l1, l8, rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves((s1.params, s1.batch_stats)), jax.tree_util.tree_leaves((s8.params, s8.batch_stats))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
    assert s8.params["Conv_0"]["kernel"].sharding.is_fully_replicated
    assert len(s8.params["Conv_0"]["kernel"].sharding.device_set) == 8
    evaluated = [Trainer(model, recipe, 5, mesh=m).evaluate(s, [dict(batch(9), mask=np.ones(32, np.float32))])
                 for m, s in ((None, s1), (pj.data_mesh(), s8))]
    np.testing.assert_allclose(evaluated[0]["loss"], evaluated[1]["loss"], rtol=1e-5)

    # Scoring: every data-driven method on sharded batches equals its single-device scores.
    mesh = pj.data_mesh()
    with_mesh = dict(batch_fn=lambda i: pj.shard_batch(batch(i), mesh))
    single = pj.PruningProblem.from_flax(model, variables, batch, input_shape=(6, 6, 2), num_classes=3)
    sharded = pj.PruningProblem.from_flax(model, pj.replicate(variables, mesh), input_shape=(6, 6, 2),
                                          num_classes=3, **with_mesh)
    for name, options in (("prospr", {}), ("snip", {}), ("grasp", {"samples_per_class": None}),
                          ("iterative_snip", {"rounds": 2})):
        a = pj.methods.prune(name, single, 0.5, **options)
        b = pj.methods.prune(name, sharded, 0.5, **options)
        if a.scores is not None:
            for (n, x), (_, y) in zip(pj.named_leaves(a.scores), pj.named_leaves(b.scores)):
                scale = float(np.max(np.abs(np.asarray(x)))) or 1.0  # relative to the leaf's scale
                np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-4, atol=1e-5 * scale, err_msg=name + n)
        agree = np.mean([np.mean(np.asarray(x) == np.asarray(y)) for (_, x), (_, y)
                         in zip(pj.named_leaves(a.masks), pj.named_leaves(b.masks)) if np.ndim(x)])
        assert agree > 0.99, (name, agree)  # only near-ties can flip between the two programs
    try:
        pj.shard_batch({"image": np.zeros((12, 6, 6, 2))}, mesh)
    except ValueError as e:
        assert "divides over the 8 devices" in str(e), e
    else:
        raise AssertionError("a batch of 12 on 8 devices must be refused")
    print("OK")
    """
)


def test_training_and_scoring_on_eight_devices_equal_one_device():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "tests"), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, "-c", TRAINING_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("OK")
