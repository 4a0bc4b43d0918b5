"""The report (report.md) and one figure per suite, and write_outputs() that writes them with
results.json.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from fo_rl.common import json_safe
from fo_rl.paper.results import collect
from fo_rl.paper.sweep import display_path
from fo_rl.paper.verdicts import RULES_TEXT

PANELS = (
    ("held-out accuracy", "eval_step", "eval_acc", False),
    ("training reward", "step", "reward", True),
    ("token entropy", "step", "entropy", True),
    ("train-infer KL", "step", "kl", True),
)
SMOOTH = 5  # moving-average window (steps) for the per-step panels


def _smooth(y: np.ndarray, w: int) -> np.ndarray:
  if w <= 1 or len(y) < 2:
    return y
  out = np.empty_like(y)
  for i in range(len(y)):
    seg = y[max(0, i - w // 2) : i + w // 2 + 1]
    seg = seg[np.isfinite(seg)]
    out[i] = seg.mean() if len(seg) else np.nan
  return out


def band(runs: Sequence[Mapping[str, Any]], xkey: str, ykey: str, smooth: bool):
  """(updates, mean, min, max) over seeds; each seed contributes at the updates it has."""
  per = {}
  for r in runs:
    n = int((r.get("knobs") or {}).get("N") or 1)  # x-axis: gradient updates = RL step x N
    xs, ys = [x * n for x in r["curves"].get(xkey, [])], np.asarray(
        r["curves"].get(ykey, []), float
    )
    if smooth:
      ys = _smooth(ys, SMOOTH)
    for x, y in zip(xs, ys):
      if math.isfinite(y):
        per.setdefault(int(x), []).append(float(y))
  steps = np.array(sorted(per))
  vals = [per[s] for s in steps]
  return (
      steps,
      np.array([np.mean(v) for v in vals]),
      np.array([min(v) for v in vals]),
      np.array([max(v) for v in vals]),
  )


def plot_suite(suite: str, suite_res: Mapping[str, Any], path: str | Path) -> str:
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  variants = suite_res["variants"]
  groups = list(dict.fromkeys(v["group"] for v in variants.values()))
  fig = Figure(figsize=(4.6 * len(PANELS), 3.4 * len(groups) + 0.6), dpi=100, layout="constrained")
  FigureCanvasAgg(fig)
  axes = fig.subplots(len(groups), len(PANELS), squeeze=False)
  colors = [f"C{i}" for i in range(10)]
  for gi, group in enumerate(groups):
    names = [n for n, v in variants.items() if v["group"] == group]
    bases = list(dict.fromkeys(n.removesuffix("_r3") if suite == "onpolicy" else n for n in names))
    for pi, (title, xkey, ykey, smooth) in enumerate(PANELS):
      ax = axes[gi, pi]
      ax.set_title(f"{title} ({group})" if group else title, fontsize=10)
      ax.set_xlabel("gradient updates (RL step x N)")
      ax.grid(True, alpha=0.3)
      drawn = 0
      for name in names:
        runs = [r for r in variants[name]["runs"].values() if r["status"] == "done"]
        if not runs:
          continue
        x, mean, lo, hi = band(runs, xkey, ykey, smooth)
        if not len(x):
          continue
        base = name.removesuffix("_r3") if suite == "onpolicy" else name
        color = colors[bases.index(base) % len(colors)]
        ls = "--" if suite == "onpolicy" and name.endswith("_r3") else "-"
        ax.plot(
            x,
            mean,
            color=color,
            linestyle=ls,
            linewidth=1.4,
            marker="o" if not smooth or len(x) < 10 else None,
            markersize=3,
            label=f"{name} (n={len(runs)})",
        )
        if len(runs) > 1:
          ax.fill_between(x, lo, hi, color=color, alpha=0.15, linewidth=0)
        drawn += 1
      if not drawn:
        ax.text(
            0.5,
            0.5,
            "no finished runs",
            ha="center",
            va="center",
            transform=ax.transAxes,
            color="gray",
        )
      elif pi == 0:
        ax.legend(fontsize=7)
  fig.suptitle(
      f"{suite}: mean over seeds, band = min-max over seeds; per-step panels smoothed over "
      f"{SMOOTH} steps",
      fontsize=10,
  )
  path = Path(path)
  tmp = path.with_suffix(".tmp.png")
  fig.savefig(tmp, format="png")
  os.replace(tmp, path)
  return str(path)


# --------------------------------------------------------------------------------------------------------
# Report.
# --------------------------------------------------------------------------------------------------------


def _f(x, nd=3) -> str:
  return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{nd}f}"


def _knob_text(k: Mapping) -> str:
  if not k:
    return "-"
  parts = [
      f"N={k.get('N')}",
      f"replay={k.get('replay')}",
      f"clip={k.get('clip')}",
      f"IS={k.get('train_infer_is')}",
      f"length_norm={k.get('length_norm')}",
      f"teacher={k.get('teacher')}",
      f"sampler={k.get('sampler')}",
  ]
  return ", ".join(parts)


def write_report(results: Mapping[str, Any], root: str | Path) -> str:
  root = Path(root)
  L = [
      "# The paper's findings in miniature (fo_rl)",
      "",
      f"Generated {results['generated']} by `python -m fo_rl.paper` from the runs under "
      f"`{results['workdir']}`; every verdict below is computed by `fo_rl/paper/verdicts.py` from "
      "`results.json` (no verdict is typed by hand). Paper: *Stabilizing Reinforcement Learning with "
      "LLMs: Formulation and Practices* (arXiv 2512.01374), section 4.",
      "",
  ]
  L += ["## Setup (read from the runs' config.json)", ""]
  for suite, sres in results["suites"].items():
    L += [
        f"**{suite}** (configs/paper/{suite}.py; shared cold start per (teacher, seed) in "
        f"`{results['workdir']}/sft_cache`):",
        "",
    ]
    for k, v in sres.get("setup", {}).items():
      L.append(f"- {k}: {v}")
    n_runs = sum(len(v["runs"]) for v in sres["variants"].values())
    wall = sum(
        r.get("wall_seconds") or 0.0 for v in sres["variants"].values() for r in v["runs"].values()
    )
    L.append(
        f"- seeds: {', '.join(map(str, sres.get('seeds', [])))}; {len(sres['variants'])} variants, "
        f"{n_runs} runs (knobs per variant in the suite's table below), {wall / 3600:.2f} h of "
        f"run time in all (summed over runs, cold starts included where a run computed one)"
    )
    L.append("")
  L += [
      "Miniature vs the paper: a tiny MoE from random init, cold-started by SFT on a procedural "
      "teacher, instead of Qwen3-30B-A3B-Base; the FP8 (e4m3) sampler vs the full-precision trainer "
      "keeps the training-inference discrepancy real, as the paper's FP8-inference / BF16-training "
      "stress test does; N is the number of mini-batch updates per rollout batch.",
      "",
  ]
  L += [
      "## Verdict rules",
      "",
      RULES_TEXT,
      "## Findings",
      "",
      "| # | claim | verdict | evidence |",
      "|---|---|---|---|",
  ]
  for f in results["findings"]:
    L.append(f"| {f['id']} | {f['claim']} | **{f['verdict']}** | {f['evidence']} |")
  L.append("")
  for f in results["findings"]:
    if f["checks"]:
      L.append(
          f"- {f['id']} sub-checks: "
          + "; ".join(f"{c['name']} **{c['verdict']}** ({c['evidence']})" for c in f["checks"])
      )
  L.append("")
  for suite, sres in results["suites"].items():
    L += [
        f"## Suite: {suite}",
        "",
        f"![{suite}]({suite}.png)",
        "",
        "Unpaired summaries over seeds (mean +- sd [min, max]); the verdicts use the paired "
        "differences of the findings table, not these spreads.",
        "",
        "| variant | knobs | seeds done | AUC | final acc | best acc | cold start acc | collapse "
        "| mean k3 | late entropy |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    spread = lambda x: f"{_f(x['mean'])} +- {_f(x['std'])} [{_f(x['min'])}, {_f(x['max'])}]"
    for name, v in sres["variants"].items():
      s = v["stats"]
      L.append(
          f"| {name} | {_knob_text(v['knobs'])} | {s['n_done']} ({', '.join(map(str, s['seeds_done']))}) "
          f"| {spread(s['auc'])} | {spread(s['final_accuracy'])} "
          f"| {_f(s['best_accuracy']['mean'])} | {_f(s['cold_start_accuracy']['mean'])} "
          f"| {s['collapse']} ({s['n_collapsed']}/{s['n_done']}) "
          f"| {_f(s['mean_k3']['mean'], 5)} | {_f(s['entropy_late']['mean'])} |"
      )
    L += [
        "",
        "Runs (each reproduced by its command, run from the repository root):",
        "",
        "| run | status | AUC | final acc | best acc | collapsed | wall | command |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, v in sres["variants"].items():
      for seed, r in v["runs"].items():
        col = "; ".join(r["collapse_reasons"]) if r["collapsed"] else "no"
        wall = f"{r['wall_seconds'] / 60:.1f} min" if r.get("wall_seconds") else "-"
        L.append(
            f"| {name}/seed{seed} | {r['status']} | {_f(r['auc'])} | {_f(r['final_accuracy'])} "
            f"| {_f(r['best_accuracy'])} | {col} | {wall} | `{r['command'] or '-'}` |"
        )
    L.append("")
  path = root / "report.md"
  tmp = path.with_suffix(".md.tmp")
  tmp.write_text("\n".join(L) + "\n")
  os.replace(tmp, path)
  return str(path)


def write_outputs(root: str | Path, log=print) -> dict[str, Any]:
  """results.json, report.md and <suite>.png for everything under root."""
  root = Path(root).resolve()
  results = collect(root)
  tmp = root / "results.json.tmp"
  with open(tmp, "w") as f:
    json.dump(json_safe(results), f, indent=1)  # NaN statistics -> null: strict JSON
  os.replace(tmp, root / "results.json")
  for suite, sres in results["suites"].items():
    plot_suite(suite, sres, root / f"{suite}.png")
  write_report(results, root)
  for f in results["findings"]:
    log(f"  finding {f['id']}: {f['verdict']}: {f['evidence']}")
  log(
      f"paper: wrote {display_path(root / 'report.md')}, results.json and "
      f"{', '.join(s + '.png' for s in results['suites'])}"
  )
  return results
