"""Tasks with verifiable answers, their datasets, teachers and tokenizer.

Entry point for the training loops::

    from fo_rl.data import get_task, Tokenizer
    task = get_task("arithmetic")  # or "countdown", "sorting", "jsonl", "reasoning_gym"
    records = task.load("train", data_dir)   # prepared with TFDS on first use
    prompt = task.format_prompt(records[0])
    reward = task.verify(response, records[0])
    sft_target = task.teacher(records[0], "careful", rng)

Modules: `arithmetic`, `countdown`, `sorting` (problem families), `jsonl`
(user data), `files` (JSON Lines / Parquet), `verifiers` + `math_worker`
(numeric / math-verify / exact answer checks), `chat_template` (prompts
rendered as transformers renders them), `eval_sets` (eval.files: avg@k,
pass@k), `reasoning_gym_task` (reasoning-gym as a task; imports it lazily),
`teachers` (cold-start teacher variants), `tfds_common` and
`tfds_*` (dataset builders; they import tensorflow_datasets, so they load
lazily), `tokenizer` / `train_tokenizer` (SentencePiece).
"""

import os
from typing import Any

from fo_rl.data.common import ANSWER_MARKER, Problem, final_answer_text, split_of
from fo_rl.data.files import load_records
from fo_rl.data.jsonl import load_jsonl, verify_numeric
from fo_rl.data.tasks import TASK_NAMES, JsonlTask, ProceduralTask, Record, Task, get_task
from fo_rl.data.teachers import TEACHERS, TeacherVariant, get_teacher, register_teacher, teacher
from fo_rl.data.tokenizer import Tokenizer
from fo_rl.data.verifiers import get_verifier


def load_split(
    task_name: str, split: str, data_dir: str | os.PathLike | None = None, **params: Any
) -> Any:
  """See `fo_rl.data.tfds_common.load_split` (imported lazily: it needs tensorflow_datasets)."""
  from fo_rl.data import tfds_common

  return tfds_common.load_split(task_name, split, data_dir, **params)


__all__ = [
    "ANSWER_MARKER",
    "JsonlTask",
    "ProceduralTask",
    "Problem",
    "Record",
    "TASK_NAMES",
    "TEACHERS",
    "Task",
    "TeacherVariant",
    "Tokenizer",
    "final_answer_text",
    "get_task",
    "get_teacher",
    "get_verifier",
    "load_jsonl",
    "load_records",
    "load_split",
    "register_teacher",
    "split_of",
    "teacher",
    "verify_numeric",
]
