"""The ``Dataset`` record, per-channel statistics and stratified subsets."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np

from prospr_jax._src.validate import check_int
from prospr_jax.data.sources import ArraySource, ImageSource, ImageShape, SubsetSource

# Split names accepted as the evaluation split when there is no 'test' split, in order.
_EVAL_SPLIT_FALLBACKS = ("test", "validation", "val", "valid")
# Examples read per chunk when statistics are computed from a source.
_STATS_CHUNK = 2048
# Largest split `to_memory` reads into memory, in bytes.
MAX_IN_MEMORY_BYTES = 8 * 2**30


@dataclasses.dataclass(frozen=True)
class Dataset:
    """An image classification data set with random access to each split.

    Attributes:
        name: the data set's name ('digits', a catalog name, or the archive/folder name).
        splits: split name -> ``ImageSource``; always has 'train'.
        class_names: name of each class; label k is ``class_names[k]``.
        mean: float32 [C], per-channel mean of the train split, in raw pixel units (0..255 for
            uint8 images, 0..16 for digits). For the catalog sets it is a known constant.
        std: float32 [C], per-channel standard deviation (over all train pixels), same units.
        eval_split: the split used for evaluation ('test', or 'validation'/'val' when the data
            set has no 'test' split).
        horizontal_flip_safe: False for data sets whose classes change under a mirror (digits,
            MNIST, SVHN); the training iterator then does not flip unless asked to.

    Normalised images are ``(image - mean) / std`` (see ``prospr_jax.data.normalize``).
    """

    name: str
    splits: Mapping[str, ImageSource]
    class_names: tuple[str, ...]
    mean: np.ndarray
    std: np.ndarray
    eval_split: str | None = "test"
    horizontal_flip_safe: bool = True

    def __post_init__(self):
        if "train" not in self.splits:
            raise ValueError(f"a Dataset needs a 'train' split, got splits {sorted(self.splits)}")
        if self.eval_split is not None and self.eval_split not in self.splits:
            raise ValueError(
                f"eval_split {self.eval_split!r} is not one of the splits {sorted(self.splits)}"
            )
        shapes = {name: source.image_shape for name, source in self.splits.items()}
        if len(set(shapes.values())) != 1:
            raise ValueError(f"all splits must share one image shape, got {shapes}")
        channels = self.image_shape[2]
        for field in ("mean", "std"):
            value = np.asarray(getattr(self, field), np.float32)
            if value.shape != (channels,):
                raise ValueError(f"{field} must have shape ({channels},), got {value.shape}")
            object.__setattr__(self, field, value)
        if np.any(self.std <= 0):
            raise ValueError(f"std must be positive, got {self.std}")
        object.__setattr__(self, "class_names", tuple(self.class_names))

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> ImageShape:
        """(H, W, C) of every image."""
        return self.splits["train"].image_shape

    @property
    def train(self) -> ImageSource:
        return self.splits["train"]

    @property
    def test(self) -> ImageSource:
        """The evaluation split (``eval_split``)."""
        if self.eval_split is None:
            raise ValueError(
                f"data set {self.name!r} has no evaluation split (splits: {sorted(self.splits)})"
            )
        return self.splits[self.eval_split]

    def __getitem__(self, split: str) -> ImageSource:
        if split not in self.splits:
            raise KeyError(
                f"unknown split {split!r}; splits of {self.name!r}: {sorted(self.splits)}"
            )
        return self.splits[split]


def default_eval_split(split_names: Sequence[str]) -> str | None:
    """'test' if present, else 'validation', 'val' or 'valid', else None."""
    for name in _EVAL_SPLIT_FALLBACKS:
        if name in split_names:
            return name
    return None


def channel_stats(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and standard deviation of images [N, H, W, C] over N, H and W.

    The population standard deviation (divide by N*H*W), computed in float64 by chunks.
    Returns two float32 arrays [C].
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"images must be a non-empty [N, H, W, C] array, got {images.shape}")
    total = np.zeros(images.shape[-1], np.float64)
    total_sq = np.zeros(images.shape[-1], np.float64)
    for start in range(0, images.shape[0], _STATS_CHUNK):
        chunk = images[start:start + _STATS_CHUNK].astype(np.float64)
        total += chunk.sum(axis=(0, 1, 2))
        total_sq += np.square(chunk).sum(axis=(0, 1, 2))
    count = images.shape[0] * images.shape[1] * images.shape[2]
    mean = total / count
    var = np.maximum(total_sq / count - np.square(mean), 0.0)
    return mean.astype(np.float32), np.sqrt(var).astype(np.float32)


def source_channel_stats(
    source: ImageSource, max_examples: int | None = None, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """``channel_stats`` of a source, of all its examples or of a seeded sample of ``max_examples``."""
    n = len(source)
    if max_examples is not None and max_examples < n:
        indices = np.sort(np.random.default_rng(seed).choice(n, max_examples, replace=False))
    else:
        indices = np.arange(n)
    chunks = [
        source.get_batch(indices[start:start + _STATS_CHUNK])[0]
        for start in range(0, len(indices), _STATS_CHUNK)
    ]
    return channel_stats(np.concatenate(chunks))


def stratified_indices(labels: np.ndarray, num: int, seed: int) -> np.ndarray:
    """Chooses ``num`` of the examples with the given labels, keeping the class proportions.

    Class c with n_c of the N examples gets floor(num * n_c / N) examples, plus one for the
    classes with the largest remainders (ties: lower class first) until ``num`` are chosen;
    within a class the examples are the first of a permutation drawn with
    ``np.random.default_rng(seed)`` (classes visited in increasing order).

    Args:
        labels: integer [N].
        num: how many to choose, 0 < num <= N.
        seed: non-negative int.

    Returns:
        int64 [num], sorted indices into ``labels``.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be one-dimensional, got shape {labels.shape}")
    num = check_int(num, "num", low=1, high=len(labels))
    classes, counts = np.unique(labels, return_counts=True)
    exact = num * counts / len(labels)
    quotas = np.floor(exact).astype(np.int64)
    remainder = int(num - quotas.sum())
    # Largest fractional part first; a stable sort keeps lower classes first among ties.
    order = np.argsort(-(exact - quotas), kind="stable")
    quotas[order[:remainder]] += 1
    rng = np.random.default_rng(seed)
    chosen = [
        rng.permutation(np.flatnonzero(labels == c))[:q] for c, q in zip(classes, quotas)
    ]
    return np.sort(np.concatenate(chosen))


def train_subset(dataset: Dataset, num: int, seed: int = 0) -> Dataset:
    """The data set with its train split replaced by a stratified subset of ``num`` examples.

    The normalisation statistics stay those of the full train split; the other splits are
    unchanged. See ``stratified_indices`` for how the subset is drawn.

    Raises:
        ValueError: ``num`` is not in [1, train size], or the subset would leave a class of the
            train split without examples (always so when ``num`` is smaller than the number of
            classes; with very unbalanced classes also for a larger ``num``).
    """
    train = dataset.splits["train"]
    num = check_int(num, "subset", low=1, high=len(train))
    present = np.unique(train.labels)
    if num < len(present):
        raise ValueError(
            f"`subset` {num} is smaller than the number of classes ({len(present)}): a stratified "
            f"subset of {num} examples would drop {len(present) - num} classes; use `subset` >= {len(present)}"
        )
    indices = stratified_indices(train.labels, int(num), seed)
    missing = np.setdiff1d(present, train.labels[indices])
    if missing.size:
        names = [dataset.class_names[c] if c < len(dataset.class_names) else str(c) for c in missing[:10]]
        raise ValueError(
            f"`subset` {num} would have no example of {missing.size} of the {len(present)} classes "
            f"(e.g. {', '.join(names)}: too few in the train split for their share); use a larger `subset`"
        )
    splits = dict(dataset.splits)
    splits["train"] = SubsetSource(train, indices)
    return dataclasses.replace(dataset, splits=splits)


def source_to_memory(source: ImageSource) -> ArraySource:
    """Reads every example of ``source`` (in index order) into an ``ArraySource``."""
    if isinstance(source, ArraySource):
        return source
    n = len(source)
    nbytes = n * int(np.prod(source.image_shape))
    if nbytes > MAX_IN_MEMORY_BYTES:
        raise ValueError(
            f"a split of {n} images {source.image_shape} needs {nbytes / 2**30:.1f} GiB, more "
            f"than the {MAX_IN_MEMORY_BYTES / 2**30:.0f} GiB allowed in memory: use in_memory=False"
        )
    images = np.empty((n, *source.image_shape), np.uint8)
    labels = np.empty((n,), np.int32)
    for start in range(0, n, _STATS_CHUNK):
        stop = min(start + _STATS_CHUNK, n)
        images[start:stop], labels[start:stop] = source.get_batch(np.arange(start, stop))
    return ArraySource(images, labels)


def to_memory(dataset: Dataset) -> Dataset:
    """The data set with every split read once into memory (fast random access).

    Worth it when the batches are needed faster than a tfds data source delivers them
    (about 10-20k images/s for 32x32 images on 2 CPU cores); costs the decoded size in RAM
    (about 180 MB for CIFAR-10). Splits larger than ``MAX_IN_MEMORY_BYTES`` raise ValueError.
    """
    splits = {name: source_to_memory(source) for name, source in dataset.splits.items()}
    return dataclasses.replace(dataset, splits=splits)
