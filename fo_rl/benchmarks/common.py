"""Timing helpers shared by the benchmark suites."""

from __future__ import annotations

import statistics
import time

import jax


def time_jax(fn, *args, repeats: int = 5, warmup: int = 1) -> float:
  """Median seconds per call of a jitted fn (outputs blocked on)."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  times.sort()
  return times[len(times) // 2]


def time_call(fn, repeats: int = 5, warmup: int = 1) -> float:
  """Median seconds per call of a plain Python callable."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  times.sort()
  return times[len(times) // 2]


def interleaved(fns, rounds: int, iters: int, pause: float = 0.05) -> list[list[float]]:
  """fns: callables running one blocking step each. Interleaved rounds -> per fn its seconds per step
  in each round."""
  per = [[] for _ in fns]
  for _ in range(rounds):
    for i, fn in enumerate(fns):
      time.sleep(pause)
      t0 = time.perf_counter()
      for _ in range(iters):
        fn()
      per[i].append((time.perf_counter() - t0) / iters)
  return per


def rounds(fns, rounds: int, iters: int, pause: float = 0.05):
  """fns: callables running one blocking step each. Interleaved rounds -> per fn (best, median) s/step."""
  return [(min(p), statistics.median(p)) for p in interleaved(fns, rounds, iters, pause)]


def row(name: str, fo_rl: float, peer: float, unit: str, **extra) -> dict:
  """One benchmark line; ratio = fo_rl / peer in `unit` (higher-is-better units say so in the name)."""
  return {
      "name": name,
      "fo_rl": round(fo_rl, 6),
      "peer": round(peer, 6),
      "ratio": round(fo_rl / peer, 4) if peer else None,
      "unit": unit,
      **extra,
  }
