"""Side-by-side benchmarks: `python -m fo_rl.bench --suite=moe|sampler|train` (or `python -m fo_rl.benchmarks`).

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
  # `threads` cores for each side. PyTorch: torch.set_num_threads(threads) inside each suite. XLA:CPU runs
  # one computation per device on one core, so JAX gets `threads` CPU devices (set before JAX starts);
  # suites that run on one device use the first, the sampler suite shards its batch over all of them.
  flag = f"--xla_force_host_platform_device_count={FLAGS.threads}"
  if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()
  suite = importlib.import_module(f"fo_rl.benchmarks.{FLAGS.suite}")
  for row in suite.run(threads=FLAGS.threads, quick=FLAGS.quick):
    print(json.dumps(row), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
