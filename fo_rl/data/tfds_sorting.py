"""TFDS builder for the sorting family (see `fo_rl.data.sorting`).

Features: `prompt`, `answer` (text), `numbers` (sequence of int64).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from fo_rl.data import sorting, tfds_common


@dataclasses.dataclass(eq=False)
class SortingConfig(tfds_common.ProceduralConfig):
  """Difficulty: list `length` and the largest value `max_value`."""

  length: int = sorting.SortingDifficulty.length
  max_value: int = sorting.SortingDifficulty.max_value


class FoRlSorting(tfds_common.ProceduralBuilder):
  """Procedurally generated lists to sort."""

  FAMILY = sorting
  CONFIG_CLS = SortingConfig
  BUILDER_CONFIGS = [tfds_common.make_config(SortingConfig)]

  def _extra_features(self):
    return {"numbers": tfds.features.Sequence(tfds.features.Scalar(dtype=np.int64))}


BUILDER = FoRlSorting
