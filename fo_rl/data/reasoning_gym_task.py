"""`reasoning-gym` (procedural reasoning tasks with their own verifiers) as a task source.

    --config=configs/reasoning_gym.py --config.data.options.dataset=leg_counting

`data.options`: `dataset` (a name in `reasoning_gym.factory.DATASETS`), `size` (problems generated,
default 1000), `seed` (default 0); any other key goes to the dataset's own config (e.g.
`min_animals`). One dataset of `size` problems is generated with `seed`; a problem belongs to the
test split when its question hashes there (`fo_rl.data.common.split_of`, 10%), so the splits are
disjoint by construction.

The model sees `Question: <question>\\nAnswer:` (or the chat template's rendering) and ends its
response with `#### <answer>` (or `<answer>...</answer>`); the text after the last marker goes to the
dataset's `score_answer`, whose score (in [0, 1]; some datasets give partial credit) is the reward.

Cold start: SFT on the answers (`#### <answer>`, the JSON Lines teacher: the teacher variant's error
rate replaces that share of the answers by a wrong one); reasoning-gym gives no worked solutions for
most datasets, so the cold start teaches the format and RL the reasoning.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Sequence

from fo_rl.data import common, jsonl

DEFAULTS = {"size": 1000, "seed": 0}
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


@dataclasses.dataclass
class OptionError(ValueError):
  """A bad `data.options` entry: `field` (the key under data.options), its value and why."""

  field: str
  value: Any
  why: str

  def __str__(self) -> str:
    return f"data.options.{self.field}={self.value!r}: {self.why}"


def response_answer(response: object) -> str | None:
  """The answer a response gives: after its last `####`, else in its last `<answer>` tag."""
  if not isinstance(response, str):
    return None
  _, sep, tail = response.rpartition(common.ANSWER_MARKER)
  if sep:
    return tail.strip()
  tags = _ANSWER_TAG.findall(response)
  return tags[-1].strip() if tags else None


class ReasoningGymTask:
  """A reasoning-gym dataset behind the `Task` interface (see the module doc)."""

  def __init__(self, dataset: str = "", size: int = 1000, seed: int = 0, **config: Any):
    self.name = "reasoning_gym"
    self.dataset, self.size, self.seed, self.config = dataset, size, seed, dict(config)
    self._ds = None

  def check(self) -> None:
    """The options, without generating more than one problem: a known dataset, an integer size >= 1
    and seed >= 0, a config the dataset accepts. Raises OptionError."""
    from reasoning_gym.factory import DATASETS

    if not isinstance(self.dataset, str) or self.dataset not in DATASETS:
      raise OptionError(
          "dataset",
          self.dataset,
          f"unknown reasoning-gym dataset; known: {', '.join(sorted(DATASETS))}",
      )
    for key, low in (("size", 1), ("seed", 0)):
      v = getattr(self, key)
      if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise OptionError(key, v, f"must be an integer >= {low}")
    self._build(size=1)

  def _build(self, size: int | None = None):
    import reasoning_gym

    try:
      return reasoning_gym.create_dataset(
          self.dataset, size=size or self.size, seed=self.seed, **self.config
      )
    except TypeError as e:  # an unknown config key
      bad = next((k for k in self.config if k in str(e)), next(iter(self.config), "dataset"))
      raise OptionError(bad, self.config.get(bad, self.dataset), f"{self.dataset}: {e}") from None
    except (ValueError, AssertionError) as e:  # the dataset's own config check
      bad = next((k for k in self.config if k in str(e)), next(iter(self.config), "dataset"))
      raise OptionError(bad, self.config.get(bad, self.dataset), f"{self.dataset}: {e}") from None

  @property
  def source(self):
    if self._ds is None:
      self._ds = self._build()
    return self._ds

  def load(self, split: str, data_dir=None, num_examples: int | None = None) -> Sequence[dict]:
    del data_dir
    common.check_split(split)
    records = []
    for i in range(self.size):
      entry = self.source[i]
      question = str(entry["question"])
      if common.split_of(f"reasoning_gym:{self.dataset}:{question}") == split:
        records.append(
            {"prompt": question, "answer": str(entry["answer"]), "index": i, "entry": entry}
        )
    if num_examples is not None:
      if not 0 <= num_examples <= len(records):
        raise ValueError(
            f"reasoning_gym/{self.dataset}/{split}: asked for {num_examples} examples, only "
            f"{len(records)} available (raise data.options.size)"
        )
      records = records[:num_examples]
    if not records:
      raise ValueError(
          f"data.options.size={self.size}: reasoning_gym/{self.dataset} has no {split} problems; "
          f"raise data.options.size"
      )
    return records

  def problem(self, record) -> jsonl.JsonlProblem:
    return jsonl.JsonlProblem(question=str(record["prompt"]), solution=str(record["answer"]))

  def format_prompt(self, record) -> str:
    return self.problem(record).prompt

  def verify(self, response: str, record) -> float:
    answer = response_answer(response)
    if answer is None:
      return 0.0
    entry = record.get("entry") or self.source[int(record["index"])]
    return float(self.source.score_answer(answer, entry))

  def teacher(self, record, variant: str = "careful", rng: common.RngLike = None) -> str:
    from fo_rl.data import teachers

    return teachers.teacher(self.problem(record), variant, rng)
