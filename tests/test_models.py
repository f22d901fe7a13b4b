"""Tests of the model zoo: shapes, parameter counts, BatchNorm modes, shortcuts, init, losses."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from prospr_jax import models
from prospr_jax.models import resnet_cifar
from prospr_jax.models.resnet import Bottleneck, ResNet
from prospr_jax.models.vgg import VGG

ALL_NAMES = (
    "resnet20", "resnet32", "resnet56", "vgg11", "vgg13", "vgg16", "vgg19",
    "resnet18", "resnet34", "resnet50", "lenet300_100", "lenet5",
)

# Smallest convenient input for each model (batch axis excluded).
SMALL_INPUT = {
    "resnet20": (8, 8, 3), "resnet32": (8, 8, 3), "resnet56": (8, 8, 3),
    "vgg11": (16, 16, 3), "vgg13": (16, 16, 3), "vgg16": (16, 16, 3), "vgg19": (16, 16, 3),
    "resnet18": (32, 32, 3), "resnet34": (32, 32, 3), "resnet50": (32, 32, 3),
    "lenet300_100": (28, 28, 1), "lenet5": (28, 28, 1),
}
HAS_BATCH_NORM = {name: not name.startswith("lenet") for name in ALL_NAMES}


def _count(tree) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(tree))


def _abstract_params(model, input_shape):
    params, _ = jax.eval_shape(lambda: models.init(model, 0, input_shape))
    return params


def _fresh_containers(tree):
    """A copy of the dicts of a cached pytree, in their insertion order (the arrays are immutable):
    a test that edits its params in place cannot change what the next test gets from the cache."""
    if type(tree) is dict:
        return {key: _fresh_containers(value) for key, value in tree.items()}
    return tree


@functools.lru_cache(maxsize=None)
def _initialised_cached(name: str):
    model = models.get(name, 7)
    params, batch_stats = models.init(model, jax.random.PRNGKey(0), (1,) + SMALL_INPUT[name])
    return model, params, batch_stats


def _initialised(name: str):
    model, params, batch_stats = _initialised_cached(name)
    return model, _fresh_containers(params), _fresh_containers(batch_stats)


# Reduced configurations of the real model classes keep the (compile-bound) tests cheap.
# Kernel shapes shared with ResNet-20 where possible: each new shape costs a compilation.
_SMALL_MODELS = {
    "resnet_basic": (ResNet(num_classes=7, stage_sizes=(1, 1, 1), widths=(16, 32, 64), stem="cifar"),
                     (1, 8, 8, 3)),
    "vgg": (VGG(num_classes=7, config=(16, "M", 32)), (1, 8, 8, 3)),
}


@functools.lru_cache(maxsize=None)
def _small_initialised_cached(kind: str):
    model, input_shape = _SMALL_MODELS[kind]
    return models.init(model, jax.random.PRNGKey(0), input_shape)


def _small_initialised(kind: str):
    return tuple(_fresh_containers(tree) for tree in _small_initialised_cached(kind))


def _kernel_paths_in_insertion_order(tree, prefix=()):
    """Paths of the 'kernel' leaves, walking the dicts in insertion order (not sorted)."""
    out = []
    for key, value in tree.items():
        if isinstance(value, dict):
            out += _kernel_paths_in_insertion_order(value, prefix + (key,))
        elif key == "kernel":
            out.append(prefix)
    return out


def _get_path(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def _np_conv(x, kernel, stride, pad):
    """Reference NHWC/HWIO convolution with symmetric zero padding, in float64."""
    x = np.pad(np.asarray(x, np.float64), ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    kernel = np.asarray(kernel, np.float64)
    kh, kw = kernel.shape[:2]
    out_h = (x.shape[1] - kh) // stride + 1
    out_w = (x.shape[2] - kw) // stride + 1
    out = np.zeros((x.shape[0], out_h, out_w, kernel.shape[3]))
    for i in range(kh):
        for j in range(kw):
            patch = x[:, i:i + stride * out_h:stride, j:j + stride * out_w:stride, :]
            out += patch @ kernel[i, j]
    return out


def _np_cross_entropy(logits, labels):
    logits = np.asarray(logits, np.float64)
    top = logits.max(axis=1, keepdims=True)
    log_z = top[:, 0] + np.log(np.exp(logits - top).sum(axis=1))
    return float(np.mean(log_z - logits[np.arange(len(labels)), labels]))


def _np_option_a(x, out_channels):
    x = np.asarray(x)
    sub = x[:, ::2, ::2, :]
    out = np.zeros(sub.shape[:3] + (out_channels,), x.dtype)
    before = (out_channels - x.shape[-1]) // 2
    out[..., before:before + x.shape[-1]] = sub
    return out


# ----------------------------------------------------------------------------- registry


def test_names_lists_every_model_in_order():
    assert models.names() == ALL_NAMES


def test_unknown_name_raises_listing_known_names():
    with pytest.raises(ValueError, match="resnet20.*lenet5"):
        models.get("resnet99", 10)


@pytest.mark.parametrize("bad", [0, -3])
def test_num_classes_below_one_raises(bad):
    with pytest.raises(ValueError, match="num_classes"):
        models.get("resnet20", bad)


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(TypeError, match="num_classes"):
        models.get("vgg16", 10.0)
    with pytest.raises(TypeError, match="name"):
        models.get(20, 10)
    with pytest.raises(ValueError, match="stem"):
        models.get("resnet18", 10, stem="tiny")
    with pytest.raises(TypeError, match="resnet20"):
        models.get("resnet20", 10, no_such_attribute=1)
    with pytest.raises(ValueError, match="input_shape"):
        models.init(models.get("lenet5", 10), 0, (28,))
    with pytest.raises(ValueError, match="input_shape"):
        models.init(models.get("lenet5", 10), 0, (1, 28, 0, 1))
    with pytest.raises(TypeError, match="train"):
        models.make_loss_fn(models.get("lenet5", 10), {}, train="yes")


# ----------------------------------------------------------------------------- counts


def _cifar_resnet_count(n, num_classes, widths=(16, 32, 64)):
    total = 3 * 3 * 3 * widths[0] + 2 * widths[0]  # stem conv + BN
    in_ch = widths[0]
    for w in widths:
        total += 9 * in_ch * w + 2 * w + (n - 1) * 2 * (9 * w * w + 2 * w) + 9 * w * w + 2 * w
        in_ch = w
    return total + in_ch * num_classes + num_classes


def test_resnet20_has_269722_parameters():
    params = _abstract_params(models.get("resnet20", 10), (1, 32, 32, 3))
    assert _count(params) == 269_722


@pytest.mark.parametrize("name,n", [("resnet20", 3), ("resnet32", 5), ("resnet56", 9)])
@pytest.mark.parametrize("num_classes", [10, 100])
def test_cifar_resnet_counts_match_formula(name, n, num_classes):
    params = _abstract_params(models.get(name, num_classes), (1, 32, 32, 3))
    assert _count(params) == _cifar_resnet_count(n, num_classes)
    # Option A: no shortcut parameters anywhere.
    assert not any("proj" in str(path) for path, _ in jax.tree_util.tree_leaves_with_path(params))


VGG_LAYOUTS = {  # Written out here, independently of the module.
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512],
    "vgg13": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512],
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
              512, 512, 512, 512, "M", 512, 512, 512, 512],
}


def _vgg_count(layout, num_classes, conv_bias):
    total, in_ch = 0, 3
    for v in layout:
        if v == "M":
            continue
        total += 9 * in_ch * v + (v if conv_bias else 0) + 2 * v  # kernel (+ bias) + BN scale/bias
        in_ch = v
    return total + in_ch * num_classes + num_classes


@pytest.mark.parametrize("name", sorted(VGG_LAYOUTS))
@pytest.mark.parametrize("num_classes,conv_bias", [(10, True), (100, True), (100, False)])
def test_vgg_counts_match_formula(name, num_classes, conv_bias):
    model = models.get(name, num_classes, use_conv_bias=conv_bias)
    params = _abstract_params(model, (1, 32, 32, 3))
    assert _count(params) == _vgg_count(VGG_LAYOUTS[name], num_classes, conv_bias)


def test_vgg16_cifar100_count_by_hand():
    # 13 convs: 14,714,688 kernel+bias, 8,448 BN; head 512*100 + 100.
    params = _abstract_params(models.get("vgg16", 100), (1, 32, 32, 3))
    assert _count(params) == 14_714_688 + 8_448 + 51_300


@pytest.mark.parametrize(
    "name,kwargs,num_classes,input_shape,expected",
    [
        ("resnet18", {}, 1000, (1, 224, 224, 3), 11_689_512),
        ("resnet34", {}, 1000, (1, 224, 224, 3), 21_797_672),
        ("resnet50", {}, 1000, (1, 224, 224, 3), 25_557_032),
        ("resnet18", {"stem": "cifar"}, 10, (1, 32, 32, 3), 11_173_962),
        ("lenet300_100", {}, 10, (1, 28, 28, 1), 266_610),
        ("lenet300_100", {}, 10, (1, 784), 266_610),
        ("lenet5", {}, 10, (1, 28, 28, 1), 431_080),
    ],
)
def test_published_parameter_counts(name, kwargs, num_classes, input_shape, expected):
    params = _abstract_params(models.get(name, num_classes, **kwargs), input_shape)
    assert _count(params) == expected


def test_lenet5_count_by_layer():
    params = _abstract_params(models.get("lenet5", 10), (1, 28, 28, 1))
    sizes = {k: _count(v) for k, v in params.items()}
    assert sizes == {
        "conv1": 5 * 5 * 1 * 20 + 20,
        "conv2": 5 * 5 * 20 * 50 + 50,
        "fc1": 4 * 4 * 50 * 500 + 500,
        "logits": 500 * 10 + 10,
    }


def test_bottleneck_shapes_and_projection():
    params = _abstract_params(models.get("resnet50", 1000), (1, 64, 64, 3))
    block = params["layer2_block0"]
    assert block["conv1"]["kernel"].shape == (1, 1, 256, 128)
    assert block["conv2"]["kernel"].shape == (3, 3, 128, 128)
    assert block["conv3"]["kernel"].shape == (1, 1, 128, 512)
    assert block["proj_conv"]["kernel"].shape == (1, 1, 256, 512)
    assert "proj_conv" not in params["layer2_block1"]
    assert params["conv_stem"]["kernel"].shape == (7, 7, 3, 64)
    assert "bias" not in params["conv_stem"]
    assert params["logits"]["kernel"].shape == (2048, 1000)


# ----------------------------------------------------------------------------- forward


def _conv_dense_call_order(model, input_shape):
    """Paths of the Conv/Dense modules in the order they are called (= created) during init."""
    calls = []

    def record(next_fun, args, kwargs, context):
        if context.method_name == "__call__" and isinstance(context.module, (nn.Conv, nn.Dense)):
            calls.append(tuple(context.module.path))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        jax.eval_shape(lambda: models.init(model, 0, input_shape))
    return calls


@pytest.mark.parametrize("name", ALL_NAMES)
def test_output_shape_and_layer_order(name):
    model = models.get(name, 7)
    input_shape = (2,) + SMALL_INPUT[name]
    params, batch_stats = jax.eval_shape(lambda: models.init(model, 0, input_shape))
    assert bool(batch_stats) == HAS_BATCH_NORM[name]
    x = jax.ShapeDtypeStruct(input_shape, jnp.float32)
    for train in (True, False):
        logits = jax.eval_shape(
            lambda p, s, x: models.make_logits_fn(model, s, train=train)(p, x), params, batch_stats, x)
        assert logits.shape == (2, 7) and logits.dtype == jnp.float32

    # Creation order: the stem conv first, the classifier last, every kernel exactly once.
    order = _conv_dense_call_order(model, input_shape)
    first = _get_path(params, order[0])["kernel"]
    if name == "lenet300_100":
        assert order[0] == ("fc1",) and first.shape == (int(np.prod(SMALL_INPUT[name])), 300)
    else:
        assert order[0] == ("conv_stem",) or order[0] in {("conv1",), ("conv01",)}
        assert len(first.shape) == 4 and first.shape[2] == SMALL_INPUT[name][-1]
    assert order[-1] == ("logits",)
    assert _get_path(params, order[-1])["kernel"].shape[-1] == 7
    # jax's flattening (sorted keys) lists the kernels in the same forward order.
    flat = [tuple(k.key for k in path[:-1])
            for path, _ in jax.tree_util.tree_leaves_with_path(params) if path[-1].key == "kernel"]
    assert flat == order


@pytest.mark.parametrize("name", ["resnet20", "lenet300_100", "lenet5"])
def test_init_dict_lists_layers_in_forward_order(name):
    model, params, _ = _initialised(name)
    assert _kernel_paths_in_insertion_order(params) == _conv_dense_call_order(
        model, (1,) + SMALL_INPUT[name])


def test_every_conv_and_dense_is_listed_in_forward_order_resnet20():
    _, params, _ = _initialised("resnet20")
    expected = [("conv_stem",)]
    for stage in (1, 2, 3):
        for block in range(3):
            expected += [(f"layer{stage}_block{block}", "conv1"), (f"layer{stage}_block{block}", "conv2")]
    assert _kernel_paths_in_insertion_order(params) == expected + [("logits",)]


@pytest.mark.parametrize("kind", ["resnet_basic", "vgg"])
def test_small_variants_run_in_both_modes(kind):
    model, input_shape = _SMALL_MODELS[kind]
    params, batch_stats = _small_initialised(kind)
    x = 1.0 + jax.random.normal(jax.random.PRNGKey(1), (3,) + input_shape[1:])
    variables = {"params": params, "batch_stats": batch_stats}
    train_out, update = model.apply(variables, x, train=True, mutable=["batch_stats"])
    eval_out = model.apply(variables, x, train=False)
    assert train_out.shape == eval_out.shape == (3, 7)
    assert np.all(np.isfinite(np.asarray(train_out))) and np.all(np.isfinite(np.asarray(eval_out)))
    assert jax.tree_util.tree_structure(update["batch_stats"]) == jax.tree_util.tree_structure(batch_stats)
    assert not np.allclose(train_out, eval_out, atol=1e-3)


def test_batch_norm_train_and_eval_modes():
    model, params, batch_stats = _initialised("resnet20")
    x = 3.0 + 2.0 * jax.random.normal(jax.random.PRNGKey(2), (4, 8, 8, 3))  # Not standardised.
    variables = {"params": params, "batch_stats": batch_stats}

    train_out, train_update = model.apply(variables, x, train=True, mutable=["batch_stats"])
    eval_out, eval_update = model.apply(variables, x, train=False, mutable=["batch_stats"])

    changed = jax.tree_util.tree_map(lambda a, b: bool(np.any(np.asarray(a) != np.asarray(b))),
                                     batch_stats, train_update["batch_stats"])
    assert all(jax.tree_util.tree_leaves(changed))
    unchanged = jax.tree_util.tree_map(np.array_equal, batch_stats, eval_update.get("batch_stats", batch_stats))
    assert all(jax.tree_util.tree_leaves(unchanged))
    assert not np.allclose(train_out, eval_out, atol=1e-3)

    # PyTorch momentum 0.1: new running mean = 0.9 * 0 + 0.1 * batch mean of the stem conv output,
    # the conv being a 3x3, padding 1 convolution (checked here against numpy).
    stem = _np_conv(x, params["conv_stem"]["kernel"], stride=1, pad=1)
    np.testing.assert_allclose(train_update["batch_stats"]["bn_stem"]["mean"],
                               0.1 * stem.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-5)

    # Train mode ignores the running statistics; eval mode uses them.
    shifted = jax.tree_util.tree_map(lambda s: s + 0.5, batch_stats)
    train_out2, _ = model.apply({"params": params, "batch_stats": shifted}, x, train=True,
                                mutable=["batch_stats"])
    np.testing.assert_allclose(train_out2, train_out, rtol=1e-5, atol=1e-5)
    eval_out2 = model.apply({"params": params, "batch_stats": shifted}, x, train=False)
    assert not np.allclose(eval_out2, eval_out, atol=1e-4)


def test_models_without_batch_norm_ignore_train():
    model, params, batch_stats = _initialised("lenet5")
    assert batch_stats == {}
    x = jax.random.normal(jax.random.PRNGKey(3), (2, 28, 28, 1))
    np.testing.assert_array_equal(model.apply({"params": params}, x, train=True),
                                  model.apply({"params": params}, x, train=False))


def test_lenet300_flattens_any_input_shape():
    model, params, _ = _initialised("lenet300_100")
    x = jax.random.normal(jax.random.PRNGKey(4), (3, 28, 28, 1))
    flat = np.asarray(model.apply({"params": params}, x.reshape(3, 784), train=False))
    # Two programs (input shapes differ): a logit's rounding is a few ulps of the 784- and 300-term
    # sums behind it, so relative to the logits' scale, not to a logit near 0.
    np.testing.assert_allclose(model.apply({"params": params}, x, train=False), flat,
                               rtol=1e-6, atol=1e-6 * np.abs(flat).max())


@pytest.mark.parametrize("stem,size,expected_final", [("imagenet", 64, 2), ("cifar", 32, 4)])
def test_resnet_stems_set_the_feature_map_size(stem, size, expected_final):
    model = models.get("resnet18", 5, stem=stem)
    params, batch_stats = jax.eval_shape(lambda: models.init(model, 0, (1, size, size, 3)))

    def intermediates(params, batch_stats, x):
        _, state = model.apply({"params": params, "batch_stats": batch_stats}, x, train=False,
                               capture_intermediates=True, mutable=["intermediates"])
        return state["intermediates"]

    inter = jax.eval_shape(intermediates, params, batch_stats,
                           jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))
    stem_size = size // 2 if stem == "imagenet" else size  # 7x7 stride 2 conv, or 3x3 stride 1.
    after_pool = size // 4 if stem == "imagenet" else size  # 3x3 stride 2 max-pool, or none.
    assert inter["conv_stem"]["__call__"][0].shape == (1, stem_size, stem_size, 64)
    assert inter["layer1_block0"]["__call__"][0].shape == (1, after_pool, after_pool, 64)
    assert inter["layer4_block1"]["__call__"][0].shape == (1, expected_final, expected_final, 512)


def test_dtype_attribute_sets_computation_not_params():
    model = models.get("resnet20", 10, dtype=jnp.bfloat16)
    params, batch_stats = jax.eval_shape(lambda: models.init(model, 0, (1, 8, 8, 3)))
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(params)} == {jnp.dtype(jnp.float32)}
    out = jax.eval_shape(lambda p, s, x: models.make_logits_fn(model, s, train=False)(p, x),
                         params, batch_stats, jax.ShapeDtypeStruct((2, 8, 8, 3), jnp.float32))
    assert out.dtype == jnp.bfloat16


# ----------------------------------------------------------------------------- option A


@pytest.mark.parametrize("in_ch,out_ch", [(16, 32), (3, 8)])
def test_option_a_shortcut_matches_numpy(in_ch, out_ch):
    x = np.random.default_rng(0).normal(size=(2, 6, 5, in_ch)).astype(np.float32)
    got = resnet_cifar.option_a_shortcut(jnp.asarray(x), out_ch, 2)
    assert got.shape == (2, 3, 3, out_ch)
    np.testing.assert_array_equal(got, _np_option_a(x, out_ch))


def test_option_a_shortcut_rejects_fewer_channels():
    with pytest.raises(ValueError, match="out_channels"):
        resnet_cifar.option_a_shortcut(jnp.ones((1, 4, 4, 8)), 4, 2)


def test_downsampling_block_uses_option_a_and_pytorch_stride_positions():
    block = resnet_cifar.BasicBlockA(32, stride=2)
    x = np.random.default_rng(1).normal(size=(2, 8, 8, 16)).astype(np.float32)
    variables = block.init(jax.random.PRNGKey(0), jnp.asarray(x), train=False)
    params = jax.tree_util.tree_map(np.asarray, variables["params"])
    assert set(params) == {"conv1", "bn1", "conv2", "bn2"}  # No shortcut parameters.

    # conv1: 3x3, stride 2, padding 1, sampling positions 0, 2, 4, ... (as PyTorch).
    _, state = block.apply(variables, jnp.asarray(x), train=False, capture_intermediates=True,
                           mutable=["intermediates"])
    conv1_out = state["intermediates"]["conv1"]["__call__"][0]
    np.testing.assert_allclose(conv1_out, _np_conv(x, params["conv1"]["kernel"], 2, 1),
                               rtol=1e-4, atol=1e-4)

    # With the residual branch silenced (bn2 scale = bias = 0) the block is relu(shortcut(x)).
    params["bn2"]["scale"] = np.zeros_like(params["bn2"]["scale"])
    params["bn2"]["bias"] = np.zeros_like(params["bn2"]["bias"])
    out = block.apply({"params": params, "batch_stats": variables["batch_stats"]}, jnp.asarray(x),
                      train=False)
    np.testing.assert_allclose(out, np.maximum(_np_option_a(x, 32), 0.0), atol=1e-6)


def test_identity_block_adds_its_input():
    block = resnet_cifar.BasicBlockA(16, stride=1)
    x = np.random.default_rng(2).normal(size=(1, 4, 4, 16)).astype(np.float32)
    variables = block.init(jax.random.PRNGKey(0), jnp.asarray(x), train=False)
    params = jax.tree_util.tree_map(np.zeros_like, variables["params"])
    out = block.apply({"params": params, "batch_stats": variables["batch_stats"]}, jnp.asarray(x),
                      train=False)
    np.testing.assert_allclose(out, np.maximum(x, 0.0), atol=1e-6)


# ----------------------------------------------------------------------------- init


@pytest.mark.parametrize(
    "kind,path,fan",
    [
        ("resnet20", ("layer3_block1", "conv2"), 9 * 64),        # fan_in
        ("resnet20", ("logits",), 64),                           # fan_in
        ("resnet_basic", ("layer3_block0", "conv1"), 9 * 64),    # fan_out (fan_in would be 288)
        ("resnet_basic", ("logits",), 64),                       # fan_in
        ("vgg", ("conv2",), 9 * 32),                             # fan_out (fan_in would be 144)
        ("lenet300_100", ("fc1",), 784),                         # fan_in
        ("lenet5", ("fc1",), 800),                               # fan_in
    ],
)
def test_kaiming_normal_init(kind, path, fan):
    params = _initialised(kind)[1] if kind in ALL_NAMES else _small_initialised(kind)[0]
    kernel = np.asarray(_get_path(params, path)["kernel"], np.float64)
    std = np.sqrt(2.0 / fan)
    tolerance = 5.0 / np.sqrt(2.0 * kernel.size)  # ~5 standard errors of a sample std.
    assert abs(kernel.mean()) < 5.0 * std / np.sqrt(kernel.size)
    assert abs(kernel.std() / std - 1.0) < tolerance
    if kernel.size > 20_000:  # Untruncated normal: beyond 2.5 std occurs (~1.2% of samples).
        assert np.mean(np.abs(kernel) > 2.5 * std) > 0.008


@pytest.mark.parametrize("kind", ["resnet20", "resnet_basic", "vgg", "lenet5"])
def test_biases_zero_and_batch_norm_identity_at_init(kind):
    if kind in ALL_NAMES:
        _, params, batch_stats = _initialised(kind)
    else:
        params, batch_stats = _small_initialised(kind)
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        key, parent = path[-1].key, path[-2].key
        if key == "bias":
            assert not np.any(np.asarray(leaf)), path
        elif key == "scale":
            assert np.all(np.asarray(leaf) == 1.0), path
            assert parent.startswith(("bn", "proj_bn")), path
    for path, leaf in jax.tree_util.tree_leaves_with_path(batch_stats):
        expected = 0.0 if path[-1].key == "mean" else 1.0
        assert np.all(np.asarray(leaf) == expected), path


def test_init_is_deterministic_and_accepts_int_seed():
    model = models.get("lenet300_100", 7)
    a, _ = models.init(model, 3, (1, 784))
    b, _ = models.init(model, jax.random.PRNGKey(3), (5, 28, 28, 1))
    c, _ = models.init(model, 4, (1, 784))
    jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)
    assert not np.array_equal(a["fc1"]["kernel"], c["fc1"]["kernel"])


# ----------------------------------------------------------------------------- losses


def _batch(shape, num_classes, seed, n=4):
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    return {
        "image": 1.0 + 2.0 * jax.random.normal(k1, (n,) + shape),
        "label": jax.random.randint(k2, (n,), 0, num_classes),
    }


def test_loss_matches_numpy_for_lenet300():
    _, params, batch_stats = _initialised("lenet300_100")
    batch = _batch((28, 28, 1), 7, seed=5)
    p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
    h = np.asarray(batch["image"], np.float64).reshape(4, -1)
    h = np.maximum(h @ p["fc1"]["kernel"] + p["fc1"]["bias"], 0)
    h = np.maximum(h @ p["fc2"]["kernel"] + p["fc2"]["bias"], 0)
    logits = h @ p["logits"]["kernel"] + p["logits"]["bias"]
    expected = _np_cross_entropy(logits, np.asarray(batch["label"]))
    model = models.get("lenet300_100", 7)
    for train in (True, False):
        loss = models.make_loss_fn(model, batch_stats, train=train)(params, batch)
        assert loss.shape == ()
        np.testing.assert_allclose(float(loss), expected, rtol=1e-5)


def test_loss_uses_batch_statistics_in_train_mode():
    model, params, batch_stats = _initialised("resnet20")
    batch = _batch((8, 8, 3), 7, seed=6)
    variables = {"params": params, "batch_stats": batch_stats}
    train_logits, _ = model.apply(variables, batch["image"], train=True, mutable=["batch_stats"])
    eval_logits = model.apply(variables, batch["image"], train=False)
    labels = np.asarray(batch["label"])

    train_loss = models.make_loss_fn(model, batch_stats)(params, batch)
    eval_loss = models.make_loss_fn(model, batch_stats, train=False)(params, batch)
    np.testing.assert_allclose(float(train_loss), _np_cross_entropy(train_logits, labels), rtol=1e-5)
    np.testing.assert_allclose(float(eval_loss), _np_cross_entropy(eval_logits, labels), rtol=1e-5)
    assert abs(float(train_loss) - float(eval_loss)) > 1e-3

    logits_fn = models.make_logits_fn(model, batch_stats, train=True)
    np.testing.assert_allclose(logits_fn(params, batch["image"]), train_logits, rtol=1e-5, atol=1e-6)

    grads = jax.jit(jax.grad(models.make_loss_fn(model, batch_stats)))(params, batch)
    assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(params)
    assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree_util.tree_leaves(grads))
    assert np.any(np.asarray(grads["conv_stem"]["kernel"]) != 0)


def test_loss_rejects_malformed_batches():
    model, params, batch_stats = _initialised("lenet5")
    loss_fn = models.make_loss_fn(model, batch_stats)
    good = _batch((28, 28, 1), 7, seed=7)
    with pytest.raises(ValueError, match="label"):
        loss_fn(params, {"image": good["image"]})
    with pytest.raises(ValueError, match="image"):
        loss_fn(params, {"label": good["label"]})
    with pytest.raises(ValueError, match="examples"):
        loss_fn(params, {"image": good["image"], "label": good["label"][:3]})
    with pytest.raises(ValueError, match=r"shape \[N\]"):
        loss_fn(params, {"image": good["image"], "label": good["label"][:, None]})
    with pytest.raises(TypeError, match="integers"):
        loss_fn(params, {"image": good["image"], "label": good["label"].astype(jnp.float32)})
    with pytest.raises(TypeError, match="floating"):
        loss_fn(params, {"image": good["image"].astype(jnp.uint8), "label": good["label"]})
    with pytest.raises(ValueError, match=r"\[0, 7\)"):
        loss_fn(params, {"image": good["image"], "label": good["label"].at[0].set(7)})
    with pytest.raises(TypeError, match="mapping"):
        loss_fn(params, (good["image"], good["label"]))
