"""Scalar metrics logging: `<workdir>/metrics.jsonl` + TensorBoard events.

* One JSON object per line: `{"step": <int>, "<key>": <value>, ...}`.
  Nested dicts are flattened with '/' (`{"eval": {"acc": 1}}` ->
  `"eval/acc"`). jax / numpy scalars (and size-1 arrays) become Python
  floats (ints / bools for integer / bool dtypes); larger arrays are written
  as (nested) lists to the jsonl only; strings are written to the jsonl only.
* Non-finite floats are written as the JSON *strings* `"NaN"`,
  `"Infinity"` and `"-Infinity"` (the file stays strict JSON, and a NaN
  loss stays distinguishable from a missing value). `read_metrics`
  turns them back into `float('nan')` / `±inf`. TensorBoard gets the raw
  float (it displays NaN / inf natively).
* Every `write` is flushed to the OS (optionally fsync'ed), so a SIGKILL
  loses at most the line being written; a torn last line left by a kill is
  dropped on the next open (and ignored by `read_metrics`).
* TensorBoard scalars go to `<workdir>/tb/` via `tensorboardX` (no
  TensorFlow needed), flushed on every `write`.
* Resume: `MetricsWriter(workdir, resume_step=s)` or
  `writer.truncate_after(s)` drops every jsonl line with `step > s` and
  makes TensorBoard hide events with `step > s` (tensorboardX
  `purge_step=s + 1`), so a run resumed from the checkpoint at step `s`
  does not duplicate steps.
* Only the writer with `enabled=True` (default: `jax.process_index() == 0`)
  touches the filesystem; disabled writers are no-ops.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import os
from typing import Any, Iterable, Mapping

import numpy as np

from fo_rl.common import flatten, json_safe

__all__ = ["MetricsWriter", "read_metrics", "METRICS_FILENAME"]

log = logging.getLogger(__name__)

METRICS_FILENAME = "metrics.jsonl"
TB_SUBDIR = "tb"

_STR_TO_NONFINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


# ---------------------------------------------------------------------------
# value conversion
# ---------------------------------------------------------------------------


def _to_host(x: Any) -> Any:
  """jax.Array -> numpy (works for fully replicated multi-host arrays too)."""
  try:
    import jax
  except ImportError:  # pragma: no cover
    return x
  if isinstance(x, jax.Array):
    if not x.is_fully_addressable:
      if not x.is_fully_replicated:
        raise ValueError(
            "cannot log a metric sharded across hosts; " "replicate it (or reduce it) first"
        )
      x = x.addressable_data(0)
    return np.asarray(x)
  return x


def _scalar(x: Any) -> Any:
  """Python bool / int / float / str for scalar-like x, else a list or None."""
  x = _to_host(x)
  if isinstance(x, (bool, np.bool_)):
    return bool(x)
  if isinstance(x, (numbers.Integral, np.integer)):
    return int(x)
  if isinstance(x, (numbers.Real, np.floating)):
    return float(x)
  if isinstance(x, str):
    return x
  if isinstance(x, np.ndarray):
    if x.size == 1:
      return _scalar(x.reshape(()).item())
    return x.tolist()
  if isinstance(x, (list, tuple)):
    return [_scalar(v) for v in x]
  return None


def _decode(v: Any) -> Any:
  if isinstance(v, str):
    return _STR_TO_NONFINITE.get(v, v)
  if isinstance(v, list):
    return [_decode(u) for u in v]
  return v


# ---------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------


def _iter_lines(path: str) -> Iterable[tuple[str, bool]]:
  """(line, complete) pairs; complete=False only for a torn last line."""
  with open(path, "r", encoding="utf-8") as f:
    for line in f:
      yield line, line.endswith("\n")


def _parse(line: str) -> dict | None:
  try:
    row = json.loads(line)
  except json.JSONDecodeError:
    return None
  return row if isinstance(row, dict) else None


def read_metrics(path: str | os.PathLike) -> list[dict]:
  """Rows of a metrics.jsonl (or of `<path>/metrics.jsonl` for a workdir).

  "NaN" / "Infinity" / "-Infinity" strings are decoded back to floats;
  malformed lines (e.g. a line torn by a SIGKILL) are skipped. Missing file
  -> [].
  """
  path = os.fspath(path)
  if os.path.isdir(path):
    path = os.path.join(path, METRICS_FILENAME)
  if not os.path.exists(path):
    return []
  rows = []
  for i, (line, _) in enumerate(_iter_lines(path)):
    if not line.strip():
      continue
    row = _parse(line)
    if row is None:
      log.warning("%s:%d: skipping malformed metrics line", path, i + 1)
      continue
    rows.append({k: _decode(v) for k, v in row.items()})
  return rows


# ---------------------------------------------------------------------------
# writer
# ---------------------------------------------------------------------------


class MetricsWriter:
  """Append-only jsonl + TensorBoard scalar writer (see module docstring).

  Args:
    workdir: run directory; creates `metrics.jsonl` and `tb/` inside.
    enabled: write anything at all; default `jax.process_index() == 0`.
    resume_step: if given, same as calling `truncate_after` right away.
    tensorboard: also write TensorBoard event files.
    fsync: `os.fsync` after every line (survives machine crashes, not just
      process kills; slower on network filesystems).
  """

  def __init__(
      self,
      workdir: str | os.PathLike,
      enabled: bool | None = None,
      *,
      resume_step: int | None = None,
      tensorboard: bool = True,
      fsync: bool = False,
  ):
    if enabled is None:
      import jax

      enabled = jax.process_index() == 0
    self.workdir = os.fspath(workdir)
    self.enabled = bool(enabled)
    self.path = os.path.join(self.workdir, METRICS_FILENAME)
    self.tb_dir = os.path.join(self.workdir, TB_SUBDIR)
    self._use_tb = tensorboard
    self._fsync = fsync
    self._file = None
    self._tb = None
    if not self.enabled:
      return
    os.makedirs(self.workdir, exist_ok=True)
    self._repair_torn_tail()
    if resume_step is not None:
      self._truncate_file(resume_step)
    self._file = open(self.path, "a", encoding="utf-8")
    self._open_tb(None if resume_step is None else int(resume_step) + 1)

  # -- internals -----------------------------------------------------------

  def _open_tb(self, purge_step: int | None) -> None:
    if not self._use_tb:
      return
    from tensorboardX import SummaryWriter

    self._tb = SummaryWriter(logdir=self.tb_dir, purge_step=purge_step, flush_secs=30)

  def _repair_torn_tail(self) -> None:
    """Drop a partial last line (no trailing newline) left by a kill."""
    if not os.path.exists(self.path):
      return
    with open(self.path, "rb+") as f:
      f.seek(0, os.SEEK_END)
      size = f.tell()
      if size == 0:
        return
      f.seek(size - 1)
      if f.read(1) == b"\n":
        return
      # Find the last newline and truncate after it.
      pos = size - 1
      chunk = 4096
      while pos > 0:
        start = max(0, pos - chunk)
        f.seek(start)
        buf = f.read(pos - start)
        nl = buf.rfind(b"\n")
        if nl >= 0:
          f.truncate(start + nl + 1)
          log.warning("%s: dropped a torn last line", self.path)
          return
        pos = start
      f.truncate(0)

  def _truncate_file(self, step: int) -> int:
    if not os.path.exists(self.path):
      return 0
    kept, dropped = [], 0
    for line, complete in _iter_lines(self.path):
      if not line.strip():
        continue
      row = _parse(line) if complete else None
      if row is None or not isinstance(row.get("step"), (int, float)) or row["step"] > step:
        dropped += 1
        continue
      kept.append(line)
    tmp = self.path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
      f.writelines(kept)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, self.path)  # atomic: a kill leaves the old or new file
    return dropped

  # -- public API ----------------------------------------------------------

  def truncate_after(self, step: int) -> int:
    """Drop metrics with `step > step` (and hide them in TensorBoard).

    Call when resuming from the checkpoint at `step`. Returns the number of
    jsonl lines dropped (0 when disabled).
    """
    if not self.enabled:
      return 0
    step = int(step)
    if self._file is not None:
      self._file.close()
    dropped = self._truncate_file(step)
    self._file = open(self.path, "a", encoding="utf-8")
    if self._tb is not None:
      self._tb.close()
    self._open_tb(step + 1)
    return dropped

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    """Append `{"step": step, **metrics}` and log scalars to TensorBoard."""
    if not self.enabled:
      return
    if self._file is None:
      raise RuntimeError("MetricsWriter is closed")
    step = int(step)
    row: dict[str, Any] = {"step": step}
    for k, v in flatten(metrics, "/").items():
      if k == "step":
        continue
      conv = _scalar(v)
      if conv is None:
        log.warning("metric %r of type %s is not loggable; skipped", k, type(v).__name__)
        continue
      row[k] = conv
    line = json.dumps(json_safe(row, nonfinite="string"), allow_nan=False)
    self._file.write(line + "\n")
    self._file.flush()
    if self._fsync:
      os.fsync(self._file.fileno())
    if self._tb is not None:
      for k, v in row.items():
        if k != "step" and isinstance(v, (int, float)):  # bools log as 0/1
          self._tb.add_scalar(k, float(v), global_step=step)
      self._tb.flush()

  def flush(self) -> None:
    if self._file is not None:
      self._file.flush()
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
      self._file = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None

  def __enter__(self) -> "MetricsWriter":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
