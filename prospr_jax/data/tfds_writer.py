"""Writing examples as a tensorflow-datasets data set (array_record shards), without TensorFlow.

``tfds.dataset_builders.store_as_tfds_dataset`` cannot be used without TensorFlow (it checks
every split for ``tf.data.Dataset``), but the generator builder underneath it can: the tfds
feature encoders for ``Tensor`` and ``ClassLabel``, tfds' own ``tf.train.Example`` protos, its
shuffler/writer and the array_record writer are all TensorFlow-free. So a data set is written
by a small ``GeneratorBasedBuilder`` that yields the given examples, and is read back with
``tfds.builder_from_directory(...).as_data_source()`` like any prepared tfds data set.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import tensorflow_datasets as tfds

Example = Mapping[str, Any]
_LOG = logging.getLogger(__name__)


class _ExamplesBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Builds a data set from in-process example generators (keys = positions)."""

    VERSION = tfds.core.Version("1.0.0")
    # No source file with download checksums. (tfds' own lookup of the defining module's
    # path also needs the optional `importlib_resources` package.)
    code_path = None

    def __init__(
        self,
        *,
        name: str,
        version: str,
        features: tfds.features.FeaturesDict,
        split_examples: Mapping[str, Callable[[], Iterable[Example]]],
        metadata: Mapping[str, Any],
        description: str,
        **kwargs: Any,
    ):
        self.name = name
        self.VERSION = tfds.core.Version(version)  # pylint: disable=invalid-name
        self._features = features
        self._split_examples = split_examples
        self._metadata = dict(metadata)
        self._description = description
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=self._description,
            features=self._features,
            metadata=tfds.core.MetadataDict(self._metadata),
            # Keep the examples in the order they are generated: index i = i-th example.
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {
            split: self._generate_examples(make_examples)
            for split, make_examples in self._split_examples.items()
        }

    def _generate_examples(self, make_examples):
        yield from enumerate(make_examples())

    # tfds prints "Downloading and preparing ..." to stdout; nothing is downloaded here.
    def _log_download_bytes(self) -> None:
        _LOG.info("writing tfds data set %s to %s", self.name, self.data_dir)

    def _log_download_done(self) -> None:
        _LOG.info("wrote tfds data set %s to %s", self.name, self.data_dir)


def write_tfds_dataset(
    data_dir: str | os.PathLike,
    *,
    name: str,
    features: tfds.features.FeaturesDict,
    split_examples: Mapping[str, Callable[[], Iterable[Example]]],
    version: str = "1.0.0",
    metadata: Mapping[str, Any] | None = None,
    description: str = "",
) -> str:
    """Writes examples as the tfds data set ``name`` (``version``) in array_record format.

    Args:
        data_dir: tfds data dir to write into (created if needed).
        name: the data set's name, snake_case.
        version: 'major.minor.patch'.
        features: the tfds features of one example (no feature that needs TensorFlow to
            encode, e.g. ``Tensor``, ``ClassLabel``, ``Image`` given encoded bytes).
        split_examples: split name -> function returning that split's examples in order.
        metadata: JSON-serialisable values stored with the data set (``info.metadata``).
        description: free text stored in the data set's info.

    Returns:
        The data set's directory ``data_dir/name/version``, readable with
        ``tfds.builder_from_directory``.
    """
    if not split_examples:
        raise ValueError("split_examples must name at least one split")
    builder = _ExamplesBuilder(
        name=name,
        version=version,
        features=features,
        split_examples=split_examples,
        metadata=metadata or {},
        description=description,
        data_dir=os.fspath(data_dir),
        file_format="array_record",
    )
    # Statistics would be computed with tf.data: skip them.
    download_config = tfds.download.DownloadConfig(
        compute_stats=tfds.download.ComputeStatsMode.SKIP
    )
    builder.download_and_prepare(download_config=download_config)
    return os.fspath(builder.data_dir)
