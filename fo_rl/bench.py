"""`python -m fo_rl.bench`: the short name of `python -m fo_rl.benchmarks` (fo_rl/benchmarks/__main__.py)."""

import sys

from fo_rl.benchmarks.__main__ import main

if __name__ == "__main__":
  sys.exit(main())
