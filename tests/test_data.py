"""Tests of prospr_jax.data: sources, the image-folder cache, digits, augmentation, batching."""

from __future__ import annotations

import io
import os
import tarfile
import time

import numpy as np
import pytest
from PIL import Image

import prospr_jax.data as pdata
from prospr_jax.data import image_folder

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_CIFAR10 = os.path.join(REPO_ROOT, "..", "shared", "data", "cifar10-jpeg.tar.gz")

# Created in this (unsorted) order; the class index must follow sorted order.
CLASSES = ("dog", "airplane", "cat")
COUNTS = {"train": {"dog": 3, "airplane": 4, "cat": 2}, "test": {"dog": 2, "airplane": 1, "cat": 2}}
SHAPE = (6, 5, 3)  # H != W catches a transposed axis.


def _png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(buf, format="PNG")
    return buf.getvalue()


def _write(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def _make_tree(root: str, seed: int = 0, counts=COUNTS) -> dict:
    """Writes root/split/class/NNN.png of random pixels; returns {split: [(class, name, array)]}."""
    rng = np.random.default_rng(seed)
    written = {}
    for split, per_class in counts.items():
        written[split] = []
        for cls in CLASSES:
            # Names written in reverse so that directory order differs from sorted order.
            for k in reversed(range(per_class[cls])):
                array = rng.integers(0, 256, SHAPE, dtype=np.uint8)
                name = f"{k:03d}.png"
                _write(os.path.join(root, split, cls, name), _png_bytes(array))
                written[split].append((cls, name, array))
    return written


def _make_tar(folder: str, archive: str, top: str | None = None) -> str:
    with tarfile.open(archive, "w:gz") as tar:
        for entry in sorted(os.listdir(folder)):
            arcname = entry if top is None else f"{top}/{entry}"
            tar.add(os.path.join(folder, entry), arcname=arcname)
    return archive


def _expected_split(written: dict, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images and labels in the documented order: sorted class name, then sorted file name."""
    order = sorted(written[split], key=lambda item: (item[0], item[1]))
    sorted_classes = sorted(CLASSES)
    images = np.stack([a for _, _, a in order])
    labels = np.array([sorted_classes.index(c) for c, _, _ in order])
    return images, labels


@pytest.fixture()
def tree(tmp_path):
    root = str(tmp_path / "toy")
    return root, _make_tree(root)


@pytest.mark.parametrize("kind", ["folder", "tar.gz", "tar.gz with top folder"])
def test_image_folder_loads_splits_classes_and_pixels(tree, tmp_path, kind):
    root, written = tree
    if kind == "folder":
        source = root
    else:
        top = "toy" if "top" in kind else None
        source = _make_tar(root, str(tmp_path / "toy.tar.gz"), top=top)
    ds = pdata.load(source, cache_dir=str(tmp_path / "cache"))

    assert ds.class_names == ("airplane", "cat", "dog")
    assert ds.num_classes == 3
    assert ds.image_shape == SHAPE
    assert sorted(ds.splits) == ["test", "train"]
    for split in ("train", "test"):
        images, labels = _expected_split(written, split)
        source_split = ds[split]
        assert len(source_split) == sum(COUNTS[split].values())
        got_images, got_labels = source_split.get_batch(np.arange(len(source_split)))
        assert got_images.dtype == np.uint8 and got_images.shape == (len(labels), *SHAPE)
        assert got_labels.dtype == np.int32
        np.testing.assert_array_equal(got_labels, labels)
        np.testing.assert_array_equal(got_images, images)  # PNG is lossless.
        for k, cls in enumerate(sorted(CLASSES)):
            assert np.sum(got_labels == k) == COUNTS[split][cls]
        example = source_split[-1]
        np.testing.assert_array_equal(example["image"], images[-1])
        assert example["label"] == labels[-1]
    train_images, _ = _expected_split(written, "train")
    as_float = train_images.astype(np.float64)
    np.testing.assert_allclose(ds.mean, as_float.mean(axis=(0, 1, 2)), rtol=1e-5)
    np.testing.assert_allclose(ds.std, as_float.std(axis=(0, 1, 2)), rtol=1e-5)


def test_greyscale_and_jpeg_images_decode_to_hwc_uint8(tmp_path):
    root = tmp_path / "grey"
    rng = np.random.default_rng(1)
    grey = {}
    for split in ("train", "test"):
        for cls in ("a", "b"):
            array = rng.integers(0, 256, (7, 9), dtype=np.uint8)
            grey[(split, cls)] = array
            buf = io.BytesIO()
            Image.fromarray(array).save(buf, format="PNG")
            _write(str(root / split / cls / "x.png"), buf.getvalue())
    ds = pdata.load(str(root), cache_dir=str(tmp_path / "cache"))
    assert ds.image_shape == (7, 9, 1)
    np.testing.assert_array_equal(ds.train[1]["image"][..., 0], grey[("train", "b")])

    smooth = np.tile(np.linspace(0, 255, 16, dtype=np.uint8)[None, :, None], (12, 1, 3))
    buf = io.BytesIO()
    Image.fromarray(smooth).save(buf, format="JPEG", quality=95)
    decoded = pdata.decode_image(buf.getvalue(), "smooth.jpg")
    assert decoded.shape == (12, 16, 3) and decoded.dtype == np.uint8
    assert np.abs(decoded.astype(int) - smooth.astype(int)).max() <= 8


def test_cache_is_reused_and_rebuilt_when_archive_changes(tree, tmp_path, monkeypatch):
    root, _ = tree
    cache = str(tmp_path / "cache")
    archive = _make_tar(root, str(tmp_path / "toy.tar.gz"))
    first = pdata.load(archive, cache_dir=cache)
    entries = sorted(e for e in os.listdir(cache) if not e.startswith("."))
    assert len(entries) == 1
    assert pdata.cache_entry_dir(archive, cache) == os.path.join(cache, entries[0])

    def no_build(*args, **kwargs):
        raise AssertionError("the cache should have been reused")

    monkeypatch.setattr(image_folder, "_build_cache_entry", no_build)
    start = time.perf_counter()
    second = pdata.load(archive, cache_dir=cache)
    assert time.perf_counter() - start < 2.0
    assert len(second.train) == len(first.train)
    monkeypatch.undo()

    # Change the archive: one more airplane; new size and mtime -> a new cache entry.
    extra = np.full(SHAPE, 7, np.uint8)
    _write(os.path.join(root, "train", "airplane", "999.png"), _png_bytes(extra))
    _make_tar(root, archive)
    os.utime(archive, ns=(time.time_ns(), time.time_ns() + 10**9))
    third = pdata.load(archive, cache_dir=cache)
    assert len(third.train) == len(first.train) + 1
    np.testing.assert_array_equal(third.train[COUNTS["train"]["airplane"]]["image"], extra)
    assert len([e for e in os.listdir(cache) if not e.startswith(".")]) == 2


def test_in_memory_copy_gives_the_same_examples_and_batches(tree, tmp_path):
    root, _ = tree
    cache = str(tmp_path / "cache")
    lazy = pdata.load(root, cache_dir=cache)
    eager = pdata.load(root, cache_dir=cache, in_memory=True)
    assert isinstance(eager.train, pdata.ArraySource)
    assert isinstance(lazy.train, pdata.TfdsSource)
    for split in ("train", "test"):
        n = len(lazy[split])
        everything = np.arange(n)
        for got, want in zip(eager[split].get_batch(everything), lazy[split].get_batch(everything)):
            np.testing.assert_array_equal(got, want)
    for a, b in zip(pdata.train_batches(lazy, batch_size=4, epoch=2, seed=1),
                    pdata.train_batches(eager, batch_size=4, epoch=2, seed=1)):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])


def test_corrupt_archive_is_named(tmp_path):
    archive = tmp_path / "corrupt.tar.gz"
    archive.write_bytes(b"\x1f\x8b" + b"not really gzip" * 10)
    with pytest.raises(ValueError, match=r"cannot read archive .*corrupt\.tar\.gz"):
        pdata.load(str(archive), cache_dir=str(tmp_path / "cache"))


def test_folder_cache_key_follows_file_changes(tree, tmp_path):
    root, _ = tree
    key = image_folder.cache_key(root)
    assert image_folder.cache_key(root) == key
    _write(os.path.join(root, "test", "cat", "new.png"), _png_bytes(np.zeros(SHAPE, np.uint8)))
    assert image_folder.cache_key(root) != key


def test_no_class_folders_raises(tmp_path):
    empty_archive = tmp_path / "flat.tar"
    readme = tmp_path / "README.txt"
    readme.write_text("no images here")
    with tarfile.open(empty_archive, "w") as tar:
        tar.add(readme, arcname="README.txt")
    with pytest.raises(ValueError, match="no class folders"):
        pdata.load(str(empty_archive), cache_dir=str(tmp_path / "cache"))

    flat = tmp_path / "flat"
    _write(str(flat / "train" / "0001.png"), _png_bytes(np.zeros(SHAPE, np.uint8)))
    with pytest.raises(ValueError, match=r"0001\.png.*not inside a class folder"):
        pdata.load(str(flat), cache_dir=str(tmp_path / "cache"))


def test_unreadable_image_error_names_the_file(tree, tmp_path):
    root, _ = tree
    _write(os.path.join(root, "train", "cat", "broken.jpg"), b"this is not a jpeg")
    with pytest.raises(ValueError, match=r"cannot read image .*train.cat.broken\.jpg"):
        pdata.load(root, cache_dir=str(tmp_path / "cache"))
    archive = _make_tar(root, str(tmp_path / "broken.tar.gz"))
    with pytest.raises(ValueError, match=r"broken\.jpg"):
        pdata.load(archive, cache_dir=str(tmp_path / "cache"))
    cache = tmp_path / "cache"
    assert not cache.exists() or not [e for e in os.listdir(cache) if not e.startswith(".")]


def test_mismatched_class_sets_raise(tree, tmp_path):
    root, _ = tree
    _write(os.path.join(root, "test", "zebra", "000.png"), _png_bytes(np.zeros(SHAPE, np.uint8)))
    with pytest.raises(ValueError, match=r"split 'test'.*extra \['zebra'\]"):
        pdata.load(root, cache_dir=str(tmp_path / "cache"))


def test_image_shape_mismatch_names_first_offender(tree, tmp_path):
    root, _ = tree
    odd = np.zeros((SHAPE[0] + 1, SHAPE[1], 3), np.uint8)
    _write(os.path.join(root, "train", "cat", "010.png"), _png_bytes(odd))
    with pytest.raises(ValueError, match=r"train.cat.010\.png' has shape \(7, 5, 3\)"):
        pdata.load(root, cache_dir=str(tmp_path / "cache"))


def test_unknown_name_lists_choices_and_missing_path_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"unknown data set 'no_such_set'.*'digits'.*'cifar10'.*"
                                         r"path to a folder or \.tar"):
        pdata.load("no_such_set")
    missing = str(tmp_path / "missing.tar.gz")
    with pytest.raises(FileNotFoundError, match="missing.tar.gz"):
        pdata.load(missing)
    with pytest.raises(ValueError, match="image_size"):
        pdata.load("digits", image_size=32)


def test_digits_offline_split_sizes_and_contents():
    from sklearn.datasets import load_digits

    ds = pdata.load("digits")
    assert (len(ds.train), len(ds.test)) == (1437, 360)
    assert ds.image_shape == (8, 8, 1) and ds.num_classes == 10
    assert not ds.horizontal_flip_safe
    train_x, train_y = ds.train.get_batch(np.arange(1437))
    test_x, test_y = ds.test.get_batch(np.arange(360))
    assert train_x.dtype == np.uint8 and train_x.max() <= 16
    # Together the splits are exactly sklearn's 1,797 (image, label) pairs.
    bunch = load_digits()
    reference = np.concatenate([bunch.images.reshape(-1, 64), bunch.target[:, None]], axis=1)
    ours = np.concatenate([
        np.concatenate([train_x.reshape(-1, 64), train_y[:, None]], axis=1),
        np.concatenate([test_x.reshape(-1, 64), test_y[:, None]], axis=1),
    ])
    np.testing.assert_array_equal(np.unique(ours, axis=0), np.unique(reference, axis=0))
    assert len(np.unique(ours, axis=0)) == len(np.unique(reference, axis=0))
    # Stratified: each class's share of the test split is within one example of 360/1797.
    counts = np.bincount(bunch.target)
    assert np.all(np.abs(np.bincount(test_y, minlength=10) - counts * 360 / 1797) < 1)
    assert pdata.load("digits").test.labels.tolist() == test_y.tolist()  # Deterministic.
    np.testing.assert_allclose(ds.mean, [train_x.astype(np.float64).mean()], rtol=1e-5)
    np.testing.assert_allclose(ds.std, [train_x.astype(np.float64).std()], rtol=1e-5)


def test_stratified_subset_proportions_and_seed():
    labels = np.repeat(np.arange(4), [50, 30, 15, 5])
    chosen = pdata.stratified_indices(labels, 20, seed=3)
    assert len(chosen) == 20 and len(np.unique(chosen)) == 20
    np.testing.assert_array_equal(np.bincount(labels[chosen]), [10, 6, 3, 1])
    np.testing.assert_array_equal(chosen, pdata.stratified_indices(labels, 20, seed=3))
    assert not np.array_equal(chosen, pdata.stratified_indices(labels, 20, seed=4))
    # Remainders: 7 of [50, 30, 15, 5] -> exact 3.5, 2.1, 1.05, 0.35 -> floors 3, 2, 1, 0 and
    # the one left goes to the largest remainder (class 0).
    np.testing.assert_array_equal(
        np.bincount(labels[pdata.stratified_indices(labels, 7, 0)], minlength=4), [4, 2, 1, 0]
    )

    full = pdata.load("digits")
    small = pdata.load("digits", subset=100, seed=1)
    assert len(small.train) == 100 and len(small.test) == 360
    np.testing.assert_array_equal(small.mean, full.mean)
    idx = small.train.indices
    np.testing.assert_array_equal(small.train.labels, full.train.labels[idx])
    np.testing.assert_array_equal(small.train[5]["image"], full.train[int(idx[5])]["image"])
    with pytest.raises(ValueError, match="subset"):
        pdata.load("digits", subset=5000)


def _reference_pad_crop_flip(images, offsets, flips, padding):
    """Loop version: zero-pad each image, cut the window, mirror the columns if flagged."""
    out = np.empty_like(images)
    _, h, w, c = images.shape
    for b in range(images.shape[0]):
        padded = np.zeros((h + 2 * padding, w + 2 * padding, c), images.dtype)
        padded[padding:padding + h, padding:padding + w] = images[b]
        r, col = offsets[b]
        crop = padded[r:r + h, col:col + w]
        out[b] = crop[:, ::-1] if flips[b] else crop
    return out


def test_pad_crop_flip_matches_loop_reference():
    rng = np.random.default_rng(0)
    images = rng.integers(1, 256, (16, 6, 5, 3), dtype=np.uint8)
    offsets, flips = pdata.draw_crop_flip(rng, 16, padding=2, flip=True)
    assert offsets.min() >= 0 and offsets.max() <= 4 and flips.any() and not flips.all()
    got = pdata.pad_crop_flip(images, offsets, flips, padding=2)
    np.testing.assert_array_equal(got, _reference_pad_crop_flip(images, offsets, flips, 2))
    # A crop at the centre offset without flip is the image itself; at (0, 0) the first two
    # rows and columns are zero padding.
    centre = pdata.pad_crop_flip(images[:1], np.array([[2, 2]]), np.array([False]), 2)
    np.testing.assert_array_equal(centre, images[:1])
    corner = pdata.pad_crop_flip(images[:1], np.array([[0, 0]]), np.array([False]), 2)
    assert not corner[0, :2].any() and not corner[0, :, :2].any()
    np.testing.assert_array_equal(corner[0, 2:, 2:], images[0, :4, :3])


def test_flip_only_mirrors_width_axis():
    images = np.arange(2 * 3 * 4 * 2, dtype=np.uint8).reshape(2, 3, 4, 2)
    flipped = pdata.pad_crop_flip(images, np.zeros((2, 2), int), np.array([True, False]), 0)
    np.testing.assert_array_equal(flipped[0], images[0][:, ::-1, :])
    np.testing.assert_array_equal(flipped[1], images[1])
    offsets, flips = pdata.draw_crop_flip(np.random.default_rng(0), 50, padding=0, flip=False)
    assert not offsets.any() and not flips.any()
    as_float = images.astype(np.float32) / 7
    flipped = pdata.pad_crop_flip(as_float, np.zeros((2, 2), int), np.array([True, True]), 0)
    np.testing.assert_array_equal(flipped, as_float[:, :, ::-1, :])


def test_train_batch_equals_documented_draws():
    ds = pdata.load("digits")
    seed, epoch, step, batch_size, padding = 5, 3, 2, 32, 1
    batches = pdata.train_batches(
        ds, batch_size=batch_size, epoch=epoch, seed=seed, flip=True, crop_padding=padding
    )
    batch = list(batches)[step]
    order = np.random.default_rng([seed, epoch, 0]).permutation(len(ds.train))
    indices = order[step * batch_size:(step + 1) * batch_size]
    images, labels = ds.train.get_batch(indices)
    rng = np.random.default_rng([seed, epoch, 1, step])
    offsets = rng.integers(0, 2 * padding + 1, size=(batch_size, 2))
    flips = rng.random(batch_size) < 0.5
    expected = _reference_pad_crop_flip(images, offsets, flips, padding)
    expected = (expected.astype(np.float64) - ds.mean) / ds.std
    assert batch["image"].dtype == np.float32 and batch["label"].dtype == np.int32
    np.testing.assert_allclose(batch["image"], expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(batch["label"], labels)


def test_shuffling_is_deterministic_per_seed_and_epoch():
    ds = pdata.load("digits")

    def labels_of(**kwargs):
        batches = pdata.train_batches(ds, batch_size=100, **kwargs)
        return np.concatenate([b["label"] for b in batches])

    def images_of(**kwargs):
        batches = pdata.train_batches(ds, batch_size=100, **kwargs)
        return np.concatenate([b["image"] for b in batches])

    np.testing.assert_array_equal(images_of(epoch=1, seed=0), images_of(epoch=1, seed=0))
    assert not np.array_equal(labels_of(epoch=1, seed=0), labels_of(epoch=2, seed=0))
    assert not np.array_equal(labels_of(epoch=1, seed=0), labels_of(epoch=1, seed=1))
    # Resume inside an epoch: start_step=k gives the tail of the full epoch.
    full = list(pdata.train_batches(ds, batch_size=100, epoch=4, seed=2))
    tail = list(pdata.train_batches(ds, batch_size=100, epoch=4, seed=2, start_step=9))
    assert len(tail) == len(full) - 9
    for a, b in zip(full[9:], tail):
        np.testing.assert_array_equal(a["image"], b["image"])
    # drop_remainder: 1437 // 100 full batches, each example at most once.
    assert len(full) == pdata.steps_per_epoch(1437, 100) == pdata.steps_per_epoch(ds, 100) == 14
    assert all(b["image"].shape == (100, 8, 8, 1) for b in full)


def test_eval_iteration_covers_every_example_once():
    ds = pdata.load("digits")
    batches = list(pdata.eval_batches(ds, batch_size=64))
    assert [len(b["label"]) for b in batches] == [64] * 5 + [360 - 320]
    images, labels = ds.test.get_batch(np.arange(360))
    np.testing.assert_array_equal(np.concatenate([b["label"] for b in batches]), labels)
    np.testing.assert_allclose(
        np.concatenate([b["image"] for b in batches]),
        (images.astype(np.float64) - ds.mean) / ds.std, rtol=1e-5, atol=1e-5,
    )
    padded = list(pdata.eval_batches(ds, batch_size=64, pad_remainder=True))
    assert all(b["image"].shape[0] == 64 for b in padded)
    assert sum(b["mask"].sum() for b in padded) == 360
    np.testing.assert_array_equal(padded[-1]["mask"], np.arange(64) < 40)
    assert pdata.steps_per_epoch(360, 64, drop_remainder=False) == 6


def test_normalize_and_bad_arguments():
    images = np.array([[[[0, 255]]]], np.uint8)
    np.testing.assert_allclose(
        pdata.normalize(images, [10.0, 100.0], [2.0, 5.0]), [[[[-5.0, 31.0]]]], rtol=1e-6
    )
    ds = pdata.load("digits")
    with pytest.raises(ValueError, match="batch_size"):
        pdata.train_batches(ds, batch_size=0, epoch=0)
    with pytest.raises(ValueError, match="epoch"):
        pdata.train_batches(ds, batch_size=8, epoch=-1)
    with pytest.raises(ValueError, match="crop_padding"):
        pdata.train_batches(ds, batch_size=8, epoch=0, crop_padding=-2)
    with pytest.raises(IndexError):
        ds.train.get_batch([0, 5000])


def test_prefetch_keeps_order_and_raises_producer_errors():
    assert list(pdata.prefetch(iter(range(100)), 3)) == list(range(100))

    def failing():
        yield 1
        raise RuntimeError("producer broke")

    got = pdata.prefetch(failing(), 2)
    assert next(got) == 1
    with pytest.raises(RuntimeError, match="producer broke"):
        next(got)
    # Closing early stops the thread (join in the generator's finally).
    gen = pdata.prefetch(iter(range(10**6)), 2)
    assert next(gen) == 0
    gen.close()


def _fake_catalog(data_dir: str, name: str, split_images: dict[str, np.ndarray]) -> None:
    """Writes a tiny prepared copy of a catalog set, with its real tfds features, as PNGs."""
    import tensorflow_datasets as tfds

    info = tfds.builder(name, data_dir=data_dir, try_gcs=False).info

    def examples(images):
        return lambda: (
            {"image": _png_bytes(im), "label": k % 10} for k, im in enumerate(images)
        )

    pdata.write_tfds_dataset(
        data_dir, name=name, version=str(info.version), features=info.features,
        split_examples={split: examples(images) for split, images in split_images.items()},
    )


def test_catalog_set_is_read_through_tfds_data_source(tmp_path):
    rng = np.random.default_rng(2)
    images = {"train": rng.integers(0, 256, (25, 28, 28, 1), np.uint8),
              "test": rng.integers(0, 256, (7, 28, 28, 1), np.uint8)}
    data_dir = str(tmp_path / "tfds")
    _fake_catalog(data_dir, "mnist", images)
    ds = pdata.load("mnist", data_dir=data_dir)
    assert {k: len(v) for k, v in ds.splits.items()} == {"train": 25, "test": 7}
    assert ds.image_shape == (28, 28, 1) and ds.num_classes == 10
    got, labels = ds.train.get_batch([4, 13, 0])
    np.testing.assert_array_equal(got, images["train"][[4, 13, 0]])
    np.testing.assert_array_equal(labels, [4, 3, 0])
    np.testing.assert_array_equal(ds.test.labels, np.arange(7) % 10)
    np.testing.assert_allclose(ds.mean, [0.1307 * 255], rtol=1e-6)
    np.testing.assert_allclose(ds.std, [0.3081 * 255], rtol=1e-6)
    batch = next(iter(pdata.train_batches(ds, batch_size=8, epoch=0)))
    assert batch["image"].shape == (8, 28, 28, 1)


def test_catalog_set_not_prepared_says_how_to_prepare(tmp_path):
    data_dir = str(tmp_path / "empty")
    with pytest.raises(pdata.DatasetNotPreparedError,
                       match=r"(?s)'cifar10' is not prepared.*tfds build cifar10 "
                             r"--file_format=array_record"):
        pdata.load("cifar10", data_dir=data_dir)
    with pytest.raises(FileNotFoundError, match=r"(?s)ILSVRC2012_img_train\.tar.*--manual_dir"):
        pdata.load("imagenet2012", data_dir=data_dir)
    assert not os.path.exists(data_dir) or not os.listdir(data_dir)


def test_variable_size_images_are_resized_and_centre_cropped(tmp_path):
    import tensorflow_datasets as tfds

    rng = np.random.default_rng(4)
    images = [rng.integers(0, 256, shape, np.uint8) for shape in [(10, 14, 3), (9, 6, 3)]]
    features = tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3)),
        "label": tfds.features.ClassLabel(num_classes=2),
    })
    version_dir = pdata.write_tfds_dataset(
        str(tmp_path), name="varsize", features=features,
        split_examples={"train": lambda: (
            {"image": _png_bytes(im), "label": k} for k, im in enumerate(images))},
    )
    source = tfds.builder_from_directory(version_dir).as_data_source()["train"]
    with pytest.raises(ValueError, match="image_size"):
        pdata.TfdsSource(source, (None, None, 3))
    resized = pdata.TfdsSource(source, (None, None, 3), image_size=6)
    got, labels = resized.get_batch([0, 1])
    assert got.shape == (2, 6, 6, 3) and labels.tolist() == [0, 1]
    # Independent: PIL resize of the shorter side to 6 then the centre 6x6 window.
    first = np.asarray(Image.fromarray(images[0]).resize((8, 6), Image.BILINEAR))[:, 1:7]
    np.testing.assert_array_equal(got[0], first)
    np.testing.assert_array_equal(got[1], images[1][1:7])  # Shorter side already 6.


@pytest.fixture(scope="session")
def cifar10_cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cifar10_cache"))


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(SHARED_CIFAR10),
                    reason="the shared CIFAR-10 archive ../shared/data/cifar10-jpeg.tar.gz "
                           "(relative to the repo root) is not present")
def test_shared_cifar10_archive(cifar10_cache_dir):
    start = time.perf_counter()
    ds = pdata.load(SHARED_CIFAR10, cache_dir=cifar10_cache_dir)
    cold = time.perf_counter() - start
    start = time.perf_counter()
    ds = pdata.load(SHARED_CIFAR10, cache_dir=cifar10_cache_dir)
    warm = time.perf_counter() - start
    print(f"\nCIFAR-10 archive: cold load {cold:.1f} s, warm load {warm:.3f} s")
    assert warm < 2.0
    assert (len(ds.train), len(ds.test)) == (50_000, 10_000)
    assert ds.class_names == ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
                              "horse", "ship", "truck")
    np.testing.assert_array_equal(np.bincount(ds.train.labels), [5000] * 10)
    np.testing.assert_array_equal(np.bincount(ds.test.labels), [1000] * 10)
    images, _ = ds.train.get_batch(np.arange(0, 50_000, 997))
    assert images.shape[1:] == (32, 32, 3) and images.dtype == np.uint8
    assert ds.image_shape == (32, 32, 3)
    # JPEG storage moves the statistics only slightly from the published CIFAR-10 values.
    np.testing.assert_allclose(ds.mean / 255, [0.4914, 0.4822, 0.4465], atol=0.01)
    np.testing.assert_allclose(ds.std / 255, [0.2470, 0.2435, 0.2616], atol=0.01)
    small = pdata.load(SHARED_CIFAR10, cache_dir=cifar10_cache_dir, subset=10_000)
    np.testing.assert_array_equal(np.bincount(small.train.labels), [1000] * 10)
