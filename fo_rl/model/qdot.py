"""Quantized matmuls: what an FP8 / int8 inference engine computes, for the sampler's QTensor weights.

A QTensor weight (fo_rl/model/qtensor.py) carries `act_dtype` (static, set by
`fo_rl.sampler.quantize.quantize_state` from `sampler.activation_dtype`):

- `act_dtype=None` (weight-only, `activation_dtype="none"`): dense sites dequantize the weight and run a
  float matmul, exactly as before (`materialize`), so that mode is bit-identical to the weight-only
  sampler. The experts contract the activations with the low-precision values directly and apply the
  per-expert per-output-channel scale after the matmul (`defer_scale=True`): no dequantized `[E, D, F]`
  stack is built (equal to dequantize-then-matmul up to float rounding; tests/test_qdot.py).
- `act_dtype="float8_e4m3fn"` / `"int8"` (W8A8): the activation x is quantized per token with a dynamic
  scale, `s_x = absmax(x over the contracted axes) / qmax` (qmax 448 for e4m3, 127 for int8, the weight
  quantizer's convention), `x_q = round(clip(x / s_x, -qmax, qmax))` (round-to-nearest-even: the int8
  round, the float8 cast), and the matmul runs on (x_q, w_q) with `preferred_element_type` float32
  (fp8) or int32 (int8: exact integer accumulation); the result is multiplied by `s_x * s_w`. This is
  the per-token-activation / per-channel-weight scheme of vLLM's and SGLang's FP8 W8A8 kernels. On
  TPU v5p+ / H100 the dot_general of fp8 or int8 operands is native; XLA:CPU upcasts the operands
  internally, which gives the same numbers (products of two e4m3 values are exact in float32, int8
  products and sums are exact in int32), so the CPU emulation rounds exactly where an engine does.

Sites: attention q/k/v/o projections, dense MLP, router and lm_head when quantized (`qeinsum` /
`qdot`), the experts in every dispatch of fo_rl/model/moe.py (`qeinsum` with a batch axis, and
`qragged_dot` for the `ragged_dot` backend, which applies the per-expert scale to each row after the
grouped matmul).

Sharded matmuls: the activation scale is computed over the contracted axes as the program sees them.
Under GSPMD (attention, dense MLP) that is the whole row (XLA reduces the absmax across shards). Inside
the expert-parallel shard_map with the experts' hidden dimension F split over `expert_mlp` axes, each
shard quantizes its own slice of the down projection's input, as a tensor-parallel engine's
row-parallel layer does; the result then depends on that split (2.8% relative on a toy layer with F
over 2 shards, against the whole-row reference; exact without the split).

Why not Google's `qwix` (PyPI 0.1.8, checked against this repo's jax 0.10.2 / flax 0.12.8: its core
installs and runs on CPU, `qwix.quantize` + `qwix.einsum` emit a native fp8 x fp8 -> f32 / int8 x int8 ->
i32 dot_general, and `qwix.ragged_dot` handles per-expert scales with an extra ragged_dot of ones):
- its model-level API (`qwix.quantize_model` with `PtqProvider`) intercepts jnp/lax calls inside Flax
  modules and keeps its own parameter structure; the sampler already owns a quantized weight layout
  (QTensors in the trainer's nnx.Param slots, sharded by the sampler's rules, written by ONE jitted weight
  sync) that the trainer's model code runs unchanged, and which qwix's params would replace;
- its core ops are what this module needs, but for our two operand layouts (per-token activations,
  per-output-channel weights) they reduce to one dot_general and one multiply, the ~100 lines below;
- its symmetric int8 bound is 127.5 (`round(x / (absmax / 127.5))`, clipped to 127), not the
  127 of our weight quantizer and of the int8 engines; mixing the two grids would be a silent mismatch;
- a 0.1.x library's API moves; a new runtime dependency for a thin wrapper is not worth it.
During development the fp8 path here was checked against `qwix.einsum` on the same operands.
"""

from __future__ import annotations

import string

import jax
import jax.numpy as jnp

from fo_rl.model.qtensor import QTensor, materialize

ACT_DTYPES = ("none", "float8_e4m3fn", "float8_e5m2", "int8")  # sampler.activation_dtype
QUANTIZED_DTYPES = ("float8_e4m3fn", "float8_e5m2", "int8", "int4")
INT_DTYPES = ("int8", "int4")  # rounded to the nearest integer; int8 x int8 accumulates in int32


def qmax(dtype) -> float:
  """Largest finite magnitude used by the symmetric scale (int8: 127 and int4: 7, so the range stays
  symmetric; float8_e4m3fn: 448; float8_e5m2: 57,344)."""
  dtype = jnp.dtype(dtype)
  if dtype == jnp.int8:
    return 127.0
  if dtype == jnp.int4:
    return 7.0
  if dtype in (jnp.float8_e4m3fn, jnp.float8_e5m2):
    return float(jnp.finfo(dtype).max)
  raise ValueError(f"not a quantized dtype: {dtype}; expected one of {QUANTIZED_DTYPES}")


def is_int(dtype) -> bool:
  return jnp.dtype(dtype).name in INT_DTYPES


def quantize_act(x, dtype, axes) -> tuple[jax.Array, jax.Array]:
  """Dynamic symmetric quantization of activations, one scale per token row: the scale is the absmax
  over `axes` (the contracted axes) / qmax, float32, with size 1 on `axes`. An all-zero row (padding)
  gets scale 1 and stays 0."""
  dtype = jnp.dtype(dtype)
  m = qmax(dtype)
  xf = x.astype(jnp.float32)
  absmax = jnp.max(jnp.abs(xf), axis=tuple(axes), keepdims=True)
  scale = jnp.where(absmax > 0, absmax / m, 1.0).astype(jnp.float32)
  y = jnp.clip(xf / scale, -m, m)
  if is_int(dtype):
    y = jnp.round(y)
  return y.astype(dtype), scale


def _parse(spec: str) -> tuple[str, str, str]:
  ins, out = spec.replace(" ", "").split("->")
  lhs, rhs = ins.split(",")
  return lhs, rhs, out


def _to_out(s, labels: str, out: str, what: str):
  """A scale with one axis per label (size 1 on the contracted ones) in the output's layout, size 1 on
  the output labels it does not have."""
  for d, c in enumerate(labels):
    if c not in out and s.shape[d] != 1:
      raise ValueError(
          f"qdot: the {what} scale {s.shape} varies along contracted axis '{c}' of {labels!r}; "
          f"a scale must be constant over the contraction to factor out of it"
      )
  kept = [c for c in labels if c in out]
  s = s.reshape([s.shape[d] for d, c in enumerate(labels) if c in out])
  s = jnp.transpose(s, [kept.index(c) for c in out if c in kept])
  shape, it = [], iter(s.shape)
  for c in out:
    shape.append(next(it) if c in kept else 1)
  return s.reshape(shape)


def _acc_type(dtype):
  return jnp.int32 if jnp.dtype(dtype) == jnp.int8 else jnp.float32


def qeinsum(spec: str, x, w, dtype, *, defer_scale: bool = False):
  """`jnp.einsum(spec, x, w)` in compute dtype `dtype` for a plain or QTensor weight `w`.

  Plain arrays and weight-only QTensors (act_dtype None) without `defer_scale`: the dequantized weight
  (`materialize`), as before. Weight-only with `defer_scale`: x (in `dtype`) contracted with the
  low-precision values, float32 accumulation, times the weight scale. W8A8 (act_dtype set): x quantized
  per token over its contracted axes, low-precision x low-precision matmul, times x_scale * w_scale.
  """
  if not isinstance(w, QTensor) or (w.act_dtype is None and not defer_scale):
    return jnp.einsum(spec, x, materialize(w, dtype))
  lhs, rhs, out = _parse(spec)
  if w.act_dtype is None:
    acc = jnp.einsum(spec, x.astype(dtype), w.q, preferred_element_type=jnp.float32)
    return (acc * _to_out(w.scale, rhs, out, "weight")).astype(dtype)
  if jnp.dtype(w.act_dtype) != w.q.dtype:
    raise ValueError(
        f"qdot: activations in {w.act_dtype} with {w.q.dtype} weights; sampler.activation_dtype "
        f"must equal sampler.weight_dtype (or be 'none')"
    )
  xq, xs = quantize_act(x, w.act_dtype, [d for d, c in enumerate(lhs) if c not in out])
  acc = jnp.einsum(spec, xq, w.q, preferred_element_type=_acc_type(w.q.dtype))
  scale = _to_out(xs, lhs, out, "activation") * _to_out(w.scale, rhs, out, "weight")
  return (acc.astype(jnp.float32) * scale).astype(dtype)


def qdot(x, w, dtype):
  """`x @ w` (w 2-D) in compute dtype `dtype`: `x @ materialize(w, dtype)` unless `w` is a QTensor
  with activations quantized (then `qeinsum`)."""
  if not isinstance(w, QTensor) or w.act_dtype is None:
    return x @ materialize(w, dtype)
  lead = string.ascii_lowercase[: x.ndim - 1]
  return qeinsum(f"{lead}y,yz->{lead}z", x, w, dtype)


def qragged_dot(x, w, group_sizes, dtype):
  """`jax.lax.ragged_dot(x [A, D], w [G, D, F], group_sizes [G])` for a plain or QTensor `w`. For a
  QTensor the grouped matmul consumes the low-precision values (and, with act_dtype, the per-row
  quantized x); each row's result is then scaled by its group's per-output-channel scale (gathered per
  row, [A, F]) and, with act_dtype, its own scale. Rows past sum(group_sizes) are not meaningful."""
  if not isinstance(w, QTensor):
    return jax.lax.ragged_dot(x, materialize(w, dtype), group_sizes)
  A = x.shape[0]
  G = w.q.shape[0]
  row_group = jnp.minimum(
      jnp.searchsorted(jnp.cumsum(group_sizes), jnp.arange(A), side="right"), G - 1
  )
  ws = w.scale[:, 0, :][row_group]  # [A, F]
  if w.act_dtype is None:
    acc = jax.lax.ragged_dot(x.astype(dtype), w.q, group_sizes, preferred_element_type=jnp.float32)
    return (acc * ws).astype(dtype)
  if jnp.dtype(w.act_dtype) != w.q.dtype:
    raise ValueError(
        f"qdot: activations in {w.act_dtype} with {w.q.dtype} weights; sampler.activation_dtype "
        f"must equal sampler.weight_dtype (or be 'none')"
    )
  xq, xs = quantize_act(x, w.act_dtype, (1,))
  acc = jax.lax.ragged_dot(xq, w.q, group_sizes, preferred_element_type=_acc_type(w.q.dtype))
  return (acc.astype(jnp.float32) * (xs * ws)).astype(dtype)
