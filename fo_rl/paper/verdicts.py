"""The verdict rules (stated in RULES_TEXT, which the report prints verbatim) and the findings."""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np

ACC_DROP = 0.15  # a held-out accuracy drop below the run's peak that counts as a collapse
TAIL_EVALS = (
    2  # the drop must hold at each of the last TAIL_EVALS evaluations (no recovery by the end)
)
FINAL_EVALS = 2  # final accuracy = mean of the last FINAL_EVALS evaluations after the cold start
ENTROPY_CRASH_FRAC = 0.2  # late entropy below this fraction of the early entropy: collapse
ENTROPY_SURGE_MULT = 3.0  # late entropy above this multiple of the early entropy: collapse
ENTROPY_WINDOW_FRAC = 0.1  # early / late entropy: mean over the first / last 10% of steps ...
ENTROPY_WINDOW_MIN = 3  # ... and at least 3 steps (at most half the steps)
ACC_MIN_DIFF = 0.01  # "better" on accuracy also needs a difference of means above this floor
EPS = 1e-9  # float tolerance in threshold comparisons

REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE = "reproduced", "not reproduced", "inconclusive"

RULES_TEXT = f"""\
- Held-out accuracy of a run is `eval/mean_accuracy` (mean over `eval.samples` samples of
  `eval.num_prompts` held-out prompts) at every evaluation step; step 0 is the cold start.
  **Final accuracy** = mean of the last {FINAL_EVALS} evaluations after step 0 (fewer if the run has
  fewer). **Peak accuracy** = the maximum over all evaluations, step 0 included.
- A run **collapsed** if any of:
  (a) accuracy: each of its last {TAIL_EVALS} evaluations is at least {ACC_DROP} below its peak
      accuracy (it fell and did not recover by the end);
  (b) entropy crash: late entropy < {ENTROPY_CRASH_FRAC} x early entropy;
  (c) entropy surge: late entropy > {ENTROPY_SURGE_MULT} x early entropy;
  (d) the late entropy window holds a non-finite value.
  Early / late entropy = mean per-step token entropy over the first / last
  max({ENTROPY_WINDOW_MIN}, {ENTROPY_WINDOW_FRAC:g} x steps) RL steps (at most half the steps).
- A variant **collapses** if more than half of its finished seeds collapsed, is **stable** if none
  did, and is **mixed** otherwise.
- Variant A is **better** than B on a metric if mean_A - mean_B > max(std_A, std_B, floor), where
  mean and std (sample std, ddof=1) are over finished seeds, floor = {ACC_MIN_DIFF} for accuracy and 0
  for the train-infer KL (lower KL is "better"); **worse** symmetrically; otherwise a **tie** (the
  difference is within the seed spread). With fewer than 2 finished seeds on either side the
  comparison is **n/a**. Comparisons use final accuracy unless stated.
- A finding with several sub-checks (one per N, say) is reproduced if every sub-check is; not
  reproduced if every decided sub-check (not inconclusive) is not reproduced and at least one is
  decided; otherwise inconclusive. A finding whose variants have no finished run is inconclusive.
"""


def _window(n: int) -> int:
  return max(1, min(max(ENTROPY_WINDOW_MIN, round(ENTROPY_WINDOW_FRAC * n)), n // 2 or 1))


def collapse_reasons(curves: Mapping[str, Sequence[float]]) -> list[str]:
  """The collapse rules (a)-(d) of RULES_TEXT that a run's curves meet; [] = not collapsed."""
  reasons = []
  acc = [a for a in curves.get("eval_acc", []) if math.isfinite(a)]
  if len(acc) >= TAIL_EVALS + 1:
    peak, tail = max(acc), acc[-TAIL_EVALS:]
    if all(a <= peak - ACC_DROP + EPS for a in tail):
      reasons.append(
          f"accuracy {max(tail):.3f} at the end, {peak - max(tail):.3f} below its peak "
          f"{peak:.3f}"
      )
  ent = list(curves.get("entropy", []))
  if len(ent) >= 2:
    w = _window(len(ent))
    early, late = ent[:w], ent[-w:]
    if not all(math.isfinite(e) for e in late):
      reasons.append("non-finite entropy")
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


def compare(
    a: Mapping[str, Any], b: Mapping[str, Any], *, higher_is_better: bool = True, floor: float = 0.0
) -> str:
  """'better' | 'worse' | 'tie' | 'n/a' for stats dicts of _stat() (see RULES_TEXT)."""
  if a["n"] < 2 or b["n"] < 2:
    return "n/a"
  diff = a["mean"] - b["mean"]
  if not higher_is_better:
    diff = -diff
  margin = max(a["std"], b["std"], floor)
  if diff > margin + EPS:
    return "better"
  if -diff > margin + EPS:
    return "worse"
  return "tie"


def _v(suite_res: Mapping | None, name: str) -> Mapping | None:
  if not suite_res:
    return None
  v = suite_res["variants"].get(name)
  return v if v and v["stats"]["n_done"] else None


def _acc(v: Mapping) -> str:
  s = v["stats"]["final_accuracy"]
  std = "" if math.isnan(s["std"]) else f" +- {s['std']:.3f}"
  return f"{s['mean']:.3f}{std} (n={s['n']})"


def _col(v: Mapping) -> str:
  s = v["stats"]
  return f"{s['collapse']} ({s['n_collapsed']}/{s['n_done']} seeds collapsed)"


def _cmp_acc(a, b) -> str:
  return compare(a["stats"]["final_accuracy"], b["stats"]["final_accuracy"], floor=ACC_MIN_DIFF)


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


def onpolicy_findings(s: Mapping | None) -> list[dict]:
  S = "onpolicy"
  out = []
  m = _v(s, "minirl")
  others = [
      "minirl_length_norm",
      "minirl_no_is",
      "minirl_r3",
      "minirl_length_norm_r3",
      "minirl_no_is_r3",
  ]

  claim = "MiniRL is best on-policy"
  have = {o: _v(s, o) for o in others if _v(s, o)}
  if not m or not have:
    out.append(_missing("1a", S, claim, s, ["minirl"] + others))
  else:
    cmps = {o: _cmp_acc(m, v) for o, v in have.items()}
    beaten = [o for o, c in cmps.items() if c == "worse"]
    ev = f"minirl final accuracy {_acc(m)}; " + "; ".join(
        f"vs {o} {_acc(have[o])}: minirl {c}" for o, c in cmps.items()
    )
    if beaten:
      verdict = NOT_REPRODUCED
    elif any(cmps.get(o) == "better" for o in ("minirl_length_norm", "minirl_no_is")):
      verdict = REPRODUCED
    else:
      verdict = INCONCLUSIVE
    out.append(
        _finding(
            "1a",
            S,
            claim + " (no variant better than minirl, and minirl better than "
            "length normalization or no-IS)",
            verdict,
            ev,
        )
    )

  claim = "Length normalization is stable but worse than MiniRL"
  ln = _v(s, "minirl_length_norm")
  if not m or not ln:
    out.append(_missing("1b", S, claim, s, ["minirl", "minirl_length_norm"]))
  else:
    c = _cmp_acc(m, ln)
    ev = f"minirl_length_norm {_col(ln)}, final accuracy {_acc(ln)}; minirl {_acc(m)}: minirl {c}"
    if ln["stats"]["collapse"] == "collapses" or c == "worse":
      verdict = NOT_REPRODUCED
    elif ln["stats"]["collapse"] == "stable" and c == "better":
      verdict = REPRODUCED
    else:
      verdict = INCONCLUSIVE
    out.append(_finding("1b", S, claim, verdict, ev))

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
    ev = (
        f"minirl_no_is {_col(ni)}"
        + (f" [{'; '.join(reasons)}]" if reasons else "")
        + f"; minirl {_col(m)}"
    )
    ni_r3 = _v(s, "minirl_no_is_r3")
    if ni_r3:
      ev += f"; (minirl_no_is_r3 {_col(ni_r3)})"
    if ni["stats"]["collapse"] == "stable":
      verdict = NOT_REPRODUCED
    elif ni["stats"]["collapse"] == "collapses" and m["stats"]["collapse"] == "stable":
      verdict = REPRODUCED
    else:
      verdict = INCONCLUSIVE
    out.append(_finding("1c", S, claim, verdict, ev))

  r3 = _v(s, "minirl_r3")
  claim = "R3 lowers the train-infer KL on-policy"
  if not m or not r3:
    out.append(_missing("1d", S, claim, s, ["minirl", "minirl_r3"]))
  else:
    c = compare(
        r3["stats"]["mean_train_infer_kl"],
        m["stats"]["mean_train_infer_kl"],
        higher_is_better=False,
    )
    k = lambda v: f"{v['stats']['mean_train_infer_kl']['mean']:.3g}"
    ev = f"mean train-infer KL minirl_r3 {k(r3)} vs minirl {k(m)}: R3 {c} (lower is better)"
    verdict = {"better": REPRODUCED, "worse": NOT_REPRODUCED}.get(c, INCONCLUSIVE)
    out.append(_finding("1d", S, claim, verdict, ev))

  claim = "R3 gives no accuracy gain on-policy"
  if not m or not r3:
    out.append(_missing("1e", S, claim, s, ["minirl", "minirl_r3"]))
  else:
    c = _cmp_acc(r3, m)
    ev = f"minirl_r3 {_acc(r3)} vs minirl {_acc(m)}: R3 {c}"
    verdict = (
        NOT_REPRODUCED if c == "better" else REPRODUCED if c in ("tie", "worse") else INCONCLUSIVE
    )
    out.append(_finding("1e", S, claim, verdict, ev))
  return out


def offpolicy_findings(s: Mapping | None, ns: Sequence[int] = (2, 4, 8)) -> list[dict]:
  S = "offpolicy"
  out = []
  # 2a: clipping is necessary.
  checks = []
  for n in ns:
    nc, r2 = _v(s, f"n{n}_r2_noclip"), _v(s, f"n{n}_r2")
    if not nc or not r2:
      checks.append(
          {
              "name": f"N={n}",
              "verdict": INCONCLUSIVE,
              "evidence": f"no finished run of n{n}_r2_noclip or n{n}_r2",
          }
      )
      continue
    if nc["stats"]["collapse"] == "stable":
      v = NOT_REPRODUCED
    elif nc["stats"]["collapse"] == "collapses" and r2["stats"]["collapse"] == "stable":
      v = REPRODUCED
    else:
      v = INCONCLUSIVE
    noclip = _v(s, f"n{n}_noclip")
    checks.append(
        {
            "name": f"N={n}",
            "verdict": v,
            "evidence": f"n{n}_r2_noclip {_col(nc)}; n{n}_r2 {_col(r2)}"
            + (f"; (n{n}_noclip {_col(noclip)})" if noclip else ""),
        }
    )
  out.append(
      _finding(
          "2a",
          S,
          "Off-policy, clipping is necessary: R2 without the clip mask collapses, "
          "R2 with it is stable",
          combine([c["verdict"] for c in checks]),
          "; ".join(f"{c['name']}: {c['verdict']}" for c in checks),
          checks,
      )
  )
  # 2b: routing replay is necessary.
  checks = []
  for n in ns:
    nr, r2, r3 = _v(s, f"n{n}_minirl"), _v(s, f"n{n}_r2"), _v(s, f"n{n}_r3")
    if not nr or not (r2 or r3):
      checks.append(
          {
              "name": f"N={n}",
              "verdict": INCONCLUSIVE,
              "evidence": f"no finished run of n{n}_minirl or of n{n}_r2 / n{n}_r3",
          }
      )
      continue
    replay_stable = any(x and x["stats"]["collapse"] == "stable" for x in (r2, r3))
    if nr["stats"]["collapse"] == "stable":
      v = NOT_REPRODUCED
    elif nr["stats"]["collapse"] == "collapses" and replay_stable:
      v = REPRODUCED
    else:
      v = INCONCLUSIVE
    ev = f"n{n}_minirl (clip, no replay) {_col(nr)}"
    ev += "".join(f"; {name} {_col(x)}" for name, x in ((f"n{n}_r2", r2), (f"n{n}_r3", r3)) if x)
    checks.append({"name": f"N={n}", "verdict": v, "evidence": ev})
  out.append(
      _finding(
          "2b",
          S,
          "Off-policy, routing replay is necessary: MiniRL with clipping but no "
          "replay collapses, with R2 or R3 it is stable",
          combine([c["verdict"] for c in checks]),
          "; ".join(f"{c['name']}: {c['verdict']}" for c in checks),
          checks,
      )
  )

  # 3: R2 vs R3.
  def r2_vs_r3(n, r2_should_win):
    r2, r3 = _v(s, f"n{n}_r2"), _v(s, f"n{n}_r3")
    if not r2 or not r3:
      return {
          "name": f"N={n}",
          "verdict": INCONCLUSIVE,
          "evidence": f"no finished run of n{n}_r2 or n{n}_r3",
      }
    c = _cmp_acc(r2, r3)
    want, against = ("better", "worse") if r2_should_win else ("worse", "better")
    v = REPRODUCED if c == want else NOT_REPRODUCED if c == against else INCONCLUSIVE
    return {
        "name": f"N={n}",
        "verdict": v,
        "evidence": f"n{n}_r2 {_acc(r2)} vs n{n}_r3 {_acc(r3)}: R2 {c}",
    }

  checks = [r2_vs_r3(n, True) for n in ns if n <= 2]
  out.append(
      _finding(
          "3a",
          S,
          "R2 beats R3 at N=2 (final accuracy)",
          combine([c["verdict"] for c in checks]),
          "; ".join(c["evidence"] for c in checks),
          checks,
      )
  )
  checks = [r2_vs_r3(n, False) for n in ns if n >= 4]
  out.append(
      _finding(
          "3b",
          S,
          "R3 beats R2 at N=4 and N=8 (final accuracy)",
          combine([c["verdict"] for c in checks]),
          "; ".join(f"{c['name']}: {c['evidence']}" for c in checks),
          checks,
      )
  )
  return out


def coldstart_findings(
    s: Mapping | None, teachers: Sequence[str] = ("careful", "terse", "noisy")
) -> list[dict]:
  S = "coldstart"
  claim = (
      "Once stable, different cold starts reach comparable final accuracy (cold starts separated "
      "by the rule at step 0, no pair separated at the end, all stable)"
  )
  vs = {t: _v(s, t) for t in teachers}
  if not all(vs.values()):
    return [_missing("4", S, claim, s, [t for t, v in vs.items() if not v])]
  pairs = [(a, b) for i, a in enumerate(teachers) for b in teachers[i + 1 :]]
  final = {(a, b): _cmp_acc(vs[a], vs[b]) for a, b in pairs}
  cold = {
      (a, b): compare(
          vs[a]["stats"]["cold_start_accuracy"],
          vs[b]["stats"]["cold_start_accuracy"],
          floor=ACC_MIN_DIFF,
      )
      for a, b in pairs
  }
  cs = lambda t: vs[t]["stats"]["cold_start_accuracy"]["mean"]
  ev = "; ".join(
      f"{t}: cold start {cs(t):.3f} -> final {_acc(vs[t])}, {vs[t]['stats']['collapse']}"
      for t in teachers
  )
  ev += "; at the end: " + ", ".join(f"{a} vs {b} {c}" for (a, b), c in final.items())
  ev += "; at step 0: " + ", ".join(f"{a} vs {b} {c}" for (a, b), c in cold.items())
  if any(c in ("better", "worse") for c in final.values()):
    verdict = NOT_REPRODUCED
  elif (
      all(v["stats"]["collapse"] == "stable" for v in vs.values())
      and all(c == "tie" for c in final.values())
      and any(c in ("better", "worse") for c in cold.values())
  ):
    verdict = REPRODUCED
  else:
    verdict = INCONCLUSIVE
  return [_finding("4", S, claim, verdict, ev)]


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
