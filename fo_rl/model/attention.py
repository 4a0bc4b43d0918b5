"""Causal self-attention for the training forward (the trainer's passes and the sampler's prefill).

`attend(q, k, v, key_mask, impl=...)`, one knob `model.attention_impl`:
- `reference`: the einsum over the whole `[B, K, G, T, S]` float32 score tensor; the test oracle, and the
  fastest for short sequences, but quadratic in memory (about 137 GB per sequence per layer at 32K).
- `blocked`: flash-style attention in pure JAX on every backend: an online softmax over blocks of keys for
  each block of queries, and a custom VJP whose backward recomputes each score block (FlashAttention-2's
  backward), so neither pass holds more than one `[B, K, G, block_q, block_k]` score block. Memory is
  linear in the sequence length.
- `cudnn`: `jax.nn.dot_product_attention(implementation="cudnn")` on GPU (the mask is passed as a boolean
  `[B, 1, T, S]` tensor; its `implementation="xla"` twin is what the CPU tests check).
- `auto`: `splash` on TPU, `cudnn` on GPU; on CPU `blocked` from `AUTO_BLOCKED_FROM` positions on, with
  `CPU_BLOCKS`, and `reference` below.
Every implementation computes the same function as `reference` (tests: values and gradients in float32,
with causal masking, padded keys and segment ids), including its one convention for query rows that may
attend to nothing (padding): a uniform average over all keys (finite; the caller masks them out).

Shapes: q [B, T, N, H]; k, v [B, S, K, H] with N = K * G (grouped-query attention); key_mask [B, S] (real
keys); segment_ids [B, T] (optional: a query attends only to keys of its own segment, for packed rows;
S = T then). Query t may attend to key s <= t (slot order: the training forward has S = T).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from fo_rl.parallel.sharding import dividing_axes

ATTENTION_IMPLS = ("auto", "reference", "blocked", "splash", "cudnn")
# `auto` on CPU: reference below AUTO_BLOCKED_FROM positions, blocked from there on, and `blocked`'s
# (query, key) blocks default to CPU_BLOCKS there ((512, 512) elsewhere). XLA:CPU runs attention at the
# speed of the memory level its score tensors fit in, so blocks that stay in the caches win long before
# memory runs out. On the train bench's model (micro-batches of 1,024 tokens), seconds per update:
#   T = 256: reference 0.29, blocks (128, 128) 0.26, (128, 512) 0.26
#   T = 512: reference 0.42, (128, 128) 0.37, (128, 512) 0.32
#   T = 1,024: reference 1.26, (512, 512) 0.71, (128, 128) 0.65, (128, 512) 0.55, (64, 1024) 0.53
# (one run each, median of 7; at T = 128 reference and blocked are even).
AUTO_BLOCKED_FROM = 256
CPU_BLOCKS = (128, 512)
MASKED = -1e30  # finite, so a fully masked (padding) query row gives no NaN


def check_impl(impl: str, backend: str | None = None) -> None:
  """A choice the backend cannot run is an error naming model.attention_impl (before any compile).
  `splash` runs anywhere (off TPU in Pallas interpret mode: slow, for tests)."""
  if impl not in ATTENTION_IMPLS:
    raise ValueError(f"model.attention_impl={impl!r}: must be one of {ATTENTION_IMPLS}")
  if impl == "cudnn" and (backend or jax.default_backend()) != "gpu":
    raise ValueError(
        f"model.attention_impl='cudnn' needs a GPU backend, but the backend is"
        f" {backend or jax.default_backend()!r}"
        " (use auto, blocked or reference)"
    )


def resolve(impl: str, length: int, backend: str | None = None) -> str:
  """The implementation `impl` stands for at sequence length `length` on `backend`."""
  check_impl(impl, backend)
  if impl != "auto":
    return impl
  backend = backend or jax.default_backend()
  if backend == "tpu":
    return "splash"
  if backend == "gpu":
    return "cudnn"
  return "blocked" if length >= AUTO_BLOCKED_FROM else "reference"


def attend(
    q,
    k,
    v,
    key_mask,
    segment_ids=None,
    *,
    impl: str = "reference",
    mesh: Mesh | None = None,
    batch_axes: tuple = (),
    head_axes: tuple = (),
    block_q: int | None = None,
    block_k: int | None = None,
):
  """Causal attention of q [B, T, N, H] over k, v [B, S, K, H] -> [B, T, N, H] in q's dtype.

  mesh / batch_axes / head_axes (the `batch` and `heads` rules' mesh axes): where the activations live;
  `auto` resolves by the mesh's platform (a dry run traces on a CPU host for TPU devices), and the splash
  kernel runs under shard_map over them (a Pallas call is not partitioned by XLA)."""
  backend = mesh.devices.flat[0].platform if mesh is not None else None
  impl = resolve(impl, q.shape[1], backend)
  if impl == "reference":
    return reference(q, k, v, key_mask, segment_ids)
  if impl == "blocked":
    bq, bk = CPU_BLOCKS if (backend or jax.default_backend()) == "cpu" else (512, 512)
    return blocked(q, k, v, key_mask, segment_ids, block_q=block_q or bq, block_k=block_k or bk)
  if impl == "splash":
    return splash(
        q, k, v, key_mask, segment_ids, mesh=mesh, batch_axes=batch_axes, head_axes=head_axes
    )
  return dot_product_attention(q, k, v, key_mask, segment_ids, implementation="cudnn")


def _allowed(q_idx, k_idx, key_mask, q_seg=None, k_seg=None):
  """[B, Tq, Sk] bool: causal (key slot <= query slot), real key, same segment."""
  allowed = (k_idx[None, :] <= q_idx[:, None])[None] & key_mask[:, None, :]
  if q_seg is not None:
    allowed = allowed & (q_seg[:, :, None] == k_seg[:, None, :])
  return allowed


def reference(q, k, v, key_mask, segment_ids=None):
  """The whole score tensor at once (quadratic memory): the oracle the other implementations match."""
  dt = q.dtype
  B, T, N, H = q.shape
  S, K = k.shape[1], k.shape[2]
  q = q.reshape(B, T, K, N // K, H)
  scores = jnp.einsum("btkgh,bskh->bkgts", q, k, preferred_element_type=jnp.float32) * H**-0.5
  allowed = _allowed(jnp.arange(T), jnp.arange(S), key_mask, segment_ids, segment_ids)
  scores = jnp.where(allowed[:, None, None], scores, MASKED)
  probs = jax.nn.softmax(scores, axis=-1).astype(dt)
  return jnp.einsum("bkgts,bskh->btkgh", probs, v).reshape(B, T, N, H)


def dot_product_attention(q, k, v, key_mask, segment_ids=None, implementation: str = "cudnn"):
  """`jax.nn.dot_product_attention` with the same mask (`implementation="xla"` runs anywhere)."""
  T, S = q.shape[1], k.shape[1]
  allowed = _allowed(jnp.arange(T), jnp.arange(S), key_mask, segment_ids, segment_ids)
  return jax.nn.dot_product_attention(
      q, k, v, mask=allowed[:, None], scale=q.shape[-1] ** -0.5, implementation=implementation
  )


# ------------------------------------------------------------------------------------------------------
# blocked: online softmax forward, recomputing backward
# ------------------------------------------------------------------------------------------------------
def _pad_to(x, axis: int, size: int, value=0):
  pad = size - x.shape[axis]
  if pad == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, pad)
  return jnp.pad(x, widths, constant_values=value)


def _blocks(x, n: int, block: int):
  """[B, n * block, ...] -> [n, B, block, ...]."""
  return jnp.moveaxis(x.reshape(x.shape[0], n, block, *x.shape[2:]), 1, 0)


def blocked(q, k, v, key_mask, segment_ids=None, *, block_q: int = 512, block_k: int = 512):
  """Flash-style attention: memory linear in T (see the module docstring)."""
  B, T, N, H = q.shape
  S, K = k.shape[1], k.shape[2]
  bq, bk = min(block_q, T), min(block_k, S)
  nq, nk = -(-T // bq), -(-S // bk)
  seg = jnp.zeros((B, T), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
  # Padded keys are masked; padded queries are computed and dropped. Their segment ids are -1, so a
  # padded key never matches a real query's segment either.
  qp = _pad_to(q.reshape(B, T, K, N // K, H), 1, nq * bq)
  kp, vp = _pad_to(k, 1, nk * bk), _pad_to(v, 1, nk * bk)
  mp = _pad_to(key_mask.astype(bool), 1, nk * bk, False)
  q_seg, k_seg = _pad_to(seg, 1, nq * bq, -1), _pad_to(seg, 1, nk * bk, -1)
  out = _flash(qp, kp, vp, mp, q_seg, k_seg, bq, bk, S, segment_ids is not None)
  return out[:, :T].reshape(B, T, N, H)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9))
def _flash(q, k, v, key_mask, q_seg, k_seg, bq, bk, S, use_seg):
  return _flash_fwd(q, k, v, key_mask, q_seg, k_seg, bq, bk, S, use_seg)[0]


def _block_scores(qi, kj, qi_idx, kj_idx, mj, q_seg_i, k_seg_j, S, use_seg, scale):
  """Scores of one (query block, key block) pair, float32 [B, K, G, bq, bk], masked to MASKED as in
  `reference` (so a row with no allowed key averages all S keys), the block padding beyond S to -inf
  (no key at all); and the allowed mask [B, 1, 1, bq, bk]."""
  s = jnp.einsum("bqkgh,bskh->bkgqs", qi, kj, preferred_element_type=jnp.float32) * scale
  allowed = _allowed(qi_idx, kj_idx, mj, q_seg_i if use_seg else None, k_seg_j)[:, None, None]
  return jnp.where(kj_idx < S, jnp.where(allowed, s, MASKED), -jnp.inf), allowed


def _flash_fwd(q, k, v, key_mask, q_seg, k_seg, bq, bk, S, use_seg):
  B, Tp, K, G, H = q.shape
  Sp = k.shape[1]
  nq, nk = Tp // bq, Sp // bk
  scale = H**-0.5
  kb, vb, mb, ksb = (_blocks(x, nk, bk) for x in (k, v, key_mask, k_seg))
  k_idx = jnp.arange(Sp).reshape(nk, bk)

  def q_block(args):
    qi, q_seg_i, qi_idx = args

    def kv_step(carry, xs):
      m, l, acc = carry
      kj, vj, mj, k_seg_j, kj_idx = xs
      s, _ = _block_scores(qi, kj, qi_idx, kj_idx, mj, q_seg_i, k_seg_j, S, use_seg, scale)
      m_new = jnp.maximum(m, s.max(-1))
      p = jnp.exp(s - m_new[..., None])
      corr = jnp.exp(m - m_new)
      l = l * corr + p.sum(-1)
      pv = jnp.einsum(
          "bkgqs,bskh->bkgqh", p.astype(v.dtype), vj, preferred_element_type=jnp.float32
      )
      return (m_new, l, acc * corr[..., None] + pv), None

    init = (
        jnp.full((B, K, G, bq), -jnp.inf, jnp.float32),
        jnp.zeros((B, K, G, bq), jnp.float32),
        jnp.zeros((B, K, G, bq, H), jnp.float32),
    )
    (m, l, acc), _ = jax.lax.scan(kv_step, init, (kb, vb, mb, ksb, k_idx))
    o = (acc / l[..., None]).astype(q.dtype)  # [B, K, G, bq, H]
    return jnp.moveaxis(o, 3, 1), m, l  # o as [B, bq, K, G, H]

  qb, qsb = _blocks(q, nq, bq), _blocks(q_seg, nq, bq)
  o, m, l = jax.lax.map(q_block, (qb, qsb, jnp.arange(Tp).reshape(nq, bq)))
  out = jnp.moveaxis(o, 0, 1).reshape(B, Tp, K, G, H)
  return out, (q, k, v, key_mask, q_seg, k_seg, out, m, l)


def _flash_bwd(bq, bk, S, use_seg, res, do):
  q, k, v, key_mask, q_seg, k_seg, out, m, l = res  # m, l: [nq, B, K, G, bq]
  B, Tp, K, G, H = q.shape
  Sp = k.shape[1]
  nq, nk = Tp // bq, Sp // bk
  scale = H**-0.5
  # D_i = rowsum(dO * O): the softmax backward's rowsum(dP * P), per query row.
  d_rows = jnp.einsum("btkgh,btkgh->bkgt", do.astype(jnp.float32), out.astype(jnp.float32))
  d_rows = jnp.moveaxis(d_rows.reshape(B, K, G, nq, bq), 3, 0)
  qb, dob, qsb = _blocks(q, nq, bq), _blocks(do, nq, bq), _blocks(q_seg, nq, bq)
  q_idx = jnp.arange(Tp).reshape(nq, bq)

  def kv_block(dq, xs):
    kj, vj, mj, k_seg_j, kj_idx = xs

    def q_step(carry, ys):
      dk, dv = carry
      qi, doi, q_seg_i, qi_idx, mi, li, di = ys
      s, allowed = _block_scores(qi, kj, qi_idx, kj_idx, mj, q_seg_i, k_seg_j, S, use_seg, scale)
      p = (
          jnp.exp(s - mi[..., None]) / li[..., None]
      )  # the forward's probabilities, [B, K, G, bq, bk]
      dv = dv + jnp.einsum("bkgqs,bqkgh->bskh", p, doi.astype(jnp.float32))
      dp = jnp.einsum("bqkgh,bskh->bkgqs", doi, vj, preferred_element_type=jnp.float32)
      ds = jnp.where(allowed, p * (dp - di[..., None]), 0.0) * scale
      dqi = jnp.einsum("bkgqs,bskh->bqkgh", ds, kj.astype(jnp.float32))
      dk = dk + jnp.einsum("bkgqs,bqkgh->bskh", ds, qi.astype(jnp.float32))
      return (dk, dv), dqi

    zeros = jnp.zeros((B, bk, K, H), jnp.float32)
    (dk, dv), dq_blocks = jax.lax.scan(q_step, (zeros, zeros), (qb, dob, qsb, q_idx, m, l, d_rows))
    return dq + dq_blocks, (dk, dv)

  kb, vb, mb, ksb = (_blocks(x, nk, bk) for x in (k, v, key_mask, k_seg))
  k_idx = jnp.arange(Sp).reshape(nk, bk)
  dq0 = jnp.zeros((nq, B, bq, K, G, H), jnp.float32)
  dq, (dk, dv) = jax.lax.scan(kv_block, dq0, (kb, vb, mb, ksb, k_idx))
  dq = jnp.moveaxis(dq, 0, 1).reshape(B, Tp, K, G, H).astype(q.dtype)
  dk = jnp.moveaxis(dk, 0, 1).reshape(B, Sp, K, H).astype(k.dtype)
  dv = jnp.moveaxis(dv, 0, 1).reshape(B, Sp, K, H).astype(v.dtype)
  return dq, dk, dv, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


# ------------------------------------------------------------------------------------------------------
# splash: JAX's Pallas TPU splash-attention kernel
# ------------------------------------------------------------------------------------------------------
SPLASH_ALIGN = 128  # the kernel's sequence blocks are multiples of this; T is padded up to one


@functools.lru_cache(maxsize=None)
def _splash_kernel(T: int, G: int, block: int, interpret: bool):
  """The causal multi-query splash kernel for G query heads sharing one KV head, sequence T."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

  mask = sm.MultiHeadMask([sm.CausalMask((T, T)) for _ in range(G)])
  b = block
  sizes = sk.BlockSizes(
      block_q=b,
      block_kv=b,
      block_kv_compute=b,
      block_q_dkv=b,
      block_kv_dkv=b,
      block_kv_dkv_compute=b,
      block_q_dq=b,
      block_kv_dq=b,
  )
  return (
      sk.make_splash_mqa_single_device(mask, block_sizes=sizes, interpret=interpret),
      sk.SegmentIds,
  )


def _splash_local(q, k, v, key_mask, seg, interpret: bool):
  """Splash on local arrays: q [B, T, N, H], k, v [B, T, K, H], key_mask / seg [B, T]."""
  B, T, N, H = q.shape
  K = k.shape[2]
  G = N // K
  Tp = -(-T // SPLASH_ALIGN) * SPLASH_ALIGN
  block = next(b for b in (512, 256, 128) if Tp % b == 0)
  kernel, SegmentIds = _splash_kernel(Tp, G, block, interpret)
  # Key padding and segments as segment ids: a key is seen by the queries of its segment only; padded
  # keys (key_mask False, or beyond T) get -1, which no query has; queries beyond T get -2.
  kv_seg = _pad_to(jnp.where(key_mask, seg, -1), 1, Tp, -1)
  q_seg = _pad_to(seg, 1, Tp, -2)
  qh = (
      _pad_to(q * H**-0.5, 1, Tp).reshape(B, Tp, K, G, H).transpose(0, 2, 3, 1, 4)
  )  # [B, K, G, T, H]
  kh = _pad_to(k, 1, Tp).transpose(0, 2, 1, 3)  # [B, K, T, H]
  vh = _pad_to(v, 1, Tp).transpose(0, 2, 1, 3)
  per_head = jax.vmap(kernel, in_axes=(0, 0, 0, None))  # over the K kv heads
  per_row = jax.vmap(per_head, in_axes=(0, 0, 0, 0))  # over the batch (segment ids per row)
  out = per_row(qh, kh, vh, SegmentIds(q=q_seg, kv=kv_seg))  # [B, K, G, Tp, H]
  return out.transpose(0, 3, 1, 2, 4)[:, :T].reshape(B, T, N, H).astype(q.dtype)


def splash(
    q,
    k,
    v,
    key_mask,
    segment_ids=None,
    *,
    mesh: Mesh | None = None,
    batch_axes: tuple = (),
    head_axes: tuple = (),
    interpret: bool | None = None,
):
  """The Pallas TPU splash-attention kernel (causal, segment ids), per batch row and KV head; under
  shard_map over the batch and head axes when a mesh is given. Off TPU it runs in interpret mode.

  Query rows that may attend to nothing (padding) average the keys the kernel visits instead of all keys
  (unlike `reference`): finite, and masked out by the caller like every padding row."""
  if k.shape[1] != q.shape[1]:
    raise ValueError(
        f"splash attention needs S == T (training forward), got {k.shape[1]} vs {q.shape[1]}"
    )
  B, T, N, H = q.shape
  K = k.shape[2]
  seg = jnp.zeros((B, T), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
  if interpret is None:
    platform = mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()
    interpret = platform != "tpu"
  local = functools.partial(_splash_local, interpret=interpret)
  if mesh is None or jax.sharding.get_abstract_mesh().manual_axes:
    return local(q, k, v, key_mask.astype(bool), seg)
  # Batch over the `batch` axes that divide B (as the activations are sharded), heads over `heads`.
  keep = dividing_axes(batch_axes, mesh, B)
  heads = tuple(a for a in head_axes if mesh.shape[a] > 1)
  t = math.prod(mesh.shape[a] for a in heads)
  if N % t or K % t:
    raise ValueError(
        f"model.attention_impl=splash: the heads axis {heads} (size {t}) must divide model.num_heads={N}"
        f" and model.num_kv_heads={K} (parallel.rules 'heads')"
    )
  b = keep or None
  h = heads or None
  x_spec, row_spec = P(b, None, h, None), P(b, None)
  return jax.shard_map(
      local,
      mesh=mesh,
      in_specs=(x_spec, x_spec, x_spec, row_spec, row_spec),
      out_specs=x_spec,
      check_vma=False,
  )(q, k, v, key_mask.astype(bool), seg)
