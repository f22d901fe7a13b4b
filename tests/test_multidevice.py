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
