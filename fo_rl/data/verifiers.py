"""The answer checkers of user data: `numeric`, `math` (Hugging Face `math-verify`) and `exact`.

    check = get_verifier("math")            # or "numeric", "exact"
    reward = check(response_text, "\\frac{3}{4}")   # 1.0 or 0.0

* `numeric`: the last number after the response's `####` (without one: in its last `\\boxed{}`)
  equals the reference by value (`72.0`, `1,000`, `$1000`); a non-numeric reference must equal the
  text after the marker (`fo_rl.data.jsonl.verify_numeric`).
* `math`: math-verify's equivalence of LaTeX or plain answers, by value and by expression, with
  `\\boxed{}` extraction (`fo_rl.data.math_worker.score` says exactly what is compared). It runs in a
  worker process: every answer gets at most `timeout_s` seconds (a pathological answer such as
  `\\boxed{9^{9^{9^9}}}` can make sympy run for hours); past that the worker is killed, the answer
  scores 0 and `MathVerifier.timeouts` counts it (the RL loop writes it as `verifier_timeouts`). The
  bound holds from any thread and whatever the worker is doing (math-verify's own timeout is
  `signal.alarm`, main-thread only and whole seconds).
* `exact`: the response's final answer (after its last `####`, else in its last `\\boxed{}`) equals
  the reference as text, whitespace and `$` delimiters aside.

`resolve_verifier("auto", answers)`: `numeric` when every reference answer is a plain number (what
`parse_number` reads: `72`, `-1,234.5`, `$1000`), else `math`.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import threading
import time
from typing import Callable, Iterable

from fo_rl.data import common
from fo_rl.data.jsonl import last_boxed, parse_number, verify_numeric

VERIFIERS = ("numeric", "math", "exact")
DEFAULT_TIMEOUT_S = 5.0
STARTUP_TIMEOUT_S = 120.0  # the worker's imports (sympy, antlr): not charged to any answer


def resolve_verifier(name: str, answers: Iterable[str]) -> str:
  """`name`, or for 'auto': 'numeric' if every answer is a plain number, else 'math'."""
  if name == "auto":
    return "numeric" if all(parse_number(a) is not None for a in answers) else "math"
  if name not in VERIFIERS:
    raise ValueError(f"unknown verifier {name!r}; known: {('auto',) + VERIFIERS}")
  return name


def _normal(text: str) -> str:
  return " ".join(text.strip().strip("$").split())


def verify_exact(response: object, reference: str) -> float:
  """1.0 iff the final answer (after the last `####`, else the last `\\boxed{}`) equals `reference`
  as text (whitespace normalized, `$` delimiters stripped)."""
  if not isinstance(response, str):
    return 0.0
  _, sep, tail = response.rpartition(common.ANSWER_MARKER)
  answer = tail if sep else last_boxed(response)
  if answer is None:
    return 0.0
  ref = last_boxed(reference) or reference
  return float(_normal(answer) == _normal(ref))


class MathVerifier:
  """`math-verify` in a worker process, at most `timeout_s` seconds per answer (see the module doc).

  Thread-safe (one answer at a time); the worker starts on first use and again after a timeout.
  `timeouts` counts the answers that ran out of time, `errors` those math-verify raised on."""

  def __init__(self, timeout_s: float = DEFAULT_TIMEOUT_S):
    if not timeout_s > 0:
      raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
    self.timeout_s = float(timeout_s)
    self.timeouts = 0
    self.errors = 0
    self._proc: subprocess.Popen | None = None
    self._lock = threading.Lock()

  def _start(self) -> subprocess.Popen:
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")]))
    env.pop("XLA_FLAGS", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "fo_rl.data.math_worker"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env,
        text=True,
        bufsize=1,
    )
    if self._readline(proc, STARTUP_TIMEOUT_S) is None:
      self._kill(proc)
      raise RuntimeError(
          "the math verifier's worker (python -m fo_rl.data.math_worker) did not start; is "
          "math-verify installed (pip install -r requirements.txt)?"
      )
    return proc

  @staticmethod
  def _readline(proc: subprocess.Popen, timeout: float) -> dict | None:
    """The worker's next reply, or None if none came within `timeout` seconds (or it died)."""
    deadline = time.monotonic() + timeout
    while True:
      left = deadline - time.monotonic()
      if left <= 0:
        return None
      ready, _, _ = select.select([proc.stdout], [], [], left)
      if ready:
        line = proc.stdout.readline()
        return json.loads(line) if line else None

  @staticmethod
  def _kill(proc: subprocess.Popen) -> None:
    proc.kill()
    proc.wait()
    for f in (proc.stdin, proc.stdout):
      f.close()

  def __call__(self, response: object, reference: str) -> float:
    """1.0 iff math-verify finds the response's answer equal to `reference`; 0.0 on a timeout."""
    if not isinstance(response, str):
      return 0.0
    with self._lock:
      if self._proc is None or self._proc.poll() is not None:
        self._proc = self._start()
      try:
        self._proc.stdin.write(json.dumps({"response": response, "reference": reference}) + "\n")
        self._proc.stdin.flush()
      except BrokenPipeError:
        reply = None
      else:
        reply = self._readline(self._proc, self.timeout_s)
      if reply is None:  # out of time (or the worker died on this answer): kill it, count it
        self._kill(self._proc)
        self._proc = None
        self.timeouts += 1
        return 0.0
      if "error" in reply:
        self.errors += 1
      return float(reply["score"])

  def close(self) -> None:
    with self._lock:
      if self._proc is not None:
        self._kill(self._proc)
        self._proc = None

  def __del__(self):
    try:
      self.close()
    except Exception:  # noqa: BLE001 - interpreter shutdown
      pass


_MATH: dict[float, MathVerifier] = {}


def math_verifier(timeout_s: float = DEFAULT_TIMEOUT_S) -> MathVerifier:
  """The process's `MathVerifier` for `timeout_s` (one worker shared by every task)."""
  if timeout_s not in _MATH:
    _MATH[timeout_s] = MathVerifier(timeout_s)
  return _MATH[timeout_s]


def verifier_timeouts() -> int:
  """Answers that ran out of time in this process's math verifiers so far."""
  return sum(v.timeouts for v in _MATH.values())


def get_verifier(name: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> Callable[[object, str], float]:
  """The checker `(response, reference answer) -> 0.0 | 1.0` called `name` (one of VERIFIERS)."""
  if name == "numeric":
    return verify_numeric
  if name == "exact":
    return verify_exact
  if name == "math":
    return math_verifier(timeout_s)
  raise ValueError(f"unknown verifier {name!r}; known: {VERIFIERS}")
