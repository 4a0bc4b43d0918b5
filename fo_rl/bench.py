"""Side-by-side benchmarks: `python -m fo_rl.bench --suite=moe|sampler|train`.

Each suite lives in fo_rl/benchmarks/<suite>.py and yields dicts with at least
{"name", "fo_rl", "peer", "ratio", "unit"}: fo_rl's figure, the peer's figure measured in the same process,
their ratio and the unit. One JSON object per line goes to stdout. Ratios, not absolute times, are what to
compare across machines.
"""
from __future__ import annotations

import importlib
import json
import os
import sys

SUITES = ("moe", "sampler", "train")


def main(argv=None) -> int:
  from absl import flags
  flags.DEFINE_enum("suite", "moe", SUITES, "Which benchmark suite to run.")
  flags.DEFINE_integer("threads", 2, "CPU threads for each side (XLA and PyTorch).")
  flags.DEFINE_bool("quick", False, "Smaller sizes and fewer repeats (for a smoke test).")
  FLAGS = flags.FLAGS
  FLAGS(argv or sys.argv)
  os.environ.setdefault(
      "XLA_FLAGS", f"--xla_cpu_multi_thread_eigen=true intra_op_parallelism_threads={FLAGS.threads}")
  suite = importlib.import_module(f"fo_rl.benchmarks.{FLAGS.suite}")
  for row in suite.run(threads=FLAGS.threads, quick=FLAGS.quick):
    print(json.dumps(row), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
