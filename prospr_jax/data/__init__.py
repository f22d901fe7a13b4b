"""Image classification data for prospr-jax: one ``load`` for every source, numpy batches.

Sources (``load(name_or_path)``):

* 'digits': scikit-learn's handwritten digits, shipped with scikit-learn (works offline):
  1,437 train / 360 test grey 8x8 images (values 0..16), 10 classes.
* a tensorflow-datasets catalog name ('cifar10', 'cifar100', 'mnist', 'fashion_mnist',
  'svhn_cropped', 'imagenet2012', ...), read with random access from array_record shards
  prepared in ``data_dir`` (no TensorFlow needed to read; nothing downloaded unless
  ``download=True``). tiny-imagenet is not in the tfds catalog: lay it out as a folder.
* a path to a folder or ``.tar``/``.tar.gz`` archive laid out as split/class/image, turned on
  first use into a cached tfds data set (see ``prospr_jax.data.image_folder``).

``metadata(name_or_path)`` tells the train size, the classes and the image shape without reading
examples (digits, prepared catalog sets).

Batches (``train_batches``, ``eval_batches``) are dicts {'image': float32 [B, H, W, C]
normalised per channel, 'label': int32 [B]}, produced by a background thread, in an order
fixed by (seed, epoch).

Example:

    ds = load('digits')
    for batch in train_batches(ds, batch_size=128, epoch=0, seed=0):
        ...
    for batch in eval_batches(ds, batch_size=500):
        ...
"""

from __future__ import annotations

import dataclasses
import os

from prospr_jax._src.validate import check_int
from prospr_jax.data.augment import draw_crop_flip, normalize, pad_crop_flip
from prospr_jax.data.catalog import (
    CATALOG_CHANNEL_STATS,
    DatasetNotPreparedError,
    catalog_metadata,
    catalog_names,
    is_catalog_name,
    load_catalog,
)
from prospr_jax.data.dataset import (
    Dataset,
    channel_stats,
    stratified_indices,
    to_memory,
    train_subset,
)
from prospr_jax.data.digits import (
    DIGITS_IMAGE_SHAPE,
    DIGITS_NAME,
    DIGITS_NUM_CLASSES,
    DIGITS_NUM_TEST,
    DIGITS_NUM_TRAIN,
    load_digits_dataset,
)
from prospr_jax.data.image_folder import (
    ARCHIVE_SUFFIXES,
    cache_entry_dir,
    decode_image,
    default_cache_dir,
    is_archive_path,
    load_image_folder,
)
from prospr_jax.data.loader import (
    Augmentation,
    EpochBatches,
    augmentation_rng,
    default_crop_padding,
    epoch_permutation,
    eval_batches,
    iterate_batches,
    prefetch,
    steps_per_epoch,
    train_batches,
)
from prospr_jax.data.sources import ArraySource, ImageSource, SubsetSource, TfdsSource
from prospr_jax.data.tfds_writer import write_tfds_dataset

# Catalog sets this project names in its docs and error messages (any other tfds catalog
# image classification set with 'image' and 'label' features loads too).
KNOWN_CATALOG_NAMES = tuple(CATALOG_CHANNEL_STATS)


def _is_path(name: str) -> bool:
    """An existing path, an archive name, or a name with a path separator."""
    separators = {os.sep, os.altsep} - {None}
    return os.path.exists(name) or is_archive_path(name) or any(s in name for s in separators)


def _unknown_name_error(name: str) -> ValueError:
    hint = ""
    if "tiny" in name.lower() and "imagenet" in name.lower():
        hint = (
            " tiny-imagenet is not in the tfds catalog: lay its images out as "
            "train/<class>/*.JPEG and test/<class>/*.JPEG (its val images sorted into class "
            "folders) and pass that folder or an archive of it."
        )
    return ValueError(
        f"unknown data set {name!r}. Choices: {DIGITS_NAME!r} (offline, ships "
        f"with scikit-learn); a tensorflow-datasets catalog name such as "
        f"{', '.join(repr(n) for n in KNOWN_CATALOG_NAMES)} (any image classification "
        "set of the installed tfds catalog, prepared in data_dir); or a path to a folder "
        "or .tar/.tar.gz archive laid out as split/class/image." + hint
    )


@dataclasses.dataclass(frozen=True)
class Metadata:
    """What a data set holds, known before its examples are read (see ``metadata``).

    Attributes:
        num_train: examples in the train split (before any subset).
        num_classes: number of classes.
        image_shape: (H, W, C) of the images as batched, or None when not known yet.
    """

    num_train: int
    num_classes: int
    image_shape: tuple[int, int, int] | None


def metadata(
    name_or_path: str | os.PathLike,
    *,
    data_dir: str | os.PathLike | None = None,
    image_size: int | None = None,
) -> Metadata | None:
    """The ``Metadata`` of what ``load(name_or_path, ...)`` would load, without reading examples.

    Known for 'digits' (constants) and for prepared tfds catalog sets (their tfds metadata); None
    for folders and archives, whose classes and sizes are known once converted.

    Raises:
        DatasetNotPreparedError: a catalog set is not prepared in ``data_dir``.
        ValueError: an unknown name (as ``load`` raises it), a catalog set without a 'train' split
            or not an image classification set.
    """
    name = os.fspath(name_or_path)
    if name == DIGITS_NAME:
        return Metadata(DIGITS_NUM_TRAIN, DIGITS_NUM_CLASSES, DIGITS_IMAGE_SHAPE)
    if is_catalog_name(name):
        return Metadata(*catalog_metadata(name, data_dir=data_dir, image_size=image_size))
    if not _is_path(name):
        raise _unknown_name_error(name)
    return None


def load(
    name_or_path: str | os.PathLike,
    *,
    data_dir: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    subset: int | None = None,
    seed: int = 0,
    download: bool = False,
    image_size: int | None = None,
    in_memory: bool = False,
) -> Dataset:
    """Loads an image classification data set by name or path.

    Args:
        name_or_path: 'digits', a tfds catalog name (e.g. 'cifar10', 'cifar10:3.0.2'), or a
            path to a split/class/image folder or ``.tar``/``.tar.gz``/``.tgz`` archive. Names come
            first: write a folder called like a data set as './cifar10'.
        data_dir: tfds data dir for catalog sets (default ``TFDS_DATA_DIR`` or tfds' default).
        cache_dir: where folders/archives are cached as tfds data sets (default
            ``default_cache_dir()``).
        subset: if given, the train split is replaced by a stratified subset of this many
            examples drawn with ``seed`` (see ``stratified_indices``); statistics stay those of
            the full train split.
        seed: seed of the subset, a non-negative int.
        download: let tfds download a missing catalog set (needs internet). Off by default.
        image_size: for catalog sets, resize and centre-crop images to this square size
            (needed for sets of variable image size such as imagenet2012).
        in_memory: read every split into memory once (see ``to_memory``): faster batches for
            sets that fit in RAM, at the cost of reading the whole set now.

    Raises:
        ValueError: unknown name (the message lists the choices) or bad arguments.
        DatasetNotPreparedError: a catalog set is not prepared and ``download`` is False.
    """
    if isinstance(name_or_path, os.PathLike):
        name_or_path = os.fspath(name_or_path)
    if not isinstance(name_or_path, str) or not name_or_path:
        raise TypeError(f"name_or_path must be a non-empty str or path, got {name_or_path!r}")
    seed = check_int(seed, "seed", low=0)
    catalog = name_or_path != DIGITS_NAME and is_catalog_name(name_or_path)
    if image_size is not None and not catalog:
        raise ValueError(f"image_size applies to tfds catalog sets only, not {name_or_path!r}")
    if name_or_path == DIGITS_NAME:
        dataset = load_digits_dataset()
    elif catalog:
        dataset = load_catalog(
            name_or_path, data_dir=data_dir, download=download, image_size=image_size
        )
    elif _is_path(name_or_path):
        dataset = load_image_folder(name_or_path, cache_dir=cache_dir)
    else:
        raise _unknown_name_error(name_or_path)
    if subset is not None:
        dataset = train_subset(dataset, subset, seed)
    if in_memory:
        dataset = to_memory(dataset)
    return dataset


__all__ = [
    "ARCHIVE_SUFFIXES",
    "ArraySource",
    "Augmentation",
    "CATALOG_CHANNEL_STATS",
    "DIGITS_IMAGE_SHAPE",
    "DIGITS_NAME",
    "DIGITS_NUM_CLASSES",
    "DIGITS_NUM_TEST",
    "DIGITS_NUM_TRAIN",
    "Dataset",
    "DatasetNotPreparedError",
    "EpochBatches",
    "ImageSource",
    "KNOWN_CATALOG_NAMES",
    "Metadata",
    "SubsetSource",
    "TfdsSource",
    "augmentation_rng",
    "cache_entry_dir",
    "catalog_metadata",
    "catalog_names",
    "channel_stats",
    "decode_image",
    "default_cache_dir",
    "default_crop_padding",
    "draw_crop_flip",
    "epoch_permutation",
    "eval_batches",
    "is_archive_path",
    "is_catalog_name",
    "iterate_batches",
    "load",
    "load_catalog",
    "load_digits_dataset",
    "load_image_folder",
    "metadata",
    "normalize",
    "pad_crop_flip",
    "prefetch",
    "stratified_indices",
    "steps_per_epoch",
    "train_batches",
    "to_memory",
    "train_subset",
]
