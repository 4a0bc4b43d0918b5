"""Reading runs back: metrics.jsonl -> curves, per-run statistics, variant statistics, results.json."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from fo_rl.paper.suites import SUITES, get_field, load_suite
from fo_rl.paper.sweep import display_path
from fo_rl.paper.verdicts import (
    FINAL_EVALS,
    RULES_TEXT,
    _window,
    auc,
    collapse_label,
    collapse_reasons,
    findings,
)

# Per-step curves kept in results.json: {curve name: metrics.jsonl key}. Besides reward, entropy and
# the train-infer KL, the mechanism metrics the findings are about (issue 15 item 5), each rounded to
# STEP_DIGITS significant digits to keep results.json compact.
_STEP_KEYS = {
    "reward": "reward_mean",
    "entropy": "entropy",
    "kl": "train_infer_kl",
    "k3": "train_infer_k3",
    "clip_high": "clip_frac_high",
    "clip_low": "clip_frac_low",
    "loss": "loss",
    "f_tau2": "train_infer_frac_tau2",  # F(2): tokens with max(rho, 1/rho) > 2, rho = pi_old / mu
    "is_mean": "is_weight_mean",  # the TIS weight min(pi_old / mu, C)
    "is_max": "is_weight_max",
    "is_trunc": "is_truncated_frac",  # tokens whose pi_old / mu exceeded the cap C
    "ti_ratio_max": "train_infer_ratio_max",
    "ratio_max": "ratio_max",  # staleness pi_theta / pi_old, max over the step's updates
    "stale_first_max": "staleness_ratio_first_minibatch_max",
    "router_dis": "router_disagreement_per_decision",  # sampler vs trainer top-k sets
    "router_dis_tok": "router_disagreement_per_token",
    "r3_gap": "r3_vs_live_logp_gap",
    "length": "response_length",
    "grad_norm": "grad_norm",  # before clipping (mean over the step's updates)
    "update_norm": "update_norm",
}
STEP_DIGITS = 4


def _num(v) -> float:
  try:
    return float(v)
  except (TypeError, ValueError):
    return math.nan


def _round(x: float) -> float:
  return float(f"{x:.{STEP_DIGITS}g}") if math.isfinite(x) else x


def curves_from_rows(rows: Sequence[Mapping[str, Any]]) -> dict[str, list]:
  """metrics.jsonl rows -> {'eval_step', 'eval_acc', 'eval_greedy', 'step', 'reward', 'entropy', ...}."""
  out: dict[str, list] = {"eval_step": [], "eval_acc": [], "eval_greedy": [], "step": []}
  out.update({k: [] for k in _STEP_KEYS})
  for row in sorted(rows, key=lambda r: r.get("step", 0)):
    step = int(row.get("step", 0))
    if "eval/mean_accuracy" in row:
      out["eval_step"].append(step)
      out["eval_acc"].append(_num(row["eval/mean_accuracy"]))
      out["eval_greedy"].append(_num(row.get("eval/greedy_accuracy")))
    if "entropy" in row or "reward_mean" in row:
      out["step"].append(step)
      for k, key in _STEP_KEYS.items():
        out[k].append(_round(_num(row.get(key))))
  return out


def run_stats(curves: Mapping[str, Sequence[float]], updates_per_step: int = 1) -> dict[str, Any]:
  """Per-run scalars that the findings use, from curves_from_rows(); `updates_per_step` (N) turns RL
  steps into gradient updates, the x-axis of the AUC."""
  steps, acc = list(curves.get("eval_step", [])), list(curves.get("eval_acc", []))
  after = [a for s, a in zip(steps, acc) if s > 0] or acc
  k3 = [k for k in curves.get("k3", []) if math.isfinite(k)]
  ent = list(curves.get("entropy", []))
  w = _window(len(ent)) if ent else 0
  kl = [k for k in curves.get("kl", []) if math.isfinite(k)]
  reasons = collapse_reasons(curves)
  mean = lambda xs: float(np.mean(xs)) if len(xs) else math.nan
  return {
      "cold_start_accuracy": acc[steps.index(0)] if 0 in steps else math.nan,
      "final_accuracy": mean(after[-FINAL_EVALS:]),
      "peak_accuracy": max(acc) if acc else math.nan,
      "best_accuracy": max([a for s, a in zip(steps, acc) if s > 0], default=math.nan),
      "auc": auc([s * updates_per_step for s in steps], acc),
      "updates": (max(curves.get("step", []) or steps or [0])) * updates_per_step,
      "final_greedy_accuracy": mean(
          [g for s, g in zip(steps, curves.get("eval_greedy", [])) if s > 0][-FINAL_EVALS:]
      ),
      "entropy_early": mean(ent[:w]),
      "entropy_late": mean(ent[-w:]) if w else math.nan,
      "mean_train_infer_kl": mean(kl),
      "mean_k3": mean(k3),
      "final_reward": mean([r for r in curves.get("reward", []) if math.isfinite(r)][-max(w, 1) :]),
      "collapsed": bool(reasons),
      "collapse_reasons": reasons,
  }


def _read_json(path: Path) -> dict | None:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def _seed_dirs(vdir: Path) -> list[tuple[int, Path]]:
  out = []
  for p in vdir.glob("seed*"):
    if p.is_dir() and p.name[4:].isdigit():
      out.append((int(p.name[4:]), p))
  return sorted(out)


def _knobs(cfg: Mapping | None) -> dict:
  if not cfg:
    return {}
  g = lambda f: get_field(cfg, f)
  return {
      "N": g("rl.mini_batches"),
      "replay": g("rl.replay"),
      "clip": g("rl.loss.clip"),
      "train_infer_is": g("rl.loss.train_infer_is"),
      "length_norm": g("rl.loss.length_norm"),
      "teacher": g("sft.teacher"),
      "sampler": g("sampler.weight_dtype"),
      "steps": g("rl.steps"),
      "responses_per_update": _per_update(g),
      "grad_clip": g("optim.grad_clip"),
  }


def _per_update(g) -> int | None:
  try:
    return int(g("rl.prompts_per_step")) * int(g("rl.group_size")) // int(g("rl.mini_batches"))
  except (TypeError, ValueError):
    return None


def read_run(wd: Path) -> dict[str, Any]:
  from fo_rl.metrics_writer import read_metrics

  cfg = _read_json(wd / "config.json")
  summary = _read_json(wd / "summary.json")
  target = get_field(cfg, "rl.steps") if cfg else None
  done = summary is not None and (target is None or int(summary.get("steps", 0)) >= int(target))
  curves = curves_from_rows(read_metrics(wd))
  cmd = (wd / "command.txt").read_text().strip() if (wd / "command.txt").exists() else None
  status = "done" if done else ("running or stopped" if curves["step"] or cfg else "not started")
  return run_record(
      curves,
      status,
      workdir=display_path(wd),
      command=cmd,
      wall_seconds=(summary or {}).get("wall_seconds"),
      knobs=_knobs(cfg),
  )


def run_record(
    curves: Mapping[str, Sequence[float]], status: str = "done", **extra
) -> dict[str, Any]:
  """One run as results.json holds it: identity, curves and run_stats() (tests build synthetic ones)."""
  rec = {"workdir": None, "status": status, "command": None, "wall_seconds": None, "knobs": {}}
  rec.update(extra)
  rec["curves"] = {k: list(v) for k, v in curves.items()}
  rec.update(run_stats(curves, int(rec["knobs"].get("N") or 1)))
  return rec


def suite_record(
    variants: Mapping[str, Mapping[str, Mapping[str, Any]]],
    groups: Mapping[str, str] | None = None,
    setup: Mapping | None = None,
) -> dict:
  """{variant: {seed: run_record}} -> a suite of results.json (variant stats included)."""
  out = {}
  for name, runs in variants.items():
    runs = {str(k): v for k, v in runs.items()}
    first = next((r["knobs"] for r in runs.values() if r.get("knobs")), {})
    out[name] = {
        "config": None,
        "knobs": first,
        "group": (groups or {}).get(name, ""),
        "runs": runs,
        "stats": variant_stats(runs),
    }
  updates = [r.get("updates") or 0 for v in out.values() for r in v["runs"].values()]
  return {"variants": out, "setup": dict(setup or {}), "updates": max(updates, default=0)}


def _stat(values: Sequence[float]) -> dict[str, Any]:
  v = [float(x) for x in values if x is not None and math.isfinite(x)]
  return {
      "values": v,
      "n": len(v),
      "mean": float(np.mean(v)) if v else math.nan,
      "std": float(np.std(v, ddof=1)) if len(v) > 1 else math.nan,
      "min": min(v) if v else math.nan,
      "max": max(v) if v else math.nan,
  }


def variant_stats(runs: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
  done = {s: r for s, r in runs.items() if r["status"] == "done"}
  n_col = sum(bool(r["collapsed"]) for r in done.values())
  label = collapse_label(n_col, len(done))
  return {
      "seeds_done": sorted(int(s) for s in done),
      "n_done": len(done),
      "n_collapsed": n_col,
      "collapse": label,
      **{
          k: _stat([r[k] for r in done.values()])
          for k in (
              "auc",
              "final_accuracy",
              "best_accuracy",
              "peak_accuracy",
              "cold_start_accuracy",
              "final_greedy_accuracy",
              "mean_train_infer_kl",
              "mean_k3",
              "entropy_late",
              "final_reward",
          )
      },
  }


def collect(workdir: str | Path, suites: Sequence[str] = SUITES) -> dict[str, Any]:
  """Everything under workdir -> the results dict (written as results.json)."""
  root = Path(workdir).resolve()
  out = {
      "workdir": display_path(root),
      "generated": time.strftime("%Y-%m-%d %H:%M:%S"),
      "rules": RULES_TEXT,
      "suites": {},
  }
  for suite in suites:
    mod = load_suite(suite)
    variants, groups, config_path = {}, {}, None
    for v in mod.VARIANTS:
      seeds = _seed_dirs(root / v)
      if not seeds:
        continue
      variants[v] = {s: read_run(wd) for s, wd in seeds}
      group = mod.GROUP_BY and get_field(mod.get_config(v), mod.GROUP_BY)
      groups[v] = f"N={group}" if mod.GROUP_BY == "rl.mini_batches" else str(group or "")
      if config_path is None:
        config_path = next(
            (wd / "config.json" for _, wd in seeds if (wd / "config.json").exists()), None
        )
    if variants:
      rec = suite_record(variants, groups, setup_of(config_path))
      for v in rec["variants"]:
        rec["variants"][v]["config"] = f"configs/paper/{suite}.py:{v}"
      rec["seeds"] = sorted({int(s) for runs in variants.values() for s in runs})
      out["suites"][suite] = rec
  out["findings"] = findings(out)
  return out


def setup_of(config_path: Path | None) -> dict[str, Any]:
  """The miniature setup, read from one run's config.json (the variants differ only in their knobs)."""
  cfg = _read_json(config_path) if config_path else None
  if not cfg:
    return {}
  g = lambda f: get_field(cfg, f)
  m = g("model") or {}
  return {
      "model": (
          f"{m.get('num_layers')} layers, hidden {m.get('hidden_size')}, {m.get('num_heads')} "
          f"heads / {m.get('num_kv_heads')} kv (head dim {m.get('head_dim')}), "
          f"{m.get('num_experts')} experts top-{m.get('num_experts_per_tok')} (expert FFN "
          f"{m.get('moe_intermediate_size')}), vocab {m.get('vocab_size')}, random init"
      ),
      "task": f"{g('data.task')} {json.dumps(g('data.options'))}",
      "cold start (SFT)": (
          f"{g('sft.steps')} steps x batch {g('sft.batch_size')}, LR "
          f"{g('sft.learning_rate')} (warmup {g('sft.warmup_steps')}), teacher "
          f"{g('sft.teacher')} unless the variant says otherwise; cached per "
          f"(teacher, seed) and shared by every variant"
      ),
      "RL": (
          f"{g('rl.steps')} steps x {g('rl.prompts_per_step')} prompts x {g('rl.group_size')} "
          f"samples, temperature {g('rl.temperature')}, advantage {g('rl.advantage')}, loss "
          f"{g('rl.loss.name')} (TIS cap {g('rl.loss.tis_cap')}, tis_mode {g('rl.loss.tis_mode')}, "
          f"clip eps {g('rl.loss.eps_low')}/{g('rl.loss.eps_high')}, normalizer "
          f"{g('rl.loss.normalizer')}); N, replay, clip, IS, length_norm per variant"
      ),
      "optimizer": ", ".join(f"{k} {v}" for k, v in (g("optim") or {}).items()),
      "sampler": (
          f"weights {g('sampler.weight_dtype')} (kept in high precision: "
          f"{g('sampler.keep_high_precision')}), at most {g('sampler.max_new_tokens')} new "
          f"tokens, no top-k / top-p"
      ),
      "eval": (
          f"every {g('eval.every')} RL steps and at the end: {g('eval.num_prompts')} held-out "
          f"prompts x {g('eval.samples')} samples (mean accuracy) and greedy"
      ),
      "read from": display_path(config_path),
  }
