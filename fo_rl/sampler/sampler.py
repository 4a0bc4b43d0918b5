"""The rollout engine: a quantized copy of the weights, a KV cache, prefill + decode, routed-expert capture.

    sampler = Sampler(model_cfg, SamplerConfig(weight_dtype="float8_e4m3fn"), mesh=sampler_mesh)
    sampler.update_weights(trainer_state)          # reshard + quantize, one jitted call
    out = sampler.generate(prompts, SamplingParams(temperature=1.0, max_new_tokens=256, eos_ids=(2,)),
                           seed=step)
    ro = Rollouts.from_sample(out, advantages)     # the trainer's layout (fo_rl/rl/rollouts.py)

The settings live in fo_rl/sampler/config.py, the sampling maths (temperature, top-k / top-p, the draw and
its logprob) in fo_rl/sampler/sampling.py, the weight quantization in fo_rl/sampler/quantize.py.

The paged engine (`SamplerConfig.engine="paged"`, fo_rl/sampler/engine.py) samples the same outputs
with a paged KV cache and continuous batching; `generate` routes to it.

Layout of one batch (B rows). Prompts are LEFT-padded to a bucket length P, responses RIGHT-padded to a
bucket length T (T >= max_new_tokens), so the full sequence is [prompt (P) | response (T)] and every row's
first generated token sits at column P. Positions count real tokens only (0 at the first real prompt token,
`fo_rl.model.positions_from_mask`), so padding changes nothing a real token sees. The KV cache (the
model's layout: per layer {'k','v': [B, K, H, P + T]}) has one slot per input column; `key_mask` marks the
real prompt slots (generated slots are all marked: the causal mask already hides slots not yet written),
and all rows share the write slot `cache_index = P + t` at decode step t.

Steps. `Sampler.prefill` feeds the P prompt columns in one call, records their routes and samples response
token y_0. Decode step t (`decode_step`) feeds y_t at slot P + t, records the experts used for it and
samples y_{t+1}; a row stops after EOS or max_new_tokens. The step that feeds a row's LAST token is run as
well (its sampled successor is discarded): it costs one extra forward per row (1/T of the decode), and
gives that token the experts the sampler really uses for it, so `routes` holds real sampler decisions at
every real position of the full sequence and R3 can replay all of them. Response columns after a row's
last token hold valid ids (0) in MoE layers and -1 in dense layers (routes are recorded for real tokens
only, so these do not depend on how long the other rows kept the loop going); prompt padding columns
hold the same fill values. The trainer never checks them (its token_mask is False there). The prefill
computes logits at the last prompt position only (the one y_0 is drawn from).

Decode loop (`decode_loop`): a `lax.while_loop` over `decode_step` inside ONE jitted call, `cond = step <
limit & some row still has a token to feed`. Compared with a host loop over jitted single steps it has no
per-token dispatch or host sync, and it still exits as soon as every row is done. (`decode(state, limit)`
stops at `limit` steps, so a caller that wants to stream can run it in chunks; `generate` runs it once.)
When the batch is split over mesh axes that hold no weights (`data`, see Sampler.loop_axes), each shard
runs its own loop under shard_map: it exits when ITS rows are done and its loop condition needs no
cross-device reduction per step (on a multi-device CPU host, one loop per device and core). The random
draws are indexed by the global row, so the samples are the same on any mesh. For small models the loop is
split into segments that attend over the part of the cache they can reach (SamplerConfig.decode_segments),
so decode time stays linear in the number of tokens; the prefill attends over the prompt's own P slots.

Bucketing. P = bucket(longest prompt), T = bucket(max_new_tokens) (powers of two, at least
`prompt_bucket` / `gen_bucket`); max_new_tokens, the prompt lengths and the seed are traced values, so
every call within the same (B, P, T, SamplingParams) reuses the compiled prefill and decode. The batch size
and SamplingParams (temperature, top_k, top_p, eos ids: they change the sampling code) are compile keys.

Ahead of time. `Sampler.lower` lowers the weight sync, the prefill and the decode for abstract inputs
(ShapeDtypeStructs with shardings, nothing allocated); fo_rl/dry_run.py compiles them for a TPU topology.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fo_rl.model.config import ModelConfig
from fo_rl.model.init import abstract_model, positions_from_mask
from fo_rl.model.qdot import qdot
from fo_rl.model.qtensor import QTensor
from fo_rl.model.transformer import DENSE_ROUTE, route_dtype
from fo_rl.parallel.sharding import batch_spec, make_mesh, state_shardings, validate_rules
from fo_rl.sampler import quantize as Q
from fo_rl.sampler.config import SamplerConfig, SamplingParams, bucket
from fo_rl.sampler.sampling import sample_logits


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
  max_new: jax.Array  # int32: max_new_tokens of this call (<= T), a scalar or one cap per row [B]
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
  logp_nonfinite [B] bool: rows with a non-finite logp_mu at some response token: the sampler's logits
    held a NaN or inf there, so the token drawn is meaningless. Computed on device by `generate` (None
    when the output is built by hand); `Rollouts.from_sample` rejects such rows. A caller that fetches
    it to the host with the tokens (fo_rl/run.py) spares `from_sample` a device read.
  """

  prompt_tokens: jax.Array
  prompt_mask: jax.Array
  tokens: jax.Array
  logp_mu: jax.Array
  response_mask: jax.Array
  lengths: jax.Array
  finished_eos: jax.Array
  routes: jax.Array
  logp_nonfinite: jax.Array | np.ndarray | None = None

  @property
  def finish_reason(self) -> list[str]:
    return ["eos" if e else "length" for e in np.asarray(jax.device_get(self.finished_eos))]


# ------------------------------------------------------------------------------------------------
# The decode step and the decode loop.
# ------------------------------------------------------------------------------------------------
def logits_at(model, hidden):
  """float32 logits [..., V] of final hidden states [..., D] (the model's `return_hidden`), computed
  as the model computes its logits: for the positions that are sampled from only."""
  return qdot(hidden.astype(jnp.float32), model.head_weight(), jnp.float32)


def _rmw_column(buf, t, new, active):
  """buf[:, t] = where(active, new, buf[:, t]) (buf [B, S, ...], new [B, ...], active [B]). Read and write
  use the same (clamped) index, so a step past the last column rewrites the old values instead of
  clobbering the last column."""
  old = jax.lax.dynamic_index_in_dim(buf, t, axis=1, keepdims=False)
  active = active.reshape(active.shape + (1,) * (new.ndim - 1))
  return jax.lax.dynamic_update_index_in_dim(buf, jnp.where(active, new, old), t, axis=1)


def _is_eos(tok, sampling: SamplingParams):
  """Whether each token of `tok` is one of `sampling.eos_ids`."""
  eos = jnp.zeros(tok.shape, bool)
  for e in sampling.eos_ids:
    eos = eos | (tok == e)
  return eos


def decode_step(model, s: DecodeState, sampling: SamplingParams, row_offset=None) -> DecodeState:
  """One decode step: feed response column t = s.step (y_t, pad for finished rows) at cache slot P + t,
  record the experts it used, sample y_{t+1} for the rows still active. The rows of `s` are rows
  [row_offset, row_offset + B) of the batch (None: all of it): their random draws are that slice of the
  batch's (`fo_rl.sampler.sampling.exponential`)."""
  B, T = s.tokens.shape
  Pl = s.routes.shape[1] - T
  t = s.step
  fed = jax.lax.dynamic_slice_in_dim(s.tokens, t, 1, axis=1)  # y_t (pad for finished rows)
  logits, routes, cache = model(
      fed,
      (s.prompt_len + t)[:, None],
      token_mask=jnp.ones((B, 1), bool),
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
  eos = active & _is_eos(tok, sampling)
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


def decode_loop(
    params,
    state: DecodeState,
    limit,
    *,
    graphdef,
    sampling: SamplingParams,
    ends: tuple[int, ...],
    mesh: Mesh,
    loop_axes: tuple[str, ...] = (),
    row_offset=None,
) -> DecodeState:
  """Run `decode_step` until every row is done or `limit` response columns are fed: one
  `lax.while_loop` per segment, the segments ending at response columns `ends` (windowed decode, below).
  `Sampler.decode` runs it jitted, with the state donated.

  loop_axes: mesh axes of `mesh` that split the batch and hold no weights (Sampler.loop_axes). Along them
  each shard runs this function on its own rows under shard_map, with `graphdef` the model as seen there
  (Sampler._local_graphdef) and `row_offset` the shard's first row, so its random draws are that slice of
  the batch's."""
  if loop_axes:

    def per_shard(params, state, limit):  # state: this shard's rows
      out = decode_loop(
          params,
          state,
          limit,
          graphdef=graphdef,
          sampling=sampling,
          ends=ends,
          mesh=mesh,
          row_offset=jax.lax.axis_index(loop_axes) * state.tokens.shape[0],
      )
      # Shards stop on their own; a shard that stopped early has every row done, so the furthest step
      # is where a later decode call (limit) resumes for all of them.
      return dataclasses.replace(out, step=jax.lax.pmax(out.step, loop_axes))

    split = P(loop_axes)  # batch rows over the manual axes; the other axes stay automatic
    spec = jax.tree_util.tree_map(lambda x: split if x.ndim else P(), state)
    return jax.shard_map(
        per_shard,
        mesh=mesh,
        in_specs=(P(), spec, P()),
        out_specs=spec,
        axis_names=set(loop_axes),
        check_vma=False,
    )(params, state, limit)

  model = nnx.merge(graphdef, params)
  T = state.tokens.shape[1]
  Pl = state.routes.shape[1] - T
  end = jnp.minimum(limit, T)
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
        lambda s: decode_step(model, s, sampling, row_offset),
        state,
    )
  return state


# ------------------------------------------------------------------------------------------------
# The sampler.
# ------------------------------------------------------------------------------------------------
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
    # Each jitted function counts its own traces (`num_compiles`): a trace is a compile.
    self._traces = collections.Counter()
    self._sync = jax.jit(
        self._counted("update_weights", self._quantize), out_shardings=self.param_shardings
    )
    self._prefill = jax.jit(
        self._counted("prefill", self._prefill_impl), static_argnames=("sampling", "gen_len")
    )
    # The decode state is DONATED: the KV cache (and the other buffers) is updated in place, so a decode
    # call allocates no second cache and copies nothing; inside the while_loop every token's cache write
    # is an in-place dynamic_update_slice of the loop-carried buffer (no copy per token).
    self._decode = jax.jit(
        self._counted("decode", decode_loop),
        static_argnames=("graphdef", "sampling", "ends", "mesh", "loop_axes"),
        donate_argnames=("state",),
    )
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
    c = self.config
    return Q.quantize_state(state, c.weight_dtype, c.keep_high_precision, c.activation_dtype)

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
      return hp_var.replace(dataclasses.replace(value, q=sh, scale=NamedSharding(sh.mesh, sspec)))
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

  def abstract_params(self, trainer_params):
    """The sampler's weights for abstract trainer parameters (ShapeDtypeStructs, as `update_weights`
    takes them): ShapeDtypeStructs in the sampler's dtypes and shardings. Nothing is allocated."""
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        jax.eval_shape(self._quantize, trainer_params),
        self.param_shardings,
    )

  # ---- generation -------------------------------------------------------------------------------
  def generate(
      self,
      prompts: Sequence[Sequence[int]],
      sampling: SamplingParams = SamplingParams(),
      seed: int | jax.Array = 0,
      max_new_per_row: Sequence[int] | None = None,
  ) -> SampleOutput:
    """Sample one response per prompt (repeat a prompt for several samples). Returns device arrays
    without waiting for them (finish_reason is the only host read). max_new_per_row: a cap on each
    row's response length (<= sampling.max_new_tokens; the benchmarks use it to give every engine the
    same work)."""
    if max_new_per_row is not None:
      max_new_per_row = np.asarray(max_new_per_row, np.int32)
      if (
          max_new_per_row.shape != (len(prompts),)
          or not ((max_new_per_row >= 1) & (max_new_per_row <= sampling.max_new_tokens)).all()
      ):
        raise ValueError(
            f"generate: max_new_per_row must hold one length in [1, max_new_tokens="
            f"{sampling.max_new_tokens}] per prompt"
        )
    if self.config.engine == "paged":
      return self.engine.generate(prompts, sampling, seed, max_new_per_row)
    tok, mask = self.pad_prompts(prompts)
    state = self.decode(self.prefill(tok, mask, sampling, seed, max_new_per_row), sampling)
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
        routes=state.routes.astype(route_dtype(self.model_cfg.num_experts)),
        logp_nonfinite=jnp.any(response_mask & ~jnp.isfinite(state.logp), axis=1),
    )

  @functools.cached_property
  def engine(self):
    """The paged engine on this sampler's weights (fo_rl/sampler/engine.py)."""
    from fo_rl.sampler.engine import PagedEngine

    return PagedEngine(self)

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

  def prefill(
      self, prompt, prompt_mask, sampling: SamplingParams, seed=0, max_new_per_row=None
  ) -> DecodeState:
    """prompt, prompt_mask [B, P] (left-padded, P a bucket length) -> the decode state after y_0.
    max_new_per_row [B]: per-row caps (see `generate`)."""
    if self.params is None:
      raise RuntimeError("Sampler has no weights: call update_weights(trainer_state) first")
    gen_len = bucket(sampling.max_new_tokens, self.config.gen_bucket)
    key = seed if isinstance(seed, jax.Array) else jax.random.key(int(seed))
    return self._prefill(
        self.params,
        prompt,
        prompt_mask,
        key,
        jnp.asarray(
            sampling.max_new_tokens if max_new_per_row is None else max_new_per_row, jnp.int32
        ),
        sampling=sampling.compile_key,
        gen_len=gen_len,
    )

  def decode(
      self, state: DecodeState, sampling: SamplingParams, limit: int | None = None
  ) -> DecodeState:
    """Decode until every row is done, or `limit` response columns have been fed: `decode_loop`, jitted.
    `state` is donated."""
    limit = state.tokens.shape[1] if limit is None else limit
    return self._decode(
        self.params, state, jnp.asarray(limit, jnp.int32), **self._decode_statics(state, sampling)
    )

  # ---- the decode loop's layout ----------------------------------------------------------------
  def _decode_statics(self, state: DecodeState, sampling: SamplingParams) -> dict:
    """The static (compile-time) arguments of `decode_loop` for a decode state of `state`'s shapes."""
    B, T = state.tokens.shape
    axes = self.loop_axes(B)
    return dict(
        graphdef=self._local_graphdef(axes),
        sampling=sampling.compile_key,
        ends=tuple(self.segment_ends(B, state.routes.shape[1] - T, T)),
        mesh=self.mesh,
        loop_axes=axes,
    )

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
    if not axes:
      return self.graphdef
    if axes not in self._local_graphdefs:
      batch = tuple(a for a in validate_rules(self.config.rules).get("batch", ()) if a not in axes)
      rules = tuple((n, batch or None) if n == "batch" else (n, v) for n, v in self.config.rules)
      self._local_graphdefs[axes] = abstract_model(self.model_cfg, self.mesh, rules)[0]
    return self._local_graphdefs[axes]

  # ---- the prefill and the KV cache -------------------------------------------------------------
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
    hidden, routes, window = model(
        prompt,
        positions_from_mask(prompt_mask),
        token_mask=prompt_mask,
        key_mask=prompt_mask,
        cache=window,
        cache_index=0,
        return_hidden=True,
    )
    # Prompt padding columns hold the fill value, as never-fed response columns do: the routes do not
    # depend on the other prompts of the batch (the paged engine, which pads nothing, gives the same).
    routes = jnp.where(prompt_mask[:, :, None, None], routes, jnp.asarray(self._route_fill))
    pad = ((0, 0),) * 3 + ((0, gen_len),)
    cache = [
        {n: jax.lax.with_sharding_constraint(jnp.pad(c[n], pad), csh) for n in c} for c in window
    ]
    route_buf = jnp.broadcast_to(jnp.asarray(self._route_fill), (B, S, *self._route_fill.shape))
    route_buf = jax.lax.dynamic_update_slice_in_dim(self._constrain(route_buf), routes, 0, axis=1)
    tok, lp = sample_logits(
        jax.random.fold_in(key, 0),
        logits_at(model, hidden[:, -1]),  # the only prompt position sampled from
        sampling.temperature,
        sampling.top_k,
        sampling.top_p,
    )
    tokens = jnp.full((B, gen_len), self.config.pad_id, jnp.int32).at[:, 0].set(tok)
    logp = jnp.zeros((B, gen_len), jnp.float32).at[:, 0].set(lp)
    eos = _is_eos(tok, sampling)
    lengths = jnp.ones((B,), jnp.int32)
    state = DecodeState(
        cache=cache,
        key_mask=key_mask,
        prompt_len=prompt_len,
        tokens=tokens,
        logp=logp,
        routes=route_buf,
        lengths=lengths,
        done=eos | (lengths >= max_new),
        eos=eos,
        step=jnp.zeros((), jnp.int32),
        max_new=jnp.asarray(max_new, jnp.int32),
        key=key,
    )
    # Every leaf in the layout `_decode_state_shardings` declares (left to itself, the compiler picks
    # some, e.g. replicates `lengths`), so `lower` knows the decode's input without compiling this.
    return jax.tree.map(
        jax.lax.with_sharding_constraint, state, self._decode_state_shardings(B, Pl, gen_len)
    )

  # ---- ahead-of-time compilation (fo_rl/dry_run.py) ---------------------------------------------
  def lower(
      self, trainer_params, batch: int, prompt_len: int, sampling: SamplingParams
  ) -> dict[str, jax.stages.Lowered]:
    """Lower the sampler's three jitted functions for abstract inputs (nothing is allocated):
    {"update_weights": the weight sync from `trainer_params` (ShapeDtypeStructs with the trainer's
    shardings), "prefill": the prompt pass over `batch` prompts of bucket length `prompt_len`, "decode":
    the decode loop over its output, T = bucket(sampling.max_new_tokens, gen_bucket) columns}, with the
    shardings `prefill` and `decode` see at run time (the decode state's: `_decode_state_shardings`).
    With the paged engine, "prefill" and "decode" are its step with prefill chunks and its decode
    burst at their largest shapes (`PagedEngine.lower`).
    """
    params = self.abstract_params(trainer_params)
    if self.config.engine == "paged":  # the engine's two step functions at their largest shapes
      return {"update_weights": self._sync.lower(trainer_params)} | self.engine.lower(
          params, batch, prompt_len, sampling
      )
    replicated = NamedSharding(self.mesh, P())
    rows = NamedSharding(self.mesh, batch_spec(self.config.rules, 2, self.mesh, batch))
    prompt = jax.ShapeDtypeStruct((batch, prompt_len), jnp.int32, sharding=rows)
    prompt_mask = jax.ShapeDtypeStruct((batch, prompt_len), jnp.bool_, sharding=rows)
    key = jax.eval_shape(lambda: jax.random.key(0))
    key = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=replicated)
    max_new = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)
    static = dict(
        sampling=sampling.compile_key,
        gen_len=bucket(sampling.max_new_tokens, self.config.gen_bucket),
    )
    prefill = self._prefill.lower(params, prompt, prompt_mask, key, max_new, **static)
    state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        prefill.out_info,
        self._decode_state_shardings(batch, prompt_len, static["gen_len"]),
    )
    return {
        "update_weights": self._sync.lower(trainer_params),
        "prefill": prefill,
        "decode": self._decode.lower(
            params, state, max_new, **self._decode_statics(state, sampling)
        ),
    }

  def _decode_state_shardings(self, batch: int, prompt_len: int, gen_len: int) -> DecodeState:
    """The shardings of the decode state `prefill` returns for `batch` rows, prompt bucket `prompt_len`
    and generation bucket `gen_len`: the KV cache as `_cache_sharding`, the per-row arrays over the batch
    axes, the scalars replicated. `_prefill_impl` constrains its output to them."""
    rows = lambda ndim: NamedSharding(
        self.mesh, batch_spec(self.config.rules, ndim, self.mesh, batch)
    )
    replicated = NamedSharding(self.mesh, P())
    cache = self._cache_sharding(batch, self.model_cfg.num_kv_heads)
    return DecodeState(
        cache=[{"k": cache, "v": cache} for _ in range(self.model_cfg.num_layers)],
        key_mask=rows(2),
        prompt_len=rows(1),
        tokens=rows(2),
        logp=rows(2),
        routes=rows(4),
        lengths=rows(1),
        done=rows(1),
        eos=rows(1),
        step=replicated,
        max_new=replicated,
        key=replicated,
    )

  def num_compiles(self) -> dict[str, int]:
    """Compiled variants per jitted function of this sampler (tests use it to check that nothing
    recompiles): its traces, counted as they happen. Not JAX's `_cache_size()`: that reads a cache
    shared by the whole process (decode_loop's jit is one function for every sampler), whose entries
    come and go with what else the process has compiled."""
    return {k: self._traces[k] for k in ("prefill", "decode", "update_weights")}

  def _counted(self, name: str, fn):
    """fn, counting its traces under `name` (same signature, so jit's static_argnames still apply)."""

    @functools.wraps(fn)
    def traced(*args, **kwargs):
      self._traces[name] += 1
      return fn(*args, **kwargs)

    return traced
