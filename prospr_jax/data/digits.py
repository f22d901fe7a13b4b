"""scikit-learn's handwritten digits: a real, tiny data set that works offline.

``sklearn.datasets.load_digits`` ships with scikit-learn: 1,797 grey 8x8 images of the digits
0-9 (UCI optical recognition of handwritten digits), pixel values 0..16. They are split once,
deterministically and stratified by class, into 1,437 train and 360 test images.
"""

from __future__ import annotations

import numpy as np

from prospr_jax.data.dataset import Dataset, channel_stats, stratified_indices
from prospr_jax.data.sources import ArraySource

DIGITS_NAME = "digits"
DIGITS_NUM_TEST = 360
DIGITS_NUM_TRAIN = 1437
DIGITS_NUM_CLASSES = 10
DIGITS_IMAGE_SHAPE = (8, 8, 1)
# The train/test split never changes with the caller's seed: results stay comparable.
_SPLIT_SEED = 0


def load_digits_dataset() -> Dataset:
    """The digits data set: uint8 images [N, 8, 8, 1] with values 0..16, 10 classes.

    The test split is ``stratified_indices(labels, 360, seed=0)`` (35 to 37 images per digit)
    and the train split is the other 1,437 images, both in their original order. Mean and
    std are those of the train split, in pixel units (0..16).
    """
    from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel

    bunch = load_digits()
    images = np.asarray(bunch.images)
    if not np.array_equal(images, np.round(images)) or images.min() < 0 or images.max() > 16:
        raise ValueError("sklearn's digits are expected to hold integers 0..16")
    images = images.astype(np.uint8)[..., None]
    labels = np.asarray(bunch.target, np.int32)
    test = stratified_indices(labels, DIGITS_NUM_TEST, _SPLIT_SEED)
    train = np.setdiff1d(np.arange(len(labels)), test)
    mean, std = channel_stats(images[train])
    return Dataset(
        name=DIGITS_NAME,
        splits={
            "train": ArraySource(images[train], labels[train]),
            "test": ArraySource(images[test], labels[test]),
        },
        class_names=tuple(str(k) for k in range(DIGITS_NUM_CLASSES)),
        mean=mean,
        std=std,
        horizontal_flip_safe=False,
    )
