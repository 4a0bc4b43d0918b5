"""Multi-digit addition / subtraction with column-by-column worked steps.

Prompt: `347+285=`. The 'steps' solution works one column at a time from the
units up, always writing the carry (or borrow) coming in::

    7+5+0=12 4+8+1=13 3+2+1=6 #### 632

Subtraction shows a borrow by writing the borrowed 1 in front of the top
digit; operands are ordered so a >= b and the answer is never negative. For
`742-285=`::

    12-5-0=7 14-8-1=5 7-2-1=4 #### 457

The 'terse' style writes only each column's raw value (sum or difference,
before taking the digit), e.g. `12 13 6 #### 632` and `-3 -5 4 #### 457`.

Difficulty knobs (`ArithmeticDifficulty`): `num_digits` (operands are
uniform in [0, 10**num_digits)), `ops` (any of '+', '-') and `min_digits`
(opt-in variable length: when > 0, each problem first draws its digit count
d uniformly from [min_digits, num_digits], then operands in [0, 10**d), so
the worked-step responses vary in length; 0, the default, keeps every
problem at num_digits and draws exactly what it always drew).
"""

from __future__ import annotations

import dataclasses
import random
import re
from typing import Any, ClassVar, Mapping

from fo_rl.data import common

FAMILY = "arithmetic"
OPS = ("+", "-")
STYLES = ("steps", "terse")

FAULT_WEIGHTS = {"dropped_carry": 0.45, "slip": 0.35, "typo": 0.2}
"""Teacher mistakes: a carry/borrow ignored, a column miscomputed by one (both
change the final answer), or a miswritten step the final answer ignores."""

_INT_RE = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)")


@dataclasses.dataclass(frozen=True)
class ArithmeticDifficulty:
  """Difficulty knobs of the arithmetic family."""

  num_digits: int = 3
  ops: str = "+-"
  min_digits: int = 0  # > 0: digit count per problem uniform in [min_digits, num_digits]

  def __post_init__(self) -> None:
    if not 1 <= self.num_digits <= 12:
      raise ValueError(f"num_digits must be in [1, 12], got {self.num_digits}")
    if not 0 <= self.min_digits <= self.num_digits:
      raise ValueError(
          f"min_digits must be in [0, num_digits={self.num_digits}], got {self.min_digits}"
      )
    if not self.ops or any(op not in OPS for op in self.ops):
      raise ValueError(f"ops must be a non-empty string over {OPS}, got {self.ops!r}")


@dataclasses.dataclass(frozen=True)
class ArithmeticProblem:
  """`a op b` with non-negative operands and a non-negative result."""

  a: int
  b: int
  op: str

  family: ClassVar[str] = FAMILY

  def __post_init__(self) -> None:
    if self.op not in OPS:
      raise ValueError(f"op must be one of {OPS}, got {self.op!r}")
    if self.a < 0 or self.b < 0 or (self.op == "-" and self.a < self.b):
      raise ValueError(f"invalid operands for {self.a}{self.op}{self.b}")

  @property
  def value(self) -> int:
    """The correct result."""
    return self.a + self.b if self.op == "+" else self.a - self.b

  @property
  def prompt(self) -> str:
    return f"{self.a}{self.op}{self.b}="

  @property
  def answer(self) -> str:
    return str(self.value)

  @property
  def key(self) -> str:
    return f"{FAMILY}:{self.a}{self.op}{self.b}"

  def to_record(self) -> dict[str, Any]:
    return {"prompt": self.prompt, "answer": self.answer, "a": self.a, "b": self.b, "op": self.op}

  @classmethod
  def from_record(cls, record: Mapping[str, Any]) -> "ArithmeticProblem":
    return cls(a=int(record["a"]), b=int(record["b"]), op=common.text(record["op"]))


def generate(
    rng: random.Random, difficulty: ArithmeticDifficulty = ArithmeticDifficulty()
) -> ArithmeticProblem:
  """Draws one problem."""
  op = rng.choice(difficulty.ops)
  digits = difficulty.num_digits
  if difficulty.min_digits:
    digits = rng.randint(difficulty.min_digits, difficulty.num_digits)
  a = rng.randrange(10**digits)
  b = rng.randrange(10**digits)
  if op == "-" and a < b:
    a, b = b, a
  return ArithmeticProblem(a, b, op)


def generate_split(
    split: str, num_examples: int, seed: int = 0, **difficulty: Any
) -> list[ArithmeticProblem]:
  """`num_examples` problems of `split` (see `common.sample_split`)."""
  config = ArithmeticDifficulty(**difficulty)
  return common.sample_split(FAMILY, lambda rng: generate(rng, config), split, num_examples, seed)


@dataclasses.dataclass(frozen=True)
class _Column:
  top: int
  bottom: int
  carry_in: int
  written: int  # raw column value as written: x+y+c, or x-y-c (negative = borrow)


def _digits(n: int, width: int) -> list[int]:
  return [(n // 10**i) % 10 for i in range(width)]


def _work(
    problem: ArithmeticProblem, fault: str | None, rng: random.Random
) -> tuple[list[_Column], int]:
  """Runs the column algorithm, optionally with one fault; returns columns and answer."""
  width = max(len(str(problem.a)), len(str(problem.b)))
  tops, bottoms = _digits(problem.a, width), _digits(problem.b, width)
  add = problem.op == "+"
  if fault == "dropped_carry":
    carry_cols = _carry_columns(problem)
    if not carry_cols:
      fault = "slip"
  col = rng.choice(carry_cols) if fault == "dropped_carry" else rng.randrange(width)
  columns, digits, carry = [], [], 0
  for i, (x, y) in enumerate(zip(tops, bottoms)):
    c = 0 if (fault == "dropped_carry" and i == col) else carry
    raw = x + y + c if add else x - y - c
    low, high = (0, 19) if add else ((-10, -1) if raw < 0 else (0, 9))
    if fault == "slip" and i == col:
      raw = common.nudge(raw, low, high, rng)
    written = common.nudge(raw, low, high, rng) if (fault == "typo" and i == col) else raw
    columns.append(_Column(x, y, c, written))
    digits.append(raw % 10)
    carry = raw // 10 if add else int(raw < 0)
  if add and carry:
    digits.append(carry)
  return columns, int("".join(str(d) for d in reversed(digits)))


def _carry_columns(problem: ArithmeticProblem) -> list[int]:
  """Indices of columns whose correct carry/borrow-in is 1."""
  columns, _ = _work(problem, None, random.Random(0))
  return [i for i, c in enumerate(columns) if c.carry_in]


def _render_step(column: _Column, op: str) -> str:
  x, y, c, w = column.top, column.bottom, column.carry_in, column.written
  if op == "+":
    return f"{x}+{y}+{c}={w}"
  if w < 0:
    return f"1{x}-{y}-{c}={w + 10}"
  return f"{x}-{y}-{c}={w}"


def render(problem: ArithmeticProblem, columns: list[_Column], answer: int, style: str) -> str:
  """Formats worked columns and a final answer as a response in `style`."""
  if style == "steps":
    steps = " ".join(_render_step(c, problem.op) for c in columns)
  elif style == "terse":
    steps = " ".join(str(c.written) for c in columns)
  else:
    raise ValueError(f"style must be one of {STYLES}, got {style!r}")
  return f"{steps} {common.ANSWER_MARKER} {answer}"


def solve(problem: ArithmeticProblem, style: str = "steps") -> str:
  """The correct worked solution (the error-free teacher)."""
  columns, answer = _work(problem, None, random.Random(0))
  return render(problem, columns, answer, style)


def teach(
    problem: ArithmeticProblem, rng: random.Random, style: str = "steps", error_rate: float = 0.0
) -> str:
  """A teacher response; with probability `error_rate` it contains one fault
  drawn from `FAULT_WEIGHTS` (most faults change the final answer)."""
  fault = common.pick_fault(rng, error_rate, FAULT_WEIGHTS)
  columns, answer = _work(problem, fault, rng)
  return render(problem, columns, answer, style)


def verify(response: object, problem: ArithmeticProblem) -> float:
  """1.0 iff the text after `####` is exactly the correct integer (commas allowed)."""
  answer = common.final_answer_text(response)
  if answer is None or not _INT_RE.fullmatch(answer):
    return 0.0
  return float(int(answer.replace(",", "")) == problem.value)
