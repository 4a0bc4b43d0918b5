"""Packed rows for the trainer's forward passes (trainer.pack): several responses end to end in one row.

The trainer's batch layout (fo_rl/rl/rollouts.py) gives every response a row of width W = P + T: a
left-padded prompt and a right-padded response, so a batch of heavy-tailed lengths is mostly padding.
Packing puts the real tokens of several rows (each row's are one contiguous run of columns) end to end
into fewer rows of the same width; the model sees them with segment ids (a position attends only to its
own segment) and their own positions, so every token's log-prob is what the unpacked row gives.

Only the forward passes run packed. Log-probs, entropies and live routes are gathered back into the row
layout right after the model (`unpack`), so the losses, their per-response normalizers, advantages,
masks and metrics are untouched: packing changes the compute, never the objective.

A plan is computed on the host from the token mask, per group of rows (a micro-batch), by first-fit
decreasing; all groups of a call share one packed row count R (the largest needed, rounded up to a
multiple of the mesh's batch split, so the packed rows shard evenly): `src[g, r, c]` is the flat index
(row * W + column) of the token at packed position (r, c) of group g, -1 for padding, and `dst[g, b, t]`
is where the token at (b, t) went (r * W + c), -1 where (b, t) holds no token.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class Plan(NamedTuple):
  src: (
      np.ndarray | jax.Array
  )  # [G, R, W] int32: flat (row * W + col) of each packed position, -1 pad
  dst: (
      np.ndarray | jax.Array
  )  # [G, b, W] int32: flat (r * W + c) of each row position, -1: no token


def plan(token_mask: np.ndarray, multiple: int = 1) -> Plan:
  """The packing of each group of `token_mask` [G, b, W] (bool; each row's real tokens contiguous)."""
  tm = np.asarray(token_mask, bool)
  G, b, W = tm.shape
  groups, runs = [], []
  for g in range(G):
    lengths = tm[g].sum(1)
    starts = np.argmax(tm[g], axis=1)
    runs.append((lengths, starts))
    if not np.array_equal(tm[g], _runs(starts, lengths, W)):
      raise ValueError("packing needs each row's real tokens to be one contiguous run of columns")
    bins: list[list[int]] = []  # packed row -> source rows, first-fit decreasing
    free: list[int] = []
    for i in sorted(range(b), key=lambda i: -lengths[i]):
      if lengths[i] == 0:
        continue
      k = next((j for j, f in enumerate(free) if f >= lengths[i]), None)
      if k is None:
        bins.append([])
        free.append(W)
        k = len(bins) - 1
      bins[k].append(i)
      free[k] -= int(lengths[i])
    groups.append(bins)
  R = max(1, max(len(bins) for bins in groups))
  R = int(math.ceil(R / multiple) * multiple)
  src = np.full((G, R, W), -1, np.int32)
  dst = np.full((G, b, W), -1, np.int32)
  for g, bins in enumerate(groups):
    lengths, starts = runs[g]
    for r, rows in enumerate(bins):
      c = 0
      for i in rows:
        n, s = int(lengths[i]), int(starts[i])
        src[g, r, c : c + n] = i * W + np.arange(s, s + n)
        dst[g, i, s : s + n] = r * W + np.arange(c, c + n)
        c += n
  return Plan(src, dst)


def _runs(starts, lengths, W) -> np.ndarray:
  cols = np.arange(W)
  return (cols >= starts[:, None]) & (cols < (starts + lengths)[:, None])


def pack(x: jax.Array, src: jax.Array, fill=0) -> jax.Array:
  """x [b, W, ...] -> [R, W, ...] at `src` [R, W]; `fill` at padding (None: an arbitrary real entry)."""
  R, W = src.shape
  flat = x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])
  y = jnp.take(flat, jnp.maximum(src, 0).reshape(-1), axis=0).reshape(R, W, *x.shape[2:])
  if fill is None:
    return y
  valid = (src >= 0).reshape(R, W, *([1] * (x.ndim - 2)))
  return jnp.where(valid, y, jnp.asarray(fill, x.dtype))


def unpack(y: jax.Array, dst: jax.Array, fill=0) -> jax.Array:
  """y [R, W, ...] -> the row layout [b, W, ...] at `dst` [b, W]; `fill` where a row holds no token
  (None: an arbitrary real entry)."""
  return pack(y, dst, fill)


def segments(src: jax.Array, W: int) -> jax.Array:
  """[R, W] int32 segment ids of a packed group: source row + 1, 0 at padding."""
  return jnp.where(src >= 0, src // W + 1, 0).astype(jnp.int32)


def padding_fraction(token_mask: np.ndarray, p: Plan | None = None) -> float:
  """The share of the positions a pass computes that hold no token: of the rows as they are, or (with a
  plan) of the packed rows."""
  tm = np.asarray(token_mask, bool)
  if p is None:
    return float(1.0 - tm.mean())
  return float(1.0 - tm.sum() / np.asarray(p.src).size)
