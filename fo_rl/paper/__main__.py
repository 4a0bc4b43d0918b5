"""`python -m fo_rl.paper`: run a suite of the paper miniature and write its report (see
fo_rl/paper/__init__.py)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Sequence

from fo_rl.paper.report import write_outputs
from fo_rl.paper.suites import SUITES
from fo_rl.paper.sweep import (
    build_plan,
    default_parallel,
    execute,
    is_finished,
    parse_overrides,
    prepare_data,
)


def _seeds(text: str) -> list[int]:
  if "," in text:
    return [int(s) for s in text.split(",") if s.strip()]
  n = int(text)
  if n < 1:
    raise argparse.ArgumentTypeError("--seeds must be >= 1")
  return list(range(n))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
      prog="python -m fo_rl.paper",
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
        f"paper: dry run, {len(runs)} runs planned ({len(todo)} to run, "
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
    log(f"paper: {len(codes)} runs in {(time.time() - t0) / 60:.1f} min")
  write_outputs(root, log)
  failed = sorted(n for n, c in codes.items() if c != 0)
  if failed:
    log(f"paper: {len(failed)} runs failed or were stopped: {', '.join(failed)}")
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
