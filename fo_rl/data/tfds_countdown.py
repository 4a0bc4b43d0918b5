"""TFDS builder for the countdown family (see `fo_rl.data.countdown`).

Features: `prompt`, `answer` (text), `numbers` (sequence of int64),
`target` (int64).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from fo_rl.data import countdown, tfds_common


@dataclasses.dataclass(eq=False)
class CountdownConfig(tfds_common.ProceduralConfig):
  """Difficulty: how many numbers, their maximum, and the maximum target."""

  num_numbers: int = countdown.CountdownDifficulty.num_numbers
  max_number: int = countdown.CountdownDifficulty.max_number
  max_target: int = countdown.CountdownDifficulty.max_target


class FoRlCountdown(tfds_common.ProceduralBuilder):
  """Procedurally generated, always solvable countdown problems."""

  FAMILY = countdown
  CONFIG_CLS = CountdownConfig
  BUILDER_CONFIGS = [tfds_common.make_config(CountdownConfig)]

  def _extra_features(self):
    return {
        "numbers": tfds.features.Sequence(tfds.features.Scalar(dtype=np.int64)),
        "target": tfds.features.Scalar(dtype=np.int64),
    }


BUILDER = FoRlCountdown
