"""Tests for fo_rl.data: generators, splits, teachers, verifiers, TFDS and JSONL."""

import itertools
import json
import os
import random
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from fo_rl.data import (
    TEACHERS,
    arithmetic,
    common,
    countdown,
    get_task,
    jsonl,
    sorting,
    teacher,
)

FAMILIES = [arithmetic, countdown, sorting]
PROCEDURAL = ["arithmetic", "countdown", "sorting"]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------- generators


@pytest.mark.parametrize("family", FAMILIES, ids=lambda m: m.FAMILY)
def test_generator_is_deterministic_per_seed(family):
  a = family.generate_split("train", 200, seed=3)
  b = family.generate_split("train", 200, seed=3)
  c = family.generate_split("train", 200, seed=4)
  assert a == b
  assert a != c
  assert [p.to_record() for p in a] == [p.to_record() for p in b]


@pytest.mark.parametrize("family", FAMILIES, ids=lambda m: m.FAMILY)
def test_splits_are_disjoint(family):
  train = {p.key for seed in (0, 1) for p in family.generate_split("train", 3000, seed=seed)}
  test = [p.key for p in family.generate_split("test", 300, seed=0)]
  assert len(set(test)) == len(test), "test split must not repeat problems"
  assert not train & set(test)
  assert all(common.split_of(k) == "train" for k in train)
  assert all(common.split_of(k) == "test" for k in test)


def test_split_key_ignores_presentation_order():
  assert sorting.SortingProblem((3, 1, 2)).key == sorting.SortingProblem((1, 2, 3)).key
  assert (
      countdown.CountdownProblem((3, 7, 9), 30).key == countdown.CountdownProblem((9, 3, 7), 30).key
  )


def test_too_small_problem_space_raises():
  with pytest.raises(ValueError, match="too small"):
    arithmetic.generate_split("test", 500, num_digits=1, ops="+")


def test_difficulty_knobs():
  problems = arithmetic.generate_split("train", 300, num_digits=5, ops="-")
  assert all(p.op == "-" and p.a >= p.b and p.a < 10**5 for p in problems)
  assert max(p.a for p in problems) >= 10**4
  cd = countdown.generate_split("train", 100, num_numbers=4, max_number=9, max_target=50)
  assert all(len(p.numbers) == 4 and max(p.numbers) <= 9 and 1 <= p.target <= 50 for p in cd)
  srt = sorting.generate_split("train", 100, length=7, max_value=9)
  assert all(len(p.numbers) == 7 and max(p.numbers) <= 9 for p in srt)
  with pytest.raises(ValueError):
    arithmetic.ArithmeticDifficulty(ops="/")
  with pytest.raises(ValueError):
    get_task("sorting", length=1)


# ----------------------------------------------------------------- teachers


@pytest.mark.parametrize("family", FAMILIES, ids=lambda m: m.FAMILY)
def test_error_free_teacher_always_verifies(family):
  problems = family.generate_split("train", 400, seed=1) + family.generate_split(
      "test", 100, seed=1
  )
  rng = random.Random(0)
  for p in problems:
    for style in family.STYLES:
      assert family.verify(family.solve(p, style), p) == 1.0, (p, family.solve(p, style))
      assert family.verify(family.teach(p, rng, style, error_rate=0.0), p) == 1.0
    assert family.verify(f"{common.ANSWER_MARKER} {p.answer}", p) == 1.0
    for variant in TEACHERS:
      assert family.verify(teacher(p, variant, rng, error_rate=0.0), p) == 1.0


@pytest.mark.parametrize("family", FAMILIES, ids=lambda m: m.FAMILY)
def test_teacher_variants_are_imperfect_but_useful(family):
  problems = family.generate_split("train", 600, seed=2)
  acc = {}
  for variant in TEACHERS:
    rng = random.Random(7)
    acc[variant] = np.mean([family.verify(teacher(p, variant, rng), p) for p in problems])
  assert acc["oracle"] == 1.0
  assert 0.6 <= acc["careful"] <= 0.9
  assert 0.45 <= acc["terse"] < acc["careful"]
  assert 0.25 <= acc["noisy"] < acc["careful"]


def test_teacher_is_deterministic_given_rng():
  p = arithmetic.ArithmeticProblem(347, 285, "+")
  a = [teacher(p, "noisy", random.Random(5)) for _ in range(3)]
  assert len(set(a)) == 1
  assert teacher(p, "noisy", np.random.default_rng(1)) == teacher(
      p, "noisy", np.random.default_rng(1)
  )
  with pytest.raises(ValueError, match="unknown teacher"):
    teacher(p, "nope")


def test_arithmetic_mistakes_are_in_steps_and_propagate():
  problems = arithmetic.generate_split("train", 400, seed=5)
  rng = random.Random(1)
  wrong_final = wrong_steps_only = 0
  for p in problems:
    response = arithmetic.teach(p, rng, "steps", error_rate=1.0)
    steps_ok = response.split(" #### ")[0] == arithmetic.solve(p).split(" #### ")[0]
    assert not steps_ok, "every faulty response has a wrong step"
    if arithmetic.verify(response, p):
      wrong_steps_only += 1
    else:
      wrong_final += 1
  assert wrong_final > 0.6 * len(problems)
  assert wrong_steps_only > 0.05 * len(problems)


def test_arithmetic_worked_steps():
  assert (
      arithmetic.solve(arithmetic.ArithmeticProblem(347, 285, "+"))
      == "7+5+0=12 4+8+1=13 3+2+1=6 #### 632"
  )
  assert (
      arithmetic.solve(arithmetic.ArithmeticProblem(742, 285, "-"))
      == "12-5-0=7 14-8-1=5 7-2-1=4 #### 457"
  )
  assert (
      arithmetic.solve(arithmetic.ArithmeticProblem(742, 285, "-"), "terse") == "-3 -5 4 #### 457"
  )
  assert arithmetic.solve(arithmetic.ArithmeticProblem(999, 1, "+")).endswith("#### 1000")
  assert arithmetic.solve(arithmetic.ArithmeticProblem(100, 99, "-")).endswith("#### 1")


def test_countdown_and_sorting_teachers():
  p = countdown.CountdownProblem((3, 7, 9), 30)
  assert countdown.solve(p).endswith(countdown.solve(p, "terse"))
  assert countdown.verify(countdown.solve(p), p) == 1.0
  s = sorting.SortingProblem((57, 12, 91, 25, 79))
  assert sorting.solve(s) == "#### 12 25 57 79 91"


# ---------------------------------------------------------------- verifiers


def test_arithmetic_verifier():
  p = arithmetic.ArithmeticProblem(785, 987, "+")  # 1772
  assert arithmetic.verify("#### 1772", p) == 1.0
  assert arithmetic.verify("steps #### 1,772  ", p) == 1.0
  for bad in [
      "1772",
      "#### 1773",
      "#### 1772 and more",
      "#### 1772 #### 1772",
      "####",
      "#### 17 72",
      "#### 1772.5",
      "#### abc",
      "",
      None,
      1772,
      "#### 1,77,2",
  ]:
    assert arithmetic.verify(bad, p) == 0.0, bad


def test_countdown_verifier():
  p = countdown.CountdownProblem((3, 7, 9), 30)
  for good in ["#### 7*3+9", "#### 9+3*7", "#### (9 + 7*3)", "#### 3*7+9"]:
    assert countdown.verify(good, p) == 1.0, good
  for bad in [
      "7*3+9",
      "#### 7*3+9 done",
      "#### 7*3+9=30",
      "#### 3*3+21",
      "#### 3*10",
      "#### 7*3+9+0",
      "#### -3+33",
      "#### (7*3+9",
      "#### 7*3+9)",
      "#### 7**3",
      "#### 7/3",
      "#### 07*3+9",
      "#### ",
      "",
      None,
      "#### 30",
      "#### ٣*7+9",
      "#### " + "(" * 300 + "3" + ")" * 300,
  ]:
    assert countdown.verify(bad, p) == 0.0, bad
  # each given number at most once, but duplicates in the input may each be used
  assert countdown.verify("#### 3+3", countdown.CountdownProblem((3, 3, 5), 6)) == 1.0
  assert countdown.verify("#### 3+3", countdown.CountdownProblem((3, 4, 5), 6)) == 0.0


def _reachable(numbers):
  """All values of expressions using each number at most once (any intermediate sign)."""
  values = set()
  for r in range(1, len(numbers) + 1):
    for subset in itertools.permutations(numbers, r):
      values |= _tree_values(list(subset))
  return values


def _tree_values(seq):
  if len(seq) == 1:
    return {seq[0]}
  out = set()
  for i in range(1, len(seq)):
    for a in _tree_values(seq[:i]):
      for b in _tree_values(seq[i:]):
        out |= {a + b, a - b, a * b}
  return out


def test_countdown_problems_are_solvable_by_brute_force():
  problems = countdown.generate_split("train", 150, seed=9) + countdown.generate_split(
      "test", 50, seed=9
  )
  for p in problems:
    assert p.target in _reachable(p.numbers)
    assert p.target not in p.numbers
    assert countdown.verify(f"#### {p.answer}", p) == 1.0
    value, used = countdown.evaluate(p.answer)
    assert value == p.target and sorted(used) != [] and len(used) <= len(p.numbers)
  # the solver finds solutions exactly when brute force says one exists
  rng = random.Random(3)
  for _ in range(60):
    nums = tuple(rng.randint(1, 9) for _ in range(3))
    target = rng.randint(1, 60)
    reachable = target in _reachable(nums)
    solution = countdown.solve_steps(nums, target)
    if solution is not None:
      assert (
          countdown.verify(f"#### {solution[1]}", countdown.CountdownProblem(nums, target)) == 1.0
      )
    assert (solution is not None) <= reachable


def test_sorting_verifier():
  p = sorting.SortingProblem((5, 2, 9, 2))
  for good in ["#### 2 2 5 9", "####2, 2, 5, 9", "#### [2, 2, 5, 9]", "#### 2,2,5,9 "]:
    assert sorting.verify(good, p) == 1.0, good
  for bad in [
      "2 2 5 9",
      "#### 2 5 9",
      "#### 2 2 9 5",
      "#### 2 2 5 9 10",
      "#### 2 2 5 9.",
      "#### [2 2 5 9",
      "#### 2 2 5 9 ok",
      "#### -2 2 5 9",
      "",
      None,
      "#### ",
  ]:
    assert sorting.verify(bad, p) == 0.0, bad


# --------------------------------------------------------------------- TFDS


@pytest.mark.parametrize("name", PROCEDURAL)
def test_tfds_build_and_read_back(tmp_path, name):
  from fo_rl.data import tfds_common

  params = dict(num_train=40, num_test=12, seed=1)
  train_src = tfds_common.load_split(name, "train", tmp_path, **params)
  test_src = tfds_common.load_split(name, "test", tmp_path, **params)
  assert type(train_src).__name__ == "ArrayRecordDataSource"
  assert (len(train_src), len(test_src)) == (40, 12)
  files = [f for _, _, fs in os.walk(tmp_path) for f in fs]
  assert any(".array_record" in f for f in files)

  family = {"arithmetic": arithmetic, "countdown": countdown, "sorting": sorting}[name]
  for split, src, n in (("train", train_src, 40), ("test", test_src, 12)):
    got = sorted(json.dumps(tfds_common.to_python(src[i]), sort_keys=True) for i in range(len(src)))
    want = sorted(
        json.dumps(p.to_record(), sort_keys=True) for p in family.generate_split(split, n, seed=1)
    )
    assert got == want

  task = get_task(name, **params)
  records = task.load("test", tmp_path)
  keys = {task.problem(r).key for r in records}
  assert not keys & {task.problem(r).key for r in task.load("train", tmp_path)}
  assert all(task.verify(f"#### {r['answer']}", r) == 1.0 for r in records)
  assert all(task.verify(task.teacher(r, "oracle"), r) == 1.0 for r in records)
  assert [r["prompt"] for r in task.load("train", tmp_path, num_examples=5)] == [
      r["prompt"] for r in task.load("train", tmp_path)[:5]
  ]
  with pytest.raises(ValueError, match="only 12 available"):
    task.load("test", tmp_path, num_examples=13)


def test_tfds_cache_is_reused_and_configs_are_separate(tmp_path):
  from fo_rl.data import tfds_common

  tfds_common.load_split("sorting", "test", tmp_path, num_train=10, num_test=5)
  (info,) = [
      os.path.join(d, "dataset_info.json")
      for d, _, fs in os.walk(tmp_path)
      if "dataset_info.json" in fs
  ]
  mtime = os.path.getmtime(info)
  tfds_common.load_split("sorting", "train", tmp_path, num_train=10, num_test=5)
  assert os.path.getmtime(info) == mtime
  tfds_common.load_split("sorting", "test", tmp_path, num_train=10, num_test=5, length=3)
  infos = [d for d, _, fs in os.walk(tmp_path) if "dataset_info.json" in fs]
  assert len(infos) == 2 and any("length_3" in d for d in infos)


def test_tfds_needs_no_tensorflow(tmp_path):
  """Build and read in a fresh process: tensorflow (not installed) is never imported."""
  script = textwrap.dedent(f"""
        import sys

        from fo_rl.data import get_task
        task = get_task("arithmetic", num_train=20, num_test=5)
        records = task.load("test", {str(tmp_path)!r})
        assert len(records) == 5 and task.verify("#### " + records[0]["answer"], records[0]) == 1.0
        assert not [m for m in sys.modules if m.split(".")[0] == "tensorflow"], "tensorflow was imported"
        print("ok")
        """)
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  result = subprocess.run(
      [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.strip().endswith("ok")


# --------------------------------------------------------------------- JSONL


def _write(tmp_path, name, lines):
  path = tmp_path / name
  path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
  return str(path)


def test_jsonl_loads_gsm8k_style_and_plain_answers(tmp_path):
  path = _write(
      tmp_path,
      "data.jsonl",
      [
          json.dumps(
              {
                  "prompt": "Tom has 3 apples and buys 4. How many?",
                  "answer": "3+4=<<3+4=7>>7\n#### 7",
              }
          ),
          "",
          json.dumps({"prompt": "Big?", "answer": "1,000"}),
          json.dumps({"prompt": "Half of 5?", "answer": 2.5, "extra": True}),
      ],
  )
  records = jsonl.load_jsonl(path)
  assert [r["answer"] for r in records] == ["7", "1,000", "2.5"]
  task = get_task("jsonl", train_file=path)
  loaded = task.load("train")
  assert (
      task.format_prompt(loaded[0]) == "Question: Tom has 3 apples and buys 4. How many?\nAnswer:"
  )
  assert task.verify("so #### 7", loaded[0]) == 1.0
  assert task.verify(task.teacher(loaded[0], "oracle"), loaded[0]) == 1.0
  assert task.teacher(loaded[0], "oracle").startswith("3+4=")
  assert task.verify(task.teacher(loaded[1], "terse"), loaded[1]) in (0.0, 1.0)
  wrong = [
      task.verify(task.teacher(loaded[2], "careful", random.Random(s)), loaded[2])
      for s in range(200)
  ]
  assert 0.55 < np.mean(wrong) < 0.85
  with pytest.raises(ValueError, match="no file"):
    task.load("test")


def test_numeric_verifier():
  ok = [
      ("#### 1000", "1000"),
      ("#### 1,000", "1000"),
      ("#### 1000.0", "1,000"),
      ("#### $1000.", "1000"),
      ("x #### the answer is 12 then 72", "72"),
      ("#### -3", "-3"),
      ("#### 2.50", "2.5"),
      ("#### 72", "$72"),
  ]
  bad = [
      ("1000", "1000"),
      ("#### ", "1000"),
      ("#### 1001", "1000"),
      ("#### 72 apples 5", "72"),
      (None, "1"),
      ("#### none", "3"),
  ]
  for response, ref in ok:
    assert jsonl.verify_numeric(response, ref) == 1.0, (response, ref)
  for response, ref in bad:
    assert jsonl.verify_numeric(response, ref) == 0.0, (response, ref)
  assert jsonl.verify_numeric("#### Paris ", "Paris") == 1.0


@pytest.mark.parametrize(
    "lines, line_no, message",
    [
        (['{"prompt": "a", "answer": "1"}', '{"prompt": "b", "answer": '], 2, "invalid JSON"),
        (['{"prompt": "a", "answer": "1"}', "", '{"answer": "2"}'], 3, "missing key 'prompt'"),
        (['{"prompt": "a"}'], 1, "missing key 'answer'"),
        (['{"prompt": 5, "answer": "1"}'], 1, "'prompt' must be a non-empty string"),
        (['{"prompt": "a", "answer": [1]}'], 1, "'answer' must be a string or a number"),
        (['{"prompt": "a", "answer": true}'], 1, "'answer' must be a string or a number"),
        (['{"prompt": "a", "answer": "work ####  "}'], 1, "no final answer"),
        (['["prompt", "answer"]'], 1, "expected a JSON object"),
        ([], 1, "empty file"),
        (["", "   "], 1, "empty file"),
    ],
)
def test_jsonl_errors_name_file_and_line(tmp_path, lines, line_no, message):
  path = _write(tmp_path, "bad.jsonl", lines)
  with pytest.raises(ValueError) as err:
    jsonl.load_jsonl(path)
  assert f"{path}, line {line_no}:" in str(err.value)
  assert message in str(err.value)


def test_jsonl_bad_utf8_names_line(tmp_path):
  path = tmp_path / "bin.jsonl"
  path.write_bytes(b'{"prompt": "a", "answer": "1"}\n{"prompt": "\xff", "answer": "1"}\n')
  with pytest.raises(ValueError, match=r"bin.jsonl, line 2: not valid UTF-8"):
    jsonl.load_jsonl(path)


# ----------------------------------------------------------------- interface


def test_get_task_interface():
  for name in PROCEDURAL:
    task = get_task(name)
    assert task.name == name
    record = task.generate("train", 1)[0]
    prompt = task.format_prompt(record)
    assert prompt == record["prompt"]
    assert task.verify(task.teacher(record, "oracle"), record) == 1.0
    assert task.verify("#### garbage", record) == 0.0
    response = task.teacher(record, "careful", random.Random(0))
    assert common.ANSWER_MARKER in response
  with pytest.raises(ValueError, match="unknown task"):
    get_task("chess")
  with pytest.raises(ValueError, match="split"):
    get_task("jsonl", train_file="x").load("validation")
