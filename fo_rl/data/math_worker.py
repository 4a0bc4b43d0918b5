"""The `math` verifier's worker process: Hugging Face `math-verify` on one answer at a time.

    python -m fo_rl.data.math_worker     # stdin: JSON lines {"response", "reference"}; stdout: {"score"}

`fo_rl.data.verifiers.MathVerifier` starts it and bounds the time of every answer from outside (a
pathological answer gets the process killed and restarted, and is counted), so this module runs
math-verify with its own signal-based timeouts off. It prints `{"ready": true}` once imported.

`score` is the comparison itself:
* the response's answer is the text after its last `####` marker when it has one, else the whole
  response; math-verify extracts from it the last `\\boxed{}` first (priority 0), then a LaTeX or
  plain expression after "answer"/"final answer is", then any LaTeX or number;
* the reference (the record's final answer) is parsed as LaTeX (wrapped in `$...$` unless it has
  `$` or `\\boxed` already) or as a plain expression;
* equal when math-verify finds them equal: by value (`0.75 = \\frac{3}{4} = 3/4`) or by expression
  (`(x+1)^2 = x^2+2x+1`), sets, intervals, tuples and equations as math-verify compares them.

Nothing of the response is executed: LaTeX goes through latex2sympy's ANTLR grammar, and the plain
expressions math-verify hands to sympy's parser match a regex of digits, spaces and the arithmetic
operators `+-*/^()` only.
"""

from __future__ import annotations

import json
import logging
import sys

from fo_rl.data.common import ANSWER_MARKER

_PARSERS = None


def _configs():
  global _PARSERS
  if _PARSERS is None:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig

    logging.getLogger("math_verify").setLevel(
        logging.ERROR
    )  # "timeout is disabled": bounded outside
    _PARSERS = (
        [LatexExtractionConfig(), ExprExtractionConfig()],  # the reference
        [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()],  # the response
    )
  return _PARSERS


def response_answer(response: str) -> str:
  """The part of a response the verifier reads: after its last `####`, or all of it."""
  _, sep, tail = response.rpartition(ANSWER_MARKER)
  return tail if sep else response


def reference_latex(reference: str) -> str:
  """The reference as math-verify's LaTeX extractor finds it: in `$...$` unless delimited already."""
  ref = reference.strip()
  return ref if "$" in ref or "\\boxed" in ref else f"${ref}$"


def score(response: str, reference: str) -> float:
  """1.0 iff math-verify finds the response's answer equal to `reference` (see the module doc)."""
  from math_verify import parse, verify

  gold_cfg, pred_cfg = _configs()
  gold = parse(reference_latex(reference), gold_cfg, parsing_timeout=None)
  if not gold:
    return 0.0
  pred = parse(response_answer(response), pred_cfg, parsing_timeout=None)
  if not pred:
    return 0.0
  return float(bool(verify(gold, pred, timeout_seconds=None)))


def main() -> int:
  _configs()
  out = sys.stdout
  out.write('{"ready": true}\n')
  out.flush()
  for line in sys.stdin:
    if not line.strip():
      continue
    req = json.loads(line)
    try:
      result = {"score": score(req["response"], req["reference"])}
    except Exception as e:  # noqa: BLE001 - an answer math-verify cannot handle scores 0
      result = {"score": 0.0, "error": f"{type(e).__name__}: {str(e)[:200]}"}
    out.write(json.dumps(result) + "\n")
    out.flush()
  return 0


if __name__ == "__main__":
  sys.exit(main())
