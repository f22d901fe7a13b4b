"""ResNet-18/34 (basic blocks) and ResNet-50 (bottlenecks) of He et al. (CVPR 2016).

Layout; module names in brackets:

    stem='imagenet': [conv_stem] 7x7 stride 2, 64 -> [bn_stem] -> relu -> 3x3 max-pool stride 2
    stem='cifar':    [conv_stem] 3x3 stride 1, 64 -> [bn_stem] -> relu   (no max-pool; for small
                     inputs such as CIFAR 32x32 or Tiny-ImageNet 64x64)
    [layer1_block0 ..] 64 channels, [layer2_*] 128 (stride 2), [layer3_*] 256 (stride 2),
    [layer4_*] 512 (stride 2); a bottleneck stage outputs 4x its width
    global average pool -> [logits] Dense(num_classes)

Blocks per stage: ResNet-18 (2, 2, 2, 2), ResNet-34 (3, 4, 6, 3), ResNet-50 (3, 4, 6, 3).
The names sort alphabetically in forward order (conv_stem < layer* < logits; inside a block
conv1 < conv2 < conv3 < proj_conv), so insertion order and jax's sorted flattening agree.

Conventions (torchvision's ResNet, which the pruning-at-init code builds on):

* Convs without bias, each followed by BatchNorm (momentum 0.1 in PyTorch terms, i.e. flax
  ``momentum=0.9``; epsilon 1e-5); BN scale 1, bias 0 at init.
* Projection shortcut [proj_conv] 1x1 conv with the block's stride + [proj_bn] whenever the
  block changes the spatial size or the channel count; identity otherwise.
* Bottleneck 1x1 (width) -> 3x3 (width, carries the stride: "ResNet v1.5", as torchvision) ->
  1x1 (4 * width).
* Explicit PyTorch paddings (3 for 7x7, 1 for 3x3 and the max-pool, 0 for 1x1) instead of
  ``'SAME'``, so strided layers sample the same positions as in PyTorch.
* Kaiming-normal init (untruncated): conv kernels with mode ``fan_out`` (std =
  sqrt(2 / (k * k * C_out))), as torchvision's ResNet does
  (``kaiming_normal_(mode='fan_out', nonlinearity='relu')``); the dense head with mode
  ``fan_in`` (std = sqrt(2 / C_in)), the Kaiming-normal default. Biases zero.

Parameter counts: ResNet-18 ImageNet stem 1000 classes 11,689,512; ResNet-34 21,797,672;
ResNet-50 25,557,032; ResNet-18 CIFAR stem 10 classes 11,173,962.
"""

from __future__ import annotations

import functools
from typing import Any, ClassVar, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from prospr_jax.models.layers import KAIMING_FAN_OUT, batch_norm, conv, pooled_classifier

Dtype = Any

STEMS = ("imagenet", "cifar")


def _conv(features: int, kernel: int, stride: int, dtype: Dtype, param_dtype: Dtype, name: str) -> nn.Conv:
    return conv(features, kernel, stride, kernel_init=KAIMING_FAN_OUT, dtype=dtype, param_dtype=param_dtype, name=name)


class BasicBlock(nn.Module):
    """relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)), two 3x3 convs.

    Attributes:
      features: output channels (``expansion`` = 1).
      stride: stride of conv1 and of the projection shortcut.
      conv_widths: the output channels of conv1 and conv2 (default ``(features, features)``); conv2's
        is the block's output width. A compacted block has narrower ones.
      projection: whether the shortcut is a projection (default: when the stride or the width
        changes); a compacted block keeps the shortcut of the block it came from.
      dtype: computation dtype.
      param_dtype: parameter dtype.
    """

    expansion: ClassVar[int] = 1

    features: int
    stride: int = 1
    conv_widths: Optional[tuple[int, ...]] = None
    projection: Optional[bool] = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        conv = functools.partial(_conv, dtype=self.dtype, param_dtype=self.param_dtype)
        norm = functools.partial(batch_norm, train, self.dtype, self.param_dtype)
        w1, w2 = _widths(self.conv_widths, (self.features, self.features))
        y = conv(w1, 3, self.stride, name="conv1")(x)
        y = nn.relu(norm(name="bn1")(y))
        y = conv(w2, 3, 1, name="conv2")(y)
        y = norm(name="bn2")(y)
        return nn.relu(y + _shortcut(x, w2, self.stride, self.projection, conv, norm))


class Bottleneck(nn.Module):
    """relu(bn3(conv3(relu(bn2(conv2(relu(bn1(conv1(x)))))))) + shortcut(x)); 1x1, 3x3, 1x1.

    Attributes:
      features: the bottleneck width; the block outputs ``4 * features`` channels.
      stride: stride of the 3x3 conv2 (ResNet v1.5) and of the projection shortcut.
      conv_widths: the output channels of conv1, conv2 and conv3 (default ``(features, features,
        4 * features)``); conv3's is the block's output width. A compacted block has narrower ones.
      projection: whether the shortcut is a projection (default: when the stride or the width
        changes); a compacted block keeps the shortcut of the block it came from.
      dtype: computation dtype.
      param_dtype: parameter dtype.
    """

    expansion: ClassVar[int] = 4

    features: int
    stride: int = 1
    conv_widths: Optional[tuple[int, ...]] = None
    projection: Optional[bool] = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        conv = functools.partial(_conv, dtype=self.dtype, param_dtype=self.param_dtype)
        norm = functools.partial(batch_norm, train, self.dtype, self.param_dtype)
        w1, w2, w3 = _widths(self.conv_widths, (self.features, self.features, self.features * self.expansion))
        y = conv(w1, 1, 1, name="conv1")(x)
        y = nn.relu(norm(name="bn1")(y))
        y = conv(w2, 3, self.stride, name="conv2")(y)
        y = nn.relu(norm(name="bn2")(y))
        y = conv(w3, 1, 1, name="conv3")(y)
        y = norm(name="bn3")(y)
        return nn.relu(y + _shortcut(x, w3, self.stride, self.projection, conv, norm))


def _widths(given: Optional[tuple[int, ...]], default: tuple[int, ...]) -> tuple[int, ...]:
    if given is None:
        return default
    if len(given) != len(default) or any(isinstance(w, bool) or not isinstance(w, int) or w < 1 for w in given):
        raise ValueError(f"conv_widths must hold {len(default)} positive ints, got {given!r}.")
    return tuple(given)


def _shortcut(x, out_features, stride, projection, conv, norm):
    """Identity, or [proj_conv] 1x1/stride + [proj_bn] when ``projection`` (default: when the shape
    changes)."""
    if projection is None:
        projection = stride != 1 or x.shape[-1] != out_features
    if not projection:
        return x
    return norm(name="proj_bn")(conv(out_features, 1, stride, name="proj_conv")(x))


class ResNet(nn.Module):
    """ImageNet-style ResNet with projection shortcuts.

    Attributes:
      num_classes: number of logits.
      stage_sizes: blocks in each stage, e.g. (2, 2, 2, 2) for ResNet-18.
      block_cls: ``BasicBlock`` or ``Bottleneck``.
      stem: ``'imagenet'`` (7x7 stride 2 conv + 3x3 stride 2 max-pool, default) or ``'cifar'``
        (3x3 stride 1 conv, no max-pool).
      widths: stage widths (64, 128, 256, 512); the first also is the stem's width.
      stem_width: the stem's output channels (default ``widths[0]``).
      block_widths: for every block in forward order, the output channels of its convs (see the
        blocks' ``conv_widths``; default from ``widths``). With it the shortcuts stay where the
        nominal ``widths`` put them: a compacted model keeps the projections of the model it came from.
      dtype: computation dtype (default float32).
      param_dtype: parameter dtype (default float32).

    ``model.apply(variables, x, train)``: x float [N, H, W, C] -> logits [N, num_classes].
    ``train=True`` normalises with batch statistics and needs ``mutable=['batch_stats']``.
    """

    num_classes: int
    stage_sizes: tuple[int, ...] = (2, 2, 2, 2)
    block_cls: type[nn.Module] = BasicBlock
    stem: str = "imagenet"
    widths: tuple[int, ...] = (64, 128, 256, 512)
    stem_width: Optional[int] = None
    block_widths: Optional[tuple[tuple[int, ...], ...]] = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def __post_init__(self):
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}.")
        if self.stem not in STEMS:
            raise ValueError(f"stem must be one of {STEMS}, got {self.stem!r}.")
        if self.block_cls not in (BasicBlock, Bottleneck):
            raise ValueError(f"block_cls must be BasicBlock or Bottleneck, got {self.block_cls!r}.")
        if len(self.stage_sizes) != len(self.widths) or len(self.widths) < 1:
            raise ValueError(
                f"stage_sizes {self.stage_sizes} and widths {self.widths} must be non-empty "
                "and of the same length."
            )
        if any(n < 1 for n in self.stage_sizes) or any(w < 1 for w in self.widths):
            raise ValueError(
                f"stage_sizes and widths must be positive, got {self.stage_sizes}, {self.widths}."
            )
        if self.stem_width is not None and self.stem_width < 1:
            raise ValueError(f"stem_width must be a positive int, got {self.stem_width}.")
        if self.block_widths is not None and len(self.block_widths) != sum(self.stage_sizes):
            raise ValueError(
                f"block_widths must have one entry per block ({sum(self.stage_sizes)}), got {self.block_widths}."
            )
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        stem_width = self.widths[0] if self.stem_width is None else self.stem_width
        if self.stem == "imagenet":
            x = _conv(stem_width, 7, 2, self.dtype, self.param_dtype, name="conv_stem")(x)
        else:
            x = _conv(stem_width, 3, 1, self.dtype, self.param_dtype, name="conv_stem")(x)
        x = nn.relu(batch_norm(train, self.dtype, self.param_dtype, name="bn_stem")(x))
        if self.stem == "imagenet":
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        # Zero-padded indices keep the alphabetical order equal to the forward order.
        stage_digits = len(str(len(self.stage_sizes)))
        block_digits = len(str(max(self.stage_sizes) - 1))
        nominal_in, index = self.widths[0], 0  # the channels a block of the nominal model receives
        for stage, (num_blocks, width) in enumerate(zip(self.stage_sizes, self.widths)):
            for block in range(num_blocks):
                stride = 2 if stage > 0 and block == 0 else 1
                nominal_out = width * self.block_cls.expansion
                x = self.block_cls(
                    width,
                    stride=stride,
                    conv_widths=None if self.block_widths is None else tuple(self.block_widths[index]),
                    projection=stride != 1 or nominal_in != nominal_out,
                    dtype=self.dtype,
                    param_dtype=self.param_dtype,
                    name=f"layer{stage + 1:0{stage_digits}d}_block{block:0{block_digits}d}",
                )(x, train)
                nominal_in, index = nominal_out, index + 1
        return pooled_classifier(x, self.num_classes, self.dtype, self.param_dtype)


def resnet18(num_classes: int = 1000, **kwargs: Any) -> ResNet:
    """ResNet-18; kwargs (``stem``, ``dtype``, ...) go to ``ResNet``."""
    return ResNet(num_classes=num_classes, stage_sizes=(2, 2, 2, 2), block_cls=BasicBlock, **kwargs)


def resnet34(num_classes: int = 1000, **kwargs: Any) -> ResNet:
    """ResNet-34; kwargs (``stem``, ``dtype``, ...) go to ``ResNet``."""
    return ResNet(num_classes=num_classes, stage_sizes=(3, 4, 6, 3), block_cls=BasicBlock, **kwargs)


def resnet50(num_classes: int = 1000, **kwargs: Any) -> ResNet:
    """ResNet-50 (bottlenecks, expansion 4); kwargs (``stem``, ``dtype``, ...) go to ``ResNet``."""
    return ResNet(num_classes=num_classes, stage_sizes=(3, 4, 6, 3), block_cls=Bottleneck, **kwargs)
