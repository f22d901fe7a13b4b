"""Random access to the examples of one split.

An ``ImageSource`` is what the batch iterators read from: its length, the
shape of its images, its labels, and ``get_batch(indices)`` returning uint8
images [B, H, W, C] and int32 labels [B]. Three implementations:

* ``ArraySource``: images and labels held in memory (small sets such as digits).
* ``TfdsSource``: a ``tfds.data_source`` (array_record, random access, no
    TensorFlow needed), optionally resizing images of variable size.
* ``SubsetSource``: a fixed selection of indices of another source.
"""

from __future__ import annotations

import abc
import functools
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

ImageShape = tuple[int, int, int]

# Examples read per call when a whole split is scanned (labels, statistics).
_SCAN_CHUNK = 4096


def _as_index_array(indices: Any, length: int) -> np.ndarray:
    """Validates ``indices`` (ints in [0, length)) and returns them as int64 [B]."""
    indices = np.asarray(indices)
    if indices.ndim != 1:
        raise ValueError(f"indices must be one-dimensional, got shape {indices.shape}")
    if indices.size and not np.issubdtype(indices.dtype, np.integer):
        raise TypeError(f"indices must be integers, got dtype {indices.dtype}")
    indices = indices.astype(np.int64, copy=False)
    if indices.size and (indices.min() < 0 or indices.max() >= length):
        raise IndexError(
                f"indices must lie in [0, {length}), got values in "
                f"[{indices.min()}, {indices.max()}]"
        )
    return indices


class ImageSource(abc.ABC):
    """Random access to one split: uint8 images [H, W, C] and integer labels."""

    @property
    @abc.abstractmethod
    def image_shape(self) -> ImageShape:
        """Shape (H, W, C) of every image returned by ``get_batch``."""

    @abc.abstractmethod
    def __len__(self) -> int:
        """Number of examples."""

    @abc.abstractmethod
    def _read(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Reads validated int64 indices [B] -> (uint8 [B, H, W, C], int32 [B])."""

    def get_batch(self, indices: Sequence[int] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Returns (images uint8 [B, H, W, C], labels int32 [B]) in the given order."""
        indices = _as_index_array(indices, len(self))
        if indices.size == 0:
            return (np.zeros((0, *self.image_shape), np.uint8), np.zeros((0,), np.int32))
        return self._read(indices)

    def __getitem__(self, index: int) -> dict[str, Any]:
        """Example ``index`` (negative counts from the end) as {'image', 'label'}."""
        if not isinstance(index, (int, np.integer)):
            raise TypeError(f"index must be an int, got {type(index).__name__}")
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} examples")
        images, labels = self.get_batch([index % n])
        return {"image": images[0], "label": int(labels[0])}

    @property
    def labels(self) -> np.ndarray:
        """All labels, int32 [N] (read once and kept)."""
        return self._all_labels

    @functools.cached_property
    def _all_labels(self) -> np.ndarray:
        return self._scan_labels()

    def _scan_labels(self) -> np.ndarray:
        parts = [
                self.get_batch(np.arange(start, min(start + _SCAN_CHUNK, len(self))))[1]
                for start in range(0, len(self), _SCAN_CHUNK)
        ]
        return np.concatenate(parts) if parts else np.zeros((0,), np.int32)


class ArraySource(ImageSource):
    """Examples held in memory.

    Args:
        images: uint8 [N, H, W, C].
        labels: integer [N], stored as int32.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray):
        images = np.asarray(images)
        labels = np.asarray(labels)
        if images.ndim != 4 or images.dtype != np.uint8:
            raise ValueError(
                    f"images must be uint8 [N, H, W, C], got {images.dtype} {images.shape}"
            )
        if labels.shape != images.shape[:1] or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(
                    f"labels must be integers of shape ({images.shape[0]},), got "
                    f"{labels.dtype} {labels.shape}"
            )
        self.images = images
        self._labels = labels.astype(np.int32)

    @property
    def image_shape(self) -> ImageShape:
        return tuple(int(d) for d in self.images.shape[1:])

    def __len__(self) -> int:
        return self.images.shape[0]

    def _read(self, indices):
        return self.images[indices], self._labels[indices]

    def _scan_labels(self) -> np.ndarray:
        return self._labels


def resize_shorter_side_and_center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """Resizes uint8 [H, W, C] so the shorter side is ``size`` (bilinear), then crops the centre.

    Returns uint8 [size, size, C].
    """
    h, w, c = image.shape
    scale = size / min(h, w)
    new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
    if (new_h, new_w) != (h, w):
        pil = Image.fromarray(image[..., 0] if c == 1 else image)
        image = np.asarray(pil.resize((new_w, new_h), Image.BILINEAR)).reshape(new_h, new_w, c)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return image[top:top + size, left:left + size]


class TfdsSource(ImageSource):
    """A split read through a ``tfds`` random-access data source.

    Args:
        data_source: the split's data source (``builder.as_data_source()[split]``),
            whose examples hold an uint8 image [H, W, C] under ``image_key`` and an
            integer label under ``label_key``.
        image_shape: shape of the images as stored, None for a variable dimension.
        label_source: optional data source of the same split that does not decode
            the images (cheap label scans); defaults to ``data_source``.
        image_size: if given, every image is resized (shorter side to
            ``image_size``, bilinear) and centre-cropped to image_size x image_size.
            Required when the stored shape has a variable height or width.
    """

    def __init__(
            self,
            data_source: Any,
            image_shape: Sequence[int | None],
            *,
            label_source: Any = None,
            image_size: int | None = None,
            image_key: str = "image",
            label_key: str = "label",
    ):
        image_shape = tuple(image_shape)
        if len(image_shape) != 3 or image_shape[2] is None:
            raise ValueError(f"image_shape must be (H, W, C) with known C, got {image_shape}")
        if image_size is None and None in image_shape[:2]:
            raise ValueError(
                    f"images have a variable size {image_shape}: pass image_size "
                    "(a positive int) to resize them"
            )
        if image_size is not None and (not isinstance(image_size, int) or image_size <= 0):
            raise ValueError(f"image_size must be a positive int or None, got {image_size!r}")
        self._source = data_source
        self._label_source = data_source if label_source is None else label_source
        self._stored_shape = image_shape
        self._image_size = image_size
        self._image_key = image_key
        self._label_key = label_key

    @property
    def image_shape(self) -> ImageShape:
        if self._image_size is not None:
            return (self._image_size, self._image_size, self._stored_shape[2])
        return tuple(int(d) for d in self._stored_shape)

    def __len__(self) -> int:
        return len(self._source)

    def _image(self, record: dict[str, Any]) -> np.ndarray:
        image = np.asarray(record[self._image_key])
        if image.ndim == 2:
            image = image[..., None]
        if self._image_size is not None:
            image = resize_shorter_side_and_center_crop(image, self._image_size)
        return image

    def _read(self, indices):
        records = self._source.__getitems__([int(i) for i in indices])
        images = np.stack([self._image(r) for r in records]).astype(np.uint8, copy=False)
        labels = np.asarray([r[self._label_key] for r in records], np.int32)
        return images, labels

    def _scan_labels(self) -> np.ndarray:
        n = len(self)
        parts = []
        for start in range(0, n, _SCAN_CHUNK):
            keys = list(range(start, min(start + _SCAN_CHUNK, n)))
            records = self._label_source.__getitems__(keys)
            parts.append(np.asarray([r[self._label_key] for r in records], np.int32))
        return np.concatenate(parts) if parts else np.zeros((0,), np.int32)


class SubsetSource(ImageSource):
    """The examples ``indices`` (int [M], each in [0, len(base))) of ``base``, in that order."""

    def __init__(self, base: ImageSource, indices: Sequence[int] | np.ndarray):
        self.base = base
        self.indices = _as_index_array(indices, len(base))

    @property
    def image_shape(self) -> ImageShape:
        return self.base.image_shape

    def __len__(self) -> int:
        return self.indices.shape[0]

    def _read(self, indices):
        return self.base.get_batch(self.indices[indices])

    def _scan_labels(self) -> np.ndarray:
        return self.base.labels[self.indices]
