"""SIGTERM (a TPU preemption notice) before the RL loop: during the cold start's SFT, and during the
cold start's held-out eval. Each is delivered at an exact point of the run (the log line of an SFT step:
run() installs its handler before SFT), in this process, so the tests are deterministic.

* SFT interrupted at step 4 of 10 saves its state, exits with summary.preempted, and the re-run resumes
  SFT at step 4 and ends exactly where an uninterrupted SFT ends (same logged losses, same cold-start
  accuracy);
* SIGTERM during the step-0 eval checkpoints step 0 (the cold start and its accuracy) and the re-run
  resumes from it without SFT or the eval again.
(tests/test_main.py covers SIGTERM and SIGKILL during RL through the real entry point.)

And the other way a run stops early: `rl.max_skipped_steps` consecutive RL steps whose every update was
skipped for a non-finite gradient (here NaN advantages from RL step 2 on) stop it with an error naming the
knob, keeping the metrics written and the checkpoints saved; the re-run resumes from the last one.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.e2e  # the main job, in process

ROOT = Path(__file__).resolve().parents[1]


def _tiny():
  spec = importlib.util.spec_from_file_location("fo_rl_preempt_cfg", ROOT / "configs/moe_r3.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config("tiny")
  c.rl.steps = 1
  c.sft.cache_dir = ""  # each workdir trains its own cold start (<workdir>/sft)
  return c


def _run(workdir: Path, sigterm_on: str | None = None):
  """run() on the tiny config; sends this process SIGTERM right after the log line `sigterm_on`."""
  from fo_rl.run import run

  lines = []

  def log(s):
    lines.append(s)
    if sigterm_on is not None and s.startswith(sigterm_on):
      os.kill(os.getpid(), signal.SIGTERM)

  summary = run(_tiny(), str(workdir), log=log)
  return summary, lines


def _losses(lines):
  return [
      m.group(0)
      for s in lines
      for m in [re.match(r"cold start: SFT step \d+/\d+ loss \S+", s)]
      if m
  ]


def _ckpt_steps(workdir: Path):
  d = workdir / "checkpoints"
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.exists() else []


@pytest.fixture(scope="module")
def eval_preempted(tmp_path_factory, run_caches):
  """SIGTERM after the last SFT step (so during the step-0 eval), then the re-run. (run_caches: the
  compiled programs are shared with test_configs' tiny runs; the cold starts are not.)"""
  workdir = tmp_path_factory.mktemp("eval_preempted") / "run"
  first = _run(workdir, sigterm_on="cold start: SFT step 10/10")
  ckpts = _ckpt_steps(workdir)
  second = _run(workdir)
  return workdir, first, ckpts, second


def test_sigterm_during_the_cold_start_eval_checkpoints_step_0(eval_preempted):
  workdir, (summary, lines), ckpts, (summary2, lines2) = eval_preempted
  assert "SIGTERM: checkpointed step 0 (the cold start), exiting" in lines
  assert summary["preempted"] is True and summary["steps"] == 0
  assert summary["cold_start_accuracy"] is not None
  assert ckpts == [0]
  assert f"resuming from {workdir}/checkpoints step 0" in lines2
  assert not any("SFT step" in s or "cold start: held-out" in s for s in lines2), lines2
  assert summary2["preempted"] is False and summary2["steps"] == 1
  assert summary2["cold_start_accuracy"] == summary["cold_start_accuracy"]


def test_sigterm_during_sft_saves_it_and_the_rerun_resumes_it(tmp_path, eval_preempted):
  _, (reference, ref_lines), _, _ = (
      eval_preempted  # an uninterrupted SFT (its eval was interrupted)
  )
  workdir = tmp_path / "run"
  summary, lines = _run(workdir, sigterm_on="cold start: SFT step 4/10")
  assert summary["preempted"] is True and summary["steps"] == 0
  assert any(s.startswith("SIGTERM: saved the cold start at SFT step 4/10") for s in lines), lines
  assert not any("held-out" in s for s in lines), "a preempted SFT must not go on to the eval"
  assert not (workdir / "checkpoints").exists() or _ckpt_steps(workdir) == []
  partial = workdir / "sft.partial"
  assert sorted(p.name for p in partial.iterdir() if p.name.isdigit()) == ["4"]
  assert json.loads((workdir / "summary.json").read_text())["preempted"] is True

  summary2, lines2 = _run(workdir)
  assert any(s.startswith("cold start: resuming SFT at step 4/10") for s in lines2), lines2
  assert _losses(lines2) == _losses(ref_lines)[4:], "resumed SFT differs from an uninterrupted one"
  assert summary2["cold_start_accuracy"] == reference["cold_start_accuracy"]
  assert summary2["preempted"] is False and summary2["steps"] == 1
  assert not partial.exists(), "the finished cold start supersedes the partial one"


def test_consecutive_fully_skipped_steps_stop_the_run_keeping_metrics_and_checkpoints(
    tmp_path, monkeypatch, run_caches
):
  from fo_rl import run as run_lib
  from fo_rl.metrics_writer import read_metrics

  real = run_lib.group_advantages
  calls = []

  def nan_from_step_2(rewards, G, mode):
    calls.append(1)
    adv = real(rewards, G, mode)
    return adv if len(calls) == 1 else np.full_like(adv, np.nan)  # every update of the step: NaN

  monkeypatch.setattr(run_lib, "group_advantages", nan_from_step_2)
  c = _tiny()
  c.rl.steps, c.rl.max_skipped_steps, c.checkpoint.max_to_keep = 6, 2, 5
  N = c.rl.mini_batches
  workdir = tmp_path / "run"
  lines = []
  with pytest.raises(run_lib.SkippedUpdatesError) as e:
    run_lib.run(c, str(workdir), log=lines.append)
  msg = str(e.value)
  assert msg.startswith(
      "rl.max_skipped_steps=2: every update of the last 2 RL steps (2..3) was skipped"
  ), msg
  assert "the last checkpoint is step 2" in msg, msg
  steps = [s for s in lines if s.startswith("step ")]
  assert [s.split()[1] for s in steps] == ["1/6", "2/6", "3/6"], lines  # stopped after step 3
  assert [re.search(r"skipped (\d+/\d+)", s).group(1) for s in steps] == [
      f"0/{N}",
      f"{N}/{N}",
      f"{N}/{N}",
  ]
  # The metrics written are kept, the stopping step's row included.
  rows = read_metrics(str(workdir))
  assert [r["step"] for r in rows] == [0, 1, 2, 3]
  assert [r["skipped_steps"] for r in rows[1:]] == [0, N, N]
  assert [r["skipped_steps_total"] for r in rows[1:]] == [0, N, 2 * N]
  assert not (workdir / "summary.json").exists()  # an error, not a finished run
  # The checkpoints saved before the stop are kept and finalized; the stopping step is not saved.
  assert _ckpt_steps(workdir) == [1, 2]
  assert not any("tmp" in p.name for p in (workdir / "checkpoints").iterdir())

  # The last checkpoint is intact: without the NaN, the re-run resumes from it and trains step 3.
  monkeypatch.setattr(run_lib, "group_advantages", real)
  c.rl.steps = 3
  lines2 = []
  summary = run_lib.run(c, str(workdir), log=lines2.append)
  assert f"resuming from {workdir}/checkpoints step 2" in lines2, lines2
  assert summary["steps"] == 3 and summary["preempted"] is False
  rows = read_metrics(str(workdir))
  assert [r["step"] for r in rows] == [0, 1, 2, 3] and rows[-1]["skipped_steps"] == 0
