"""Sweep execution: one Run per (variant, seed), scheduled `parallel` at a time, cold starts shared,
resumable (a finished run is skipped, an unfinished one resumes from its checkpoint).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from fo_rl.common import SignalFlag
from fo_rl.paper.suites import REPO, get_field, load_suite, parse_value, set_field


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
      f"paper: {len(runs)} runs, {len(runs) - len(todo)} already finished, {len(todo)} to run, "
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
      "paper: signal {signum}: stopping the running runs (they checkpoint) ...",
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
