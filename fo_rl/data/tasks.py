"""The task interface the SFT and RL loops use, and its registry.

A task turns records (plain dicts with at least `prompt` and `answer`)
into model prompts, rewards and teacher traces::

    task = get_task("arithmetic", num_digits=3)
    train = task.load("train", data_dir)          # random-access Sequence[dict]
    text = task.format_prompt(train[0])           # exactly what the model sees
    reward = task.verify(response_text, train[0]) # 0.0 or 1.0
    trace = task.teacher(train[0], "careful", rng)

The model's response is everything it generates after the prompt (EOS
excluded); a correct response ends with `#### <answer>`.
"""

from __future__ import annotations

import os
from types import ModuleType
from typing import Any, Callable, Iterator, Mapping, Protocol, Sequence, overload

from fo_rl.data import arithmetic, common, countdown, files, jsonl, sorting, teachers, verifiers

Record = Mapping[str, Any]
PathLike = str | os.PathLike


class Task(Protocol):
  """What every task offers the training loops."""

  name: str

  def load(
      self, split: str, data_dir: PathLike | None = None, num_examples: int | None = None
  ) -> Sequence[dict[str, Any]]:
    """Records of `split` ('train' or 'test'), optionally only the first `num_examples`."""

  def problem(self, record: Record) -> common.Problem:
    """The family's problem dataclass for a record."""

  def format_prompt(self, record: Record) -> str:
    """The exact prompt text given to the model."""

  def verify(self, response: str, record: Record) -> float:
    """Reward: 1.0 if `response` ends with a correct final answer, else 0.0."""

  def teacher(self, record: Record, variant: str = "careful", rng: common.RngLike = None) -> str:
    """A cold-start SFT response from teacher `variant` (see `fo_rl.data.teachers`)."""


class RecordSource(Sequence[dict[str, Any]]):
  """A lazy, random-access view that converts records on access."""

  def __init__(
      self, source: Any, convert: Callable[[Any], dict[str, Any]], length: int | None = None
  ):
    self._source = source
    self._convert = convert
    self._length = len(source) if length is None else length

  def __len__(self) -> int:
    return self._length

  @overload
  def __getitem__(self, index: int) -> dict[str, Any]:
    ...

  @overload
  def __getitem__(self, index: slice) -> list[dict[str, Any]]:
    ...

  def __getitem__(self, index):
    if isinstance(index, slice):
      return [self[i] for i in range(*index.indices(self._length))]
    index = int(index)
    if index < 0:
      index += self._length
    if not 0 <= index < self._length:
      raise IndexError(f"record index {index} out of range for {self._length} records")
    return self._convert(self._source[index])

  def __iter__(self) -> Iterator[dict[str, Any]]:
    return (self[i] for i in range(self._length))


def _take(
    records: Sequence[dict[str, Any]], num_examples: int | None, where: str
) -> Sequence[dict[str, Any]]:
  if num_examples is None:
    return records
  if not 0 <= num_examples <= len(records):
    raise ValueError(f"{where}: asked for {num_examples} examples, only {len(records)} available")
  if isinstance(records, RecordSource):
    return RecordSource(records._source, records._convert, num_examples)
  return records[:num_examples]


class _FamilyTask:
  """Shared record -> problem plumbing for tasks backed by a family module."""

  name: str
  _family: ModuleType
  _problem_cls: Any

  def problem(self, record: Record) -> common.Problem:
    return self._problem_cls.from_record(record)

  def format_prompt(self, record: Record) -> str:
    return self.problem(record).prompt

  def verify(self, response: str, record: Record) -> float:
    return self._family.verify(response, self.problem(record))

  def teacher(self, record: Record, variant: str = "careful", rng: common.RngLike = None) -> str:
    return teachers.teacher(self.problem(record), variant, rng)


class ProceduralTask(_FamilyTask):
  """arithmetic / countdown / sorting, stored with TFDS (array_record).

  `params` are the family's difficulty knobs plus `num_train`,
  `num_test` and `seed` (what the prepared dataset holds).
  """

  _PROBLEMS = {
      "arithmetic": (arithmetic, arithmetic.ArithmeticProblem, arithmetic.ArithmeticDifficulty),
      "countdown": (countdown, countdown.CountdownProblem, countdown.CountdownDifficulty),
      "sorting": (sorting, sorting.SortingProblem, sorting.SortingDifficulty),
  }

  def __init__(self, name: str, **params: Any):
    self.name = name
    self._family, self._problem_cls, difficulty_cls = self._PROBLEMS[name]
    knobs = {k: v for k, v in params.items() if k not in ("num_train", "num_test", "seed")}
    difficulty_cls(**knobs)  # validate early, before any dataset is prepared
    self.params = dict(params)

  def load(
      self, split: str, data_dir: PathLike | None = None, num_examples: int | None = None
  ) -> Sequence[dict[str, Any]]:
    from fo_rl.data import tfds_common  # imports tensorflow_datasets: only when data is needed

    source = tfds_common.load_split(self.name, split, data_dir, **self.params)
    records = RecordSource(source, tfds_common.to_python)
    return _take(records, num_examples, f"{self.name}/{split}")

  def generate(self, split: str, num_examples: int, seed: int = 0) -> list[dict[str, Any]]:
    """Records generated in memory, without TFDS (same problems for the same seed)."""
    knobs = {k: v for k, v in self.params.items() if k not in ("num_train", "num_test", "seed")}
    return [p.to_record() for p in self._family.generate_split(split, num_examples, seed, **knobs)]


class JsonlTask(_FamilyTask):
  """User data from JSON Lines or Parquet files, one per split (see `fo_rl.data.files`).

  `prompt_field` / `answer_field` name the fields read. `verifier` checks the answers: `numeric`,
  `math`, `exact` (see `fo_rl.data.verifiers`) or `auto`: per file, `numeric` when every answer is a
  plain number, else `math` (each loaded record carries the name in `record["verifier"]`).
  `verifier_timeout`: the `math` verifier's bound per answer, in seconds."""

  def __init__(
      self,
      train_file: PathLike | None = None,
      test_file: PathLike | None = None,
      name: str = "jsonl",
      prompt_field: str = "prompt",
      answer_field: str = "answer",
      verifier: str = "auto",
      verifier_timeout: float = verifiers.DEFAULT_TIMEOUT_S,
  ):
    self.name = name
    self._family, self._problem_cls = jsonl, jsonl.JsonlProblem
    self.files = {"train": train_file, "test": test_file}
    self.prompt_field, self.answer_field = prompt_field, answer_field
    verifiers.resolve_verifier(verifier, ())  # an unknown name fails here, before any data
    self.verifier, self.verifier_timeout = verifier, float(verifier_timeout)

  def load(
      self, split: str, data_dir: PathLike | None = None, num_examples: int | None = None
  ) -> Sequence[dict[str, Any]]:
    del data_dir  # the files are read directly
    common.check_split(split)
    path = self.files[split]
    if path is None:
      raise ValueError(f"{self.name}: no file given for split {split!r}")
    return _take(self.load_file(path), num_examples, os.fspath(path))

  def load_file(self, path: PathLike) -> list[dict[str, Any]]:
    """The records of any data file (a split's, an eval set's), each with its resolved verifier."""
    records = files.load_records(path, self.prompt_field, self.answer_field)
    name = verifiers.resolve_verifier(self.verifier, (r["answer"] for r in records))
    for r in records:
      r["verifier"] = name
    return records

  def verify(self, response: str, record: Record) -> float:
    name = record.get("verifier") or verifiers.resolve_verifier(self.verifier, (record["answer"],))
    check = verifiers.get_verifier(name, self.verifier_timeout)
    return check(response, common.text(record["answer"]))


TASK_NAMES = ("arithmetic", "countdown", "sorting", "jsonl", "reasoning_gym")


def get_task(name: str, **options: Any) -> Task:
  """A task by name.

  * `arithmetic` / `countdown` / `sorting`: `options` are difficulty
    knobs (see each family's `*Difficulty`) and `num_train`,
    `num_test`, `seed` for the prepared dataset.
  * `jsonl`: `train_file=` and/or `test_file=` (JSON Lines or Parquet), `prompt_field`,
    `answer_field`, `verifier`, `verifier_timeout` (see `JsonlTask`).
  * `reasoning_gym`: `dataset=` and its options (see `fo_rl.data.reasoning_gym_task`).
  """
  if name == "jsonl":
    return JsonlTask(**options)
  if name == "reasoning_gym":
    from fo_rl.data.reasoning_gym_task import ReasoningGymTask  # imports reasoning_gym: only here

    return ReasoningGymTask(**options)
  if name in ProceduralTask._PROBLEMS:
    return ProceduralTask(name, **options)
  raise ValueError(f"unknown task {name!r}; known: {TASK_NAMES}")
