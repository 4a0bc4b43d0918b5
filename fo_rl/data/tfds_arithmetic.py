"""TFDS builder for the arithmetic family (see `fo_rl.data.arithmetic`).

Features: `prompt`, `answer` (text), `a`, `b` (int64), `op` (text).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from fo_rl.data import arithmetic, tfds_common


@dataclasses.dataclass(eq=False)
class ArithmeticConfig(tfds_common.ProceduralConfig):
  """Difficulty: `num_digits` per operand, the allowed `ops`, and `min_digits` (variable length)."""

  num_digits: int = arithmetic.ArithmeticDifficulty.num_digits
  ops: str = arithmetic.ArithmeticDifficulty.ops
  min_digits: int = arithmetic.ArithmeticDifficulty.min_digits


class FoRlArithmetic(tfds_common.ProceduralBuilder):
  """Procedurally generated addition / subtraction with worked-step answers."""

  FAMILY = arithmetic
  CONFIG_CLS = ArithmeticConfig
  BUILDER_CONFIGS = [tfds_common.make_config(ArithmeticConfig)]

  def _extra_features(self):
    return {
        "a": tfds.features.Scalar(dtype=np.int64),
        "b": tfds.features.Scalar(dtype=np.int64),
        "op": tfds.features.Text(),
    }


BUILDER = FoRlArithmetic
