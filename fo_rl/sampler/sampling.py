"""Sampling maths: temperature, top-k / top-p truncation, and draws from the truncated distribution with
the log-probability of the token drawn.

    tok, logp = sample_logits(key, logits, temperature=1.0, top_k=0, top_p=1.0)   # logits [B, V]

Logprobs (algorithms.md section 7): `logp` is the log-probability of each sampled token under the
distribution actually sampled from, i.e. softmax(logits / temperature) restricted to the top-k / top-p set
and renormalized. Greedy (temperature 0) returns the argmax and, as its logprob, log softmax(logits) at the
argmax: the untruncated temperature-1 distribution (the argmax has probability 1 under the greedy
"distribution", which would carry no information).

The draws are made by an exponential race (`_categorical`) on Exp(1) noise from an unrolled Threefry-2x32
(`threefry2x32`, `exponential`): bit-identical to `jax.random.exponential`, twice as fast on XLA:CPU, and
indexed by the global row (`row_offset`), so a shard of the batch draws what the whole batch would. The
counter of each draw is its 64-bit flat index in the whole batch, as JAX's (two uint32 words): it does not
wrap when rows x vocabulary passes 2^32.

Non-finite logits (NaN, +inf) are not sampled from silently: the draw is then meaningless (often token
V - 1) and its `logp` is NaN, which the sampler reports (`SampleOutput.logp_nonfinite`) and the trainer
rejects (`fo_rl.rl.rollouts.Rollouts.from_sample`).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def _argmax(x: jax.Array) -> jax.Array:
  """argmax over the last axis (first maximal index) as two plain reductions: XLA:CPU runs the
  variadic (value, index) reduce of jnp.argmax several times slower, and it is on every decode step.
  """
  m = jnp.max(x, axis=-1, keepdims=True)
  n = x.shape[-1]
  first = jnp.min(jnp.where(x == m, jnp.arange(n, dtype=jnp.int32), n), axis=-1)
  return jnp.minimum(first, n - 1).astype(jnp.int32)  # (NaN logits match nothing: stay in range)


_THREEFRY_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def threefry2x32(k1, k2, x1, x2):
  """The Threefry-2x32 block function (20 rounds; Salmon et al. 2011) on uint32 arrays, unrolled.
  Bit-identical to jax.extend.random.threefry_2x32 (tests check it), which XLA:CPU lowers as a rolled
  loop that copies its whole state every round: twice as slow for a decode step's [B, V] draw."""
  ks = (k1, k2, k1 ^ k2 ^ np.uint32(0x1BD11BDA))
  x1, x2 = x1 + ks[0], x2 + ks[1]
  for i in range(5):
    for r in _THREEFRY_ROTATIONS[i % 2]:
      x1 = x1 + x2
      x2 = ((x2 << np.uint32(r)) | (x2 >> np.uint32(32 - r))) ^ x1
    x1 = x1 + ks[(i + 1) % 3]
    x2 = x2 + ks[(i + 2) % 3] + np.uint32(i + 1)
  return x1, x2


def _mul_wide(a: jax.Array, b: int) -> tuple[jax.Array, jax.Array]:
  """(hi, lo): the two uint32 words of the 64-bit product of uint32 array `a` and int b < 2^32, from
  16-bit halves (no uint64: jax_enable_x64 is off)."""
  mask = np.uint32(0xFFFF)
  a0, a1 = a & mask, a >> np.uint32(16)
  b0, b1 = np.uint32(b & 0xFFFF), np.uint32(b >> 16)
  p00, p01, p10, p11 = a0 * b0, a0 * b1, a1 * b0, a1 * b1
  mid = (p00 >> np.uint32(16)) + (p01 & mask) + (p10 & mask)  # < 3 * 2^16
  lo = (p00 & mask) | (mid << np.uint32(16))
  hi = p11 + (p01 >> np.uint32(16)) + (p10 >> np.uint32(16)) + (mid >> np.uint32(16))
  return hi, lo


def _counters(shape: tuple[int, ...], row_offset=None) -> tuple[jax.Array, jax.Array]:
  """The Threefry counters of an array of `shape` that is rows [row_offset, row_offset + shape[0]) of
  a larger one: each element's flat index in the larger array, a 64-bit integer as its (hi, lo) uint32
  words, as jax.random's partitionable threefry counts (`iota_2x32_shape`). Flat indices past 2^32 (rows
  x vocabulary: 28K rows at a 152K vocabulary) carry into the high word instead of wrapping around.
  """
  n = math.prod(shape)
  if row_offset is None and n < 2**32:  # the high words are all 0
    return jnp.zeros(shape, jnp.uint32), jax.lax.iota(jnp.uint32, n).reshape(shape)
  rows = shape[0] if shape else 1
  inner = math.prod(shape[1:])
  if inner >= 2**32:
    raise ValueError(
        f"exponential: a row of {inner} draws (shape {shape}) needs a counter past 2^32"
    )
  r = jax.lax.iota(jnp.uint32, rows)
  if row_offset is not None:
    r = r + jnp.asarray(row_offset, jnp.uint32)
  hi, lo = _mul_wide(r, inner)  # the first flat index of each row
  cols = jax.lax.iota(jnp.uint32, inner)
  lo = lo[:, None] + cols[None, :]
  hi = hi[:, None] + (lo < cols[None, :]).astype(jnp.uint32)  # the carry of lo + cols
  return hi.reshape(shape), lo.reshape(shape)


def exponential(key, shape: tuple[int, ...], row_offset=None) -> jax.Array:
  """float32 Exp(1) draws of `shape` from a threefry PRNG key, as jax.random.exponential(key, shape)
  computes them (with jax_threefry_partitionable, the default: bits = the XOR of the two words of the
  Threefry block of each element's counter; u = uniform [0, 1) from 23 of them; -log(1 - u)), but with
  the unrolled block function, which XLA:CPU runs twice as fast.

  row_offset (traced int, optional): `shape` is rows [row_offset, row_offset + shape[0]) of a larger
  array; the draws are that slice of the larger array's (the sampler's per-shard decode uses it, so the
  samples do not depend on the mesh), with 64-bit counters (`_counters`). A non-threefry key
  (jax_default_prng_impl=rbg) falls back to JAX's own sampler, with the offset folded into the key:
  reproducible, but mesh-dependent."""
  data = jax.random.key_data(key)
  if data.shape != (2,):
    if row_offset is not None:
      key = jax.random.fold_in(key, row_offset)
    return jax.random.exponential(key, shape, jnp.float32)
  hi, lo = _counters(shape, row_offset)
  w1, w2 = threefry2x32(data[0], data[1], hi, lo)
  u = (
      jax.lax.bitcast_convert_type(((w1 ^ w2) >> np.uint32(9)) | np.uint32(0x3F800000), jnp.float32)
      - 1.0
  )
  return -jnp.log1p(-u)


def _categorical(key, x: jax.Array, row_offset=None) -> jax.Array:
  """A draw from softmax(x) over the last axis by an exponential race: argmax_i p_i / E_i with
  E_i ~ Exp(1) i.i.d. is distributed as p (it is the Gumbel-max trick, log p_i - log E_i = x_i + Gumbel,
  up to a constant) but takes one log per entry instead of Gumbel's two, which is most of the sampling
  cost of a CPU decode step. -inf logits get p_i = 0 and are never drawn."""
  p = jnp.exp(x - jnp.max(x, axis=-1, keepdims=True))
  e = jnp.maximum(exponential(key, x.shape, row_offset), jnp.finfo(jnp.float32).tiny)
  return _argmax(p / e)


def _truncated_sorted(x: jax.Array, top_k: int, top_p: float):
  """x [B, V] scaled logits -> (vals [B, n], ids [B, n], keep [B, n]): the n = top_k (or V) largest logits
  in descending order (ties: lower id first) and which of them the top-k / top-p set keeps."""
  V = x.shape[-1]
  vals, ids = jax.lax.top_k(x, top_k if 0 < top_k < V else V)
  keep = jnp.ones(vals.shape, bool)
  if top_p < 1.0:
    p = jax.nn.softmax(vals, axis=-1)  # renormalized over the top-k set
    keep = (
        jnp.cumsum(p, axis=-1) - p
    ) < top_p  # the mass before each token; the first always stays
  return vals, ids, keep


def _truncates(V: int, top_k: int, top_p: float) -> bool:
  return 0 < top_k < V or top_p < 1.0


def truncate_logits(logits: jax.Array, temperature: float, top_k: int = 0, top_p: float = 1.0):
  """logits [B, V] -> logits / temperature with every token outside the top-k / top-p set at -inf.

  top-k keeps exactly the k largest (ties broken towards the lower token id); top-p then keeps, among
  those, the smallest most-probable prefix whose probability (renormalized over the top-k set) reaches
  top_p: sorted token i is kept iff the mass of the tokens before it is < top_p (the first token always
  is). top_k / top_p are static: the untruncated case (the RL default) does no sort at all.
  """
  x = logits.astype(jnp.float32) / temperature
  if not _truncates(x.shape[-1], top_k, top_p):
    return x
  vals, ids, keep = _truncated_sorted(x, top_k, top_p)
  rows = jnp.arange(x.shape[0])[:, None]
  return jnp.full_like(x, -jnp.inf).at[rows, ids].set(jnp.where(keep, vals, -jnp.inf))


def sample_logits(
    key, logits: jax.Array, temperature: float, top_k: int = 0, top_p: float = 1.0, row_offset=None
):
  """logits [B, V] -> (tokens [B] int32, logp [B] float32 of each token under the distribution it was
  sampled from: softmax(logits / temperature) over the top-k / top-p set, renormalized). row_offset: the
  rows are [row_offset, row_offset + B) of a larger batch, drawn as that batch's (see exponential).
  Greedy (temperature 0): the argmax, with its log-probability under softmax(logits) (temperature 1,
  untruncated). With truncation the draw is made among the n sorted candidates only (no scatter back to
  the vocabulary)."""
  logits = logits.astype(jnp.float32)
  if temperature == 0:
    tok = _argmax(logits)
    lp = jax.nn.log_softmax(logits, axis=-1)
    return tok, jnp.take_along_axis(lp, tok[:, None], axis=-1)[:, 0]
  x = logits / temperature
  if not _truncates(x.shape[-1], top_k, top_p):
    tok = _categorical(key, x, row_offset)
    lp = jax.nn.log_softmax(x, axis=-1)
    return tok, jnp.take_along_axis(lp, tok[:, None], axis=-1)[:, 0]
  vals, ids, keep = _truncated_sorted(x, top_k, top_p)
  masked = jnp.where(keep, vals, -jnp.inf)
  j = _categorical(key, masked, row_offset)[:, None]
  lp = jnp.take_along_axis(jax.nn.log_softmax(masked, axis=-1), j, axis=-1)[:, 0]
  return jnp.take_along_axis(ids, j, axis=-1)[:, 0].astype(jnp.int32), lp
