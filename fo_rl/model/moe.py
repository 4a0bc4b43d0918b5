"""Mixture-of-Experts: the gating function (with optional Routing Replay) and two dispatch paths.

Gating (algorithms.md section 5): probabilities are a softmax of the *live* router logits s = x W_r. Live
routing takes their top-k; replay takes the given expert ids instead. Either way the gate weights are the
live probabilities at the chosen ids, renormalized when `norm_topk_prob`:
    g_i = I_i exp(s_i) / sum_j I_j exp(s_j),
so the router keeps receiving gradient under replay and, with the live top-k as I, this is exactly
Qwen3's softmax -> top-k -> renormalize. It is computed as a softmax over the k chosen logits, which
stays finite when the chosen experts' full-softmax probabilities underflow (replayed experts can sit far
below the live maximum).

Dispatch: `dispatch_reference` is the readable definition (every expert on every token, mixed by a dense
one-hot combine matrix). `dispatch_fast` is dropless: sort the N*k (token, expert) assignments by expert,
run each expert on its rows only (a grouped matmul), unsort. On a mesh whose `expert` axis is > 1 it runs
under shard_map: tokens are split over the batch axes, each shard sends its rows to the shard owning the
expert with an all-to-all, computes its local experts, and sends the results back.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from fo_rl.model.qdot import qeinsum, qragged_dot
from fo_rl.model.qtensor import QTensor


class Experts(NamedTuple):
  gate: jax.Array | QTensor  # [E, D, F]
  up: jax.Array | QTensor  # [E, D, F]
  down: jax.Array | QTensor  # [E, F, D]


# ------------------------------------------------------------------------------------------------
# Gating.
# ------------------------------------------------------------------------------------------------
def route(
    router_logits: jax.Array,
    k: int,
    norm_topk_prob: bool = True,
    routes: jax.Array | None = None,
):
  """router_logits [..., E] -> (ids [..., k] int32, gate weights [..., k] float32).

  Live: the ids are the top-k logits (the top-k probabilities). With `routes` [..., k] (the expert ids
  to replay) those ids are taken as given (integer data, no gradient). Either way the weights are
  g_i = exp(s_i) / sum_{j in ids} exp(s_j) with `norm_topk_prob`, a softmax over the k chosen logits
  (never the full softmax renormalized, which is 0/0 when the chosen experts' probabilities underflow,
  as replayed ones can), else the full softmax's probabilities at the ids.

  An id outside [0, E), or an id twice in one token's routes, is an error: raised when the ids are
  concrete, and when traced (inside jit, where nothing can be raised) that token's gate weights become
  NaN so the error cannot pass silently.
  """
  num_experts = router_logits.shape[-1]
  logits = router_logits.astype(jnp.float32)
  if routes is None:
    ids = jax.lax.top_k(logits, k)[1]
    valid = None
  else:
    if routes.shape[-1] != k:
      raise ValueError(
          f"replay routes have {routes.shape[-1]} experts per token, the model uses {k}"
      )
    ids = routes.astype(jnp.int32)
    check_replay_ids(ids, num_experts)
    valid = jnp.all((ids >= 0) & (ids < num_experts), axis=-1, keepdims=True)
    valid = valid & ~_has_duplicates(ids)
  safe = ids if valid is None else jnp.clip(ids, 0, num_experts - 1)
  if norm_topk_prob:
    weights = jax.nn.softmax(jnp.take_along_axis(logits, safe, axis=-1), axis=-1)
  else:
    weights = jnp.take_along_axis(jax.nn.softmax(logits, axis=-1), safe, axis=-1)
  if valid is not None:
    weights = jnp.where(valid, weights, jnp.nan)
  return ids.astype(jnp.int32), weights


def _has_duplicates(ids) -> jax.Array:
  """[..., k] ids -> [..., 1] bool: some id appears twice."""
  s = jnp.sort(ids, axis=-1)
  return jnp.any(s[..., 1:] == s[..., :-1], axis=-1, keepdims=True)


def check_replay_ids(ids, num_experts: int, where: str = "replay routes") -> None:
  """Raise on ids outside [0, num_experts), or on an id twice in one token's k ids, when they are
  concrete (a no-op on tracers)."""
  if isinstance(ids, jax.core.Tracer):
    return
  ids = jax.device_get(ids)
  bad = (ids < 0) | (ids >= num_experts)
  if bad.any():
    first = tuple(int(a[0]) for a in bad.nonzero())
    raise ValueError(
        f"{where}: expert id {int(ids[first])} at index {first} is outside "
        f"[0, {num_experts}) (-1 marks a dense layer and must never reach a MoE layer)"
    )
  s = np.sort(ids, axis=-1)
  dup = np.any(s[..., 1:] == s[..., :-1], axis=-1)
  if dup.any():
    first = tuple(int(a[0]) for a in dup.nonzero())
    raise ValueError(
        f"{where}: token {first} lists expert {_first_duplicate(ids[first])} twice in its "
        f"{ids.shape[-1]} experts {ids[first].tolist()}; a token's experts must be distinct"
    )


def _first_duplicate(row) -> int:
  seen = set()
  for e in row.tolist():
    if e in seen:
      return e
    seen.add(e)
  raise AssertionError(row)


# ------------------------------------------------------------------------------------------------
# Expert FFN.
# ------------------------------------------------------------------------------------------------
def dispatch_reference(
    x: jax.Array, ids: jax.Array, weights: jax.Array, experts: Experts
) -> jax.Array:
  """x [N, D], ids/weights [N, k] -> [N, D]. Every expert runs on every token (E/k times the work)."""
  E = experts.gate.shape[0]
  dt = x.dtype
  combine = jnp.sum(
      jax.nn.one_hot(ids, E, dtype=jnp.float32) * weights[..., None], axis=-2
  )  # [N, E]
  h = jax.nn.silu(_ex("nd,edf->nef", x, experts.gate, dt)) * _ex("nd,edf->nef", x, experts.up, dt)
  y = _ex("nef,efd->ned", h, experts.down, dt)
  return jnp.einsum("ned,ne->nd", y.astype(jnp.float32), combine).astype(dt)


def dispatch_dense(x: jax.Array, ids: jax.Array, weights: jax.Array, experts: Experts) -> jax.Array:
  """x [N, D], ids/weights [N, k] -> [N, D]: every expert on every token, like dispatch_reference, but
  with the routing weights applied to the hidden activations, so that the down projection also sums
  over the experts: y = (c * h) [N, E*F] @ down [E*F, D]. Two [N, D] @ [D, E*F] matmuls and one
  [N, E*F] @ [E*F, D], no sort, gather or scatter. E/k times the FLOPs of a dropless dispatch, so it
  pays off only with few experts per active one (the sampler's moe_impl="auto" picks it for E <= 4k).
  """
  E, D, F = experts.gate.shape
  dt = x.dtype
  combine = jnp.sum(
      jax.nn.one_hot(ids, E, dtype=jnp.float32) * weights[..., None], axis=-2
  )  # [N, E]
  gate, up = (_as_2d(w) for w in (experts.gate, experts.up))
  mm = lambda w: _ex("nd,df->nf", x, w, dt) if isinstance(w, QTensor) else x @ w.astype(dt)
  h = jax.nn.silu(mm(gate)) * mm(up)  # [N, E*F]
  h = h.reshape(-1, E, F) * combine[..., None].astype(dt)
  if isinstance(experts.down, QTensor):
    # The down projection's scale [E, 1, D] varies with the expert, which this matmul sums over: run
    # it per expert (each (token, expert) row quantized on its own, as a grouped matmul does) and
    # sum the experts after scaling.
    return jnp.sum(_ex("nef,efd->ned", h, experts.down, dt).astype(jnp.float32), axis=1).astype(dt)
  return h.reshape(-1, E * F) @ experts.down.astype(dt).reshape(E * F, D)


def _ex(spec, x, w, dtype):
  """An expert matmul: quantized weights are consumed as (q, scale), never dequantized (qdot.py)."""
  return qeinsum(spec, x, w, dtype, defer_scale=True)


def _as_2d(w):
  """[E, D, F] -> [D, E*F] (a QTensor's scale [E, 1, F] -> [1, E*F]: still per output column)."""
  fn = lambda a: a.transpose(1, 0, 2).reshape(a.shape[1], -1)
  return w.map(fn) if isinstance(w, QTensor) else fn(w)


def _block_layout(group_sizes, A: int, block: int):
  """The padded layout of A rows sorted by group: each group padded to a multiple of `block` rows, so
  every block belongs to one group. (num_blocks = ceil(A / block) + G, static: the waste is at most
  G * block rows; dest [A]: the padded row of sorted row i, num_blocks * block (out of range) for rows
  past sum(group_sizes); block_group [num_blocks]: each block's group.)"""
  G = group_sizes.shape[0]
  num_blocks = -(-A // block) + G
  ends = jnp.cumsum(group_sizes)
  starts = ends - group_sizes
  padded = (group_sizes + block - 1) // block * block
  padded_ends = jnp.cumsum(padded)
  padded_starts = padded_ends - padded
  rows = jnp.arange(A)
  row_group = jnp.searchsorted(ends, rows, side="right")  # G for padding rows
  g = jnp.minimum(row_group, G - 1)
  dest = jnp.where(row_group < G, padded_starts[g] + rows - starts[g], num_blocks * block)
  block_group = jnp.minimum(
      jnp.searchsorted(padded_ends, jnp.arange(num_blocks) * block, side="right"), G - 1
  )
  return num_blocks, dest.astype(jnp.int32), block_group


def _blocked_swiglu(xp, experts: Experts, block_group):
  """The SwiGLU FFN of padded blocks xp [nb, block, D], block b by expert block_group[b]: one batched
  matmul per projection. Each block's expert weights are gathered as stored (a QTensor stays low
  precision: q and its scale rows; plain weights get their gradient back by `_expert_of_blocks`)."""
  dt = xp.dtype
  take = lambda w: w[block_group] if isinstance(w, QTensor) else _expert_of_blocks(w, block_group)
  gate, up, down = (take(w) for w in experts)  # [nb, D, F], [nb, F, D]
  h = jax.nn.silu(_ex("nbd,ndf->nbf", xp, gate, dt)) * _ex("nbd,ndf->nbf", xp, up, dt)
  return _ex("nbf,nfd->nbd", h, down, dt)


def _expert_ffn_blocked(xs, group_sizes, experts: Experts, block: int):
  """Grouped SwiGLU FFN as a padded batched matmul (`_block_layout`). xs [A, D] sorted by group;
  group_sizes [G]. Rows past sum(group_sizes) are padding and give zeros."""
  A, D = xs.shape
  num_blocks, dest, block_group = _block_layout(group_sizes, A, block)
  xp = jnp.zeros((num_blocks * block, D), xs.dtype).at[dest].set(xs, mode="drop")
  yp = _blocked_swiglu(xp.reshape(num_blocks, block, D), experts, block_group)
  return jnp.take(yp.reshape(num_blocks * block, D), dest, axis=0, mode="fill", fill_value=0)


def _expert_ffn_ragged(xs, group_sizes, experts: Experts):
  """Grouped SwiGLU FFN with jax.lax.ragged_dot (native grouped matmul on TPU/GPU)."""
  dt = xs.dtype
  gate, up, down = experts
  h = jax.nn.silu(qragged_dot(xs, gate, group_sizes, dt)) * qragged_dot(xs, up, group_sizes, dt)
  y = qragged_dot(h, down, group_sizes, dt)
  total = jnp.sum(group_sizes)
  return jnp.where((jnp.arange(xs.shape[0]) < total)[:, None], y, 0)


# Megablox tiles (rows, contraction, columns), clipped to the problem: MaxText's defaults.
MEGABLOX_TILING = (512, 1024, 1024)


def _megablox_gmm(x, w, group_sizes, dtype, interpret: bool):
  """x [A, D] @ w[g] for each group's rows with JAX's Pallas TPU grouped matmul (megablox `ops.gmm`),
  whose custom VJP takes the weight gradient with the transposed grouped matmul (`tgmm`): each
  expert's gradient visits its own rows only. (`ragged_dot`'s weight gradient is a dense convolution
  of every expert with every row on TPU: E x the work; see README "Running on Cloud TPU".) A QTensor
  (the sampler's quantized weights: forward only) goes through `qragged_dot`. Rows are padded to the
  row tile; rows past sum(group_sizes) are not meaningful."""
  if isinstance(w, QTensor):
    return qragged_dot(x, w, group_sizes, dtype)
  from jax.experimental.pallas.ops.tpu.megablox import ops as megablox

  A, D = x.shape
  F = w.shape[2]
  tm = min(MEGABLOX_TILING[0], -(-A // 8) * 8)
  pad = (-A) % tm
  xp = jnp.pad(x.astype(dtype), ((0, pad), (0, 0))) if pad else x.astype(dtype)
  tiling = (tm, min(MEGABLOX_TILING[1], D), min(MEGABLOX_TILING[2], F))
  # positional: ops.gmm's custom_vjp takes preferred_element_type, tiling, transpose_rhs and
  # interpret as non-differentiable arguments
  y = megablox.gmm(
      xp,
      w.astype(dtype),
      group_sizes.astype(jnp.int32),
      dtype,
      tiling,
      None,
      None,
      False,
      interpret,
  )
  return y[:A]


def _expert_ffn_megablox(xs, group_sizes, experts: Experts, interpret: bool):
  """Grouped SwiGLU FFN with megablox (`_megablox_gmm`). The TPU kernel's tiles of the hidden and
  expert dimensions must be multiples of 128 (its backward reuses the forward's tiling with the two
  swapped): experts whose D or F is not (toy sizes) run `ragged_dot` on TPU instead."""
  dt = xs.dtype
  gate, up, down = experts
  D, F = gate.shape[1], gate.shape[2]
  if not interpret and (D % 128 or F % 128):
    return _expert_ffn_ragged(xs, group_sizes, experts)
  mm = lambda x, w: _megablox_gmm(x, w, group_sizes, dt, interpret)  # noqa: E731
  y = mm(jax.nn.silu(mm(xs, gate)) * mm(xs, up), down)
  total = jnp.sum(group_sizes)
  return jnp.where((jnp.arange(xs.shape[0]) < total)[:, None], y, 0)


def resolve_gmm_backend(backend: str, platform: str) -> str:
  """model.gmm_backend for a platform: "auto" is blocked on CPU, megablox on TPU, ragged_dot on GPU."""
  if backend == "auto":
    return {"cpu": "blocked", "tpu": "megablox"}.get(platform, "ragged_dot")
  return backend


def _expert_ffn(xs, group_sizes, experts: Experts, backend: str, block: int, platform: str):
  """`backend`: resolved (`resolve_gmm_backend`)."""
  if backend == "blocked":
    return _expert_ffn_blocked(xs, group_sizes, experts, block)
  if backend == "megablox":  # off TPU in Pallas interpret mode (tests)
    return _expert_ffn_megablox(xs, group_sizes, experts, interpret=platform != "tpu")
  return _expert_ffn_ragged(xs, group_sizes, experts)


# The single-shard blocked dispatch moves rows with gathers only. Token n's j-th assignment (a = n k + j)
# computes in padded row pos[n, j]; padded row r holds assignment src[r] (A = N k for a padding row). The
# two maps are inverse to each other on the real rows, so the backward of "gather x's rows by src // k" is
# "gather the gradient's rows by pos, sum over j", and the backward of "gather the outputs by pos" is
# "gather the gradient's rows by src": no scatter-add, which XLA:CPU runs one row at a time. The expert
# weights of the blocks, w[block_expert], get their gradient back per expert from a one-hot matmul
# instead of a scatter-add.
@jax.custom_vjp
def _rows_to_blocks(x, src, pos):
  """x [N, D] -> [R, D]: row r is x[src[r] // k] (0 where src[r] == N k)."""
  return jnp.take(x, src // pos.shape[1], axis=0, mode="fill", fill_value=0)


def _rows_to_blocks_fwd(x, src, pos):
  return _rows_to_blocks(x, src, pos), (src, pos)


def _rows_to_blocks_bwd(res, g):
  src, pos = res
  return jnp.sum(jnp.take(g, pos, axis=0), axis=1), None, None


_rows_to_blocks.defvjp(_rows_to_blocks_fwd, _rows_to_blocks_bwd)


@jax.custom_vjp
def _blocks_to_rows(y, src, pos):
  """y [R, D] -> [N, k, D]: [n, j] is y[pos[n, j]]."""
  return jnp.take(y, pos, axis=0)


def _blocks_to_rows_fwd(y, src, pos):
  return _blocks_to_rows(y, src, pos), (src, pos)


def _blocks_to_rows_bwd(res, g):
  src, pos = res  # g [N, k, D]
  N, k, D = g.shape
  return jnp.take(g.reshape(N * k, D), src, axis=0, mode="fill", fill_value=0), None, None


_blocks_to_rows.defvjp(_blocks_to_rows_fwd, _blocks_to_rows_bwd)


@jax.custom_vjp
def _expert_of_blocks(w, block_expert):
  """w [E, ...] -> [nb, ...]: each block's expert weights (block_expert [nb] sorted)."""
  return w[block_expert]


def _expert_of_blocks_fwd(w, block_expert):
  return w[block_expert], (block_expert, w.shape[0])


def _expert_of_blocks_bwd(res, g):
  block_expert, E = res
  onehot = jax.nn.one_hot(block_expert, E, dtype=g.dtype)  # [nb, E]
  gw = jnp.einsum("ne,nx->ex", onehot, g.reshape(g.shape[0], -1))
  return gw.reshape(E, *g.shape[1:]), None


_expert_of_blocks.defvjp(_expert_of_blocks_fwd, _expert_of_blocks_bwd)


def _dispatch_local_blocked(x, ids, weights, experts: Experts, block: int):
  """`_dispatch_local` with the blocked grouped matmul, rows moved by the gathers above: the same
  function as sort -> `_expert_ffn_blocked` -> unsort, in fewer passes over the rows."""
  N, k = ids.shape
  D = x.shape[-1]
  A = N * k
  flat = ids.reshape(-1)
  order = jnp.argsort(flat, stable=True).astype(jnp.int32)  # sorted row i is assignment order[i]
  group_sizes = jnp.bincount(flat, length=experts.gate.shape[0]).astype(jnp.int32)
  num_blocks, dest, block_expert = _block_layout(group_sizes, A, block)
  pos = jnp.zeros((A,), jnp.int32).at[order].set(dest).reshape(N, k)
  R = num_blocks * block
  src = jnp.full((R,), A, jnp.int32).at[dest].set(order)
  xp = _rows_to_blocks(x, src, pos).reshape(num_blocks, block, D)
  yp = _blocked_swiglu(xp, experts, block_expert).reshape(R, D)
  y = _blocks_to_rows(yp, src, pos)  # [N, k, D]
  return jnp.einsum("nkd,nk->nd", y.astype(jnp.float32), weights).astype(x.dtype)


def _inverse_permutation(order):
  return jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))


def _dispatch_local(x, ids, weights, experts: Experts, backend: str, block: int, platform: str):
  """Single-shard dropless dispatch: sort assignments by expert, grouped FFN, unsort, combine."""
  N, k = ids.shape
  E = experts.gate.shape[0]
  if backend == "blocked":
    return _dispatch_local_blocked(x, ids, weights, experts, block)
  flat = ids.reshape(-1)
  order = jnp.argsort(flat, stable=True)
  xs = x[order // k]  # [A, D]
  group_sizes = jnp.bincount(flat, length=E).astype(jnp.int32)
  ys = _expert_ffn(xs, group_sizes, experts, backend, block, platform)
  y = ys[_inverse_permutation(order)].reshape(N, k, -1)
  return jnp.einsum("nkd,nk->nd", y.astype(jnp.float32), weights).astype(x.dtype)


def _dispatch_expert_parallel(
    x,
    ids,
    weights,
    experts: Experts,
    backend: str,
    block: int,
    expert_axis: str,
    mlp_axes: tuple[str, ...],
    platform: str,
):
  """Body run per device under shard_map. x [n, D] local tokens; experts hold E/ep local experts.

  Buffers are sized for the worst case (all of a shard's A = n*k assignments going to one expert shard),
  which keeps shapes static and the dispatch dropless.
  """
  n, k = ids.shape
  D = x.shape[-1]
  ep = jax.lax.axis_size(expert_axis)
  e_local = experts.gate.shape[0]
  A = n * k
  flat = ids.reshape(-1)
  order = jnp.argsort(flat, stable=True)
  sorted_ids = flat[order]
  xs = x[order // k]  # [A, D] sorted by global expert id, hence by destination shard
  dest = sorted_ids // e_local
  counts = jnp.bincount(dest, length=ep)
  starts = jnp.cumsum(counts) - counts
  slot = jnp.arange(A)
  src = starts[:, None] + slot[None, :]  # [ep, A]
  valid = slot[None, :] < counts[:, None]
  src = jnp.minimum(src, A - 1)
  send_x = jnp.where(valid[..., None], xs[src], 0)  # [ep, A, D]
  send_e = jnp.where(valid, sorted_ids[src] - jnp.arange(ep)[:, None] * e_local, e_local)
  recv_x = jax.lax.all_to_all(send_x, expert_axis, 0, 0).reshape(ep * A, D)
  recv_e = jax.lax.all_to_all(send_e, expert_axis, 0, 0).reshape(ep * A)
  order2 = jnp.argsort(recv_e, stable=True)  # local expert id; the padding id e_local sorts last
  group_sizes = jnp.bincount(recv_e, length=e_local + 1)[:e_local].astype(jnp.int32)
  ry = _expert_ffn(recv_x[order2], group_sizes, experts, backend, block, platform)
  if mlp_axes:  # the expert hidden dim F is split over mlp_axes: each shard holds a partial sum
    ry = jax.lax.psum(ry, mlp_axes)
  back = ry[_inverse_permutation(order2)].reshape(ep, A, D)
  ret = jax.lax.all_to_all(back, expert_axis, 0, 0)  # ret[j, r]: result of my r-th row sent to j
  ys = ret[dest, slot - starts[dest]]  # [A, D] in sorted order
  y = ys[_inverse_permutation(order)].reshape(n, k, D)
  return jnp.einsum("nkd,nk->nd", y.astype(jnp.float32), weights).astype(x.dtype)


def _weight_spec(w, spec: P) -> P | QTensor:
  """In-spec for a weight; a QTensor's scale leaves its size-1 (contracted) axes unsharded."""
  if isinstance(w, QTensor):
    sspec = P(*(s if w.scale.shape[d] != 1 else None for d, s in enumerate(spec)))
    return dataclasses.replace(w, q=spec, scale=sspec)
  return spec


def expert_parallel_axes(
    mesh: Mesh, token_axes: tuple[str, ...], mlp_axes: tuple[str, ...]
) -> tuple[tuple[str, ...], tuple[str, ...]]:
  """The mesh axes (size > 1) the expert-parallel dispatch splits the tokens over (`token_axes`, the
  `batch` rule's, plus `expert`) and the expert hidden dimension F over (`mlp_axes`, the `expert_mlp`
  rule's: each shard computes a partial sum over its slice of F, summed by a psum over them).

  The two must be disjoint: on an axis in both, the shards hold different tokens, and the psum would
  add partial results of different tokens (a wrong output, no error). That is a ValueError naming
  parallel.rules.
  """
  token_axes = tuple(a for a in token_axes if mesh.shape[a] > 1)
  if "expert" not in token_axes:
    token_axes = token_axes + ("expert",)
  mlp_axes = tuple(a for a in mlp_axes if mesh.shape[a] > 1)
  shared = [a for a in mlp_axes if a in token_axes]
  if shared:
    raise ValueError(
        f"parallel.rules: the expert-parallel MoE dispatch splits the tokens over mesh axes "
        f"{token_axes} (the 'batch' rule, plus 'expert') and the experts' hidden dimension over "
        f"{mlp_axes} (the 'expert_mlp' rule); both name {shared}, where the sum over the hidden "
        f"dimension would add up partial results of different tokens. Map 'batch' and "
        f"'expert_mlp' to disjoint mesh axes (or give {shared} size 1 in parallel.mesh)."
    )
  return token_axes, mlp_axes


def dispatch_fast(
    x,
    ids,
    weights,
    experts: Experts,
    *,
    mesh: Mesh | None = None,
    token_axes: tuple[str, ...] = (),
    mlp_axes: tuple[str, ...] = ("tensor",),
    backend: str = "auto",
    block: int = 32,
):
  """x [N, D], ids/weights [N, k] -> [N, D], dropless. Expert-parallel when mesh['expert'] > 1.

  token_axes: the mesh axes of the `batch` rule (the tokens are split over them and `expert`);
  mlp_axes: those of the `expert_mlp` rule (the experts' hidden dimension is split over them). They
  must not overlap (`expert_parallel_axes`)."""
  platform = mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()
  backend = resolve_gmm_backend(backend, platform)
  if mesh is None or mesh.shape.get("expert", 1) == 1:
    return _dispatch_local(x, ids, weights, experts, backend, block, platform)
  E = experts.gate.shape[0]
  ep = mesh.shape["expert"]
  if E % ep:
    raise ValueError(f"model.num_experts={E} is not divisible by the mesh's expert axis ({ep})")
  token_axes, mlp_axes = expert_parallel_axes(mesh, tuple(token_axes), tuple(mlp_axes))
  n_shards = math.prod(mesh.shape[a] for a in token_axes)
  N = x.shape[0]
  pad = (-N) % n_shards  # pad tokens so every shard gets the same count; padded rows are dropped
  if pad:
    x = jnp.pad(x, ((0, pad), (0, 0)))
    ids = jnp.pad(ids, ((0, pad), (0, 0)))
    weights = jnp.pad(weights, ((0, pad), (0, 0)))
  mlp = mlp_axes[0] if len(mlp_axes) == 1 else (mlp_axes or None)
  tok = P(token_axes, None)
  w_in = P("expert", None, mlp)
  w_out = P("expert", mlp, None)
  in_specs = (
      tok,
      tok,
      tok,
      Experts(
          _weight_spec(experts.gate, w_in),
          _weight_spec(experts.up, w_in),
          _weight_spec(experts.down, w_out),
      ),
  )
  body = functools.partial(
      _dispatch_expert_parallel,
      backend=backend,
      block=block,
      expert_axis="expert",
      mlp_axes=mlp_axes,
      platform=platform,
  )
  context = jax.sharding.get_abstract_mesh()
  if context.manual_axes:  # inside a shard_map over other axes (the sampler's per-shard decode)
    mesh = context
  out = jax.shard_map(body, mesh=mesh, in_specs=in_specs, out_specs=tok, check_vma=False)(
      x, ids, weights, experts
  )
  return out[:N]
