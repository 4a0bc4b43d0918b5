"""Per-token log-probabilities and entropies of a sequence, with or without the `[B, T, V]` logits.

The trainer needs log pi(token_t | <t) at every position and, for its metrics, the entropy of the
distribution that predicted each token. Materializing the float32 logits `[B, T, V]` for that costs
0.6 GB per 1,000 positions at Qwen3's V = 151,936, per sequence, and the backward keeps as much again.
`chunked` computes the same numbers from the final hidden states chunk by chunk over the sequence:
each chunk's logits `[B, c, V]` live only inside a rematerialized (jax.checkpoint) function, so the
forward and the backward hold one chunk's logits at a time. `full` is today's path and the oracle; each
chunk applies exactly its operations (log_softmax's max-shift, then the gather), so on rows they share
the two agree to float rounding of the per-chunk matmul (tests: values and gradients).

Conventions (both): position t's log-prob and entropy come from the logits at t - 1; position 0 gets 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def token_logprobs(logits, tokens, temperature: float = 1.0):
  """[B, T, V] logits (position t predicts token t+1) -> [B, T] log pi(token_t | <t); position 0 gets 0."""
  return full(logits, tokens, temperature)[0]


def _shift0(x):
  """[B, T - 1] values of the predicting positions -> [B, T], position 0 getting 0."""
  return jnp.pad(x, ((0, 0), (1, 0)))


def _entropy(logq):
  """-sum_v q_v log q_v over the last axis (entries with q = 0 contribute 0), from log q."""
  q = jnp.exp(logq)
  return -jnp.sum(jnp.where(q > 0, q * logq, 0.0), axis=-1)


def full(logits, tokens, temperature: float = 1.0, entropy: bool = False):
  """(logp [B, T], entropy [B, T] or None) from the whole logits [B, T, V]."""
  logq = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32) / temperature, axis=-1)
  lp = jnp.take_along_axis(logq, tokens[:, 1:, None], axis=-1)[..., 0]
  return _shift0(lp), (_shift0(_entropy(logq)) if entropy else None)


def chunked(
    hidden, head, tokens, temperature: float = 1.0, chunk: int = 512, entropy: bool = False
):
  """(logp [B, T], entropy [B, T] or None) from the final hidden states [B, T, D] (after the final
  norm) and the output projection head [D, V], `chunk` positions at a time (see the module docstring).
  """
  h, tgt = hidden[:, :-1], tokens[:, 1:]
  B, T1, D = h.shape
  c = max(1, min(chunk, T1))
  n = -(-T1 // c)
  pad = n * c - T1
  if pad:
    h = jnp.pad(h, ((0, 0), (0, pad), (0, 0)))
    tgt = jnp.pad(tgt, ((0, 0), (0, pad)))
  hs = jnp.moveaxis(h.reshape(B, n, c, D), 1, 0)  # [n, B, c, D]
  ts = jnp.moveaxis(tgt.reshape(B, n, c), 1, 0)
  head = head.astype(jnp.float32)

  @jax.checkpoint
  def one(hc, tc):
    logits = (
        hc.astype(jnp.float32) @ head / temperature
    )  # [B, c, V]: one chunk, recomputed backward
    logq = jax.nn.log_softmax(logits, axis=-1)
    lp = jnp.take_along_axis(logq, tc[..., None], axis=-1)[..., 0]
    return lp, (_entropy(logq) if entropy else jnp.zeros_like(lp))

  lp, ent = jax.lax.map(lambda a: one(*a), (hs, ts))
  unchunk = lambda x: _shift0(jnp.moveaxis(x, 0, 1).reshape(B, n * c)[:, :T1])
  return unchunk(lp), (unchunk(ent) if entropy else None)
