"""Sorting: put a short list of small numbers in ascending order.

Prompt: `sort 57 12 91 25 79:`; response: `#### 12 25 57 79 91`. The
answer must be exactly the sorted list (duplicates kept); the verifier accepts
numbers separated by spaces and/or commas, optionally inside brackets.

Sorting has no intermediate steps, so the 'steps' and 'terse' styles coincide
and every teacher fault changes the answer. Difficulty knobs
(`SortingDifficulty`): `length` and `max_value` (numbers are
uniform in [0, max_value]).
"""

from __future__ import annotations

import dataclasses
import random
import re
from typing import Any, ClassVar, Mapping, Sequence

from fo_rl.data import common

FAMILY = "sorting"
STYLES = ("steps", "terse")

FAULT_WEIGHTS = {"swap": 0.5, "drop": 0.25, "duplicate": 0.25}
"""Teacher mistakes: two neighbours out of order, one number left out, or one
number written twice in place of its neighbour."""

_LIST = r"(?:[0-9]+(?:\s*,\s*|\s+))*[0-9]+"
_LIST_RE = re.compile(rf"{_LIST}|\[\s*{_LIST}\s*\]")


@dataclasses.dataclass(frozen=True)
class SortingDifficulty:
  """Difficulty knobs of the sorting family."""

  length: int = 5
  max_value: int = 99

  def __post_init__(self) -> None:
    if not 2 <= self.length <= 32:
      raise ValueError(f"length must be in [2, 32], got {self.length}")
    if self.max_value < 1:
      raise ValueError(f"max_value must be >= 1, got {self.max_value}")


@dataclasses.dataclass(frozen=True)
class SortingProblem:
  """Sort `numbers` ascending."""

  numbers: tuple[int, ...]

  family: ClassVar[str] = FAMILY

  def __post_init__(self) -> None:
    object.__setattr__(self, "numbers", common.ints(self.numbers))

  @property
  def prompt(self) -> str:
    return f"sort {common.join_ints(self.numbers)}:"

  @property
  def answer(self) -> str:
    return common.join_ints(sorted(self.numbers))

  @property
  def key(self) -> str:
    # The multiset, not the order: a reordering of a test list is not a new problem.
    return f"{FAMILY}:{common.join_ints(sorted(self.numbers))}"

  def to_record(self) -> dict[str, Any]:
    return {"prompt": self.prompt, "answer": self.answer, "numbers": list(self.numbers)}

  @classmethod
  def from_record(cls, record: Mapping[str, Any]) -> "SortingProblem":
    return cls(numbers=common.ints(record["numbers"]))


def generate(
    rng: random.Random, difficulty: SortingDifficulty = SortingDifficulty()
) -> SortingProblem:
  """Draws one problem."""
  return SortingProblem(
      tuple(rng.randint(0, difficulty.max_value) for _ in range(difficulty.length))
  )


def generate_split(
    split: str, num_examples: int, seed: int = 0, **difficulty: Any
) -> list[SortingProblem]:
  """`num_examples` problems of `split` (see `common.sample_split`)."""
  config = SortingDifficulty(**difficulty)
  return common.sample_split(FAMILY, lambda rng: generate(rng, config), split, num_examples, seed)


def render(values: Sequence[int], style: str) -> str:
  """Formats a (claimed) sorted list as a response."""
  if style not in STYLES:
    raise ValueError(f"style must be one of {STYLES}, got {style!r}")
  return f"{common.ANSWER_MARKER} {common.join_ints(values)}"


def solve(problem: SortingProblem, style: str = "steps") -> str:
  """The correct response (the error-free teacher)."""
  return render(sorted(problem.numbers), style)


def teach(
    problem: SortingProblem, rng: random.Random, style: str = "steps", error_rate: float = 0.0
) -> str:
  """A teacher response; with probability `error_rate` it contains one fault
  drawn from `FAULT_WEIGHTS`, which always makes it wrong."""
  values = sorted(problem.numbers)
  fault = common.pick_fault(rng, error_rate, FAULT_WEIGHTS)
  if fault == "swap" and len(set(values)) < 2:
    fault = "drop"
  if fault == "swap":
    i = rng.choice([k for k in range(len(values) - 1) if values[k] != values[k + 1]])
    values[i], values[i + 1] = values[i + 1], values[i]
  elif fault == "drop":
    del values[rng.randrange(len(values))]
  elif fault == "duplicate":
    i = rng.randrange(len(values) - 1)
    if rng.random() < 0.5:
      values[i + 1] = values[i]
    else:
      values[i] = values[i + 1]
    if values == sorted(problem.numbers):  # neighbours were equal: drop instead
      del values[i]
  return render(values, style)


def verify(response: object, problem: SortingProblem) -> float:
  """1.0 iff the text after `####` is exactly the sorted list."""
  answer = common.final_answer_text(response)
  if not answer or not _LIST_RE.fullmatch(answer):
    return 0.0
  values = [int(v) for v in re.findall(r"[0-9]+", answer)]
  return float(values == sorted(problem.numbers))
