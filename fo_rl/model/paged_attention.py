"""Attention over a paged KV cache, for the paged rollout engine (fo_rl/sampler/engine.py).

The cache of one layer is a pool of pages, `pages [num_pages, page_size, 2K, H]`, keys and values
interleaved on the head axis (k of kv head i at 2i, v at 2i + 1): the layout of JAX's TPU ragged paged
attention kernel (`jax.experimental.pallas.ops.tpu.ragged_paged_attention`), so the kernel reads the
pool as it is. Page 0 is the trash page: never handed to a sequence; padding tokens write there and
unused page-table entries point there.

One engine step feeds a flat batch of N = D + R * C tokens (`PagedBatch`): D decode tokens (one per
decode slot: sequence i is token i) then R prefill rows of C tokens each (sequence D + r is tokens
D + r C ... D + (r + 1) C, positions consecutive). Sequence q's page table `page_table[q]` lists its pages
in position order (position p lives in page `page_table[q, p // page_size]` at offset `p % page_size`).
Each token first writes its key and value into its page (padding tokens into the trash page), then
attends causally over its sequence's positions 0 .. its own position. Before the writes, `copy_src` ->
`copy_dst` copies whole pages (copy-on-write of a shared prompt's last, partly filled page).

`attend(..., impl)`:
- `xla`: gathers each sequence's pages into a dense `[S = W * page_size]` key axis and runs the same
  masked softmax as the model's cached attention (`Attention._attend_cached`): every backend.
- `pallas`: the TPU kernel, fed the ragged layout (`kernel_args`): decode slots as sequences of one
  query, prefill rows as sequences of C queries ending at position start + C - 1 (the padding queries
  of a partly filled row sit after its real tokens, so the real ones see exactly their causal prefix).
  TPU only. (Off TPU, Pallas interpret mode cannot run this kernel in JAX 0.10.2: the TPU interpreter
  fails on the kernel's ref reshape, `'ReshapeTransform' object has no attribute 'indices'`, and the
  generic interpreter on its DMA indexing; tests check `kernel_args` with the kernel's own reference
  implementation, `ref_ragged_paged_attention`, instead.)
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from fo_rl.model.attention import MASKED

PAGED_IMPLS = ("auto", "xla", "pallas")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PagedBatch:
  """The layout of one engine step's flat tokens (see the module docstring). N = D + R * C tokens,
  Q = D + R sequences, W page-table columns."""

  positions: jax.Array  # [N] int32: position of each token in its sequence
  valid: jax.Array  # [N] bool: real tokens (padding writes to the trash page)
  page_table: jax.Array  # [Q, W] int32 (0 = trash page)
  kv_len: jax.Array  # [Q] int32: keys each sequence's last query sees (the kernel's kv_lens)
  copy_src: jax.Array  # [M] int32: pages copied to copy_dst before the step's writes (0 -> 0: none)
  copy_dst: jax.Array  # [M] int32
  num_decode: int = dataclasses.field(metadata=dict(static=True), default=0)  # D
  chunk: int = dataclasses.field(metadata=dict(static=True), default=0)  # C
  impl: str = dataclasses.field(metadata=dict(static=True), default="xla")
  # XLA path: decode slots [0, main_slots) read only the first main_width page-table columns (the
  # engine puts its longest sequences in the last slots), so short sequences do not pay for the
  # longest one. -1: one group.
  main_slots: int = dataclasses.field(metadata=dict(static=True), default=-1)
  main_width: int = dataclasses.field(metadata=dict(static=True), default=0)

  @property
  def prefill_rows(self) -> int:
    return self.page_table.shape[0] - self.num_decode

  def sequence_of_tokens(self) -> np.ndarray:
    """[N] the sequence index of each token (static)."""
    D, R, C = self.num_decode, self.prefill_rows, self.chunk
    return np.concatenate([np.arange(D), D + np.repeat(np.arange(R), C)]).astype(np.int32)


def resolve(impl: str, backend: str | None = None) -> str:
  if impl not in PAGED_IMPLS:
    raise ValueError(f"sampler.paged_attention={impl!r}: must be one of {PAGED_IMPLS}")
  if impl == "auto":
    return "pallas" if (backend or jax.default_backend()) == "tpu" else "xla"
  return impl


def write(pages, k, v, batch: PagedBatch):
  """pages [P, ps, 2K, H] with the step's copies done and k, v [N, K, H] written at each real token's
  slot (padding tokens: the trash page)."""
  ps = pages.shape[1]
  pages = pages.at[batch.copy_dst].set(pages[batch.copy_src])
  seq = jnp.asarray(batch.sequence_of_tokens())
  col = jnp.minimum(batch.positions // ps, batch.page_table.shape[1] - 1)
  page = jnp.where(batch.valid, batch.page_table[seq, col], 0)
  off = jnp.where(batch.valid, batch.positions % ps, 0)
  N, K, H = k.shape
  kv = jnp.stack([k, v], axis=2).reshape(N, 2 * K, H).astype(pages.dtype)  # k0 v0 k1 v1 ...
  return pages.at[page, off].set(kv)


def _dense(pages, table):
  """The keys and values of sequences `table [Q, W]`: two [Q, W * ps, K, H] arrays."""
  kv = pages[table]  # [Q, W, ps, 2K, H]
  Q, W, ps, K2, H = kv.shape
  kv = kv.reshape(Q, W * ps, K2 // 2, 2, H)
  return kv[..., 0, :], kv[..., 1, :]


def _attend_rows(q, k, v, qpos):
  """q [Q, T, N, H] at positions qpos [Q, T] over k, v [Q, S, K, H] (slot s = position s): causal,
  masked as the model's cached attention -> [Q, T, N, H]."""
  dt = q.dtype
  Q, T, N, H = q.shape
  S, K = k.shape[1], k.shape[2]
  G = N // K
  qm = q.reshape(Q, T, K, G, H)
  scores = (
      jnp.einsum("qtkgh,qskh->qkgts", qm, k.astype(dt), preferred_element_type=jnp.float32)
      * H**-0.5
  )
  allowed = jnp.arange(S)[None, None, :] <= qpos[:, :, None]  # [Q, T, S]
  scores = jnp.where(allowed[:, None, None], scores, MASKED)
  probs = jax.nn.softmax(scores, axis=-1).astype(dt)
  out = jnp.einsum("qkgts,qskh->qtkgh", probs, v.astype(dt))
  return out.reshape(Q, T, N, H)


def attend_xla(q, pages, batch: PagedBatch):
  """q [N, Nh, H] over the pool `pages` (already written) -> [N, Nh, H]."""
  D, R, C = batch.num_decode, batch.prefill_rows, batch.chunk
  outs = []
  split = D if batch.main_slots < 0 else batch.main_slots
  W = batch.page_table.shape[1]
  for lo, hi, w in ((0, split, batch.main_width or W), (split, D, W)):
    if hi > lo:
      k, v = _dense(pages, batch.page_table[lo:hi, :w])
      outs.append(_attend_rows(q[lo:hi, None], k, v, batch.positions[lo:hi, None])[:, 0])
  if R:
    k, v = _dense(pages, batch.page_table[D:])
    qp = q[D:].reshape(R, C, *q.shape[1:])
    outs.append(
        _attend_rows(qp, k, v, batch.positions[D:].reshape(R, C)).reshape(R * C, *q.shape[1:])
    )
  return jnp.concatenate(outs, axis=0) if len(outs) > 1 else outs[0]


def kernel_args(batch: PagedBatch):
  """(kv_lens, page_indices, cu_q_lens, num_seqs) of the ragged kernel for `batch`."""
  D, R, C = batch.num_decode, batch.prefill_rows, batch.chunk
  cu = np.concatenate([np.arange(D + 1), D + C * np.arange(1, R + 1)]).astype(np.int32)
  num_seqs = np.array([D + R], np.int32)
  return batch.kv_len, batch.page_table, jnp.asarray(cu), jnp.asarray(num_seqs)


def attend_pallas(q, pages, batch: PagedBatch, **block_sizes):
  """q [N, Nh, H] over the pool, by the TPU ragged paged attention kernel -> [N, Nh, H].
  block_sizes: the kernel's num_kv_pages_per_block / num_queries_per_block (default: its tuned table,
  which needs a TPU v4+ to look up)."""
  from jax.experimental.pallas.ops.tpu.ragged_paged_attention import ragged_paged_attention

  return ragged_paged_attention(
      q, pages, *kernel_args(batch), sm_scale=q.shape[-1] ** -0.5, mask_value=MASKED, **block_sizes
  )


def attend(q, k, v, cache, batch: PagedBatch):
  """The model's paged branch: q [B, T, Nh, H], k, v [B, T, K, H] with B * T = N flat tokens;
  cache {'pages': [P, ps, 2K, H]} -> (attention output [B, T, Nh, H], the updated cache)."""
  shape = q.shape
  N = shape[0] * shape[1]
  pages = write(cache["pages"], k.reshape(N, *k.shape[2:]), v.reshape(N, *v.shape[2:]), batch)
  qf = q.reshape(N, *shape[2:])
  out = attend_pallas(qf, pages, batch) if batch.impl == "pallas" else attend_xla(qf, pages, batch)
  return out.reshape(shape), {"pages": pages}
