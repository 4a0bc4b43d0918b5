"""Side-by-side benchmarks: `python -m fo_rl.bench --suite=moe|sampler|train|longctx`.

Each suite lives in fo_rl/benchmarks/<suite>.py and yields dicts with at least
{"name", "fo_rl", "peer", "ratio", "unit"}: fo_rl's figure, the peer's figure measured in the same process,
their ratio and the unit. One JSON object per line goes to stdout. Ratios, not absolute times, are what to
compare across machines.

Every row also records the machine's state: `cpus` (os.cpu_count()), `threads`, and the 1-minute load
average when the row's measurement began (`load_before`: the suite's start or the previous row) and when
it ended (`load_after`). A ratio taken while other jobs share the cores is not a result: the runner
warns on stderr when the load before the suite exceeds 0.5 per core, or when the load during a row
exceeds what the benchmark's own `threads` explain by more than 0.5 per core.
"""

from __future__ import annotations

import importlib
import json
import os
import sys

SUITES = ("moe", "sampler", "train", "longctx")


def main(argv=None) -> int:
  from absl import flags

  flags.DEFINE_enum("suite", "moe", SUITES, "Which benchmark suite to run.")
  flags.DEFINE_integer("threads", 2, "CPU threads for each side (XLA and PyTorch).")
  flags.DEFINE_bool("quick", False, "Smaller sizes and fewer repeats (for a smoke test).")
  FLAGS = flags.FLAGS
  FLAGS(argv or sys.argv)
  # `threads` cores for each side. PyTorch: torch.set_num_threads(threads) inside each suite. XLA:CPU runs
  # one computation per device on one core, so JAX gets `threads` CPU devices (set before JAX starts);
  # suites that run on one device use the first, the sampler suite shards its batch over all of them.
  flag = f"--xla_force_host_platform_device_count={FLAGS.threads}"
  if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()
  suite = importlib.import_module(f"fo_rl.benchmarks.{FLAGS.suite}")
  cpus = os.cpu_count() or 1
  before = os.getloadavg()[0]
  warn = load_warning(before, None, cpus, FLAGS.threads)
  if warn:
    print(f"warning: {warn}", file=sys.stderr, flush=True)
  for row in suite.run(threads=FLAGS.threads, quick=FLAGS.quick):
    after = os.getloadavg()[0]
    row = dict(row, cpus=cpus, threads=FLAGS.threads, load_before=before, load_after=after)
    warn = load_warning(None, after, cpus, FLAGS.threads)
    if warn:
      print(f"warning: {row['name']}: {warn}", file=sys.stderr, flush=True)
    print(json.dumps(row), flush=True)
    before = after
  return 0


def load_warning(before: float | None, during: float | None, cpus: int, threads: int) -> str | None:
  """Why a measurement is not one of an idle machine, or None. `before`: the 1-minute load average before
  the benchmark started (anything above 0.5 per core is other work); `during`: the load average at the
  end of a row, of which the benchmark's own `threads` busy cores are expected."""
  if before is not None and before > 0.5 * cpus:
    return (
        f"load average {before:.2f} on {cpus} cores before the benchmark started: other jobs share the"
        " machine, so its ratios are not results (measure on an idle machine)"
    )
  if during is not None and during - min(threads, cpus) > 0.5 * cpus:
    return (
        f"load average {during:.2f} on {cpus} cores during the benchmark (its own {threads} threads"
        " explain at most {0}): other jobs shared the machine".format(min(threads, cpus))
    )
  return None


if __name__ == "__main__":
  sys.exit(main())
