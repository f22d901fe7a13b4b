"""CIFAR ResNets (He et al., CVPR 2016, Sec. 4.2): ResNet-20, ResNet-32, ResNet-56.

Layout for depth 6n + 2 (n = 3, 5, 9 basic blocks per stage); module names in brackets:

    [conv_stem] 3x3 stride 1, 16 channels -> [bn_stem] -> relu
    [layer1_block0 .. layer1_block{n-1}]  BasicBlockA(16)
    [layer2_block0 .. ]                   BasicBlockA(32), the first with stride 2
    [layer3_block0 .. ]                   BasicBlockA(64), the first with stride 2
    global average pool -> [logits] Dense(num_classes)

The names sort alphabetically in forward order (conv_stem < layer* < logits), so both the
params dict straight from ``init`` (insertion order) and any jax flattening (sorted keys) list
the stem conv first and the classifier last.

Conventions (those of the CIFAR ResNet code used by the pruning-at-init papers):

* No conv bias; BatchNorm after every conv with PyTorch's defaults (momentum 0.1, i.e. flax
  ``momentum=0.9``; epsilon 1e-5); scale 1, bias 0 at init.
* Parameter-free "option A" shortcuts: when the shape changes, the skip path is
  ``x[:, ::stride, ::stride, :]`` with ``(C_out - C_in) // 2`` zero channels before the existing
  channels and the rest after (symmetric padding, as in the reference PyTorch code).
* 3x3 convs use explicit padding 1 (not ``'SAME'``), so a stride-2 conv samples the positions
  0, 2, 4, ... like PyTorch and like the option-A subsample.
* Kaiming-normal init, mode ``fan_in``: std = sqrt(2 / fan_in), untruncated normal, for conv AND
  dense kernels. The reference code calls ``kaiming_normal_(weight)`` with its defaults (mode
  ``fan_in``, ReLU gain) on every Conv2d and Linear. Biases zero.

ResNet-20 with 10 classes has 269,722 parameters (kernels, BN scale/bias, head kernel/bias).
"""

from __future__ import annotations

import functools
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from prospr_jax.models.layers import KAIMING_FAN_IN, batch_norm, conv, pooled_classifier

Dtype = Any

BLOCKS_PER_STAGE = {20: 3, 32: 5, 56: 9}


def option_a_shortcut(
    x: jax.Array, out_channels: int, stride: int, positions: Optional[Sequence[int]] = None
) -> jax.Array:
    """The parameter-free "option A" shortcut.

    Args:
      x: activations, shape [N, H, W, C_in].
      out_channels: C_out >= C_in.
      stride: spatial subsampling factor (2 at a stage transition of the CIFAR ResNets).
      positions: where each input channel lands among the C_out outputs (C_in distinct increasing
        ints); default: the centred layout below. A compacted model (channels pruned on both sides of
        the shortcut) passes the kept channels' places here.

    Returns:
      [N, ceil(H / stride), ceil(W / stride), C_out]: ``x[:, ::stride, ::stride, :]`` with
      ``(C_out - C_in) // 2`` zero channels before and ``C_out - C_in - (C_out - C_in) // 2``
      zero channels after, or with input channel ``c`` at output channel ``positions[c]`` and zeros
      elsewhere.
    """
    in_channels = x.shape[-1]
    if out_channels < in_channels:
        raise ValueError(
            f"out_channels must be >= the input's {in_channels} channels, got {out_channels}."
        )
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}.")
    y = x[:, ::stride, ::stride, :]
    if positions is not None:
        where = np.asarray(positions, np.int64)
        if where.shape != (in_channels,) or (in_channels and (
            where[0] < 0 or where[-1] >= out_channels or np.any(np.diff(where) <= 0)
        )):
            raise ValueError(
                f"positions must be {in_channels} increasing channel indices in [0, {out_channels}), "
                f"got {tuple(positions)!r}."
            )
        # Runs of consecutive places, each a slice padded with the zeros before it: pads, slices and a
        # concatenation (no scatter), which the channel tracer and compaction follow.
        pieces, filled, start = [], 0, 0
        for stop in range(1, in_channels + 1):
            if stop < in_channels and where[stop] == where[stop - 1] + 1:
                continue
            gap = int(where[start]) - filled
            pieces.append(jnp.pad(y[..., start:stop], ((0, 0),) * (y.ndim - 1) + ((gap, 0),)))
            filled, start = int(where[stop - 1]) + 1, stop
        if not pieces:
            return jnp.zeros(y.shape[:-1] + (out_channels,), y.dtype)
        pieces[-1] = jnp.pad(pieces[-1], ((0, 0),) * (y.ndim - 1) + ((0, out_channels - filled),))
        return jnp.concatenate(pieces, axis=-1) if len(pieces) > 1 else pieces[0]
    extra = out_channels - in_channels
    before = extra // 2
    return jnp.pad(y, ((0, 0), (0, 0), (0, 0), (before, extra - before)))


class BasicBlockA(nn.Module):
    """relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)) with an option-A shortcut.

    Attributes:
      features: output channels.
      stride: stride of conv1 and of the shortcut's subsample.
      inner_features: conv1's output channels (default ``features``; a compacted block has fewer).
      skip_positions: the shortcut's ``positions`` (see :func:`option_a_shortcut`; default centred).
      dtype: computation dtype.
      param_dtype: parameter dtype.
    """

    features: int
    stride: int = 1
    inner_features: Optional[int] = None
    skip_positions: Optional[tuple[int, ...]] = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        conv3x3 = functools.partial(
            conv, kernel=3, kernel_init=KAIMING_FAN_IN, dtype=self.dtype, param_dtype=self.param_dtype
        )
        norm = functools.partial(batch_norm, train, self.dtype, self.param_dtype)
        inner = self.features if self.inner_features is None else self.inner_features
        y = conv3x3(inner, stride=self.stride, name="conv1")(x)
        y = nn.relu(norm(name="bn1")(y))
        y = conv3x3(self.features, stride=1, name="conv2")(y)
        y = norm(name="bn2")(y)
        if self.stride != 1 or x.shape[-1] != self.features or self.skip_positions is not None:
            skip = option_a_shortcut(x, self.features, self.stride, self.skip_positions)
        else:
            skip = x
        return nn.relu(y + skip)


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs (any H, W >= 4 works).

    Attributes:
      num_classes: number of logits.
      blocks_per_stage: n, the number of basic blocks in each stage.
      widths: channels of the stages; (16, 32, 64) in the paper. The stem has ``widths[0]``.
      block_widths: conv1's output channels in every block, in forward order (default: the stage's
        width); a compacted model has narrower ones.
      skip_positions: for every stage, where the option-A shortcut of its first block puts the
        incoming channels (``None`` for the centred layout of the paper, the default for a stage
        whose entry is ``None``); see :func:`option_a_shortcut`.
      dtype: computation dtype (default float32).
      param_dtype: parameter dtype (default float32).

    ``model.apply(variables, x, train)``: x float [N, H, W, C] -> logits [N, num_classes].
    ``train=True`` normalises with batch statistics and needs ``mutable=['batch_stats']``;
    ``train=False`` uses the running averages.
    """

    num_classes: int
    blocks_per_stage: int = 3
    widths: tuple[int, ...] = (16, 32, 64)
    block_widths: Optional[tuple[int, ...]] = None
    skip_positions: Optional[tuple[Optional[tuple[int, ...]], ...]] = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def __post_init__(self):
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}.")
        if self.blocks_per_stage < 1:
            raise ValueError(f"blocks_per_stage must be >= 1, got {self.blocks_per_stage}.")
        if len(self.widths) < 1 or any(w < 1 for w in self.widths):
            raise ValueError(f"widths must be a non-empty tuple of positive ints, got {self.widths}.")
        num_blocks = len(self.widths) * self.blocks_per_stage
        if self.block_widths is not None and (
            len(self.block_widths) != num_blocks or any(w < 1 for w in self.block_widths)
        ):
            raise ValueError(
                f"block_widths must hold {num_blocks} positive ints (one per block), got {self.block_widths}."
            )
        if self.skip_positions is not None and len(self.skip_positions) != len(self.widths):
            raise ValueError(
                f"skip_positions must have one entry (or None) per stage ({len(self.widths)}), "
                f"got {self.skip_positions}."
            )
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        x = conv(
            self.widths[0], 3, 1, kernel_init=KAIMING_FAN_IN, dtype=self.dtype, param_dtype=self.param_dtype,
            name="conv_stem",
        )(x)
        x = nn.relu(batch_norm(train, self.dtype, self.param_dtype, name="bn_stem")(x))
        # Zero-padded indices keep the alphabetical order equal to the forward order.
        stage_digits = len(str(len(self.widths)))
        block_digits = len(str(self.blocks_per_stage - 1))
        for stage, width in enumerate(self.widths):
            for block in range(self.blocks_per_stage):
                stride = 2 if stage > 0 and block == 0 else 1
                index = stage * self.blocks_per_stage + block
                x = BasicBlockA(
                    width,
                    stride=stride,
                    inner_features=None if self.block_widths is None else self.block_widths[index],
                    skip_positions=(
                        self.skip_positions[stage] if self.skip_positions is not None and block == 0 else None
                    ),
                    dtype=self.dtype,
                    param_dtype=self.param_dtype,
                    name=f"layer{stage + 1:0{stage_digits}d}_block{block:0{block_digits}d}",
                )(x, train)
        return pooled_classifier(x, self.num_classes, self.dtype, self.param_dtype)


def cifar_resnet(depth: int, num_classes: int, **kwargs: Any) -> CifarResNet:
    """ResNet-``depth`` for CIFAR, depth in {20, 32, 56}; kwargs go to ``CifarResNet``."""
    if depth not in BLOCKS_PER_STAGE:
        raise ValueError(f"depth must be one of {sorted(BLOCKS_PER_STAGE)}, got {depth!r}.")
    return CifarResNet(num_classes=num_classes, blocks_per_stage=BLOCKS_PER_STAGE[depth], **kwargs)


def resnet20(num_classes: int = 10, **kwargs: Any) -> CifarResNet:
    """ResNet-20 (n = 3): 269,722 parameters with 10 classes."""
    return cifar_resnet(20, num_classes, **kwargs)


def resnet32(num_classes: int = 10, **kwargs: Any) -> CifarResNet:
    """ResNet-32 (n = 5): 464,154 parameters with 10 classes."""
    return cifar_resnet(32, num_classes, **kwargs)


def resnet56(num_classes: int = 10, **kwargs: Any) -> CifarResNet:
    """ResNet-56 (n = 9): 853,018 parameters with 10 classes."""
    return cifar_resnet(56, num_classes, **kwargs)
