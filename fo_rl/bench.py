"""Side-by-side benchmarks: `python -m fo_rl.bench --suite=moe|sampler|train`.

Each suite lives in fo_rl/benchmarks/<suite>.py and yields dicts with at least
{"name", "fo_rl", "peer", "ratio", "unit"}: fo_rl's figure, the peer's figure measured in the same process,
their ratio and the unit. One JSON object per line goes to stdout. Ratios, not absolute times, are what to
compare across machines.
"""
from __future__ import annotations

import importlib
import json
import sys

SUITES = ("moe", "sampler", "train")


def main(argv=None) -> int:
  from absl import flags
  flags.DEFINE_enum("suite", "moe", SUITES, "Which benchmark suite to run.")
  flags.DEFINE_integer("threads", 2, "CPU threads for each side (XLA and PyTorch).")
  flags.DEFINE_bool("quick", False, "Smaller sizes and fewer repeats (for a smoke test).")
  FLAGS = flags.FLAGS
  FLAGS(argv or sys.argv)
  # XLA:CPU uses one thread per core; on the 2-core reference machine that is `threads` = 2. The peer
  # (PyTorch) side is pinned with torch.set_num_threads(threads) inside each suite.
  suite = importlib.import_module(f"fo_rl.benchmarks.{FLAGS.suite}")
  for row in suite.run(threads=FLAGS.threads, quick=FLAGS.quick):
    print(json.dumps(row), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
