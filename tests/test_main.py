"""End-to-end tests of the main job through its real entry point, `python -m fo_rl.main`.

* a tiny run has a pulse: every artifact the README promises is written, with every RL-core metric;
* SIGTERM (a TPU preemption) checkpoints the last completed step and exits 0; a re-run resumes from it;
* a run SIGKILLed in the middle of RL and re-run ends with exactly the metrics of an uninterrupted run;
* bad input is an error naming the field, in seconds, before SFT or compilation, losing nothing on disk.

Subprocesses inherit conftest's 8 fake CPU devices and share a persistent XLA compilation cache (and, after
the first run, a cold-start cache), so only the first run pays for compilation.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = "--config=configs/moe_r3.py:tiny"

# The metrics the RL-core issue requires in every RL step's metrics.jsonl row.
RL_METRICS = (
    "reward_mean",
    "response_length",
    "entropy",
    "train_infer_kl",
    "train_infer_k3",
    "train_infer_frac_tau2",
    "is_weight_mean",
    "is_weight_max",
    "is_truncated_frac",
    "clip_frac_high",
    "clip_frac_low",
    "ratio_mean",
    "ratio_max",
    "router_disagreement_per_decision",
    "router_disagreement_per_token",
    "grad_norm",
    "update_norm",
    "skipped_steps",
)
EVAL_METRICS = ("eval/greedy_accuracy", "eval/mean_accuracy")
TIMING = ("step_seconds", "tokens_per_second")  # legitimately differ between two identical runs
SUMMARY_KEYS = ("cold_start_accuracy", "final_accuracy", "best_accuracy", "steps", "wall_seconds")
RUN_TIMEOUT = 900  # seconds for one tiny run on a loaded 2-core machine (compilation included)


# ---- helpers ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
  """Shared with tests/test_configs.py's in-process runs (same session directory)."""
  d = tmp_path_factory.getbasetemp() / "fo_rl_run_caches"
  (d / "xla").mkdir(parents=True, exist_ok=True)
  return d


def _env(caches: Path) -> dict:
  env = dict(os.environ)  # conftest's XLA_FLAGS (8 fake devices) and JAX_PLATFORMS=cpu
  env.update(
      JAX_COMPILATION_CACHE_DIR=str(caches / "xla"),
      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1",
      PYTHONUNBUFFERED="1",
  )
  if jax.config.jax_default_matmul_precision:  # conftest's: the same programs as in-process runs
    env["JAX_DEFAULT_MATMUL_PRECISION"] = str(jax.config.jax_default_matmul_precision)
  return env


def _cmd(workdir: Path, *overrides: str) -> list[str]:
  return [sys.executable, "-m", "fo_rl.main", TINY, f"--workdir={workdir}", *overrides]


def _start(workdir: Path, caches: Path, *overrides: str, log_name: str = "log.txt"):
  log = open(workdir.parent / f"{workdir.name}.{log_name}", "w")
  proc = subprocess.Popen(
      _cmd(workdir, *overrides),
      cwd=REPO,
      env=_env(caches),
      stdout=log,
      stderr=subprocess.STDOUT,
      text=True,
  )
  proc.log_path = log.name
  log.close()
  return proc


def _output(proc) -> str:
  return Path(proc.log_path).read_text()


def _finish(proc, timeout: float = RUN_TIMEOUT) -> str:
  try:
    proc.wait(timeout=timeout)
  except subprocess.TimeoutExpired:
    proc.kill()
    proc.wait()
    pytest.fail(f"run timed out after {timeout}s:\n{_output(proc)[-3000:]}")
  return _output(proc)


def _run(workdir: Path, caches: Path, *overrides: str, timeout: float = RUN_TIMEOUT):
  """Run to completion; returns (returncode, output, seconds)."""
  t0 = time.time()
  proc = _start(workdir, caches, *overrides, log_name=f"log{int(t0 * 1e3)}.txt")
  out = _finish(proc, timeout)
  return proc.returncode, out, time.time() - t0


def _ok(rc, out, *_):
  assert rc == 0, f"exit code {rc}:\n{out[-4000:]}"
  return out


def _rows(workdir: Path) -> list[dict]:
  path = workdir / "metrics.jsonl"
  if not path.exists():
    return []
  rows = []
  for line in path.read_text().splitlines(keepends=True):
    if line.endswith("\n") and line.strip():
      rows.append(json.loads(line))
  return rows


def _last_step(workdir: Path) -> int:
  return max((r["step"] for r in _rows(workdir)), default=-1)


def _wait_for_step(proc, workdir: Path, step: int, timeout: float = RUN_TIMEOUT) -> int:
  t0 = time.time()
  while time.time() - t0 < timeout:
    s = _last_step(workdir)
    if s >= step:
      return s
    if proc.poll() is not None:
      pytest.fail(
          f"the run exited ({proc.returncode}) before step {step}:\n{_output(proc)[-3000:]}"
      )
    time.sleep(0.02)
  proc.kill()
  pytest.fail(f"no step {step} in metrics.jsonl after {timeout}s:\n{_output(proc)[-3000:]}")


def _ckpt_steps(workdir: Path) -> list[int]:
  d = workdir / "checkpoints"
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.exists() else []


def _number(v) -> float:
  assert isinstance(v, (int, float)) and not isinstance(v, bool), v
  return float(v)


def _assert_same_run(got_rows, want_rows, got_summary, want_summary):
  """Same metrics rows (timings aside) and summary accuracies as the uninterrupted reference."""
  assert [r["step"] for r in got_rows] == [r["step"] for r in want_rows], "steps differ / repeated"
  for g, w in zip(got_rows, want_rows):
    assert set(g) == set(w), (g["step"], set(g) ^ set(w))
    for k in w:
      if k in TIMING:
        continue
      assert g[k] == pytest.approx(
          w[k], rel=1e-6, abs=1e-6, nan_ok=True
      ), f"step {w['step']} {k}: {g[k]} (resumed) vs {w[k]} (uninterrupted)"
  for k in (
      "cold_start_accuracy",
      "cold_start_greedy_accuracy",
      "final_accuracy",
      "final_greedy_accuracy",
      "best_accuracy",
      "steps",
  ):
    assert got_summary[k] == pytest.approx(want_summary[k], rel=1e-6, abs=1e-6), k


def _snapshot(workdir: Path) -> dict[str, str]:
  """sha256 of every file under workdir (logs of this test live next to it, not inside)."""
  return {
      str(p.relative_to(workdir)): hashlib.sha256(p.read_bytes()).hexdigest()
      for p in sorted(workdir.rglob("*"))
      if p.is_file()
  }


# ---- 1. has a pulse ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pulse(tmp_path_factory, caches):
  """`python -m fo_rl.main --config=configs/moe_r3.py:tiny --workdir=W`, exactly as documented."""
  workdir = tmp_path_factory.mktemp("pulse") / "run"
  rc, out, seconds = _run(workdir, caches)
  return workdir, rc, out, seconds


@pytest.mark.e2e
def test_tiny_run_has_a_pulse(pulse):
  workdir, rc, out, seconds = pulse
  _ok(rc, out)
  print(f"tiny moe_r3 end to end: {seconds:.0f}s")

  config = json.loads((workdir / "config.json").read_text())
  assert (
      config["name"] == "moe_r3_tiny"
      and config["rl"]["steps"] == 2
      and config["rl"]["replay"] == "r3"
  )

  rows = _rows(workdir)
  assert [r["step"] for r in rows] == [0, 1, 2], "one JSON object per step, plus the step-0 eval"
  for r in rows:
    for k in EVAL_METRICS:
      assert 0.0 <= _number(r[k]) <= 1.0, (r["step"], k)
  for r in rows[1:]:
    missing = [k for k in RL_METRICS if k not in r]
    assert not missing, f"step {r['step']} lacks {missing}"
    for k in RL_METRICS:
      assert math.isfinite(_number(r[k])), (r["step"], k, r[k])
    assert "accuracy" not in r  # it was a copy of reward_mean
    for k in (
        "reward_mean",
        "is_truncated_frac",
        "clip_frac_high",
        "clip_frac_low",
        "train_infer_frac_tau2",
        "router_disagreement_per_decision",
        "router_disagreement_per_token",
    ):
      assert 0.0 <= r[k] <= 1.0, (r["step"], k, r[k])
    assert r["response_length"] > 0 and r["entropy"] > 0
    assert r["grad_norm"] >= 0 and r["update_norm"] >= 0
    if r["reward_mean"] == 0:  # every advantage is 0: the policy gradient must be exactly 0
      assert r["grad_norm"] == 0 and r["update_norm"] == 0, (r["step"], r["grad_norm"])
    assert 0 < r["is_weight_mean"] <= r["is_weight_max"] <= 5.0 * r["ratio_max"] + 1e-5  # TIS cap 5
    assert r["ratio_max"] >= r["ratio_mean"] > 0
    assert r["train_infer_k3"] >= 0
    assert r["skipped_steps"] == 0

  events = list((workdir / "tb").glob("events.out.tfevents.*"))
  assert events and all(e.stat().st_size > 0 for e in events), "no TensorBoard events in tb/"
  assert sum(e.read_bytes().count(b"train_infer_kl") for e in events) >= 1

  assert _ckpt_steps(workdir) == [1, 2], "periodic (checkpoint.every=1) and final checkpoints"
  for s in (1, 2):
    assert (workdir / "checkpoints" / str(s) / "state").is_dir()
    assert (workdir / "checkpoints" / str(s) / "meta").is_dir()
  assert not [p for p in (workdir / "checkpoints").iterdir() if "tmp" in p.name]
  assert (workdir / "sft").is_dir(), "the cold-start checkpoint goes to <workdir>/sft by default"

  summary = json.loads((workdir / "summary.json").read_text())
  for k in SUMMARY_KEYS:
    assert k in summary, k
  assert summary["steps"] == 2 and summary["wall_seconds"] > 0
  assert summary["cold_start_accuracy"] == rows[0]["eval/mean_accuracy"]
  assert summary["final_accuracy"] == rows[-1]["eval/mean_accuracy"]
  assert summary["best_accuracy"] == max(r["eval/mean_accuracy"] for r in rows)

  png = (workdir / "curves.png").read_bytes()
  assert png.startswith(b"\x89PNG") and len(png) > 1000

  for step in (1, 2):
    assert re.search(
        rf"^step {step}/2 reward \d\.\d+ acc \d\.\d+ kl \S+ .*tok/s \d+ ETA \d+m\d\ds$", out, re.M
    ), f"no progress line for step {step}/2 in:\n{out[-2000:]}"


# ---- 3/4. SIGTERM and SIGKILL mid-RL, then resume ---------------------------------------------------


@pytest.fixture(scope="module")
def resume_args(tmp_path_factory, caches):
  """4 RL steps that really train. The tiny default never earns a reward (advantages, gradients and
  updates are all 0, so a resume that lost the parameters or the optimizer state would still match):
  here a JSONL task with answers 0-2 that 30 cold-start steps teach well enough to earn some."""
  d = tmp_path_factory.mktemp("easy_data")
  for split, answers in (("train", [0, 1, 2, 1, 0, 2] * 20), ("test", [0, 1, 2, 1, 0, 2, 1, 0])):
    with open(d / f"{split}.jsonl", "w") as f:
      for a in answers:
        f.write(json.dumps({"prompt": str(a), "answer": str(a)}) + "\n")
  return [
      "--config.rl.steps=4",
      "--config.data.task=jsonl",
      f"--config.data.train_file={d / 'train.jsonl'}",
      f"--config.data.test_file={d / 'test.jsonl'}",
      "--config.sft.steps=30",
      "--config.sft.learning_rate=0.01",
      "--config.optim.learning_rate=0.001",
      "--config.optim.warmup_steps=0",
      f"--config.sft.cache_dir={caches / 'sft'}",
  ]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, caches, pulse, resume_args):
  """An uninterrupted 4-step run (after `pulse`, so its compilations are cached)."""
  workdir = tmp_path_factory.mktemp("reference") / "run"
  out = _ok(*_run(workdir, caches, *resume_args))
  rows = _rows(workdir)
  assert any(
      r.get("update_norm", 0) > 0 for r in rows
  ), "the reference run never updated the policy: the resume comparison would prove nothing"
  return rows, json.loads((workdir / "summary.json").read_text()), out


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory, caches, reference, resume_args):
  """One workdir: SIGTERM mid-RL -> re-run SIGKILLed mid-RL -> re-run to completion."""
  workdir = tmp_path_factory.mktemp("interrupted") / "run"
  args = resume_args
  phases = {}

  # Phase 1: no periodic checkpoints, so only the SIGTERM handler can have saved one.
  proc = _start(workdir, caches, *args, "--config.checkpoint.every=100", log_name="term.txt")
  _wait_for_step(proc, workdir, 1)
  proc.send_signal(signal.SIGTERM)
  t_term = time.time()
  out = _finish(proc)
  phases["term"] = dict(
      rc=proc.returncode,
      out=out,
      exit_seconds=time.time() - t_term,
      rows=_rows(workdir),
      ckpts=_ckpt_steps(workdir),
      summary=json.loads((workdir / "summary.json").read_text())
      if (workdir / "summary.json").exists()
      else None,
  )

  # Phase 2: resume with a checkpoint every step and SIGKILL it after its first new step.
  proc = _start(workdir, caches, *args, "--config.checkpoint.every=1", log_name="kill.txt")
  resumed_from = _last_step(workdir)
  killed_at = _wait_for_step(proc, workdir, resumed_from + 1)
  proc.send_signal(signal.SIGKILL)
  out = _finish(proc)
  phases["kill"] = dict(
      rc=proc.returncode,
      out=out,
      killed_at=killed_at,
      rows=_rows(workdir),
      ckpts=_ckpt_steps(workdir),
  )

  # Phase 3: resume to completion.
  rc, out, _ = _run(workdir, caches, *args, "--config.checkpoint.every=1")
  phases["final"] = dict(
      rc=rc,
      out=out,
      rows=_rows(workdir),
      ckpts=_ckpt_steps(workdir),
      summary=json.loads((workdir / "summary.json").read_text())
      if (workdir / "summary.json").exists()
      else None,
  )
  return workdir, phases


@pytest.mark.e2e
def test_sigterm_checkpoints_last_step_and_exits_cleanly(interrupted):
  workdir, phases = interrupted
  term = phases["term"]
  out = term["out"]
  assert (
      term["rc"] == 0
  ), f"SIGTERM should exit 0 after checkpointing; got {term['rc']}:\n{out[-3000:]}"
  last = max(r["step"] for r in term["rows"])
  assert 1 <= last < 4, f"SIGTERM was sent during RL, but the run reached step {last} of 4"
  assert term["ckpts"] == [
      last
  ], f"the checkpoint after SIGTERM is {term['ckpts']}, the last step in metrics.jsonl is {last}"
  assert f"SIGTERM: checkpointed step {last}" in out
  assert term["summary"] is not None and term["summary"]["steps"] == last
  assert term["summary"]["preempted"] is True
  assert term["exit_seconds"] < 120, "a preempted run must exit promptly (TPU grace period ~30s)"
  # The next run resumes from that checkpoint: no cold start, no step-0 eval again.
  nxt = phases["kill"]["out"]
  assert f"resuming from {workdir}/checkpoints step {last}" in nxt, nxt[-3000:]
  assert "SFT step" not in nxt and "cold start: held-out" not in nxt


@pytest.mark.e2e
def test_sigkill_mid_rl_then_resume_matches_uninterrupted_run(interrupted, reference):
  workdir, phases = interrupted
  kill = phases["kill"]
  assert (
      kill["rc"] == -signal.SIGKILL
  ), f"the run ended before it was killed:\n{kill['out'][-3000:]}"
  assert kill["killed_at"] < 4, "killed after the last step: nothing left to resume"
  final = phases["final"]
  _ok(final["rc"], final["out"])
  assert "resuming from" in final["out"]
  want_rows, want_summary, _ = reference
  assert [r["step"] for r in want_rows] == [0, 1, 2, 3, 4]
  _assert_same_run(final["rows"], want_rows, final["summary"], want_summary)
  assert final["summary"]["preempted"] is False
  assert final["ckpts"][-1] == 4


# ---- 5. bad input: a clear error, fast, before anything expensive, nothing lost ------------------------

FAST = 30  # seconds: import + parse take a few on a loaded 2-core machine; SFT + compilation take minutes


def _fails_fast(workdir: Path, caches: Path, *overrides: str) -> str:
  rc, out, seconds = _run(workdir, caches, *overrides, timeout=300)
  assert rc != 0, f"{overrides} should be rejected:\n{out[-3000:]}"
  assert seconds < FAST, f"{overrides}: the error took {seconds:.0f}s"
  assert "SFT step" not in out and "cold start" not in out and "step 1/" not in out
  return out


def _last_error_line(out: str) -> str:
  lines = [l for l in out.strip().splitlines() if l.strip()]
  return lines[-1] if lines else ""


@pytest.mark.e2e
@pytest.mark.parametrize(
    "overrides, field",
    [
        (["--config.rl.mini_batches=3"], "rl.mini_batches"),  # tiny: 4 prompts x 4 samples = 16
        (["--config.rl.replay=r3", "--config.model.num_experts=0"], "rl.replay"),
        (["--config.rl.loss.name=nope"], "rl.loss.name"),
        (["--config.parallel.mesh.fsdp=3"], "parallel.mesh"),  # 3 devices, 8 available
        (["--config.rl.foo=1"], "foo"),  # not a field: ml_collections rejects it
        (["--config.sampler.moe_impl=sparse"], "sampler.moe_impl"),
    ],
    ids=["mini_batches", "replay_dense", "loss_name", "mesh", "unknown_field", "sampler_moe_impl"],
)
def test_bad_config_is_a_fast_error_naming_the_field(tmp_path, caches, overrides, field):
  workdir = tmp_path / "run"
  out = _fails_fast(workdir, caches, *overrides)
  assert field in _last_error_line(out), f"the error should name {field}:\n{out[-2000:]}"
  assert not workdir.exists(), f"a rejected config wrote {sorted(os.listdir(workdir))}"


# Not marked e2e: the fast tier's one run of `python -m fo_rl.main` (it stops in seconds, before
# SFT), so that tier reaches fo_rl/main.py and the start of fo_rl/run.py.
def test_malformed_jsonl_is_a_fast_error_naming_file_and_line(tmp_path, caches):
  good = '{"prompt": "What is 2 + 3?", "answer": "5"}\n'
  train = tmp_path / "train.jsonl"
  train.write_text(good * 3 + '{"prompt": "What is 1 + 1?" "answer": "2"}\n' + good)
  test = tmp_path / "test.jsonl"
  test.write_text(good * 4)
  workdir = tmp_path / "run"
  out = _fails_fast(
      workdir,
      caches,
      "--config.data.task=jsonl",
      f"--config.data.train_file={train}",
      f"--config.data.test_file={test}",
  )
  err = _last_error_line(out)
  assert str(train) in err and "line 4" in err, f"should name {train} line 4:\n{out[-2000:]}"
  # Nothing that would stop the corrected command (a different file, say) from starting afresh.
  assert not (workdir / "config.json").exists()


@pytest.mark.e2e
def test_resuming_with_a_different_config_is_an_error_and_loses_nothing(pulse, caches):
  workdir, rc, out, _ = pulse
  _ok(rc, out)
  before = _snapshot(workdir)
  assert "config.json" in before and "metrics.jsonl" in before
  assert any(k.startswith("checkpoints/") for k in before)
  out = _fails_fast(workdir, caches, "--config.rl.loss.tis_cap=3.0")
  err = _last_error_line(out)
  assert "different config" in err and "rl.loss.tis_cap" in err, out[-2000:]
  assert _snapshot(workdir) == before, "a rejected resume changed the workdir"
