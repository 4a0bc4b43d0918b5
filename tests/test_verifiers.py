"""Verifiers of user data (fo_rl/data/verifiers.py, math_worker.py) and data files (fo_rl/data/files.py).

The `math` verifier runs Hugging Face math-verify in a worker process: equivalences by value and by
expression, non-equivalences, `\\boxed{}` extraction, a pathological answer that hits the time bound and
is counted, no execution of the response. JSON Lines and Parquet files with configurable fields, and
their errors naming the file and the line (row).
"""

from __future__ import annotations

import json
import os
import threading
import time

import pytest

from fo_rl.data import get_task
from fo_rl.data.files import load_records
from fo_rl.data.verifiers import (
    MathVerifier,
    get_verifier,
    resolve_verifier,
    verifier_timeouts,
    verify_exact,
)

EQUIVALENT = [  # (response, reference): equal by value or by expression
    ("so the answer is \\boxed{\\frac{6}{8}}", "\\frac{3}{4}"),
    ("\\boxed{0.75}", "\\frac{3}{4}"),
    ("#### 3/4", "\\frac{3}{4}"),
    ("#### 0.75", "3/4"),
    ("The final answer is $\\boxed{\\frac{1}{\\sqrt{2}}}$", "\\frac{\\sqrt{2}}{2}"),
    ("\\boxed{(x+1)^2}", "x^2+2x+1"),
    ("\\boxed{2(x+1)}", "2x+2"),
    ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\sin(\\pi/3)"),
    ("\\boxed{2}", "\\sqrt{4}"),
    ("\\boxed{x=2}", "2"),
    ("\\boxed{\\{2, 1\\}}", "\\{1,2\\}"),
    ("\\boxed{50\\%}", "0.5"),
    ("Thinking... 12 apples. \\boxed{72}", "72"),
    ("\\boxed{72}", "\\boxed{72}"),
]
NOT_EQUIVALENT = [
    ("\\boxed{\\frac{4}{3}}", "\\frac{3}{4}"),
    ("\\boxed{2x+3}", "2(x+1)"),
    ("\\boxed{73}", "72"),
    ("\\boxed{1/3}", "0.33"),
    ("\\boxed{[0,1)}", "[0,1]"),
    ("I do not know", "7"),
    ("", "7"),
    ("the answer is 72 \\boxed{5}", "72"),  # the boxed answer is the one read
]


@pytest.fixture(scope="module")
def math_check():
  v = MathVerifier(timeout_s=3.0)
  yield v
  v.close()


@pytest.mark.parametrize("response, reference", EQUIVALENT)
def test_math_equivalent(math_check, response, reference):
  assert math_check(response, reference) == 1.0


@pytest.mark.parametrize("response, reference", NOT_EQUIVALENT)
def test_math_not_equivalent(math_check, response, reference):
  assert math_check(response, reference) == 0.0


def test_math_pathological_answer_hits_the_bound_and_is_counted():
  v = MathVerifier(timeout_s=1.0)
  try:
    assert v("\\boxed{1}", "1") == 1.0  # the worker is up: its start is not charged to an answer
    t0 = time.monotonic()
    assert v("\\boxed{9^{9^{9^{9}}}}", "1") == 0.0  # sympy would compute this for hours
    elapsed = time.monotonic() - t0
    assert 1.0 <= elapsed < 3.0, elapsed
    assert v.timeouts == 1
    assert v("\\boxed{\\frac{1}{2}}", "0.5") == 1.0  # a fresh worker takes the next answer
    assert v.timeouts == 1
  finally:
    v.close()


def test_math_bound_holds_off_the_main_thread():
  """math-verify's own timeout is signal.alarm (main thread only); ours is a process: any thread."""
  v = MathVerifier(timeout_s=1.0)
  out = {}

  def work():
    out["ok"] = v("\\boxed{3}", "3")
    out["slow"] = v("\\boxed{10^{10^{10}}+1}", "2")

  t = threading.Thread(target=work)
  t.start()
  t.join(60)
  v.close()
  assert out == {"ok": 1.0, "slow": 0.0} and v.timeouts == 1


def test_math_never_executes_the_response(tmp_path, math_check):
  marker = tmp_path / "pwned"
  payloads = [
      f"__import__('os').system('touch {marker}') #### 1",
      f"#### __import__('pathlib').Path('{marker}').touch()",
      f"\\boxed{{__import__('os').system('touch {marker}')}}",
  ]
  for p in payloads:
    math_check(p, "1")
  assert not marker.exists()


def test_process_counter_and_get_verifier():
  check = get_verifier("math", timeout_s=1.0)
  assert check is get_verifier("math", timeout_s=1.0)  # one worker per bound, shared
  before = verifier_timeouts()
  assert check("\\boxed{7^{7^{7^{7}}}}", "1") == 0.0
  assert verifier_timeouts() == before + 1
  with pytest.raises(ValueError, match="unknown verifier 'fuzzy'"):
    get_verifier("fuzzy")


def test_numeric_and_exact():
  numeric = get_verifier("numeric")
  assert numeric("x #### 1,000", "1000") == 1.0 and numeric("#### 999", "1000") == 0.0
  assert numeric("\\boxed{1,000}", "1000") == 1.0  # no ####: the last \\boxed{}
  assert numeric("\\boxed{7} #### 999", "1000") == 0.0  # the marker wins
  assert verify_exact("#### \\frac{3}{4}", "\\frac{3}{4}") == 1.0
  assert verify_exact("so \\boxed{\\frac{3}{4}}", "$\\frac{3}{4}$") == 1.0
  assert verify_exact("so \\boxed{\\frac{6}{8}}", "\\frac{3}{4}") == 0.0  # text, not value
  assert verify_exact("no answer", "x") == 0.0


def test_auto_rule():
  assert resolve_verifier("auto", ["72", "-1,234.5", "$1000"]) == "numeric"
  assert resolve_verifier("auto", ["72", "\\frac{3}{4}"]) == "math"
  assert resolve_verifier("exact", ["72"]) == "exact"
  with pytest.raises(ValueError, match="unknown verifier"):
    resolve_verifier("nope", [])


# ---- data files -----------------------------------------------------------------------------------


def _jsonl(path, rows):
  path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
  return str(path)


def _parquet(path, columns):
  import pyarrow as pa
  import pyarrow.parquet as pq

  pq.write_table(pa.table(columns), str(path))
  return str(path)


def test_parquet_and_jsonl_with_field_names(tmp_path):
  rows = [
      {"problem": "What is 1/2 + 1/4?", "solution": "\\frac{3}{4}"},
      {"problem": "2+2?", "solution": 4},
  ]
  j = _jsonl(tmp_path / "d.jsonl", rows)
  p = _parquet(
      tmp_path / "d.parquet",
      {"problem": [r["problem"] for r in rows], "solution": ["\\frac{3}{4}", "4"], "x": [1, 2]},
  )
  a = load_records(j, "problem", "solution")
  b = load_records(p, "problem", "solution")
  assert [(r["prompt"], r["answer"], r["line"]) for r in a] == [
      ("What is 1/2 + 1/4?", "\\frac{3}{4}", 1),
      ("2+2?", "4", 2),
  ]
  assert [(r["prompt"], r["answer"], r["line"]) for r in b] == [
      (r["prompt"], r["answer"], r["line"]) for r in a
  ]
  task = get_task(
      "jsonl", train_file=p, test_file=j, prompt_field="problem", answer_field="solution"
  )
  train = task.load("train")
  assert train[0]["verifier"] == "math"  # auto: one answer is LaTeX
  assert task.verify("\\boxed{0.75}", train[0]) == 1.0
  assert task.verify("#### 4.0", train[1]) == 1.0


def test_auto_is_per_file(tmp_path):
  num = _jsonl(tmp_path / "n.jsonl", [{"prompt": "q", "answer": "Work. #### 72"}])
  tex = _jsonl(tmp_path / "t.jsonl", [{"prompt": "q", "answer": "\\frac{1}{2}"}])
  task = get_task("jsonl", train_file=num, test_file=tex)
  assert task.load("train")[0]["verifier"] == "numeric"
  assert task.load("test")[0]["verifier"] == "math"
  forced = get_task("jsonl", train_file=num, verifier="math").load("train")[0]
  assert forced["verifier"] == "math"
  with pytest.raises(ValueError, match="unknown verifier 'x'"):
    get_task("jsonl", train_file=num, verifier="x")


@pytest.mark.parametrize(
    "rows, fields, match",
    [
        (['{"q": "a", "a": "1"}', '{"q": "b"}'], ("q", "a"), r"d\.jsonl, line 2: missing key 'a'"),
        (['{"q": "a", "a": "1"}', "{not json"], ("q", "a"), r"d\.jsonl, line 2: invalid JSON"),
        (
            ['{"prompt": "a", "answer": "1"}'],
            ("problem", "answer"),
            r"line 1: missing key 'problem'",
        ),
        (['{"q": "", "a": "1"}'], ("q", "a"), r"line 1: 'q' must be a non-empty string"),
        (['{"q": "x", "a": [1]}'], ("q", "a"), r"line 1: 'a' must be a string or a number"),
    ],
)
def test_jsonl_errors_name_file_and_line(tmp_path, rows, fields, match):
  path = _jsonl(tmp_path / "d.jsonl", rows)
  with pytest.raises(ValueError, match=match):
    load_records(path, *fields)


def test_parquet_errors_name_file_and_row(tmp_path):
  p = _parquet(tmp_path / "d.parquet", {"prompt": ["a", "b", "c"], "answer": ["1", None, "3"]})
  with pytest.raises(ValueError, match=r"d\.parquet, row 2: missing key 'answer'"):
    load_records(p)
  p = _parquet(tmp_path / "e.parquet", {"prompt": ["a"], "other": ["1"]})
  with pytest.raises(ValueError, match=r"e\.parquet, row 1: missing key 'answer' \(columns"):
    load_records(p)
  bad = tmp_path / "f.parquet"
  bad.write_text('{"prompt": "a", "answer": "1"}\n')  # JSON Lines under a Parquet name
  with pytest.raises(ValueError, match=r"f\.parquet: not a readable Parquet file"):
    load_records(str(bad))
  assert os.path.exists(bad)
