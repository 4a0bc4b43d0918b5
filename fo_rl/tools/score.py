"""Score token ids with a Hugging Face checkpoint: logits (and the experts each token used).

    python -m fo_rl.tools.score --hf_checkpoint=DIR --input_ids=IN.npy --output=LOGITS.npy \
        [--routes_output=ROUTES.npy] [--replay_routes=ROUTES.npy]

IN.npy holds integer token ids [B, T] (every position is a real token; positions are 0..T-1). LOGITS.npy
gets float32 [B, T, V]; ROUTES.npy int32 [B, T, L, k] (-1 in dense layers). --replay_routes forces those
experts (Routing Replay); they are validated before anything runs. All inputs are checked before the
weights are read, and nothing is written unless the whole run succeeds (exit status 1 with a message
otherwise).
"""

from __future__ import annotations

import os
import sys

import numpy as np
from absl import app, flags

FLAGS = flags.FLAGS
if "hf_checkpoint" not in flags.FLAGS:  # shared with the other tool when both are imported
  flags.DEFINE_string(
      "hf_checkpoint", None, "Hugging Face checkpoint directory (config.json + *.safetensors)."
  )
flags.DEFINE_string("input_ids", None, "Token ids, .npy integer array [B, T].")
flags.DEFINE_string("output", None, "Where to write the logits, .npy float32 [B, T, V].")
flags.DEFINE_string(
    "routes_output", None, "Optional: where to write the routes, .npy int32 [B, T, L, k]."
)
flags.DEFINE_string("replay_routes", None, "Optional: routes to replay, .npy integer [B, T, L, k].")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16", "float16"], "Compute dtype.")
flags.DEFINE_enum("param_dtype", "float32", ["float32", "bfloat16", "float16"], "Parameter dtype.")


def _load_npy(path: str, what: str) -> np.ndarray:
  try:
    arr = np.load(path, allow_pickle=False)
  except FileNotFoundError:
    raise ValueError(f"{what} {path!r}: no such file") from None
  except Exception as e:  # not a .npy file, truncated, pickled objects...
    raise ValueError(f"{what} {path!r}: cannot read as a .npy array: {e}") from None
  if not isinstance(arr, np.ndarray):
    raise ValueError(f"{what} {path!r}: expected a single .npy array, got {type(arr).__name__}")
  if arr.dtype.kind not in "iu":
    raise ValueError(f"{what} {path!r}: dtype {arr.dtype} is not an integer dtype (expected int32)")
  return arr


def read_input_ids(path: str, vocab_size: int) -> np.ndarray:
  ids = _load_npy(path, "--input_ids")
  if ids.ndim != 2:
    raise ValueError(f"--input_ids {path!r}: shape {ids.shape} is not [B, T] (rank 2)")
  if ids.size == 0:
    raise ValueError(f"--input_ids {path!r}: shape {ids.shape} is empty")
  bad = (ids < 0) | (ids >= vocab_size)
  if bad.any():
    b, t = (int(a[0]) for a in bad.nonzero())
    raise ValueError(
        f"--input_ids {path!r}: token id {int(ids[b, t])} at [{b}, {t}] is outside "
        f"[0, vocab_size={vocab_size})"
    )
  return ids.astype(np.int32)


def read_replay_routes(path: str, cfg, bt: tuple[int, int]) -> np.ndarray:
  from fo_rl.model import validate_replay_routes

  routes = _load_npy(path, "--replay_routes").astype(np.int64)  # validated before narrowing
  try:
    validate_replay_routes(routes, cfg, None, bt)
  except ValueError as e:
    raise ValueError(f"--replay_routes {path!r}: {e}") from None
  return routes.astype(np.int32)


def _save_atomic(path: str, arr: np.ndarray) -> None:
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "wb") as f:
    np.save(f, arr)
  os.replace(tmp, path)


def score(
    hf_checkpoint: str,
    input_ids: str,
    output: str,
    routes_output: str | None = None,
    replay_routes: str | None = None,
    dtype: str = "float32",
    param_dtype: str = "float32",
) -> None:
  """The tool as a function. Raises ValueError (naming the file) on bad inputs, writing nothing."""
  import jax
  import jax.numpy as jnp

  from fo_rl.model import make_apply
  from fo_rl.model.hf import load_hf_checkpoint, load_hf_config

  cfg = load_hf_config(hf_checkpoint, dtype=dtype, param_dtype=param_dtype)
  ids = read_input_ids(input_ids, cfg.vocab_size)
  B, T = ids.shape
  routes_in = None if replay_routes is None else read_replay_routes(replay_routes, cfg, (B, T))
  for flag, path in (("--output", output), ("--routes_output", routes_output)):
    if path is not None and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
      raise ValueError(f"{flag} {path!r}: directory does not exist")

  cfg, graphdef, state = load_hf_checkpoint(hf_checkpoint, dtype=dtype, param_dtype=param_dtype)
  positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  apply = jax.jit(make_apply(graphdef))
  logits, routes = apply(
      state, jnp.asarray(ids), positions, None if routes_in is None else jnp.asarray(routes_in)
  )
  logits = np.asarray(jax.device_get(logits), np.float32)
  routes = np.asarray(jax.device_get(routes), np.int32)
  if not np.isfinite(logits).all():
    raise ValueError(
        "the forward pass produced non-finite logits"
        + (" (check --replay_routes)" if replay_routes else "")
    )
  _save_atomic(output, logits)
  if routes_output is not None:
    _save_atomic(routes_output, routes)


def main(argv) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  for name in ("hf_checkpoint", "input_ids", "output"):
    if not getattr(FLAGS, name):
      raise app.UsageError(f"--{name} is required")
  try:
    score(
        FLAGS.hf_checkpoint,
        FLAGS.input_ids,
        FLAGS.output,
        FLAGS.routes_output,
        FLAGS.replay_routes,
        FLAGS.dtype,
        FLAGS.param_dtype,
    )
  except ValueError as e:
    print(f"fo_rl.tools.score: error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  app.run(main)
