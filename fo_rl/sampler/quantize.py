"""The sampler's copy of the weights: float32, bfloat16, or FP8 / int8 / int4 with per-output-channel scales.

A quantized weight is a `QTensor(q, scale)` (fo_rl/model/qtensor.py) put in the same nnx.Param slot the
trainer's array occupies, so the sampler runs the one model code: every weight is read through
`materialize`, which dequantizes inside the jitted step (on CPU), and is the `convert(q) * scale` pattern
XLA's GPU/TPU backends rewrite into native FP8 / int8 matmuls where they can.

Scales are symmetric, per output channel: scale = absmax over the contracted (input) axes / qmax, with
qmax = 127 (int8), 7 (int4), 448 (float8_e4m3fn) or 57,344 (float8_e5m2), and `scale` has the weight's
rank with size 1 on the contracted axes. float8_e5m2 (2 mantissa bits, the format FP8 training uses for
gradients) and int4 (W4A16, as GPTQ / AWQ engines store weights; per channel here, not per group) are
coarser grids than float8_e4m3fn: the knobs that widen the training-inference discrepancy. The contracted axes of each parameter of fo_rl.model.Transformer:

    q_proj/k_proj/v_proj [D, N|K, H]  -> scale [1, N|K, H]     o_proj [N, H, D]       -> scale [1, 1, D]
    mlp gate/up [D, F]                -> scale [1, F]          mlp down [F, D]        -> scale [1, D]
    experts gate/up [E, D, F]         -> scale [E, 1, F]       experts down [E, F, D] -> scale [E, 1, D]
    router [D, E]                     -> scale [1, E]          lm_head [D, V]         -> scale [1, V]
    embed_tokens [V, D]               -> scale [V, 1]  (a row per token: the lookup and the tied head)
    norm weights [D]                  -> scale [1]     (elementwise, no contraction: one scale per tensor)

Which parts stay in high precision is `keep_high_precision` (parts: "embed", "norm", "router", "lm_head",
"attn", "mlp", "experts"). The default DEFAULT_KEEP keeps embeddings, norms, the router and lm_head, as
vLLM / SGLang FP8 checkpoints of Qwen3-MoE do: the router's top-k decision and the output distribution are
the most precision-sensitive, and they are a tiny share of the FLOPs; attention, dense MLP and expert
weights (the bulk of the parameters) are quantized. "High precision" means the sampler's float dtype:
float32, or bfloat16 when weight_dtype is bfloat16 (kept parts are then bfloat16 too).

Activations (`activation_dtype`, sampler.activation_dtype): "none" is weight-only quantization (the
quantized weights are dequantized at each matmul, the experts' scales applied after the grouped matmul).
"float8_e4m3fn" / "float8_e5m2" / "int8" (it must equal weight_dtype) quantizes the input of every
matmul with a quantized weight per token, dynamically, and runs fp8 x fp8 / int8 x int8 matmuls (W8A8,
fo_rl/model/qdot.py), as vLLM / SGLang FP8 engines do. The parts kept in high precision (router,
lm_head by default) keep float activations too. The trainer never sees any of this: it holds plain arrays.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fo_rl.model.qdot import ACT_DTYPES, QUANTIZED_DTYPES, is_int, qmax
from fo_rl.model.qtensor import QTensor

WEIGHT_DTYPES = ("float32", "bfloat16") + QUANTIZED_DTYPES
PARTS = ("embed", "norm", "router", "lm_head", "attn", "mlp", "experts")
DEFAULT_KEEP = ("embed", "norm", "router", "lm_head")

_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_FFN = ("gate_proj", "up_proj", "down_proj")


def validate(
    weight_dtype: str, keep_high_precision: Sequence[str], activation_dtype: str = "none"
) -> None:
  if weight_dtype not in WEIGHT_DTYPES:
    raise ValueError(f"sampler.weight_dtype={weight_dtype!r}: must be one of {WEIGHT_DTYPES}")
  if activation_dtype not in ACT_DTYPES:
    raise ValueError(f"sampler.activation_dtype={activation_dtype!r}: must be one of {ACT_DTYPES}")
  if activation_dtype != "none" and activation_dtype != weight_dtype:
    raise ValueError(
        f"sampler.activation_dtype={activation_dtype!r}: quantized activations run "
        f"{activation_dtype} x {activation_dtype} matmuls against weights stored in the same dtype; "
        f"set sampler.weight_dtype={activation_dtype!r} (it is {weight_dtype!r}), or "
        f"activation_dtype='none' for weight-only quantization"
    )
  unknown = sorted(set(keep_high_precision) - set(PARTS))
  if unknown:
    raise ValueError(f"sampler.keep_high_precision: unknown part(s) {unknown}; parts are {PARTS}")


def _keys(path) -> tuple[str, ...]:
  return tuple(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def part_of(path, ndim: int) -> str:
  """Which part of the model a parameter belongs to (the vocabulary of keep_high_precision)."""
  keys = [k for k in _keys(path) if k != "value"]
  name = keys[-1]
  if name == "embed_tokens":
    return "embed"
  if name == "lm_head":
    return "lm_head"
  if name == "router":
    return "router"
  if name == "weight" or ndim == 1:  # RMSNorm weights (input/post-attention, q/k, final)
    return "norm"
  if name in _ATTN:
    return "attn"
  if name in _FFN:
    return "experts" if ndim == 3 else "mlp"
  raise ValueError(
      f"quantize: parameter {'/'.join(keys)} has no known part; add it to "
      f"fo_rl/sampler/quantize.py:part_of"
  )


def contracted_axes(path, ndim: int) -> tuple[int, ...]:
  """The input (contracted) axes of a parameter; the remaining axes are its output channels."""
  keys = [k for k in _keys(path) if k != "value"]
  name, part = keys[-1], part_of(path, ndim)
  if part == "norm":
    return tuple(range(ndim))  # elementwise: one scale for the tensor
  if part == "embed":
    return (1,)  # [V, D]: a scale per token row
  if part == "experts":
    return (1,)  # [E, D, F] / [E, F, D]: contract the middle axis per expert
  if name == "o_proj":
    return (0, 1)  # [N, H, D]
  return (0,)  # [D, ...] (q/k/v, dense MLP, router, lm_head)


def quantize_array(
    w: jax.Array, dtype, axes: Sequence[int], act_dtype: str | None = None
) -> QTensor:
  """Symmetric quantization with one scale per output channel (reduced over `axes`). `act_dtype`: the
  dtype the matmuls quantize this weight's activations to (None: weight-only)."""
  dtype = jnp.dtype(dtype)
  w = w.astype(jnp.float32)
  m = qmax(dtype)
  absmax = jnp.max(jnp.abs(w), axis=tuple(axes), keepdims=True)
  scale = jnp.where(absmax > 0, absmax / m, 1.0).astype(jnp.float32)  # an all-zero channel stays 0
  x = jnp.clip(w / scale, -m, m)
  if is_int(dtype):
    x = jnp.round(x)
  return QTensor(x.astype(dtype), scale, act_dtype)


def quantize_state(
    state,
    weight_dtype: str = "float32",
    keep_high_precision: Sequence[str] = DEFAULT_KEEP,
    activation_dtype: str = "none",
):
  """The sampler's copy of an nnx.State of Params: QTensors for quantized parts, arrays for the rest.
  With `activation_dtype` != "none" every QTensor's matmuls also quantize their activations.

  Pure and traceable (the weight sync jits it with the sampler's out_shardings).
  """
  validate(weight_dtype, keep_high_precision, activation_dtype)
  act = None if activation_dtype == "none" else activation_dtype
  high = jnp.bfloat16 if weight_dtype == "bfloat16" else jnp.float32
  keep = set(keep_high_precision)

  def one(path, var):
    w = var.get_value()
    if isinstance(w, QTensor):
      raise ValueError(
          "quantize_state: the input already holds QTensors (pass the trainer's state)"
      )
    if weight_dtype in QUANTIZED_DTYPES and part_of(path, w.ndim) not in keep:
      return var.replace(quantize_array(w, weight_dtype, contracted_axes(path, w.ndim), act))
    return var.replace(jnp.asarray(w).astype(high))

  return jax.tree_util.tree_map_with_path(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def dequantize_np(qt: QTensor) -> np.ndarray:
  """Host float32 reconstruction q * scale (for tests and diagnostics)."""
  return np.asarray(jnp.asarray(qt.q).astype(jnp.float32)) * np.asarray(qt.scale, np.float32)
