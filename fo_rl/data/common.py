"""Shared pieces of the procedural task families.

* The final-answer convention: a response ends with `#### <answer>`
  (`ANSWER_MARKER`); `final_answer_text` extracts the answer.
* Provably disjoint train/test splits: a problem's split is a pure function of
  its canonical key (`split_of`), so no seed, difficulty or example count
  can put the same problem in both splits.
* Seeded, platform-independent random streams (`make_rng`) and a
  normaliser for the `rng` arguments callers pass in (`as_random`).
"""

from __future__ import annotations

import hashlib
import random
from typing import Any, Callable, Iterable, Protocol, Sequence, TypeVar

import numpy as np

ANSWER_MARKER = "####"
SPLITS = ("train", "test")
TEST_FRACTION = 0.1
"""Fraction of the problem space (by key hash) that belongs to the test split."""


class Problem(Protocol):
  """What every task family's problem dataclass provides."""

  @property
  def prompt(self) -> str:
    """The exact text given to the model."""

  @property
  def answer(self) -> str:
    """A reference final answer (the text a correct response puts after `####`)."""

  @property
  def key(self) -> str:
    """Canonical form; equal keys mean the same problem for split purposes."""

  def to_record(self) -> dict[str, Any]:
    """Plain-Python dict with the family's tfds features."""


P = TypeVar("P", bound=Problem)


def final_answer_text(response: object) -> str | None:
  """Returns the stripped text after the first `####` marker, or None.

  Everything after the marker counts as the answer, so a response with extra
  text (or a second marker) after its final answer fails the family's strict
  answer parser. Non-string responses give None.
  """
  if not isinstance(response, str):
    return None
  head, sep, tail = response.partition(ANSWER_MARKER)
  if not sep:
    return None
  return tail.strip()


def key_fraction(key: str) -> float:
  """Maps a key to a uniform float in [0, 1) with SHA-256 (stable across runs)."""
  digest = hashlib.sha256(key.encode("utf-8")).digest()
  return int.from_bytes(digest[:8], "big") / 2.0**64


def split_of(key: str, test_fraction: float = TEST_FRACTION) -> str:
  """The split ('train' or 'test') a problem with this canonical key belongs to."""
  return "test" if key_fraction(key) < test_fraction else "train"


def make_rng(*parts: object) -> random.Random:
  """A `random.Random` seeded from a hash of `parts` (stable across processes)."""
  digest = hashlib.sha256(repr(parts).encode("utf-8")).digest()
  return random.Random(int.from_bytes(digest[:8], "big"))


RngLike = random.Random | np.random.Generator | int | None


def as_random(rng: RngLike) -> random.Random:
  """Accepts a `random.Random`, a numpy Generator, an int seed or None (seed 0)."""
  if isinstance(rng, random.Random):
    return rng
  if isinstance(rng, np.random.Generator):
    return random.Random(int(rng.integers(0, 2**63 - 1)))
  if rng is None:
    return random.Random(0)
  if isinstance(rng, (int, np.integer)) and not isinstance(rng, bool):
    return random.Random(int(rng))
  raise TypeError(f"rng must be random.Random, numpy Generator or int, got {type(rng)!r}")


def check_split(split: str) -> None:
  """Raises ValueError unless `split` is 'train' or 'test'."""
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def sample_split(
    family: str,
    draw: Callable[[random.Random], P],
    split: str,
    num_examples: int,
    seed: int,
) -> list[P]:
  """Draws `num_examples` problems of one split, deterministically from `seed`.

  Problems whose key hashes to the other split are rejected, which makes the
  splits disjoint by construction. The test split is also deduplicated (train
  may repeat problems when the problem space is small). Raises ValueError when
  the problem space is too small to fill the request.
  """
  check_split(split)
  if num_examples < 0:
    raise ValueError(f"num_examples must be >= 0, got {num_examples}")
  rng = make_rng(family, seed, split)
  problems: list[P] = []
  seen: set[str] = set()
  max_draws = 100 * num_examples + 10_000
  for _ in range(max_draws):
    if len(problems) == num_examples:
      return problems
    problem = draw(rng)
    key = problem.key
    if split_of(key) != split:
      continue
    if split == "test":
      if key in seen:
        continue
      seen.add(key)
    problems.append(problem)
  if len(problems) == num_examples:
    return problems
  raise ValueError(
      f"{family}: could only draw {len(problems)} distinct {split} problems of "
      f"{num_examples} requested after {max_draws} draws; the difficulty setting "
      "has too small a problem space: ask for fewer examples or a harder setting"
  )


def nudge(value: int, low: int, high: int, rng: random.Random) -> int:
  """`value` plus or minus one, kept inside [low, high] (a plausible slip)."""
  options = [v for v in (value - 1, value + 1) if low <= v <= high]
  return rng.choice(options)


def pick_fault(rng: random.Random, error_rate: float, weights: dict[str, float]) -> str | None:
  """With probability `error_rate` picks a fault name by `weights`, else None."""
  if not 0.0 <= error_rate <= 1.0:
    raise ValueError(f"error_rate must be in [0, 1], got {error_rate}")
  if rng.random() >= error_rate:
    return None
  names = list(weights)
  return rng.choices(names, weights=[weights[n] for n in names])[0]


def ints(values: Iterable[Any]) -> tuple[int, ...]:
  """Converts numpy/python integers to a tuple of Python ints."""
  return tuple(int(v) for v in values)


def text(value: Any) -> str:
  """Decodes tfds Text values (bytes from array_record) to str."""
  if isinstance(value, (bytes, np.bytes_)):
    return bytes(value).decode("utf-8")
  if isinstance(value, np.ndarray) and value.shape == ():
    return text(value.item())
  return str(value)


def join_ints(values: Sequence[int]) -> str:
  """Space-separated decimal integers."""
  return " ".join(str(v) for v in values)
