"""Training augmentation (random crop with zero padding, horizontal flip) and normalisation.

Vectorised numpy on whole batches. The crop follows torchvision's ``RandomCrop(size, padding)``
as used in the ProsPr code for CIFAR: the uint8 image is padded with zeros (black, before
normalisation) by ``padding`` pixels on each side and a window of the original size is cut at
a uniformly drawn offset; the flip mirrors the width axis with probability 1/2.
"""

from __future__ import annotations

import numpy as np


def pad_crop_flip(
    images: np.ndarray, offsets: np.ndarray, flips: np.ndarray, padding: int
) -> np.ndarray:
    """Crops each zero-padded image at its offset and mirrors the flagged ones.

    Args:
        images: [B, H, W, C], any dtype.
        offsets: int [B, 2], (row, column) of each crop's top-left corner in the padded image,
            each in [0, 2 * padding].
        flips: bool [B], mirror the width axis of these crops.
        padding: zero pixels added on each side, >= 0.

    Returns:
        [B, H, W, C], same dtype: out[b] = pad(images[b])[r:r + H, c:c + W] (then [:, ::-1]).
    """
    images = np.asarray(images)
    offsets = np.asarray(offsets)
    flips = np.asarray(flips, bool)
    if images.ndim != 4:
        raise ValueError(f"images must be [B, H, W, C], got shape {images.shape}")
    b, h, w, c = images.shape
    if not isinstance(padding, (int, np.integer)) or padding < 0:
        raise ValueError(f"padding must be a non-negative int, got {padding!r}")
    if offsets.shape != (b, 2) or flips.shape != (b,):
        raise ValueError(
            f"offsets must be [{b}, 2] and flips [{b}], got {offsets.shape} and {flips.shape}"
        )
    if offsets.size and (offsets.min() < 0 or offsets.max() > 2 * padding):
        raise ValueError(f"offsets must lie in [0, {2 * padding}] for padding {padding}")
    padded = np.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    padded_h, padded_w = h + 2 * padding, w + 2 * padding
    rows = offsets[:, 0, None] + np.arange(h)  # [B, H]
    cols = offsets[:, 1, None] + np.arange(w)  # [B, W]
    cols = np.where(flips[:, None], cols[:, ::-1], cols)
    # Gather whole pixels (all C channels as one opaque item) by flat position.
    pixels = padded.view(np.dtype((np.void, c * images.itemsize))).reshape(-1)
    flat = (np.arange(b)[:, None, None] * padded_h + rows[:, :, None]) * padded_w + cols[:, None, :]
    return np.take(pixels, flat).view(images.dtype).reshape(b, h, w, c)


def draw_crop_flip(
    rng: np.random.Generator, batch_size: int, padding: int, flip: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Draws crop offsets int64 [B, 2] uniform in [0, 2 * padding] and flips bool [B].

    Flips are Bernoulli(1/2) when ``flip``, else all False. The offsets are drawn first, then
    the flips, from ``rng``.
    """
    offsets = rng.integers(0, 2 * padding + 1, size=(batch_size, 2))
    flips = rng.random(batch_size) < 0.5 if flip else np.zeros(batch_size, bool)
    return offsets, flips


def normalize(images: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """(images - mean) / std per channel, as float32 [B, H, W, C]; mean and std are [C]."""
    mean = np.asarray(mean, np.float32)
    scale = 1.0 / np.asarray(std, np.float32)
    return (np.asarray(images, np.float32) - mean) * scale
