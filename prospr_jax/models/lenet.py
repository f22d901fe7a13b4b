"""LeNet-300-100 and LeNet-5 (LeCun et al. 1998), in the variants of the pruning literature.

LeNet-300-100 (module names in brackets): flatten -> [fc1] Dense 300 -> relu -> [fc2] Dense 100
-> relu -> [logits] Dense(num_classes). Any input shape [N, ...] is flattened; with 28x28x1
inputs (784 features) and 10 classes it has 266,610 parameters.

LeNet-5, the "Caffe" variant used by Han et al. (2015), SNIP and later pruning papers:
[conv1] 5x5 conv 20 'VALID' -> relu -> 2x2 max-pool -> [conv2] 5x5 conv 50 'VALID' -> relu
-> 2x2 max-pool -> flatten -> [fc1] Dense 500 -> relu -> [logits] Dense(num_classes).
With 28x28x1 inputs: 28 -> 24 -> 12 -> 8 -> 4, so fc1 sees 4*4*50 = 800 features and the model
has 431,080 parameters. Caffe's original prototxt has no ReLU after the two convs; like the
common PyTorch re-implementations used in the pruning literature, this one puts a ReLU there.
The flattening is NHWC, so feature f of fc1's input is channel f mod 50.

Both models have biases everywhere, no BatchNorm (``train`` is accepted and ignored, and
``init`` returns no ``batch_stats``). Init: Kaiming-normal (untruncated), mode ``fan_in``
(std = sqrt(2 / fan_in)), the ``kaiming_normal_`` default, for conv and dense kernels; zero
biases.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from prospr_jax.models.layers import KAIMING_FAN_IN

Dtype = Any


def _dense(features: int, dtype: Dtype, param_dtype: Dtype, name: str) -> nn.Dense:
    return nn.Dense(
        features,
        kernel_init=KAIMING_FAN_IN,
        bias_init=nn.initializers.zeros,
        dtype=dtype,
        param_dtype=param_dtype,
        name=name,
    )


def _check_num_classes(num_classes: int) -> None:
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}.")


class LeNet300100(nn.Module):
    """Fully connected 784-300-100-10 (hidden sizes configurable).

    Attributes:
      num_classes: number of logits.
      hidden: widths of the hidden layers, (300, 100) by default.
      dtype: computation dtype (default float32).
      param_dtype: parameter dtype (default float32).

    ``model.apply(variables, x, train)``: x float [N, ...] -> logits [N, num_classes].
    """

    num_classes: int
    hidden: tuple[int, ...] = (300, 100)
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def __post_init__(self):
        _check_num_classes(self.num_classes)
        if any(h < 1 for h in self.hidden):
            raise ValueError(f"hidden must hold positive ints, got {self.hidden}.")
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        del train  # No BatchNorm or dropout.
        x = x.reshape((x.shape[0], -1))
        for i, width in enumerate(self.hidden):
            x = nn.relu(_dense(width, self.dtype, self.param_dtype, name=f"fc{i + 1}")(x))
        return _dense(self.num_classes, self.dtype, self.param_dtype, name="logits")(x)


class LeNet5(nn.Module):
    """Caffe-style LeNet-5: conv 20 5x5, pool, conv 50 5x5, pool, dense 500, dense head.

    Attributes:
      num_classes: number of logits.
      conv_widths: the two convs' output channels, (20, 50) by default.
      fc_width: the hidden Dense layer's width, 500 by default.
      dtype: computation dtype (default float32).
      param_dtype: parameter dtype (default float32).

    ``model.apply(variables, x, train)``: x float [N, H, W, C] with H, W >= 16 (28x28 for
    MNIST) -> logits [N, num_classes].
    """

    num_classes: int
    conv_widths: tuple[int, int] = (20, 50)
    fc_width: int = 500
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def __post_init__(self):
        _check_num_classes(self.num_classes)
        if len(self.conv_widths) != 2 or any(w < 1 for w in self.conv_widths) or self.fc_width < 1:
            raise ValueError(
                f"conv_widths must be two positive ints and fc_width a positive int, got "
                f"{self.conv_widths} and {self.fc_width}."
            )
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        del train  # No BatchNorm or dropout.
        for i, width in enumerate(self.conv_widths):
            x = nn.Conv(
                width,
                kernel_size=(5, 5),
                padding="VALID",
                kernel_init=KAIMING_FAN_IN,
                bias_init=nn.initializers.zeros,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name=f"conv{i + 1}",
            )(x)
            x = nn.max_pool(nn.relu(x), (2, 2), strides=(2, 2))
        x = x.reshape((x.shape[0], -1))
        x = nn.relu(_dense(self.fc_width, self.dtype, self.param_dtype, name="fc1")(x))
        return _dense(self.num_classes, self.dtype, self.param_dtype, name="logits")(x)


def lenet300_100(num_classes: int = 10, **kwargs: Any) -> LeNet300100:
    """LeNet-300-100; kwargs go to ``LeNet300100``."""
    return LeNet300100(num_classes=num_classes, **kwargs)


def lenet5(num_classes: int = 10, **kwargs: Any) -> LeNet5:
    """Caffe-style LeNet-5; kwargs go to ``LeNet5``."""
    return LeNet5(num_classes=num_classes, **kwargs)
