"""Plain-Python helpers shared by the config views, the jobs and the writers (imports nothing from fo_rl).

* `from_mapping(cls, d, where)`: a frozen dataclass from a dict / ConfigDict section, and
  `unknown_keys(d, known, where)`: the one unknown-key check of the configuration.
* `flatten(d, sep)`: nested mappings -> one level of `a<sep>b` keys (config.json, metrics rows).
* `json_safe(x, nonfinite)`: a value made strict JSON (non-finite floats -> null or "NaN" strings).
* `SignalFlag`: SIGTERM / SIGINT turned into a flag the job polls at its next step boundary.
* `UserError`: a problem with the user's input (config, data, workdir, checkpoint); `fo_rl.main` prints
  it as one line and exits with status 1 (any other exception keeps its traceback).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import signal
from collections.abc import Mapping
from typing import Any

__all__ = [
    "UserError",
    "unknown_keys",
    "from_mapping",
    "flatten",
    "json_safe",
    "SignalFlag",
    "NONFINITE_STRINGS",
]


class UserError(ValueError):
  """A problem with the user's input (a config field, a data file and line, the workdir, a checkpoint);
  its message names what to change. `fo_rl.main` prints it as one line (no traceback) and exits 1.
  """


def unknown_keys(d: Mapping[str, Any], known, where: str) -> None:
  """A ValueError naming `where`, the keys of `d` that are not in `known`, and the known ones."""
  unknown = sorted(set(d) - set(known))
  if unknown:
    raise UserError(f"{where}: unknown field(s) {unknown}; known fields: {sorted(known)}")


def from_mapping(cls, d: Mapping[str, Any] | Any, where: str):
  """`cls(**d)` for a dataclass `cls` and a plain dict or ml_collections ConfigDict section `d`.

  A key that is not a field of `cls` is a ValueError naming `where` and the known fields. A ValueError
  raised by `cls` itself is prefixed with `where` unless its message already starts with it (the views
  name their fields `where.field=...`); either way it is a `UserError`."""
  if hasattr(d, "to_dict"):  # ml_collections.ConfigDict / FrozenConfigDict
    d = d.to_dict()
  if not isinstance(d, Mapping):
    raise TypeError(f"{where}: expected a mapping or a ConfigDict, got {type(d).__name__}")
  unknown_keys(d, [f.name for f in dataclasses.fields(cls) if f.init], where)
  try:
    return cls(**d)
  except ValueError as e:
    if str(e).startswith(where):
      raise UserError(str(e)) from None
    raise UserError(f"{where}: {e}") from None


def flatten(d: Mapping[str, Any], sep: str = ".", prefix: str = "") -> dict[str, Any]:
  """`{"a": {"b": 1}, "c": 2}` -> `{"a<sep>b": 1, "c": 2}` (nested mappings only; lists stay values)."""
  out: dict[str, Any] = {}
  for k, v in d.items():
    key = f"{prefix}{k}"
    if isinstance(v, Mapping):
      out.update(flatten(v, sep, key + sep))
    else:
      out[key] = v
  return out


NONFINITE_STRINGS = {"nan": "NaN", "inf": "Infinity", "-inf": "-Infinity"}


def json_safe(x: Any, nonfinite: str = "null") -> Any:
  """`x` with every non-finite float replaced, so that `json.dumps(..., allow_nan=False)` accepts it.

  nonfinite: "null" -> None (results.json: a missing statistic); "string" -> the strings "NaN",
  "Infinity", "-Infinity" (metrics.jsonl: a NaN loss stays distinguishable from a missing value, and
  `read_metrics` turns them back). Mappings, lists and tuples are converted recursively (tuples become
  lists); numpy scalars become Python numbers (numpy registers them as `numbers.Integral` / `Real`).
  """
  if nonfinite not in ("null", "string"):
    raise ValueError(f"json_safe: nonfinite={nonfinite!r}: must be 'null' or 'string'")
  if isinstance(x, bool) or x is None or isinstance(x, str):
    return x
  if isinstance(x, Mapping):
    return {k: json_safe(v, nonfinite) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [json_safe(v, nonfinite) for v in x]
  if isinstance(x, numbers.Integral) and not isinstance(x, int):
    return int(x)
  if isinstance(x, numbers.Real) and not isinstance(x, (int, float)):
    x = float(x)
  if isinstance(x, float) and not math.isfinite(x):
    if nonfinite == "null":
      return None
    return NONFINITE_STRINGS[repr(float(x))]
  if isinstance(x, float) and type(x) is not float:  # a float subclass (np.float64): a plain float
    return float(x)
  return x


class SignalFlag:
  """`flag` turns True when one of `signals` arrives (the handler only sets it; the job polls it at a
  step boundary, checkpoints and exits). `restore()` puts the previous handlers back.

  message: printed (flushed) on each signal, formatted with `signum`, e.g.
  `"paper: signal {signum}: stopping ..."`; None prints nothing. Must be created on the main
  thread (Python delivers signals there)."""

  def __init__(self, signals=(signal.SIGTERM,), message: str | None = None):
    self.flag = False
    self.message = message
    self._old = {s: signal.signal(s, self._handle) for s in signals}

  def _handle(self, signum, frame):
    del frame
    self.flag = True
    if self.message is not None:
      print(self.message.format(signum=signum), flush=True)

  def __call__(self) -> bool:
    return self.flag

  def restore(self) -> None:
    for s, h in self._old.items():
      signal.signal(s, h)
