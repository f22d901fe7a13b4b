"""Batches for training and evaluation: deterministic order, augmentation, prefetching.

Every batch is a dict {'image': float32 [B, H, W, C] normalised per channel,
'label': int32 [B]} (plus 'mask' float32 [B] when the last batch is padded).

Determinism, for exact resume after a crash: the order of epoch ``e`` is the permutation
``np.random.default_rng([seed, e, 0]).permutation(N)``, and the augmentation draws of step ``s``
of that epoch come from ``np.random.default_rng([seed, e, 1, s])``. So the batches of an epoch
depend only on (seed, epoch), and ``start_step`` skips batches without reading them. A batch is
a pure function of its step, so its rows can be split between processes (``rows``: each process
reads only its share of every global batch) and batches can be built in parallel.

Parallel reading: by default one background thread builds the next ``prefetch`` batches. With
``workers=K > 0`` a grain pipeline (``grain.MapDataset`` over the steps, read by K threads) builds
them instead, in the same order and with the same contents; it pays off when decoding
dominates (JPEG-backed catalog sets, large images), see experiments/bench_input_pipeline.py.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from prospr_jax._src.validate import check_int
from prospr_jax.data.augment import draw_crop_flip, normalize, pad_crop_flip
from prospr_jax.data.dataset import Dataset
from prospr_jax.data.sources import ImageSource

Batch = dict[str, np.ndarray]


def _check_int(name: str, value: Any, minimum: int) -> int:
    return check_int(value, name, low=minimum)


def steps_per_epoch(
    num_examples: int | ImageSource | Dataset, batch_size: int, drop_remainder: bool = True
) -> int:
    """Batches in one epoch: floor(N / B) with ``drop_remainder``, else ceil(N / B).

    ``num_examples`` is N, or a split (N = its length), or a Dataset (N = its train split's).
    """
    if isinstance(num_examples, Dataset):
        num_examples = len(num_examples.train)
    elif isinstance(num_examples, ImageSource):
        num_examples = len(num_examples)
    num_examples = _check_int("num_examples", num_examples, 0)
    batch_size = _check_int("batch_size", batch_size, 1)
    if drop_remainder:
        return num_examples // batch_size
    return -(-num_examples // batch_size)


def epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
    """The example order of epoch ``epoch``: a permutation int64 [N] fixed by (seed, epoch)."""
    num_examples = _check_int("num_examples", num_examples, 0)
    seed, epoch = _check_int("seed", seed, 0), _check_int("epoch", epoch, 0)
    return np.random.default_rng([seed, epoch, 0]).permutation(num_examples)


def augmentation_rng(seed: int, epoch: int, step: int) -> np.random.Generator:
    """The generator of the augmentation draws of batch ``step`` of epoch ``epoch``."""
    return np.random.default_rng([seed, epoch, 1, step])


def default_crop_padding(image_shape: tuple[int, int, int]) -> int:
    """min(H, W) // 8, at least 1: 4 for 32x32 images, 3 for 28x28, 1 for 8x8."""
    return max(1, min(image_shape[0], image_shape[1]) // 8)


@dataclasses.dataclass(frozen=True)
class Augmentation:
    """Training augmentation: random crop with ``crop_padding`` zero pixels each side (0 = no
    crop) and a horizontal flip with probability 1/2 (``flip``)."""

    crop_padding: int = 4
    flip: bool = True

    def __post_init__(self):
        _check_int("crop_padding", self.crop_padding, 0)
        if not isinstance(self.flip, bool):
            raise TypeError(f"flip must be a bool, got {self.flip!r}")

    def __call__(
        self, images: np.ndarray, rng: np.random.Generator, *, batch_size: int | None = None,
        rows: slice | None = None,
    ) -> np.ndarray:
        """Augment ``images``: a whole batch, or the ``rows`` (of a batch of ``batch_size``) that were
        read. The draws are always those of the whole batch, so the rows a process reads are augmented
        exactly as in a single-process run."""
        if self.crop_padding == 0 and not self.flip:
            return images
        offsets, flips = draw_crop_flip(
            rng, images.shape[0] if rows is None else batch_size, self.crop_padding, self.flip
        )
        if rows is not None:
            offsets, flips = offsets[rows], flips[rows]
        return pad_crop_flip(images, offsets, flips, self.crop_padding)


@dataclasses.dataclass(frozen=True, eq=False)
class EpochBatches(Iterable[Batch]):
    """The batches of one pass over a source; iterate it (repeatably) or take its ``len``.

    Built by ``train_batches``, ``eval_batches`` or ``iterate_batches``; see the latter for fields.
    """

    source: ImageSource
    batch_size: int
    mean: np.ndarray
    std: np.ndarray
    shuffle: bool = False
    seed: int = 0
    epoch: int = 0
    drop_remainder: bool = False
    pad_remainder: bool = False
    augmentation: Augmentation | None = None
    start_step: int = 0
    prefetch: int = 2
    rows: slice | None = None
    workers: int = 0

    def __len__(self) -> int:
        return max(0, self.num_steps - self.start_step)

    @property
    def num_steps(self) -> int:
        """Batches in the whole epoch (including those skipped by ``start_step``)."""
        return steps_per_epoch(len(self.source), self.batch_size, self.drop_remainder)

    def batch_indices(self, step: int) -> np.ndarray:
        """Indices into the source of batch ``step`` (int64 [B]; the last may be shorter)."""
        order = self._order()
        return order[step * self.batch_size:(step + 1) * self.batch_size]

    def _order(self) -> np.ndarray:
        n = len(self.source)
        if self.shuffle:
            return epoch_permutation(n, self.seed, self.epoch)
        return np.arange(n)

    def _make_batch(self, step: int, indices: np.ndarray) -> Batch:
        real = len(indices)
        size = self.batch_size if self.pad_remainder else real
        rows = range(size)[self.rows] if self.rows is not None else range(size)
        kept = slice(rows.start, min(rows.stop, real))  # the rows read that hold real examples
        images, labels = self.source.get_batch(indices[kept])
        if self.augmentation is not None:
            rng = augmentation_rng(self.seed, self.epoch, step)
            images = self.augmentation(images, rng, batch_size=real, rows=kept)
        batch = {"image": normalize(images, self.mean, self.std), "label": labels}
        if self.pad_remainder:
            count = len(rows)
            have = max(0, kept.stop - kept.start)
            mask = np.zeros(count, np.float32)
            mask[:have] = 1.0
            if have < count:
                pad = count - have
                batch["image"] = np.concatenate(
                    [batch["image"], np.zeros((pad, *batch["image"].shape[1:]), np.float32)]
                )
                batch["label"] = np.concatenate([batch["label"], np.zeros(pad, np.int32)])
            batch["mask"] = mask
        return batch

    def _generate(self) -> Iterator[Batch]:
        order = self._order()
        for step in range(self.start_step, self.num_steps):
            indices = order[step * self.batch_size:(step + 1) * self.batch_size]
            yield self._make_batch(step, indices)

    def _grain(self) -> Iterator[Batch]:
        import grain  # noqa: PLC0415 - optional: only the workers>0 path needs it

        order = self._order()

        def batch_at(step: int) -> Batch:
            return self._make_batch(step, order[step * self.batch_size:(step + 1) * self.batch_size])

        steps = grain.MapDataset.range(self.start_step, max(self.start_step, self.num_steps))
        options = grain.ReadOptions(num_threads=self.workers, prefetch_buffer_size=max(self.prefetch, self.workers))
        return iter(steps.map(batch_at).to_iter_dataset(options))

    def __iter__(self) -> Iterator[Batch]:
        if self.workers:
            return self._grain()
        return prefetch(self._generate(), self.prefetch)


def iterate_batches(
    source: ImageSource,
    *,
    batch_size: int,
    mean: np.ndarray,
    std: np.ndarray,
    shuffle: bool = False,
    seed: int = 0,
    epoch: int = 0,
    drop_remainder: bool = False,
    pad_remainder: bool = False,
    augmentation: Augmentation | None = None,
    start_step: int = 0,
    prefetch: int = 2,
    rows: slice | None = None,
    workers: int = 0,
) -> EpochBatches:
    """Batches of one pass over ``source``.

    Args:
        source: the split to read.
        batch_size: examples per batch, >= 1.
        mean, std: float [C] normalisation constants (pixel units).
        shuffle: visit the examples in ``epoch_permutation(N, seed, epoch)`` order, else in
            index order.
        seed, epoch: non-negative ints fixing the order and the augmentation draws.
        drop_remainder: leave out the last batch if it is smaller than ``batch_size``.
        pad_remainder: pad a smaller last batch to ``batch_size`` with zero images and label 0,
            and add 'mask' (float32 [B], 1 = real example) to every batch.
        augmentation: applied to the uint8 images before normalisation, or None.
        start_step: first batch to produce (resume inside an epoch).
        prefetch: batches prepared ahead by a background thread; 0 = no thread.
        rows: read only these rows of every batch (one process's share of a global batch, see
            ``prospr_jax.process_rows``); the order and the augmentation draws are those of the whole
            batch. Default: every row.
        workers: 0 = one background thread (``prefetch`` batches ahead); K > 0 = a grain pipeline
            reading with K threads (same batches, see the module docstring).
    """
    _check_int("batch_size", batch_size, 1)
    if rows is not None and (not isinstance(rows, slice) or rows.step not in (None, 1)):
        raise TypeError(f"`rows` must be a contiguous slice or None, got {rows!r}")
    _check_int("seed", seed, 0)
    _check_int("epoch", epoch, 0)
    _check_int("start_step", start_step, 0)
    _check_int("prefetch", prefetch, 0)
    _check_int("workers", workers, 0)
    if drop_remainder and pad_remainder:
        raise ValueError("drop_remainder and pad_remainder cannot both be True")
    if augmentation is not None and not isinstance(augmentation, Augmentation):
        raise TypeError(f"augmentation must be an Augmentation or None, got {augmentation!r}")
    return EpochBatches(
        source=source,
        batch_size=int(batch_size),
        mean=np.asarray(mean, np.float32),
        std=np.asarray(std, np.float32),
        shuffle=bool(shuffle),
        seed=int(seed),
        epoch=int(epoch),
        drop_remainder=bool(drop_remainder),
        pad_remainder=bool(pad_remainder),
        augmentation=augmentation,
        start_step=int(start_step),
        prefetch=int(prefetch),
        rows=rows,
        workers=int(workers),
    )


def train_batches(
    dataset: Dataset,
    *,
    batch_size: int,
    epoch: int,
    seed: int = 0,
    augment: bool = True,
    crop_padding: int | None = None,
    flip: bool | None = None,
    drop_remainder: bool = True,
    start_step: int = 0,
    prefetch: int = 2,
    rows: slice | None = None,
    workers: int = 0,
) -> EpochBatches:
    """The shuffled, augmented training batches of epoch ``epoch`` (same seed+epoch -> same batches).

    Args:
        dataset: the data set; its 'train' split is read.
        batch_size: examples per batch.
        epoch: epoch number (>= 0); each epoch has its own order and augmentation draws.
        seed: non-negative int.
        augment: apply the training augmentation at all.
        crop_padding: zero padding of the random crop; default ``default_crop_padding``
            (4 for 32x32 images); 0 = no crop.
        flip: random horizontal flip; default ``dataset.horizontal_flip_safe``.
        drop_remainder: leave out the last smaller batch (default True).
        start_step: first batch of the epoch to produce (resume inside an epoch).
        prefetch: batches prepared ahead by a background thread.
        rows: this process's rows of every global batch (see ``iterate_batches``).
        workers: parallel reading with a grain pipeline (see ``iterate_batches``).
    """
    augmentation = None
    if augment:
        augmentation = Augmentation(
            crop_padding=default_crop_padding(dataset.image_shape)
            if crop_padding is None else crop_padding,
            flip=dataset.horizontal_flip_safe if flip is None else flip,
        )
    return iterate_batches(
        dataset.train,
        batch_size=batch_size,
        mean=dataset.mean,
        std=dataset.std,
        shuffle=True,
        seed=seed,
        epoch=epoch,
        drop_remainder=drop_remainder,
        augmentation=augmentation,
        start_step=start_step,
        prefetch=prefetch,
        rows=rows,
        workers=workers,
    )


def eval_batches(
    dataset: Dataset,
    *,
    batch_size: int,
    split: str | None = None,
    pad_remainder: bool = False,
    prefetch: int = 2,
    rows: slice | None = None,
    workers: int = 0,
) -> EpochBatches:
    """Every example of ``split`` (default: the evaluation split) exactly once, in index order,
    without augmentation; the last batch is smaller unless ``pad_remainder``; ``rows`` reads one
    process's rows of every batch and ``workers`` reads in parallel (see ``iterate_batches``)."""
    source = dataset.test if split is None else dataset[split]
    return iterate_batches(
        source,
        batch_size=batch_size,
        mean=dataset.mean,
        std=dataset.std,
        pad_remainder=pad_remainder,
        prefetch=prefetch,
        rows=rows,
        workers=workers,
    )


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


_END = object()


def prefetch(iterator: Iterator[Any], buffer_size: int) -> Iterator[Any]:
    """Runs ``iterator`` in a background thread, keeping up to ``buffer_size`` items ready.

    Items come out in order; an exception raised by ``iterator`` is raised by the consumer.
    Closing the returned generator (or dropping it) stops the thread. ``buffer_size`` 0 returns
    the items without a thread.
    """
    buffer_size = _check_int("buffer_size", buffer_size, 0)
    if buffer_size == 0:
        yield from iterator
        return
    items: queue.Queue = queue.Queue(maxsize=buffer_size)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                items.put(item, timeout=0.05)
                return True
            except queue.Full:
                pass
        return False

    def produce():
        try:
            for item in iterator:
                if not put(item):
                    return
            put(_END)
        except BaseException as e:  # Handed to the consumer.
            put(_Failure(e))

    thread = threading.Thread(target=produce, name="prospr_jax-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = items.get()
            if item is _END:
                return
            if isinstance(item, _Failure):
                raise item.error
            yield item
    finally:
        stop.set()
        thread.join()
