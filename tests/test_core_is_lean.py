"""The core installs and scores without the experiment harness's dependencies."""

from __future__ import annotations

import configparser
import pathlib
import subprocess
import sys
import textwrap

ROOT = pathlib.Path(__file__).resolve().parents[1]
HARNESS_ONLY = ("flax", "tensorflow_datasets", "tensorflow", "orbax", "matplotlib", "sklearn", "tqdm", "array_record")

SCRIPT = textwrap.dedent(
    """
    import sys
    for name in {blocked!r}:
        sys.modules[name] = None  # any import of a harness dependency now raises ImportError

    import jax, jax.numpy as jnp, optax
    import prospr_jax as pj

    def apply_fn(params, state, x, train):
        h = jnp.tanh(x @ params["l0"]["kernel"] + params["l0"]["bias"])
        return h @ params["l1"]["kernel"]

    def loss_fn(params, batch):
        return pj.cross_entropy(apply_fn(params, {{}}, batch["image"], True), batch["label"])

    k = jax.random.key(0)
    params = {{"l0": {{"kernel": jax.random.normal(k, (6, 8)), "bias": jnp.zeros(8)}},
              "l1": {{"kernel": jax.random.normal(jax.random.fold_in(k, 1), (8, 3))}}}}

    def batch_fn(i):
        kk = jax.random.fold_in(k, 10 + i)
        return {{"image": jax.random.normal(kk, (12, 6)), "label": jnp.arange(12) % 3}}

    problem = pj.PruningProblem(params, loss_fn, batch_fn=batch_fn, apply_fn=apply_fn, input_shape=(6,),
                                num_classes=3, key=jax.random.key(1))
    scores = pj.prospr_scores(loss_fn, params, pj.stack_batches([batch_fn(i) for i in range(4)]))
    masks = pj.masks_from_scores(scores, 0.5)
    assert pj.sparsity_report(masks, params).prunable_kept == 36
    tx = pj.masked_optimizer(optax.sgd(0.1, momentum=0.9), masks)
    tx.init(pj.apply_masks(params, masks))
    small = {{"iterative_snip": {{"rounds": 2}}, "force": {{"rounds": 2}}, "synflow": {{"rounds": 2}},
             "grasp": {{"samples_per_class": 2}}}}
    for name in pj.methods.names():
        if name in ("drive", "imp"):  # they train: they need a train_fn, which the harness provides
            continue
        result = pj.methods.prune(name, problem, 0.5, **small.get(name, {{}}))
        assert abs(result.achieved_sparsity - 0.5) < 0.05, (name, result.achieved_sparsity)
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in {blocked!r} and sys.modules[m] is not None)
    assert not loaded, loaded
    print("lean core ok")
    """
)


def test_the_core_scores_with_the_harness_dependencies_missing():
    code = SCRIPT.format(blocked=HARNESS_ONLY)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "lean core ok" in out.stdout


def test_install_requires_names_only_the_core_dependencies():
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    required = [line.split(">")[0].split("=")[0].split(";")[0].strip()
                for line in config["options"]["install_requires"].strip().splitlines() if line.strip()]
    assert sorted(required) == ["chex", "jax", "jaxlib", "numpy", "optax"]
    extras = config["options.extras_require"]["experiments"]
    for name in ("flax", "tensorflow-datasets", "orbax-checkpoint", "matplotlib", "scikit-learn", "tqdm"):
        assert name in extras
