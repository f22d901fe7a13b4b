"""Layers shared by the model zoo, with the PyTorch conventions the pruning-at-init papers used.

* Kaiming-normal initialisation, untruncated (flax's own ``kaiming_normal`` is truncated):
  std = sqrt(2 / fan), ``fan_in`` (PyTorch's ``kaiming_normal_`` default) or ``fan_out``
  (torchvision's ResNet and VGG convs).
* BatchNorm with PyTorch's defaults: momentum 0.1 (flax ``momentum=0.9``), epsilon 1e-5; scale 1,
  bias 0 at init.
* Convs with PyTorch's explicit padding ``kernel // 2`` (not ``'SAME'``), so strided layers sample
  positions 0, s, 2s, ... as in PyTorch.
* The classifier: global average pool, then one Dense named ``logits`` (fan_in init, zero bias).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

KAIMING_FAN_IN = nn.initializers.variance_scaling(2.0, "fan_in", "normal")
KAIMING_FAN_OUT = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
BN_MOMENTUM = 0.9  # PyTorch momentum 0.1.
BN_EPSILON = 1e-5


def conv(
    features: int,
    kernel: int,
    stride: int,
    *,
    kernel_init: Any,
    dtype: Dtype,
    param_dtype: Dtype,
    name: str,
    use_bias: bool = False,
) -> nn.Conv:
    """A square ``kernel`` x ``kernel`` conv with PyTorch padding ``kernel // 2`` (zero bias init)."""
    pad = kernel // 2
    return nn.Conv(
        features,
        kernel_size=(kernel, kernel),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        use_bias=use_bias,
        kernel_init=kernel_init,
        bias_init=nn.initializers.zeros,
        dtype=dtype,
        param_dtype=param_dtype,
        name=name,
    )


def batch_norm(train: bool, dtype: Dtype, param_dtype: Dtype, name: str) -> nn.BatchNorm:
    """BatchNorm with PyTorch's defaults; batch statistics when ``train``, running ones otherwise."""
    return nn.BatchNorm(
        use_running_average=not train,
        momentum=BN_MOMENTUM,
        epsilon=BN_EPSILON,
        dtype=dtype,
        param_dtype=param_dtype,
        name=name,
    )


def pooled_classifier(x: jax.Array, num_classes: int, dtype: Dtype, param_dtype: Dtype) -> jax.Array:
    """Global average pool of [N, H, W, C] features, then Dense ``logits``: [N, num_classes].

    Call it from inside a module's ``nn.compact`` method: the Dense becomes that module's child.
    """
    pooled = jnp.mean(x, axis=(1, 2))
    return nn.Dense(
        num_classes,
        kernel_init=KAIMING_FAN_IN,
        bias_init=nn.initializers.zeros,
        dtype=dtype,
        param_dtype=param_dtype,
        name="logits",
    )(pooled)
