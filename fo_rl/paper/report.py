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
  for suite, sres in _sweeps(results):
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
  L += regime_section(results)
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
  for suite, sres in _sweeps(results):
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


def regime_rows(sres: Mapping[str, Any]) -> dict[str, str]:
  """The measured regime of one suite (issue 15's regime table), over every finished run and RL step of
  its variants: {quantity: text}. Per-step values are those of results.json's curves (each a mean over
  the step's tokens or updates); the grad clip "binds" on a step whose pre-clip grad norm (mean over its
  updates) exceeds optim.grad_clip."""
  runs = [r for v in sres["variants"].values() for r in v["runs"].values() if r.get("curves")]
  if not runs:
    return {}

  def steps(key, keep=lambda r: True):
    return np.asarray(
        [
            x
            for r in runs
            if keep(r)
            for x in r["curves"].get(key, [])
            if x is not None and math.isfinite(x)
        ],
        float,
    )

  def mean_range(x, nd=3, sci=False):
    if not x.size:
      return "-"
    fmt = (lambda v: f"{v:.2e}") if sci else (lambda v: f"{v:.{nd}f}")
    lo, hi = np.percentile(x, [10, 90])
    return f"{fmt(x.mean())} (per step p10-p90 {fmt(lo)}-{fmt(hi)})"

  replay = lambda r: (r.get("knobs") or {}).get("replay") or "none"
  length = steps("length")
  clip_bound = []
  for r in runs:
    c = (r.get("knobs") or {}).get("grad_clip")
    g = [x for x in r["curves"].get("grad_norm", []) if x is not None and math.isfinite(x)]
    if c and g:
      clip_bound += [x > c for x in g]
  per_update = sorted({(r.get("knobs") or {}).get("responses_per_update") for r in runs} - {None})
  updates = sorted({int(r.get("updates") or 0) for r in runs})
  rows = {
      "runs read": f"{len(runs)} ({len(steps('k3'))} RL steps)",
      "per-token train-infer KL, k3 (no replay / R2 / R3 runs)": " / ".join(
          mean_range(steps("k3", lambda r, m=m: replay(r) == m), sci=True)
          for m in ("none", "r2", "r3")
      ),
      "tokens with max(rho, 1/rho) > 2, F(2)": mean_range(steps("f_tau2"), sci=True),
      "TIS weight max / truncated fraction": f"{mean_range(steps('is_max'), 2)} / "
      f"{mean_range(steps('is_trunc'), sci=True)}",
      "router disagreement per decision (sampler vs trainer)": mean_range(steps("router_dis")),
      "response length (tokens, step means)": mean_range(length, 1)
      + (f"; CV of the step means {length.std() / length.mean():.2f}" if length.size else ""),
      "responses per update": ", ".join(map(str, per_update)) or "-",
      "gradient updates per run": ", ".join(map(str, updates)),
      "grad clip binds (share of steps)": (
          f"{np.mean(clip_bound):.3f} of {len(clip_bound)} steps" if clip_bound else "-"
      ),
      "pre-clip grad norm": mean_range(steps("grad_norm"), 1),
  }
  return rows


def regime_section(results: Mapping[str, Any]) -> list[str]:
  """Report lines: the measured regime table, one column per suite."""
  table = {suite: regime_rows(sres) for suite, sres in _sweeps(results)}
  table = {k: v for k, v in table.items() if v}
  if not table:
    return []
  suites = list(table)
  keys = list(next(iter(table.values())))
  L = [
      "## Measured regime",
      "",
      "What the runs themselves measured (issue 15's regime table; the paper's Qwen3-30B-A3B with FP8"
      " rollouts: per-token KL ~1e-2, F(2) > 0.1 before collapse, router disagreement ~10%, responses up"
      " to 32K tokens, 1,024 responses per update, ~1,200-5,000 updates).",
      "",
      "| quantity | " + " | ".join(suites) + " |",
      "|---|" + "---|" * len(suites),
  ]
  for k in keys:
    L.append(f"| {k} | " + " | ".join(table[s].get(k, "-") for s in suites) + " |")
  return L + [""]


def _sweeps(results: Mapping[str, Any]):
  """(suite, record) of the sweeps; the calibration has its own table (calibration.md)."""
  return [(k, v) for k, v in results["suites"].items() if k != "calibrate"]


# --------------------------------------------------------------------------------------------------------
# The regime calibration's table.
# --------------------------------------------------------------------------------------------------------

# Grad-clip thresholds whose binding fraction the table shows (old, chosen).
CLIP_CANDIDATES = (1.0, 30.0)


def teacher_lengths(
    options: Mapping[str, Any], n: int = 2000, teacher: str = "careful", split: str = "train"
) -> np.ndarray:
  """Token lengths (with EOS) of the teacher's responses to n problems of a split of the arithmetic
  task (the test split is deduplicated, so it holds few of the 200 one-digit problems)."""
  from fo_rl.data import arithmetic, teachers
  from fo_rl.data.tokenizer import Tokenizer

  tok = Tokenizer.default()
  probs = arithmetic.generate_split(split, n, 0, **dict(options))
  return np.array(
      [len(tok.encode(teachers.teacher(p, teacher, i), add_eos=True)) for i, p in enumerate(probs)]
  )


def calibration_rows(sres: Mapping[str, Any], clips=CLIP_CANDIDATES) -> list[dict[str, Any]]:
  """Per setting (seed 0, or the mean over seeds): the regime metrics from the runs' curves. Step 1's
  train-infer metrics come from the old pass before any update (the cold start itself)."""
  rows = []
  for name, v in sres["variants"].items():
    runs = [r for r in v["runs"].values() if r["curves"].get("step")]
    if not runs:
      continue
    c = runs[0]["curves"]
    arr = lambda k: np.asarray([x for x in c.get(k, []) if x is not None], float)
    first = lambda k: float(arr(k)[0]) if len(arr(k)) else math.nan
    fin = lambda a: a[np.isfinite(a)]
    g = fin(arr("grad_norm"))
    ev = dict(zip(c.get("eval_step", []), c.get("eval_acc", [])))
    gr = dict(zip(c.get("eval_step", []), c.get("eval_greedy", [])))
    k = v.get("knobs") or {}
    rows.append(
        {
            "setting": name,
            "weight_dtype": k.get("sampler"),
            "steps": len(c["step"]),
            "k1_step1": first("kl"),
            "k3_step1": first("k3"),
            "k3_mean": float(np.nanmean(arr("k3"))),
            "f_tau2": float(np.nanmean(arr("f_tau2"))),
            "router_dis": float(np.nanmean(arr("router_dis"))),
            "router_dis_tok": float(np.nanmean(arr("router_dis_tok"))),
            "is_max": float(np.nanmax(arr("is_max"))) if len(fin(arr("is_max"))) else math.nan,
            "is_trunc": float(np.nanmean(arr("is_trunc"))),
            "length": float(np.nanmean(arr("length"))),
            "grad_norm_median": float(np.median(g)) if len(g) else math.nan,
            "grad_norm_max": float(g.max()) if len(g) else math.nan,
            **{
                f"clip_binds_{cl:g}": float(np.mean(g > cl)) if len(g) else math.nan for cl in clips
            },
            "acc_step0": ev.get(0, math.nan),
            "greedy_step0": gr.get(0, math.nan),
            "wall_seconds": runs[0].get("wall_seconds"),
        }
    )
  return rows


def write_calibration(sres: Mapping[str, Any], root: str | Path, regime: Mapping[str, Any]) -> str:
  """DIR/calibration.md: the measured regime table, one row per candidate sampler setting."""
  rows = calibration_rows(sres)
  opts = regime.get("data.options", {})
  lengths, test = teacher_lengths(opts), teacher_lengths(opts, 500, split="test")
  L = [
      "# The regime calibration (fo_rl.paper --suite=calibrate)",
      "",
      "Generated by `python -m fo_rl.paper --suite=calibrate` (configs/paper/calibrate.py): one short "
      "on-policy MiniRL run per candidate sampler setting from the same seed-0 cold start. Step 1's "
      "train-infer metrics are the cold start's (the old pass precedes the first update); the others "
      "are means over the run's steps. grad norm is the pre-clip global norm per update.",
      "",
      f"Task {json.dumps(dict(opts))}: the careful teacher's responses are {lengths.mean():.1f} tokens "
      f"on average, CV {lengths.std() / lengths.mean():.2f} (range {lengths.min()}-{lengths.max()}; "
      f"{len(lengths)} training problems); on the 500 held-out test problems {test.mean():.1f} "
      f"tokens, CV {test.std() / test.mean():.2f}.",
      "",
      "| setting | k1 step 1 | k3 step 1 | k3 mean | F(2) | router dis. / decision | router dis. / "
      "token | IS max | TIS truncated | resp. length | grad norm median (max) | "
      + " | ".join(f"clip {cl:g} binds" for cl in CLIP_CANDIDATES)
      + " | acc step 0 (greedy) | wall |",
      "|---" * (13 + len(CLIP_CANDIDATES)) + "|",
  ]
  for r in rows:
    wall = f"{r['wall_seconds'] / 60:.1f} min" if r.get("wall_seconds") else "-"
    L.append(
        f"| {r['setting']} | {r['k1_step1']:.2e} | {r['k3_step1']:.2e} | {r['k3_mean']:.2e} "
        f"| {r['f_tau2']:.2e} | {r['router_dis']:.3f} | {r['router_dis_tok']:.3f} | "
        f"{r['is_max']:.2f} | {r['is_trunc']:.1e} | {r['length']:.1f} | "
        f"{r['grad_norm_median']:.2f} ({r['grad_norm_max']:.2f}) | "
        + " | ".join(f"{r[f'clip_binds_{cl:g}']:.0%}" for cl in CLIP_CANDIDATES)
        + f" | {_f(r['acc_step0'])} ({_f(r['greedy_step0'])}) | {wall} |"
    )
  path = Path(root) / "calibration.md"
  path.write_text("\n".join(L) + "\n")
  return str(path)


def write_outputs(root: str | Path, log=print) -> dict[str, Any]:
  """results.json, report.md and <suite>.png for everything under root (and calibration.md when the
  calibration ran there)."""
  from fo_rl.paper.suites import REGIME

  root = Path(root).resolve()
  results = collect(root)
  tmp = root / "results.json.tmp"
  with open(tmp, "w") as f:
    json.dump(json_safe(results), f, indent=1)  # NaN statistics -> null: strict JSON
  os.replace(tmp, root / "results.json")
  if "calibrate" in results["suites"]:
    log(
        f"paper: wrote {display_path(write_calibration(results['suites']['calibrate'], root, REGIME))}"
    )
  for suite, sres in _sweeps(results):
    plot_suite(suite, sres, root / f"{suite}.png")
  write_report(results, root)
  for f in results["findings"]:
    log(f"  finding {f['id']}: {f['verdict']}: {f['evidence']}")
  log(
      f"paper: wrote {display_path(root / 'report.md')}, results.json and "
      f"{', '.join(s + '.png' for s, _ in _sweeps(results))}"
  )
  return results
