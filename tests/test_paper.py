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
from fo_rl.sampler import quantize as Q
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
  on, off, cold, cal = (S.load_suite(s) for s in S.SUITES)
  assert list(on.VARIANTS) == [
      "minirl",
      "minirl_length_norm",
      "minirl_no_is",
      "minirl_r3",
      "minirl_length_norm_r3",
      "minirl_no_is_r3",
  ]
  assert len(off.VARIANTS) == 15 and list(cold.VARIANTS) == ["err15", "err30", "err45"]
  names = [v for m in (on, off, cold, cal) for v in m.VARIANTS]
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
      # the paper's cold-start recipe: MiniRL + R2 at N=2; arms differ in the teacher's error rate
      (cold, "err15"): {"sft.teacher": "careful", "sft.error_rate": 0.15, "rl.replay": "r2"},
      (cold, "err45"): {"sft.error_rate": 0.45, "rl.mini_batches": 2, "rl.loss.clip": True},
  }
  for (mod, v), knobs in expect.items():
    c = mod.get_config(v)
    for field, value in knobs.items():
      assert _knob(c, field) == value, (v, field)
  # the design: a fixed mini-batch of 64 responses, global batch N x it, equal gradient updates
  for mod in (on, off, cold):
    for v in mod.VARIANTS:
      rc = config_lib.parse(mod.get_config(v))
      n = rc.rl.mini_batches
      assert rc.rl.prompts_per_step * rc.rl.group_size == 64 * n, v
      assert rc.rl.steps * n == (S.COLDSTART_UPDATES if mod is cold else S.UPDATES), v
      assert rc.eval.every * n == S.EVAL_EVERY_UPDATES, v
      assert rc.optim.warmup_steps == 10 and rc.optim.learning_rate == 1.5e-4
      assert rc.data.options["min_digits"] == 1 and rc.data.options["num_digits"] == 5
  with pytest.raises(ValueError, match="N=5"):
    S.design(5)
  for mod in (on, off, cold, cal):
    first = list(mod.VARIANTS)[0]
    for v in mod.VARIANTS:
      c = mod.get_config(v)
      config_lib.parse(c)
      assert c.sampler.weight_dtype in Q.QUANTIZED_DTYPES  # the discrepancy is real
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


def test_recipes_import_only_the_suites_module():
  import ast

  for path in sorted((REPO / "configs" / "paper").glob("*.py")):
    mods = {
        n.module for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.ImportFrom)
    }
    mods |= {
        a.name
        for n in ast.walk(ast.parse(path.read_text()))
        if isinstance(n, ast.Import)
        for a in n.names
    }
    assert mods <= {"fo_rl.paper.suites"}, (path.name, mods)


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
  assert len({r.sft_key for r in cold}) == 3  # one per error rate
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
# Statistics: the t critical values, the AUC and the paired interval against independent references.
# ---------------------------------------------------------------------------------------------------------

STEPS, EVERY = 60, 10


def test_t95_against_scipy_and_the_table():
  # hand values from a printed t table
  assert V.t95(1) == pytest.approx(6.314, abs=1e-3) and V.t95(3) == pytest.approx(2.353, abs=1e-3)
  assert V.t95(10) == pytest.approx(1.812, abs=1e-3)
  with pytest.raises(ValueError):
    V.t95(0)
  stats = pytest.importorskip("scipy.stats")
  for df in range(1, 200):
    assert V.t95(df) == pytest.approx(stats.t.ppf(0.95, df), abs=2e-4), df


def test_auc_is_the_normalized_trapezoid():
  x, y = [0, 24, 48, 72, 96], [0.4, 0.5, 0.45, 0.6, 0.62]
  ref = np.trapezoid(y, x) / 96
  assert V.auc(x, y) == pytest.approx(ref, rel=1e-12)
  # by hand: (0.45 + 0.475 + 0.525 + 0.61) / 4
  assert V.auc(x, y) == pytest.approx(0.515, abs=1e-12)
  # invariant to the x unit (RL steps x N = updates), NaN points skipped, < 2 points -> NaN
  assert V.auc([v * 8 for v in x], y) == pytest.approx(ref)
  assert V.auc(x + [120], y + [math.nan]) == pytest.approx(ref)
  assert math.isnan(V.auc([0], [0.5]))


def test_paired_interval_by_hand_and_against_numpy():
  a = {0: 0.52, 1: 0.63, 2: 0.41, 3: 0.58}
  b = {0: 0.50, 1: 0.60, 2: 0.40, 3: 0.54, 9: 0.9}  # seed 9 unpaired: ignored
  c = V.paired(a, b)
  # by hand: d = .02 .03 .01 .04, mean .025, sd sqrt(5e-4/3) = .0129099, half = 2.353363 * sd / 2
  assert c["seeds"] == [0, 1, 2, 3] and c["n"] == 4
  assert c["mean"] == pytest.approx(0.025) and c["sd"] == pytest.approx(0.0129099, abs=1e-7)
  assert c["lo"] == pytest.approx(0.025 - 0.0151908, abs=1e-6)
  assert c["hi"] == pytest.approx(0.025 + 0.0151908, abs=1e-6)
  assert c["label"] == "better" and c["better"] and not c["worse"]
  assert not c["equivalent"]  # hi 0.040 > the 0.03 margin
  assert V.paired(b, a)["label"] == "worse"
  # numpy reference on random data, n = 4..8
  rng = np.random.default_rng(1)
  for n in range(4, 9):
    d = rng.normal(0.01, 0.02, n)
    c = V.paired({i: float(x) for i, x in enumerate(d)}, {i: 0.0 for i in range(n)})
    half = V.t95(n - 1) * d.std(ddof=1) / np.sqrt(n)
    assert (c["lo"], c["hi"]) == pytest.approx((d.mean() - half, d.mean() + half), abs=1e-12)
  # equivalence: a tight interval inside +-0.03, and the margin is strict
  eq = V.paired(
      {i: 0.5 + e for i, e in enumerate([0.004, -0.003, 0.001, 0.0])}, {i: 0.5 for i in range(4)}
  )
  assert eq["label"] == "equivalent" and eq["equivalent"] and -0.03 < eq["lo"] < eq["hi"] < 0.03
  # too few seeds: n/a, never a decision
  c = V.paired({0: 0.9, 1: 0.9, 2: 0.9}, {0: 0.1, 1: 0.1, 2: 0.1})
  assert c["label"] == "n/a" and not (c["better"] or c["worse"] or c["equivalent"])


def test_paired_interval_coverage_by_simulation():
  """The 90% interval covers the true mean difference 90% of the time, and under a null each one-sided
  call ('better', 'worse') happens about 5% of the time (4 seeds, normal differences)."""
  rng = np.random.default_rng(0)
  trials, covered, better, worse = 4000, 0, 0, 0
  for _ in range(trials):
    d = rng.normal(0.0, 0.02, 4)
    c = V.paired({i: float(x) for i, x in enumerate(d)}, {i: 0.0 for i in range(4)})
    covered += c["lo"] <= 0.0 <= c["hi"]
    better += c["better"]
    worse += c["worse"]
  assert abs(covered / trials - 0.90) < 0.015
  assert abs(better / trials - 0.05) < 0.012 and abs(worse / trials - 0.05) < 0.012


# ---------------------------------------------------------------------------------------------------------
# Synthetic curves: the collapse rule.
# ---------------------------------------------------------------------------------------------------------


def curves(acc, entropy=None, kl=None, reward=None, k3=None, loss=None):
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
      "k3": per(k3, 1e-3),
      "clip_high": per(None, 0.0),
      "clip_low": per(None, 0.0),
      "loss": per(loss, -0.1),
  }


def test_collapse_rule_on_synthetic_curves():
  rng = np.random.default_rng(0)
  kinds = lambda c: sorted(V.reason_kind(x) for x in V.collapse_reasons(c))
  # stable and improving; noisy but stable (+-0.04 around the cold start, entropy +-0.1)
  assert kinds(curves([0.3, 0.4, 0.5, 0.55, 0.6, 0.6, 0.62], np.linspace(0.5, 0.35, 60))) == []
  assert kinds(curves(0.5 + rng.uniform(-0.04, 0.04, 7), 0.5 + rng.uniform(-0.1, 0.1, 60))) == []
  # a dip below the start that recovers, and a single bad last evaluation: not collapses
  assert kinds(curves([0.4, 0.6, 0.2, 0.1, 0.5, 0.55, 0.6])) == []
  assert kinds(curves([0.4, 0.6, 0.6, 0.6, 0.6, 0.6, 0.2])) == []
  # planted non-collapse: a large drop from the peak that keeps part of... and ends above the start
  # minus the margin (start 0.4, peak 0.7, end 0.35: lost 0.35 of peak, but only 0.05 < 0.1 below start)
  assert kinds(curves([0.4, 0.55, 0.7, 0.6, 0.5, 0.35, 0.35])) == []
  # planted collapse: the run loses its whole gain and falls below its cold start, to the end
  r = V.collapse_reasons(curves([0.4, 0.55, 0.6, 0.5, 0.3, 0.1, 0.05]))
  assert len(r) == 1 and V.reason_kind(r[0]) == "accuracy drop" and "gain +0.200 lost" in r[0]
  # a low-accuracy cold start that loses most of it (the old absolute 0.15 rule missed this)
  assert kinds(curves([0.137, 0.12, 0.09, 0.07, 0.05, 0.04, 0.039])) == ["accuracy drop"]
  # the threshold: max(0.05, 0.25 x start) below the start, at each of the last two evaluations
  assert kinds(curves([0.4, 0.5, 0.4, 0.4, 0.4, 0.3, 0.3])) == ["accuracy drop"]  # exactly 0.1
  assert kinds(curves([0.4, 0.5, 0.4, 0.4, 0.4, 0.3, 0.31])) == []
  assert kinds(curves([0.1, 0.1, 0.1, 0.1, 0.1, 0.05, 0.05])) == ["accuracy drop"]  # floor 0.05
  assert kinds(curves([0.1, 0.1, 0.1, 0.1, 0.1, 0.05, 0.051])) == []
  # planted: entropy crash (accuracy still fine), surge, non-finite entropy or loss
  crash = np.concatenate([np.full(40, 0.5), np.linspace(0.5, 0.02, 20)])
  assert kinds(curves([0.5] * 7, crash)) == ["entropy crash"]
  surge = np.concatenate([np.full(40, 0.5), np.linspace(0.5, 3.0, 20)])
  assert kinds(curves([0.5] * 7, surge)) == ["entropy surge"]
  nan_end = np.concatenate([np.full(58, 0.5), [np.nan, np.nan]])
  assert kinds(curves([0.5] * 7, nan_end)) == ["non-finite entropy"]
  assert kinds(curves([0.5] * 7, loss=np.concatenate([np.full(59, 0.1), [np.inf]]))) == [
      "non-finite entropy"
  ]
  # a gradual entropy decline that stays above the crash fraction is not a collapse
  assert kinds(curves([0.5] * 7, np.linspace(0.5, 0.15, 60))) == []
  # both rules at once
  assert kinds(curves([0.5, 0.6, 0.6, 0.4, 0.2, 0.1, 0.1], crash)) == [
      "accuracy drop",
      "entropy crash",
  ]
  assert [V.collapse_label(*x) for x in ((3, 4), (2, 4), (0, 4), (1, 4), (0, 0))] == [
      "collapses",
      "mixed",
      "stable",
      "mixed",
      "no data",
  ]


def test_curves_keep_the_mechanism_metrics_compactly():
  # step 1 of the default run's metrics.jsonl (keys as fo_rl.run writes them)
  row = {
      "step": 1,
      "entropy": 0.09613490104675293,
      "r3_vs_live_logp_gap": 0.0011958371615037322,
      "router_disagreement_per_decision": 0.014270510524511337,
      "router_disagreement_per_token": 0.05050309747457504,
      "train_infer_frac_tau2": 0.000250752258580178,
      "train_infer_k3": 0.00022476537560578436,
      "train_infer_kl": 8.99112710612826e-05,
      "clip_frac_high": 0.0,
      "grad_norm": 16.922353267669678,
      "is_truncated_frac": 0.0,
      "is_weight_max": 1.3621551990509033,
      "is_weight_mean": 1.0001247823238373,
      "loss": -0.9517003744840622,
      "ratio_max": 1.1005231142044067,
      "staleness_ratio_first_minibatch_max": 1.0000090599060059,
      "update_norm": 0.0038290414959192276,
      "response_length": 31.4375,
      "reward_mean": 0.5859375,
  }
  c = Rs.curves_from_rows([{"step": 0, "eval/mean_accuracy": 0.5}, row])
  assert c["step"] == [1] and c["eval_step"] == [0]
  expect = {
      "f_tau2": 0.0002508,
      "is_max": 1.362,
      "is_mean": 1.0,
      "is_trunc": 0.0,
      "ratio_max": 1.101,
      "stale_first_max": 1.0,
      "router_dis": 0.01427,
      "router_dis_tok": 0.0505,
      "r3_gap": 0.001196,
      "length": 31.44,
      "grad_norm": 16.92,
      "update_norm": 0.003829,
      "k3": 0.0002248,
      "kl": 8.991e-05,
      "reward": 0.5859,
  }
  for k, v in expect.items():
    assert c[k] == [v], k  # 4 significant digits
  assert math.isnan(c["clip_low"][0]) and math.isnan(c["ti_ratio_max"][0])  # absent: NaN (null)


def test_run_stats():
  c = curves([0.3, 0.4, 0.5, 0.6, 0.5, 0.55, 0.65], kl=2e-3, k3=3e-3)
  s = Rs.run_stats(c)
  assert s["cold_start_accuracy"] == 0.3
  assert s["final_accuracy"] == pytest.approx(0.6)  # mean of the last two evaluations
  assert s["peak_accuracy"] == 0.65 and s["best_accuracy"] == 0.65
  assert s["mean_train_infer_kl"] == pytest.approx(2e-3) and s["mean_k3"] == pytest.approx(3e-3)
  assert s["auc"] == pytest.approx(np.trapezoid(c["eval_acc"], c["eval_step"]) / 60)
  assert s["collapsed"] is False and s["updates"] == 60
  # N = 4 updates per step: the AUC is the same curve, the horizon 4x the steps
  s4 = Rs.run_stats(c, 4)
  assert s4["auc"] == pytest.approx(s["auc"]) and s4["updates"] == 240
  # best excludes the cold start
  assert Rs.run_stats(curves([0.9, 0.4, 0.5]))["best_accuracy"] == 0.5


def test_combine():
  R, N, I = V.REPRODUCED, V.NOT_REPRODUCED, V.INCONCLUSIVE
  assert V.combine([R, R, R]) == R
  assert V.combine([N, N]) == N and V.combine([N, I]) == N
  assert V.combine([R, N]) == I and V.combine([R, I]) == I and V.combine([I, I]) == I
  assert V.combine([]) == I


# ---------------------------------------------------------------------------------------------------------
# Findings on synthetic paired results: 4 seeds whose cold starts differ by far more (+-0.08) than the
# variants of a seed (paired noise 0.005), as in the measured data; a planted effect must be found by
# the paired rule although the unpaired spreads overlap.
# ---------------------------------------------------------------------------------------------------------

SEEDS = (0, 1, 2, 3)
SEED_OFFSET = (-0.08, 0.05, -0.02, 0.06)
SHAPE = np.array([0.0, 0.35, 0.6, 0.8, 0.9, 1.0, 1.0])


def good(gain=0.15, kl=1e-3, start=0.4, noise=0.005, tag=0, seeds=SEEDS):
  """A stable run per seed: the seed's cold start, rising by `gain`, plus a little per-run noise."""
  rng = np.random.default_rng(1000 + tag)
  out = {}
  for s in seeds:
    acc = start + SEED_OFFSET[s] + gain * SHAPE + np.r_[0.0, rng.normal(0, noise, len(SHAPE) - 1)]
    k3 = kl * (1 + 0.05 * rng.normal())
    out[s] = Rs.run_record(curves(list(acc), kl=kl, k3=k3))
  return out


def collapsing(start=0.4):
  crash = np.concatenate([np.full(30, 0.5), np.linspace(0.5, 0.02, 30)])
  out = {}
  for s in SEEDS:
    a0 = start + SEED_OFFSET[s]
    out[s] = Rs.run_record(
        curves([a0, a0 + 0.1, a0 + 0.12, a0, a0 - 0.2, a0 - 0.3, a0 - 0.3], crash)
    )
  return out


def shifted(runs, offsets):
  """The same runs with every evaluation after step 0 moved by offsets[seed] (a planted paired d)."""
  out = {}
  for s, r in runs.items():
    c = dict(r["curves"])
    c["eval_acc"] = [
        a + (offsets[s] if st > 0 else 0.0) for st, a in zip(c["eval_step"], c["eval_acc"])
    ]
    out[s] = Rs.run_record(c)
  return out


NULL_WIDE = (0.05, -0.05, 0.04, -0.035)  # mean +0.001, a wide CI across 0: a tie


def mixed():
  runs = good(0.15)
  runs[3] = collapsing()[3]
  return runs


def verdicts(found):
  return {f["id"]: f["verdict"] for f in found}


R, N, I = V.REPRODUCED, V.NOT_REPRODUCED, V.INCONCLUSIVE


def onpolicy(**changes):
  v = {
      "minirl": good(0.15, tag=1),
      "minirl_length_norm": good(0.09, tag=2),
      "minirl_no_is": collapsing(),
      "minirl_r3": good(0.15, kl=4e-4, tag=3),
  }
  v.update(changes)
  v = {k: r for k, r in v.items() if r is not None}
  return V.onpolicy_findings(Rs.suite_record(v))


def test_planted_effect_is_found_paired_although_the_unpaired_spreads_overlap():
  m, ln = good(0.15, tag=1), good(0.10, tag=2)
  sm, sl = (Rs.suite_record({"a": x})["variants"]["a"]["stats"]["auc"] for x in (m, ln))
  assert sm["mean"] - sl["mean"] < max(sm["std"], sl["std"])  # the old unpaired rule: a tie
  c = V.cmp(Rs.suite_record({"a": m})["variants"]["a"], Rs.suite_record({"b": ln})["variants"]["b"])
  assert c["label"] == "better" and 0.02 < c["mean"] < 0.05


def test_onpolicy_findings():
  assert verdicts(onpolicy()) == {"1a": R, "1b": R, "1c": R, "1d": R, "1e": R}
  # a planted null (length_norm identical to minirl up to noise): equivalent -> 1b not reproduced,
  # 1a inconclusive (nothing beats minirl, minirl beats nothing except the collapsing no-IS ... )
  v = verdicts(onpolicy(minirl_length_norm=good(0.15, tag=4)))
  assert v["1b"] == N
  # the same null with large per-run noise: undecided -> inconclusive, never "reproduced"
  v = verdicts(onpolicy(minirl_length_norm=shifted(good(0.15, tag=1), NULL_WIDE)))
  assert v["1b"] == I
  # length normalization better than MiniRL: 1a and 1b not reproduced
  v = verdicts(onpolicy(minirl_length_norm=good(0.22, tag=6)))
  assert v["1a"] == N and v["1b"] == N
  # length normalization collapses: "stable but worse" is not reproduced
  assert verdicts(onpolicy(minirl_length_norm=collapsing()))["1b"] == N
  # no IS stays stable and equivalent: not reproduced; collapses in 1 of 4 seeds: inconclusive
  assert verdicts(onpolicy(minirl_no_is=good(0.15, tag=7)))["1c"] == N
  assert verdicts(onpolicy(minirl_no_is=mixed()))["1c"] == I
  # no IS stable but worse: not a collapse, not equivalent: inconclusive
  assert verdicts(onpolicy(minirl_no_is=good(0.05, tag=8)))["1c"] == I
  # MiniRL itself collapsing in a seed makes 1c inconclusive
  assert verdicts(onpolicy(minirl=mixed()))["1c"] == I
  # R3 with a higher KL / the same KL
  assert verdicts(onpolicy(minirl_r3=good(0.15, kl=3e-3, tag=3)))["1d"] == N
  assert verdicts(onpolicy(minirl_r3=good(0.15, kl=1e-3, tag=3)))["1d"] in (I, N)
  # R3 with a real gain: 1e not reproduced (and 1a: a variant beats minirl)
  v = verdicts(onpolicy(minirl_r3=good(0.25, kl=4e-4, tag=3)))
  assert v["1e"] == N and v["1a"] == N and v["1d"] == R
  # R3 worse is "no gain" too; R3 tied with a wide CI is NOT "no gain" (a tie is never reproduced)
  assert verdicts(onpolicy(minirl_r3=good(0.08, kl=4e-4, tag=3)))["1e"] == R
  assert verdicts(onpolicy(minirl_r3=shifted(good(0.15, kl=4e-4, tag=1), NULL_WIDE)))["1e"] == I
  # three seeds only: no comparison can be made
  three = lambda runs: {s: runs[s] for s in (0, 1, 2)}
  v = verdicts(
      onpolicy(
          minirl=three(good(0.15)),
          minirl_length_norm=three(good(0.05)),
          minirl_r3=three(good(0.15)),
      )
  )
  assert v["1a"] == I and v["1b"] == I and v["1e"] == I and v["1d"] == I
  # missing variants
  v = verdicts(onpolicy(minirl_r3=None))
  assert v["1d"] == I and v["1e"] == I
  f = {x["id"]: x for x in onpolicy(minirl_r3=None)}
  assert "minirl_r3" in f["1d"]["evidence"] and "minirl," not in f["1d"]["evidence"]
  # the evidence carries the paired numbers
  f = {x["id"]: x for x in onpolicy()}
  assert "AUC +0.0" in f["1b"]["evidence"] and "(n=4, better)" in f["1b"]["evidence"]
  assert "entropy crash" in f["1c"]["evidence"]


def offpolicy(overrides=None, ns=(2, 8)):
  v = {}
  for n in ns:
    v[f"n{n}_r2_noclip"] = collapsing()
    v[f"n{n}_minirl"] = good(0.05, tag=10 + n)
    v[f"n{n}_r2"] = good(0.15 if n == 2 else 0.10, tag=20 + n)
    v[f"n{n}_r3"] = good(0.10 if n == 2 else 0.15, tag=30 + n)
  v.update(overrides or {})
  v = {k: r for k, r in v.items() if r is not None}
  return V.offpolicy_findings(Rs.suite_record(v))


def test_offpolicy_findings():
  assert verdicts(offpolicy()) == {"2a": R, "2b": R, "3a": R, "3b": R}
  # clipping unnecessary everywhere (equivalent) -> not reproduced
  v = verdicts(offpolicy({"n2_r2_noclip": good(0.15, tag=40), "n8_r2_noclip": good(0.10, tag=41)}))
  assert v["2a"] == N
  # replay unnecessary at both N (no-replay equivalent to the best replay) -> not reproduced
  v = verdicts(offpolicy({"n2_minirl": good(0.15, tag=42), "n8_minirl": good(0.15, tag=43)}))
  assert v["2b"] == N
  # R2 with clipping collapsing: 2a cannot credit clipping
  assert verdicts(offpolicy({"n8_r2": collapsing()}))["2a"] in (I, N)
  # R3 beats R2 at N=2: 3a not reproduced; a null with large noise: inconclusive
  assert verdicts(offpolicy({"n2_r3": good(0.22, tag=44)}))["3a"] == N
  assert verdicts(offpolicy({"n8_r3": shifted(good(0.10, tag=28), NULL_WIDE)}))["3b"] == I
  # only N=2 was run: 3b has no sub-check
  found = {f["id"]: f for f in offpolicy(ns=(2,))}
  assert found["3a"]["verdict"] == R and found["3b"]["verdict"] == I
  # N=8 missing its no-replay run: that sub-check is inconclusive
  found = {f["id"]: f for f in offpolicy({"n8_minirl": None})}
  assert [c["verdict"] for c in found["2b"]["checks"]] == [R, I] and found["2b"]["verdict"] == I


def coldstart(gains=(0.15, 0.25, 0.35), starts=(0.5, 0.4, 0.3), **changes):
  v = {
      t: good(g, start=s, tag=50 + i)
      for i, (t, g, s) in enumerate(zip(("err15", "err30", "err45"), gains, starts))
  }
  v.update(changes)
  return V.coldstart_findings(Rs.suite_record(v))


def test_coldstart_findings():
  assert verdicts(coldstart()) == {"4": R}  # separated at step 0, equivalent at the end
  assert verdicts(coldstart(gains=(0.15, 0.15, 0.15))) == {"4": N}  # the gaps persist
  f = coldstart(gains=(0.15, 0.20, 0.25))[0]  # the gaps halve: shrinking, not closed
  assert f["verdict"] == I and "gap shrinks" in f["evidence"]
  assert verdicts(coldstart(starts=(0.4, 0.4, 0.4), gains=(0.1, 0.1, 0.1))) == {"4": I}
  assert verdicts(coldstart(err45=mixed())) == {"4": I}  # not all stable
  assert verdicts(coldstart(err45={})) == {"4": I}  # no data


# ---------------------------------------------------------------------------------------------------------
# Report and figure from synthetic results.
# ---------------------------------------------------------------------------------------------------------


def test_report_and_figure_from_synthetic_results(tmp_path):
  v = {}
  groups = {}
  for n in (2, 8):
    for name, runs in (
        (f"n{n}_r2", good(0.15, tag=60 + n)),
        (f"n{n}_r2_noclip", collapsing()),
        (f"n{n}_r3", good(0.10, tag=70 + n)),
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
  # The measured regime: the k3 of the runs without replay (these synthetic runs carry no knobs) is the
  # mean over all their steps (numpy); no R2 / R3 runs: "-".
  assert "## Measured regime" in report and "| responses per update |" in report
  rows = Rp.regime_rows(suite)
  runs = [r for v in suite["variants"].values() for r in v["runs"].values()]
  k3 = [x for r in runs for x in r["curves"]["k3"] if np.isfinite(x)]
  none, r2, r3 = rows["per-token train-infer KL, k3 (no replay / R2 / R3 runs)"].split(" / ")
  assert none.startswith(f"{np.mean(k3):.2e} ") and r2 == r3 == "-"
  assert rows["runs read"].startswith(f"{len(runs)} (")
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
  for k in ("length", "grad_norm", "is_max", "is_mean", "f_tau2", "k3"):  # mechanism metrics kept
    assert all(math.isfinite(x) for x in run["curves"][k]), (k, run["curves"][k])
  assert {f["id"] for f in results["findings"]} == {"1a", "1b", "1c", "1d", "1e"}
  assert all(f["verdict"] in (R, N, I) for f in results["findings"])
  report = (root / "report.md").read_text()
  assert "python -m fo_rl.main --config=configs/paper/onpolicy.py:minirl:tiny" in report
  assert "float8_e5m2" in report and "## Findings" in report
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


# ---------------------------------------------------------------------------------------------------------
# The variable-length task of the regime (data.options.min_digits, opt-in; the default is unchanged).
# ---------------------------------------------------------------------------------------------------------


def test_arithmetic_min_digits_varies_lengths_and_leaves_the_default_unchanged():
  import random

  from fo_rl.data import arithmetic, teachers
  from fo_rl.data.tokenizer import Tokenizer

  def old_generate(rng, num_digits=3, ops="+-"):  # the generator before min_digits, verbatim
    op = rng.choice(ops)
    a, b = rng.randrange(10**num_digits), rng.randrange(10**num_digits)
    if op == "-" and a < b:
      a, b = b, a
    return arithmetic.ArithmeticProblem(a, b, op)

  r1, r2 = random.Random(7), random.Random(7)
  d = arithmetic.ArithmeticDifficulty()
  assert d.min_digits == 0
  assert [arithmetic.generate(r1, d) for _ in range(200)] == [old_generate(r2) for _ in range(200)]
  # 1-5 digits: every digit count drawn, responses 12-54 tokens with CV >= 0.3 (the regime's target)
  probs = arithmetic.generate_split("train", 1000, 0, num_digits=5, min_digits=1)
  widths = {max(len(str(p.a)), len(str(p.b))) for p in probs}
  assert widths == {1, 2, 3, 4, 5}
  tok = Tokenizer.default()
  lengths = np.array(
      [
          len(tok.encode(teachers.teacher(p, "careful", i), add_eos=True))
          for i, p in enumerate(probs)
      ]
  )
  assert lengths.std() / lengths.mean() >= 0.3 and lengths.max() <= 64  # sampler.max_new_tokens
  with pytest.raises(ValueError, match="min_digits"):
    arithmetic.ArithmeticDifficulty(num_digits=3, min_digits=4)
  from fo_rl.data import tfds_arithmetic, tfds_common

  name = tfds_common.make_config(tfds_arithmetic.ArithmeticConfig, num_digits=5, min_digits=1).name
  assert "min_digits_1" in name  # a prepared dataset is keyed on it


def test_calibration_table_from_synthetic_runs(tmp_path):
  c = curves([0.5, 0.55], kl=2e-3, k3=3e-3)
  c["kl"][0], c["k3"][0] = 1e-3, 4e-3  # step 1: the cold start's discrepancy
  n = len(c["step"])
  c["f_tau2"] = [0.01] * n
  c["router_dis"] = [0.06] * (n - 1) + [math.nan]  # a missing value is skipped
  c["router_dis_tok"] = [0.2] * n
  c["is_max"] = [1.5] * (n - 1) + [3.0]
  c["is_trunc"] = [0.0] * n
  c["length"] = [30.0, 34.0] * (n // 2)
  c["grad_norm"] = [0.5] * (n - 2) + [2.0, 150.0]
  suite = Rs.suite_record(
      {"e4m3_router": {0: Rs.run_record(c, knobs={"sampler": "float8_e4m3fn"})}}
  )
  (row,) = Rp.calibration_rows(suite)
  assert row["k1_step1"] == 1e-3 and row["k3_step1"] == 4e-3
  assert row["k3_mean"] == pytest.approx((4e-3 + 3e-3 * (n - 1)) / n)
  assert row["router_dis"] == pytest.approx(0.06) and row["is_max"] == 3.0
  assert row["length"] == 32.0 and row["grad_norm_median"] == 0.5 and row["grad_norm_max"] == 150.0
  assert row["clip_binds_1"] == pytest.approx(2 / n) and row["clip_binds_30"] == pytest.approx(
      1 / n
  )
  assert row["acc_step0"] == 0.5
  text = Path(Rp.write_calibration(suite, tmp_path, S.REGIME)).read_text()
  assert "| e4m3_router | 1.00e-03 | 4.00e-03 |" in text and "CV 0.4" in text
