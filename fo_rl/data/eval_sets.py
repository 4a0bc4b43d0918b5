"""Held-out evaluation sets from users' files (`eval.files`) and the scores reported on them.

    sets = parse_spec("aime=examples/aime_style.jsonl,math=held_out.parquet")  # [(name, path), ...]
    metrics = summarize("aime", rewards, lengths)   # rewards: [problems, k]

`eval.files` is `NAME=PATH[,NAME=PATH...]`; a bare `PATH` is named after its file (`aime_style`). For a
set of P problems with k samples each (`eval.samples`), `summarize` gives
* `eval/NAME/avg_at_k` (avg@k): the mean reward over all P * k samples (mean accuracy for 0/1 rewards);
* `eval/NAME/pass_at_j` (pass@j) for j = 1, 2, 4, ... and k: the unbiased estimator of the chance that at least one of
  j samples is correct, `1 - C(n - c, j) / C(n, j)` averaged over problems, from its n = k samples of
  which c are correct (reward 1); pass@1 equals avg@k for 0/1 rewards;
  (`_at_`, not `@`: TensorBoard tags cannot hold `@`, and the names are the same in every output)
* `eval/NAME/response_length`: the mean number of generated tokens (EOS excluded).
"""

from __future__ import annotations

import math
import os
import re
from typing import Sequence

import numpy as np

_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


def parse_spec(spec: str, field: str = "eval.files") -> list[tuple[str, str]]:
  """[(name, path)] of `NAME=PATH[,NAME=PATH...]`; ValueError naming `field` for a bad entry, a missing
  file or a repeated name."""
  out: list[tuple[str, str]] = []
  for entry in (e.strip() for e in str(spec or "").split(",")):
    if not entry:
      continue
    name, sep, path = entry.partition("=")
    if not sep:
      path = name
      name = os.path.splitext(os.path.basename(path))[0]
    name, path = name.strip(), os.path.expanduser(path.strip())
    if not _NAME.match(name):
      raise ValueError(
          f"{field}={spec!r}: set name {name!r} must be letters, digits, '_', '.', '-'"
      )
    if not os.path.isfile(path):
      raise ValueError(f"{field}={spec!r}: {path!r}: no such file")
    if name in dict(out):
      raise ValueError(f"{field}={spec!r}: the name {name!r} is given twice")
    out.append((name, path))
  return out


def pass_at_k(n: int, c: int, k: int) -> float:
  """The unbiased pass@k estimator from n samples with c correct: 1 - C(n-c, k) / C(n, k)."""
  if not 0 <= c <= n or not 1 <= k <= n:
    raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
  if n - c < k:
    return 1.0
  # 1 - prod_{i=n-c+1}^{n} (1 - k / i): numerically stable, exact for the small n of evaluation
  return 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def pass_ks(k: int) -> list[int]:
  """The j of pass@j reported for k samples: powers of two below k, and k."""
  return sorted({2**i for i in range(int(math.log2(k)) + 1) if 2**i < k} | {k})


def summarize(name: str, rewards, lengths) -> dict[str, float]:
  """The set's metrics (module doc) from `rewards` and `lengths`, both [problems, k]."""
  rewards = np.asarray(rewards, np.float64)
  lengths = np.asarray(lengths, np.float64)
  if rewards.ndim != 2 or rewards.shape != lengths.shape or rewards.size == 0:
    raise ValueError(
        f"rewards and lengths must be [problems, k], got {rewards.shape}, {lengths.shape}"
    )
  n = rewards.shape[1]
  correct = (rewards >= 1.0).sum(axis=1)
  out = {f"eval/{name}/avg_at_{n}": float(rewards.mean())}
  for j in pass_ks(n):
    out[f"eval/{name}/pass_at_{j}"] = float(np.mean([pass_at_k(n, int(c), j) for c in correct]))
  out[f"eval/{name}/response_length"] = float(lengths.mean())
  return out


def names(metrics: dict, sets: Sequence[tuple[str, str]]) -> dict:
  """The entries of `metrics` that belong to the eval sets `sets`."""
  prefixes = tuple(f"eval/{n}/" for n, _ in sets)
  return {k: v for k, v in metrics.items() if k.startswith(prefixes)}
