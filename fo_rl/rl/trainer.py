"""The RL train step: old-logprob pass, then N mini-batch policy updates (algorithms.md sections 3-5).

One call of `Trainer.train_step(state, rollouts)`:
  1. old-logprob pass with the parameters that produced the rollouts: logp_old = log pi_old(y_t).
  2. the global batch is split into N = rl.mini_batches contiguous mini-batches; each gets one AdamW update
     of the registered policy loss (fo_rl/rl/losses.py).
     An update whose gradient or loss is not finite is skipped (parameters and optimizer state unchanged)
     and counted.
The routes each pass feeds the gating (live; r2: the old pass's live routes, recorded and replayed by the
updates; r3: the sampler's, replayed by both) are `fo_rl.rl.rollouts.PASS_ROUTES`; the batch layout and
the routes layout are `fo_rl.rl.rollouts`. (Under r3 the old pass also runs live, for the disagreement
metrics.)
The update is one jax.jit with explicit in/out shardings over the mesh and a donated train state: the
state passed to `train_step` (and the params given to `init_state`) must not be used afterwards.

Under R2 the first update evaluates the same parameters and routes as the old-logprob pass, so its staleness
ratio is 1 up to float rounding: the two are different XLA programs (forward vs forward+backward) and may
fuse differently, which moves logp by a few float32 ulps (|ratio - 1| <= ~1e-6 on CPU).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from fo_rl.model import ModelConfig, validate_replay_routes
from fo_rl.model.init import make_scorer
from fo_rl.model.logprobs import token_logprobs  # noqa: F401  (the trainer's log-probs; sft uses it)
from fo_rl.parallel.multihost import host_get  # device_get that also works across processes
from fo_rl.parallel.sharding import (
    DEFAULT_RULES,
    Rules,
    batch_spec,
    batch_ways,
    check_batch_split,
)
from fo_rl.rl import metrics as rl_metrics
from fo_rl.rl import packing
from fo_rl.rl.losses import LossConfig, LossInputs, loss_denominator, policy_loss
from fo_rl.rl.optim import OptimConfig, abstract_opt_state, init_opt_state, make_optimizer
from fo_rl.rl.rollouts import REPLAY_MODES, Rollouts, pass_routes, replays_sampler


def _flat_tail(x):
  """[b, T, ...] with more than one trailing dim -> [b, T, prod]: the routes [B, T, L, k] cross the
  micro-batch split and the old pass's loop flat. (Transposed in their own shape, TPU's tiled layout
  pads the minor dim k = 8 to 128: the split of the paper_n8 old pass's routes alone took 198 GiB per
  chip.)"""
  return x.reshape(*x.shape[:2], -1) if x.ndim > 3 else x


@dataclasses.dataclass(frozen=True)
class TrainerConfig:
  mini_batches: int = 1  # N: optimizer updates per rollout batch (the off-policiness)
  replay: str = "none"  # none | r2 | r3
  temperature: float = (
      1.0  # must equal the sampler's: pi_old, pi_theta and mu share one distribution
  )
  loss: LossConfig = LossConfig()
  optim: OptimConfig = OptimConfig()
  # trainer.micro_batches M: each mini-batch's forward/backward runs as M micro-batches inside the jitted
  # update (gradient accumulation: still one optimizer step per mini-batch), and the old-logprob pass
  # runs over micro-batches of the same size. Activation memory scales with the micro-batch.
  # 0 (auto): `auto_micro_batches`, by rule (1 on TPU/GPU; on CPU micro-batches of about
  # CPU_MICRO_TOKENS tokens per device, which keeps their activations in the CPU's caches).
  micro_batches: int = 1
  # trainer.pack: the forward passes run on packed rows (fo_rl/rl/packing.py: several responses end to
  # end, with segment ids), and only the micro-batches that hold tokens run: a pass of more than one
  # micro-batch computes less padding; losses and metrics are unchanged. A pass of one micro-batch
  # runs unpacked (it would compute as many rows).
  pack: bool = True

  def __post_init__(self):
    check_rl_fields(self.mini_batches, self.replay, self.temperature)
    check_micro_batches(self.micro_batches)


def check_rl_fields(mini_batches, replay, temperature, num_experts: int | None = None) -> None:
  """The one home of the checks on rl.mini_batches, rl.replay and rl.temperature (TrainerConfig runs
  them; so does config.parse, through RLConfig, before anything is built); with num_experts, also
  that routing replay has a MoE model to replay."""
  if replay not in REPLAY_MODES:
    raise ValueError(f"rl.replay={replay!r}: must be one of {REPLAY_MODES}")
  if int(mini_batches) < 1:
    raise ValueError(f"rl.mini_batches={mini_batches!r}: must be >= 1")
  if not float(temperature) > 0:
    raise ValueError(f"rl.temperature={temperature!r}: must be > 0")
  if num_experts is not None and replay != "none" and num_experts == 0:
    raise ValueError(
        f"rl.replay={replay!r}: routing replay needs a MoE model, but model.num_experts=0"
    )


def check_micro_batches(micro, mini_batch: int | None = None) -> None:
  """The one home of the checks on trainer.micro_batches (TrainerConfig, config.parse and train_step run
  them): 0 (auto), or an integer >= 1 that divides the mini-batch of `mini_batch` responses, when that is
  known.
  """
  if isinstance(micro, bool) or not isinstance(micro, int) or micro < 0:
    raise ValueError(f"trainer.micro_batches={micro!r}: must be 0 (auto) or an integer >= 1")
  if mini_batch is not None and micro and mini_batch % micro:
    raise ValueError(
        f"trainer.micro_batches={micro} does not divide the mini-batch of {mini_batch} responses"
    )


# trainer.micro_batches=0 on CPU: micro-batches of at most this many tokens per device. XLA:CPU runs a
# training step's elementwise passes and small batched matmuls at the speed of the memory level their
# tensors fit in; at 1,024 tokens a layer's attention scores and expert blocks stay in the caches. On the
# train bench (B 32 x T 128 on one device) 4 micro-batches of 1,024 tokens took 0.75x the time of one
# batch, 2 (2,048 tokens) 0.84x, 8 (512 tokens) 0.80x (README, performance).
CPU_MICRO_TOKENS = 1024


def auto_micro_batches(
    rows: int, length: int, platform: str, ways: int = 1, loss_name: str = "minirl"
) -> int:
  """trainer.micro_batches=0: the micro-batches a mini-batch of `rows` x `length` tokens runs as, when
  the mesh's batch axes split rows `ways` ways. 1 off CPU, and for a loss whose denominator is unknown
  (`loss_denominator`); on CPU the fewest micro-batches of at most CPU_MICRO_TOKENS tokens per device
  that split evenly (each micro-batch keeps a multiple of `ways` rows), one row per device at the
  least."""
  if platform != "cpu" or loss_name not in ("minirl", "grpo", "gspo", "dapo", "cispo"):
    return 1
  per_device = max(rows // max(ways, 1), 1)
  for m in range(1, per_device + 1):
    if per_device % m == 0 and per_device // m * length <= CPU_MICRO_TOKENS:
      return m
  return per_device


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class TrainState:
  params: Any  # nnx.State
  opt_state: Any
  step: jax.Array  # optimizer updates applied or skipped
  skipped: jax.Array  # updates skipped for a non-finite gradient


def _where_finite(ok, new, old):
  return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)


class Trainer:
  """Holds the compiled old-logprob pass and update for one (model, mesh, rules, config)."""

  def __init__(
      self,
      graphdef,
      model_cfg: ModelConfig,
      cfg: TrainerConfig,
      mesh: Mesh | None = None,
      rules: Rules = DEFAULT_RULES,
  ):
    check_rl_fields(cfg.mini_batches, cfg.replay, cfg.temperature, model_cfg.num_experts)
    self.cfg, self.model_cfg, self.mesh, self.rules = cfg, model_cfg, mesh, rules
    self.score = make_scorer(graphdef, model_cfg.logits_chunk)
    self.tx = make_optimizer(cfg.optim)
    self._old_pass = jax.jit(self._old_pass_fn)
    self._update = None  # the last update used; compiled on first use, once the shardings are known
    self._updates = {}  # mini-batch size -> jitted update (the batch sharding depends on it)
    self._minibatch = jax.jit(self._minibatch_fn, static_argnames=("size",))
    self.last_minibatch_metrics: list[dict[str, Any]] | None = None  # set by train_step

  # ---- state --------------------------------------------------------------------------------
  def init_state(self, params) -> TrainState:
    """A fresh TrainState around `params` (taken over: the first update donates them)."""
    zero = lambda: jnp.zeros((), jnp.int32)  # noqa: E731
    if self.mesh is None:
      return TrainState(params, init_opt_state(self.tx, params), zero(), zero())
    replicated = NamedSharding(self.mesh, jax.sharding.PartitionSpec())
    params = jax.tree.map(
        lambda x: x
        if isinstance(getattr(x, "sharding", None), NamedSharding)
        else jax.device_put(x, replicated),
        params,
    )
    # Adam's moments get exactly the parameters' shardings; its step counts are replicated.
    opt_state = init_opt_state(self.tx, params, self.mesh)
    return TrainState(
        params, opt_state, jax.device_put(zero(), replicated), jax.device_put(zero(), replicated)
    )

  # ---- ahead-of-time compilation (fo_rl/dry_run.py) ----------------------------------------------
  def abstract_state(self, params) -> TrainState:
    """The TrainState `init_state` builds, as ShapeDtypeStructs with the same shardings; `params` are
    ShapeDtypeStructs with NamedShardings. Nothing is allocated."""
    replicated = NamedSharding(self.mesh, jax.sharding.PartitionSpec())
    opt = abstract_opt_state(self.tx, params, self.mesh)
    scalar = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)
    return TrainState(params, opt, scalar, scalar)

  def lower(self, state: TrainState, ro: Rollouts) -> dict[str, Any]:
    """Lower the two jitted functions of `train_step` for abstract `state` / global batch `ro`
    (ShapeDtypeStructs): {"old_pass": the old-logprob pass over ro, "update": one mini-batch update}.
    """
    B, N = ro.tokens.shape[0], self.cfg.mini_batches
    self.check_batch(B, ro.tokens.shape[1])
    ro = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=self._batch_sharding(x)), ro
    )
    logp_old, live_routes = self.abstract_old_pass(state.params, ro)
    routes = pass_routes(self.cfg.replay, "update", sampler=ro.routes, live=live_routes)
    mb = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct((B // N, *x.shape[1:]), x.dtype), (ro, logp_old, routes)
    )
    mb = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=self._batch_sharding(x)), mb
    )
    W = ro.tokens.shape[1]
    old = (self._abstract_plan(B, W),) if self._packs(self._old_groups(B, W)) else ()
    upd = (self._abstract_plan(B // N, W),) if self._packs(self.micro_batches(B // N, W)) else ()
    return {
        "old_pass": self._old_pass.lower(state.params, ro, *old),
        "update": self._compile_update(state, *mb).lower(state, *mb, *upd),
    }

  def abstract_old_pass(self, params, ro: Rollouts):
    """(logp_old, live routes or None) that `old_pass` returns for abstract `params` / batch `ro`, as
    ShapeDtypeStructs in the trainer's batch sharding: what the updates read besides the rollouts.
    """
    out = jax.eval_shape(self._old_pass_fn, params, ro)[:2]
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=self._batch_sharding(x)), out
    )

  def _batch_sharding(self, x):
    if self.mesh is None:
      return None
    return NamedSharding(self.mesh, batch_spec(self.rules, x.ndim, self.mesh, x.shape[0]))

  def _shard_batch(self, tree):
    if self.mesh is None:
      return tree
    return jax.tree.map(lambda x: jax.device_put(x, self._batch_sharding(x)), tree)

  def _minibatch_fn(self, tree, start, *, size: int):
    """Rows [start, start + size) of every array of `tree`, in the trainer's batch sharding. One jitted
    program for the whole mini-batch rather than an eager slice and a device_put per array: in a
    2-process run those eager per-array programs once hung with the processes inside different ones.
    """

    def rows(x):
      y = jax.lax.dynamic_slice_in_dim(x, start, size, axis=0)
      sh = self._batch_sharding(y)
      return y if sh is None else jax.lax.with_sharding_constraint(y, sh)

    return jax.tree.map(rows, tree)

  def micro_batches(self, rows: int, length: int) -> int:
    """The micro-batches a mini-batch of `rows` x `length` tokens runs as (trainer.micro_batches, or
    its auto rule when 0)."""
    if self.cfg.micro_batches:
      return self.cfg.micro_batches
    platform, ways = jax.default_backend(), 1
    if self.mesh is not None:
      platform = self.mesh.devices.flat[0].platform
      ways = batch_ways(self.rules, dict(self.mesh.shape))
    return auto_micro_batches(rows, length, platform, ways, self.cfg.loss.name)

  def check_batch(self, B: int, T: int) -> None:
    """The global batch of B responses splits into rl.mini_batches mini-batches, and each of those into
    trainer.micro_batches micro-batches, each of which the mesh's batch axes split evenly; an error
    naming the field otherwise, before any compute."""
    N = self.cfg.mini_batches
    if B % N:
      raise ValueError(f"rl.mini_batches={N} does not divide the global batch of {B} responses")
    check_micro_batches(self.cfg.micro_batches, B // N)
    M = self.micro_batches(B // N, T)
    if self.mesh is not None:
      for what, n in (("global batch", B), ("mini-batch", B // N), ("micro-batch", B // N // M)):
        check_batch_split(self.rules, dict(self.mesh.shape), n, what)

  def _split(self, tree, n: int):
    """[b, ...] -> [n, b/n, ...]: micro-batch j holds rows j, j + n, j + 2n, ... Strided rather than
    contiguous, so that under a batch sharding every micro-batch has rows on every device: the reshape
    and transpose stay local, and the micro-batches run one after another on all devices at once."""

    def one(x):
      x = _flat_tail(x)
      y = x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1)
      if self.mesh is None:
        return y
      spec = batch_spec(self.rules, x.ndim, self.mesh, y.shape[1])
      return jax.lax.with_sharding_constraint(y, NamedSharding(self.mesh, P(None, *spec)))

    return jax.tree.map(one, tree)

  @staticmethod
  def _unflat(tree, like):
    """A micro-batch of `_split`'s output with each leaf's trailing shape back to `like`'s (the routes
    travel flat)."""
    return jax.tree.map(lambda x, l: x.reshape(x.shape[:1] + l.shape[1:]), tree, like)

  def _unsplit(self, tree):
    """The inverse of `_split`: [n, b/n, ...] -> [b, ...], rows back in their order (a leaf split flat
    stays flat: `_unflat` it)."""

    def one(y):
      x = y.swapaxes(0, 1).reshape(y.shape[0] * y.shape[1], *y.shape[2:])
      return (
          x if self.mesh is None else jax.lax.with_sharding_constraint(x, self._batch_sharding(x))
      )

    return jax.tree.map(one, tree)

  # ---- the model's view of a batch ------------------------------------------------------------
  def _score_rows(self, params, r: Rollouts, routes, entropy=False):
    """((logp, entropy or None), live routes) of rows `r`, routes replayed or None."""
    return self.score(
        params, r.tokens, r.positions, routes, r.token_mask, self.cfg.temperature, entropy
    )

  def _constrain(self, x):
    return x if self.mesh is None else jax.lax.with_sharding_constraint(x, self._batch_sharding(x))

  # ---- packed rows (trainer.pack: fo_rl/rl/packing.py) ----------------------------------------------
  def _ways(self) -> int:
    return 1 if self.mesh is None else batch_ways(self.rules, dict(self.mesh.shape))

  def _host_mask(self, token_mask):
    """The token mask on the host, for the packing plans; None without trainer.pack."""
    return np.asarray(host_get(token_mask)) if self.cfg.pack else None

  def _packs(self, micro: int) -> bool:
    """Whether a pass of `micro` micro-batches runs packed: under trainer.pack when there is more than
    one (packing saves compute by running fewer of them; one micro-batch would compute as many rows).
    """
    return self.cfg.pack and micro > 1

  def _plan(self, tm, micro: int) -> packing.Plan | None:
    """The packing plan of the host token mask `tm` [n, W] for a pass of `micro` micro-batches, on the
    devices (each shard's part on the devices that hold its rows); None when the pass runs unpacked.
    """
    if tm is None or not self._packs(micro):
      return None
    p = packing.plan(tm, micro, self._ways())
    if self.mesh is None:
      return packing.Plan(*map(jnp.asarray, p))
    return jax.tree.map(
        lambda x, sh: jax.make_array_from_callback(x.shape, sh, lambda i: x[i]),
        p,
        self._plan_shardings(p),
    )

  def _plan_shardings(self, p: packing.Plan):
    replicated = NamedSharding(self.mesh, jax.sharding.PartitionSpec())
    return packing.Plan(*map(self._batch_sharding, p[:3]), replicated)

  def _abstract_plan(self, n: int, W: int) -> packing.Plan:
    """The plan of a pass over n rows of width W as ShapeDtypeStructs (the dry run)."""
    p = packing.shape(n, W, self._ways())
    if self.mesh is None:
      return p
    return jax.tree.map(
        lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh),
        p,
        self._plan_shardings(p),
    )

  def _take(self, x, src, fill=0):
    """x [n, W, ...] in the row layout -> the packed micro-batch `src` [k, m, W]: [k m, W, ...]."""
    return packing.regather(x, src, fill, self._constrain)

  def _take_routes(self, routes, src):
    """Routes [n, W, L, k] -> the packed micro-batch `src`'s [k m, W, L, k] (gathered flat)."""
    return self._take(_flat_tail(routes), src, None).reshape(-1, *routes.shape[1:])

  def _score_packed(self, params, r: Rollouts, src, routes=None, entropy=False):
    """((logp, entropy or None), live routes flat) of the packed micro-batch `src` [k, m, W] of rows
    `r` ([n, W]), `routes` None or already packed (`_take_routes`); all in the packed layout
    [k m, W, ...]."""
    k, m, W = src.shape
    (logp, ent), live = self.score(
        params,
        self._take(r.tokens, src),
        self._take(r.positions, src),
        routes,
        self._constrain((src >= 0).reshape(k * m, W)),
        self.cfg.temperature,
        entropy,
        segment_ids=self._constrain(packing.segments(src)),
    )
    return (logp, ent), _flat_tail(live)

  def _unpack(self, y, dst, fill=0):
    """A packed-layout array [n, W, ...] (shard-major rows) back in the row layout."""
    return packing.regather(y, dst, fill, self._constrain)

  @staticmethod
  def _put_micro(acc, j, y):
    """acc [k, n/k, W, ...] with micro-batch j's packed rows y [k r, W, ...] written in."""
    k = acc.shape[0]
    y = y.reshape(k, y.shape[0] // k, *y.shape[1:]).astype(acc.dtype)
    return jax.lax.dynamic_update_slice(acc, y, (0, j * y.shape[1]) + (0,) * (y.ndim - 2))

  # ---- old-logprob pass ---------------------------------------------------------------------
  def old_pass(self, params, ro: Rollouts, host_mask=None):
    """Step 1 of `train_step`: (logp_old [B, T] (0 at position 0), the live routes [B, T, L, k] under r2
    (what it records and replays; None otherwise: no HBM held for them), old-pass metrics). Under r3
    logp_old replays the sampler's routes, which are checked here first: they are outside data."""
    if replays_sampler(self.cfg.replay):
      validate_replay_routes(ro.routes, self.model_cfg, ro.token_mask)
    if host_mask is None:
      host_mask = self._host_mask(ro.token_mask)
    plan = self._plan(host_mask, self._old_groups(*ro.tokens.shape))
    return self._old_pass(params, self._shard_batch(ro), plan)

  def _old_groups(self, B: int, T: int) -> int:
    """Micro-batches the old-logprob pass runs the global batch of B rows x T tokens as (micro-batches
    of the update's size)."""
    mini = B // self.cfg.mini_batches
    return B // (mini // self.micro_batches(mini, T))

  def old_logprobs(self, params, ro: Rollouts) -> jax.Array:
    """[B, T] logp_old = log pi_old(y_t), exactly as `train_step` computes it."""
    return self.old_pass(params, ro)[0]

  def _old_scores(self, score):
    """(logp_live, logp_old, entropy of pi_old, live routes) of a batch: one forward (two under r3).
    `score(replay, entropy)` runs the model on the batch (rows or packed), replaying the sampler's
    routes or not."""
    r3 = replays_sampler(self.cfg.replay)
    (logp_live, entropy), live_routes = score(False, not r3)
    logp_old = logp_live
    if r3:
      (logp_old, entropy), _ = score(True, True)
    return logp_live, logp_old, entropy, live_routes

  def _old_pass_fn(self, params, ro: Rollouts, plan=None):
    n = self._old_groups(*ro.tokens.shape)  # micro-batches in the global batch
    moe, keep = self.model_cfg.num_experts > 0, self.cfg.replay == "r2"
    counts = None  # router disagreement sums
    if plan is not None:
      logp_live, logp_old, entropy, live_routes, counts = self._old_scores_packed(
          params, ro, plan, n, moe, keep
      )
    elif n == 1:
      score = lambda replay, ent: self._score_rows(  # noqa: E731
          params, ro, ro.routes if replay else None, ent
      )
      logp_live, logp_old, entropy, live_routes = self._old_scores(score)
    else:  # one micro-batch at a time (lax.map: a loop, so only one micro-batch's activations live)

      def one(mb):
        mb = self._unflat(mb, ro)
        score = lambda replay, ent: self._score_rows(  # noqa: E731
            params, mb, mb.routes if replay else None, ent
        )
        return jax.tree.map(_flat_tail, self._old_scores(score))  # the routes leave flat

      logp_live, logp_old, entropy, live_routes = self._unsplit(
          jax.lax.map(one, self._split(ro, n))
      )
    if live_routes is not None:  # in the rollouts' narrow route dtype, as R2 stores them
      live_routes = live_routes.reshape(ro.routes.shape).astype(ro.routes.dtype)
    if moe and counts is None:
      counts = rl_metrics.router_disagreement_counts(ro.routes, live_routes, ro.token_mask)
    mask = ro.response_mask
    out = {}
    if replays_sampler(self.cfg.replay):
      out["r3_vs_live_logp_gap"] = rl_metrics.masked_mean(jnp.abs(logp_old - logp_live), mask)
    # Entropy of pi_old (the policy logp_old comes from: replayed under r3) at each response token's
    # predicting position (logits t-1 predict token t).
    out["entropy"] = rl_metrics.masked_mean(entropy, mask)
    if moe:
      dis = rl_metrics.disagreement_from_counts(counts)
      out["router_disagreement_per_decision"] = dis["per_decision"]
      out["router_disagreement_per_token"] = dis["per_token"]
    out["train_infer_kl"] = rl_metrics.train_infer_kl(ro.logp_mu, logp_old, mask)
    out["train_infer_k3"] = rl_metrics.k3_kl(ro.logp_mu, logp_old, mask)
    out["train_infer_frac_tau2"] = rl_metrics.frac_ratio_beyond(ro.logp_mu, logp_old, mask, 2.0)
    out.update(rl_metrics.train_infer_seq_quantiles(ro.logp_mu, logp_old, mask))
    return logp_old, live_routes if keep else None, out

  # ---- one update -----------------------------------------------------------------------------
  def loss_fn(self, params, ro: Rollouts, logp_old, routes):
    """(policy loss, loss metrics) of one mini-batch; `routes` None (live routing) or the [B, T, L, k]
    routes to replay (`pass_routes(..., "update", ...)`)."""
    (logp, _), _ = self.score(
        params, ro.tokens, ro.positions, routes, ro.token_mask, self.cfg.temperature
    )
    return policy_loss(
        LossInputs(logp, logp_old, ro.logp_mu, ro.advantages, ro.response_mask), self.cfg.loss
    )

  def _accumulated_grads(self, params, ro: Rollouts, logp_old, routes):
    """((loss, metrics), grads) of one mini-batch, as `jax.value_and_grad(self.loss_fn)` returns them,
    computed over trainer.micro_batches micro-batches (lax.scan: one micro-batch's activations live at a
    time). Micro-batch j's loss is weighted by its own denominator over the mini-batch's
    (`loss_denominator`), so the weighted losses and their gradients sum to the mini-batch's exactly;
    the metrics are computed once, on the whole mini-batch's log-probs (a [B, T] array the scan returns).
    """
    M, lcfg = self.micro_batches(*ro.tokens.shape), self.cfg.loss
    inputs = lambda r, logp, lo: LossInputs(  # noqa: E731
        logp, lo, r.logp_mu, r.advantages, r.response_mask
    )
    den = loss_denominator(inputs(ro, logp_old, logp_old), lcfg)

    def micro_loss(p, x):
      r, lo, rp = x
      r, rp = self._unflat((r, rp), (ro, routes))
      (logp, _), _ = self._score_rows(p, r, rp)
      b = inputs(r, logp, lo)
      loss, _ = policy_loss(b, lcfg)
      return loss * loss_denominator(b, lcfg) / den, logp

    def body(acc, x):
      (loss, logp), g = jax.value_and_grad(micro_loss, has_aux=True)(params, x)
      acc_loss, acc_g = acc
      acc_g = jax.tree.map(lambda a, b: a + b.astype(a.dtype), acc_g, g)
      return (acc_loss + loss, acc_g), logp

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    xs = self._split((ro, logp_old, routes), M)
    (loss, grads), logp = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zeros), xs)
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
    logp = jax.lax.stop_gradient(self._unsplit(logp))
    _, metrics = policy_loss(inputs(ro, logp, logp_old), lcfg)
    return (loss, metrics), grads

  def _old_scores_packed(
      self, params, ro: Rollouts, plan: packing.Plan, M: int, moe: bool, keep: bool
  ):
    """`_old_scores` over the packed micro-batches of `plan` (a loop over the `plan.count` of M that hold
    tokens), gathered back into the row layout, and the router disagreement sums (`moe`), counted per
    micro-batch; the live routes (flat [B, T, L * k]) only when `keep` (R2 replays them), else None:
    the packed layout and its gathered copy would each be as large as the sampler's routes."""
    B, W = ro.tokens.shape
    k = self._ways()
    r = B // (M * k)
    zeros = lambda x: jnp.zeros((k, B // k, W, *x.shape[2:]), x.dtype)  # noqa: E731
    rows0 = (zeros(ro.logp_mu),) * 3 + ((zeros(_flat_tail(ro.routes)),) if keep else ())
    names = ("num_decisions", "num_diff", "num_tokens", "num_tokens_diff")
    counts0 = {n: jnp.zeros((), jnp.float32) for n in names} if moe else {}

    def body(j, acc):
      rows, counts = acc
      src = packing.micro(plan.src, j, r)
      # the sampler's routes, packed once: replayed under r3, compared with the live ones (MoE only:
      # replay needs a MoE model)
      sampler = self._take_routes(ro.routes, src) if moe else None
      score = lambda replay, ent: self._score_packed(  # noqa: E731
          params, ro, src, sampler if replay else None, ent
      )
      *out, live = self._old_scores(score)
      if moe:
        c = rl_metrics.router_disagreement_counts(
            sampler, live.reshape(sampler.shape), (src >= 0).reshape(-1, W)
        )
        counts = {n: counts[n] + c[n] for n in names}
      out = (*out, live) if keep else out
      return tuple(self._put_micro(a, j, y) for a, y in zip(rows, out)), counts

    rows, counts = jax.lax.fori_loop(0, jnp.minimum(plan.count, M), body, (rows0, counts0))
    rows = [a.reshape(B, *a.shape[2:]) for a in rows]
    out = [self._unpack(a, plan.dst) for a in rows[:3]]
    live = self._unpack(rows[3], plan.dst, None) if keep else None
    return (*out, live, counts if moe else None)

  def _packed_grads(self, params, ro: Rollouts, logp_old, routes, plan: packing.Plan):
    """`_accumulated_grads` over the packed micro-batches of `plan`: only the `plan.count` of M that hold
    tokens run (a loop with a bound read at run time). Micro-batch j's loss is the mini-batch's loss on
    the rows it holds (the others masked out: a fully-masked row contributes exactly zero), weighted by
    its denominator over the mini-batch's, as in `_accumulated_grads`."""
    b, W = ro.tokens.shape
    M, lcfg, k = self.micro_batches(b, W), self.cfg.loss, self._ways()
    r = b // (M * k)
    den = loss_denominator(
        LossInputs(logp_old, logp_old, ro.logp_mu, ro.advantages, ro.response_mask), lcfg
    )

    def micro_loss(p, j):
      src = packing.micro(plan.src, j, r)
      rp = None if routes is None else self._take_routes(routes, src)
      (logp_p, _), _ = self._score_packed(p, ro, src, rp)
      in_j = plan.row_mb == j  # [k, b / k]: the rows micro-batch j holds
      logp = self._unpack(
          logp_p, jnp.where(in_j[..., None] & (plan.dst >= 0), plan.dst - j * r * W, -1)
      )
      mask = ro.response_mask * in_j.reshape(b, 1).astype(ro.response_mask.dtype)
      x = LossInputs(logp, logp_old, ro.logp_mu, ro.advantages, mask)
      loss, _ = policy_loss(x, lcfg)
      return loss * loss_denominator(x, lcfg) / den, logp_p

    def body(j, acc):
      acc_loss, acc_g, acc_logp = acc
      (loss, logp_p), g = jax.value_and_grad(micro_loss, has_aux=True)(params, j)
      acc_g = jax.tree.map(lambda a, x: a + x.astype(a.dtype), acc_g, g)
      return acc_loss + loss, acc_g, self._put_micro(acc_logp, j, logp_p)

    acc0 = (
        jnp.zeros((), jnp.float32),
        jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params),
        jnp.zeros((k, b // k, W), jnp.float32),
    )
    loss, grads, logp = jax.lax.fori_loop(0, jnp.minimum(plan.count, M), body, acc0)
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, params)
    logp = jax.lax.stop_gradient(self._unpack(logp.reshape(b, W), plan.dst))
    _, metrics = policy_loss(
        LossInputs(logp, logp_old, ro.logp_mu, ro.advantages, ro.response_mask), lcfg
    )
    return (loss, metrics), grads

  def _update_fn(self, state: TrainState, ro: Rollouts, logp_old, routes, plan=None):
    if plan is not None:
      (loss, m), grads = self._packed_grads(state.params, ro, logp_old, routes, plan)
    elif self.micro_batches(*ro.tokens.shape) == 1:
      (loss, m), grads = jax.value_and_grad(self.loss_fn, has_aux=True)(
          state.params, ro, logp_old, routes
      )
    else:
      (loss, m), grads = self._accumulated_grads(state.params, ro, logp_old, routes)
    grad_norm = optax.global_norm(grads)
    ok = jnp.isfinite(grad_norm) & jnp.isfinite(loss)
    grads = jax.tree.map(lambda g: jnp.where(ok, g, 0), grads)  # keep Adam's moments finite too
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    params = _where_finite(ok, params, state.params)
    opt_state = _where_finite(ok, opt_state, state.opt_state)
    update_norm = optax.global_norm(jax.tree.map(jnp.subtract, params, state.params))
    skipped = (~ok).astype(jnp.int32)
    new = TrainState(params, opt_state, state.step + 1, state.skipped + skipped)
    m = dict(m, loss=loss, grad_norm=grad_norm, update_norm=update_norm, skipped=skipped)
    return new, m

  def _compile_update(self, state: TrainState, mb, logp_old, routes):
    """The jitted update for these shapes: update(state, mb, logp_old, routes[, plan]); the packing
    plan is an argument under trainer.pack (its shapes follow the mini-batch's, never the data)."""
    if self.mesh is None:
      return jax.jit(self._update_fn, donate_argnums=0)
    state_sh = jax.tree.map(lambda x: x.sharding, state)
    batch_sh = jax.tree.map(self._batch_sharding, (mb, logp_old, routes))
    plan_sh = ()
    if self._packs(self.micro_batches(*mb.tokens.shape)):  # each shard's plan where its rows are
      plan_sh = (self._plan_shardings(self._abstract_plan(*mb.tokens.shape)),)
    return jax.jit(
        self._update_fn,
        in_shardings=(state_sh, *batch_sh, *plan_sh),
        out_shardings=(state_sh, NamedSharding(self.mesh, jax.sharding.PartitionSpec())),
        donate_argnums=0,
    )

  # ---- the step -------------------------------------------------------------------------------
  def train_step(self, state: TrainState, ro: Rollouts) -> tuple[TrainState, dict[str, float]]:
    cfg, N = self.cfg, self.cfg.mini_batches
    B, T = ro.tokens.shape
    self.check_batch(B, T)
    ro = self._shard_batch(ro)
    tm = self._host_mask(ro.token_mask)  # once per step: every packing plan reads it
    logp_old, live_routes, old_metrics = self.old_pass(state.params, ro, tm)
    routes = pass_routes(cfg.replay, "update", sampler=ro.routes, live=live_routes)
    per_mb = []
    mb_size = B // N
    for i in range(N):
      mb, lo, rp = self._minibatch((ro, logp_old, routes), i * mb_size, size=mb_size)
      rows = None if tm is None else tm[i * mb_size : (i + 1) * mb_size]
      plan = self._plan(rows, self.micro_batches(mb_size, T))
      if mb_size not in self._updates:
        self._updates[mb_size] = self._compile_update(state, mb, lo, rp)
      self._update = self._updates[mb_size]
      state, m = self._update(state, mb, lo, rp, *([] if plan is None else [plan]))
      per_mb.append(m)
    per_mb = host_get(per_mb)
    self.last_minibatch_metrics = per_mb  # per-update values, for tests and debugging
    return state, self._summarize(ro, old_metrics, per_mb, state)

  @staticmethod
  def _summarize(ro: Rollouts, old_metrics, per_mb, state) -> dict[str, float]:
    """Old-pass metrics, then each update metric averaged (max for *_max) over the updates that were
    applied: a skipped update's NaN loss / grad norm would otherwise hide the others (it is counted in
    skipped_steps instead; all NaN when every update of the step was skipped)."""
    out = {k: float(v) for k, v in host_get(old_metrics).items()}
    applied = np.asarray([int(m["skipped"]) == 0 for m in per_mb])
    for k in per_mb[0]:
      if k == "skipped":
        continue
      vals = np.asarray([m[k] for m in per_mb], np.float64)[applied]
      out[k] = (
          float(vals.max() if k.endswith("_max") else vals.mean()) if vals.size else float("nan")
      )
    out["skipped_steps"] = int(sum(int(m["skipped"]) for m in per_mb))  # in this train_step
    out["skipped_steps_total"] = int(state.skipped)  # since init_state
    out["response_length"] = float(np.asarray(host_get(ro.response_mask)).sum(-1).mean())
    return out
