"""Countdown: reach a target from given numbers with +, - and *.

Prompt: `reach 30 with 3 7 9:`. The answer is an expression that uses each
given number at most once (not all need be used) and evaluates to the target;
the verifier parses and evaluates it itself (no `eval`). The 'steps' teacher
writes the combinations it makes, then the expression::

    7*3=21 21+9=30 #### 7*3+9

The 'terse' style writes only `#### 7*3+9`.

Every generated problem is solvable: the target is the value of a random
combination of all the numbers, and `solve` (an exhaustive search over
combination orders with non-negative intermediate results) finds a shortest
solution. Difficulty knobs (`CountdownDifficulty`): `num_numbers`,
`max_number` (numbers are uniform in [1, max_number]) and `max_target`.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import random
import re
from typing import Any, ClassVar, Mapping, Sequence

from fo_rl.data import common

FAMILY = "countdown"
STYLES = ("steps", "terse")
OPS = ("+", "-", "*")

FAULT_WEIGHTS = {"false_claim": 0.8, "typo": 0.2}
"""Teacher mistakes: a wrong combination whose last step is miscalculated to
"hit" the target (wrong final answer), or a miswritten intermediate result the
final expression does not depend on (in 'terse' style every fault is a false
claim)."""

_MAX_EXPR_CHARS = 200
_TOKEN_RE = re.compile(r"\s*(?:([0-9]+)|(.))")


@dataclasses.dataclass(frozen=True)
class CountdownDifficulty:
  """Difficulty knobs of the countdown family."""

  num_numbers: int = 3
  max_number: int = 20
  max_target: int = 99

  def __post_init__(self) -> None:
    if not 2 <= self.num_numbers <= 6:
      raise ValueError(f"num_numbers must be in [2, 6], got {self.num_numbers}")
    if self.max_number < 2:
      raise ValueError(f"max_number must be >= 2, got {self.max_number}")
    if self.max_target < 1:
      raise ValueError(f"max_target must be >= 1, got {self.max_target}")


@dataclasses.dataclass(frozen=True)
class _Node:
  """A value built from some numbers, with its expression text.

  `prec` is the precedence of the expression's top operator: 1 for + and
  -, 2 for *, 3 for a single number.
  """

  value: int
  expr: str
  prec: int


@dataclasses.dataclass(frozen=True)
class Step:
  """One combination `left op right = result` as a teacher writes it."""

  left: int
  op: str
  right: int
  result: int

  def render(self) -> str:
    return f"{self.left}{self.op}{self.right}={self.result}"


def _combine(left: _Node, op: str, right: _Node) -> _Node:
  """`left op right` with the fewest parentheses that keep the meaning."""
  lhs, rhs = left.expr, right.expr
  if op == "*":
    lhs = f"({lhs})" if left.prec == 1 else lhs
    rhs = f"({rhs})" if right.prec == 1 else rhs
    return _Node(left.value * right.value, f"{lhs}*{rhs}", 2)
  if op == "-":
    rhs = f"({rhs})" if right.prec == 1 else rhs
    return _Node(left.value - right.value, f"{lhs}-{rhs}", 1)
  return _Node(left.value + right.value, f"{lhs}+{rhs}", 1)


def _moves(nodes: Sequence[_Node]):
  """All useful single combinations of two nodes, in a fixed order.

  Subtraction is written larger-first and skipped when it gives 0;
  multiplication by 1 is skipped (it never helps).
  """
  for i in range(len(nodes)):
    for j in range(i + 1, len(nodes)):
      a, b = nodes[i], nodes[j]
      rest = [n for k, n in enumerate(nodes) if k not in (i, j)]
      big, small = (a, b) if a.value >= b.value else (b, a)
      yield rest, big, "+", small
      if big.value != small.value:
        yield rest, big, "-", small
      if small.value != 1:
        yield rest, big, "*", small


def _search(nodes: list[_Node], target: int, depth: int) -> tuple[list[Step], _Node] | None:
  """Depth-limited search: exactly `depth` combinations, the last hitting target."""
  for rest, left, op, right in _moves(nodes):
    node = _combine(left, op, right)
    step = Step(left.value, op, right.value, node.value)
    if depth == 1:
      if node.value == target:
        return [step], node
      continue
    found = _search(rest + [node], target, depth - 1)
    if found is not None:
      return [step] + found[0], found[1]
  return None


@functools.lru_cache(maxsize=65536)
def solve_steps(numbers: tuple[int, ...], target: int) -> tuple[tuple[Step, ...], str] | None:
  """A shortest solution (steps and expression), or None if there is none.

  Iterative deepening over the number of combinations; intermediate results
  stay non-negative. Deterministic for a given (numbers, target).
  """
  nodes = [_Node(n, str(n), 3) for n in numbers]
  for n in numbers:
    if n == target:
      return (), str(n)
  for depth in range(1, len(numbers)):
    found = _search(nodes, target, depth)
    if found is not None:
      return tuple(found[0]), found[1].expr
  return None


def _random_combination(
    numbers: Sequence[int], num_steps: int, rng: random.Random
) -> tuple[list[Step], _Node]:
  """Combines random pairs of numbers `num_steps` times with random operators."""
  nodes = [_Node(n, str(n), 3) for n in numbers]
  steps: list[Step] = []
  node = nodes[0]
  for _ in range(num_steps):
    i, j = rng.sample(range(len(nodes)), 2)
    a, b = nodes[i], nodes[j]
    big, small = (a, b) if a.value >= b.value else (b, a)
    op = rng.choice(OPS)
    node = _combine(big, op, small)
    steps.append(Step(big.value, op, small.value, node.value))
    nodes = [n for k, n in enumerate(nodes) if k not in (i, j)] + [node]
  return steps, node


@dataclasses.dataclass(frozen=True)
class CountdownProblem:
  """Reach `target` from `numbers` (each used at most once)."""

  numbers: tuple[int, ...]
  target: int

  family: ClassVar[str] = FAMILY

  def __post_init__(self) -> None:
    object.__setattr__(self, "numbers", common.ints(self.numbers))
    object.__setattr__(self, "target", int(self.target))

  @property
  def prompt(self) -> str:
    return f"reach {self.target} with {common.join_ints(self.numbers)}:"

  @property
  def answer(self) -> str:
    solution = solve_steps(self.numbers, self.target)
    if solution is None:
      raise ValueError(f"unsolvable countdown problem {self}")
    return solution[1]

  @property
  def key(self) -> str:
    return f"{FAMILY}:{common.join_ints(sorted(self.numbers))}->{self.target}"

  def to_record(self) -> dict[str, Any]:
    return {
        "prompt": self.prompt,
        "answer": self.answer,
        "numbers": list(self.numbers),
        "target": self.target,
    }

  @classmethod
  def from_record(cls, record: Mapping[str, Any]) -> "CountdownProblem":
    return cls(numbers=common.ints(record["numbers"]), target=int(record["target"]))


def generate(
    rng: random.Random, difficulty: CountdownDifficulty = CountdownDifficulty()
) -> CountdownProblem:
  """Draws one solvable problem whose target is not one of the numbers."""
  while True:
    numbers = [rng.randint(1, difficulty.max_number) for _ in range(difficulty.num_numbers)]
    _, node = _random_combination(numbers, len(numbers) - 1, rng)
    if 1 <= node.value <= difficulty.max_target and node.value not in numbers:
      return CountdownProblem(tuple(numbers), node.value)


def generate_split(
    split: str, num_examples: int, seed: int = 0, **difficulty: Any
) -> list[CountdownProblem]:
  """`num_examples` problems of `split` (see `common.sample_split`)."""
  config = CountdownDifficulty(**difficulty)
  return common.sample_split(FAMILY, lambda rng: generate(rng, config), split, num_examples, seed)


def render(steps: Sequence[Step], expression: str, style: str) -> str:
  """Formats steps and a final expression as a response in `style`."""
  if style == "steps":
    body = " ".join(s.render() for s in steps)
    return (
        f"{body} {common.ANSWER_MARKER} {expression}"
        if body
        else f"{common.ANSWER_MARKER} {expression}"
    )
  if style == "terse":
    return f"{common.ANSWER_MARKER} {expression}"
  raise ValueError(f"style must be one of {STYLES}, got {style!r}")


def solve(problem: CountdownProblem, style: str = "steps") -> str:
  """The correct solution (the error-free teacher)."""
  solution = solve_steps(problem.numbers, problem.target)
  if solution is None:
    raise ValueError(f"unsolvable countdown problem {problem}")
  return render(solution[0], solution[1], style)


def teach(
    problem: CountdownProblem, rng: random.Random, style: str = "steps", error_rate: float = 0.0
) -> str:
  """A teacher response; with probability `error_rate` it contains one fault
  drawn from `FAULT_WEIGHTS`."""
  fault = common.pick_fault(rng, error_rate, FAULT_WEIGHTS)
  steps, expression = solve_steps(problem.numbers, problem.target) or ((), "")
  steps = list(steps)
  if fault == "typo" and (style == "terse" or len(steps) < 2):
    fault = "false_claim"
  if fault == "typo":
    i = rng.randrange(len(steps) - 1)
    s = steps[i]
    steps[i] = Step(s.left, s.op, s.right, common.nudge(s.result, 0, 10**9, rng))
  elif fault == "false_claim":
    for _ in range(20):
      num_steps = rng.randint(1, len(problem.numbers) - 1)
      wrong_steps, node = _random_combination(problem.numbers, num_steps, rng)
      if node.value != problem.target:
        last = wrong_steps[-1]
        wrong_steps[-1] = Step(last.left, last.op, last.right, problem.target)
        steps, expression = wrong_steps, node.expr
        break
  return render(steps, expression, style)


class _Parser:
  """Recursive-descent parser for integer expressions with + - * and ( )."""

  def __init__(self, text: str):
    self.tokens: list[str] = []
    for number, other in _TOKEN_RE.findall(text):
      if number:
        self.tokens.append(number)
      elif not other.isspace():
        self.tokens.append(other)
    self.pos = 0
    self.literals: list[int] = []

  def _peek(self) -> str | None:
    return self.tokens[self.pos] if self.pos < len(self.tokens) else None

  def parse(self) -> int:
    value = self._sum()
    if self._peek() is not None:
      raise ValueError("trailing tokens")
    return value

  def _sum(self) -> int:
    value = self._product()
    while self._peek() in ("+", "-"):
      op = self.tokens[self.pos]
      self.pos += 1
      rhs = self._product()
      value = value + rhs if op == "+" else value - rhs
    return value

  def _product(self) -> int:
    value = self._atom()
    while self._peek() == "*":
      self.pos += 1
      value *= self._atom()
    return value

  def _atom(self) -> int:
    token = self._peek()
    if token is None:
      raise ValueError("unexpected end")
    self.pos += 1
    if token == "(":
      value = self._sum()
      if self._peek() != ")":
        raise ValueError("missing )")
      self.pos += 1
      return value
    if token.isascii() and token.isdigit() and (token == "0" or not token.startswith("0")):
      self.literals.append(int(token))
      return int(token)
    raise ValueError(f"unexpected token {token!r}")


def evaluate(expression: str) -> tuple[int, list[int]]:
  """Evaluates an expression; returns (value, numbers it uses). Raises ValueError."""
  if len(expression) > _MAX_EXPR_CHARS:
    raise ValueError("expression too long")
  parser = _Parser(expression)
  return parser.parse(), parser.literals


def verify(response: object, problem: CountdownProblem) -> float:
  """1.0 iff the text after `####` is an expression over the given numbers
  (each at most once) that evaluates to the target."""
  answer = common.final_answer_text(response)
  if not answer:
    return 0.0
  try:
    value, used = evaluate(answer)
  except (ValueError, RecursionError):
    return 0.0
  if collections.Counter(used) - collections.Counter(problem.numbers):
    return 0.0
  return float(value == problem.target)
