"""`python -m fo_rl.main --config=configs/moe_r3.py --workdir=DIR [--config.rl.mini_batches=4 ...]`"""
from __future__ import annotations

import os

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/moe_r3.py", "Run config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where config, metrics, checkpoints and plots go.")


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO; progress lines are printed
  import jax  # after absl parsed flags (XLA_FLAGS may be set by the caller)
  if os.environ.get("JAX_COORDINATOR_ADDRESS") or os.environ.get("FO_RL_NUM_PROCESSES"):
    jax.distributed.initialize()
  config = _CONFIG.value
  workdir = _WORKDIR.value or os.path.join("workdirs", os.path.splitext(
      os.path.basename(_CONFIG.value.get("name", "run") or "run"))[0])
  if config.dry_run:
    from fo_rl.parallel import dry_run
    dry_run.main(config)
    return
  from fo_rl.run import run
  summary = run(config, workdir, log=lambda s: print(s, flush=True))
  logging.info("summary: %s", summary)
  print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in summary.items()}, flush=True)


if __name__ == "__main__":
  app.run(main)
