"""Image classification sets of the tensorflow-datasets catalog, read with random access.

A catalog set is read through ``builder.as_data_source()`` (array_record shards, no TensorFlow
needed), from ``data_dir`` (default: ``TFDS_DATA_DIR`` or tfds' default ``~/tensorflow_datasets``).
Nothing is downloaded unless the caller passes ``download=True``: a set that is not prepared
raises ``DatasetNotPreparedError`` telling how to prepare it on a machine with internet access.

Normalisation statistics: the usual published per-channel constants for the sets in
``CATALOG_CHANNEL_STATS``; for any other catalog set they are estimated on a seeded sample of
at most ``STATS_SAMPLE_SIZE`` train images.
"""

from __future__ import annotations

import functools
import os
import re

import numpy as np
import tensorflow_datasets as tfds

from prospr_jax.data.dataset import Dataset, default_eval_split, source_channel_stats
from prospr_jax.data.sources import TfdsSource

# (mean, std) per channel in [0, 1] units, over all train pixels.
CATALOG_CHANNEL_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "svhn_cropped": ((0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970)),
    "imagenet2012": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}
# Catalog sets whose classes are not invariant under a horizontal mirror.
_NOT_FLIP_SAFE = frozenset({"mnist", "emnist", "kmnist", "svhn_cropped"})
STATS_SAMPLE_SIZE = 10_000
_ARRAY_FORMATS = ("array_record", "parquet")


class DatasetNotPreparedError(FileNotFoundError):
    """A catalog data set is not prepared in the data dir and may not be downloaded."""


@functools.lru_cache(maxsize=1)
def catalog_names() -> tuple[str, ...]:
    """Names of the data sets in the installed tfds catalog (no network access)."""
    return tuple(sorted(tfds.list_builders(with_community_datasets=False)))


def catalog_base_name(name: str) -> str:
    """'cifar10' for 'cifar10', 'cifar10:3.0.2' or 'imagenet2012/subset'."""
    return re.split(r"[:/]", name, maxsplit=1)[0]


def is_catalog_name(name: str) -> bool:
    return catalog_base_name(name) in catalog_names()


def _resolved_data_dir(data_dir: str | os.PathLike | None) -> str:
    if data_dir is not None:
        return os.fspath(data_dir)
    default = getattr(tfds.core.constants, "get_default_data_dir", None)
    if default is not None:
        return default()
    return os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")


def _not_prepared_message(name: str, builder, data_dir: str) -> str:
    base = catalog_base_name(name)
    lines = [
        f"data set {name!r} is not prepared in data_dir {data_dir!r} (no prepared data at "
        f"{os.fspath(builder.data_dir)!r}) and download=False: nothing is downloaded at run time.",
    ]
    manual = (getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None) or "").strip()
    if manual:
        lines += [
            f"{name!r} must be downloaded by hand. From its tfds instructions:",
            "    " + "\n    ".join(line.strip() for line in manual.splitlines()),
            "Put those files in MANUAL_DIR, then run (TensorFlow is needed to prepare it):",
            "    pip install tensorflow tensorflow-datasets",
            f"    tfds build {base} --file_format=array_record --data_dir={data_dir} "
            "--manual_dir=MANUAL_DIR",
        ]
    else:
        lines += [
            "Prepare it on a machine with internet access (TensorFlow is needed to prepare it,",
            "not to read it):",
            "    pip install tensorflow tensorflow-datasets",
            f"    tfds build {base} --file_format=array_record --data_dir=DIR",
            f"then copy DIR/{base} into {data_dir!r} (or pass data_dir=DIR, or set TFDS_DATA_DIR).",
        ]
    return "\n".join(lines)


def catalog_metadata(
    name: str, *, data_dir: str | os.PathLike | None = None, image_size: int | None = None
) -> tuple[int, int, tuple[int, int, int] | None]:
    """What the prepared catalog set ``name`` holds, from its tfds metadata only (no example read).

    Args:
        name: a catalog name, optionally with ':version' or '/config'.
        data_dir: tfds data dir; default ``TFDS_DATA_DIR`` or tfds' default.
        image_size: the square size images will be resized to (``load_catalog``'s argument).

    Returns:
        ``(train examples, classes, image shape)``; the shape is None when the images have a
        variable size and no ``image_size`` is given.

    Raises:
        DatasetNotPreparedError: the set is not prepared in ``data_dir``.
        ValueError: the set has no 'train' split or is not an image classification set.
    """
    resolved_dir = _resolved_data_dir(data_dir)
    builder = tfds.builder(name, data_dir=resolved_dir, try_gcs=False)
    if not builder.is_prepared():
        raise DatasetNotPreparedError(_not_prepared_message(name, builder, resolved_dir))
    info = builder.info
    features = info.features
    if "image" not in features.keys() or not isinstance(features.get("label"), tfds.features.ClassLabel):
        raise ValueError(
            f"data set {name!r} is not an image classification set: expected an 'image' "
            f"feature and a ClassLabel 'label' feature, got {sorted(features.keys())}"
        )
    if "train" not in info.splits:
        raise ValueError(f"data set {name!r} has no 'train' split, only {sorted(info.splits)}")
    height, width, channels = features["image"].shape
    if image_size is not None:
        height = width = image_size
    shape = None if None in (height, width, channels) else (int(height), int(width), int(channels))
    return int(info.splits["train"].num_examples), int(features["label"].num_classes), shape


def load_catalog(
    name: str,
    *,
    data_dir: str | os.PathLike | None = None,
    download: bool = False,
    image_size: int | None = None,
) -> Dataset:
    """Opens the prepared tfds catalog set ``name`` ('cifar10', 'mnist', 'imagenet2012', ...).

    Args:
        name: a catalog name, optionally with ':version' or '/config'.
        data_dir: tfds data dir; default ``TFDS_DATA_DIR`` or tfds' default.
        download: allow tfds to download and prepare the set if it is missing (needs internet
            access and, for most sets, TensorFlow). Off by default.
        image_size: resize every image (shorter side, bilinear) and centre-crop to
            image_size x image_size; required for sets of variable image size (imagenet2012).

    Raises:
        DatasetNotPreparedError: the set is not prepared and ``download`` is False.
        ValueError: the set is prepared in a format without random access (tfrecord), or is
            not an image classification set with 'image' and 'label' features.
    """
    resolved_dir = _resolved_data_dir(data_dir)
    builder = tfds.builder(name, data_dir=resolved_dir, try_gcs=False)
    if not builder.is_prepared():
        if not download:
            raise DatasetNotPreparedError(_not_prepared_message(name, builder, resolved_dir))
        builder.download_and_prepare(file_format="array_record")
    file_format = builder.info.file_format
    format_name = getattr(file_format, "value", str(file_format))
    if format_name not in _ARRAY_FORMATS:
        raise ValueError(
            f"data set {name!r} in {os.fspath(builder.data_dir)!r} is stored as {format_name}, "
            "which has no random access. Convert it once with\n"
            f"    tfds convert_format --dataset_version_dir={os.fspath(builder.data_dir)} "
            "--out_file_format=array_record\n(or rebuild it with --file_format=array_record)."
        )
    features = builder.info.features
    names = list(features.keys())
    if "image" not in names or "label" not in names or not isinstance(
        features["label"], tfds.features.ClassLabel
    ):
        raise ValueError(
            f"data set {name!r} is not an image classification set: expected an 'image' "
            f"feature and a ClassLabel 'label' feature, got {sorted(names)}"
        )
    image_shape = features["image"].shape
    if features["image"].np_dtype != np.uint8:
        raise ValueError(f"data set {name!r} has {features['image'].np_dtype} images, not uint8")

    sources = builder.as_data_source()
    label_sources = builder.as_data_source(decoders={"image": tfds.decode.SkipDecoding()})
    splits = {
        str(split): TfdsSource(
            sources[split], image_shape, label_source=label_sources[split], image_size=image_size
        )
        for split in sources
    }
    if "train" not in splits:
        raise ValueError(f"data set {name!r} has no 'train' split, only {sorted(splits)}")

    base = catalog_base_name(name)
    if base in CATALOG_CHANNEL_STATS:
        mean, std = (255.0 * np.asarray(v, np.float32) for v in CATALOG_CHANNEL_STATS[base])
    else:
        mean, std = source_channel_stats(splits["train"], max_examples=STATS_SAMPLE_SIZE, seed=0)
    return Dataset(
        name=name,
        splits=splits,
        class_names=tuple(features["label"].names),
        mean=mean,
        std=std,
        eval_split=default_eval_split(list(splits)),
        horizontal_flip_safe=base not in _NOT_FLIP_SAFE,
    )
