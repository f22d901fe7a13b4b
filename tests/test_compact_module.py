"""The compacted model as a flax.linen Module: zoo models narrowed in their own class, other models
wrapped; both equal the channel-masked model in inference, in training (running statistics too) and
after a fine-tuning step."""

from __future__ import annotations

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import prospr_jax as pj
from prospr_jax import models
from prospr_jax._src.tree import named_leaves
from prospr_jax.models.resnet import Bottleneck, ResNet
from prospr_jax.structured import model_channel_groups, param_count
from tests.test_compact import UserNet, _perturbed, _setup


def _masked_setup(model, input_shape, sparsity=0.5, seed=0):
    _, params, state, x, groups, masks = _setup(model, input_shape, sparsity, seed)
    return params, state.get("batch_stats", {}), x, groups, masks


def _variables(params, batch_stats):
    return {"params": params, **({"batch_stats": batch_stats} if batch_stats else {})}


def _assert_close(got, want, rel):
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape
    scale = np.max(np.abs(want))
    assert scale > 1e-3
    np.testing.assert_allclose(got, want, atol=rel * scale)


def _kept_entries(full, mask):
    """The entries of a per-channel leaf that the compact model keeps, read off its mask."""
    mask = np.broadcast_to(np.asarray(mask), np.shape(full))
    return np.asarray(full)[mask != 0]


def _check_module(model, params, batch_stats, x, groups, masks):
    """Inference, training and running-statistics updates of the compact Module equal the masked model's."""
    small_model, small_params, small_stats = models.compact_module(model, params, batch_stats, masks, x[:2],
                                                                   groups=groups)
    masked = pj.apply_masks(params, masks)
    big, small = _variables(masked, batch_stats), _variables(small_params, small_stats)
    run = lambda m, train, mutable=False: jax.jit(  # noqa: E731
        lambda v: m.apply(v, x, train=train, mutable=mutable))
    # float32 with another summation order: ~1e-6 of the output scale; training-mode BatchNorm divides
    # by small batch deviations, so it gets 100x more room.
    _assert_close(run(small_model, False)(small), run(model, False)(big), 1e-5)
    if not batch_stats:
        _assert_close(run(small_model, True)(small), run(model, True)(big), 1e-5)
        return small_model, small_params, small_stats
    got, got_state = run(small_model, True, ["batch_stats"])(small)
    want, want_state = run(model, True, ["batch_stats"])(big)
    _assert_close(got, want, 1e-4)
    # The updated running statistics of the kept channels, located through the BatchNorm scale's mask.
    for (name, new), (_, old) in zip(named_leaves(got_state["batch_stats"]), named_leaves(small_stats)):
        layer = name.rsplit("/", 1)[0]
        full = dict(named_leaves(want_state["batch_stats"]))[name]
        expected = _kept_entries(full, dict(named_leaves(masks))[f"{layer}/scale"])
        if expected.size == 0:  # a layer with every channel pruned keeps its first one, dead
            expected = np.asarray(full)[:1]
        assert new.shape == old.shape == expected.shape, name
        np.testing.assert_allclose(np.asarray(new), expected, rtol=1e-4, atol=1e-4 * np.max(np.abs(expected)))
    return small_model, small_params, small_stats


ZOO = {
    "resnet20": (lambda: models.get("resnet20", 10), (8, 8, 3)),
    "vgg11": (lambda: models.get("vgg11", 10), (16, 16, 3)),
    "resnet18": (lambda: models.get("resnet18", 10, stem="cifar", widths=(8, 16, 16, 32)), (8, 8, 3)),
    "bottleneck_resnet": (lambda: ResNet(num_classes=10, stage_sizes=(1, 2), block_cls=Bottleneck, widths=(4, 8),
                                         stem="cifar"), (8, 8, 3)),
    "lenet5": (lambda: models.get("lenet5", 10), (28, 28, 1)),
}


@pytest.mark.parametrize("name", sorted(ZOO))
def test_a_zoo_model_compacts_into_a_narrower_model_of_its_own_class(name):
    make, input_shape = ZOO[name]
    model = make()
    params, batch_stats, x, groups, masks = _masked_setup(model, input_shape)
    small_model, small_params, small_stats = _check_module(model, params, batch_stats, x, groups, masks)
    assert type(small_model) is type(model)
    # A fresh init of the narrow model has the compact variables' tree and shapes, and fewer parameters.
    fresh_params, fresh_stats = jax.eval_shape(lambda: models.init(small_model, jax.random.key(0), (1, *input_shape)))
    shapes = lambda t: jax.tree_util.tree_map(np.shape, t)  # noqa: E731
    assert shapes(fresh_params) == shapes(small_params) and shapes(fresh_stats) == shapes(small_stats)
    assert param_count(small_params) < 0.8 * param_count(params)
    # Every conv/dense layer keeps as many output channels as its channel mask keeps.
    for leaf, mask in named_leaves(masks):
        if leaf.endswith("kernel") and np.ndim(mask):
            kept = int(np.sum(np.asarray(mask) != 0))
            assert np.shape(dict(named_leaves(small_params))[leaf])[-1] == kept, leaf


def test_vgg11_narrows_to_the_config_of_its_kept_channels():
    model = models.get("vgg11", 10)
    params, batch_stats, x, groups, _ = _masked_setup(model, (16, 16, 3))
    keep = np.ones(groups.num_groups)
    narrow, index = [], 0
    for v in model.config:
        if v == "M":
            narrow.append(v)
            continue
        index += 1
        k = v // 4 + index
        keep[groups.units[("out", f"conv{index}/kernel")][k:]] = 0
        narrow.append(k)
    small_model, _, _ = _check_module(model, params, batch_stats, x, groups, groups.leaf_masks(keep, params))
    assert small_model.config == tuple(narrow)


def test_resnet20_shortcut_places_follow_the_kept_channels():
    model = models.get("resnet20", 10)
    params, batch_stats, x, groups, _ = _masked_setup(model, (8, 8, 3))
    keep = np.ones(groups.num_groups)
    # Stage 2's last residual channel is one only the zero padding feeds: dropping it leaves 31
    # channels, and the 16 incoming channels sit at 8..23 (the paper's centred padding of 16 into
    # 31 would put them at 7..22). It is stage 3's channel 47 too (tied through the next shortcut),
    # where the 31 incoming channels land at 16..46, as centred padding of 31 into 63 puts them.
    keep[groups.units[("out", "layer2_block0/conv2/kernel")][31]] = 0
    # Half of one block's inner channels.
    keep[groups.units[("out", "layer3_block1/conv1/kernel")][::2]] = 0
    small_model, _, _ = _check_module(model, params, batch_stats, x, groups, groups.leaf_masks(keep, params))
    assert small_model.widths == (16, 31, 63)
    assert small_model.skip_positions == (None, tuple(range(8, 24)), None)
    assert small_model.block_widths == (16, 16, 16, 32, 32, 32, 64, 32, 64)
    # What the runner records (through JSON) rebuilds the same narrow model.
    changes = json.loads(json.dumps(models.architecture_changes(model, small_model)))
    assert set(changes) == {"widths", "block_widths", "skip_positions"}
    rebuilt = model.clone(**changes)
    shapes = lambda m: jax.tree_util.tree_map(np.shape, jax.eval_shape(  # noqa: E731
        lambda: m.init(jax.random.key(0), x[:1], train=False)))
    assert shapes(rebuilt) == shapes(small_model)


@pytest.mark.parametrize("positions", [(0, 1, 2, 3, 4), (3, 4, 5, 6, 7), (0, 2, 3, 7, 9), (1, 2, 6, 8, 11)])
def test_option_a_shortcut_puts_the_channels_at_the_given_places(positions):
    x = np.random.default_rng(0).normal(size=(2, 4, 4, 5)).astype(np.float32)
    want = np.zeros((2, 2, 2, 12), np.float32)
    want[..., list(positions)] = x[:, ::2, ::2, :]
    got = models.option_a_shortcut(jnp.asarray(x), 12, 2, positions)
    np.testing.assert_array_equal(np.asarray(got), want)
    with pytest.raises(ValueError, match="increasing channel indices"):
        models.option_a_shortcut(jnp.asarray(x), 12, 2, positions[::-1])


def test_a_compact_resnet20_can_be_pruned_and_compacted_again():
    model = models.get("resnet20", 10)
    params, batch_stats, x, groups, _ = _masked_setup(model, (8, 8, 3))
    keep = np.ones(groups.num_groups)
    keep[groups.units[("out", "layer2_block0/conv2/kernel")][[0, 1]]] = 0  # moves the shortcut's places
    keep[groups.units[("out", "conv_stem/kernel")][[3]]] = 0
    narrow, small_params, small_stats = models.compact_module(model, params, batch_stats,
                                                              groups.leaf_masks(keep, params), x[:2], groups=groups)
    assert narrow.skip_positions == (None, tuple(range(6, 21)), None)  # centred would be 7..21
    # The narrow model is a model like any other: its groups trace, and it compacts again.
    state = {"batch_stats": small_stats}
    again = model_channel_groups(pj.flax_apply_fn(narrow), small_params, state, x[:1])
    keep = np.asarray(jax.random.uniform(jax.random.key(7), (again.num_groups,)) > 0.4, np.float32)
    keep[~again.prunable] = 1
    _check_module(narrow, small_params, small_stats, x, again, again.leaf_masks(keep, small_params))


def test_resnet50_like_models_keep_their_projection_where_the_widths_become_equal():
    # Stage 1 of a bottleneck ResNet projects stem (4) -> 16 channels; keep 4 of the 16 so that the
    # compact block's input and output widths are equal: the projection must stay.
    model = ResNet(num_classes=10, stage_sizes=(1, 1), block_cls=Bottleneck, widths=(4, 8), stem="cifar")
    params, batch_stats, x, groups, _ = _masked_setup(model, (8, 8, 3))
    keep = np.ones(groups.num_groups)
    keep[groups.units[("out", "layer1_block0/conv3/kernel")][4:]] = 0
    small_model, small_params, _ = _check_module(model, params, batch_stats, x, groups,
                                                 groups.leaf_masks(keep, params))
    assert small_model.stem_width == 4 and small_model.block_widths[0] == (4, 4, 4)
    assert "proj_conv" in small_params["layer1_block0"]


def test_fine_tuning_the_compact_model_equals_fine_tuning_the_masked_model():
    model = models.get("resnet20", 10)
    params, batch_stats, x, groups, masks = _masked_setup(model, (8, 8, 3))
    labels = jnp.arange(8) % 10
    small_model, small_params, small_stats = models.compact_module(model, params, batch_stats, masks, x[:2],
                                                                   groups=groups)

    def step(m, p, stats, tx):
        def loss(p):
            logits, _ = m.apply({"params": p, "batch_stats": stats}, x, train=True, mutable=["batch_stats"])
            return pj.cross_entropy(logits, labels)

        updates, _ = tx.update(jax.grad(loss)(p), tx.init(p), p)
        return optax.apply_updates(p, updates)

    big = jax.jit(lambda p: step(model, p, batch_stats, pj.masked_optimizer(optax.sgd(0.5), masks)))(
        pj.apply_masks(params, masks))
    small = jax.jit(lambda p: step(small_model, p, small_stats, optax.sgd(0.5)))(small_params)
    evaluate = lambda m, v: jax.jit(lambda v: m.apply(v, x, train=False))(v)  # noqa: E731
    _assert_close(evaluate(small_model, {"params": small, "batch_stats": small_stats}),
                  evaluate(model, {"params": big, "batch_stats": batch_stats}), 1e-4)


def test_a_users_model_gets_a_traced_compact_module():
    model = UserNet()
    x0 = jnp.zeros((1, 6, 6, 2))
    variables = model.init(jax.random.key(0), x0)
    params, batch_stats = _perturbed(variables["params"], variables["batch_stats"], jax.random.key(1))
    x = jax.random.normal(jax.random.key(2), (8, 6, 6, 2))
    groups = model_channel_groups(pj.flax_apply_fn(model), params, {"batch_stats": batch_stats}, x0)
    keep = np.ones(groups.num_groups)
    for leaf, units in (("stem/kernel", [1, 4]), ("branch_b/kernel", [2]), ("hidden/kernel", [3])):
        keep[groups.units[("out", leaf)][units]] = 0
    masks = groups.leaf_masks(keep, params)
    small_model, small_params, small_stats = _check_module(model, params, batch_stats, x, groups, masks)
    assert isinstance(small_model, models.TracedCompactModule) and isinstance(small_model, nn.Module)
    assert small_params["stem"]["kernel"].shape == (3, 3, 2, 4)
    # Its own init gives the compact tree (zeros: the values come from compact_module).
    fresh = small_model.init(jax.random.key(0), x0)
    assert jax.tree_util.tree_map(np.shape, fresh["params"]) == jax.tree_util.tree_map(np.shape, small_params)


def test_a_layer_that_keeps_no_channel_keeps_one_dead_channel():
    model = models.get("resnet20", 10)
    params, batch_stats, x, groups, _ = _masked_setup(model, (8, 8, 3))
    keep = np.ones(groups.num_groups)
    keep[groups.units[("out", "layer2_block1/conv1/kernel")]] = 0  # the whole inner layer of a block
    keep[groups.units[("out", "layer3_block0/conv1/kernel")][::2]] = 0
    masks = groups.leaf_masks(keep, params)
    small_model, small_params, small_stats = _check_module(model, params, batch_stats, x, groups, masks)
    assert small_model.block_widths == (16, 16, 16, 32, 1, 32, 32, 64, 64)
    block = small_params["layer2_block1"]
    for leaf in (block["conv1"]["kernel"], block["bn1"]["scale"], block["bn1"]["bias"], block["conv2"]["kernel"]):
        assert not np.any(np.asarray(leaf))
    # Fine-tuning leaves the placeholder at zero: no gradient reaches it.
    labels = jnp.arange(8) % 10

    def loss(p):
        logits, _ = small_model.apply({"params": p, "batch_stats": small_stats}, x, train=True, mutable=["batch_stats"])
        return pj.cross_entropy(logits, labels)

    grads = jax.jit(jax.grad(loss))(small_params)["layer2_block1"]
    assert all(not np.any(np.asarray(g)) for g in (grads["conv1"]["kernel"], grads["bn1"]["scale"],
                                                   grads["bn1"]["bias"], grads["conv2"]["kernel"]))


def test_round_to_gives_every_layer_a_multiple_of_channels_with_dead_extras():
    model = models.get("resnet20", 10)
    params, batch_stats, x, groups, masks = _masked_setup(model, (8, 8, 3))
    small_model, small_params, small_stats = models.compact_module(model, params, batch_stats, masks, x[:2],
                                                                   groups=groups, round_to=8)
    for leaf, kernel in named_leaves(small_params):
        if leaf.endswith("kernel") and leaf != "logits/kernel":
            assert kernel.shape[-1] % 8 == 0, (leaf, kernel.shape)
    exact = models.compact_module(model, params, batch_stats, masks, x[:2], groups=groups)[1]
    assert param_count(exact) < param_count(small_params) < param_count(params)
    big = _variables(pj.apply_masks(params, masks), batch_stats)
    small = _variables(small_params, small_stats)
    run = lambda m, v, train: jax.jit(  # noqa: E731
        lambda v: m.apply(v, x, train=train, mutable=["batch_stats"] if train else False))(v)
    _assert_close(run(small_model, small, False), run(model, big, False), 1e-5)
    _assert_close(run(small_model, small, True)[0], run(model, big, True)[0], 1e-4)
    with pytest.raises(ValueError, match="round_to"):
        models.compact_module(model, params, batch_stats, masks, x[:2], groups=groups, round_to=0)


def test_a_model_that_is_not_a_flax_module_is_a_clear_error():
    model = models.get("lenet300_100", 10)
    params, _ = models.init(model, 0, (1, 4, 4, 1))
    masks = jax.tree_util.tree_map(lambda p: jnp.ones(()), params)
    with pytest.raises(TypeError, match="flax.linen Module"):
        models.compact_module(pj.flax_apply_fn(model), params, {}, masks, jnp.ones((1, 4, 4, 1)))
