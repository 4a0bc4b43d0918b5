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
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from jax.sharding import PartitionSpec as P

from fo_rl.model.attention import MASKED
from fo_rl.parallel.sharding import dividing_axes

PAGED_IMPLS = ("auto", "xla", "pallas")
KV_BLOCK_POSITIONS = 1024  # the kernel's KV block for sequences longer than its tuned table covers


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
  # 0: the arrays above are one pool's. S > 0: every array has a leading shard axis of S, and the
  # pool too: S independent engines in one step (see `attend`).
  shards: int = dataclasses.field(metadata=dict(static=True), default=0)

  @property
  def prefill_rows(self) -> int:
    return self.page_table.shape[-2] - self.num_decode

  def shard(self, arrays) -> "PagedBatch":
    """This layout with its arrays replaced by `arrays` (one shard's: no shard axis)."""
    return dataclasses.replace(self, **dict(zip(_ARRAYS, arrays)), shards=0)

  def sequence_of_tokens(self) -> np.ndarray:
    """[N] the sequence index of each token (static)."""
    D, R, C = self.num_decode, self.prefill_rows, self.chunk
    return np.concatenate([np.arange(D), D + np.repeat(np.arange(R), C)]).astype(np.int32)


_ARRAYS = ("positions", "valid", "page_table", "kv_len", "copy_src", "copy_dst")


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


def tuned_block_sizes(q, pages, batch: PagedBatch, device_kind: str) -> dict:
  """The kernel's block sizes from its own tuned table (`tuned_block_sizes.TUNED_BLOCK_SIZES`, looked
  up as `get_tuned_block_sizes` does) for the TPU `device_kind` the step runs on, e.g. "TPU v5".
  The kernel's lookup reads `jax.devices()[0]`, which is the host's CPU when a dry run compiles for a
  TPU topology from a CPU machine."""
  from jax.experimental.pallas.ops.tpu.ragged_paged_attention import kernel as K
  from jax.experimental.pallas.ops.tpu.ragged_paged_attention import tuned_block_sizes as T

  name = " ".join(device_kind.split()[:2])  # "TPU v5 lite" -> "TPU v5" (the table's naming)
  q_heads, kv_heads2 = K.get_min_heads_per_blk(q.shape[1], pages.shape[2], q.dtype, pages.dtype)
  pages_per_seq, tokens = batch.page_table.shape[-1], q.shape[0]
  key = T.simplify_key(
      (
          q.dtype,
          pages.dtype,
          q_heads,
          kv_heads2 // 2,
          q.shape[2],
          pages.shape[1],
          tokens,
          pages_per_seq,
      )
  )
  # Keys past the table (it is tuned up to 4,096 positions per sequence) get KV blocks of
  # KV_BLOCK_POSITIONS positions, the table's most common block: the kernel's own default of 128 pages
  # overflows its scoped VMEM with pages of 64 positions, and so do 2,048 positions (Qwen3-30B's 8
  # combined KV heads of 128 in bf16; compile errors for v5p in the dry run).
  fallback = (max(1, KV_BLOCK_POSITIONS // pages.shape[1]), 32)
  bkv, bq = (32, 32) if name == "TPU v4" else T.TUNED_BLOCK_SIZES.get(name, {}).get(key, fallback)
  return dict(num_kv_pages_per_block=min(pages_per_seq, bkv), num_queries_per_block=min(tokens, bq))


def attend_pallas(q, pages, batch: PagedBatch, **block_sizes):
  """q [N, Nh, H] over the pool, by the TPU ragged paged attention kernel -> [N, Nh, H].
  block_sizes: the kernel's num_kv_pages_per_block / num_queries_per_block (default: its tuned table,
  which needs a TPU v4+ to look up)."""
  from jax.experimental.pallas.ops.tpu.ragged_paged_attention import ragged_paged_attention

  return ragged_paged_attention(
      q, pages, *kernel_args(batch), sm_scale=q.shape[-1] ** -0.5, mask_value=MASKED, **block_sizes
  )


def _attend_one(q, k, v, pages, batch: PagedBatch, device_kind: str | None = None):
  """One pool: q [N, Nh, H], k, v [N, K, H], pages [P, ps, 2K, H] -> (out [N, Nh, H], pages).
  device_kind: the TPU the kernel's block sizes are tuned for (None: the kernel looks them up)."""
  pages = write(pages, k, v, batch)
  if batch.impl != "pallas":
    return attend_xla(q, pages, batch), pages
  blocks = {} if device_kind is None else tuned_block_sizes(q, pages, batch, device_kind)
  return attend_pallas(q, pages, batch, **blocks), pages


def _attend_shards(q, k, v, pages, arrays, batch: PagedBatch, device_kind: str | None = None):
  """Every local shard (leading axis) on its own pool: a loop for the kernel (a Pallas call has no
  batching rule worth having here; under the engine's shard_map one shard per device), vmap else."""
  one = lambda q, k, v, pages, arrays: _attend_one(q, k, v, pages, batch.shard(arrays), device_kind)
  if batch.impl != "pallas":
    return jax.vmap(one)(q, k, v, pages, arrays)
  outs = [one(q[i], k[i], v[i], pages[i], [a[i] for a in arrays]) for i in range(q.shape[0])]
  return jnp.stack([o for o, _ in outs]), jnp.stack([p for _, p in outs])


def pool_spec(mesh, token_axes, head_axes, num_kv_heads: int) -> P:
  """The spec of the engine's pools [S, P, ps, 2K, H]: the shard axis over `token_axes` (the `batch`
  rule's mesh axes), the interleaved KV heads over `head_axes` (the `heads` rule's) where they
  divide the KV heads (a device then holds whole k / v pairs), else unsplit."""
  heads = tuple(a for a in head_axes if mesh.shape[a] > 1)
  if num_kv_heads % math.prod(mesh.shape[a] for a in heads):
    heads = ()
  b = token_axes[0] if len(token_axes) == 1 else (tuple(token_axes) or None)
  h = heads[0] if len(heads) == 1 else (heads or None)
  return P(b, None, None, h, None)


def attend(q, k, v, cache, batch: PagedBatch, mesh=None, token_axes=(), head_axes=()):
  """The model's paged branch: q [B, T, Nh, H], k, v [B, T, K, H] with B * T flat tokens; cache
  {'pages': [P, ps, 2K, H]} -> (attention output [B, T, Nh, H], the updated cache).

  Shards (`batch.shards` = S > 0): the flat tokens are S blocks of N, block s the step of engine
  shard s, which owns pool `cache['pages'][s]` ([S, P, ps, 2K, H]) and `batch`'s arrays [s]. With a
  mesh, the shard axis lives on the mesh axes of `token_axes` (the `batch` rule, the axes the flat
  tokens are split over, so block s sits on the devices of pool s) and the KV heads on `head_axes`
  where they divide; each device then attends over its own pool under shard_map: no page, query or
  page table crosses devices, whichever attention runs (XLA's gathers, or the Pallas kernel, which XLA
  cannot partition)."""
  shape = q.shape
  Nt = shape[0] * shape[1]
  kind = None if mesh is None else mesh.devices.flat[0].device_kind
  if not batch.shards:
    out, pages = _attend_one(
        q.reshape(Nt, *shape[2:]),
        k.reshape(Nt, *k.shape[2:]),
        v.reshape(Nt, *v.shape[2:]),
        cache["pages"],
        batch,
        kind,
    )
    return out.reshape(shape), {"pages": pages}
  S = batch.shards
  q, k, v = (x.reshape(S, Nt // S, *x.shape[2:]) for x in (q, k, v))
  arrays = [getattr(batch, f) for f in _ARRAYS]
  fn = functools.partial(_attend_shards, batch=batch, device_kind=kind)
  if mesh is not None and not jax.sharding.get_abstract_mesh().manual_axes:
    axes = dividing_axes(token_axes, mesh, S)
    if math.prod(mesh.shape[a] for a in axes) != math.prod(mesh.shape[a] for a in token_axes):
      raise ValueError(
          f"paged attention: {S} engine shards cannot be split over the batch axes {token_axes}"
      )
    page_spec = pool_spec(mesh, token_axes, head_axes, k.shape[2])
    b, h = page_spec[0], page_spec[3]
    x_spec, row = P(b, None, h, None), P(b)
    fn = jax.shard_map(
        fn,
        mesh=mesh,
        in_specs=(x_spec, x_spec, x_spec, page_spec, [row] * len(arrays)),
        out_specs=(x_spec, page_spec),
        check_vma=False,
    )
  out, pages = fn(q, k, v, cache["pages"], arrays)
  return out.reshape(shape), {"pages": pages}
