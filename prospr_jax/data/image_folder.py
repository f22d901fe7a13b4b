"""Image folders and archives laid out as split/class/image, cached as tfds data sets.

Layout: ``train/airplane/0001.jpg``, ``test/cat/0042.png``, ... in a folder or a ``.tar``,
``.tar.gz``/``.tgz`` archive (one common top folder, e.g. ``cifar10/train/...``, is allowed).
Files at the top level (README, LICENSE) are ignored, as are hidden files and folders
(names starting with '.') and ``__MACOSX``. Every other file must be an image two folders
deep: split/class/file.

On first use the images are decoded with Pillow to uint8 [H, W, C] (greyscale -> C = 1,
anything else -> RGB, C = 3; an alpha channel is dropped) and written as a tfds data set
(array_record shards + tfds metadata) under the cache dir, in a folder keyed by the source's
name, size and modification time (archive) or by every file's path, size and modification
time (folder): a changed source gets a new cache entry. Later loads read that entry through
``tfds.builder_from_directory(...).as_data_source()``; nothing is decoded again.

Example i of a split is the i-th image when sorted by class index, then by file name.

Rules (each broken rule raises a ValueError naming the file or split):
* class index = position of the class folder's name in sorted order;
* every split has the same set of class folders; there must be a 'train' split;
* all images of a split share one shape, and all splits share it too.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import tarfile
import tempfile
import zlib
from collections.abc import Iterator
from typing import Callable

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from prospr_jax.data.dataset import Dataset, channel_stats, default_eval_split
from prospr_jax.data.sources import TfdsSource
from prospr_jax.data.tfds_writer import write_tfds_dataset

ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz")
CACHE_ENV_VAR = "PROSPR_JAX_CACHE_DIR"
_TFDS_NAME = "image_folder"
_TFDS_VERSION = "1.0.0"
# Bump when the cached format changes, so old entries are not read.
_CACHE_FORMAT = 1
_IGNORED_NAMES = frozenset({"__MACOSX"})
_GREY_MODES = frozenset({"L", "1", "LA"})
_HIGH_DEPTH_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N", "F"})


def default_cache_dir() -> str:
    """``$PROSPR_JAX_CACHE_DIR``, else ``$XDG_CACHE_HOME/prospr_jax/datasets``, else ``~/.cache/...``."""
    if os.environ.get(CACHE_ENV_VAR):
        return os.environ[CACHE_ENV_VAR]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "prospr_jax", "datasets")


def is_archive_path(path: str | os.PathLike) -> bool:
    return os.fspath(path).lower().endswith(ARCHIVE_SUFFIXES)


def _source_stem(path: str) -> str:
    name = os.path.basename(os.path.normpath(path))
    for suffix in ARCHIVE_SUFFIXES:
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name).strip(".")
    return safe or "images"


def _is_ignored(parts: tuple[str, ...]) -> bool:
    return any(p.startswith(".") or p in _IGNORED_NAMES for p in parts)


def _walk_folder(root: str) -> Iterator[tuple[tuple[str, ...], bool]]:
    """(relative path parts, is_dir) of every entry under root, sorted, hidden entries skipped."""
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        rel = os.path.relpath(dirpath, root)
        prefix = () if rel == "." else tuple(rel.split(os.sep))
        dirnames[:] = sorted(d for d in dirnames if not _is_ignored((d,)))
        for d in dirnames:
            yield prefix + (d,), True
        for f in sorted(filenames):
            if not _is_ignored((f,)):
                yield prefix + (f,), False


def cache_key(path: str | os.PathLike) -> str:
    """Hex sha256 of the source's identity: name, size and mtime (archive), or of every
    file's relative path, size and mtime (folder)."""
    path = os.fspath(path)
    digest = hashlib.sha256(f"format={_CACHE_FORMAT}\n".encode())
    if os.path.isdir(path):
        for parts, is_dir in _walk_folder(path):
            if is_dir:
                continue
            st = os.stat(os.path.join(path, *parts))
            digest.update(f"{'/'.join(parts)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    else:
        st = os.stat(path)
        digest.update(f"{os.path.basename(path)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


# --------------------------------------------------------------------------------------
# Reading the source: (path parts, bytes) of every file, and the folders it holds.
# --------------------------------------------------------------------------------------


def _read_entries(path: str) -> tuple[dict[tuple[str, ...], Callable[[], bytes]], set]:
    """Returns ({file parts: read()}, {folder parts}) of a folder or archive."""
    files: dict[tuple[str, ...], Callable[[], bytes]] = {}
    folders: set[tuple[str, ...]] = set()
    if os.path.isdir(path):
        for parts, is_dir in _walk_folder(path):
            if is_dir:
                folders.add(parts)
            else:
                full = os.path.join(path, *parts)
                files[parts] = lambda full=full: _read_file(full)
        return files, folders
    try:
        with tarfile.open(path, "r:*") as archive:
            for member in archive:
                parts = tuple(p for p in member.name.split("/") if p not in ("", "."))
                if not parts or _is_ignored(parts):
                    continue
                if member.isdir():
                    folders.add(parts)
                    continue
                if not (member.isfile() or member.islnk() or member.issym()):
                    continue  # Devices, fifos.
                extracted = archive.extractfile(member)
                if extracted is None:
                    raise ValueError(f"cannot read {member.name!r} in archive {path!r}")
                data = extracted.read()
                files[parts] = lambda data=data: data
                folders.update(parts[:i] for i in range(1, len(parts)))
    except (tarfile.TarError, OSError, EOFError, KeyError, zlib.error) as e:
        raise ValueError(f"cannot read archive {path!r}: {e}") from e
    return files, folders


def _read_file(full_path: str) -> bytes:
    try:
        with open(full_path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ValueError(f"cannot read file {full_path!r}: {e}") from e


def _strip_common_top_folder(files: dict, folders: set) -> tuple[dict, set, tuple[str, ...]]:
    """Removes a top folder holding every file while some file lies deeper than
    split/class/file (and the folder is not itself called 'train')."""
    prefix: tuple[str, ...] = ()
    while files and max(len(p) for p in files) > 3:
        tops = {p[0] for p in files}
        if len(tops) != 1 or "train" in tops or min(len(p) for p in files) < 2:
            break
        prefix += (tops.pop(),)
        files = {p[1:]: read for p, read in files.items()}
        folders = {p[1:] for p in folders if len(p) > 1}
    return files, folders, prefix


def decode_image(data: bytes, name: str) -> np.ndarray:
    """Decodes image bytes with Pillow to uint8 [H, W, C] (C = 1 for greyscale, else 3).

    Raises ValueError naming ``name`` if the bytes are not an 8-bit image Pillow can read.
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            if image.mode in _HIGH_DEPTH_MODES:
                raise ValueError(f"mode {image.mode!r} is not 8 bits per channel")
            target = "L" if image.mode in _GREY_MODES else "RGB"
            if image.mode != target:
                image = image.convert(target)
            array = np.asarray(image, dtype=np.uint8)
    except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError, ...
        raise ValueError(f"cannot read image {name!r}: {e}") from e
    return array[..., None] if array.ndim == 2 else array


def _decode_source(path: str) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], list[str]]:
    """Decodes every split: ({split: (images [N, H, W, C], labels [N])}, class names)."""
    files, folders, prefix = _strip_common_top_folder(*_read_entries(path))

    def shown(parts):
        return os.path.join(path, *prefix, *parts)

    for parts in sorted(files):
        if len(parts) == 2:
            raise ValueError(
                f"file {shown(parts)!r} is not inside a class folder: the layout must be "
                "split/class/image, e.g. train/airplane/0001.jpg"
            )
        if len(parts) > 3:
            raise ValueError(
                f"file {shown(parts)!r} is nested too deep: the layout must be "
                "split/class/image, e.g. train/airplane/0001.jpg"
            )
    classes_of: dict[str, set[str]] = {}
    for parts in folders | {p[:2] for p in files if len(p) == 3}:
        if len(parts) == 1:
            classes_of.setdefault(parts[0], set())
        elif len(parts) == 2:
            classes_of.setdefault(parts[0], set()).add(parts[1])
    classes_of = {split: classes for split, classes in classes_of.items() if classes}
    if not classes_of:
        raise ValueError(
            f"no class folders found in {path!r}: the layout must be split/class/image, "
            "e.g. train/airplane/0001.jpg"
        )
    if "train" not in classes_of:
        raise ValueError(
            f"{path!r} has no 'train' split folder (found split folders {sorted(classes_of)})"
        )
    class_names = sorted(classes_of["train"])
    for split, classes in sorted(classes_of.items()):
        if classes != set(class_names):
            missing, extra = sorted(set(class_names) - classes), sorted(classes - set(class_names))
            raise ValueError(
                f"split {split!r} of {path!r} does not have the class folders of 'train': "
                f"missing {missing}, extra {extra}; all splits must have the same classes"
            )
    class_index = {name: k for k, name in enumerate(class_names)}

    decoded = {}
    for split in sorted(classes_of):
        members = sorted(
            (class_index[p[1]], p) for p in files if len(p) == 3 and p[0] == split
        )
        images, labels, first = [], [], None
        for label, parts in members:
            image = decode_image(files[parts](), shown(parts))
            if first is None:
                first = (parts, image.shape)
            elif image.shape != first[1]:
                raise ValueError(
                    f"image {shown(parts)!r} has shape {image.shape}, but the first image of "
                    f"split {split!r} ({shown(first[0])!r}) has shape {first[1]}: all images "
                    "of a split must share one shape"
                )
            images.append(image)
            labels.append(label)
        if not images:
            raise ValueError(f"split {split!r} of {path!r} holds no images")
        decoded[split] = (np.stack(images), np.asarray(labels, np.int64))
    shapes = {split: images.shape[1:] for split, (images, _) in decoded.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"all splits of {path!r} must share one image shape, got {shapes}")
    return decoded, class_names


def _build_cache_entry(path: str, entry_dir: str, cache_dir: str) -> None:
    """Decodes the source and writes it as a tfds data set in ``entry_dir`` (atomically)."""
    decoded, class_names = _decode_source(path)
    mean, std = channel_stats(decoded["train"][0])
    if np.any(std == 0):
        raise ValueError(
            f"channel(s) {np.flatnonzero(std == 0).tolist()} of every train image of {path!r} "
            "hold one constant value: per-channel normalisation would divide by zero"
        )
    image_shape = decoded["train"][0].shape[1:]
    features = tfds.features.FeaturesDict({
        "image": tfds.features.Tensor(
            shape=image_shape, dtype=np.uint8, encoding=tfds.features.Encoding.BYTES
        ),
        "label": tfds.features.ClassLabel(names=class_names),
    })

    def examples_of(split):
        images, labels = decoded[split]
        return lambda: ({"image": im, "label": lab} for im, lab in zip(images, labels))

    metadata = {
        "source": os.path.basename(os.path.normpath(path)),
        "class_names": class_names,
        "mean": [float(v) for v in mean],
        "std": [float(v) for v in std],
        "num_examples": {split: int(len(labels)) for split, (_, labels) in decoded.items()},
    }
    os.makedirs(cache_dir, exist_ok=True)
    tmp_dir = tempfile.mkdtemp(prefix=f".{os.path.basename(entry_dir)}.tmp-", dir=cache_dir)
    try:
        write_tfds_dataset(
            tmp_dir,
            name=_TFDS_NAME,
            features=features,
            split_examples={split: examples_of(split) for split in decoded},
            metadata=metadata,
            description=f"Images of {metadata['source']} (split/class/image layout).",
        )
        shutil.rmtree(os.path.join(tmp_dir, "downloads"), ignore_errors=True)
        try:
            os.rename(tmp_dir, entry_dir)
        except OSError:
            if not _is_complete(entry_dir):  # Not a concurrent build that finished first.
                raise
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def _version_dir(entry_dir: str) -> str:
    return os.path.join(entry_dir, _TFDS_NAME, _TFDS_VERSION)


def _is_complete(entry_dir: str) -> bool:
    return os.path.isfile(os.path.join(_version_dir(entry_dir), "dataset_info.json"))


def cache_entry_dir(path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> str:
    """The cache folder of a source (it may not exist yet)."""
    cache_dir = default_cache_dir() if cache_dir is None else os.fspath(cache_dir)
    path = os.fspath(path)
    return os.path.join(cache_dir, f"{_source_stem(path)}-{cache_key(path)[:20]}")


def load_image_folder(
    path: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None
) -> Dataset:
    """Opens a split/class/image folder or archive, building its tfds cache on first use.

    Args:
        path: a folder, or a ``.tar``, ``.tar.gz`` or ``.tgz`` archive.
        cache_dir: where cache entries live; default ``default_cache_dir()``.

    Returns:
        A ``Dataset`` whose splits are the split folders; mean/std are those of 'train'.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such folder or archive: {path!r}")
    if not os.path.isdir(path) and not is_archive_path(path):
        raise ValueError(
            f"path {path!r} must be a folder or an archive ending in {', '.join(ARCHIVE_SUFFIXES)}"
        )
    cache_dir = default_cache_dir() if cache_dir is None else os.fspath(cache_dir)
    entry_dir = cache_entry_dir(path, cache_dir)
    if not _is_complete(entry_dir):
        _build_cache_entry(path, entry_dir, cache_dir)
    return _open_cache_entry(entry_dir)


def _open_cache_entry(entry_dir: str) -> Dataset:
    builder = tfds.builder_from_directory(_version_dir(entry_dir))
    metadata = builder.info.metadata
    image_shape = builder.info.features["image"].shape
    splits = {
        str(split): TfdsSource(source, image_shape)
        for split, source in builder.as_data_source().items()
    }
    return Dataset(
        name=metadata["source"],
        splits=splits,
        class_names=tuple(builder.info.features["label"].names),
        mean=np.asarray(metadata["mean"], np.float32),
        std=np.asarray(metadata["std"], np.float32),
        eval_split=default_eval_split(list(splits)),
    )
