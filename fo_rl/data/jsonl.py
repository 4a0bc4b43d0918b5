"""Users' own data: JSON Lines with one `{"prompt": ..., "answer": ...}` per line.

The `answer` field may be a GSM8K-style worked solution ending in
`#### <final answer>` or just the final answer (string or number). Blank
lines are skipped; any other malformed line raises a ValueError naming the file
and the 1-based line number.

The model sees `Question: <prompt>\\nAnswer:` (`PROMPT_TEMPLATE`) and
must end its response with `#### <number>`. `verify_numeric` takes the
last number after the marker (without a marker: in the last `\\boxed{}`, as
chat models answer), ignoring thousands separators, so `1,000`,
`1000.0` and `$1000` all match `1000`. Other verifiers: `fo_rl.data.verifiers`.
"""

from __future__ import annotations

import dataclasses
import decimal
import json
import os
import random
import re
from typing import Any, ClassVar, Mapping

from fo_rl.data import common

FAMILY = "jsonl"
PROMPT_TEMPLATE = "Question: {prompt}\nAnswer:"
STYLES = ("steps", "terse")

_NUMBER_RE = re.compile(r"-?(?:[0-9]{1,3}(?:,[0-9]{3})+|[0-9]+)(?:\.[0-9]+)?")
_NUMERIC_ANSWER_RE = re.compile(r"\$?\s*(" + _NUMBER_RE.pattern + r")\s*\.?")


def reference_answer(answer_field: str) -> str:
  """The final answer in an answer field: the text after its last `####`, or all of it."""
  _, sep, tail = answer_field.rpartition(common.ANSWER_MARKER)
  return (tail if sep else answer_field).strip()


def parse_number(text: str) -> decimal.Decimal | None:
  """A number written as e.g. `-1,234.50` (optionally `$`-prefixed) or None."""
  match = _NUMERIC_ANSWER_RE.fullmatch(text.strip())
  if match is None:
    return None
  return decimal.Decimal(match.group(1).replace(",", ""))


def last_boxed(text: str) -> str | None:
  """The content of the last `\\boxed{...}` in `text` (balanced braces), or None."""
  start = text.rfind("\\boxed{")
  if start < 0:
    return None
  i, depth = start + len("\\boxed{"), 1
  for j in range(i, len(text)):
    depth += {"{": 1, "}": -1}.get(text[j], 0)
    if depth == 0:
      return text[i:j]
  return None


def verify_numeric(response: object, reference: str) -> float:
  """1.0 iff the last number after the `####` marker (a response without one: in its last
  `\\boxed{}`) equals `reference`.

  Numbers compare by value (`72.0 == 72`, commas ignored). A non-numeric
  reference must match the whole text after the marker (whitespace-normalised).
  """
  answer = common.final_answer_text(response)
  if answer is None and isinstance(response, str):
    answer = last_boxed(response)
  if answer is None:
    return 0.0
  expected = parse_number(reference)
  if expected is None:
    return float(" ".join(answer.split()) == " ".join(reference.split()))
  numbers = _NUMBER_RE.findall(answer)
  if not numbers:
    return 0.0
  return float(decimal.Decimal(numbers[-1].replace(",", "")) == expected)


@dataclasses.dataclass(frozen=True)
class JsonlProblem:
  """One user-provided problem: the question and its answer field."""

  question: str
  solution: str

  family: ClassVar[str] = FAMILY

  @property
  def prompt(self) -> str:
    return PROMPT_TEMPLATE.format(prompt=self.question)

  @property
  def answer(self) -> str:
    return reference_answer(self.solution)

  @property
  def key(self) -> str:
    return f"{FAMILY}:{self.question}"

  def to_record(self) -> dict[str, Any]:
    return {"prompt": self.question, "answer": self.answer, "solution": self.solution}

  @classmethod
  def from_record(cls, record: Mapping[str, Any]) -> "JsonlProblem":
    return cls(
        question=common.text(record["prompt"]),
        solution=common.text(record.get("solution", record["answer"])),
    )


def _fail(path: str, line: int, message: str) -> ValueError:
  return ValueError(f"{path}, line {line}: {message}")


def _parse_line(
    path: str, lineno: int, raw: bytes, prompt_field: str = "prompt", answer_field: str = "answer"
) -> dict[str, Any] | None:
  try:
    line = raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise _fail(path, lineno, f"not valid UTF-8 ({e.reason})") from None
  if not line.strip():
    return None
  try:
    obj = json.loads(line)
  except json.JSONDecodeError as e:
    raise _fail(path, lineno, f"invalid JSON: {e.msg} (column {e.colno})") from None
  if not isinstance(obj, dict):
    raise _fail(path, lineno, f"expected a JSON object, got {type(obj).__name__}")
  return make_record(obj, prompt_field, answer_field, lambda m: _fail(path, lineno, m), lineno)


def make_record(
    obj: Mapping[str, Any], prompt_field: str, answer_field: str, fail, lineno: int
) -> dict[str, Any]:
  """The record of one row `obj` (a JSON object or a Parquet row); `fail(message)` makes the error
  naming where the row is."""
  for key in (prompt_field, answer_field):
    if key not in obj:
      raise fail(f"missing key {key!r}")
  prompt, answer = obj[prompt_field], obj[answer_field]
  if not isinstance(prompt, str) or not prompt.strip():
    raise fail(f"{prompt_field!r} must be a non-empty string, got {prompt!r:.60}")
  if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
    raise fail(f"{answer_field!r} must be a string or a number, got {type(answer).__name__}")
  solution = answer if isinstance(answer, str) else str(answer)
  if not reference_answer(solution):
    raise fail(f"{answer_field!r} has no final answer (empty, or nothing after '####')")
  return dict(JsonlProblem(prompt, solution).to_record(), line=lineno)


def load_jsonl(
    path: str | os.PathLike, prompt_field: str = "prompt", answer_field: str = "answer"
) -> list[dict[str, Any]]:
  """Reads records `{"prompt", "answer" (final answer), "solution" (raw field), "line" (its 1-based
  line number: errors found later, e.g. a prompt too long, name it)}`.

  `prompt_field` / `answer_field` name the keys read (`data.prompt_field`, `data.answer_field`).
  Raises ValueError naming the file and 1-based line number for a malformed
  line, and for a file with no records (reported at line 1).
  """
  path = os.fspath(path)
  records = []
  with open(path, "rb") as f:
    for lineno, raw in enumerate(f, start=1):
      record = _parse_line(path, lineno, raw, prompt_field, answer_field)
      if record is not None:
        records.append(record)
  if not records:
    raise _fail(path, 1, "empty file: no records")
  return records


def solve(problem: JsonlProblem, style: str = "steps") -> str:
  """The reference response: the worked solution ('steps') or just the answer ('terse')."""
  if style not in STYLES:
    raise ValueError(f"style must be one of {STYLES}, got {style!r}")
  if style == "steps" and common.ANSWER_MARKER in problem.solution:
    return problem.solution.strip()
  return f"{common.ANSWER_MARKER} {problem.answer}"


def teach(
    problem: JsonlProblem, rng: random.Random, style: str = "steps", error_rate: float = 0.0
) -> str:
  """The reference response; with probability `error_rate` its final answer
  is replaced by a wrong one (a nearby number, or 'none' for a non-numeric answer)."""
  response = solve(problem, style)
  if common.pick_fault(rng, error_rate, {"wrong_final": 1.0}) is None:
    return response
  value = parse_number(problem.answer)
  if value is None:
    wrong = "none"
  else:
    wrong = str(value + rng.choice([d for d in range(-10, 11) if d]))
  head, _, _ = response.rpartition(common.ANSWER_MARKER)
  return f"{head}{common.ANSWER_MARKER} {wrong}"


def verify(response: object, problem: JsonlProblem) -> float:
  """Numeric-answer verifier (see `verify_numeric`)."""
  return verify_numeric(response, problem.answer)
