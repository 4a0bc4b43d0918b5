"""TFDS plumbing shared by the procedural task builders, and `load_split`.

Datasets are generated locally (nothing is downloaded), written as
array_record and read back with `builder.as_data_source(split)`, which needs
no TensorFlow. A builder config holds the difficulty knobs plus the example
counts and seed; its name is derived from all of them, so every setting gets
its own cached directory `<data_dir>/<builder>/<config>/<version>/`.
"""

from __future__ import annotations

import abc
import dataclasses
import importlib
import os
import re
from types import ModuleType
from typing import Any, ClassVar, Mapping

import tensorflow_datasets as tfds

from fo_rl.data import common

DATASET_VERSION = "1.0.0"
DEFAULT_NUM_TRAIN = 20_000
DEFAULT_NUM_TEST = 500

_BUILDER_MODULES = {
    "arithmetic": "fo_rl.data.tfds_arithmetic",
    "countdown": "fo_rl.data.tfds_countdown",
    "sorting": "fo_rl.data.tfds_sorting",
}


def default_data_dir() -> str:
  """`$FO_RL_DATA_DIR` if set, else `~/.cache/fo_rl/tfds`."""
  return os.environ.get("FO_RL_DATA_DIR") or os.path.join(
      os.path.expanduser("~"), ".cache", "fo_rl", "tfds"
  )


@dataclasses.dataclass(eq=False)
class ProceduralConfig(tfds.core.BuilderConfig):
  """Example counts and seed; subclasses add the family's difficulty knobs."""

  num_train: int = DEFAULT_NUM_TRAIN
  num_test: int = DEFAULT_NUM_TEST
  seed: int = 0

  def difficulty(self) -> dict[str, Any]:
    """The family-specific knobs (fields a subclass adds)."""
    base = {f.name for f in dataclasses.fields(ProceduralConfig)}
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in base}

  def num_examples(self, split: str) -> int:
    common.check_split(split)
    return self.num_train if split == "train" else self.num_test


def _slug(value: Any) -> str:
  text = str(value).replace("+", "p").replace("-", "m").replace("*", "x")
  return re.sub(r"[^A-Za-z0-9.]", "_", text)


def make_config(config_cls: type[ProceduralConfig], **params: Any) -> ProceduralConfig:
  """A config with a name that encodes every parameter (unknown ones raise TypeError)."""
  config = config_cls(name="tmp", **params)
  base = {"name", "version", "release_notes", "supported_versions", "description", "tags"}
  counts = [f.name for f in dataclasses.fields(ProceduralConfig) if f.name not in base]
  names = list(config.difficulty()) + counts  # difficulty first: it is what differs most
  parts = [f"{name}_{_slug(getattr(config, name))}" for name in names]
  return dataclasses.replace(
      config, name="-".join(parts), description=f"{config_cls.__name__}: {', '.join(parts)}"
  )


class ProceduralBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Builds train/test splits of one task family from its `generate_split`."""

  VERSION = tfds.core.Version(DATASET_VERSION)
  RELEASE_NOTES = {DATASET_VERSION: "Initial release."}
  FAMILY: ClassVar[ModuleType]
  """The family module (e.g. `fo_rl.data.arithmetic`)."""

  @abc.abstractmethod
  def _extra_features(self) -> dict[str, tfds.features.FeatureConnector]:
    """Features beyond prompt and answer that the verifier needs."""

  def _info(self) -> tfds.core.DatasetInfo:
    features = {
        "prompt": tfds.features.Text(),
        "answer": tfds.features.Text(),
        **self._extra_features(),
    }
    return tfds.core.DatasetInfo(
        builder=self,
        description=(self.FAMILY.__doc__ or "").strip(),
        features=tfds.features.FeaturesDict(features),
        supervised_keys=("prompt", "answer"),
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
    del dl_manager  # everything is generated locally
    return {split: self._generate_examples(split) for split in common.SPLITS}

  def _generate_examples(self, split: str):
    config = self.builder_config
    problems = self.FAMILY.generate_split(
        split, config.num_examples(split), config.seed, **config.difficulty()
    )
    for index, problem in enumerate(problems):
      yield index, problem.to_record()


def builder_for(
    task_name: str, data_dir: str | os.PathLike | None = None, **params: Any
) -> ProceduralBuilder:
  """The builder of `task_name` for `params` (difficulty, num_train, num_test, seed)."""
  if task_name not in _BUILDER_MODULES:
    raise ValueError(f"no tfds builder for {task_name!r}; known: {sorted(_BUILDER_MODULES)}")
  builder_cls = importlib.import_module(_BUILDER_MODULES[task_name]).BUILDER
  config = make_config(builder_cls.CONFIG_CLS, **params)
  # A config equal to a predefined one must be passed by name (tfds rejects a lookalike object).
  named = config.name if config.name in builder_cls.builder_configs else config
  return builder_cls(config=named, data_dir=os.fspath(data_dir or default_data_dir()))


def prepare(builder: ProceduralBuilder) -> None:
  """Generates and writes the dataset as array_record unless it is already there."""
  tfds.disable_progress_bar()  # keep training logs readable; generation takes seconds
  builder.download_and_prepare(
      file_format="array_record",
      download_config=tfds.download.DownloadConfig(try_download_gcs=False),
  )


def load_split(
    task_name: str,
    split: str,
    data_dir: str | os.PathLike | None = None,
    **params: Any,
) -> Any:
  """Prepares `task_name` into `data_dir` on first use (cached after) and
  returns the random-access array_record source of `split`.

  `params` are the family's difficulty knobs plus `num_train`,
  `num_test` and `seed`. Records come back as tfds decodes them (text as
  bytes, integers as numpy); `to_python` converts one to plain Python.
  """
  common.check_split(split)
  builder = builder_for(task_name, data_dir, **params)
  prepare(builder)
  return builder.as_data_source(split)


def to_python(record: Mapping[str, Any]) -> dict[str, Any]:
  """A decoded tfds record with str / int / list[int] values."""
  out: dict[str, Any] = {}
  for key, value in record.items():
    if isinstance(value, (list, tuple)) or (hasattr(value, "ndim") and value.ndim == 1):
      out[key] = [int(v) for v in value]
    elif isinstance(value, (bytes, str)):
      out[key] = common.text(value)
    else:
      out[key] = int(value)
  return out
