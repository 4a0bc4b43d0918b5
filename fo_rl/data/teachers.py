"""Teacher variants that write the cold-start SFT traces.

The paper's cold-start study compares RL started from models distilled from
different teachers. Here a teacher is a solution *style* plus an *error rate*:
the probability that a response contains one plausible mistake (a dropped
carry, a miscalculated step, a wrong combination claimed to hit the target, two
numbers out of order, ...). Mistakes sit in the worked steps and usually carry
through to the final answer (each family's `FAULT_WEIGHTS` lists its
mistakes; a minority, e.g. arithmetic's 'typo', leave the final answer right),
so a model imitating a teacher lands well below the verifier's ceiling but
well above zero.

Registered variants (`TEACHERS`):

* `oracle`  -- full worked steps, no mistakes (the reference solver).
* `careful` -- full worked steps, mistakes in 30% of responses.
* `terse`   -- a different, shorter style (arithmetic: raw column values
  only; countdown: the expression only), mistakes in 40% of responses.
* `noisy`   -- full worked steps, mistakes in 60% of responses.

Measured final-answer accuracy (fraction verifying 1.0, 500 test problems at
default difficulty; oracle / careful / terse / noisy): arithmetic 1.00 / 0.78 /
0.73 / 0.55, countdown 1.00 / 0.75 / 0.60 / 0.49, sorting 1.00 / 0.69 / 0.57 /
0.39.
"""

from __future__ import annotations

import dataclasses
from types import ModuleType

from fo_rl.data import arithmetic, common, countdown, jsonl, sorting

_FAMILIES: dict[str, ModuleType] = {m.FAMILY: m for m in (arithmetic, countdown, sorting, jsonl)}


@dataclasses.dataclass(frozen=True)
class TeacherVariant:
  """A named teacher: solution style ('steps' or 'terse') and mistake rate."""

  name: str
  style: str
  error_rate: float
  description: str

  def __post_init__(self) -> None:
    if self.style not in ("steps", "terse"):
      raise ValueError(f"style must be 'steps' or 'terse', got {self.style!r}")
    if not 0.0 <= self.error_rate <= 1.0:
      raise ValueError(f"error_rate must be in [0, 1], got {self.error_rate}")


TEACHERS: dict[str, TeacherVariant] = {}


def register_teacher(variant: TeacherVariant) -> TeacherVariant:
  """Adds a variant to `TEACHERS` (names must be unique)."""
  if variant.name in TEACHERS:
    raise ValueError(f"teacher {variant.name!r} is already registered")
  TEACHERS[variant.name] = variant
  return variant


register_teacher(TeacherVariant("oracle", "steps", 0.0, "Correct worked steps; never wrong."))
register_teacher(
    TeacherVariant(
        "careful", "steps", 0.3, "Worked steps; one plausible mistake in 30% of responses."
    )
)
register_teacher(
    TeacherVariant(
        "terse", "terse", 0.4, "Shorter style with fewer steps; mistakes in 40% of responses."
    )
)
register_teacher(
    TeacherVariant("noisy", "steps", 0.6, "Worked steps; mistakes in 60% of responses.")
)


def get_teacher(variant: str | TeacherVariant) -> TeacherVariant:
  """Looks a variant up by name (or passes a `TeacherVariant` through)."""
  if isinstance(variant, TeacherVariant):
    return variant
  try:
    return TEACHERS[variant]
  except KeyError:
    raise ValueError(f"unknown teacher {variant!r}; registered: {sorted(TEACHERS)}") from None


def teacher(
    problem: common.Problem,
    variant: str | TeacherVariant = "careful",
    rng: common.RngLike = None,
    *,
    error_rate: float | None = None,
) -> str:
  """A teacher response (the text after the prompt) for `problem`.

  `problem` is any family's problem dataclass; `rng` a `random.Random`, a
  numpy Generator or an int seed; `error_rate` overrides the variant's.
  """
  spec = get_teacher(variant)
  family = _FAMILIES.get(getattr(problem, "family", None))
  if family is None:
    raise TypeError(f"no teacher for {type(problem).__name__}")
  rate = spec.error_rate if error_rate is None else error_rate
  return family.teach(problem, common.as_random(rng), style=spec.style, error_rate=rate)
