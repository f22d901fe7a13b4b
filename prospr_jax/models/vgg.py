"""VGG-11/13/16/19 with BatchNorm, CIFAR layout (Simonyan & Zisserman 2015; GraSP/ProsPr code).

Layout; module names in brackets:

    for each entry of the config:
      int c -> [conv01, conv02, ...] 3x3 conv, stride 1, padding 1, c channels
               -> [bn01, bn02, ...] BatchNorm -> relu
      'M'   -> 2x2 max-pool, stride 2
    global average pool -> [logits] Dense(num_classes)

The configs are the ImageNet VGG ones without the final max-pool (VGG-16:
64 64 M 128 128 M 256 256 256 M 512 512 512 M 512 512 512), followed by a global average pool
and a single Dense head instead of the three-layer classifier: with 32x32 inputs the last
feature map is 2x2x512. Any input with H, W >= 16 works. Zero-padded conv indices keep the
alphabetical order equal to the forward order (bn*, conv* < logits).

Conventions:

* Conv WITH bias (``use_conv_bias=True``): the VGG+BN code the pruning literature uses
  (torchvision's ``vgg*_bn`` layers, reused by ProsPr and GraSP) keeps the default conv bias
  even though the following BatchNorm makes it redundant. ``use_conv_bias=False`` drops it.
* BatchNorm with PyTorch's defaults (momentum 0.1, i.e. flax ``momentum=0.9``; epsilon 1e-5);
  scale 1, bias 0 at init.
* Kaiming-normal init (untruncated): conv kernels with mode ``fan_out`` (std =
  sqrt(2 / (9 * C_out))), as torchvision's VGG and GraSP's VGG
  (``kaiming_normal_(mode='fan_out', nonlinearity='relu')``); the dense head with mode ``fan_in``
  (std = sqrt(2 / C_in)), the Kaiming-normal default. Biases zero.
"""

from __future__ import annotations

from typing import Any, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from prospr_jax.models.layers import KAIMING_FAN_OUT, batch_norm, conv, pooled_classifier

Dtype = Any

VGG_CONFIGS: dict[int, tuple[Union[int, str], ...]] = {
    11: (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512),
    13: (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512),
    16: (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512),
    19: (
        64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
        512, 512, 512, 512, "M", 512, 512, 512, 512,
    ),
}


class VGG(nn.Module):
    """VGG with BatchNorm, global average pool and one Dense head.

    Attributes:
      num_classes: number of logits.
      config: conv widths (ints) and max-pools (``'M'``), in forward order.
      use_conv_bias: whether the convs have a bias (default True, see the module docstring).
      dtype: computation dtype (default float32).
      param_dtype: parameter dtype (default float32).

    ``model.apply(variables, x, train)``: x float [N, H, W, C] -> logits [N, num_classes].
    ``train=True`` normalises with batch statistics and needs ``mutable=['batch_stats']``.
    """

    num_classes: int
    config: tuple[Union[int, str], ...] = VGG_CONFIGS[16]
    use_conv_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def __post_init__(self):
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}.")
        widths = [v for v in self.config if v != "M"]
        if not widths or any(
            isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in widths
        ):
            raise ValueError(
                "config must hold positive ints (conv widths, at least one) and 'M' (max-pool), "
                f"got {self.config!r}."
            )
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        num_convs = sum(1 for v in self.config if v != "M")
        digits = len(str(num_convs))
        index = 0
        for v in self.config:
            if v == "M":
                x = nn.max_pool(x, (2, 2), strides=(2, 2))
                continue
            index += 1
            x = conv(
                v, 3, 1, kernel_init=KAIMING_FAN_OUT, use_bias=self.use_conv_bias, dtype=self.dtype,
                param_dtype=self.param_dtype, name=f"conv{index:0{digits}d}",
            )(x)
            x = batch_norm(train, self.dtype, self.param_dtype, name=f"bn{index:0{digits}d}")(x)
            x = nn.relu(x)
        return pooled_classifier(x, self.num_classes, self.dtype, self.param_dtype)


def vgg(depth: int, num_classes: int, **kwargs: Any) -> VGG:
    """VGG-``depth`` with BatchNorm, depth in {11, 13, 16, 19}; kwargs go to ``VGG``."""
    if depth not in VGG_CONFIGS:
        raise ValueError(f"depth must be one of {sorted(VGG_CONFIGS)}, got {depth!r}.")
    return VGG(num_classes=num_classes, config=VGG_CONFIGS[depth], **kwargs)


def vgg11(num_classes: int = 10, **kwargs: Any) -> VGG:
    """VGG-11 with BatchNorm (8 convs)."""
    return vgg(11, num_classes, **kwargs)


def vgg13(num_classes: int = 10, **kwargs: Any) -> VGG:
    """VGG-13 with BatchNorm (10 convs)."""
    return vgg(13, num_classes, **kwargs)


def vgg16(num_classes: int = 10, **kwargs: Any) -> VGG:
    """VGG-16 with BatchNorm (13 convs)."""
    return vgg(16, num_classes, **kwargs)


def vgg19(num_classes: int = 10, **kwargs: Any) -> VGG:
    """VGG-19 with BatchNorm (16 convs)."""
    return vgg(19, num_classes, **kwargs)
