"""Packed rows for the trainer's forward passes (trainer.pack, on by default): several responses end to end
in one row, and only the micro-batches that hold tokens are computed.

The trainer's batch layout (fo_rl/rl/rollouts.py) gives every response a row of width W = P + T: a
left-padded prompt and a right-padded response, so a batch of heavy-tailed lengths is mostly padding.
Packing puts the real tokens of several rows (each row's are one contiguous run of columns) end to end
into fewer rows of the same width; the model sees them with segment ids (a position attends only to its
own segment) and their own positions, so every token's log-prob is what the unpacked row gives.

Only the forward passes run packed. Log-probs, entropies and live routes are gathered back into the row
layout (`regather` with `dst`), so the losses, their per-response normalizers, advantages, masks and
metrics are those of the unpacked rows: packing changes the compute, never the objective.

Shapes are fixed by the batch, never by the data, so one program serves every step (the dry run compiles
it too). A batch of n rows that the mesh splits k ways (k = 1 without a mesh) and that the unpacked pass
would run as M micro-batches of r = n / (M k) rows per shard is planned on the host, per shard: shard d
(rows [d n/k, (d+1) n/k), the rows the batch sharding puts on its devices) packs its own rows by
first-fit decreasing into at most n/k packed rows; micro-batch j is packed rows [j r, (j+1) r) of every
shard. The pass loops over the first `count` micro-batches only (a while loop with a bound read at run
time, at most M): the compute follows the tokens, the shapes do not. Every index is local to its shard
(a batched gather over the shard axis), so packing moves no data between devices.

  src[d, p, c]   the shard-local flat index (row * W + column) of the token at packed position (p, c)
                 of shard d, -1 for padding: [k, M r, W]
  dst[d, i, t]   where shard d's token at (i, t) went (p * W + c), -1 where (i, t) holds no token:
                 [k, n/k, W]
  row_mb[d, i]   the micro-batch holding row i's tokens (a row is never split), -1 for an empty row
  count          micro-batches that hold tokens (a [] int32 array: a run-time value, not a shape)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class Plan(NamedTuple):
  src: np.ndarray | jax.Array  # [k, M * r, W] int32
  dst: np.ndarray | jax.Array  # [k, n / k, W] int32
  row_mb: np.ndarray | jax.Array  # [k, n / k] int32
  count: np.ndarray | jax.Array  # [] int32


def shape(n: int, W: int, ways: int = 1) -> Plan:
  """The plan's arrays as ShapeDtypeStructs (what a jitted pass is compiled for: the dry run)."""
  s = lambda *d: jax.ShapeDtypeStruct(d, jnp.int32)  # noqa: E731
  return Plan(s(ways, n // ways, W), s(ways, n // ways, W), s(ways, n // ways), s())


def plan(token_mask: np.ndarray, micro_batches: int = 1, ways: int = 1) -> Plan:
  """The packing of `token_mask` [n, W] (bool; each row's real tokens contiguous) into micro-batches of
  n / (micro_batches * ways) packed rows per shard of n / ways rows (module docstring)."""
  tm = np.asarray(token_mask, bool)
  n, W = tm.shape
  k, M = ways, micro_batches
  if n % (k * M):
    raise ValueError(f"packing: {n} rows do not split into {k} shards x {M} micro-batches")
  per, r = n // k, n // (k * M)
  lengths = tm.sum(1)
  starts = np.argmax(tm, axis=1)
  if not np.array_equal(tm, _runs(starts, lengths, W)):
    raise ValueError("packing needs each row's real tokens to be one contiguous run of columns")
  src = np.full((k, per, W), -1, np.int32)
  dst = np.full((k, per, W), -1, np.int32)
  row_mb = np.full((k, per), -1, np.int32)
  used = 0
  for d in range(k):
    bins = _first_fit_decreasing(lengths[d * per : (d + 1) * per], W)
    used = max(used, len(bins))
    for p, rows in enumerate(bins):
      c = 0
      for i in rows:
        m, s = int(lengths[d * per + i]), int(starts[d * per + i])
        src[d, p, c : c + m] = i * W + np.arange(s, s + m)
        dst[d, i, s : s + m] = p * W + np.arange(c, c + m)
        row_mb[d, i] = p // r
        c += m
  count = np.asarray(max(1, -(-used // r)), np.int32)
  return Plan(src, dst, row_mb, count)


def _first_fit_decreasing(lengths: np.ndarray, W: int) -> list[list[int]]:
  """Rows (by index) into bins of W positions, longest first, each into the first bin it fits."""
  bins: list[list[int]] = []
  free: list[int] = []
  for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
    if lengths[i] == 0:
      continue
    j = next((j for j, f in enumerate(free) if f >= lengths[i]), None)
    if j is None:
      bins.append([])
      free.append(W)
      j = len(bins) - 1
    bins[j].append(i)
    free[j] -= int(lengths[i])
  return bins


def _runs(starts, lengths, W) -> np.ndarray:
  cols = np.arange(W)
  return (cols >= starts[:, None]) & (cols < (starts + lengths)[:, None])


def regather(
    x: jax.Array, idx: jax.Array, fill=0, constrain: Callable[[jax.Array], jax.Array] | None = None
) -> jax.Array:
  """x [k a, W, ...] -> [k b, W, ...]: shard d's output position (i, t) takes shard d's x at the flat
  index idx[d, i, t] (into its a * W positions); `fill` where idx < 0 (None: an arbitrary real entry of
  the shard). Packs rows (idx: a micro-batch of `src`) and unpacks them (idx: `dst`). `constrain` puts
  the shard axis of its [k, ...] views on the batch's mesh axes, so the gather stays on each device.
  """
  k, b, W = idx.shape
  view = x.reshape(k, x.shape[0] // k * W, *x.shape[2:])
  ids = idx.reshape(k, b * W)
  if constrain is not None:
    view, ids = constrain(view), constrain(ids)
  y = jax.vmap(lambda v, i: jnp.take(v, jnp.maximum(i, 0), axis=0))(view, ids)
  if fill is not None:
    valid = (ids >= 0).reshape(ids.shape + (1,) * (x.ndim - 2))
    y = jnp.where(valid, y, jnp.asarray(fill, x.dtype))
  return y.reshape(k * b, W, *x.shape[2:])


def micro(src: jax.Array, j, r: int) -> jax.Array:
  """The src of micro-batch j (a traced index) of r packed rows per shard: [k, r, W]."""
  k, _, W = src.shape
  return jax.lax.dynamic_slice(src, (0, j * r, 0), (k, r, W))


def segments(src: jax.Array) -> jax.Array:
  """[k r, W] int32 segment ids of a packed micro-batch ([k, r, W] src): source row + 1, 0 at padding."""
  k, r, W = src.shape
  return jnp.where(src >= 0, src // W + 1, 0).astype(jnp.int32).reshape(k * r, W)


def padding_fraction(
    token_mask: np.ndarray, p: Plan | None = None, micro_batches: int = 1
) -> float:
  """The share of the positions a pass computes that hold no token: of the rows as they are, or (with a
  plan made for `micro_batches`) of the packed micro-batches the pass runs."""
  tm = np.asarray(token_mask, bool)
  if p is None:
    return float(1.0 - tm.mean())
  computed = int(p.count) * (tm.shape[0] // micro_batches) * tm.shape[1]
  return float(1.0 - tm.sum() / computed)
