"""Held-out sets from files (fo_rl/data/eval_sets.py), the config fields of issue 17 (data.*, eval.files),
reasoning-gym as a task, and `python -m fo_rl.tools.evaluate`.

pass@k is checked against brute-force enumeration of every k-subset of the samples.
"""

from __future__ import annotations

import itertools
import json
import os
import re
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
      "eval/aime/avg_at_4",
      "eval/aime/pass_at_1",
      "eval/aime/pass_at_2",
      "eval/aime/pass_at_4",
      "eval/aime/response_length",
  }
  assert m["eval/aime/avg_at_4"] == pytest.approx(5 / 12)
  assert m["eval/aime/pass_at_1"] == pytest.approx(5 / 12)  # pass@1 = avg for 0/1 rewards
  per_problem = [_brute_pass_at_k(list(r.astype(bool)), 2) for r in rewards]
  assert m["eval/aime/pass_at_2"] == pytest.approx(np.mean(per_problem))
  assert m["eval/aime/pass_at_4"] == pytest.approx(2 / 3)
  assert m["eval/aime/response_length"] == pytest.approx(lengths.mean())
  partial = eval_sets.summarize("p", [[0.5, 1.0]], [[1, 1]])  # partial credit is not "correct"
  assert partial["eval/p/pass_at_1"] == pytest.approx(0.5) and partial["eval/p/avg_at_2"] == 0.75
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


# ---- end to end ------------------------------------------------------------------------------------


@pytest.mark.e2e
def test_main_job_on_the_examples(tmp_path):
  """README "Bring your own model and data" on CPU: the smoke script's tiny Qwen3-MoE checkpoint and
  tokenizer with the Qwen3-style chat template, examples/math_latex.jsonl with the math verifier, the
  AIME-style file as eval.files; then fo_rl.tools.evaluate on the run's checkpoint."""
  from fo_rl.tools import smoke

  hf = tmp_path / "hf"
  smoke.write_hf_checkpoint(str(hf))
  (hf / "chat_template.jinja").write_text(
      (EXAMPLES / "qwen3_style_chat_template.jinja").read_text()
  )
  run = tmp_path / "run"
  env = dict(
      os.environ,
      PYTHONPATH=str(REPO),
      JAX_PLATFORMS="cpu",
      XLA_FLAGS="--xla_force_host_platform_device_count=2",
  )
  cmd = [
      sys.executable,
      "-m",
      "fo_rl.main",
      f"--config={REPO / 'configs' / 'qwen3_30b_a3b.py'}:tiny",
      f"--workdir={run}",
      f"--config.init.hf_checkpoint={hf}",
      "--config.data.task=jsonl",
      f"--config.data.train_file={EXAMPLES / 'math_latex.jsonl'}",
      f"--config.data.test_file={EXAMPLES / 'aime_style.jsonl'}",
      "--config.data.verifier=math",
      "--config.data.system_prompt=Put the final answer in \\boxed{}.",
      '--config.data.chat_template_kwargs={"enable_thinking": false}',
      f"--config.eval.files=aime={EXAMPLES / 'aime_style.jsonl'}",
      "--config.sft.max_len=256",
      "--config.rl.steps=2",
      "--config.eval.every=2",
      "--config.checkpoint.every=2",
  ]
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"prompts go through the chat template of {hf / 'chat_template.jinja'}" in proc.stdout
  rows = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if l.strip()]
  evals = [r for r in rows if "eval/aime/avg_at_2" in r]
  assert [r["step"] for r in evals] == [0, 2]
  for r in evals:
    for key in ("avg_at_2", "pass_at_1", "pass_at_2", "response_length", "verifier_timeouts"):
      assert f"eval/aime/{key}" in r, (key, r)
    assert 0 <= r["eval/aime/pass_at_1"] <= r["eval/aime/pass_at_2"] <= 1
    assert r["eval/aime/response_length"] > 0
  assert all("verifier_timeouts" in r for r in rows if "loss" in r)
  summary = json.loads((run / "summary.json").read_text())
  assert summary["eval_sets"]["step"] == 2 and "eval/aime/avg_at_2" in summary["eval_sets"]
  config = json.loads((run / "config.json").read_text())
  assert config["data"]["verifier"] == "math" and config["eval"]["files"].startswith("aime=")
  # TensorBoard holds the same scalars.
  from test_metrics_writer import _tb_scalars

  scalars, _ = _tb_scalars(str(run / "tb"))
  assert [step for step, _ in scalars["eval/aime/pass_at_2"]] == [0, 2]

  out = tmp_path / "eval.json"
  proc = subprocess.run(
      [
          sys.executable,
          "-m",
          "fo_rl.tools.evaluate",
          f"--checkpoint={run}",
          f"--eval_file=math={EXAMPLES / 'math_latex.jsonl'}",
          "--samples=3",
          "--max_new_tokens=8",
          f"--output={out}",
      ],
      cwd=REPO,
      env=env,
      capture_output=True,
      text=True,
      timeout=900,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(out.read_text())
  assert result["sets"]["math"]["problems"] == 42 and result["samples"] == 3
  assert result["chat_template"] == str(hf / "chat_template.jinja")  # rendered as the run rendered
  assert set(k for k in result if k.startswith("eval/math/")) == {
      "eval/math/avg_at_3",
      "eval/math/pass_at_1",
      "eval/math/pass_at_2",
      "eval/math/pass_at_3",
      "eval/math/response_length",
      "eval/math/verifier_timeouts",
  }


# ---- bad data through the main job: named before anything is compiled or written ---------------------


def _bad_template(t: Path) -> dict:
  (t / "bad.jinja").write_text("{{ raise_exception('roles must alternate') }}")
  return {"data.chat_template": str(t / "bad.jinja")}


def _bad_parquet(t: Path) -> dict:
  import pyarrow as pa
  import pyarrow.parquet as pq

  pq.write_table(pa.table({"prompt": ["1+1?", "2+2?"], "answer": ["2", None]}), t / "train.parquet")
  (t / "test.jsonl").write_text('{"prompt": "3+3?", "answer": "6"}\n' * 4)
  return {
      "data.task": "jsonl",
      "data.train_file": str(t / "train.parquet"),
      "data.test_file": str(t / "test.jsonl"),
  }


def _bad_eval_file(t: Path) -> dict:
  (t / "aime.jsonl").write_text(
      '{"prompt": "1+1?", "answer": "2"}\n{"prompt": "2+2?", "answer": 4\n'
  )
  return {"eval.files": f"aime={t / 'aime.jsonl'}"}


def _bad_eval_field(t: Path) -> dict:
  (t / "held.jsonl").write_text('{"problem": "1+1?", "answer": "2"}\n')
  return {"eval.files": f"held={t / 'held.jsonl'}"}


@pytest.mark.parametrize(
    "spec, pattern",
    [
        (
            _bad_template,
            r"^data\.chat_template: .*bad\.jinja: the chat template failed to render: ",
        ),
        (_bad_parquet, r"train\.parquet, row 2: missing key 'answer'"),
        (_bad_eval_file, r"^eval\.files: .*aime\.jsonl, line 2: invalid JSON"),
        (_bad_eval_field, r"^eval\.files: .*held\.jsonl, line 1: missing key 'prompt'"),
    ],
    ids=[
        "template_error",
        "parquet_missing_field",
        "eval_file_bad_line",
        "eval_file_missing_field",
    ],
)
def test_bad_data_is_named_before_anything_is_written(tmp_path, spec, pattern):
  from test_bad_input import tiny_config

  from fo_rl.run import run

  c = tiny_config(**spec(tmp_path))
  workdir = tmp_path / "workdir"
  with pytest.raises(UserError) as e:
    run(c, str(workdir), log=lambda *_: None)
  assert re.search(pattern, str(e.value)), str(e.value)
  assert not workdir.exists()


# ---- evaluate_sets: the wiring from samples to metrics -----------------------------------------------


def test_evaluate_sets_scores_samples_prompt_major(tmp_path):
  """run.evaluate_sets with a stub sampler: the math verifier's rewards land on the right problem
  (samples are prompt-major), lengths drop the EOS token, pass@j and avg@k match brute force, the
  chat template renders the prompts the sampler receives."""
  import dataclasses

  import jax

  from fo_rl.data.chat_template import ChatTask, ChatTemplate
  from fo_rl.data.tasks import JsonlTask
  from fo_rl.run import evaluate_sets
  from fo_rl.sampler import SamplingParams

  k, eos = 4, 3
  task = JsonlTask(name="aime", verifier="math")
  records = task.load_file(EXAMPLES / "aime_style.jsonl")[:3]
  # correct[p][s]: whether sample s of problem p answers right (problem 2: never)
  correct = [[True, False, False, True], [True, True, True, True], [False] * k]
  responses = [
      f"so \\boxed{{{r['answer'] if ok else int(r['answer']) + 1}}}"
      for r, row in zip(records, correct)
      for ok in row
  ]
  n_tokens = [1 + (i % 3) for i in range(len(responses))]  # generated tokens before EOS

  @dataclasses.dataclass
  class Out:
    tokens: np.ndarray
    lengths: np.ndarray
    finished_eos: np.ndarray
    logp_nonfinite: np.ndarray

  class StubSampler:
    prompts = None

    def generate(self, prompt_ids, sampling, seed):
      StubSampler.prompts = prompt_ids
      tokens = np.full((len(prompt_ids), 8), eos)
      for i, n in enumerate(n_tokens):
        tokens[i, :n] = 100 + i  # row i's text (the stub tokenizer decodes it)
      return Out(tokens, np.array(n_tokens) + 1, np.ones(len(prompt_ids), bool), np.zeros(12, bool))

  class StubTokenizer:
    rendered = []

    def encode(self, text, add_bos=False):
      StubTokenizer.rendered.append(text)
      return [len(StubTokenizer.rendered)]

    def decode(self, ids):
      return responses[int(ids[0]) - 100]

  template = ChatTemplate.from_file(EXAMPLES / "qwen3_style_chat_template.jinja")
  chat = ChatTask(task, template, "S.", {"enable_thinking": False})
  m = evaluate_sets(
      StubSampler(),
      StubTokenizer(),
      [("aime", chat, records)],
      SamplingParams(temperature=1.0, max_new_tokens=8, eos_ids=(eos,)),
      k,
      jax.random.key(0),
  )
  assert StubTokenizer.rendered == [
      template.render(r["prompt"], "S.", enable_thinking=False) for r in records
  ]
  assert [p[0] for p in StubSampler.prompts] == [1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3]  # prompt-major
  assert m["eval/aime/avg_at_4"] == pytest.approx(np.mean(correct))
  for j in (1, 2, 4):
    brute = np.mean([_brute_pass_at_k(row, j) for row in correct])
    assert m[f"eval/aime/pass_at_{j}"] == pytest.approx(brute)
  assert m["eval/aime/response_length"] == pytest.approx(np.mean(n_tokens))
  assert m["eval/aime/verifier_timeouts"] == 0
