"""`python -m fo_rl.bench --quick`: every suite runs end to end and prints well-formed rows.

The figures themselves are not asserted (speed is reported by the benchmark, never tested); what is
checked is the contract the README relies on: one JSON object per line with name / fo_rl / peer / ratio
/ unit, ratio = fo_rl / peer, and each suite's named rows."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

ROWS = {  # each suite's row names, up to the size suffix the moe and train suites add
    "moe": {"moe_fwd_bwd/blocked_vs_reference", "moe_fwd_bwd/ragged_dot_vs_reference"},
    "train": {"train_step/fo_rl_vs_torch_qwen3moe", "replay_overhead/r3_vs_live"},
    "sampler": {
        "generate/tokens_per_s",
        "generate/time_2L_over_L",
        "decode/time_2L_over_L",
        "decode/one_device_time_2L_over_L",
        "generate/one_device_vs_2",
        "generate/bfloat16_vs_float32",
        "generate/float8_e4m3fn_vs_float32",
        "generate/int8_vs_float32",
        "engine/heavy_tail_tokens_per_s",
        "engine/heavy_tail_vs_peer_tokens_per_s",
        "engine/prefill_shared_vs_repeated",
        "engine/kv_bytes_per_token",
    },
}


# Each suite runs end to end (e2e); the moe suite, seconds long, stays in the fast tier so that the
# tier reaches fo_rl/bench.py and fo_rl/benchmarks/.
@pytest.mark.parametrize(
    "suite", [pytest.param(s, marks=() if s == "moe" else pytest.mark.e2e) for s in sorted(ROWS)]
)
def test_quick_suite_prints_its_rows(suite):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)  # as a user runs it: fo_rl.bench asks XLA for `threads` CPU devices
  proc = subprocess.run(
      [sys.executable, "-m", "fo_rl.bench", f"--suite={suite}", "--quick"],
      cwd=REPO,
      env=env,
      capture_output=True,
      text=True,
      timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
  names = {r["name"] if suite == "sampler" else r["name"].rsplit("/", 1)[0] for r in rows}
  assert names == ROWS[suite], proc.stdout
  for r in rows:
    assert {"name", "fo_rl", "peer", "ratio", "unit"} <= set(r)
    assert r["cpus"] == os.cpu_count() and r["threads"] == 2
    assert r["load_before"] >= 0 and r["load_after"] >= 0
    assert r["fo_rl"] > 0 and r["peer"] > 0
    assert r["ratio"] == pytest.approx(r["fo_rl"] / r["peer"], rel=1e-3)
  if suite == "train":  # two shapes; on each the two sides' first-update losses agree (else void)
    steps = [r for r in rows if r["name"].startswith("train_step/")]
    assert len(steps) == 2 and len(rows) == 3
    for r in steps:
      assert r["loss_fo_rl"] == pytest.approx(r["loss_peer"], rel=1e-4, abs=1e-4), r
      lo, hi = r["fo_rl_s_range"]
      assert lo <= r["fo_rl_s_per_step"] <= hi
  if suite == "sampler":
    assert all(
        r["devices"] == (1 if r["name"].startswith("engine/") else 2) for r in rows
    )  # the batch is split over 2 CPU devices, one loop each (the paged engine: one device)


def test_timing_helpers_interleave_their_callables():
  """The sampler and train suites' timers (fast tier: the suites themselves are e2e) call each callable
  in turn, round after round, so that a burst of load from other processes hits every contender alike.
  """
  from fo_rl.benchmarks import common, sampler

  calls = []
  fns = {k: (lambda k=k: calls.append(k)) for k in "abc"}
  best = sampler._best_of(fns, repeats=3)
  assert calls == list("abc") * 4  # one warm-up call each, then 3 interleaved rounds
  assert set(best) == set("abc") and all(0 <= t < 1 for t in best.values())
  calls.clear()
  per = common.rounds(list(fns.values()), rounds=2, iters=3, pause=0)
  assert calls == [k for k in "abc" for _ in range(3)] * 2
  assert len(per) == 3 and all(0 <= lo <= med < 1 for lo, med in per)


@pytest.mark.parametrize(
    "before, during, cpus, threads, says",
    [
        (0.1, None, 2, 2, None),  # idle before the suite
        (1.5, None, 2, 2, "before the benchmark started"),  # another job on 2 cores
        (None, 2.0, 2, 2, None),  # the benchmark's own 2 threads
        (None, 3.2, 2, 2, "during the benchmark"),  # 2 threads + 1.2 of other work
        (None, 4.0, 8, 2, None),  # on 8 cores: 2 own + 2 others is < 0.5 per core
    ],
)
def test_load_warning(before, during, cpus, threads, says):
  from fo_rl.benchmarks.__main__ import load_warning

  msg = load_warning(before, during, cpus, threads)
  assert (msg is None) if says is None else (says in msg), msg


@pytest.mark.slow
def test_longctx_suite_memory_is_linear_with_auto_attention():
  """`--suite=longctx --quick` (2K, 4K): the rows' contract, and the compiled temporaries (deterministic)
  of the train step: `auto` (blocked on CPU from 256 positions) below `reference`, growing ~linearly where the
  reference grows ~quadratically. Times are reported, never asserted."""
  from fo_rl.benchmarks import longctx

  rows = list(longctx.run(quick=True))
  names = [r["name"] for r in rows]
  assert names == [
      "longctx/train_temp_mib/T2048",
      "longctx/train_temp_mib/T4096",
      "longctx/temp_growth_4k_over_2k",
      "longctx/train_step_seconds/T2048",
      "longctx/padding_fraction/default",
      "longctx/padding_fraction/1to5_digits",
  ]
  for r in rows:
    assert {"fo_rl", "peer", "ratio", "unit"} <= set(r) and r["fo_rl"] > 0 and r["peer"] > 0
  # the materialized scores are most of the reference's temporaries
  assert rows[0]["ratio"] < 0.5 and rows[1]["ratio"] < 0.25
  growth = rows[2]
  assert growth["fo_rl"] <= 2.2 and growth["peer"] >= 3.0
  for r in rows[4:]:  # packing never computes more padded positions, nor more micro-batches
    assert 0 < r["fo_rl"] <= r["peer"] < 1 and r["micro_batches_run"] <= r["micro_batches"]
  varied = rows[5]  # the 1-5 digit task's lengths vary: fewer micro-batches run, less padding
  assert varied["fo_rl"] < varied["peer"] and varied["micro_batches_run"] < varied["micro_batches"]
