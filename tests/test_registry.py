"""The method registry: every registered scorer of this package on a tiny flax model with BatchNorm,
plus the registry's errors."""

from __future__ import annotations

import dataclasses
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import prospr_jax as pj
from prospr_jax import methods

CLASSES = 3
INPUT = (4, 4, 2)


class TinyNet(nn.Module):
    @nn.compact
    def __call__(self, x, train):
        x = nn.Conv(4, (3, 3), use_bias=False)(x)
        x = nn.BatchNorm(use_running_average=not train)(x)
        x = nn.relu(x).reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(8)(x))
        return nn.Dense(CLASSES)(x)


def batch_fn(i):
    kx, kp = jax.random.split(jax.random.fold_in(jax.random.key(42), i))
    labels = jax.random.permutation(kp, jnp.arange(12) % CLASSES)
    return {"image": jax.random.normal(kx, (12, *INPUT)), "label": labels}


@pytest.fixture(scope="module")
def problem():
    model = TinyNet()
    variables = jax.jit(lambda k: model.init(k, jnp.ones((1, *INPUT)), train=False))(jax.random.key(0))
    return pj.PruningProblem.from_flax(
        model, variables, batch_fn, input_shape=INPUT, num_classes=CLASSES, key=jax.random.key(7)
    )


def prunable_total(problem):
    return sum(int(np.size(p)) for (_, p), (_, keep) in zip(
        pj.named_leaves(problem.params), pj.named_leaves(problem.prunable_tree())) if keep)


OWN = {
    "prospr": {},
    "snip": {},
    "iterative_snip": {"rounds": 3},
    "force": {"rounds": 3},
    "grasp": {"samples_per_class": 2},
    "synflow": {"rounds": 3},
    "magnitude": {},
    "random": {},
    "lamp": {},
}


@pytest.mark.parametrize("name", sorted(OWN))
def test_registered_method_reaches_sparsity_exactly_and_is_deterministic(problem, name):
    sparsity = 0.8
    result = methods.prune(name, problem, sparsity, **OWN[name])
    masks, again = result.masks, methods.prune(name, problem, sparsity, **OWN[name]).masks
    report = pj.sparsity_report(masks, problem.params)
    assert report.prunable_total == prunable_total(problem)
    assert report.prunable_kept == pj.kept_count(1 - sparsity, report.prunable_total)
    for (_, a), (_, b) in zip(pj.named_leaves(masks), pj.named_leaves(again)):
        np.testing.assert_array_equal(a, b)
    assert result.method == name and result.sparsity == sparsity and result.seconds > 0
    assert result.achieved_sparsity == pytest.approx(report.sparsity)
    # BatchNorm scale/bias and the Dense bias stay unpruned
    assert np.ndim(masks["BatchNorm_0"]["scale"]) == 0 and np.ndim(masks["Dense_1"]["bias"]) == 0


def test_scores_follow_their_definition_through_the_registry(problem):
    mag = methods.score("magnitude", problem)
    np.testing.assert_array_equal(mag["Conv_0"]["kernel"], np.abs(np.asarray(problem.params["Conv_0"]["kernel"])))
    snip = methods.score("snip", problem)
    g = jax.jit(jax.grad(problem.loss_fn))(problem.params, batch_fn(0))
    # float32 gradients from two programs: an entry's rounding is a few ulps of the terms summed over
    # the batch, i.e. relative to the leaf's largest entries, not to the entry (which may cancel to
    # ~0). Hence atol = 1e-5 x the leaf's scale; a wrong gradient differs at the scale itself.
    want = np.abs(np.asarray(problem.params["Dense_1"]["kernel"] * g["Dense_1"]["kernel"]))
    np.testing.assert_allclose(snip["Dense_1"]["kernel"], want, rtol=1e-5, atol=1e-5 * want.max())
    prospr0 = methods.score("prospr", problem, num_steps=0)
    want = np.asarray(snip["Dense_0"]["kernel"])
    np.testing.assert_allclose(prospr0["Dense_0"]["kernel"], want, rtol=1e-6, atol=1e-5 * want.max())


def test_random_erk_keeps_erk_counts_per_layer(problem):
    masks = methods.prune("random", problem, 0.9, density_rule="erk").masks
    dens = methods.erk_densities(problem.params, problem.prunable_tree(), 0.9)
    report = pj.sparsity_report(masks, problem.params)
    for layer in report.layers:
        assert layer.kept == pj.kept_count(dens[layer.name], layer.total)
    assert report.prunable_kept == pj.kept_count(0.1, report.prunable_total)
    lamp = methods.prune("magnitude", problem, 0.9, density_rule="lamp").masks
    direct = methods.prune("lamp", problem, 0.9).masks
    for (_, a), (_, b) in zip(pj.named_leaves(lamp), pj.named_leaves(direct)):
        np.testing.assert_array_equal(a, b)


def test_layerwise_scope_and_min_per_layer(problem):
    masks = methods.prune("snip", problem, 0.7, scope="layerwise").masks
    for layer in pj.sparsity_report(masks, problem.params).layers:
        assert layer.kept == pj.kept_count(0.3, layer.total)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", pj.LayerCollapseWarning)
        result = methods.prune("synflow", problem, 0.99, rounds=2, min_per_layer=1)
    assert all(layer.kept >= 1 for layer in pj.sparsity_report(result.masks, problem.params).layers)
    assert result.empty_layers == ()


def test_functional_cores_compile_under_jit(problem):
    params, batch = problem.params, batch_fn(0)
    loss_fn = problem.loss_fn
    cores = {
        "grasp": lambda p: methods.grasp_scores(loss_fn, p, batch, single_batch=True),
        "synflow": lambda p: methods.synflow_scores(problem.apply_fn, p, problem.model_state, INPUT, precision="rescale"),
        "magnitude": lambda p: methods.magnitude_scores(p),
        "random": lambda p: methods.random_scores(jax.random.key(3), p),
        "lamp": lambda p: methods.lamp_scores(methods.magnitude_scores(p)),
        "snip": lambda p: methods.snip_scores(loss_fn, p, batch),
        "force_round": lambda p: methods.masked_gradient_scores(
            loss_fn, p, pj.dense_masks(p), pj.stack_batches([batch]), revive=True),
    }
    for name, core in cores.items():
        eager = core(params)
        jitted = jax.jit(core)(params)
        for (_, a), (_, b) in zip(pj.named_leaves(eager), pj.named_leaves(jitted)):
            # Two float32 programs: rounding relative to each leaf's scale (see above).
            scale = float(np.max(np.abs(np.asarray(a)), initial=0.0))
            np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-5 * scale, err_msg=name)


def test_names_get_and_table():
    assert set(OWN) | {"lap", "lap_forward", "lap_backward", "drive", "imp", "set", "rigl"} == set(methods.names())
    with pytest.raises(ValueError, match="known methods: .*prospr.*synflow"):
        methods.get("snipp")
    rows = methods.table()
    assert [r["name"] for r in rows] == list(methods.names())
    for row in rows:
        assert all(row[k] for k in ("paper", "idea", "data", "cost", "kind"))
        assert row["kind"] == methods.get(row["name"]).kind
    text = methods.markdown_table()
    assert text.count("\n") == len(rows) + 1 and "`grasp`" in text


def test_errors(problem):
    no_data = problem.replace(batch_fn=None)
    for name in ("snip", "prospr", "grasp", "iterative_snip", "force"):
        with pytest.raises(ValueError, match=f"{name}.*batch_fn"):
            methods.prune(name, no_data, 0.5)
    methods.prune("synflow", no_data, 0.5, rounds=1)  # data-free methods do not need it
    methods.prune("magnitude", no_data, 0.5)
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="sparsity"):
            methods.prune("magnitude", problem, bad)
    with pytest.raises(ValueError, match="kind 'masks'"):
        methods.score("synflow", problem)
    with pytest.raises(ValueError, match="no option"):
        methods.prune("snip", problem, 0.5, num_steps=3)
    with pytest.raises(ValueError, match="density_rule"):
        methods.prune("magnitude", problem, 0.5, density_rule="uniform")
    with pytest.raises(ValueError, match="scope"):
        methods.prune("magnitude", problem, 0.5, density_rule="erk", scope="layerwise")
    with pytest.raises(ValueError, match="scope"):
        methods.prune("magnitude", problem, 0.5, scope="per-layer")
    with pytest.raises(ValueError, match="synflow.*apply_fn"):
        methods.prune("synflow", problem.replace(apply_fn=None), 0.5)
    with pytest.raises(ValueError, match="PRNG key"):
        methods.prune("random", problem.replace(key=None), 0.5)
    with pytest.raises(ValueError, match="num_classes"):
        methods.prune("grasp", problem.replace(num_classes=None), 0.5)
    with pytest.raises(TypeError, match="PruningProblem"):
        methods.prune("magnitude", problem.params, 0.5)
    with pytest.raises(ValueError, match="prunable"):
        methods.prune("force", problem, 0.5, prunable=None)


class GradientNorm(methods.Method):
    """A user's method: |dL/dtheta| on ``batches`` batches, declared like the built-in ones."""

    name = "test_gradnorm"
    paper = "baseline"
    idea = "|dL/dtheta| on one batch"
    data = "1 batch"
    cost = "1 forward/backward pass"
    needs = ("batch_fn",)

    @dataclasses.dataclass(frozen=True)
    class Options:
        batch_index: int = 0

    def score(self, problem, options):
        g = jax.grad(problem.loss_fn)(problem.params, problem.batch(options.batch_index))
        return pj.scores_on_prunable(jax.tree_util.tree_map(jnp.abs, g), problem.prunable_tree())


@pytest.fixture
def user_method():
    methods.register(GradientNorm)
    yield GradientNorm.name
    methods.unregister(GradientNorm.name)


def test_a_user_method_registers_and_runs_by_name(problem, user_method):
    assert user_method in methods.names() and methods.get(user_method).kind == "scores"
    result = methods.prune(user_method, problem, 0.75, batch_index=1)
    g = jax.grad(problem.loss_fn)(problem.params, batch_fn(1))
    expected = pj.masks_from_scores(
        pj.scores_on_prunable(jax.tree_util.tree_map(jnp.abs, g), problem.prunable_tree()), 0.75
    )
    for (_, a), (_, b) in zip(pj.named_leaves(result.masks), pj.named_leaves(expected)):
        np.testing.assert_array_equal(a, b)
    assert result.options == {"batch_index": 1} and result.method == user_method
    with pytest.raises(ValueError, match=r"no option\(s\) \['batch'\]; its options: batch_index=0"):
        methods.prune(user_method, problem, 0.75, batch=1)
    with pytest.raises(ValueError, match="already registered"):
        methods.register(GradientNorm)
    with pytest.raises(ValueError, match="needs the PruningProblem field.*batch_fn"):
        methods.prune(user_method, problem.replace(batch_fn=None), 0.5)


def test_register_checks_the_declaration():
    class NoOverride(methods.Method):
        name, paper, idea, data, cost = "test_nothing", "-", "-", "-", "-"

    with pytest.raises(TypeError, match="exactly one of `score`"):
        methods.register(NoOverride)

    class BadName(GradientNorm):
        name = "Bad Name"

    with pytest.raises(ValueError, match="name"):
        methods.register(BadName)

    class BadNeeds(GradientNorm):
        name, needs = "test_bad_needs", ("dataset",)

    with pytest.raises(ValueError, match="unknown problem fields"):
        methods.register(BadNeeds)
    assert "test_nothing" not in methods.names() and "test_bad_needs" not in methods.names()
