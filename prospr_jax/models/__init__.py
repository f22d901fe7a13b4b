"""Model zoo (flax.linen) and the glue that turns a model into the functions pruners use.

Every model is called as ``model.apply(variables, x, train)`` with x float NHWC [N, H, W, C]
(LeNet-300-100 flattens any [N, ...]) and returns logits [N, num_classes]. Models with
BatchNorm keep running statistics in the ``batch_stats`` collection: ``train=True`` normalises
with batch statistics and updates them (``mutable=['batch_stats']``), ``train=False`` uses the
running averages. Models without BatchNorm ignore ``train``. BatchNorm follows PyTorch's
defaults (momentum 0.1, i.e. flax ``momentum=0.9``; epsilon 1e-5), except that flax updates the
running variance with the biased batch variance where PyTorch uses the unbiased one (a factor
m / (m - 1), m = N * H * W values per channel; it only affects eval mode).

Module names are chosen so that the stem conv is the first kernel and the classifier
(``logits``) the last one, both in the insertion order of the params dict returned by ``init``
and in jax's flattening order (sorted keys).

Example::

    model = models.get("resnet20", num_classes=10)
    params, batch_stats = models.init(model, jax.random.PRNGKey(0), (1, 32, 32, 3))
    loss_fn = models.make_loss_fn(model, batch_stats)         # BN in train mode
    grads = jax.grad(loss_fn)(params, {"image": x, "label": y})
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from prospr_jax._src.losses import cross_entropy, flax_apply_fn
from prospr_jax._src.tree import is_traced
from prospr_jax._src.validate import check_bool, check_int, check_shape

from . import lenet, resnet, resnet_cifar, vgg
from .compact import TracedCompactModule, architecture_changes, compact_module
from .lenet import LeNet5, LeNet300100
from .resnet import ResNet
from .resnet_cifar import CifarResNet, option_a_shortcut
from .vgg import VGG

PyTree = Any
Params = Any
BatchStats = Any
Batch = Mapping[str, Any]

_FACTORIES: dict[str, Callable[..., nn.Module]] = {
    "resnet20": resnet_cifar.resnet20,
    "resnet32": resnet_cifar.resnet32,
    "resnet56": resnet_cifar.resnet56,
    "vgg11": vgg.vgg11,
    "vgg13": vgg.vgg13,
    "vgg16": vgg.vgg16,
    "vgg19": vgg.vgg19,
    "resnet18": resnet.resnet18,
    "resnet34": resnet.resnet34,
    "resnet50": resnet.resnet50,
    "lenet300_100": lenet.lenet300_100,
    "lenet5": lenet.lenet5,
}


def names() -> tuple[str, ...]:
    """The model names ``get`` accepts."""
    return tuple(_FACTORIES)


def get(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
    """A fresh (unbound) model.

    Args:
      name: one of ``names()``: 'resnet20', 'resnet32', 'resnet56' (CIFAR ResNets, option-A
        shortcuts), 'vgg11', 'vgg13', 'vgg16', 'vgg19' (BatchNorm, CIFAR layout), 'resnet18',
        'resnet34', 'resnet50' (projection shortcuts; ``stem='imagenet'`` by default, pass
        ``stem='cifar'`` for 32x32 / 64x64 inputs), 'lenet300_100', 'lenet5'.
      num_classes: number of logits, >= 1.
      **kwargs: further attributes of the model class, e.g. ``dtype``, ``stem``.

    Raises:
      ValueError: unknown name (the message lists the known ones) or num_classes < 1.
      TypeError: name not a str, num_classes not an int, or an unknown keyword.
    """
    if not isinstance(name, str):
        raise TypeError(f"`name` must be a str, one of {', '.join(names())}; got {type(name).__name__}")
    if name not in _FACTORIES:
        raise ValueError(f"unknown model name {name!r}; known names: {', '.join(names())}")
    num_classes = check_int(num_classes, "num_classes", low=1)
    try:
        return _FACTORIES[name](num_classes=num_classes, **kwargs)
    except TypeError as e:
        raise TypeError(f"bad keyword argument for model {name!r}: {e}") from e


def init(model: nn.Module, rng: Any, input_shape: Sequence[int]) -> tuple[Params, BatchStats]:
    """Initialises ``model`` on a zero input, in eval mode (deterministic, no statistics update).

    Args:
      model: a model from ``get`` (any flax module with ``__call__(x, train)``).
      rng: a ``jax.random`` key, or an int seed.
      input_shape: full input shape including the batch axis, e.g. (1, 32, 32, 3). The batch
        size does not affect the parameters, so 1 is the cheapest.

    Returns:
      ``(params, batch_stats)``: plain dicts; ``batch_stats`` is ``{}`` for models without
      BatchNorm. Running means start at 0 and variances at 1.
    """
    shape = check_shape(input_shape, "input_shape", what="including the batch axis, e.g. (1, 32, 32, 3)")
    if len(shape) < 2:
        raise ValueError(
            "`input_shape` must be a tuple of positive ints including the batch axis, e.g. "
            f"(1, 32, 32, 3); got {input_shape!r}"
        )
    if isinstance(rng, (int, np.integer)) and not isinstance(rng, bool):
        rng = jax.random.PRNGKey(int(rng))
    variables = model.init(rng, jnp.zeros(shape, jnp.float32), train=False)
    params = dict(variables["params"])
    batch_stats = dict(variables.get("batch_stats", {}))
    return params, batch_stats


def make_logits_fn(
    model: nn.Module, batch_stats: BatchStats, *, train: bool
) -> Callable[[Params, jax.Array], jax.Array]:
    """``logits_fn(params, images) -> logits [N, num_classes]`` with fixed ``batch_stats``.

    With ``train=True`` BatchNorm normalises with the statistics of ``images`` and the updated
    running statistics are discarded (this is how pruning scorers use a model); with
    ``train=False`` it uses ``batch_stats``. Pure, so it can be jitted and differentiated.
    """
    train = check_bool(train, "train")
    apply_fn = flax_apply_fn(model)
    state = {"batch_stats": batch_stats} if batch_stats else {}

    def logits_fn(params: Params, images: jax.Array) -> jax.Array:
        return apply_fn(params, state, images, train)

    return logits_fn


def make_loss_fn(
    model: nn.Module, batch_stats: BatchStats, *, train: bool = True
) -> Callable[[Params, Batch], jax.Array]:
    """``loss_fn(params, batch) -> scalar``: mean softmax cross-entropy with integer labels.

    Args:
      model: the model.
      batch_stats: its BatchNorm statistics (``{}`` for models without BatchNorm).
      train: BatchNorm mode (default True: batch statistics, updated statistics discarded).

    ``batch`` is a mapping ``{'image': float [N, H, W, C], 'label': int [N]}``. The loss is
    ``mean_n(logsumexp(logits_n) - logits_n[label_n])``, computed in at least float32
    (:func:`prospr_jax.cross_entropy`). Raises ``ValueError``/``TypeError`` when a key is missing, the
    batch sizes disagree, the labels are not integers of shape [N] or (when not traced) fall outside
    [0, num_classes).
    """
    logits_fn = make_logits_fn(model, batch_stats, train=train)

    def loss_fn(params: Params, batch: Batch) -> jax.Array:
        images, labels = _unpack_batch(batch)
        logits = logits_fn(params, images)
        _check_label_range(labels, logits.shape[-1])
        return cross_entropy(logits, labels)

    return loss_fn


def _unpack_batch(batch: Batch) -> tuple[jax.Array, jax.Array]:
    if not isinstance(batch, Mapping):
        raise TypeError(
            f"batch must be a mapping with keys 'image' and 'label', got {type(batch).__name__}."
        )
    missing = [k for k in ("image", "label") if k not in batch]
    if missing:
        raise ValueError(
            f"batch lacks key(s) {missing}; it must have 'image' (float [N, H, W, C]) and "
            f"'label' (int [N]); got keys {sorted(map(str, batch))}."
        )
    images, labels = batch["image"], batch["label"]
    image_shape, label_shape = np.shape(images), np.shape(labels)
    if len(image_shape) < 2:
        raise ValueError(f"batch['image'] must have a batch axis, got shape {image_shape}.")
    if len(label_shape) != 1:
        raise ValueError(f"batch['label'] must have shape [N], got {label_shape}.")
    if image_shape[0] != label_shape[0]:
        raise ValueError(
            f"batch['image'] has {image_shape[0]} examples but batch['label'] has "
            f"{label_shape[0]}."
        )
    if not jnp.issubdtype(jnp.result_type(images), jnp.floating):
        raise TypeError(f"batch['image'] must be floating point, got {jnp.result_type(images)}.")
    if not jnp.issubdtype(jnp.result_type(labels), jnp.integer):
        raise TypeError(f"batch['label'] must hold integers, got {jnp.result_type(labels)}.")
    return images, labels


def _check_label_range(labels: Any, num_classes: int) -> None:
    if is_traced(labels):
        return
    values = np.asarray(labels)
    if values.size and (values.min() < 0 or values.max() >= num_classes):
        raise ValueError(
            f"batch['label'] must lie in [0, {num_classes}), got values in "
            f"[{values.min()}, {values.max()}]."
        )


__all__ = [
    "CifarResNet",
    "LeNet300100",
    "LeNet5",
    "ResNet",
    "TracedCompactModule",
    "VGG",
    "architecture_changes",
    "compact_module",
    "get",
    "init",
    "make_logits_fn",
    "make_loss_fn",
    "names",
    "option_a_shortcut",
]
