"""The paper's findings in miniature: run a suite of variants x seeds, then judge each finding by code.

  python -m fo_rl.experiments --suite=onpolicy|offpolicy|coldstart --seeds=3 --workdir=DIR
      [--parallel=K] [--steps=S] [--variants=a,b] [--tiny] [--override=field=value ...]
      [--dry_run] [--report_only]

Every variant of a suite is a config in configs/paper/<suite>.py (`get_config("<variant>")`). Each
(variant, seed) is one subprocess

  python -m fo_rl.main --config=configs/paper/<suite>.py:<variant> --workdir=DIR/<variant>/seed<k>
      --config.seed=<k> --config.sft.cache_dir=DIR/sft_cache [--config.rl.steps=S ...]

run from the repository root, with its CPU threads limited (each of the K parallel runs is pinned to
cpu_count // K cores) so runs do not fight. All variants of a seed share one cold start (SFT runs once
per (teacher, seed) and is cached in DIR/sft_cache): the first run of each cold start goes alone, the
runs that need the same cold start wait until it is on disk. A run whose workdir already holds a
summary.json for its number of steps is skipped, so an interrupted sweep is resumed by running the same
command again (an unfinished run resumes from its own checkpoint).

Then everything under DIR (every suite that has runs there) is read back into DIR/results.json (curves
and per-run statistics), the verdict rules below are applied to it, and DIR/report.md and one figure per
suite (DIR/<suite>.png) are written. `--report_only` does only that.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib.util
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from fo_rl.common import SignalFlag, UserError, json_safe

REPO = Path(__file__).resolve().parent.parent
PAPER_CONFIGS = REPO / "configs" / "paper"
SUITES = ("onpolicy", "offpolicy", "coldstart")

# --------------------------------------------------------------------------------------------------------
# Verdict rules: the constants and their statement (the report prints RULES_TEXT verbatim).
# --------------------------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------------------------
# Config helpers (used by configs/paper/*.py).
# --------------------------------------------------------------------------------------------------------


def _walk(c, field: str):
  *parents, leaf = field.split(".")
  for p in parents:
    c = c[p]
  return c, leaf


def get_field(c, field: str, default=None):
  try:
    node, leaf = _walk(c, field)
    return node[leaf]
  except (KeyError, AttributeError, TypeError):
    return default


def set_field(c, field: str, value) -> None:
  node, leaf = _walk(c, field)
  if leaf not in node:
    raise KeyError(f"{field}: no such config field")
  node[leaf] = value


def parse_value(text: str, like):
  """`text` as the type of the existing value `like` (bool / int / float / str / sequence)."""
  if isinstance(like, bool):
    low = text.strip().lower()
    if low in ("true", "1", "yes"):
      return True
    if low in ("false", "0", "no"):
      return False
    raise ValueError(f"not a boolean: {text!r}")
  if isinstance(like, int):
    return int(text)
  if isinstance(like, float):
    return float(text)
  if isinstance(like, str):
    return text
  return ast.literal_eval(text)


def parse_variant_arg(arg: str, variants: Sequence[str]) -> tuple[str, bool]:
  """'<variant>' | '<variant>:tiny' | 'tiny' | '' -> (variant, tiny); '' and 'tiny' name the first."""
  parts = [p for p in (arg or "").split(":") if p]
  tiny = "tiny" in parts
  names = [p for p in parts if p != "tiny"]
  if len(names) > 1 or parts.count("tiny") > 1:
    raise UserError(f"config arg {arg!r}: expected '<variant>[:tiny]'")
  variant = names[0] if names else variants[0]
  if variant not in variants:
    raise UserError(f"unknown variant {variant!r}; known: {', '.join(variants)}")
  return variant, tiny


def suite_config(
    suite: str, common: Mapping[str, Any], variants: Mapping[str, Mapping[str, Any]], arg: str = ""
):
  """base_config() + the suite's shared knobs + the variant's knobs (+ tiny())."""
  from fo_rl.config import base_config, tiny as make_tiny

  variant, tiny = parse_variant_arg(arg, list(variants))
  c = base_config()
  c.name = f"paper_{suite}_{variant}"
  for field, value in {**common, **variants[variant]}.items():
    set_field(c, field, value)
  return make_tiny(c) if tiny else c


def load_suite(suite: str):
  """The module configs/paper/<suite>.py (VARIANTS, COMMON, GROUP_BY, get_config)."""
  path = PAPER_CONFIGS / f"{suite}.py"
  if not path.exists():
    raise ValueError(f"unknown suite {suite!r}; known: {', '.join(SUITES)}")
  spec = importlib.util.spec_from_file_location(f"fo_rl_paper_{suite}", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


# --------------------------------------------------------------------------------------------------------
# The plan: one Run per (variant, seed).
# --------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Run:
  suite: str
  variant: str
  seed: int
  config_arg: str  # after the ':' of --config
  workdir: Path  # absolute
  flags: list  # the --config.* overrides, in order
  target_steps: int
  sft_key: str | None  # None: no cold start (sft disabled)
  data: tuple  # (task, options json, data_dir) to prepare once before any run starts
  module: str = "fo_rl.main"  # what `python -m` runs (tests substitute a fake)

  @property
  def config_file(self) -> str:
    return f"configs/paper/{self.suite}.py"

  def argv(self, python: str = "python") -> list[str]:
    return [
        python,
        "-m",
        self.module,
        f"--config={self.config_file}:{self.config_arg}",
        f"--workdir={display_path(self.workdir)}",
        *self.flags,
    ]

  def shell(self) -> str:
    """The one command that reproduces this run, from the repository root."""
    return " ".join(shlex.quote(a) for a in self.argv("python"))

  @property
  def name(self) -> str:
    return f"{self.variant}/seed{self.seed}"


def display_path(p: Path | str) -> str:
  """Relative to the repository root when inside it (commands run from there), else absolute."""
  p = Path(p).resolve()
  try:
    return str(p.relative_to(REPO))
  except ValueError:
    return str(p)


def parse_overrides(items: Iterable[str]) -> list[tuple[str, str]]:
  out = []
  for item in items or ():
    if "=" not in item:
      raise ValueError(f"--override {item!r}: expected field=value, e.g. rl.loss.tis_cap=2")
    field, value = item.split("=", 1)
    out.append((field.strip().removeprefix("config."), value))
  return out


def build_plan(
    suite: str,
    seeds: Sequence[int],
    workdir: str | Path,
    *,
    variants: Sequence[str] = (),
    tiny: bool = False,
    steps: int | None = None,
    overrides: Sequence[tuple[str, str]] = (),
) -> list[Run]:
  """Every (variant, seed) run of `suite`, variant-major, each with its command and cold-start key."""
  from fo_rl import config as config_lib
  from fo_rl.sft import sft_key

  mod = load_suite(suite)
  names = list(mod.VARIANTS)
  if variants:
    unknown = [v for v in variants if v not in names]
    if unknown:
      raise ValueError(f"--variants: {unknown} not in suite {suite!r} ({', '.join(names)})")
    names = [v for v in names if v in variants]
  root = Path(workdir).resolve()
  cache = root / "sft_cache"
  runs = []
  for variant in names:
    arg = f"{variant}:tiny" if tiny else variant
    for seed in seeds:
      c = mod.get_config(arg)
      flags = [f"--config.seed={seed}", f"--config.sft.cache_dir={display_path(cache)}"]
      c.seed = int(seed)
      c.sft.cache_dir = str(cache)
      if steps is not None:
        c.rl.steps = int(steps)
        flags.append(f"--config.rl.steps={int(steps)}")
      for field, text in overrides:
        set_field(c, field, parse_value(text, get_field(c, field)))
        flags.append(f"--config.{field}={text}")
      rc = config_lib.parse(c)  # a bad variant or override fails here, before anything runs
      data = (rc.data.task, json.dumps(rc.data.task_options(), sort_keys=True), rc.data.data_dir)
      runs.append(
          Run(
              suite=suite,
              variant=variant,
              seed=int(seed),
              config_arg=arg,
              workdir=root / variant / f"seed{seed}",
              flags=flags,
              target_steps=rc.rl.steps,
              sft_key=sft_key(rc) if rc.sft.enabled else None,
              data=data,
          )
      )
  return runs


def is_finished(workdir: Path, target_steps: int | None = None) -> bool:
  """summary.json present (and, if given, covering target_steps)."""
  path = Path(workdir) / "summary.json"
  if not path.exists():
    return False
  if target_steps is None:
    return True
  try:
    with open(path) as f:
      return int(json.load(f).get("steps", 0)) >= target_steps
  except (OSError, ValueError):
    return False


def sft_ready(cache_dir: Path, key: str) -> bool:
  """A finished cold start is on disk (orbax renames a step directory to its number when complete)."""
  d = Path(cache_dir) / key
  return d.is_dir() and any(p.name.isdigit() and p.is_dir() for p in d.iterdir())


# --------------------------------------------------------------------------------------------------------
# Execution.
# --------------------------------------------------------------------------------------------------------


def _cpus() -> list[int]:
  try:
    return sorted(os.sched_getaffinity(0))
  except AttributeError:  # not Linux
    return list(range(os.cpu_count() or 1))


def default_parallel() -> int:
  return max(1, len(_cpus()) // 2)


def child_env(threads: int, compilation_cache: str | Path | None = None) -> dict:
  """The runs' environment: `threads` CPU threads each, and a shared persistent XLA compilation cache
  (variants of a suite compile the same sampler and mostly the same trainer: about 3x less CPU time
  for a tiny run once the cache is warm; results are unchanged)."""
  env = dict(os.environ)
  if compilation_cache and "JAX_COMPILATION_CACHE_DIR" not in env:
    env["JAX_COMPILATION_CACHE_DIR"] = str(compilation_cache)
    env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
  env["OMP_NUM_THREADS"] = str(threads)
  env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"  # parallel runs may share one accelerator
  if threads == 1:
    flags = env.get("XLA_FLAGS", "")
    if "xla_cpu_multi_thread_eigen" not in flags:
      env["XLA_FLAGS"] = (flags + " --xla_cpu_multi_thread_eigen=false").strip()
  env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
  return env


def prepare_data(runs: Sequence[Run], log=print) -> None:
  """Build each dataset once here, so that parallel runs never race to write the same tfds files."""
  from fo_rl.data import get_task

  for task, options, data_dir in sorted({r.data for r in runs}):
    t0 = time.time()
    t = get_task(task, **json.loads(options))
    t.load("train", data_dir or None)
    t.load("test", data_dir or None)
    log(f"data: {task} {options} ready ({time.time() - t0:.0f}s)")


def execute(
    runs: Sequence[Run],
    parallel: int,
    *,
    log=print,
    poll_seconds: float = 2.0,
    python: str = sys.executable,
    compilation_cache: str | Path | None = None,
) -> dict[str, int]:
  """Runs the unfinished runs, `parallel` at a time; returns {run name: exit code} of those started."""
  todo = [r for r in runs if not is_finished(r.workdir, r.target_steps)]
  log(
      f"experiments: {len(runs)} runs, {len(runs) - len(todo)} already finished, {len(todo)} to run, "
      f"{parallel} at a time"
  )
  if not todo:
    return {}
  cpus = _cpus()
  per = max(1, len(cpus) // parallel)
  slots = [
      cpus[i * per : (i + 1) * per] if (i + 1) * per <= len(cpus) else cpus for i in range(parallel)
  ]
  env = child_env(per, compilation_cache)
  free = list(range(parallel))
  running: dict[int, tuple[Run, subprocess.Popen, float, Any]] = {}  # slot -> (run, proc, t0, logf)
  leaders: dict[str, str] = {}  # sft key -> name of the run computing it
  codes: dict[str, int] = {}
  durations: list[float] = []
  pending = list(todo)
  stop = SignalFlag(
      (signal.SIGINT, signal.SIGTERM),
      "experiments: signal {signum}: stopping the running runs (they checkpoint) ...",
  )
  cache = runs[0].workdir.parent.parent / "sft_cache"

  def eligible(r: Run) -> bool:
    if r.sft_key is None or sft_ready(cache, r.sft_key):
      return True
    return r.sft_key not in leaders  # no one is computing this cold start: this run will

  try:
    while (pending or running) and not stop.flag:
      while free and not stop.flag:
        nxt = next((r for r in pending if eligible(r)), None)
        if nxt is None:
          break
        pending.remove(nxt)
        if nxt.sft_key is not None and not sft_ready(cache, nxt.sft_key):
          leaders[nxt.sft_key] = nxt.name
        slot = free.pop(0)
        nxt.workdir.mkdir(parents=True, exist_ok=True)
        (nxt.workdir / "command.txt").write_text(nxt.shell() + "\n")
        logf = open(nxt.workdir / "run.log", "a")
        logf.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} {nxt.shell()}\n")
        logf.flush()
        proc = subprocess.Popen(
            nxt.argv(python),
            cwd=REPO,
            env=env,
            stdout=logf,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        if parallel > 1 and hasattr(os, "sched_setaffinity"):
          try:
            os.sched_setaffinity(proc.pid, slots[slot])
          except OSError:
            pass
        running[slot] = (nxt, proc, time.time(), logf)
        log(
            f"  start {nxt.name} (pid {proc.pid}, cpus {slots[slot]})"
            + (" [computes its cold start]" if leaders.get(nxt.sft_key) == nxt.name else "")
        )
      time.sleep(poll_seconds)
      for slot, (r, proc, t0, logf) in list(running.items()):
        rc = proc.poll()
        if rc is None:
          continue
        logf.close()
        del running[slot]
        free.append(slot)
        free.sort()
        if r.sft_key in leaders and leaders[r.sft_key] == r.name:
          del leaders[r.sft_key]
        codes[r.name] = rc
        durations.append(time.time() - t0)
        left = len(pending) + len(running)
        eta = np.mean(durations) * math.ceil(left / parallel) if left else 0.0
        status = (
            "done" if rc == 0 else f"FAILED (exit {rc}, see {display_path(r.workdir / 'run.log')})"
        )
        log(f"  {status}: {r.name} in {durations[-1]:.0f}s; {left} left, ETA {eta / 60:.0f} min")
  finally:
    if running:
      for r, proc, _, _ in running.values():
        if proc.poll() is None:
          proc.send_signal(signal.SIGTERM)  # fo_rl.run checkpoints and exits at the next step
      for r, proc, _, logf in running.values():
        try:
          proc.wait(timeout=600)
        except subprocess.TimeoutExpired:
          proc.kill()
        logf.close()
        codes[r.name] = proc.returncode or 128 + signal.SIGTERM  # stopped: not finished either way
    stop.restore()
  return codes


# --------------------------------------------------------------------------------------------------------
# Reading runs back: curves and per-run statistics.
# --------------------------------------------------------------------------------------------------------

_STEP_KEYS = {
    "reward": "reward_mean",
    "entropy": "entropy",
    "kl": "train_infer_kl",
    "k3": "train_infer_k3",
    "clip_high": "clip_frac_high",
    "clip_low": "clip_frac_low",
}


def _num(v) -> float:
  try:
    return float(v)
  except (TypeError, ValueError):
    return math.nan


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
        out[k].append(_num(row.get(key)))
  return out


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


def run_stats(curves: Mapping[str, Sequence[float]]) -> dict[str, Any]:
  """Per-run scalars that the findings use, from curves_from_rows()."""
  steps, acc = list(curves.get("eval_step", [])), list(curves.get("eval_acc", []))
  after = [a for s, a in zip(steps, acc) if s > 0] or acc
  ent = list(curves.get("entropy", []))
  w = _window(len(ent)) if ent else 0
  kl = [k for k in curves.get("kl", []) if math.isfinite(k)]
  reasons = collapse_reasons(curves)
  mean = lambda xs: float(np.mean(xs)) if len(xs) else math.nan
  return {
      "cold_start_accuracy": acc[steps.index(0)] if 0 in steps else math.nan,
      "final_accuracy": mean(after[-FINAL_EVALS:]),
      "peak_accuracy": max(acc) if acc else math.nan,
      "final_greedy_accuracy": mean(
          [g for s, g in zip(steps, curves.get("eval_greedy", [])) if s > 0][-FINAL_EVALS:]
      ),
      "entropy_early": mean(ent[:w]),
      "entropy_late": mean(ent[-w:]) if w else math.nan,
      "mean_train_infer_kl": mean(kl),
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
  }


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
  rec.update(run_stats(curves))
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
  return {"variants": out, "setup": dict(setup or {})}


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
  label = (
      "no data"
      if not done
      else "collapses"
      if n_col * 2 > len(done)
      else "stable"
      if n_col == 0
      else "mixed"
  )
  return {
      "seeds_done": sorted(int(s) for s in done),
      "n_done": len(done),
      "n_collapsed": n_col,
      "collapse": label,
      **{
          k: _stat([r[k] for r in done.values()])
          for k in (
              "final_accuracy",
              "peak_accuracy",
              "cold_start_accuracy",
              "final_greedy_accuracy",
              "mean_train_infer_kl",
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


# --------------------------------------------------------------------------------------------------------
# Comparisons and findings.
# --------------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------------
# Figures.
# --------------------------------------------------------------------------------------------------------

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
  """(steps, mean, min, max) over seeds; each seed contributes at the steps it has."""
  per = {}
  for r in runs:
    xs, ys = r["curves"].get(xkey, []), np.asarray(r["curves"].get(ykey, []), float)
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
      ax.set_xlabel("RL step")
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
      f"Generated {results['generated']} by `python -m fo_rl.experiments` from the runs under "
      f"`{results['workdir']}`; every verdict below is computed by `fo_rl/experiments.py` from "
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
        "| variant | knobs | seeds done | final acc (mean +- std [min, max]) | peak acc | cold start "
        "acc | collapse | mean train-infer KL | late entropy |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, v in sres["variants"].items():
      s = v["stats"]
      fa = s["final_accuracy"]
      L.append(
          f"| {name} | {_knob_text(v['knobs'])} | {s['n_done']} ({', '.join(map(str, s['seeds_done']))}) "
          f"| {_f(fa['mean'])} +- {_f(fa['std'])} [{_f(fa['min'])}, {_f(fa['max'])}] "
          f"| {_f(s['peak_accuracy']['mean'])} | {_f(s['cold_start_accuracy']['mean'])} "
          f"| {s['collapse']} ({s['n_collapsed']}/{s['n_done']}) "
          f"| {_f(s['mean_train_infer_kl']['mean'], 5)} | {_f(s['entropy_late']['mean'])} |"
      )
    L += [
        "",
        "Runs (each reproduced by its command, run from the repository root):",
        "",
        "| run | status | final acc | peak acc | collapsed | wall | command |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, v in sres["variants"].items():
      for seed, r in v["runs"].items():
        col = "; ".join(r["collapse_reasons"]) if r["collapsed"] else "no"
        wall = f"{r['wall_seconds'] / 60:.1f} min" if r.get("wall_seconds") else "-"
        L.append(
            f"| {name}/seed{seed} | {r['status']} | {_f(r['final_accuracy'])} "
            f"| {_f(r['peak_accuracy'])} | {col} | {wall} | `{r['command'] or '-'}` |"
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
      f"experiments: wrote {display_path(root / 'report.md')}, results.json and "
      f"{', '.join(s + '.png' for s in results['suites'])}"
  )
  return results


# --------------------------------------------------------------------------------------------------------
# CLI.
# --------------------------------------------------------------------------------------------------------


def _seeds(text: str) -> list[int]:
  if "," in text:
    return [int(s) for s in text.split(",") if s.strip()]
  n = int(text)
  if n < 1:
    raise argparse.ArgumentTypeError("--seeds must be >= 1")
  return list(range(n))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
      prog="python -m fo_rl.experiments",
      description=__doc__.split("\n\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  p.add_argument(
      "--suite", choices=SUITES, help="which suite to run (not needed with --report_only)"
  )
  p.add_argument(
      "--seeds",
      type=_seeds,
      default=_seeds("3"),
      help="number of seeds (0..n-1), or a comma list of seeds (default 3)",
  )
  p.add_argument("--workdir", required=True, help="DIR: runs go to DIR/<variant>/seed<k>")
  p.add_argument(
      "--parallel",
      type=int,
      default=default_parallel(),
      help="runs at a time (default max(1, cpus // 2) = %(default)s)",
  )
  p.add_argument("--steps", type=int, default=None, help="override rl.steps of every run")
  p.add_argument("--variants", default="", help="comma list: run only these variants of the suite")
  p.add_argument("--tiny", action="store_true", help="the ':tiny' version of every variant (tests)")
  p.add_argument(
      "--override",
      action="append",
      default=[],
      help="field=value, any config field (repeatable), e.g. --override=eval.every=5",
  )
  p.add_argument(
      "--compilation_cache",
      default="",
      help="persistent XLA compilation cache shared by the runs (default DIR/jax_cache; "
      "'none' disables; an exported JAX_COMPILATION_CACHE_DIR wins)",
  )
  p.add_argument("--dry_run", action="store_true", help="print the plan and commands, run nothing")
  p.add_argument(
      "--report_only", action="store_true", help="only rewrite report.md / results.json / plots"
  )
  p.add_argument("--poll_seconds", type=float, default=2.0, help=argparse.SUPPRESS)
  a = p.parse_args(argv)
  if not a.report_only and not a.suite:
    p.error("--suite is required (unless --report_only)")
  if a.parallel < 1:
    p.error("--parallel must be >= 1")
  return a


def main(argv: Sequence[str] | None = None) -> int:
  a = parse_args(argv)
  log = lambda s: print(s, flush=True)
  root = Path(a.workdir).resolve()
  if a.report_only:
    root.mkdir(parents=True, exist_ok=True)
    write_outputs(root, log)
    return 0
  variants = [v.strip() for v in a.variants.split(",") if v.strip()]
  runs = build_plan(
      a.suite,
      a.seeds,
      root,
      variants=variants,
      tiny=a.tiny,
      steps=a.steps,
      overrides=parse_overrides(a.override),
  )
  if a.dry_run:
    for r in runs:
      state = "finished, skip" if is_finished(r.workdir, r.target_steps) else "to run"
      log(f"[{state}] {r.name} (cold start {r.sft_key or 'none'}):\n  {r.shell()}")
    todo = [r for r in runs if not is_finished(r.workdir, r.target_steps)]
    log(
        f"experiments: dry run, {len(runs)} runs planned ({len(todo)} to run, "
        f"{len({r.sft_key for r in runs if r.sft_key})} distinct cold starts), nothing started"
    )
    return 0
  root.mkdir(parents=True, exist_ok=True)
  todo = [r for r in runs if not is_finished(r.workdir, r.target_steps)]
  if todo:
    prepare_data(todo, log)
  t0 = time.time()
  cache = None if a.compilation_cache == "none" else (a.compilation_cache or root / "jax_cache")
  codes = execute(runs, a.parallel, log=log, poll_seconds=a.poll_seconds, compilation_cache=cache)
  if codes:
    log(f"experiments: {len(codes)} runs in {(time.time() - t0) / 60:.1f} min")
  write_outputs(root, log)
  failed = sorted(n for n, c in codes.items() if c != 0)
  if failed:
    log(f"experiments: {len(failed)} runs failed or were stopped: {', '.join(failed)}")
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
