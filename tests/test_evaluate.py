"""Held-out sets from files (fo_rl/data/eval_sets.py), the config fields of issue 17 (data.*, eval.files),
reasoning-gym as a task, and `python -m fo_rl.tools.evaluate`.

pass@k is checked against brute-force enumeration of every k-subset of the samples.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fo_rl import config as config_lib
from fo_rl.common import UserError
from fo_rl.data import eval_sets, get_task

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"


# ---- pass@k -----------------------------------------------------------------------------------------


def _brute_pass_at_k(correct: list[bool], k: int) -> float:
  """The fraction of k-subsets of the samples holding at least one correct one."""
  subsets = list(itertools.combinations(range(len(correct)), k))
  return sum(any(correct[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8])
def test_pass_at_k_equals_brute_force(n):
  for c in range(n + 1):
    correct = [True] * c + [False] * (n - c)
    for k in range(1, n + 1):
      assert eval_sets.pass_at_k(n, c, k) == pytest.approx(_brute_pass_at_k(correct, k), abs=1e-12)


def test_pass_at_k_rejects_bad_arguments():
  for n, c, k in ((4, 5, 1), (4, 2, 0), (4, 2, 5)):
    with pytest.raises(ValueError, match="pass@k needs"):
      eval_sets.pass_at_k(n, c, k)


def test_summarize():
  rewards = np.array([[1, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]], np.float32)
  lengths = np.array([[3, 5, 7, 9], [1, 1, 1, 1], [2, 2, 2, 2]])
  m = eval_sets.summarize("aime", rewards, lengths)
  assert set(m) == {
      "eval/aime/avg@4",
      "eval/aime/pass@1",
      "eval/aime/pass@2",
      "eval/aime/pass@4",
      "eval/aime/response_length",
  }
  assert m["eval/aime/avg@4"] == pytest.approx(5 / 12)
  assert m["eval/aime/pass@1"] == pytest.approx(5 / 12)  # pass@1 = avg for 0/1 rewards
  per_problem = [_brute_pass_at_k(list(r.astype(bool)), 2) for r in rewards]
  assert m["eval/aime/pass@2"] == pytest.approx(np.mean(per_problem))
  assert m["eval/aime/pass@4"] == pytest.approx(2 / 3)
  assert m["eval/aime/response_length"] == pytest.approx(lengths.mean())
  partial = eval_sets.summarize("p", [[0.5, 1.0]], [[1, 1]])  # partial credit is not "correct"
  assert partial["eval/p/pass@1"] == pytest.approx(0.5) and partial["eval/p/avg@2"] == 0.75
  assert eval_sets.pass_ks(6) == [1, 2, 4, 6] and eval_sets.pass_ks(1) == [1]


def test_parse_spec(tmp_path):
  a, b = EXAMPLES / "aime_style.jsonl", EXAMPLES / "math_latex.jsonl"
  assert eval_sets.parse_spec(f"aime={a}, {b}") == [("aime", str(a)), ("math_latex", str(b))]
  assert eval_sets.parse_spec("") == []
  with pytest.raises(ValueError, match=r"eval\.files=.*: '/nope\.jsonl': no such file"):
    eval_sets.parse_spec("x=/nope.jsonl")
  with pytest.raises(ValueError, match=r"the name 'x' is given twice"):
    eval_sets.parse_spec(f"x={a},x={b}")
  with pytest.raises(ValueError, match=r"set name 'a b' must be"):
    eval_sets.parse_spec(f"a b={a}")


# ---- config fields --------------------------------------------------------------------------------


def _parse(**over):
  c = config_lib.tiny(config_lib.base_config())
  for dotted, value in over.items():
    section, field = dotted.split("__", 1)
    node = c[section]
    *path, last = field.split("__")
    for p in path:
      node = node[p]
    node[last] = value
  return config_lib.parse(c)


@pytest.mark.parametrize(
    "over, match",
    [
        ({"data__verifier": "fuzzy"}, r"^data\.verifier='fuzzy': must be one of"),
        ({"data__verifier_timeout": 0.0}, r"^data\.verifier_timeout=0\.0: must be"),
        ({"data__prompt_field": ""}, r"^data\.prompt_field='': must be a non-empty"),
        ({"data__chat_template": "/nope.jinja"}, r"^data\.chat_template='/nope\.jinja': must be"),
        ({"data__chat_template_kwargs": "{bad"}, r"^data\.chat_template_kwargs='\{bad': not JSON"),
        (
            {"data__chat_template_kwargs": "[1]"},
            r"^data\.chat_template_kwargs='\[1\]': must be a JSON",
        ),
        (
            {"eval__files": "a=/nope.jsonl"},
            r"^eval\.files='a=/nope\.jsonl': '/nope\.jsonl': no such",
        ),
    ],
)
def test_bad_fields_name_the_field(over, match):
  with pytest.raises(UserError, match=match):
    _parse(**over)


def test_good_fields_parse():
  rc = _parse(
      data__verifier="math",
      data__chat_template=str(EXAMPLES / "qwen3_style_chat_template.jinja"),
      data__chat_template_kwargs='{"enable_thinking": false}',
      eval__files=f"aime={EXAMPLES / 'aime_style.jsonl'}",
  )
  assert rc.data.template_kwargs() == {"enable_thinking": False}
  assert rc.eval.file_sets() == [("aime", str(EXAMPLES / "aime_style.jsonl"))]
  assert rc.data.verifier_timeout == 5.0


def test_reasoning_gym_options():
  c = config_lib.tiny(config_lib.base_config())
  c.data.task = "reasoning_gym"
  c.data.options = {"dataset": "leg_counting", "size": 50}
  rc = config_lib.parse(c)
  task = get_task(rc.data.task, **rc.data.task_options())
  train, test = task.load("train"), task.load("test")
  assert len(train) + len(test) == 50 and test
  assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}  # disjoint splits
  r = train[0]
  assert task.verify(f"reasoning... #### {r['answer']}", r) == 1.0
  assert task.verify(f"<answer>{r['answer']}</answer>", r) == 1.0
  assert task.verify(f"#### {int(r['answer']) + 1}", r) == 0.0
  assert task.verify("no answer", r) == 0.0
  assert task.teacher(r, "oracle") == f"#### {r['answer']}"  # cold start: SFT on the answers
  for options, match in (
      ({"dataset": "no_such_set"}, r"^data\.options\.dataset='no_such_set': unknown reasoning-gym"),
      ({"dataset": "leg_counting", "min_animal": 2}, r"^data\.options\.min_animal=2: leg_counting"),
      ({"dataset": "leg_counting", "size": 0}, r"^data\.options\.size=0: must be an integer >= 1"),
  ):
    c.data.options = options
    with pytest.raises(UserError, match=match):
      config_lib.parse(c)


def test_reasoning_gym_config_file_parses():
  import importlib.util

  spec = importlib.util.spec_from_file_location("rg_config", REPO / "configs" / "reasoning_gym.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  rc = config_lib.parse(mod.get_config("tiny"))
  assert rc.data.task == "reasoning_gym" and rc.data.options["dataset"]


# ---- the tool --------------------------------------------------------------------------------------


def test_evaluate_tool_errors(tmp_path):
  env = dict(os.environ, PYTHONPATH=str(REPO))
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"prompt": "x", "answer": "1"}\n{"prompt": "y"}\n')
  hf = tmp_path / "hf"
  hf.mkdir()
  for args, match in (
      (["--eval_file=/nope.jsonl", f"--hf_checkpoint={hf}"], "'/nope.jsonl': no such file"),
      ([f"--eval_file={bad}"], "give exactly one of --hf_checkpoint and --checkpoint"),
      ([f"--hf_checkpoint={hf}"], "--eval_file: give at least one"),
  ):
    proc = subprocess.run(
        [sys.executable, "-m", "fo_rl.tools.evaluate", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1, proc.stderr
    assert "fo_rl.tools.evaluate: error:" in proc.stderr and match in proc.stderr, proc.stderr
