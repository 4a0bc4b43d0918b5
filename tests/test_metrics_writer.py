"""Tests for fo_rl.metrics_writer and fo_rl.plots."""

import glob
import json
import math
import os
import struct
import subprocess
import sys
import textwrap

import jax.numpy as jnp
import numpy as np
import pytest

from fo_rl.metrics_writer import MetricsWriter, read_metrics
from fo_rl.plots import plot_curves

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _strict_lines(path):
  """Every line must be strict JSON (no bare NaN / Infinity tokens)."""

  def bad_constant(c):
    raise ValueError(f"non-strict JSON constant {c}")

  with open(path) as f:
    return [json.loads(line, parse_constant=bad_constant) for line in f]


def _tb_scalars(tb_dir):
  """{tag: [(step, value)]} and purge steps, parsed from the event files
  (TFRecord framing + tensorboardX's Event proto; no TensorFlow)."""
  from tensorboardX.proto import event_pb2

  scalars, purges = {}, []
  for fn in sorted(glob.glob(os.path.join(tb_dir, "events.out.tfevents.*"))):
    data = open(fn, "rb").read()
    pos = 0
    while pos + 12 <= len(data):
      (length,) = struct.unpack("<Q", data[pos : pos + 8])
      rec = data[pos + 12 : pos + 12 + length]
      pos += 12 + length + 4
      ev = event_pb2.Event()
      ev.ParseFromString(rec)
      if ev.HasField("session_log") and ev.session_log.status == ev.session_log.START:
        purges.append(ev.step)
      for v in ev.summary.value:
        scalars.setdefault(v.tag, []).append((ev.step, v.simple_value))
  return scalars, purges


def test_write_read_roundtrip_and_tensorboard(tmp_path):
  w = MetricsWriter(tmp_path, enabled=True)
  w.write(
      1,
      {
          "reward_mean": jnp.float32(0.25),
          "loss": np.float64(1.5),
          "count": np.int32(7),
          "flag": np.bool_(True),
          "lr": 1e-3,
          "eval": {"greedy_accuracy": jnp.array(0.5)},
          "hist": np.arange(3),
          "name": "run-a",
      },
  )
  w.write(2, {"reward_mean": 0.5, "loss": float("nan"), "kl": jnp.inf, "neg": -np.inf})
  # flushed per write: visible before close
  rows = read_metrics(tmp_path / "metrics.jsonl")
  assert [r["step"] for r in rows] == [1, 2]
  w.close()

  lines = _strict_lines(tmp_path / "metrics.jsonl")
  assert lines[0] == {
      "step": 1,
      "reward_mean": 0.25,
      "loss": 1.5,
      "count": 7,
      "flag": True,
      "lr": 1e-3,
      "eval/greedy_accuracy": 0.5,
      "hist": [0, 1, 2],
      "name": "run-a",
  }
  assert isinstance(lines[0]["count"], int) and isinstance(lines[0]["reward_mean"], float)
  assert (
      lines[1]["loss"] == "NaN" and lines[1]["kl"] == "Infinity" and lines[1]["neg"] == "-Infinity"
  )

  rows = read_metrics(tmp_path)  # workdir also accepted
  assert math.isnan(rows[1]["loss"]) and rows[1]["kl"] == math.inf and rows[1]["neg"] == -math.inf

  events = glob.glob(str(tmp_path / "tb" / "events.out.tfevents.*"))
  assert events and all(os.path.getsize(e) > 0 for e in events)
  scalars, _ = _tb_scalars(tmp_path / "tb")
  assert scalars["reward_mean"] == [(1, 0.25), (2, 0.5)]
  assert scalars["eval/greedy_accuracy"] == [(1, 0.5)]
  assert "name" not in scalars and "hist" not in scalars
  assert math.isnan(scalars["loss"][1][1])


def test_disabled_writes_nothing(tmp_path):
  d = tmp_path / "run"
  w = MetricsWriter(d, enabled=False)
  w.write(1, {"a": 1.0})
  assert w.truncate_after(0) == 0
  w.close()
  assert not d.exists()


def test_default_enabled_is_process_zero(tmp_path):
  w = MetricsWriter(tmp_path, tensorboard=False)  # single process -> index 0
  assert w.enabled
  w.close()


@pytest.mark.parametrize("how", ["constructor", "method"])
def test_truncate_after_resume(tmp_path, how):
  with MetricsWriter(tmp_path, enabled=True) as w:
    for s in range(1, 11):
      w.write(s, {"reward_mean": float(s)})
  # Resume from a checkpoint at step 6: steps 7..10 must disappear.
  if how == "constructor":
    w = MetricsWriter(tmp_path, enabled=True, resume_step=6)
  else:
    w = MetricsWriter(tmp_path, enabled=True)
    assert w.truncate_after(6) == 4
  assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4, 5, 6]
  for s in range(7, 13):
    w.write(s, {"reward_mean": 100.0 + s})
  w.close()
  rows = read_metrics(tmp_path)
  steps = [r["step"] for r in rows]
  assert steps == list(range(1, 13)) and len(set(steps)) == len(steps)
  assert rows[6]["reward_mean"] == 107.0
  # TensorBoard: a purge marker at 7 hides the stale 7..10 of the first run.
  _, purges = _tb_scalars(tmp_path / "tb")
  assert 7 in purges


def test_sigkill_loses_at_most_current_line_and_torn_tail_is_repaired(tmp_path):
  script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {REPO!r})
        from fo_rl.metrics_writer import MetricsWriter
        w = MetricsWriter({str(tmp_path)!r}, enabled=True, tensorboard=False)
        for s in range(5):
            w.write(s, {{"x": s * 1.0}})
        os.kill(os.getpid(), signal.SIGKILL)
    """)
  p = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
  assert p.returncode == -9, p.stderr[-2000:]
  assert [r["step"] for r in read_metrics(tmp_path)] == [0, 1, 2, 3, 4]

  # Simulate a kill in the middle of a line.
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 5, "x": 5.')
  assert [r["step"] for r in read_metrics(tmp_path)] == [0, 1, 2, 3, 4]
  with MetricsWriter(tmp_path, enabled=True, tensorboard=False) as w:
    w.write(5, {"x": 5.0})
  assert [r["step"] for r in read_metrics(tmp_path)] == [0, 1, 2, 3, 4, 5]
  _strict_lines(tmp_path / "metrics.jsonl")


def _fake_rows(n=40):
  rows = []
  for s in range(1, n + 1):
    r = {
        "step": s,
        "reward_mean": 0.1 + 0.01 * s,
        "entropy": 1.0 / s,
        "train_infer_kl": 1e-3 * (1 + np.sin(s)),
        "clip_frac_high": 0.01,
        "clip_frac_low": 0.002 * (s % 3),
    }
    if s % 10 == 0:
      r["eval/greedy_accuracy"] = 0.3 + 0.01 * s
      r["eval/mean_accuracy"] = 0.25 + 0.01 * s
    if s == 13:
      r["entropy"] = float("nan")  # skipped, not a crash
    rows.append(r)
  return rows


def test_plot_curves_full(tmp_path):
  import matplotlib.image as mpimg

  out = plot_curves(_fake_rows(), tmp_path / "plots" / "curves.png", title="run")
  assert out == str(tmp_path / "plots" / "curves.png")
  assert os.path.getsize(out) > 10_000
  with open(out, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  img = mpimg.imread(out)
  h, w = img.shape[:2]
  assert 400 <= h <= 2000 and 800 <= w <= 3000
  assert img[..., :3].std() > 0.01  # not a blank image


def test_plot_curves_missing_keys_and_jsonl_input(tmp_path):
  with MetricsWriter(tmp_path, enabled=True, tensorboard=False) as w:
    for s in range(5):
      w.write(s, {"reward_mean": s * 0.1, "clip_frac_high": float("nan")})
  out = plot_curves(tmp_path / "metrics.jsonl", tmp_path / "curves.png")
  assert os.path.getsize(out) > 5_000
  # custom key names + empty input
  out2 = plot_curves(
      [], tmp_path / "empty.png", keys={"reward": ("my_reward",), "kl": ("my_kl", "other")}
  )
  assert os.path.getsize(out2) > 1_000
  assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp.png")]
