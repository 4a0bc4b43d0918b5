"""The verdict rules and their statistics, fixed in code before the data (issue 15 item 4).

`RULES_TEXT` states every rule and constant; the report prints it verbatim. The rules use per-run
scalars that `results.run_stats` computes (`auc`, `final_accuracy`, `best_accuracy`,
`cold_start_accuracy`, `mean_k3`, `collapsed`), never the curves directly, except the collapse rule
(`collapse_reasons`), which reads a run's own curves.

Design: every variant of a seed shares the cold start, the model init, the data order and the rollout
and eval RNG (a common-random-numbers design), so 90-98% of the run-to-run variance is shared by all
variants of a seed. Comparisons are therefore **paired by seed**: d_s = M(A, s) - M(B, s) over the seeds
both variants finished, and a 90% t-interval of the mean of d.

Why a t-interval and not a bootstrap over seeds: with 4-6 seeds a bootstrap percentile interval has
only a few dozen distinct resample means and no small-sample correction (its spread is the plug-in
sd * sqrt((n-1)/n), with normal-like quantiles), so a nominal 90% bootstrap interval covers about 75% at
n = 4. The t-interval is exact when the d_s are normal, and each d_s is a difference of means of
several evaluations of 512 samples each (AUC, final), close to normal by construction.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np

# --------------------------------------------------------------------------------------------------------
# Constants (the report prints RULES_TEXT, which states every one of them).
# --------------------------------------------------------------------------------------------------------

MIN_SEEDS = 4  # a paired comparison needs at least this many seeds that both variants finished
CI_LEVEL = 0.90  # two-sided confidence level of the paired t-interval
EQUIV_MARGIN = (
    0.03  # accuracy units: "equivalent" = the 90% CI lies inside (-0.03, +0.03) (TOST, 5%)
)
FINAL_EVALS = 2  # final accuracy = mean of the last FINAL_EVALS evaluations after the cold start
TAIL_EVALS = 2  # a collapse must hold at each of the last TAIL_EVALS evaluations (to the end)
COLLAPSE_ABS = 0.05  # accuracy collapse: the tail lies below the cold start by at least
COLLAPSE_REL = 0.25  # ... max(COLLAPSE_ABS, COLLAPSE_REL x cold-start accuracy)
ENTROPY_CRASH_FRAC = 0.2  # late entropy below this fraction of the run's early entropy: collapse
ENTROPY_SURGE_MULT = 3.0  # late entropy above this multiple of the run's early entropy: collapse
ENTROPY_WINDOW_FRAC = 0.1  # early / late entropy: mean over the first / last 10% of steps ...
ENTROPY_WINDOW_MIN = 3  # ... and at least 3 steps (at most half the steps)
EPS = 1e-9  # float tolerance in threshold comparisons
# Gradient updates of the paper's runs (Qwen3-30B-A3B, section 4), to state each suite's horizon.
PAPER_UPDATES = {"onpolicy": 1200, "offpolicy": 5000, "coldstart": 600}

REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE = "reproduced", "not reproduced", "inconclusive"

# Two-sided 90% t critical values t_{0.95, df}, df = 1..30 (standard tables; tests check them against
# scipy.stats.t.ppf). Beyond 30, the Cornish-Fisher expansion of t in the normal quantile (error < 1e-4).
_T95 = (
    6.313752,
    2.919986,
    2.353363,
    2.131847,
    2.015048,
    1.943180,
    1.894579,
    1.859548,
    1.833113,
    1.812461,
    1.795885,
    1.782288,
    1.770933,
    1.761310,
    1.753050,
    1.745884,
    1.739607,
    1.734064,
    1.729133,
    1.724718,
    1.720743,
    1.717144,
    1.713872,
    1.710882,
    1.708141,
    1.705618,
    1.703288,
    1.701131,
    1.699127,
    1.697261,
)
_Z95 = 1.6448536269514722

RULES_TEXT = f"""\
- **Metrics of a run.** Held-out accuracy is `eval/mean_accuracy` (mean over `eval.samples` samples of
  `eval.num_prompts` held-out prompts); step 0 is the cold start. The x-axis is **gradient updates**
  (RL step x N), so variants with different N are compared at equal numbers of updates.
  **AUC (primary)** = the area under the held-out accuracy curve from update 0 to the last evaluation
  (trapezoid rule), divided by that span: a mean accuracy over training, in accuracy units.
  **Final** = mean of the last {FINAL_EVALS} evaluations after step 0. **Best** = the maximum after step 0
  (biased upward by about one evaluation's noise; reported, never decisive).
- **Paired comparison** of variants A and B on a metric: d_s = M(A, s) - M(B, s) for every seed s that both
  finished, and the {CI_LEVEL:.0%} t-interval [lo, hi] = mean(d) -/+ t(0.95, n-1) sd(d) / sqrt(n). It needs
  n >= {MIN_SEEDS} seeds, else it is **n/a**. **A better** if lo > 0; **A worse** if hi < 0 (each a one-sided
  5% test); **equivalent** if -{EQUIV_MARGIN} < lo and hi < +{EQUIV_MARGIN} (TOST at 5% with margin
  {EQUIV_MARGIN} accuracy; the margin is about the paired noise of 2-3 seeds' AUC and well below the
  effects the paper reports); otherwise **undecided** (a tie is never evidence for a claim).
  The train-infer KL is compared as d_s = log k3(A, s) - log k3(B, s) (a ratio, lower is better).
- **Collapse of a run**, any of, each holding at the end of the run:
  (a) accuracy: each of its last {TAIL_EVALS} evaluations lies below its cold start by at least
      max({COLLAPSE_ABS}, {COLLAPSE_REL} x cold-start accuracy), i.e. the run lost its whole peak gain
      (peak - cold start) and then that much more, and did not recover;
  (b) entropy crash: late entropy < {ENTROPY_CRASH_FRAC} x its early entropy;
  (c) entropy surge: late entropy > {ENTROPY_SURGE_MULT} x its early entropy;
  (d) the late window holds a non-finite entropy or loss.
  Early / late = mean per-step token entropy over the first / last max({ENTROPY_WINDOW_MIN},
  {ENTROPY_WINDOW_FRAC:g} x steps) RL steps (at most half the steps). A **variant collapses** if more than
  half of its finished seeds collapsed, is **stable** if none did, **mixed** otherwise.
- **Verdicts.** "reproduced" needs the paper's direction shown by a CI (or, for a "no gain" / "comparable"
  claim, equivalence or non-superiority shown by a CI); "not reproduced" needs a CI that excludes the
  paper's direction, or equivalence where the paper claims a difference; everything else is
  "inconclusive". No collapse within the horizon does not refute a collapse claim by itself: the horizon
  is stated as a fraction of the paper's updates ({", ".join(f"{k} {v}" for k, v in PAPER_UPDATES.items())}).
  A finding with several sub-checks (one per N, say) is reproduced if every sub-check is, not reproduced
  if every decided sub-check is and one is decided, else inconclusive.
- **Per finding** (A - B, primary metric AUC unless stated):
  1a MiniRL best on-policy: not reproduced if any variant is better than minirl; reproduced if minirl is
     better than minirl_length_norm or minirl_no_is and no variant is better than minirl.
  1b length normalization stable but worse: reproduced if minirl - minirl_length_norm is better and
     length_norm is stable (no seed collapsed); not reproduced if it is worse or equivalent, or
     length_norm collapses; inconclusive otherwise (also: better, but length_norm mixed).
  1c no train-infer IS collapses: reproduced if minirl_no_is collapses and minirl is stable; not reproduced
     if minirl_no_is is stable and equivalent to minirl and minirl is not better (within the horizon);
     else inconclusive.
  1d R3 lowers the train-infer KL: d = log k3(minirl_r3) - log k3(minirl) (k3 = the run's mean per-step
     k3 estimate); hi < 0 reproduces, lo > 0 does not.
  1e R3 gives no on-policy gain (non-superiority): reproduced if hi < +{EQUIV_MARGIN} for
     minirl_r3 - minirl; not reproduced if lo > 0 and hi >= +{EQUIV_MARGIN}; else inconclusive.
  2a clipping necessary off-policy: per N, n<N>_r2 - n<N>_r2_noclip better and n<N>_r2 stable
     reproduces; worse or equivalent does not.
  2b routing replay necessary off-policy: per N, n<N>_r2 or n<N>_r3 better than n<N>_minirl (clip, no
     replay) reproduces; both worse or equivalent does not.
  3a R2 beats R3 at N=2: n2_r2 - n2_r3 better reproduces, worse or equivalent does not.
  3b R3 beats R2 at N>=4: per N, n<N>_r3 - n<N>_r2 better reproduces, worse or equivalent does not.
  4 different cold starts converge: per pair of arms whose cold starts are separated at step 0 (paired CI
     of the step-0 gap excludes 0), reproduced if the final-accuracy gap is equivalent; not reproduced
     if the final gap's CI excludes 0 and the gap's shrinkage (step-0 gap - final gap, oriented by the
     step-0 sign) is not shown (its CI does not lie above 0); else inconclusive ("gap shrinks" when the
     shrinkage CI lies above 0); every arm must be stable for "reproduced".
"""


# --------------------------------------------------------------------------------------------------------
# Statistics.
# --------------------------------------------------------------------------------------------------------


def t95(df: int) -> float:
  """t_{0.95, df}: the critical value of a two-sided 90% t-interval."""
  if df < 1:
    raise ValueError(f"df={df}: must be >= 1")
  if df <= len(_T95):
    return _T95[df - 1]
  z = _Z95
  return (
      z
      + (z**3 + z) / (4 * df)
      + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
      + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3)
  )


def auc(x: Sequence[float], y: Sequence[float]) -> float:
  """Area under y(x) by the trapezoid rule over the finite points, divided by the x span (NaN if < 2)."""
  pts = [(float(a), float(b)) for a, b in zip(x, y) if math.isfinite(a) and math.isfinite(b)]
  if len(pts) < 2 or pts[-1][0] <= pts[0][0]:
    return math.nan
  xs, ys = np.array([p[0] for p in pts]), np.array([p[1] for p in pts])
  area = float(np.sum((xs[1:] - xs[:-1]) * (ys[1:] + ys[:-1]) / 2.0))
  return area / float(xs[-1] - xs[0])


def paired(
    a: Mapping[Any, float], b: Mapping[Any, float], *, margin: float = EQUIV_MARGIN
) -> dict[str, Any]:
  """The paired comparison of RULES_TEXT: {seed: value} of A and of B -> d = A - B over the seeds both
  have (finite), its mean, sd, 90% t-interval [lo, hi] and the label better | worse | equivalent |
  undecided | n/a."""
  seeds = sorted(
      s
      for s in a
      if s in b
      and a[s] is not None
      and b[s] is not None
      and math.isfinite(a[s])
      and math.isfinite(b[s])
  )
  d = [float(a[s]) - float(b[s]) for s in seeds]
  out: dict[str, Any] = {"seeds": seeds, "d": d, "n": len(d), "margin": margin}
  if len(d) < MIN_SEEDS:
    out.update(mean=float(np.mean(d)) if d else math.nan, sd=math.nan, lo=math.nan, hi=math.nan)
    out.update(better=False, worse=False, equivalent=False, label="n/a")
    return out
  mean, sd = float(np.mean(d)), float(np.std(d, ddof=1))
  half = t95(len(d) - 1) * sd / math.sqrt(len(d))
  lo, hi = mean - half, mean + half
  better, worse = lo > EPS, hi < -EPS
  equivalent = lo > -margin + EPS and hi < margin - EPS
  label = "better" if better else "worse" if worse else "equivalent" if equivalent else "undecided"
  out.update(
      mean=mean, sd=sd, lo=lo, hi=hi, better=better, worse=worse, equivalent=equivalent, label=label
  )
  return out


def describe(c: Mapping[str, Any], nd: int = 3) -> str:
  """'+0.012 [-0.004, +0.028] (n=4, undecided)'."""
  if c["n"] < MIN_SEEDS:
    return f"n/a ({c['n']} paired seeds < {MIN_SEEDS})"
  return f"{c['mean']:+.{nd}f} [{c['lo']:+.{nd}f}, {c['hi']:+.{nd}f}] (n={c['n']}, {c['label']})"


# --------------------------------------------------------------------------------------------------------
# Collapse of one run.
# --------------------------------------------------------------------------------------------------------


def _window(n: int) -> int:
  return max(1, min(max(ENTROPY_WINDOW_MIN, round(ENTROPY_WINDOW_FRAC * n)), n // 2 or 1))


def collapse_reasons(curves: Mapping[str, Sequence[float]]) -> list[str]:
  """The collapse rules (a)-(d) of RULES_TEXT that a run's curves meet; [] = not collapsed."""
  reasons = []
  steps = list(curves.get("eval_step", []))
  acc = [float(a) for a in curves.get("eval_acc", [])]
  if 0 in steps and len(acc) >= TAIL_EVALS + 1:
    start = acc[steps.index(0)]
    after = [a for s, a in zip(steps, acc) if s > 0]
    tail = after[-TAIL_EVALS:]
    drop = max(COLLAPSE_ABS, COLLAPSE_REL * start)
    if (
        math.isfinite(start)
        and len(tail) == TAIL_EVALS
        and all(math.isfinite(a) and a <= start - drop + EPS for a in tail)
    ):
      peak = max([start] + [a for a in after if math.isfinite(a)])
      reasons.append(
          f"accuracy {max(tail):.3f} at the end, {start - max(tail):.3f} below its cold start "
          f"{start:.3f} (peak {peak:.3f}, gain {peak - start:+.3f} lost)"
      )
  ent = [float(e) for e in curves.get("entropy", [])]
  loss = [float(x) for x in curves.get("loss", [])]
  if len(ent) >= 2:
    w = _window(len(ent))
    early, late = ent[:w], ent[-w:]
    late_loss = loss[-w:] if len(loss) == len(ent) else []
    if not all(math.isfinite(e) for e in late) or not all(math.isfinite(x) for x in late_loss):
      reasons.append("non-finite entropy or loss")
    elif any(math.isfinite(e) for e in early):
      e0, e1 = float(np.mean([e for e in early if math.isfinite(e)])), float(np.mean(late))
      if e0 > 0 and e1 < ENTROPY_CRASH_FRAC * e0 - EPS:
        reasons.append(f"entropy crash {e0:.3g} -> {e1:.3g}")
      if e0 > 0 and e1 > ENTROPY_SURGE_MULT * e0 + EPS:
        reasons.append(f"entropy surge {e0:.3g} -> {e1:.3g}")
  return reasons


def reason_kind(reason: str) -> str:
  """'accuracy drop' | 'entropy crash' | 'entropy surge' | 'non-finite entropy'."""
  return "accuracy drop" if reason.startswith("accuracy") else " ".join(reason.split(" ")[:2])


def collapse_label(n_collapsed: int, n_done: int) -> str:
  if not n_done:
    return "no data"
  if n_collapsed * 2 > n_done:
    return "collapses"
  return "stable" if n_collapsed == 0 else "mixed"


# --------------------------------------------------------------------------------------------------------
# Findings.
# --------------------------------------------------------------------------------------------------------


def _v(suite_res: Mapping | None, name: str) -> Mapping | None:
  if not suite_res:
    return None
  v = suite_res["variants"].get(name)
  return v if v and v["stats"]["n_done"] else None


def per_seed(v: Mapping, key: str) -> dict[int, float]:
  """{seed: run[key]} over the variant's finished runs."""
  return {int(s): r.get(key) for s, r in v["runs"].items() if r["status"] == "done"}


def cmp(a: Mapping, b: Mapping, key: str = "auc") -> dict[str, Any]:
  """Paired comparison of variants a - b on a per-run metric (key 'log_k3': log of mean_k3)."""
  if key == "log_k3":
    f = lambda v: {
        s: (math.log(x) if x is not None and x > 0 else math.nan)
        for s, x in per_seed(v, "mean_k3").items()
    }
    return paired(f(a), f(b))
  return paired(per_seed(a, key), per_seed(b, key))


def _cmp_text(name_a: str, name_b: str, a: Mapping, b: Mapping) -> tuple[dict, str]:
  """AUC comparison (decisive) with final and best reported alongside."""
  c = cmp(a, b, "auc")
  text = (
      f"{name_a} - {name_b}: AUC {describe(c)}; final {describe(cmp(a, b, 'final_accuracy'))}; "
      f"best {describe(cmp(a, b, 'best_accuracy'))}"
  )
  return c, text


def _col(v: Mapping) -> str:
  s = v["stats"]
  return f"{s['collapse']} ({s['n_collapsed']}/{s['n_done']} seeds collapsed)"


def _finding(fid, suite, claim, verdict, evidence, checks=None) -> dict:
  return {
      "id": fid,
      "suite": suite,
      "claim": claim,
      "verdict": verdict,
      "evidence": evidence,
      "checks": checks or [],
  }


def combine(verdicts: Sequence[str]) -> str:
  if verdicts and all(v == REPRODUCED for v in verdicts):
    return REPRODUCED
  decided = [v for v in verdicts if v != INCONCLUSIVE]
  if decided and all(v == NOT_REPRODUCED for v in decided):
    return NOT_REPRODUCED
  return INCONCLUSIVE


def _missing(fid, suite, claim, s, names) -> dict:
  missing = [n for n in names if not _v(s, n)]
  return _finding(
      fid, suite, claim, INCONCLUSIVE, f"no finished run of {', '.join(missing or names)}"
  )


def directional(c: Mapping[str, Any]) -> str:
  """A claim 'A better than B' from the paired comparison A - B."""
  if c["better"]:
    return REPRODUCED
  if c["worse"] or c["equivalent"]:
    return NOT_REPRODUCED
  return INCONCLUSIVE


def horizon(suite_res: Mapping | None, suite: str) -> str:
  updates = (suite_res or {}).get("updates")
  if not updates:
    return ""
  return f" [horizon {updates} updates = {updates / PAPER_UPDATES[suite]:.0%} of the paper's]"


def onpolicy_findings(s: Mapping | None) -> list[dict]:
  S = "onpolicy"
  out = []
  hz = horizon(s, S)
  m = _v(s, "minirl")
  others = [
      "minirl_length_norm",
      "minirl_no_is",
      "minirl_r3",
      "minirl_length_norm_r3",
      "minirl_no_is_r3",
  ]

  claim = (
      "MiniRL is best on-policy (no variant better than minirl, and minirl better than length "
      "normalization or no-IS)"
  )
  have = {o: _v(s, o) for o in others if _v(s, o)}
  if not m or not have:
    out.append(_missing("1a", S, claim, s, ["minirl"] + others))
  else:
    cmps, texts = {}, []
    for o, v in have.items():
      cmps[o], t = _cmp_text("minirl", o, m, v)
      texts.append(t)
    if any(c["worse"] for c in cmps.values()):
      verdict = NOT_REPRODUCED
    elif any(cmps[o]["better"] for o in ("minirl_length_norm", "minirl_no_is") if o in cmps):
      verdict = REPRODUCED
    else:
      verdict = INCONCLUSIVE
    out.append(_finding("1a", S, claim, verdict, "; ".join(texts) + hz))

  claim = "Length normalization is stable but worse than MiniRL"
  ln = _v(s, "minirl_length_norm")
  if not m or not ln:
    out.append(_missing("1b", S, claim, s, ["minirl", "minirl_length_norm"]))
  else:
    c, t = _cmp_text("minirl", "minirl_length_norm", m, ln)
    if ln["stats"]["collapse"] == "collapses":
      verdict = NOT_REPRODUCED
    else:
      verdict = directional(c)
      if verdict == REPRODUCED and ln["stats"]["collapse"] != "stable":
        verdict = INCONCLUSIVE
    out.append(_finding("1b", S, claim, verdict, f"{t}; minirl_length_norm {_col(ln)}{hz}"))

  claim = "Removing the train-infer IS weight collapses (MiniRL itself stays stable)"
  ni = _v(s, "minirl_no_is")
  if not m or not ni:
    out.append(_missing("1c", S, claim, s, ["minirl", "minirl_no_is"]))
  else:
    reasons = sorted(
        {
            reason_kind(x)
            for r in ni["runs"].values()
            if r["status"] == "done"
            for x in r["collapse_reasons"]
        }
    )
    c, t = _cmp_text("minirl", "minirl_no_is", m, ni)
    ev = (
        f"minirl_no_is {_col(ni)}"
        + (f" [{'; '.join(reasons)}]" if reasons else "")
        + f"; minirl {_col(m)}; {t}"
    )
    if ni["stats"]["collapse"] == "collapses" and m["stats"]["collapse"] == "stable":
      verdict = REPRODUCED
    elif ni["stats"]["collapse"] == "stable" and c["equivalent"] and not c["better"]:
      verdict = NOT_REPRODUCED
    else:
      verdict = INCONCLUSIVE
    out.append(_finding("1c", S, claim, verdict, ev + hz))

  r3 = _v(s, "minirl_r3")
  claim = "R3 lowers the train-infer KL on-policy (k3, paired log ratio)"
  if not m or not r3:
    out.append(_missing("1d", S, claim, s, ["minirl", "minirl_r3"]))
  else:
    c = cmp(r3, m, "log_k3")
    k = lambda v: float(np.mean([x for x in per_seed(v, "mean_k3").values() if x is not None]))
    ev = (
        f"mean k3 minirl_r3 {k(r3):.3g} vs minirl {k(m):.3g}; log(k3 ratio) r3 - minirl "
        f"{describe(c)} (ratio {math.exp(c['mean']) if c['n'] else math.nan:.2f})"
    )
    verdict = REPRODUCED if c["worse"] else NOT_REPRODUCED if c["better"] else INCONCLUSIVE
    out.append(_finding("1d", S, claim, verdict, ev))

  claim = f"R3 gives no accuracy gain on-policy (gain < {EQUIV_MARGIN} shown by the CI)"
  if not m or not r3:
    out.append(_missing("1e", S, claim, s, ["minirl", "minirl_r3"]))
  else:
    c, t = _cmp_text("minirl_r3", "minirl", r3, m)
    if c["n"] >= MIN_SEEDS and c["hi"] < EQUIV_MARGIN - EPS:
      verdict = REPRODUCED
    elif c["better"]:
      verdict = NOT_REPRODUCED
    else:
      verdict = INCONCLUSIVE
    out.append(_finding("1e", S, claim, verdict, t + hz))
  return out


def _ns(s: Mapping | None) -> list[int]:
  """The N values of the off-policy variants present (n<N>_...)."""
  out = set()
  for name in (s or {}).get("variants", {}):
    head = name.split("_")[0]
    if head.startswith("n") and head[1:].isdigit():
      out.add(int(head[1:]))
  return sorted(out)


def offpolicy_findings(s: Mapping | None) -> list[dict]:
  S = "offpolicy"
  out = []
  hz = horizon(s, S)
  ns = _ns(s)

  def check(n, a_name, b_names, rule):
    a = _v(s, f"n{n}_{a_name}")
    bs = {b: _v(s, f"n{n}_{b}") for b in b_names}
    if not a or not any(bs.values()):
      names = [f"n{n}_{x}" for x in [a_name, *b_names]]
      return {
          "name": f"N={n}",
          "verdict": INCONCLUSIVE,
          "evidence": f"no finished run of {' / '.join(names)}",
      }
    return rule(n, a, {b: v for b, v in bs.items() if v})

  # 2a: clipping is necessary.
  def rule_2a(n, nc, bs):
    r2 = bs["r2"]
    c, t = _cmp_text(f"n{n}_r2", f"n{n}_r2_noclip", r2, nc)
    v = directional(c)
    if v == REPRODUCED and r2["stats"]["collapse"] != "stable":
      v = INCONCLUSIVE
    ev = f"{t}; n{n}_r2_noclip {_col(nc)}; n{n}_r2 {_col(r2)}"
    return {"name": f"N={n}", "verdict": v, "evidence": ev}

  checks = [check(n, "r2_noclip", ["r2"], rule_2a) for n in ns if n > 1]
  out.append(
      _finding(
          "2a",
          S,
          "Off-policy, clipping is necessary: MiniRL + R2 with the clip mask is better than without "
          "it (the paper: without it, training collapses)",
          combine([c["verdict"] for c in checks]),
          "; ".join(f"{c['name']}: {c['evidence']}" for c in checks) + hz,
          checks,
      )
  )

  # 2b: routing replay is necessary.
  def rule_2b(n, nr, bs):
    cs = {}
    texts = []
    for b, v in bs.items():
      cs[b], t = _cmp_text(f"n{n}_{b}", f"n{n}_minirl", v, nr)
      texts.append(t)
    if any(c["better"] for c in cs.values()):
      v = REPRODUCED
    elif all(c["worse"] or c["equivalent"] for c in cs.values()):
      v = NOT_REPRODUCED
    else:
      v = INCONCLUSIVE
    ev = "; ".join(texts) + f"; n{n}_minirl (clip, no replay) {_col(nr)}"
    return {"name": f"N={n}", "verdict": v, "evidence": ev}

  checks = [check(n, "minirl", ["r2", "r3"], rule_2b) for n in ns if n > 1]
  out.append(
      _finding(
          "2b",
          S,
          "Off-policy, routing replay is necessary: MiniRL (with clipping) + R2 or R3 is better than "
          "without replay (the paper: without it, training collapses)",
          combine([c["verdict"] for c in checks]),
          "; ".join(f"{c['name']}: {c['evidence']}" for c in checks) + hz,
          checks,
      )
  )

  # 3: R2 vs R3.
  def rule_3(winner):
    def rule(n, r2, bs):
      r3 = bs["r3"]
      a, b = (r2, r3) if winner == "r2" else (r3, r2)
      an, bn = (f"n{n}_r2", f"n{n}_r3") if winner == "r2" else (f"n{n}_r3", f"n{n}_r2")
      c, t = _cmp_text(an, bn, a, b)
      return {"name": f"N={n}", "verdict": directional(c), "evidence": t}

    return rule

  checks = [check(n, "r2", ["r3"], rule_3("r2")) for n in ns if n == 2]
  out.append(
      _finding(
          "3a",
          S,
          "R2 beats R3 at N=2",
          combine([c["verdict"] for c in checks]),
          "; ".join(c["evidence"] for c in checks) or "no N=2 variants in the suite",
          checks,
      )
  )
  checks = [check(n, "r2", ["r3"], rule_3("r3")) for n in ns if n >= 4]
  out.append(
      _finding(
          "3b",
          S,
          "R3 beats R2 at N=4 and N=8",
          combine([c["verdict"] for c in checks]),
          "; ".join(f"{c['name']}: {c['evidence']}" for c in checks) or "no N>=4 variants",
          checks,
      )
  )
  return out


def coldstart_findings(s: Mapping | None, arms: Sequence[str] | None = None) -> list[dict]:
  S = "coldstart"
  claim = (
      "Once stable, different cold starts reach comparable final accuracy (per pair of arms "
      "separated at step 0: final gap equivalent)"
  )
  arms = list(arms or (s or {}).get("variants", {}))
  vs = {t: _v(s, t) for t in arms}
  if len(arms) < 2 or not all(vs.values()):
    return [_missing("4", S, claim, s, [t for t, v in vs.items() if not v] or ["two arms"])]
  checks = []
  for i, a in enumerate(arms):
    for b in arms[i + 1 :]:
      g0 = cmp(vs[a], vs[b], "cold_start_accuracy")
      gE = cmp(vs[a], vs[b], "final_accuracy")
      sign = 1.0 if (g0["mean"] if math.isfinite(g0["mean"]) else 0.0) >= 0 else -1.0
      d0, dE = per_seed(vs[a], "cold_start_accuracy"), per_seed(vs[a], "final_accuracy")
      e0, eE = per_seed(vs[b], "cold_start_accuracy"), per_seed(vs[b], "final_accuracy")
      shrink = paired(
          {
              k: sign * ((d0[k] - e0[k]) - (dE[k] - eE[k]))
              for k in d0
              if k in e0 and k in dE and k in eE
          },
          {k: 0.0 for k in d0},
      )
      ev = (
          f"{a} - {b}: step-0 gap {describe(g0)}; final gap {describe(gE)}; "
          f"shrinkage {describe(shrink)}"
      )
      if not (g0["better"] or g0["worse"]):
        v, ev = INCONCLUSIVE, ev + " (not separated at step 0)"
      elif gE["equivalent"]:
        v = REPRODUCED
      elif (gE["better"] or gE["worse"]) and not shrink["better"]:
        v = NOT_REPRODUCED
      else:
        v = INCONCLUSIVE
        if shrink["better"]:
          ev += " (gap shrinks)"
      checks.append({"name": f"{a} vs {b}", "verdict": v, "evidence": ev})
  verdict = combine([c["verdict"] for c in checks])
  unstable = [t for t, v in vs.items() if v["stats"]["collapse"] != "stable"]
  if verdict == REPRODUCED and unstable:
    verdict = INCONCLUSIVE
  ev = "; ".join(
      f"{t}: cold start {np.mean(list(per_seed(v, 'cold_start_accuracy').values())):.3f} -> "
      f"final {np.mean(list(per_seed(v, 'final_accuracy').values())):.3f}, {_col(v)}"
      for t, v in vs.items()
  )
  ev += "; " + "; ".join(c["evidence"] for c in checks) + horizon(s, S)
  return [_finding("4", S, claim, verdict, ev, checks)]


def findings(results: Mapping[str, Any]) -> list[dict]:
  suites = results.get("suites", {})
  out = []
  if "onpolicy" in suites:
    out += onpolicy_findings(suites["onpolicy"])
  if "offpolicy" in suites:
    out += offpolicy_findings(suites["offpolicy"])
  if "coldstart" in suites:
    out += coldstart_findings(suites["coldstart"])
  return out
