"""Multi-process runs on localhost: 2 processes x 4 CPU devices (jax.distributed + gloo) against 1 x 8.

The 2-process run is the global SPMD program of fo_rl/parallel/multihost.py: same data on every process,
global arrays over all 8 devices, host reads through process_allgather, metrics written by process 0.
Its metrics.jsonl must match a 1-process x 8-device run of the same config (up to the order of
cross-process float reductions), and a killed process must make the other one exit with an error
within a bounded time instead of hanging.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

pytestmark = pytest.mark.multiprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The tiny default recipe (MoE, R3, N = 4, FP8 sampler), made cheaper: no cold start; evaluation reuses the
# training batch's compiled sampler (4 prompts x 4 samples).
OVERRIDES = (
    "--config.sft.enabled=False",
    "--config.eval.num_prompts=4",
    "--config.eval.samples=4",
    "--config.eval.every=2",
)
TIMING = ("tokens_per_second", "step_seconds")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(devices: int) -> dict:
  env = dict(os.environ)
  env.update(
      XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
      JAX_PLATFORMS="cpu",
      PYTHONUNBUFFERED="1",
      PYTHONFAULTHANDLER="1",
  )  # SIGABRT on a timeout dumps every thread
  for k in (
      "JAX_COORDINATOR_ADDRESS",
      "JAX_NUM_PROCESSES",
      "JAX_PROCESS_ID",
      "FO_RL_COORDINATOR_ADDRESS",
      "FO_RL_NUM_PROCESSES",
      "FO_RL_PROCESS_ID",
  ):
    env.pop(k, None)
  return env


def _launch(workdir, num_processes: int, devices: int, extra=(), log_dir=None):
  port = _free_port()
  procs = []
  for i in range(num_processes):
    cmd = [
        sys.executable,
        "-m",
        "fo_rl.main",
        "--config=configs/moe_r3.py:tiny",
        f"--workdir={workdir}",
        *OVERRIDES,
        *extra,
    ]
    if num_processes > 1:
      cmd += [
          f"--coordinator_address=127.0.0.1:{port}",
          f"--num_processes={num_processes}",
          f"--process_id={i}",
      ]
    log = open(os.path.join(log_dir or workdir + "_logs", f"p{i}.log"), "w")
    procs.append(
        (
            subprocess.Popen(
                cmd, cwd=ROOT, env=_env(devices), stdout=log, stderr=subprocess.STDOUT
            ),
            log,
        )
    )
  return procs


def _wait(procs, timeout: float):
  deadline = time.time() + timeout
  codes = []
  for p, log in procs:
    try:
      codes.append(p.wait(timeout=max(deadline - time.time(), 1)))
    except subprocess.TimeoutExpired:
      for q, _ in procs:  # Python stacks of every thread into the logs, then kill
        q.send_signal(signal.SIGABRT)
      time.sleep(3)
      for q, _ in procs:
        q.kill()
      raise
    finally:
      log.close()
  return codes


def _read(path):
  with open(path) as f:
    return f.read()


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


def test_two_processes_match_one_process(tmp_path):
  one, two = str(tmp_path / "one"), str(tmp_path / "two")
  for d in (one + "_logs", two + "_logs"):
    os.makedirs(d)
  t0 = time.time()
  # Both jobs at once: each is mostly single-threaded compilation.
  runs = {one: _launch(one, 1, 8), two: _launch(two, 2, 4)}
  for workdir, procs in runs.items():
    codes = _wait(procs, timeout=600)
    logs = "\n".join(
        _read(os.path.join(workdir + "_logs", f"p{i}.log"))[-3000:] for i in range(len(procs))
    )
    assert codes == [0] * len(procs), logs
  print(f"1x8 and 2x4 runs: {time.time() - t0:.0f}s")
  log0 = _read(os.path.join(two + "_logs", "p0.log"))
  assert "process 0/2: 4 of 8 devices" in log0
  a, b = _rows(one), _rows(two)
  assert [r["step"] for r in a] == [r["step"] for r in b] == [0, 1, 2]
  for ra, rb in zip(a, b):
    assert sorted(ra) == sorted(rb)
    for k in ra:
      if k in TIMING or k == "step":
        continue
      np.testing.assert_allclose(
          rb[k], ra[k], rtol=2e-3, atol=1e-6, err_msg=f"step {ra['step']} {k}"
      )
  # Only process 0 writes metrics, the summary and the plot; orbax checkpointed from both.
  assert os.path.exists(os.path.join(two, "summary.json"))
  assert sorted(os.listdir(os.path.join(two, "checkpoints"))) == ["1", "2"]
  assert "entropy" in a[1] and "loss" in a[1] and "router_disagreement_per_token" in a[1]


def test_dead_peer_makes_the_other_exit(tmp_path):
  workdir = str(tmp_path / "w")
  os.makedirs(workdir + "_logs")
  # Many steps: the run is still going when process 1 is killed.
  procs = _launch(workdir, 2, 4, extra=("--config.rl.steps=50", "--heartbeat_timeout_seconds=10"))
  (p0, log0), (p1, log1) = procs
  log_path = os.path.join(workdir + "_logs", "p0.log")
  deadline = time.time() + 400
  while "step 1/50" not in _read(log_path):
    assert p0.poll() is None and p1.poll() is None, _read(log_path)
    assert time.time() < deadline, "the 2-process run did not reach step 1"
    time.sleep(1)
  p1.send_signal(signal.SIGKILL)
  t_kill = time.time()
  try:
    code = p0.wait(timeout=120)
  except subprocess.TimeoutExpired:
    p0.kill()
    pytest.fail("process 0 still running 120 s after its peer died")
  finally:
    log0.close()
    log1.close()
  elapsed = time.time() - t_kill
  out = _read(log_path)
  assert code != 0, out[-3000:]
  assert elapsed < 120
  # JAX's coordination service: "Terminating process because the JAX distributed service detected fatal
  # errors. This most likely indicates that another task died ... The following tasks are unhealthy
  # (stopped sending heartbeats): 1" (or a collective that fails first on the broken connection).
  assert any(
      s in out
      for s in (
          "another task died",
          "stopped sending heartbeats",
          "Connection reset",
          "Connection closed",
          "Gloo",
      )
  ), out[-3000:]
  print(f"process 0 exited with {code} {elapsed:.0f}s after its peer was killed")
