"""fo_rl.paper: the paper suites' configs, the run plan, the verdict rules on synthetic curves and
results, the report / figure, and the runner end to end (2 tiny variants x 1 seed, resumed once)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fo_rl import config as config_lib
from fo_rl.paper import report as Rp
from fo_rl.paper import results as Rs
from fo_rl.paper import suites as S
from fo_rl.paper import sweep as W
from fo_rl.paper import verdicts as V
from fo_rl.common import json_safe

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------------------
# Configs and plan.
# ---------------------------------------------------------------------------------------------------------


def _knob(c, field):
  return S.get_field(c, field)


def test_suite_variants_and_knobs():
  on, off, cold = (S.load_suite(s) for s in S.SUITES)
  assert list(on.VARIANTS) == [
      "minirl",
      "minirl_length_norm",
      "minirl_no_is",
      "minirl_r3",
      "minirl_length_norm_r3",
      "minirl_no_is_r3",
  ]
  assert len(off.VARIANTS) == 15 and list(cold.VARIANTS) == ["careful", "terse", "noisy"]
  names = [v for m in (on, off, cold) for v in m.VARIANTS]
  assert len(names) == len(set(names)), "variant names share DIR/<variant>: they must be unique"

  expect = {
      (on, "minirl"): {
          "rl.mini_batches": 1,
          "rl.replay": "none",
          "rl.loss.clip": True,
          "rl.loss.train_infer_is": True,
          "rl.loss.length_norm": False,
      },
      (on, "minirl_length_norm"): {"rl.loss.length_norm": True, "rl.replay": "none"},
      (on, "minirl_no_is"): {"rl.loss.train_infer_is": False, "rl.replay": "none"},
      (on, "minirl_no_is_r3"): {
          "rl.loss.train_infer_is": False,
          "rl.replay": "r3",
          "rl.mini_batches": 1,
      },
      (off, "n2_noclip"): {"rl.mini_batches": 2, "rl.replay": "none", "rl.loss.clip": False},
      (off, "n4_r2_noclip"): {"rl.mini_batches": 4, "rl.replay": "r2", "rl.loss.clip": False},
      (off, "n8_r2"): {"rl.mini_batches": 8, "rl.replay": "r2", "rl.loss.clip": True},
      (off, "n4_r3"): {"rl.mini_batches": 4, "rl.replay": "r3", "rl.loss.clip": True},
      (off, "n8_minirl"): {"rl.mini_batches": 8, "rl.replay": "none", "rl.loss.clip": True},
      (cold, "terse"): {"sft.teacher": "terse", "rl.mini_batches": 4, "rl.replay": "r3"},
  }
  for (mod, v), knobs in expect.items():
    c = mod.get_config(v)
    for field, value in knobs.items():
      assert _knob(c, field) == value, (v, field)
  for mod in (on, off, cold):
    first = list(mod.VARIANTS)[0]
    for v in mod.VARIANTS:
      c = mod.get_config(v)
      config_lib.parse(c)
      assert c.sampler.weight_dtype == "float8_e4m3fn"  # the discrepancy is real in every variant
      t = mod.get_config(f"{v}:tiny")
      assert t.rl.steps < c.rl.steps and t.name.endswith("_tiny")
      assert _knob(t, "rl.mini_batches") == _knob(c, "rl.mini_batches")
    # "tiny" alone and "" are the first variant; the docstring gives the exact command
    assert mod.get_config("tiny").to_json() == mod.get_config(f"{first}:tiny").to_json()
    assert mod.get_config().to_json() == mod.get_config(first).to_json()
    suite = mod.__name__.removeprefix("fo_rl_paper_")
    assert f"python -m fo_rl.main --config=configs/paper/{suite}.py:" in mod.__doc__
    assert f"python -m fo_rl.paper --suite={suite}" in mod.__doc__
    with pytest.raises(ValueError, match="unknown variant"):
      mod.get_config("nope")


def test_plan_commands_and_shared_cold_starts(tmp_path):
  runs = W.build_plan(
      "offpolicy",
      [0, 1],
      tmp_path,
      variants=["n2_r2", "n8_r3"],
      steps=7,
      overrides=[("eval.every", "3")],
  )
  assert [r.name for r in runs] == ["n2_r2/seed0", "n2_r2/seed1", "n8_r3/seed0", "n8_r3/seed1"]
  r = runs[1]
  cmd = r.shell()
  assert cmd.startswith("python -m fo_rl.main --config=configs/paper/offpolicy.py:n2_r2 ")
  for part in (
      f"--workdir={tmp_path}/n2_r2/seed1",
      "--config.seed=1",
      f"--config.sft.cache_dir={tmp_path}/sft_cache",
      "--config.rl.steps=7",
      "--config.eval.every=3",
  ):
    assert part in cmd
  assert r.target_steps == 7
  # one cold start per seed, shared by all variants of the seed
  assert runs[0].sft_key == runs[2].sft_key != runs[1].sft_key == runs[3].sft_key
  cold = W.build_plan("coldstart", [0], tmp_path, tiny=True)
  assert len({r.sft_key for r in cold}) == 3  # one per teacher
  assert all(r.config_arg.endswith(":tiny") for r in cold)
  with pytest.raises(ValueError, match="not in suite"):
    W.build_plan("onpolicy", [0], tmp_path, variants=["n2_r2"])
  with pytest.raises(ValueError, match="mini_batches"):  # a bad override fails before anything runs
    W.build_plan(
        "onpolicy", [0], tmp_path, variants=["minirl"], overrides=[("rl.mini_batches", "7")]
    )


def test_finished_and_sft_ready(tmp_path):
  wd = tmp_path / "v" / "seed0"
  wd.mkdir(parents=True)
  assert not W.is_finished(wd, 5)
  (wd / "summary.json").write_text(json.dumps({"steps": 3}))
  assert W.is_finished(wd) and not W.is_finished(wd, 5) and W.is_finished(wd, 3)
  key = tmp_path / "sft_cache" / "abc"
  key.mkdir(parents=True)
  assert not W.sft_ready(tmp_path / "sft_cache", "abc")
  (key / "800.orbax-checkpoint-tmp-123").mkdir()  # orbax's in-progress directory
  assert not W.sft_ready(tmp_path / "sft_cache", "abc")
  (key / "800").mkdir()
  assert W.sft_ready(tmp_path / "sft_cache", "abc")


# ---------------------------------------------------------------------------------------------------------
# Synthetic curves.
# ---------------------------------------------------------------------------------------------------------

STEPS, EVERY = 60, 10


def curves(acc, entropy=None, kl=None, reward=None):
  """Evaluations `acc` at steps 0, 10, ..., per-step entropy / kl / reward (constant or array)."""
  acc = list(acc)
  n = (len(acc) - 1) * EVERY
  per = lambda v, d: list(np.broadcast_to(np.asarray(d if v is None else v, float), (n,)))
  return {
      "eval_step": [i * EVERY for i in range(len(acc))],
      "eval_acc": acc,
      "eval_greedy": acc,
      "step": list(range(1, n + 1)),
      "entropy": per(entropy, 0.5),
      "kl": per(kl, 1e-3),
      "reward": per(reward, 0.5),
      "k3": per(None, 0.0),
      "clip_high": per(None, 0.0),
      "clip_low": per(None, 0.0),
  }


def test_collapse_rule_on_synthetic_curves():
  rng = np.random.default_rng(0)
  # stable and improving
  assert (
      V.collapse_reasons(curves([0.3, 0.4, 0.5, 0.55, 0.6, 0.6, 0.62], np.linspace(0.5, 0.35, 60)))
      == []
  )
  # noisy but stable: accuracy jitters by +-0.07 (never 0.15 below its peak twice), entropy by +-0.1
  noisy_acc = 0.5 + rng.uniform(-0.07, 0.07, 7)
  noisy_ent = 0.5 + rng.uniform(-0.1, 0.1, 60)
  assert V.collapse_reasons(curves(noisy_acc, noisy_ent)) == []
  # a dip that recovers by the end, and a single bad last evaluation, are not collapses
  assert V.collapse_reasons(curves([0.4, 0.6, 0.2, 0.1, 0.5, 0.55, 0.6])) == []
  assert V.collapse_reasons(curves([0.4, 0.6, 0.6, 0.6, 0.6, 0.6, 0.3])) == []
  # planted: accuracy falls from its peak and stays down
  r = V.collapse_reasons(curves([0.4, 0.55, 0.6, 0.5, 0.3, 0.1, 0.05]))
  assert len(r) == 1 and V.reason_kind(r[0]) == "accuracy drop"
  # exactly the threshold counts (at least 0.15 below the peak)
  assert V.collapse_reasons(curves([0.5, 0.65, 0.6, 0.6, 0.6, 0.5, 0.5]))
  assert not V.collapse_reasons(curves([0.5, 0.65, 0.6, 0.6, 0.6, 0.51, 0.5]))
  # planted: entropy crash (accuracy still fine), entropy surge, non-finite entropy
  crash = np.concatenate([np.full(40, 0.5), np.linspace(0.5, 0.02, 20)])
  assert [V.reason_kind(x) for x in V.collapse_reasons(curves([0.5] * 7, crash))] == [
      "entropy crash"
  ]
  surge = np.concatenate([np.full(40, 0.5), np.linspace(0.5, 3.0, 20)])
  assert [V.reason_kind(x) for x in V.collapse_reasons(curves([0.5] * 7, surge))] == [
      "entropy surge"
  ]
  nan_end = np.concatenate([np.full(58, 0.5), [np.nan, np.nan]])
  assert [V.reason_kind(x) for x in V.collapse_reasons(curves([0.5] * 7, nan_end))] == [
      "non-finite entropy"
  ]
  # a gradual entropy decline that stays above the crash fraction is not a collapse
  assert V.collapse_reasons(curves([0.5] * 7, np.linspace(0.5, 0.15, 60))) == []
  # both rules at once
  both = V.collapse_reasons(curves([0.5, 0.6, 0.6, 0.4, 0.2, 0.1, 0.1], crash))
  assert sorted(V.reason_kind(x) for x in both) == ["accuracy drop", "entropy crash"]


def test_run_stats():
  s = Rs.run_stats(curves([0.3, 0.4, 0.5, 0.6, 0.5, 0.55, 0.65], kl=2e-3))
  assert s["cold_start_accuracy"] == 0.3
  assert s["final_accuracy"] == pytest.approx(0.6)  # mean of the last two evaluations
  assert s["peak_accuracy"] == 0.65 and s["mean_train_infer_kl"] == pytest.approx(2e-3)
  assert s["collapsed"] is False


def stat(values):
  return Rs._stat(values)


def test_better_respects_the_seed_spread():
  a, b = stat([0.60, 0.62, 0.58]), stat([0.50, 0.52, 0.48])  # std 0.02 each, difference 0.10
  assert V.compare(a, b) == "better" and V.compare(b, a) == "worse"
  wide = stat([0.75, 0.50, 0.45])  # mean 0.567, std 0.16: the difference to a is inside the spread
  assert V.compare(a, wide) == "tie" and V.compare(wide, a) == "tie"
  # the margin is max(std_a, std_b), not the smaller one
  c, d = stat([0.60, 0.60, 0.60]), stat([0.40, 0.60, 0.80])  # diff 0 -> tie; std_d = 0.2
  assert V.compare(c, d) == "tie"
  e, f = stat([0.70, 0.70, 0.70]), stat([0.35, 0.55, 0.75])  # diff 0.15 < std_f 0.2 -> tie
  assert V.compare(e, f) == "tie"
  g = stat([0.80, 0.80, 0.80])  # diff 0.25 > 0.2 -> better
  assert V.compare(g, f) == "better"
  # a single seed cannot say anything
  assert V.compare(stat([0.9]), stat([0.1, 0.1])) == "n/a"
  # the accuracy floor: identical seeds 0.005 apart are a tie
  assert V.compare(stat([0.5, 0.5]), stat([0.495, 0.495]), floor=V.ACC_MIN_DIFF) == "tie"
  # lower is better for the KL
  assert V.compare(stat([1e-4, 1.1e-4]), stat([1e-3, 1.2e-3]), higher_is_better=False) == "better"


def test_combine():
  R, N, I = V.REPRODUCED, V.NOT_REPRODUCED, V.INCONCLUSIVE
  assert V.combine([R, R, R]) == R
  assert V.combine([N, N]) == N and V.combine([N, I]) == N
  assert V.combine([R, N]) == I and V.combine([R, I]) == I and V.combine([I, I]) == I
  assert V.combine([]) == I


# ---------------------------------------------------------------------------------------------------------
# Findings on synthetic results.
# ---------------------------------------------------------------------------------------------------------

SEEDS = (0, 1, 2)
JITTER = (-0.01, 0.0, 0.01)


def good(final, kl=1e-3, start=0.3):
  """A stable run per seed that rises from `start` to a plateau at `final` (+ a small seed jitter)."""
  return {
      s: Rs.run_record(curves(list(np.linspace(start, final + j, 5)) + [final + j] * 2, kl=kl))
      for s, j in zip(SEEDS, JITTER)
  }


def collapsing(start=0.3):
  crash = np.concatenate([np.full(30, 0.5), np.linspace(0.5, 0.02, 30)])
  return {
      s: Rs.run_record(curves([start, 0.45, 0.5 + j, 0.4, 0.2, 0.05, 0.02], crash))
      for s, j in zip(SEEDS, JITTER)
  }


def mixed():
  runs = good(0.6)
  runs[2] = collapsing()[2]
  return runs


def verdicts(found):
  return {f["id"]: f["verdict"] for f in found}


R, N, I = V.REPRODUCED, V.NOT_REPRODUCED, V.INCONCLUSIVE


def onpolicy(**changes):
  v = {
      "minirl": good(0.6),
      "minirl_length_norm": good(0.5),
      "minirl_no_is": collapsing(),
      "minirl_r3": good(0.6, kl=2e-4),
      "minirl_length_norm_r3": good(0.5),
      "minirl_no_is_r3": collapsing(),
  }
  v.update(changes)
  v = {k: r for k, r in v.items() if r is not None}
  return V.onpolicy_findings(Rs.suite_record(v))


def test_onpolicy_findings():
  assert verdicts(onpolicy()) == {"1a": R, "1b": R, "1c": R, "1d": R, "1e": R}
  # length normalization better than MiniRL: 1a and 1b not reproduced
  v = verdicts(onpolicy(minirl_length_norm=good(0.7)))
  assert v["1a"] == N and v["1b"] == N
  # length normalization collapses: "stable but worse" is not reproduced
  assert verdicts(onpolicy(minirl_length_norm=collapsing()))["1b"] == N
  # within the seed spread: inconclusive
  assert verdicts(onpolicy(minirl_length_norm=good(0.595)))["1b"] == I
  # no IS stays stable: not reproduced; collapses in 1 of 3 seeds: inconclusive
  assert verdicts(onpolicy(minirl_no_is=good(0.4)))["1c"] == N
  assert verdicts(onpolicy(minirl_no_is=mixed()))["1c"] == I
  # MiniRL itself collapsing in a seed makes 1c inconclusive
  assert verdicts(onpolicy(minirl=mixed()))["1c"] == I
  # R3 with a higher KL / an accuracy gain
  assert verdicts(onpolicy(minirl_r3=good(0.6, kl=5e-3)))["1d"] == N
  assert verdicts(onpolicy(minirl_r3=good(0.6, kl=1e-3)))["1d"] == I
  v = verdicts(onpolicy(minirl_r3=good(0.7, kl=2e-4)))
  assert v["1e"] == N and v["1a"] == N and v["1d"] == R
  assert verdicts(onpolicy(minirl_r3=good(0.5, kl=2e-4)))["1e"] == R  # worse is "no gain" too
  # one seed only: no comparison can be made
  one = lambda runs: {0: runs[0]}
  v = verdicts(
      onpolicy(minirl=one(good(0.6)), minirl_length_norm=one(good(0.4)), minirl_r3=one(good(0.6)))
  )
  assert v["1a"] == I and v["1b"] == I and v["1e"] == I
  # missing variants
  v = verdicts(onpolicy(minirl_r3=None))
  assert v["1d"] == I and v["1e"] == I
  f = {x["id"]: x for x in onpolicy(minirl_r3=None)}
  assert "minirl_r3" in f["1d"]["evidence"] and "minirl," not in f["1d"]["evidence"]
  # the evidence carries the numbers
  f = {x["id"]: x for x in onpolicy()}
  assert "0.600" in f["1a"]["evidence"] and "entropy crash" in f["1c"]["evidence"]


def offpolicy(overrides=None, ns=(2, 4, 8)):
  v = {}
  for n in ns:
    v[f"n{n}_noclip"] = collapsing()
    v[f"n{n}_r2_noclip"] = collapsing()
    v[f"n{n}_minirl"] = collapsing()
    v[f"n{n}_r2"] = good(0.65 if n == 2 else 0.55)
    v[f"n{n}_r3"] = good(0.55 if n == 2 else 0.65)
  v.update(overrides or {})
  v = {k: r for k, r in v.items() if r is not None}
  return V.offpolicy_findings(Rs.suite_record(v))


def test_offpolicy_findings():
  assert verdicts(offpolicy()) == {"2a": R, "2b": R, "3a": R, "3b": R}
  # clipping unnecessary everywhere -> not reproduced; only at N=8 -> mixed evidence, inconclusive
  v = verdicts(offpolicy({f"n{n}_r2_noclip": good(0.6) for n in (2, 4, 8)}))
  assert v["2a"] == N
  assert verdicts(offpolicy({"n8_r2_noclip": good(0.6)}))["2a"] == I
  # replay unnecessary at N=2, undecided elsewhere -> not reproduced
  v = verdicts(offpolicy({"n2_minirl": good(0.6), "n4_minirl": mixed(), "n8_minirl": mixed()}))
  assert v["2b"] == N
  # R2 with clipping collapsing too: 2a cannot credit clipping
  assert verdicts(offpolicy({"n4_r2": collapsing()}))["2a"] == I
  # R3 beats R2 at N=2: 3a not reproduced; R2 beats R3 at N=8 only: 3b inconclusive; at both: not
  assert verdicts(offpolicy({"n2_r3": good(0.75)}))["3a"] == N
  assert verdicts(offpolicy({"n8_r2": good(0.75)}))["3b"] == I
  assert verdicts(offpolicy({"n4_r2": good(0.75), "n8_r2": good(0.75)}))["3b"] == N
  assert verdicts(offpolicy({"n2_r3": good(0.65)}))["3a"] == I  # a tie
  # only N=2 was run: 3b has no data
  found = {f["id"]: f for f in offpolicy(ns=(2,))}
  assert found["3a"]["verdict"] == R and found["3b"]["verdict"] == I
  # N=4, 8 missing -> inconclusive sub-checks -> 2a inconclusive although N=2 reproduces
  assert [c["verdict"] for c in found["2a"]["checks"]] == [R, I, I] and found["2a"]["verdict"] == I


def coldstart(finals=(0.6, 0.6, 0.6), starts=(0.5, 0.35, 0.2), **changes):
  v = {t: good(f, start=s) for t, f, s in zip(("careful", "terse", "noisy"), finals, starts)}
  v.update(changes)
  return V.coldstart_findings(Rs.suite_record(v))


def test_coldstart_findings():
  assert verdicts(coldstart()) == {"4": R}
  assert verdicts(coldstart(finals=(0.7, 0.6, 0.5))) == {"4": N}
  assert verdicts(coldstart(starts=(0.3, 0.3, 0.3))) == {"4": I}  # nothing to converge from
  assert verdicts(coldstart(noisy=mixed())) == {"4": I}  # not all stable
  assert verdicts(coldstart(noisy={})) == {"4": I}  # no data


# ---------------------------------------------------------------------------------------------------------
# Report and figure from synthetic results.
# ---------------------------------------------------------------------------------------------------------


def test_report_and_figure_from_synthetic_results(tmp_path):
  v = {}
  groups = {}
  for n in (2, 4):
    for name, runs in (
        (f"n{n}_r2", good(0.6)),
        (f"n{n}_r2_noclip", collapsing()),
        (f"n{n}_r3", good(0.5)),
    ):
      v[name], groups[name] = runs, f"N={n}"
  suite = Rs.suite_record(v, groups, {"model": "tiny"})
  results = {
      "workdir": str(tmp_path),
      "generated": "now",
      "rules": V.RULES_TEXT,
      "suites": {"offpolicy": suite},
  }
  results["findings"] = V.findings(results)
  png = Rp.plot_suite("offpolicy", suite, tmp_path / "offpolicy.png")
  assert os.path.getsize(png) > 10_000
  report = Path(Rp.write_report(results, tmp_path)).read_text()
  assert "## Verdict rules" in report and V.RULES_TEXT.splitlines()[0] in report
  assert "| 2a |" in report and "offpolicy.png" in report and "- model: tiny" in report
  json.dumps(
      json_safe(results), allow_nan=False
  )  # results.json (report.write_outputs) is strict JSON


# ---------------------------------------------------------------------------------------------------------
# The scheduler, with a fake `fo_rl.main` (a cold start takes 0.6 s, the rest 0.3 s).
# ---------------------------------------------------------------------------------------------------------

FAKE_MAIN = """
import json, os, sys, time
args = dict(a.split("=", 1) for a in sys.argv[1:] if "=" in a)
wd, key = args["--workdir"], args["--fake_key"]
ready_dir = os.path.join(args["--config.sft.cache_dir"], key, "1")
def event(name):
  with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps({"run": os.path.basename(os.path.dirname(wd)), "event": name, "t": time.time(),
                        "ready": os.path.isdir(ready_dir)}) + "\\n")
event("start")
if "--fake_fail" in args:
  sys.exit(3)
if not os.path.isdir(ready_dir):
  time.sleep(0.6)
  os.makedirs(ready_dir)  # the cold start is on disk
  event("sft_done")
time.sleep(0.3)
json.dump({"steps": 2}, open(os.path.join(wd, "summary.json"), "w"))
"""


def _fake_runs(root, spec):
  return [
      W.Run(
          suite="onpolicy",
          variant=v,
          seed=0,
          config_arg=v,
          workdir=root / v / "seed0",
          flags=[f"--config.sft.cache_dir={root / 'sft_cache'}", f"--fake_key={key}"]
          + (["--fake_fail=1"] if fail else []),
          target_steps=2,
          sft_key=key,
          data=(),
          module="fake_main",
      )
      for v, key, fail in spec
  ]


def _events(log):
  return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


@pytest.mark.slow
def test_scheduler_shares_cold_starts_and_resumes(tmp_path, monkeypatch):
  (tmp_path / "fake_main.py").write_text(FAKE_MAIN)
  monkeypatch.setenv("PYTHONPATH", str(tmp_path))
  log = tmp_path / "events.jsonl"
  monkeypatch.setenv("FAKE_LOG", str(log))
  root = tmp_path / "exp"
  runs = _fake_runs(
      root, [("a", "k0", False), ("b", "k0", False), ("c", "k1", False), ("d", "k0", False)]
  )
  lines = []
  codes = W.execute(runs, 2, log=lines.append, poll_seconds=0.05)
  assert codes == {"a/seed0": 0, "b/seed0": 0, "c/seed0": 0, "d/seed0": 0}
  ev = _events(log)
  starts = {e["run"]: e for e in ev if e["event"] == "start"}
  sft_done = {e["run"]: e["t"] for e in ev if e["event"] == "sft_done"}
  # a computes k0's cold start and c k1's, side by side; b and d wait for k0 and reuse it
  assert set(sft_done) == {"a", "c"}
  assert not starts["a"]["ready"] and not starts["c"]["ready"]
  assert starts["b"]["ready"] and starts["d"]["ready"] and starts["b"]["t"] >= sft_done["a"]
  assert starts["c"]["t"] < sft_done["a"]  # another cold start did not wait
  assert any("[computes its cold start]" in x for x in lines)
  assert all(
      (r.workdir / "summary.json").exists() and (r.workdir / "command.txt").exists() for r in runs
  )
  # resume: everything is finished, nothing starts
  n = len(ev)
  assert W.execute(runs, 2, log=lines.append, poll_seconds=0.05) == {}
  assert len(_events(log)) == n and "4 already finished, 0 to run" in lines[-1]

  # a leader that fails before its cold start hands the job to the next run of that cold start
  runs = _fake_runs(root, [("e", "k2", True), ("f", "k2", False)])
  codes = W.execute(runs, 2, log=lines.append, poll_seconds=0.05)
  assert codes == {"e/seed0": 3, "f/seed0": 0}
  ev = [e for e in _events(log)[n:] if e["event"] == "start"]
  assert [e["run"] for e in ev] == ["e", "f"] and not ev[1]["ready"]
  assert any("FAILED (exit 3" in x for x in lines)


# ---------------------------------------------------------------------------------------------------------
# End to end: 2 tiny variants x 1 seed through `python -m fo_rl.paper`, then a resume that runs nothing.
# One at a time: the second run reuses the first's cold start and compiled programs (about 70 s of CPU in
# all; parallel scheduling is tested above with a fake main).
# ---------------------------------------------------------------------------------------------------------


def _cli(args, env):
  t0 = time.time()
  p = subprocess.run(
      [sys.executable, "-m", "fo_rl.paper", *args],
      cwd=REPO,
      env=env,
      capture_output=True,
      text=True,
      timeout=900,
  )
  return p, time.time() - t0


@pytest.mark.e2e
def test_runner_end_to_end_and_resume(tmp_path):
  env = dict(os.environ)
  env["XLA_FLAGS"] = ""  # the runs use the real CPU, not the 8 fake devices of conftest
  env["JAX_PLATFORMS"] = "cpu"
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  root = tmp_path / "exp"
  args = [
      "--suite=onpolicy",
      "--variants=minirl,minirl_no_is",
      "--seeds=1",
      "--tiny",
      "--steps=2",
      "--parallel=1",
      f"--workdir={root}",
      "--poll_seconds=0.2",
  ]
  p, wall = _cli(args, env)
  print(p.stdout[-3000:], p.stderr[-3000:], f"first invocation {wall:.0f}s", sep="\n")
  assert p.returncode == 0
  assert "2 to run" in p.stdout and "[computes its cold start]" in p.stdout
  for v in ("minirl", "minirl_no_is"):
    wd = root / v / "seed0"
    assert json.loads((wd / "summary.json").read_text())["steps"] == 2
    cmd = (wd / "command.txt").read_text()
    assert f"--config=configs/paper/onpolicy.py:{v}:tiny" in cmd and "--config.seed=0" in cmd
    assert "reusing" in (wd / "run.log").read_text() or v == "minirl"  # one cold start, shared
  assert len(list((root / "sft_cache").iterdir())) == 1
  results = json.loads((root / "results.json").read_text())
  suite = results["suites"]["onpolicy"]
  assert set(suite["variants"]) == {"minirl", "minirl_no_is"}
  run = suite["variants"]["minirl"]["runs"]["0"]
  assert (
      run["status"] == "done"
      and run["curves"]["step"] == [1, 2]
      and run["curves"]["eval_step"] == [0, 1, 2]
  )
  assert {f["id"] for f in results["findings"]} == {"1a", "1b", "1c", "1d", "1e"}
  assert all(f["verdict"] in (R, N, I) for f in results["findings"])
  report = (root / "report.md").read_text()
  assert "python -m fo_rl.main --config=configs/paper/onpolicy.py:minirl:tiny" in report
  assert "float8_e4m3fn" in report and "## Findings" in report
  assert (root / "onpolicy.png").stat().st_size > 10_000
  mtimes = {p: p.stat().st_mtime for p in root.glob("*/seed0/summary.json")}

  p, wall = _cli(args, env)  # resume: everything is finished, nothing runs
  print(p.stdout[-2000:], f"second invocation {wall:.0f}s", sep="\n")
  assert p.returncode == 0
  assert "2 already finished, 0 to run" in p.stdout and "start " not in p.stdout
  assert {p: p.stat().st_mtime for p in root.glob("*/seed0/summary.json")} == mtimes
  assert (root / "report.md").exists()

  p, _ = _cli(args + ["--dry_run", "--steps=3"], env)  # more steps: the runs are planned again
  assert p.returncode == 0 and p.stdout.count("[to run]") == 2
