"""The rollout engine: a quantized copy of the weights, a KV cache, prefill + decode, routed-expert capture.

    sampler = Sampler(model_cfg, SamplerConfig(weight_dtype="float8_e4m3fn"), mesh=sampler_mesh)
    sampler.update_weights(trainer_state)          # reshard + quantize, one jitted call
    out = sampler.generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=256, eos_ids=(2,)),
                           seed=step)
    batch = out.trainer_inputs()                   # tokens, token_mask, positions, replay_routes (R3)

Layout of one batch (B rows). Prompts are LEFT-padded to a bucket length P, responses RIGHT-padded to a
bucket length T (T >= max_new_tokens), so the full sequence is [prompt (P) | response (T)] and every row's
first generated token sits at column P. Positions count real tokens only (0 at the first real prompt token,
`fo_rl.model.positions_from_mask`), so padding changes nothing a real token sees. The KV cache (the
model's layout: per layer {'k','v': [B, K, H, P + T]}) has one slot per input column; `key_mask` marks the
real prompt slots (generated slots are all marked: the causal mask already hides slots not yet written),
and all rows share the write slot `cache_index = P + t` at decode step t.

Steps. `prefill` feeds the P prompt columns in one call, records their routes and samples response token
y_0. Decode step t feeds y_t at slot P + t, records the experts used for it and samples y_{t+1}; a row stops
after EOS or max_new_tokens. The step that feeds a row's LAST token is run as well (its sampled successor is
discarded): it costs one extra forward per row (1/T of the decode), and gives that token the experts the
sampler really uses for it, so `routes` holds real sampler decisions at every real position of the full
sequence and R3 can replay all of them. Response columns after a row's last token hold valid ids (0) in
MoE layers and -1 in dense layers (routes are recorded for real tokens only, so these do not depend on how
long the other rows kept the loop going); prompt padding holds the experts the padding token was routed
to. Either way the trainer never checks them (its token_mask is False there).

Decode loop: a `lax.while_loop` inside ONE jitted call, `cond = step < limit & some row still has a token
to feed`. Compared with a host loop over jitted single steps it has no per-token dispatch or host sync, and
it still exits as soon as every row is done. (`decode(state, limit)` stops at `limit` steps, so a caller
that wants to stream can run it in chunks; `generate` runs it once.) When the batch is split over mesh axes
that hold no weights (`data`, see Sampler.loop_axes), each shard runs its own loop under shard_map: it
exits when ITS rows are done and its loop condition needs no cross-device reduction per step (on a
multi-device CPU host, one loop per device and core). The random draws are indexed by the global row, so
the samples are the same on any mesh. For small models the loop is split
into segments that attend over the part of the cache they can reach (SamplerConfig.decode_segments), so
decode time stays linear in the number of tokens; the prefill attends over the prompt's own P slots.

Bucketing. P = bucket(longest prompt), T = bucket(max_new_tokens) (powers of two, at least
`prompt_bucket` / `gen_bucket`); max_new_tokens, the prompt lengths and the seed are traced values, so
every call within the same (B, P, T, SamplingParams) reuses the compiled prefill and decode. The batch size
and SamplingParams (temperature, top_k, top_p, eos ids: they change the sampling code) are compile keys.

Logprobs (algorithms.md section 7): `logp_mu` is the log-probability of each sampled token under the
distribution actually sampled from, i.e. softmax(logits / temperature) restricted to the top-k / top-p set
and renormalized. Greedy (temperature 0) returns the argmax and, as its logprob, log softmax(logits) at the
argmax: the untruncated temperature-1 distribution (the argmax has probability 1 under the greedy
"distribution", which would carry no information).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fo_rl.model.config import MOE_IMPLS, ModelConfig
from fo_rl.model.init import abstract_model, positions_from_mask
from fo_rl.model.qtensor import QTensor
from fo_rl.model.transformer import DENSE_ROUTE
from fo_rl.parallel.sharding import DEFAULT_RULES, batch_spec, make_mesh, state_shardings, validate_rules
from fo_rl.sampler import quantize as Q


# ------------------------------------------------------------------------------------------------
# Configuration.
# ------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SamplerConfig:
  """How the sampler holds and runs its copy of the weights.

  weight_dtype: float32 | bfloat16 | float8_e4m3fn | int8. FP8 / int8 use per-output-channel scales
    (absmax / dtype max, see fo_rl/sampler/quantize.py).
  keep_high_precision: parts left in high precision when weight_dtype is FP8 / int8; parts are
    "embed", "norm", "router", "lm_head", "attn", "mlp", "experts". Default: embeddings, norms, router,
    lm_head (as vLLM / SGLang FP8 Qwen3-MoE checkpoints); attention, dense-MLP and expert weights are
    quantized.
  dtype: activation / matmul-input dtype (None: the model config's dtype). cache_dtype: KV cache dtype
    (None: `dtype`).
  prompt_bucket / gen_bucket: prompt and generation lengths are padded to the next power of two that is
    at least this, so different lengths share compiled code.
  pad_id: token id written at padding positions (prompt left padding, response right padding).
  moe_impl: the sampler's MoE dispatch. "auto" (default): "dense" (fo_rl.model.moe.dispatch_dense: every
    expert on every token in three plain matmuls, no sort / gather / scatter) when num_experts <=
    4 * num_experts_per_tok, i.e. at most 4x the expert FLOPs of a dropless dispatch, and the sampler's
    mesh does not shard the experts (dense would all-gather them every step), where it is the faster
    one (measured on CPU: 0.95x the generate time with the benchmark's E=8 k=2 model), else the
    model's; None: the model's; or any model moe_impl. The routes are the same whatever the
    dispatch (routing comes first); the outputs differ by float rounding only.
  gmm_backend: override the model config's grouped-matmul backend for sampling (None: keep).
  decode_segments: the decode loop runs in this many segments of equal length, each attending over the
    cache slots it can reach (windowed decode, see Sampler._decode_impl): less attention work, at the
    price of a second copy of the reached part of the KV cache while decoding and one compiled step
    per segment. 1: one loop over the whole bucket. None (default): segments of `decode_window` steps
    (at most `max_decode_segments`) while the KV cache is at most `window_cache_mib` MiB per device
    (small models, where attention is a large part of a step and the copy is cheap), else 1.
  rules: the sampler's logical-axis rules (its mesh is given to Sampler).
  """

  weight_dtype: str = "float32"
  keep_high_precision: tuple[str, ...] = Q.DEFAULT_KEEP
  dtype: str | None = None
  cache_dtype: str | None = None
  prompt_bucket: int = 16
  gen_bucket: int = 16
  pad_id: int = 0
  moe_impl: str | None = "auto"
  gmm_backend: str | None = None
  decode_segments: int | None = None
  decode_window: int = 16
  max_decode_segments: int = 8
  window_cache_mib: float = 256.0
  rules: tuple = DEFAULT_RULES

  def __post_init__(self):
    object.__setattr__(self, "keep_high_precision", tuple(self.keep_high_precision))
    object.__setattr__(
        self,
        "rules",
        tuple((n, a if a is None or isinstance(a, str) else tuple(a)) for n, a in self.rules),
    )
    Q.validate(self.weight_dtype, self.keep_high_precision)
    validate_rules(self.rules, "sampler.rules")
    if self.moe_impl is not None and self.moe_impl not in ("auto",) + MOE_IMPLS:
      raise ValueError(
          f"sampler.moe_impl={self.moe_impl!r}: must be None, 'auto' or one of {MOE_IMPLS}"
      )
    for f in (
        "prompt_bucket",
        "gen_bucket",
        "decode_segments",
        "decode_window",
        "max_decode_segments",
    ):
      if getattr(self, f) is not None and getattr(self, f) < 1:
        raise ValueError(f"sampler.{f}={getattr(self, f)}: must be >= 1")


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """temperature 0 is greedy. top_k 0 and top_p 1.0 disable truncation (the RL default: the trainer's
  pi must use the same truncation, algorithms.md section 7). Generation stops at any of `eos_ids` (the
  EOS token is part of the response) or after max_new_tokens."""

  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  max_new_tokens: int = 64
  eos_ids: tuple[int, ...] = ()

  def __post_init__(self):
    eos = self.eos_ids
    eos = () if eos is None else (eos,) if isinstance(eos, (int, np.integer)) else eos
    object.__setattr__(self, "eos_ids", tuple(int(e) for e in eos))
    if self.temperature < 0:
      raise ValueError(f"temperature={self.temperature}: must be >= 0 (0 is greedy)")
    if self.top_k < 0:
      raise ValueError(f"top_k={self.top_k}: must be >= 0 (0 disables top-k)")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p={self.top_p}: must be in (0, 1] (1 disables top-p)")
    if self.max_new_tokens < 1:
      raise ValueError(f"max_new_tokens={self.max_new_tokens}: must be >= 1")

  @property
  def compile_key(self) -> "SamplingParams":
    """The fields the compiled code depends on (max_new_tokens is a traced value)."""
    return dataclasses.replace(self, max_new_tokens=1)


def bucket(n: int, minimum: int) -> int:
  """The smallest power of two >= max(n, 1) that is also >= minimum (minimum itself if n is small)."""
  b = 1 << max(int(n) - 1, 0).bit_length()
  return max(b, int(minimum))


# ------------------------------------------------------------------------------------------------
# Sampling: temperature, top-k, top-p; the logprob of the distribution actually sampled from.
# ------------------------------------------------------------------------------------------------
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


def exponential(key, shape: tuple[int, ...], row_offset=None) -> jax.Array:
  """float32 Exp(1) draws of `shape` from a threefry PRNG key, as jax.random.exponential(key, shape)
  computes them (with jax_threefry_partitionable, the default: bits = the XOR of the two words of the
  Threefry block of each element's counter; u = uniform [0, 1) from 23 of them; -log(1 - u)), but with
  the unrolled block function, which XLA:CPU runs twice as fast.

  row_offset (traced int, optional): `shape` is rows [row_offset, row_offset + shape[0]) of a larger
  array; the draws are that slice of the larger array's (the sampler's per-shard decode uses it, so the
  samples do not depend on the mesh). A non-threefry key (jax_default_prng_impl=rbg) falls back to JAX's
  own sampler, with the offset folded into the key: reproducible, but mesh-dependent."""
  data = jax.random.key_data(key)
  if data.shape != (2,):
    if row_offset is not None:
      key = jax.random.fold_in(key, row_offset)
    return jax.random.exponential(key, shape, jnp.float32)
  counts = jax.lax.iota(jnp.uint32, math.prod(shape)).reshape(shape)
  if row_offset is not None:
    counts = counts + jnp.asarray(row_offset, jnp.uint32) * np.uint32(math.prod(shape[1:]))
  w1, w2 = threefry2x32(data[0], data[1], jnp.zeros_like(counts), counts)
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


# ------------------------------------------------------------------------------------------------
# State and outputs.
# ------------------------------------------------------------------------------------------------
@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DecodeState:
  """Everything decode carries. P = routes.shape[1] - tokens.shape[1] is the prompt bucket."""

  cache: list  # per layer {'k', 'v': [B, K, H, P + T]}
  key_mask: jax.Array  # [B, P + T] bool: real cache slots
  prompt_len: jax.Array  # [B] int32: real prompt tokens (= position of response token 0)
  tokens: jax.Array  # [B, T] int32: response tokens, pad_id past each row's length
  logp: jax.Array  # [B, T] float32: logp_mu, 0 past each row's length
  routes: jax.Array  # [B, P + T, L, k] int32, aligned to input columns of [prompt | response]
  lengths: jax.Array  # [B] int32: response tokens generated so far
  done: jax.Array  # [B] bool: the row generates no more tokens
  eos: jax.Array  # [B] bool: the row ended with an EOS token
  step: jax.Array  # int32: next response column to feed
  max_new: jax.Array  # int32: max_new_tokens of this call (<= T)
  key: jax.Array  # PRNG key of this call


@dataclasses.dataclass
class SampleOutput:
  """One batch of samples (device arrays). Full sequence = [prompt_tokens | tokens], P + T columns.

  prompt_tokens [B, P], prompt_mask [B, P]: left-padded prompts.
  tokens [B, T], logp_mu [B, T], response_mask [B, T]: right-padded responses and the log-probability of
    each generated token under the distribution it was sampled from (0 at padding).
  lengths [B]: response lengths (EOS included). finished_eos [B]: ended with EOS (else max_new_tokens).
  routes [B, P + T, L, k]: experts the sampler used when feeding each column (the model's replay layout;
    -1 in dense layers, a valid id in MoE layers everywhere).
  """

  prompt_tokens: jax.Array
  prompt_mask: jax.Array
  tokens: jax.Array
  logp_mu: jax.Array
  response_mask: jax.Array
  lengths: jax.Array
  finished_eos: jax.Array
  routes: jax.Array

  @property
  def finish_reason(self) -> list[str]:
    return ["eos" if e else "length" for e in np.asarray(jax.device_get(self.finished_eos))]

  def trainer_inputs(self) -> dict[str, jax.Array]:
    """What the trainer feeds the model to score the samples (teacher forcing, R3 replay):
    tokens / token_mask / positions [B, P + T] and replay_routes [B, P + T, L, k]. The log-probability of
    response token t is log_softmax(logits[:, P - 1 + t])[tokens[:, P + t]]."""
    tokens = jnp.concatenate([self.prompt_tokens, self.tokens], axis=1)
    mask = jnp.concatenate([self.prompt_mask, self.response_mask], axis=1)
    return dict(
        tokens=tokens,
        token_mask=mask,
        positions=positions_from_mask(mask),
        replay_routes=self.routes,
    )


# ------------------------------------------------------------------------------------------------
# The sampler.
# ------------------------------------------------------------------------------------------------
def _rmw_column(buf, t, new, active):
  """buf[:, t] = where(active, new, buf[:, t]) (buf [B, S, ...], new [B, ...], active [B]). Read and write
  use the same (clamped) index, so a step past the last column rewrites the old values instead of
  clobbering the last column."""
  old = jax.lax.dynamic_index_in_dim(buf, t, axis=1, keepdims=False)
  active = active.reshape(active.shape + (1,) * (new.ndim - 1))
  return jax.lax.dynamic_update_index_in_dim(buf, jnp.where(active, new, old), t, axis=1)


class Sampler:
  """Owns the sampler's weights (quantized per SamplerConfig) on its own mesh, and generates.

  model_cfg: the trainer's architecture. mesh: the sampler's mesh (None: the first device); its rules are
  config.rules, which may differ from the trainer's mesh and rules.
  """

  def __init__(
      self,
      model_cfg: ModelConfig,
      config: SamplerConfig = SamplerConfig(),
      mesh: Mesh | None = None,
      trainer_state=None,
  ):
    over = {}
    if config.dtype is not None:
      over["dtype"] = config.dtype
    self.mesh = mesh if mesh is not None else make_mesh({"data": 1}, devices=jax.devices()[:1])
    if config.moe_impl == "auto":
      few = model_cfg.num_experts <= 4 * model_cfg.num_experts_per_tok
      local = self.mesh.shape.get("expert", 1) == 1  # experts not sharded: no weight all-gathers
      over["moe_impl"] = "dense" if few and local else model_cfg.moe_impl
    elif config.moe_impl is not None:
      over["moe_impl"] = config.moe_impl
    if config.gmm_backend is not None:
      over["gmm_backend"] = config.gmm_backend
    self.model_cfg = model_cfg.replace(**over) if over else model_cfg
    self.config = config
    self.graphdef, abstract = abstract_model(self.model_cfg, self.mesh, config.rules)
    self._hp_shardings = state_shardings(abstract, self.mesh, config.rules)  # high precision layout
    quantized = jax.eval_shape(self._quantize, abstract)
    self.param_shardings = jax.tree_util.tree_map(
        self._leaf_sharding,
        self._hp_shardings,
        quantized,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )
    self.params = None
    # Weight sync: reshard (trainer layout -> out_shardings) and quantize in one compiled call.
    self._sync = jax.jit(self._quantize, out_shardings=self.param_shardings)
    self._prefill = jax.jit(self._prefill_impl, static_argnames=("sampling", "gen_len"))
    # The decode state is DONATED: the KV cache (and the other buffers) is updated in place, so a decode
    # call allocates no second cache and copies nothing; inside the while_loop every token's cache write
    # is an in-place dynamic_update_slice of the loop-carried buffer (no copy per token).
    self._decode = jax.jit(self._decode_impl, static_argnames=("sampling",), donate_argnums=(1,))
    self._cache_dtype = jnp.dtype(config.cache_dtype or self.model_cfg.dtype)
    self._local_graphdefs = {}
    route_fill = np.array(
        [
            0 if self.model_cfg.is_moe_layer(i) else DENSE_ROUTE
            for i in range(self.model_cfg.num_layers)
        ],
        np.int32,
    )
    self._route_fill = np.broadcast_to(
        route_fill[:, None], (self.model_cfg.num_layers, self.model_cfg.route_slots)
    )
    if trainer_state is not None:
      self.update_weights(trainer_state)

  # ---- weights ----------------------------------------------------------------------------------
  def _quantize(self, state):
    return Q.quantize_state(state, self.config.weight_dtype, self.config.keep_high_precision)

  @staticmethod
  def _leaf_sharding(hp_var, q_var):
    """The sampler sharding of one parameter; a QTensor's scale is unsharded on its size-1 axes."""
    sh, value = hp_var.get_value(), q_var.get_value()
    if isinstance(value, QTensor):
      sspec = P(
          *(
              s if value.scale.shape[d] != 1 else None
              for d, s in enumerate(tuple(sh.spec) + (None,) * (len(value.shape) - len(sh.spec)))
          )
      )
      return hp_var.replace(QTensor(sh, NamedSharding(sh.mesh, sspec)))
    return hp_var

  def update_weights(self, trainer_state) -> None:
    """Copy the trainer's parameters (an nnx.State of Params, any sharding) into the sampler: one jitted
    call that reshards to the sampler's layout (out_shardings) and quantizes. Compiled once: later calls
    with the same trainer layout reuse it. When the trainer's arrays live on other devices than the
    sampler's mesh (a jit cannot span both) they are first moved with jax.device_put."""
    on = set()
    for leaf in jax.tree_util.tree_leaves(trainer_state):
      if isinstance(leaf, jax.Array) and leaf.committed:
        on |= set(leaf.sharding.device_set)
    if on and on != set(self.mesh.devices.flat):
      trainer_state = jax.device_put(trainer_state, self._hp_shardings)
    self.params = self._sync(trainer_state)

  # ---- prefill / decode ---------------------------------------------------------------------------
  def _constrain(self, x):
    spec = batch_spec(self.config.rules, x.ndim, self.mesh, x.shape[0])
    return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, spec))

  def _cache_shape(self, B: int, S: int) -> tuple[int, ...]:
    return (B, self.model_cfg.num_kv_heads, self.model_cfg.head_dim, S)  # the model's [B, K, H, S]

  def _cache_sharding(self, B: int, K: int) -> NamedSharding:
    table = validate_rules(self.config.rules)
    bspec = batch_spec(self.config.rules, 1, self.mesh, B)[0]
    used = set((bspec,) if isinstance(bspec, str) else (bspec or ()))
    kv = tuple(a for a in table.get("kv_heads", ()) if a not in used)
    if kv and K % math.prod(self.mesh.shape[a] for a in kv):
      kv = ()
    return NamedSharding(self.mesh, P(bspec, (kv[0] if len(kv) == 1 else kv) or None, None, None))

  def _prefill_impl(
      self, params, prompt, prompt_mask, key, max_new, *, sampling: SamplingParams, gen_len: int
  ):
    cfg = self.model_cfg
    model = nnx.merge(self.graphdef, params)
    B, Pl = prompt.shape
    S = Pl + gen_len
    csh = self._cache_sharding(B, cfg.num_kv_heads)
    # The prompt fills a cache of exactly P slots (the model then attends over the new keys only, not over
    # P + T mostly empty slots); it is padded to P + T for decode afterwards.
    window = [
        {n: jnp.zeros(self._cache_shape(B, Pl), self._cache_dtype) for n in ("k", "v")}
        for _ in range(cfg.num_layers)
    ]
    key_mask = jnp.concatenate([prompt_mask, jnp.ones((B, gen_len), bool)], axis=1)
    prompt_len = jnp.sum(prompt_mask, axis=1, dtype=jnp.int32)
    logits, routes, window = model(
        prompt,
        positions_from_mask(prompt_mask),
        token_mask=prompt_mask,
        key_mask=prompt_mask,
        cache=window,
        cache_index=0,
    )
    pad = ((0, 0),) * 3 + ((0, gen_len),)
    cache = [
        {n: jax.lax.with_sharding_constraint(jnp.pad(c[n], pad), csh) for n in c} for c in window
    ]
    route_buf = jnp.broadcast_to(jnp.asarray(self._route_fill), (B, S, *self._route_fill.shape))
    route_buf = jax.lax.dynamic_update_slice_in_dim(self._constrain(route_buf), routes, 0, axis=1)
    tok, lp = sample_logits(
        jax.random.fold_in(key, 0),
        logits[:, -1],
        sampling.temperature,
        sampling.top_k,
        sampling.top_p,
    )
    tokens = jnp.full((B, gen_len), self.config.pad_id, jnp.int32).at[:, 0].set(tok)
    logp = jnp.zeros((B, gen_len), jnp.float32).at[:, 0].set(lp)
    eos = self._is_eos(tok, sampling)
    lengths = jnp.ones((B,), jnp.int32)
    return DecodeState(
        cache=cache,
        key_mask=self._constrain(key_mask),
        prompt_len=prompt_len,
        tokens=self._constrain(tokens),
        logp=self._constrain(logp),
        routes=route_buf,
        lengths=lengths,
        done=eos | (lengths >= max_new),
        eos=eos,
        step=jnp.zeros((), jnp.int32),
        max_new=jnp.asarray(max_new, jnp.int32),
        key=key,
    )

  @staticmethod
  def _is_eos(tok, sampling: SamplingParams):
    eos = jnp.zeros(tok.shape, bool)
    for e in sampling.eos_ids:
      eos = eos | (tok == e)
    return eos

  def segment_ends(self, B: int, P: int, T: int) -> list[int]:
    """Response columns at which the decode segments end, [W, 2W, ..., T], for a batch of B rows, prompt
    bucket P and generation bucket T (see SamplerConfig.decode_segments)."""
    c = self.config
    n = c.decode_segments
    if n is None:
      cfg = self.model_cfg
      shape = self._cache_shape(B, P + T)
      shard = self._cache_sharding(B, cfg.num_kv_heads).shard_shape(shape)
      mib = 2 * cfg.num_layers * math.prod(shard) * self._cache_dtype.itemsize / 2**20
      n = min(-(-T // c.decode_window), c.max_decode_segments) if mib <= c.window_cache_mib else 1
    W = -(-T // min(n, T))
    return list(range(W, T, W)) + [T]

  def loop_axes(self, B: int) -> tuple[str, ...]:
    """The mesh axes over which decode runs one loop per shard for a batch of B rows: the batch axes
    (batch_spec) that hold no parameter or head (no other rule names them) and have size > 1. Along them
    the shards share nothing but the weights, so each runs its own while_loop, with its own early exit
    and no cross-device reduction per step (XLA:CPU: one loop per device, each on its own core)."""
    spec = batch_spec(self.config.rules, 1, self.mesh, B)[0]
    spec = (spec,) if isinstance(spec, str) else tuple(spec or ())
    table = validate_rules(self.config.rules)
    used = {a for name, axes in table.items() if name != "batch" for a in axes}
    return tuple(a for a in spec if a not in used and self.mesh.shape[a] > 1)

  def _local_graphdef(self, axes: tuple[str, ...]):
    """The model as seen inside the per-shard decode: the same parameters, with `axes` (manual there)
    dropped from the batch rule, so the model's activation constraints and expert-parallel dispatch
    only name the mesh axes that are still automatic."""
    if axes not in self._local_graphdefs:
      batch = tuple(a for a in validate_rules(self.config.rules).get("batch", ()) if a not in axes)
      rules = tuple((n, batch or None) if n == "batch" else (n, v) for n, v in self.config.rules)
      self._local_graphdefs[axes] = abstract_model(self.model_cfg, self.mesh, rules)[0]
    return self._local_graphdefs[axes]

  def _decode_impl(self, params, state: DecodeState, limit, *, sampling: SamplingParams):
    B, T = state.tokens.shape
    ends = self.segment_ends(B, state.routes.shape[1] - T, T)
    axes = self.loop_axes(B)
    if not axes:
      return self._decode_loops(self.graphdef, params, state, limit, sampling, ends, None)
    graphdef = self._local_graphdef(axes)

    def per_shard(params, state, limit):  # state: this shard's rows
      out = self._decode_loops(
          graphdef,
          params,
          state,
          limit,
          sampling,
          ends,
          jax.lax.axis_index(axes) * state.tokens.shape[0],
      )
      # Shards stop on their own; a shard that stopped early has every row done, so the furthest step
      # is where a later decode call (limit) resumes for all of them.
      return dataclasses.replace(out, step=jax.lax.pmax(out.step, axes))

    split = P(axes)  # batch rows over the manual axes; the other axes stay automatic
    spec = jax.tree_util.tree_map(lambda x: split if x.ndim else P(), state)
    return jax.shard_map(
        per_shard,
        mesh=self.mesh,
        in_specs=(P(), spec, P()),
        out_specs=spec,
        axis_names=set(axes),
        check_vma=False,
    )(params, state, limit)

  def _decode_loops(
      self,
      graphdef,
      params,
      state: DecodeState,
      limit,
      sampling: SamplingParams,
      ends: list[int],
      row_offset,
  ):
    """The decode loops (one per segment, ending at response columns `ends`) over the rows in `state`:
    all of them, or one shard's, which are rows [row_offset, row_offset + B) of the batch (their random
    draws are that slice of the batch's)."""
    model = nnx.merge(graphdef, params)
    B, T = state.tokens.shape
    Pl = state.routes.shape[1] - T
    ones = jnp.ones((B, 1), bool)
    end = jnp.minimum(limit, T)

    def body(s: DecodeState):
      t = s.step
      fed = jax.lax.dynamic_slice_in_dim(s.tokens, t, 1, axis=1)  # y_t (pad for finished rows)
      logits, routes, cache = model(
          fed,
          (s.prompt_len + t)[:, None],
          token_mask=ones,
          key_mask=s.key_mask,
          cache=s.cache,
          cache_index=Pl + t,
      )
      # Routes are recorded for real tokens only (t < length), so a padding column holds the fill value
      # however long the loop ran: the output does not depend on the other rows or the mesh.
      route_buf = _rmw_column(s.routes, Pl + t, routes[:, 0], t < s.lengths)
      tok, lp = sample_logits(
          jax.random.fold_in(s.key, t + 1),
          logits[:, 0],
          sampling.temperature,
          sampling.top_k,
          sampling.top_p,
          row_offset,
      )
      active = ~s.done  # rows that produce y_{t+1}
      eos = active & self._is_eos(tok, sampling)
      lengths = s.lengths + active.astype(jnp.int32)
      return dataclasses.replace(
          s,
          cache=cache,
          routes=route_buf,
          step=t + 1,
          lengths=lengths,
          tokens=_rmw_column(s.tokens, t + 1, tok, active),
          logp=_rmw_column(s.logp, t + 1, lp, active),
          eos=s.eos | eos,
          done=s.done | eos | (lengths >= s.max_new),
      )

    # Windowed decode: segment j feeds the response columns [stop_{j-1}, stop_j) and attends over the
    # first P + stop_j cache slots only, the most any of its steps can see. Each segment's while_loop
    # carries that prefix of the cache: the first is sliced from the state's cache, each next one is the
    # last one extended by the slots it adds (taken from the state's cache: empty unless an earlier decode
    # call got that far), and the last one is the whole cache again. The prefix is a copy (XLA cannot
    # alias part of a buffer), hence the memory rule in SamplerConfig.decode_segments. With n segments
    # a decode of T tokens costs about T * (a + b (P + T / 2 + T / n)) instead of T * (a + b (P + T))
    # (a: per-step work, b: attention per cache slot); the samples are the same.
    full_cache, full_mask = state.cache, state.key_mask
    for j, stop in enumerate(ends):
      window = Pl + stop
      if j == 0:
        cache = [{n: c[n][..., :window] for n in c} for c in state.cache]
      else:
        cache = [
            {n: jnp.concatenate([c[n], f[n][..., Pl + ends[j - 1] : window]], axis=3) for n in c}
            for c, f in zip(state.cache, full_cache)
        ]
      state = dataclasses.replace(state, cache=cache, key_mask=full_mask[:, :window])
      state = jax.lax.while_loop(
          lambda s, stop=stop: (s.step < jnp.minimum(end, stop)) & jnp.any(s.lengths > s.step),
          body,
          state,
      )
    return state

  def prefill(self, prompt, prompt_mask, sampling: SamplingParams, seed=0) -> DecodeState:
    """prompt, prompt_mask [B, P] (left-padded, P a bucket length) -> the decode state after y_0."""
    if self.params is None:
      raise RuntimeError("Sampler has no weights: call update_weights(trainer_state) first")
    gen_len = bucket(sampling.max_new_tokens, self.config.gen_bucket)
    key = seed if isinstance(seed, jax.Array) else jax.random.key(int(seed))
    return self._prefill(
        self.params,
        prompt,
        prompt_mask,
        key,
        jnp.asarray(sampling.max_new_tokens, jnp.int32),
        sampling=sampling.compile_key,
        gen_len=gen_len,
    )

  def decode(
      self, state: DecodeState, sampling: SamplingParams, limit: int | None = None
  ) -> DecodeState:
    """Decode until every row is done, or `limit` response columns have been fed. `state` is donated."""
    limit = state.tokens.shape[1] if limit is None else limit
    return self._decode(
        self.params, state, jnp.asarray(limit, jnp.int32), sampling=sampling.compile_key
    )

  def pad_prompts(self, prompts: Sequence[Sequence[int]]):
    """Left-pad token-id lists to the bucket length -> (tokens, mask) [B, P] on the sampler's mesh."""
    if not len(prompts):
      raise ValueError("generate: no prompts")
    lens = [len(p) for p in prompts]
    if min(lens) < 1:
      raise ValueError("generate: every prompt needs at least one token")
    Pl = bucket(max(lens), self.config.prompt_bucket)
    tok = np.full((len(prompts), Pl), self.config.pad_id, np.int32)
    mask = np.zeros((len(prompts), Pl), bool)
    for i, p in enumerate(prompts):
      tok[i, Pl - len(p) :] = np.asarray(p, np.int32)
      mask[i, Pl - len(p) :] = True
    sh = NamedSharding(self.mesh, batch_spec(self.config.rules, 2, self.mesh, len(prompts)))
    return jax.device_put(tok, sh), jax.device_put(mask, sh)

  def generate(
      self,
      prompts: Sequence[Sequence[int]],
      sampling: SamplingParams = SamplingParams(),
      seed: int | jax.Array = 0,
  ) -> SampleOutput:
    """Sample one response per prompt (repeat a prompt for several samples). Returns device arrays
    without waiting for them (finish_reason is the only host read)."""
    tok, mask = self.pad_prompts(prompts)
    state = self.decode(self.prefill(tok, mask, sampling, seed), sampling)
    T = state.tokens.shape[1]
    response_mask = jnp.arange(T)[None, :] < state.lengths[:, None]
    return SampleOutput(
        prompt_tokens=tok,
        prompt_mask=mask,
        tokens=state.tokens,
        logp_mu=state.logp,
        response_mask=response_mask,
        lengths=state.lengths,
        finished_eos=state.eos,
        routes=state.routes,
    )

  def num_compiles(self) -> dict[str, int]:
    """Compiled variants per jitted function (tests use it to check that nothing recompiles)."""
    return {
        "prefill": self._prefill._cache_size(),
        "decode": self._decode._cache_size(),
        "update_weights": self._sync._cache_size(),
    }
