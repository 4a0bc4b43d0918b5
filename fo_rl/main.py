"""`python -m fo_rl.main --config=configs/moe_r3.py --workdir=DIR [--config.rl.mini_batches=4 ...]`

A user error (a bad config field or variant, bad data, a workdir started with another config: a
`fo_rl.common.UserError`) is printed as one line `fo_rl.main: error: ...` on stderr and exits with status
1; any other exception keeps its traceback."""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from fo_rl.common import UserError

_CONFIG = config_flags.DEFINE_config_file(
    "config", "configs/moe_r3.py", "Run config file.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where config, metrics, checkpoints and plots go.")
# Multi-process runs (fo_rl/parallel/multihost.py): every process runs this same command.
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed",
    "auto",
    ["auto", "on", "off"],
    "Start jax.distributed: auto = when a coordinator / several processes are given (flags or env) or on a "
    "Cloud TPU VM; on = always (unset values auto-detected by JAX); off = never.",
)
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address",
    None,
    "host:port of process 0 (env FO_RL_COORDINATOR_ADDRESS or "
    "JAX_COORDINATOR_ADDRESS); not needed on Cloud TPU.",
)
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "Number of processes (env FO_RL_NUM_PROCESSES or JAX_NUM_PROCESSES)."
)
_PROCESS_ID = flags.DEFINE_integer(
    "process_id",
    None,
    "This process's index in [0, num_processes) (env FO_RL_PROCESS_ID or " "JAX_PROCESS_ID).",
)
_HEARTBEAT = flags.DEFINE_integer(
    "heartbeat_timeout_seconds",
    100,
    "A process silent for this long is declared dead and the others "
    "exit with an error instead of hanging.",
)
_INIT_TIMEOUT = flags.DEFINE_integer(
    "initialization_timeout", 300, "Seconds to wait for every process to join."
)


PROG = "fo_rl.main"


def _user_error(e: BaseException) -> UserError | None:
  """The UserError in `e`'s chain of causes / contexts, if any."""
  seen = set()
  while e is not None and id(e) not in seen:
    if isinstance(e, UserError):
      return e
    seen.add(id(e))
    e = e.__cause__ or e.__context__
  return None


def _exit_error(message: str) -> None:
  print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)
  sys.exit(1)


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing (app.run's flags_parser) with one-line errors: a config file's UserError (an
  unknown variant), an override of a field the config does not have, and leftover positional
  arguments (an override written without `--config.`)."""
  try:
    rest = flags.FLAGS(argv)
  except flags.Error as e:  # absl's own: a bad flag value, an unknown flag, a failing config file
    # config_flags re-raises a config file's error as its type with the traceback quoted in the
    # message: keep the original message (the last line).
    ue = _user_error(e)
    lines = [ln for ln in str(ue if ue is not None else e).splitlines() if ln.strip()]
    tag = f"{UserError.__module__}.{UserError.__name__}: "
    if lines and lines[-1].startswith(tag):
      _exit_error(lines[-1][len(tag) :])
    _exit_error(str(ue if ue is not None else e))
  except Exception as e:  # noqa: BLE001 - raised while loading the config file or an override
    ue = _user_error(e)
    if ue is not None:
      _exit_error(str(ue))
    if not isinstance(e, (KeyError, AttributeError)):
      raise
    key = str(e).strip("'\"")
    given = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")]
    hits = [a for a in given if key in a.split(".")[1:]] or given
    _exit_error(f"{' / '.join(hits)}: the config has no field {key!r} (see fo_rl/config.py)")
  if len(rest) > 1:
    _exit_error(
        f"unexpected positional argument(s) {rest[1:]}: overrides are flags, e.g. "
        f"--config.rl.steps=10"
    )
  return rest


def main(argv):
  try:
    return _main(argv)
  except Exception as e:  # noqa: BLE001 - only the project's user errors are shortened
    if isinstance(e, UserError):
      print(f"{PROG}: error: {e}", file=sys.stderr, flush=True)
      return 1
    raise


def _main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(
        logging.WARNING
    )  # orbax logs every save at INFO; progress lines are printed
  import jax  # after absl parsed flags (XLA_FLAGS may be set by the caller)

  config = _CONFIG.value
  if not config.dry_run:  # the dry run compiles for a topology from one process
    from fo_rl.parallel import multihost

    multihost.initialize(
        _DISTRIBUTED.value,
        _COORDINATOR.value,
        _NUM_PROCESSES.value,
        _PROCESS_ID.value,
        heartbeat_timeout_seconds=_HEARTBEAT.value,
        initialization_timeout=_INIT_TIMEOUT.value,
    )
    if jax.process_count() > 1:
      print(
          f"process {jax.process_index()}/{jax.process_count()}: {jax.local_device_count()} of "
          f"{jax.device_count()} devices",
          flush=True,
      )
  workdir = _WORKDIR.value or os.path.join(
      "workdirs", os.path.splitext(os.path.basename(_CONFIG.value.get("name", "run") or "run"))[0]
  )
  if config.dry_run:
    from fo_rl import dry_run

    dry_run.main(config)
    return
  from fo_rl.run import run

  summary = run(config, workdir, log=lambda s: print(s, flush=True))
  logging.info("summary: %s", summary)
  print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in summary.items()}, flush=True)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
