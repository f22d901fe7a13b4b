"""Presets of the prune-then-train runner: a data set, a model, a recipe, methods, sparsities.

Command-line flags override any field of a preset (``--epochs 2`` on a paper preset is a smoke run).

* ``demo`` (default): the offline main job: ResNet-20 on scikit-learn's digits (8x8 grey images,
  spatial sizes 8 -> 4 -> 2 through the three stages), ProsPr vs SNIP vs random at 90/95/98% sparsity
  plus the dense reference, a short version of the ProsPr recipe. A few minutes on 2 CPU cores.
* ``prospr-resnet20-cifar10``, ``prospr-vgg16-cifar100``, ``prospr-resnet18-tinyimagenet``: the
  ProsPr paper's CIFAR-scale pairs (METHODS.md) with the ProsPr code's recipe (200 epochs, batch 256,
  lr 0.1 x0.1 at 50%/75%, weight decay 5e-4) and scoring batches of 128. Tiny-ImageNet is not in the
  tfds catalog: pass ``--dataset PATH`` (a split/class/image folder or archive).
* ``prospr-resnet50-imagenet``: ResNet-50 on ImageNet (tfds ``imagenet2012``, images resized to 224)
  with first-order ProsPr, the ImageNet recipe of :mod:`prospr_jax.train`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional


@dataclasses.dataclass(frozen=True)
class Preset:
    """One experiment protocol.

    Attributes:
      name: preset name.
      description: one line for ``--help``.
      dataset: data set name or path; ``None`` when the user must give ``--dataset PATH``.
      model: model zoo name (``prospr_jax.models.names()``).
      recipe: training recipe name (``prospr_jax.train.RECIPES``).
      methods: method names (``prospr_jax.methods.names()`` or ``'dense'``).
      sparsities: sparsities of the pruned cells.
      recipe_overrides: fields of the recipe to change (e.g. fewer epochs).
      model_options: keyword arguments of ``prospr_jax.models.get`` (e.g. ``stem``).
      method_options: method name -> options of ``prospr_jax.methods.prune``.
      prune_batch_size: batch size of the scoring batches (``None``: the training batch size).
      image_size: for tfds catalog sets of variable image size (ImageNet): square size to resize to.
      dataset_hint: shown when ``dataset`` is ``None`` and no ``--dataset`` was given.
    """

    name: str
    description: str
    dataset: Optional[str]
    model: str
    recipe: str
    methods: tuple[str, ...]
    sparsities: tuple[float, ...]
    recipe_overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    model_options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    method_options: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
    prune_batch_size: Optional[int] = None
    image_size: Optional[int] = None
    dataset_hint: str = ""


PAPER_METHODS = ("dense", "prospr", "snip", "grasp", "synflow", "random")
PAPER_SPARSITIES = (0.9, 0.95, 0.98)

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            name="demo",
            description="offline main job: ResNet-20 on digits (8x8), dense + ProsPr/SNIP/random at 90/95/98%",
            dataset="digits",
            model="resnet20",
            recipe="prospr",
            methods=("dense", "prospr", "snip", "random"),
            sparsities=(0.9, 0.95, 0.98),
            recipe_overrides={"epochs": 8, "batch_size": 64},
        ),
        Preset(
            name="prospr-resnet20-cifar10",
            description="ProsPr paper: ResNet-20 / CIFAR-10, ProsPr code recipe (200 epochs, batch 256)",
            dataset="cifar10",
            model="resnet20",
            recipe="prospr",
            methods=PAPER_METHODS,
            sparsities=PAPER_SPARSITIES,
            prune_batch_size=128,
        ),
        Preset(
            name="prospr-vgg16-cifar100",
            description="ProsPr paper: VGG-16 (BN) / CIFAR-100, ProsPr code recipe",
            dataset="cifar100",
            model="vgg16",
            recipe="prospr",
            methods=PAPER_METHODS,
            sparsities=PAPER_SPARSITIES,
            prune_batch_size=128,
        ),
        Preset(
            name="prospr-resnet18-tinyimagenet",
            description="ProsPr paper: ResNet-18 (3x3 stem) / Tiny-ImageNet (needs --dataset PATH), ProsPr code recipe",
            dataset=None,
            model="resnet18",
            recipe="prospr",
            methods=PAPER_METHODS,
            sparsities=PAPER_SPARSITIES,
            model_options={"stem": "cifar"},
            prune_batch_size=128,
            dataset_hint=(
                "Tiny-ImageNet is not in the tfds catalog: pass --dataset PATH, a folder or .tar/.tar.gz "
                "archive laid out as train/<class>/*.JPEG and test/<class>/*.JPEG (the val images sorted "
                "into class folders)"
            ),
        ),
        Preset(
            name="prospr-resnet50-imagenet",
            description="ProsPr paper: ResNet-50 / ImageNet (tfds imagenet2012 at 224px), first-order ProsPr",
            dataset="imagenet2012",
            model="resnet50",
            recipe="imagenet",
            methods=("dense", "prospr", "snip", "random"),
            sparsities=(0.8, 0.9),
            method_options={"prospr": {"first_order": True}},
            prune_batch_size=128,
            image_size=224,
        ),
    )
}

DEFAULT_PRESET = "demo"


def get_preset(name: str) -> Preset:
    """The preset called ``name``; a ValueError lists the choices."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choices: {', '.join(PRESETS)}")
    return PRESETS[name]


__all__ = ["DEFAULT_PRESET", "PRESETS", "Preset", "get_preset"]
