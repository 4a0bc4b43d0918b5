"""fo_rl.common: the one unknown-key check, flatten, json_safe (both non-finite modes), the signal flag."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal

import ml_collections
import numpy as np
import pytest

from fo_rl.common import SignalFlag, flatten, from_mapping, json_safe, unknown_keys


@dataclasses.dataclass(frozen=True)
class _View:
  size: int
  name: str = "x"

  def __post_init__(self):
    if self.size < 1:
      raise ValueError(f"size must be >= 1, got {self.size}")
    if self.name == "bad":
      raise ValueError(f"sec.name={self.name!r}: not allowed")


def test_from_mapping_builds_from_dicts_and_configdicts():
  assert from_mapping(_View, {"size": 2}, "sec") == _View(2, "x")
  cd = ml_collections.ConfigDict({"size": 3, "name": "y"})
  assert from_mapping(_View, cd, "sec") == _View(3, "y")


def test_from_mapping_unknown_key_names_where_and_the_known_fields():
  with pytest.raises(ValueError) as e:
    from_mapping(_View, {"size": 2, "sise": 3}, "rl.loss")
  msg = str(e.value)
  assert msg.startswith("rl.loss: unknown field(s) ['sise']")
  assert "['name', 'size']" in msg
  with pytest.raises(ValueError, match=r"^config: unknown field\(s\) \['b'\]"):
    unknown_keys({"a": 1, "b": 2}, ("a",), "config")
  unknown_keys({"a": 1}, ("a", "c"), "config")  # a missing key is not unknown
  with pytest.raises(TypeError, match="sec: expected a mapping"):
    from_mapping(_View, [("size", 2)], "sec")


def test_from_mapping_prefixes_the_view_errors_that_do_not_name_the_section():
  with pytest.raises(ValueError, match=r"^sec: size must be >= 1, got 0$"):
    from_mapping(_View, {"size": 0}, "sec")
  with pytest.raises(ValueError, match=r"^sec\.name='bad': not allowed$"):  # already named: as is
    from_mapping(_View, {"size": 1, "name": "bad"}, "sec")


def test_flatten():
  d = {"a": {"b": 1, "c": {"d": [1, 2]}}, "e": "f"}
  assert flatten(d) == {"a.b": 1, "a.c.d": [1, 2], "e": "f"}
  assert flatten(d, "/") == {"a/b": 1, "a/c/d": [1, 2], "e": "f"}
  assert flatten({"a": {}}) == {}  # an empty section leaves no key
  assert flatten(ml_collections.ConfigDict({"x": {"y": 2}}).to_dict()) == {"x.y": 2}


def test_json_safe_null_mode():
  x = {
      "nan": math.nan,
      "inf": -math.inf,
      "f32nan": np.float32("nan"),
      "f64": np.float64(0.25),
      "i64": np.int64(3),
      "tuple": (1.5, math.inf, "s", None, True),
      "nested": [{"v": np.float32(2.0)}],
  }
  out = json_safe(x)
  assert out == {
      "nan": None,
      "inf": None,
      "f32nan": None,
      "f64": 0.25,
      "i64": 3,
      "tuple": [1.5, None, "s", None, True],
      "nested": [{"v": 2.0}],
  }
  assert type(out["f64"]) is float and type(out["i64"]) is int
  assert out["tuple"][-1] is True
  json.dumps(out, allow_nan=False)


def test_json_safe_string_mode():
  out = json_safe([1.0, math.nan, math.inf, -math.inf, [math.nan], 7, "NaN"], nonfinite="string")
  assert out == [1.0, "NaN", "Infinity", "-Infinity", ["NaN"], 7, "NaN"]
  json.dumps(out, allow_nan=False)
  with pytest.raises(ValueError, match="nonfinite"):
    json_safe(1.0, nonfinite="zero")


def test_signal_flag_sets_prints_and_restores(capsys):
  before = signal.getsignal(signal.SIGUSR1)
  flag = SignalFlag((signal.SIGUSR1,), "got signal {signum}")
  try:
    assert not flag.flag and not flag()
    os.kill(os.getpid(), signal.SIGUSR1)
    assert flag.flag and flag()
    assert capsys.readouterr().out == f"got signal {int(signal.SIGUSR1)}\n"
  finally:
    flag.restore()
  assert signal.getsignal(signal.SIGUSR1) == before


def test_signal_flag_defaults_to_sigterm_and_is_silent(capsys):
  before_term, before_int = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
  flag = SignalFlag()
  try:
    assert signal.getsignal(signal.SIGINT) == before_int  # only SIGTERM is taken
    os.kill(os.getpid(), signal.SIGTERM)
    assert flag.flag
    assert capsys.readouterr().out == ""
  finally:
    flag.restore()
  assert signal.getsignal(signal.SIGTERM) == before_term
