"""Multi-process (multi-host) JAX: starting jax.distributed, and host reads of global arrays.

fo_rl runs multi-host as one global SPMD program: every process runs the same Python code on the same
host-side data (the prompt order, the verifier, the metrics are computed identically on every process),
and every jax.Array spans the devices of all processes (the meshes are built from `jax.devices()`). Each
process holds, and computes on, the rows of the batch that live on its own devices. A host read of an
array that is not fully addressable goes through `host_get` (an all-gather across processes).
"""

from __future__ import annotations

import os

import jax
import numpy as np

DISTRIBUTED_MODES = ("auto", "on", "off")


def _env(*names):
  for n in names:
    v = os.environ.get(n)
    if v not in (None, ""):
      return v
  return None


def _on_cloud_tpu_vm() -> bool:
  """True on a Cloud TPU VM (set when `import jax` found TPU chips and libtpu); no backend is started."""
  try:
    from jax._src import cloud_tpu_init

    return bool(getattr(cloud_tpu_init, "running_in_cloud_tpu_vm", False))
  except ImportError:  # pragma: no cover
    return False


def initialize(
    mode: str = "auto",
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    heartbeat_timeout_seconds: int = 100,
    initialization_timeout: int = 300,
) -> bool:
  """Start jax.distributed when the flags or the environment describe several processes. Returns
  whether it was started. Must run before anything touches a JAX backend.

  mode "off": never. "on": always (arguments left None are auto-detected by JAX: Cloud TPU pods, Slurm,
  Open MPI). "auto": when a coordinator address or a process count > 1 is given (arguments, or the
  environment: FO_RL_COORDINATOR_ADDRESS / JAX_COORDINATOR_ADDRESS, FO_RL_NUM_PROCESSES /
  JAX_NUM_PROCESSES, FO_RL_PROCESS_ID / JAX_PROCESS_ID), or on a Cloud TPU VM (where JAX detects the
  slice's hosts itself; a single-host slice is one process).

  A process that stops sending heartbeats for `heartbeat_timeout_seconds` is declared dead, and the
  others then exit with an error instead of waiting for it (see README, "Multi-host").
  """
  if mode not in DISTRIBUTED_MODES:
    raise ValueError(f"--distributed={mode!r}: must be one of {DISTRIBUTED_MODES}")
  coordinator_address = coordinator_address or _env(
      "FO_RL_COORDINATOR_ADDRESS", "JAX_COORDINATOR_ADDRESS"
  )
  if num_processes is None and _env("FO_RL_NUM_PROCESSES", "JAX_NUM_PROCESSES") is not None:
    num_processes = int(_env("FO_RL_NUM_PROCESSES", "JAX_NUM_PROCESSES"))
  if process_id is None and _env("FO_RL_PROCESS_ID", "JAX_PROCESS_ID") is not None:
    process_id = int(_env("FO_RL_PROCESS_ID", "JAX_PROCESS_ID"))
  if mode == "off":
    return False
  if mode == "auto" and not (coordinator_address or (num_processes or 1) > 1 or _on_cloud_tpu_vm()):
    return False
  if num_processes == 1 and mode == "auto" and not _on_cloud_tpu_vm():
    return False
  # Cross-process collectives of the CPU backend (tests, CPU-only clusters) go over gloo/TCP.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
      coordinator_address=coordinator_address,
      num_processes=num_processes,
      process_id=process_id,
      initialization_timeout=initialization_timeout,
      heartbeat_timeout_seconds=heartbeat_timeout_seconds,
  )
  return True


def host_get(tree):
  """jax.device_get that also works for arrays spanning several processes: a fully replicated array is
  read from a local copy, any other non-fully-addressable array is all-gathered across processes (a
  collective: every process must call host_get on the same arrays, in the same order)."""
  from jax.experimental import multihost_utils

  def one(x):
    if not isinstance(x, jax.Array) or x.is_fully_addressable:
      return jax.device_get(x)
    if x.is_fully_replicated:
      return np.asarray(x.addressable_data(0))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))

  return jax.tree.map(one, tree)
