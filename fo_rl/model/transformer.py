"""A Qwen3-MoE-style decoder in Flax NNX, with replayable routing and an optional KV cache.

Parameter names mirror Hugging Face's Qwen3MoeForCausalLM (see fo_rl/model/hf.py); every nnx.Param
carries logical axis names in its `axes` metadata (fo_rl/parallel/sharding.py maps them to the mesh).
Shape letters: B batch, T length, S kv length, N heads, K kv heads, G = N/K, H head dim, D model,
E experts, F hidden, V vocab, L layers, k experts per token.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from fo_rl.model import attention, moe, paged_attention
from fo_rl.model.config import ModelConfig
from fo_rl.model.qdot import qdot, qeinsum
from fo_rl.model.qtensor import QTensor, materialize
from fo_rl.parallel.sharding import DEFAULT_RULES, Rules, batch_spec, validate_rules

DENSE_ROUTE = -1  # the routes sentinel of a dense (non-MoE) layer


def route_dtype(num_experts: int):
  """The narrowest signed integer holding every route id (DENSE_ROUTE and 0..num_experts-1), which the
  sampler's output and the rollouts store routes in: int8 up to 128 experts, a quarter of int32's HBM
  (the paper_n8 step's R3 routes, [8192, 33792, 48, 8], take 3.1 GiB per chip of v5p-64 instead of
  12.4). The model widens them to int32 where it reads them (`moe.route`)."""
  for dt in (jnp.int8, jnp.int16):
    if num_experts - 1 <= jnp.iinfo(dt).max:
      return dt
  return jnp.int32


_MASKED = attention.MASKED  # finite, so a fully masked (padding) query row gives no NaN
_FEW_ROWS = 8  # cached attention: up to this many query rows per kv head, one matvec per row


def _init(rngs, shape, axes, dtype, std=0.02):
  return nnx.Param(std * jax.random.normal(rngs.params(), shape, dtype), axes=axes)


class RMSNorm(nnx.Module):

  def __init__(self, dim: int, eps: float, param_dtype):
    self.weight = nnx.Param(jnp.ones((dim,), param_dtype), axes=("norm",))
    self.eps = eps

  def __call__(self, x):
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    return (materialize(self.weight.get_value(), jnp.float32) * xf).astype(x.dtype)


def rope(x, positions, theta: float):
  """Rotary embedding, Hugging Face's rotate-half convention. x [B, T, N, H], positions [B, T]."""
  H = x.shape[-1]
  inv_freq = 1.0 / (theta ** (np.arange(0, H, 2, dtype=np.float32) / H))  # [H/2]
  ang = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, H/2]
  ang = jnp.concatenate([ang, ang], axis=-1)[:, :, None, :]
  cos, sin = jnp.cos(ang), jnp.sin(ang)
  xf = x.astype(jnp.float32)
  x1, x2 = jnp.split(xf, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return (xf * cos + rotated * sin).astype(x.dtype)


class Attention(nnx.Module):
  """Grouped-query attention with per-head q/k RMSNorm and RoPE (Qwen3)."""

  def __init__(
      self,
      cfg: ModelConfig,
      rngs: nnx.Rngs,
      mesh=None,
      token_axes: tuple = (),
      head_axes: tuple = (),
  ):
    D, N, K, H = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    pd = jnp.dtype(cfg.param_dtype)
    self.q_proj = _init(rngs, (D, N, H), ("embed", "heads", "head_dim"), pd)
    self.k_proj = _init(rngs, (D, K, H), ("embed", "kv_heads", "head_dim"), pd)
    self.v_proj = _init(rngs, (D, K, H), ("embed", "kv_heads", "head_dim"), pd)
    self.o_proj = _init(rngs, (N, H, D), ("heads", "head_dim", "embed"), pd)
    self.q_norm = RMSNorm(H, cfg.rms_norm_eps, pd)
    self.k_norm = RMSNorm(H, cfg.rms_norm_eps, pd)
    self.cfg, self.mesh, self.token_axes, self.head_axes = cfg, mesh, token_axes, head_axes

  def __call__(self, x, positions, key_mask, cache=None, cache_index=None):
    """x [B, T, D]; key_mask [B, S] (S = T, or the cache length); cache {'k','v': [B, K, H, S]}."""
    cfg, dt = self.cfg, x.dtype
    q = qeinsum("btd,dnh->btnh", x, self.q_proj.get_value(), dt)
    k = qeinsum("btd,dkh->btkh", x, self.k_proj.get_value(), dt)
    v = qeinsum("btd,dkh->btkh", x, self.v_proj.get_value(), dt)
    q = rope(self.q_norm(q), positions, cfg.rope_theta)
    k = rope(self.k_norm(k), positions, cfg.rope_theta)
    if cache is None:
      return self._attend(q, k, v, key_mask), None
    if isinstance(cache_index, paged_attention.PagedBatch):  # the paged engine's step
      out, new_cache = paged_attention.attend(
          q, k, v, cache, cache_index, self.mesh, self.token_axes, self.head_axes
      )
      return qeinsum("btnh,nhd->btd", out, self.o_proj.get_value(), dt), new_cache
    if isinstance(cache_index, int) and cache_index == 0 and cache["k"].shape[3] == x.shape[1]:
      # Filling a cache exactly as long as the input (the sampler's prefill): plain causal attention over
      # the new keys, which are the whole cache; the cache only stores them.
      new_cache = {
          n: t.transpose(0, 2, 3, 1).astype(cache[n].dtype) for n, t in (("k", k), ("v", v))
      }
      return self._attend(q, k, v, key_mask), new_cache
    return self._attend_cached(q, k, v, key_mask, cache, cache_index)

  def _attend(self, q, k, v, key_mask):
    """Causal attention of q [B, T, N, H] over k, v [B, T, K, H] -> [B, T, D], by model.attention_impl
    (fo_rl/model/attention.py). key_mask [B, T]: bool (real keys), or int32 segment ids of packed rows
    (0: padding; a query sees only keys of its own segment), which is how Transformer passes them.
    """
    segment_ids = None
    if jnp.issubdtype(key_mask.dtype, jnp.integer):
      segment_ids, key_mask = key_mask, key_mask > 0
    out = attention.attend(
        q,
        k,
        v,
        key_mask,
        segment_ids,
        impl=self.cfg.attention_impl,
        mesh=self.mesh,
        batch_axes=self.token_axes,
        head_axes=self.head_axes,
    )
    return qeinsum("btnh,nhd->btd", out, self.o_proj.get_value(), q.dtype)

  def _attend_cached(self, q, k, v, key_mask, cache, cache_index):
    """Attention over a KV cache {'k','v': [B, K, H, S]}, writing the new keys/values at slots
    cache_index + [0, T).

    The layout is chosen for decode (T = 1) on CPU, where attention over the cache is most of a small
    model's step: both products are B*K small matrix products whose long axis is the slot axis S, and
    keeping S minor lets each one stream its [H, S] matrix once. scores = q [G*T, H] @ k [H, S] runs
    2.6x faster than with a [B, K, S, H] cache, values 1.2x (measured at B=64 K=2 G=2 H=16 S=96), and a
    [B, S, K, H] cache made XLA transpose the whole cache on every step. With few query rows (decode:
    G*T <= _FEW_ROWS) the value product is one matrix-vector product per row, which XLA:CPU runs faster
    than one matrix product with a handful of rows."""
    dt = q.dtype
    B, T, N, H = q.shape
    K = k.shape[2]
    G = N // K
    ck = jax.lax.dynamic_update_slice_in_dim(
        cache["k"], k.transpose(0, 2, 3, 1).astype(cache["k"].dtype), cache_index, 3
    )
    cv = jax.lax.dynamic_update_slice_in_dim(
        cache["v"], v.transpose(0, 2, 3, 1).astype(cache["v"].dtype), cache_index, 3
    )
    S = ck.shape[3]
    q_slot = cache_index + jnp.arange(T)
    allowed = (jnp.arange(S)[None, :] <= q_slot[:, None])[None] & key_mask[:, None, :]  # [B, T, S]
    qm = q.reshape(B, T, K, G, H).transpose(0, 2, 3, 1, 4).reshape(B, K, G * T, H)
    scores = (
        jnp.einsum("bkmh,bkhs->bkms", qm, ck.astype(dt), preferred_element_type=jnp.float32)
        * H**-0.5
    )
    scores = jnp.where(allowed[:, None, None], scores.reshape(B, K, G, T, S), _MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(dt).reshape(B, K, G * T, S)
    vals = cv.astype(dt)
    if G * T <= _FEW_ROWS:
      out = jnp.stack([jnp.einsum("bks,bkhs->bkh", probs[:, :, m], vals) for m in range(G * T)], 2)
    else:
      out = jnp.einsum("bkms,bkhs->bkmh", probs, vals)
    out = out.reshape(B, K, G, T, H).transpose(0, 3, 1, 2, 4).reshape(B, T, N, H)
    out = qeinsum("btnh,nhd->btd", out, self.o_proj.get_value(), dt)
    return out, {"k": ck, "v": cv}


class MLP(nnx.Module):
  """Dense SwiGLU MLP (Qwen3's mlp_only_layers / non-sparse layers)."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    D, F, pd = cfg.hidden_size, cfg.intermediate_size, jnp.dtype(cfg.param_dtype)
    self.gate_proj = _init(rngs, (D, F), ("embed", "mlp"), pd)
    self.up_proj = _init(rngs, (D, F), ("embed", "mlp"), pd)
    self.down_proj = _init(rngs, (F, D), ("mlp", "embed"), pd)

  def __call__(self, x):
    dt = x.dtype
    h = jax.nn.silu(qdot(x, self.gate_proj.get_value(), dt)) * qdot(x, self.up_proj.get_value(), dt)
    return qdot(h, self.down_proj.get_value(), dt)


class MoEBlock(nnx.Module):
  """Router + experts. Returns the block output and the experts used, ids [B, T, k]; given `routes`
  [B, T, k] (this layer's slice of the model's routes) it uses those experts at real tokens."""

  def __init__(
      self, cfg: ModelConfig, rngs: nnx.Rngs, mesh: Mesh | None, token_axes: tuple, mlp_axes: tuple
  ):
    D, F, E = cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts
    pd = jnp.dtype(cfg.param_dtype)
    self.router = _init(rngs, (D, E), ("embed", "router"), pd)
    self.gate_proj = _init(rngs, (E, D, F), ("expert", "embed", "expert_mlp"), pd)
    self.up_proj = _init(rngs, (E, D, F), ("expert", "embed", "expert_mlp"), pd)
    self.down_proj = _init(rngs, (E, F, D), ("expert", "expert_mlp", "embed"), pd)
    self.cfg, self.mesh, self.token_axes, self.mlp_axes = cfg, mesh, token_axes, mlp_axes

  def __call__(self, x, routes=None, token_mask=None):
    cfg = self.cfg
    B, T, D = x.shape
    xf = x.reshape(B * T, D)
    # The router runs in float32 whatever the compute dtype: top-k decisions are brittle.
    logits = qdot(xf.astype(jnp.float32), self.router.get_value(), jnp.float32)  # [BT, E]
    if routes is not None:
      routes = routes.reshape(B * T, -1)
      if token_mask is not None:  # padding positions are never checked: they route live
        live = jax.lax.top_k(logits, cfg.num_experts_per_tok)[1]
        routes = jnp.where(token_mask.reshape(B * T, 1), routes, live)
    ids, weights = moe.route(logits, cfg.num_experts_per_tok, cfg.norm_topk_prob, routes)
    experts = moe.Experts(
        self.gate_proj.get_value(), self.up_proj.get_value(), self.down_proj.get_value()
    )
    if cfg.moe_impl == "reference":
      y = moe.dispatch_reference(xf, ids, weights, experts)
    elif cfg.moe_impl == "dense":
      y = moe.dispatch_dense(xf, ids, weights, experts)
    else:
      y = moe.dispatch_fast(
          xf,
          ids,
          weights,
          experts,
          mesh=self.mesh,
          token_axes=self.token_axes,
          mlp_axes=self.mlp_axes,
          backend=cfg.gmm_backend,
          block=cfg.moe_block_size,
      )
    return y.reshape(B, T, D), ids.reshape(B, T, -1)


class DecoderLayer(nnx.Module):

  def __init__(
      self, cfg: ModelConfig, index: int, rngs: nnx.Rngs, mesh, token_axes, mlp_axes, head_axes=()
  ):
    pd = jnp.dtype(cfg.param_dtype)
    self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, pd)
    self.self_attn = Attention(cfg, rngs, mesh, token_axes, head_axes)
    self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, pd)
    self.is_moe = cfg.is_moe_layer(index)
    self.mlp = MoEBlock(cfg, rngs, mesh, token_axes, mlp_axes) if self.is_moe else MLP(cfg, rngs)
    self.route_slots = cfg.route_slots

  def __call__(self, x, positions, key_mask, token_mask, routes=None, cache=None, cache_index=None):
    """(x, the experts used [B, T, k] (DENSE_ROUTE in a dense layer), cache); `routes` [B, T, k]: this
    layer's slice of the routes to replay, or None (live routing)."""
    h, new_cache = self.self_attn(self.input_layernorm(x), positions, key_mask, cache, cache_index)
    x = x + h
    h = self.post_attention_layernorm(x)
    B, T = x.shape[:2]
    if self.is_moe:
      h, ids = self.mlp(h, routes, token_mask)
    else:
      h = self.mlp(h)
      ids = jnp.full((B, T, self.route_slots), DENSE_ROUTE, jnp.int32)
      if routes is not None:  # a real id reaching a dense layer means the layer index shifted
        shifted = jnp.any(routes != DENSE_ROUTE, axis=-1, keepdims=True)
        if token_mask is not None:
          shifted = shifted & token_mask[..., None]
        h = jnp.where(shifted, jnp.nan, h)
    return x + h, ids, new_cache


class Transformer(nnx.Module):
  """Qwen3-MoE-style causal LM. `mesh`/`rules` are static: they pick expert-parallel dispatch and the
  activation sharding; the parameters' placement is decided outside (fo_rl/model/init.py)."""

  def __init__(
      self,
      cfg: ModelConfig,
      *,
      rngs: nnx.Rngs,
      mesh: Mesh | None = None,
      rules: Rules = DEFAULT_RULES,
  ):
    rules = tuple((name, axes) for name, axes in rules)
    table = validate_rules(rules)
    token_axes, mlp_axes = table.get("batch", ()), table.get("expert_mlp", ())
    head_axes = table.get("heads", ())
    pd = jnp.dtype(cfg.param_dtype)
    self.embed_tokens = _init(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), pd)
    self.layers = nnx.List(
        [
            DecoderLayer(cfg, i, rngs, mesh, token_axes, mlp_axes, head_axes)
            for i in range(cfg.num_layers)
        ]
    )
    self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, pd)
    if not cfg.tie_word_embeddings:
      self.lm_head = _init(rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), pd)
    self.cfg, self.mesh, self.rules = cfg, mesh, rules

  def __call__(
      self,
      tokens,
      positions,
      routes=None,
      *,
      token_mask=None,
      key_mask=None,
      cache=None,
      cache_index=None,
      return_hidden: bool = False,
      segment_ids=None,
  ):
    """tokens, positions [B, T] int32 -> (logits [B, T, V] float32, the routes chosen live
    [B, T, L, k] int32, cache); with return_hidden, the final hidden states [B, T, D] (after the final
    norm) instead of the logits (`head_matrix()` projects them: fo_rl/model/logprobs.py).

    token_mask [B, T]: real (non-padding) input positions; padding is never attended to and is not
      checked under replay. Default: all real.
    routes [B, T, L, k]: experts to use per (position, layer) at real positions, None: live routing;
      dense layers hold -1 (the layout of `fo_rl.rl.rollouts`, which the returned routes share).
    cache: list over layers of {'k','v': [B, K, H, S]}, written at slots cache_index + [0, T); then
      key_mask [B, S] says which cache slots hold real tokens (it must include the new ones).
    segment_ids [B, T] int32 (no cache): packed rows, several sequences end to end; a position attends
      only to earlier positions of its own segment (positions restart per segment: the caller's).
      They travel to attention as the key mask (int32, 0 at padding).
    """
    cfg = self.cfg
    dt = jnp.dtype(cfg.dtype)
    B, T = tokens.shape
    if token_mask is None:
      token_mask = jnp.ones((B, T), bool)
    if cache is None:
      key_mask = token_mask
      if segment_ids is not None:
        key_mask = jnp.where(token_mask, jnp.asarray(segment_ids, jnp.int32), 0)
    elif segment_ids is not None:
      raise ValueError("segment_ids (packed rows) are for passes without a KV cache")
    elif key_mask is None:
      raise ValueError("key_mask [B, S] is required with a cache")
    if routes is not None:
      validate_replay_routes(routes, cfg, token_mask, (B, T))
    x = jnp.take(materialize(self.embed_tokens.get_value(), dt), tokens, axis=0)
    if self.mesh is not None:
      x = jax.lax.with_sharding_constraint(
          x, NamedSharding(self.mesh, batch_spec(self.rules, 3, self.mesh, B))
      )
    all_ids, new_cache = [], []
    scanned = (
        _scan_layers(self.layers, x, positions, key_mask, token_mask, routes, cfg.remat)
        if cfg.scan_layers and cache is None
        else None
    )
    if scanned is not None:
      x, live_routes = scanned
    for i, layer in enumerate(self.layers if scanned is None else ()):
      layer_routes = None if routes is None else routes[:, :, i, :]
      if (
          cfg.remat and cache is None
      ):  # training: keep only each layer's input for the backward pass
        (x, ids), c = _remat_layer(layer, x, positions, key_mask, token_mask, layer_routes), None
      else:
        x, ids, c = layer(
            x,
            positions,
            key_mask,
            token_mask,
            layer_routes,
            None if cache is None else cache[i],
            cache_index,
        )
      all_ids.append(ids)
      new_cache.append(c)
    if scanned is None:
      live_routes = jnp.stack(all_ids, axis=2)
    x = self.norm(x)
    new_cache = None if cache is None else new_cache
    if return_hidden:
      return x, live_routes, new_cache
    logits = qdot(x.astype(jnp.float32), self.head_weight(), jnp.float32)
    return logits, live_routes, new_cache

  def head_matrix(self):
    """The output projection [D, V] in float32 (the tied embedding, transposed, when tied)."""
    return materialize(self.head_weight(), jnp.float32)

  def head_weight(self):
    """The output projection [D, V] as stored (a QTensor stays one: the tied embedding's q and
    per-row scale [V, 1] transposed to a per-column [1, V])."""
    if self.cfg.tie_word_embeddings:
      w = self.embed_tokens.get_value()
      return w.map(lambda a: a.T) if isinstance(w, QTensor) else jnp.asarray(w).T
    return self.lm_head.get_value()


def _scan_layers(layers, x, positions, key_mask, token_mask, routes, remat: bool):
  """(x, live routes [B, T, L, k]) of the layers run as one lax.scan (model.scan_layers), or None when
  the layers differ in structure (e.g. dense and MoE layers mixed) and cannot be stacked.

  The weights are stacked along a new leading axis inside the step (one extra copy of the parameters,
  sharded as they are); the scan body is one decoder layer, so XLA compiles a single layer whatever the
  depth, and with remat its recomputation in the backward pass runs one layer at a time."""
  splits = [nnx.split(layer) for layer in layers]
  graphdef = splits[0][0]
  if any(g != graphdef for g, _ in splits[1:]):
    return None
  stacked = jax.tree.map(lambda *w: jnp.stack(w), *[s for _, s in splits])

  def body(h, inputs):
    state, layer_routes = inputs
    h, ids, _ = nnx.merge(graphdef, state)(h, positions, key_mask, token_mask, layer_routes)
    return h, ids

  if remat:
    body = jax.checkpoint(body)
  x, ids = jax.lax.scan(
      body, x, (stacked, None if routes is None else jnp.moveaxis(routes, 2, 0))  # [L, B, T, k]
  )
  return x, jnp.moveaxis(ids, 0, 2)


@nnx.remat
def _remat_layer(layer, x, positions, key_mask, token_mask, routes):
  """A decoder layer (no KV cache) whose activations are recomputed in the backward pass (model.remat)."""
  x, ids, _ = layer(x, positions, key_mask, token_mask, routes)
  return x, ids


def validate_replay_routes(routes, cfg: ModelConfig, token_mask=None, bt=None) -> None:
  """Check replay routes before any compute: shape, dense layers hold -1, MoE ids in [0, E) and
  distinct within each token at real tokens. Concrete arrays raise ValueError; traced ones are checked
  inside the layers (NaN outputs).
  """
  expected = (*(bt or routes.shape[:2]), cfg.num_layers, cfg.route_slots)
  if tuple(routes.shape) != expected:
    raise ValueError(
        f"replay routes have shape {tuple(routes.shape)}, expected [B, T, L, k] = " f"{expected}"
    )
  if isinstance(routes, jax.core.Tracer) or isinstance(token_mask, jax.core.Tracer):
    return
  if isinstance(routes, jax.Array) and not routes.is_fully_addressable:
    return _validate_global_replay_routes(routes, cfg, token_mask)
  r = np.asarray(jax.device_get(routes))
  m = np.ones(r.shape[:2], bool) if token_mask is None else np.asarray(jax.device_get(token_mask))
  for i in range(cfg.num_layers):
    ids = r[:, :, i, :][m]
    if cfg.is_moe_layer(i):
      bad = (ids < 0) | (ids >= cfg.num_experts)
      if bad.any():
        raise ValueError(
            f"replay routes: layer {i} is a MoE layer but holds expert id "
            f"{int(ids[bad][0])} outside [0, {cfg.num_experts}) at a real token "
            f"(-1 marks a dense layer)"
        )
      s = np.sort(ids, axis=-1)
      dup = s[:, 1:] == s[:, :-1]
      if dup.any():
        raise ValueError(
            f"replay routes: layer {i} lists expert {int(s[:, 1:][dup][0])} twice at a real "
            f"token; a token's {cfg.route_slots} experts must be distinct"
        )
    elif (ids != DENSE_ROUTE).any():
      raise ValueError(
          f"replay routes: layer {i} is a dense layer but holds expert id "
          f"{int(ids[ids != DENSE_ROUTE][0])}; dense layers must hold -1 (are the layer "
          f"indices shifted?)"
      )


@functools.lru_cache(maxsize=None)
def _route_checker(moe_layers: tuple[bool, ...], num_experts: int):
  """jit: (routes [B, T, L, k], token_mask [B, T] | None) -> (any bad id per layer [L], one of them [L])."""
  moe_layer = np.asarray(moe_layers)
  lowest = np.iinfo(np.int32).min

  @jax.jit
  def check(r, m):
    r = jnp.sort(
        r, axis=-1
    )  # (each token's k ids in order: a repeated id is equal to the one before)
    dup = jnp.pad(r[..., 1:] == r[..., :-1], ((0, 0),) * 3 + ((1, 0),))
    bad = jnp.where(
        moe_layer[None, None, :, None], (r < 0) | (r >= num_experts) | dup, r != DENSE_ROUTE
    )
    if m is not None:
      bad = bad & m[:, :, None, None]
    return jnp.any(bad, axis=(0, 1, 3)), jnp.max(jnp.where(bad, r, lowest), axis=(0, 1, 3))

  return check


def _validate_global_replay_routes(routes, cfg: ModelConfig, token_mask=None) -> None:
  """validate_replay_routes for routes spread over several processes: each process checks the rows on
  its own devices (one jitted reduction), and only the per-layer verdicts [L] are read on the host, so
  every process raises the same error without gathering the routes."""
  from fo_rl.parallel.multihost import host_get

  moe_layers = tuple(cfg.is_moe_layer(i) for i in range(cfg.num_layers))
  any_bad, example = host_get(_route_checker(moe_layers, cfg.num_experts)(routes, token_mask))
  for i in np.nonzero(any_bad)[0]:
    if moe_layers[i] and 0 <= int(example[i]) < cfg.num_experts:
      raise ValueError(
          f"replay routes: layer {i} lists expert {int(example[i])} twice at a real token; a "
          f"token's {cfg.route_slots} experts must be distinct"
      )
    if moe_layers[i]:
      raise ValueError(
          f"replay routes: layer {i} is a MoE layer but holds expert id {int(example[i])} "
          f"outside [0, {cfg.num_experts}) at a real token (-1 marks a dense layer)"
      )
    raise ValueError(
        f"replay routes: layer {i} is a dense layer but holds expert id {int(example[i])}; "
        f"dense layers must hold -1 (are the layer indices shifted?)"
    )
