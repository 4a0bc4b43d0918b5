"""The RL train step (fo_rl/rl/trainer.py): updates and metrics, non-finite skipping, Routing Replay (R2/R3)
and its silent failure modes (algorithms.md section 5), sharded vs single device, config errors.

One batch layout is shared by every test: B rows of [left-padded prompt (P) | right-padded response (R)],
prompt and response lengths varying per row, junk tokens in the padding. The "fp32 sampler" is teacher
forcing with the trainer's own parameters: logp_mu and the sampler's routes are what a float32 sampler
would have returned, so under R3 the old-logprob pass must reproduce logp_mu exactly.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fo_rl.model import abstract_model, make_apply, positions_from_mask
from fo_rl.parallel.sharding import DEFAULT_RULES, make_mesh, state_shardings
from fo_rl.rl.rollouts import Rollouts, pass_routes
from fo_rl.rl import packing
from fo_rl.rl.losses import LossConfig, LossInputs, loss_denominator, policy_loss
from fo_rl.rl.optim import OptimConfig
from fo_rl.rl.trainer import Trainer, TrainerConfig, auto_micro_batches
from toy import TOY

CFG = TOY.replace(vocab_size=96)  # the toy model (tests/toy.py) with this file's vocabulary
E, L, K = CFG.num_experts, CFG.num_layers, CFG.num_experts_per_tok
B, P, R = 16, 8, 8
T = P + R
N = 2  # mini-batches per train step
MB = B // N
# Adam divides each gradient component by its own magnitude: with the default eps (1e-8) a component whose
# gradient is at the roundoff level of a reordered (sharded) sum moves by +-lr either way. eps = 1e-4 keeps
# such components linear, so parameters can be compared across meshes at 1e-5.
OPTIM = OptimConfig(learning_rate=1e-3, eps=1e-4)
TRAINER_KEYS = (  # every per-step metric the trainer owns (reward / accuracy come from the main loop)
    "response_length",
    "entropy",
    "train_infer_kl",
    "train_infer_k3",
    "train_infer_frac_tau2",
    "is_weight_mean",
    "is_weight_max",
    "is_truncated_frac",
    "clip_frac_high",
    "clip_frac_low",
    "ratio_mean",
    "ratio_max",
    "router_disagreement_per_decision",
    "router_disagreement_per_token",
    "grad_norm",
    "update_norm",
    "skipped_steps",
    "loss",
)


# ------------------------------------------------------------------------------------------------------
# Helpers.
# ------------------------------------------------------------------------------------------------------
def _copy(tree):
  """A copy that survives donation of the original."""
  return jax.tree.map(jnp.copy, tree)


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _np_logp(logits, tokens):
  """Independent reference: numpy float64 log-softmax; [B, T] logp of token t from logits t-1 (0 at t=0)."""
  lf = np.asarray(logits, np.float64)
  m = lf.max(-1, keepdims=True)
  ls = lf - (m + np.log(np.exp(lf - m).sum(-1, keepdims=True)))
  tok = np.asarray(tokens)
  out = np.zeros(tok.shape)
  out[:, 1:] = np.take_along_axis(ls[:, :-1], tok[:, 1:, None], -1)[..., 0]
  return out, ls


def _params(seed=0):
  """Parameters drawn in numpy (no init program to compile): norms near 1, weights std 0.15, which gives
  peakier logits and routing than the std-0.02 init."""
  rng = np.random.default_rng(seed)
  _, abstract = abstract_model(CFG)
  return jax.tree.map(
      lambda a: jnp.asarray(
          rng.uniform(0.8, 1.2, a.shape) if len(a.shape) == 1 else rng.normal(0.0, 0.15, a.shape),
          np.float32,
      ),
      abstract,
  )


def _layout(seed=0):
  """Left-padded prompts, right-padded responses, junk in the padding. Lengths from small sets so the
  unpadded reference needs few compiles."""
  rng = np.random.default_rng(seed)
  plen = rng.choice([3, 5, 8], B)
  rlen = rng.choice([3, 8], B)
  plen[:2], rlen[:2] = (8, 3), (8, 8)
  tokens = rng.integers(1, CFG.vocab_size, (B, T)).astype(np.int32)  # padding keeps its junk tokens
  token_mask = np.zeros((B, T), bool)
  resp = np.zeros((B, T), np.float32)
  for b in range(B):
    token_mask[b, P - plen[b] : P + rlen[b]] = True
    resp[b, P : P + rlen[b]] = 1
  return tokens, token_mask, resp, plen, rlen


def _with(ro: Rollouts, **kw) -> Rollouts:
  d = {k: getattr(ro, k) for k in ro.__dataclass_fields__}
  d.update({k: jnp.asarray(v) for k, v in kw.items()})
  return Rollouts(**d)


def _mb(tree, i):
  return jax.tree.map(lambda x: None if x is None else x[i * MB : (i + 1) * MB], tree)


# ------------------------------------------------------------------------------------------------------
# Fixtures (module scope: every trainer compiles once).
# ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def env():
  graphdef, _ = abstract_model(CFG)
  params = _params()
  apply = jax.jit(make_apply(graphdef))
  tokens, token_mask, resp, plen, rlen = _layout()
  pos = np.asarray(positions_from_mask(jnp.asarray(token_mask)))
  logits, routes = apply(params, tokens, pos, None, token_mask)
  logp_live, logsm = _np_logp(logits, tokens)
  rng = np.random.default_rng(1)
  adv = (rng.choice([-1.0, 1.0], B) * rng.uniform(0.5, 1.5, B)).astype(np.float32)
  # "fp32 sampler": exact logp_mu and routes, by teacher forcing with the same parameters.
  exact = Rollouts(
      jnp.asarray(tokens),
      jnp.asarray(token_mask),
      jnp.asarray(pos),
      jnp.asarray(resp),
      jnp.asarray(np.where(resp > 0, logp_live, 0.0).astype(np.float32)),
      routes,
      jnp.asarray(adv),
  )
  # A sampler with a gap: noisy logp_mu (a few tokens far below: TIS truncation) and ~10% of the MoE
  # decisions at real tokens changed to a different expert set.
  noise = rng.normal(0, 0.3, (B, T)) - 3.0 * (rng.uniform(size=(B, T)) < 0.08)
  logp_mu = np.where(resp > 0, logp_live + noise, 0.0).astype(np.float32)
  r = np.asarray(routes).copy()
  flip = (rng.uniform(size=(B, T, L)) < 0.1) & token_mask[..., None]
  flip[:, :, 1] = False  # layer 1 is dense
  r[flip] = (r[flip] + 1) % E  # {a+1, b+1} != {a, b} for k=2, E=8
  noisy = _with(exact, logp_mu=logp_mu, routes=r)
  return dict(
      graphdef=graphdef,
      params=params,
      apply=apply,
      logits=np.asarray(logits),
      logsm=logsm,
      routes=np.asarray(routes),
      logp_live=logp_live,
      exact=exact,
      noisy=noisy,
      flip=flip,
      plen=plen,
      rlen=rlen,
  )


@pytest.fixture(scope="module")
def trainers(env):
  return {
      rp: Trainer(
          env["graphdef"], CFG, TrainerConfig(mini_batches=N, replay=rp, optim=OPTIM, pack=False)
      )
      for rp in ("r2", "r3")
  }  # (r2's old pass is the live, no-replay one); unpacked: the reference packing is checked against


@pytest.fixture(scope="module")
def runs(env, trainers):
  """(replay, batch name) -> (state after the step, metrics, per-update metrics); computed once."""
  cache = {}

  def get(replay, batch="noisy"):
    if (replay, batch) not in cache:
      tr = trainers[replay]
      state, m = tr.train_step(tr.init_state(_copy(env["params"])), env[batch])
      cache[replay, batch] = (state, m, tr.last_minibatch_metrics)
    return cache[replay, batch]

  return get


def _ratio_rounding(env) -> float:
  """How far the first update's staleness ratio may sit from 1 when the old pass and the update round
  differently: 1e-6, or 4 float32 ulps of the first mini-batch's largest |logp|. Rounding, never a single
  misrouted token (~1e-2)."""
  resp = np.asarray(env["noisy"].response_mask)[:MB] > 0
  ulp = float(np.spacing(np.float32(np.abs(env["logp_live"][:MB][resp]).max())))
  return max(1e-6, 4 * ulp)


def _grad(state):
  """The (clipped) gradient of a state's first and only update, read back from Adam's first moment."""
  return [x / (1 - OPTIM.b1) for x in _leaves(state.opt_state[1][0].mu)]


# ------------------------------------------------------------------------------------------------------
# Train step basics.
# ------------------------------------------------------------------------------------------------------
def test_train_step_updates_and_metrics(env, trainers, runs):
  state, m, per_mb = runs("r2")
  assert int(state.step) == N and int(state.skipped) == 0 and len(per_mb) == N
  for k in TRAINER_KEYS:
    assert k in m and np.isfinite(m[k]), k
  assert m["skipped_steps"] == 0
  p0, p1 = _leaves(env["params"]), _leaves(state.params)
  assert all(np.abs(a - b).max() > 0 for a, b in zip(p0, p1))  # every parameter moved
  assert m["update_norm"] > 0 and m["grad_norm"] > 0

  # Old-pass metrics against an independent numpy computation (logp_old = live logp under r2).
  ro, resp = env["noisy"], np.asarray(env["noisy"].response_mask) > 0
  mu, lo = np.asarray(ro.logp_mu, np.float64), env["logp_live"]
  d = (mu - lo)[resp]
  np.testing.assert_allclose(m["train_infer_kl"], d.mean(), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(m["train_infer_k3"], (np.exp(-d) - 1 + d).mean(), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(m["train_infer_frac_tau2"], (np.abs(d) > np.log(2)).mean(), atol=1e-6)
  assert abs(m["train_infer_kl"]) > 0.01 and m["train_infer_frac_tau2"] > 0  # the data has a gap
  ent_prev = -(np.exp(env["logsm"]) * env["logsm"]).sum(-1)  # entropy of the distribution at t-1
  np.testing.assert_allclose(m["entropy"], ent_prev[:, :-1][resp[:, 1:]].mean(), rtol=1e-5)
  np.testing.assert_allclose(m["response_length"], env["rlen"].mean())
  flip, real = env["flip"], np.asarray(ro.token_mask)
  np.testing.assert_allclose(
      m["router_disagreement_per_decision"], flip[real][:, [0, 2]].mean(), atol=1e-6
  )
  np.testing.assert_allclose(
      m["router_disagreement_per_token"], flip[real].any(-1).mean(), atol=1e-6
  )
  assert 0 < m["router_disagreement_per_decision"] < m["router_disagreement_per_token"]

  # First update: staleness ratio 1, so the IS weight is the capped pi_old / mu.
  rho = np.exp(lo - mu)[:MB][resp[:MB]]
  first = per_mb[0]
  np.testing.assert_allclose(first["is_weight_mean"], np.minimum(rho, 5.0).mean(), rtol=1e-5)
  np.testing.assert_allclose(first["is_truncated_frac"], (rho > 5.0).mean(), atol=1e-6)
  assert first["is_truncated_frac"] > 0
  # Ratio 1 up to the rounding of two different XLA programs (see the r2 test below).
  tol = _ratio_rounding(env)
  assert abs(first["ratio_max"] - 1) <= tol and abs(first["ratio_mean"] - 1) <= 1e-6


def test_non_finite_update_is_skipped_and_counted(env, trainers, runs):
  tr = trainers["r2"]
  runs("r2")  # the update is compiled
  adv = np.asarray(env["noisy"].advantages).copy()
  adv[1] = np.nan  # poisons mini-batch 0 only
  bad = _with(env["noisy"], advantages=adv)
  state0 = tr.init_state(_copy(env["params"]))
  keep = _leaves((state0.params, state0.opt_state))
  state, m = tr.train_step(_copy(state0), bad)
  assert m["skipped_steps"] == 1 and m["skipped_steps_total"] == 1 and int(state.step) == N
  assert [int(x["skipped"]) for x in tr.last_minibatch_metrics] == [1, 0]
  assert np.isfinite(m["loss"]) and np.isfinite(m["grad_norm"])  # averaged over the applied update

  # The same two updates one at a time: the bad one leaves params and optimizer state bitwise unchanged,
  # the good one then applies exactly as inside train_step.
  logp_old, recorded, _ = tr.old_pass(state0.params, bad)
  s1, m1 = tr._update(_copy(state0), _mb(bad, 0), _mb(logp_old, 0), _mb(recorded, 0))
  assert int(m1["skipped"]) == 1 and not np.isfinite(float(m1["loss"]))
  assert int(s1.step) == 1 and int(s1.skipped) == 1
  for a, b in zip(keep, _leaves((s1.params, s1.opt_state))):
    np.testing.assert_array_equal(a, b)
  before = _leaves(s1.params)
  s2, m2 = tr._update(s1, _mb(bad, 1), _mb(logp_old, 1), _mb(recorded, 1))
  assert int(m2["skipped"]) == 0
  after = _leaves(s2.params)
  assert any(np.abs(a - b).max() > 0 for a, b in zip(before, after))
  np.testing.assert_allclose(
      float(m2["update_norm"]),
      np.sqrt(sum(((a - b).astype(np.float64) ** 2).sum() for a, b in zip(before, after))),
      rtol=1e-4,
  )
  for a, b in zip(_leaves((s2.params, s2.opt_state)), _leaves((state.params, state.opt_state))):
    np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------------------------------------------
# Routing Replay.
# ------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_r2_first_minibatch_is_exactly_the_no_replay_update(env, trainers, runs):
  _, m, per_mb = runs("r2")
  first = per_mb[0]
  # Staleness ratio 1: same params, same (recorded) routes. The old pass and the update are different
  # XLA programs (forward vs forward+backward) that may round differently: measured on CPU, one token's
  # logp (|logp| ~ 6.9) differs by 2 float32 ulps, ratio_max - 1 = 9.5e-7; ratio_mean is exactly 1.
  # On another CPU the same token differed by 3 ulps (ratio_max - 1 = 1.4e-6).
  assert (
      abs(first["ratio_max"] - 1) <= _ratio_rounding(env) and abs(first["ratio_mean"] - 1) <= 1e-6
  )
  # (the step metrics carry no separate "first mini-batch staleness": it is 1 by construction, checked
  # here on the per-update metrics instead)
  assert "staleness_ratio_first_minibatch_max" not in m
  # Loss and gradient of the first update (replaying the recorded routes) vs live routing, no replay.
  tr, params, ro = trainers["r2"], env["params"], env["noisy"]
  logp_old, recorded, _ = tr.old_pass(params, ro)
  (loss, _), g = jax.jit(jax.value_and_grad(tr.loss_fn, has_aux=True))(
      params, _mb(ro, 0), _mb(logp_old, 0), None
  )
  g = _leaves(g)
  norm = np.sqrt(sum((x.astype(np.float64) ** 2).sum() for x in g))
  np.testing.assert_allclose(first["loss"], float(loss), rtol=1e-6)
  np.testing.assert_allclose(first["grad_norm"], norm, rtol=1e-6)
  s_rep, _ = tr._update(
      tr.init_state(_copy(params)), _mb(ro, 0), _mb(logp_old, 0), _mb(recorded, 0)
  )
  clip = min(1.0, OPTIM.grad_clip / norm)
  for x, y in zip(_grad(s_rep), g):
    np.testing.assert_allclose(x, clip * y, rtol=1e-5, atol=1e-8)


@pytest.mark.slow
def test_r3_with_fp32_sampler_reproduces_logp_mu(env, trainers):
  """(A whole r3 train step on this batch runs, sharded, in test_sharded_train_step_matches_single_device.)"""
  ro = env["exact"]
  resp = np.asarray(ro.response_mask) > 0
  logp_old, _, m = trainers["r3"].old_pass(env["params"], ro)
  assert np.abs(np.asarray(logp_old) - np.asarray(ro.logp_mu))[resp].max() <= 1e-5
  m = {k: float(v) for k, v in m.items()}
  assert abs(m["train_infer_kl"]) < 1e-6 and m["train_infer_k3"] < 1e-6
  assert m["train_infer_frac_tau2"] == 0
  assert m["router_disagreement_per_decision"] == 0 and m["r3_vs_live_logp_gap"] < 1e-6


@pytest.mark.slow
def test_replay_changes_the_computation(env, trainers, runs):
  runs("r2")  # the update is compiled
  tr, params, ro = trainers["r2"], env["params"], env["noisy"]
  logp_old, recorded, _ = tr.old_pass(params, ro)
  rep = np.asarray(recorded)[:MB].copy()
  s_own, m_own = tr._update(
      tr.init_state(_copy(params)), _mb(ro, 0), _mb(logp_old, 0), jnp.asarray(rep)
  )
  rep[:, :, 2] = (rep[:, :, 2] + 3) % E  # permute the experts of MoE layer 2 only
  s_perm, m_perm = tr._update(
      tr.init_state(_copy(params)), _mb(ro, 0), _mb(logp_old, 0), jnp.asarray(rep)
  )
  assert int(m_perm["skipped"]) == 0
  assert abs(float(m_perm["loss"]) - float(m_own["loss"])) > 1e-2 * abs(float(m_own["loss"]))
  assert abs(float(m_perm["ratio_mean"]) - 1) > 1e-3  # pi_theta under other experts is not pi_old
  gdiff = max(np.abs(x - y).max() for x, y in zip(_grad(s_perm), _grad(s_own)))
  assert gdiff > 1e-3
  # R3 with sampler routes that differ from the live ones: the old pass follows the sampler's routes.
  resp = np.asarray(ro.response_mask) > 0
  logp_r3, _, m = trainers["r3"].old_pass(params, ro)
  gap = np.abs(np.asarray(logp_r3) - env["logp_live"])
  assert gap[resp].max() > 1e-3 and m["r3_vs_live_logp_gap"] > 1e-5
  # ... and only there: a row whose routes were never changed matches live routing.
  clean = ~env["flip"].any(axis=(1, 2))
  if clean.any():
    assert gap[clean][resp[clean]].max() < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("replay", ["r2", "r3"])
def test_every_update_replays_the_routes_its_mode_says(env, trainers, runs, monkeypatch, replay):
  """A spy on the compiled update records what each of the N updates of a train step feeds the gating:
  the sampler's routes under r3, the old pass's recorded live routes under r2, for that update's rows.
  On this batch the sampler's routes differ from the live ones at ~10% of the MoE decisions, so passing
  either in the other's place, or None (live routing), to any update fails. Under r3 the first update's
  staleness ratio pi_theta / pi_old is 1 (to rounding) though live routing would move it by far more:
  the update replays exactly what the old pass replayed."""
  tr, ro = trainers[replay], env["noisy"]
  runs(replay)  # the update is compiled
  compiled, seen = tr._updates[MB], []

  def spy(state, mb, lo, rp):
    seen.append(None if rp is None else np.asarray(rp))
    return compiled(state, mb, lo, rp)

  monkeypatch.setitem(tr._updates, MB, spy)
  tr.train_step(tr.init_state(_copy(env["params"])), ro)
  per_mb = tr.last_minibatch_metrics
  sampler_routes, live = np.asarray(ro.routes), env["routes"]
  want, other = (sampler_routes, live) if replay == "r3" else (live, sampler_routes)
  real = np.asarray(ro.token_mask)
  assert len(seen) == N and len(per_mb) == N
  for i, rp in enumerate(seen):
    rows = slice(i * MB, (i + 1) * MB)
    assert rp is not None, f"update {i + 1} routed live"
    np.testing.assert_array_equal(rp[real[rows]], want[rows][real[rows]], f"update {i + 1}")
    assert (other[rows] != want[rows])[real[rows]].any()  # the check can fail on every update
  if replay == "r3":
    tol = _ratio_rounding(env)
    first = per_mb[0]
    assert abs(first["ratio_max"] - 1) <= tol and abs(first["ratio_mean"] - 1) <= 1e-6
    # What the first update's ratio would be, had it routed live: pi_live / pi_old(sampler's routes).
    logp_r3 = np.asarray(tr.old_logprobs(env["params"], ro))
    resp = np.asarray(ro.response_mask)[:MB] > 0
    assert np.abs(env["logp_live"][:MB] - logp_r3[:MB])[resp].max() > 1e3 * tol
  else:
    # Update 2 scores theta_1 (after update 1) under the recorded routes: its ratio pi_theta_1 / pi_old
    # against an independent forward that replays them, where live routing at theta_1 has moved away.
    logp_old, recorded, _ = tr.old_pass(env["params"], ro)
    s1, _ = compiled(tr.init_state(_copy(env["params"])), *_mb((ro, logp_old, recorded), 0))
    mb, lo, rec = _mb((ro, np.asarray(logp_old), np.asarray(recorded)), 1)
    resp = np.asarray(mb.response_mask) > 0
    ratio = {}
    for name, rp in (("replayed", rec), ("live", None)):
      logits, routes = env["apply"](s1.params, mb.tokens, mb.positions, rp, mb.token_mask)
      ratio[name] = np.exp(_np_logp(logits, mb.tokens)[0] - lo)[resp]
    second = per_mb[1]
    np.testing.assert_allclose(second["ratio_mean"], ratio["replayed"].mean(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(second["ratio_max"], ratio["replayed"].max(), rtol=0, atol=1e-5)
    assert (np.asarray(routes) != rec)[np.asarray(mb.token_mask)].any()  # theta_1 routes elsewhere
    assert np.abs(ratio["live"] - ratio["replayed"]).max() > 1e-3  # ... which shows in the ratio


def test_dense_layer_keeps_its_index_and_shifted_routes_are_rejected(env, trainers, runs):
  tr, params, ro = trainers["r2"], env["params"], env["noisy"]
  runs("r2")  # the update is compiled
  logp_old, recorded, _ = tr.old_pass(params, ro)
  rec = np.asarray(recorded)
  real = np.asarray(ro.token_mask)
  assert (rec[:, :, 1] == -1).all()  # dense layer 1 holds the sentinel
  moe = rec[:, :, [0, 2]][real]
  assert ((moe >= 0) & (moe < E)).all() and (moe[..., 0] != moe[..., 1]).all()
  np.testing.assert_array_equal(rec[real], env["routes"][real])  # what the model itself routes
  shifted = np.roll(rec, 1, axis=2)  # routes shifted by one layer
  with pytest.raises(ValueError, match="layer"):
    trainers["r3"].train_step(trainers["r3"].init_state(_copy(params)), _with(ro, routes=shifted))
  # Inside jit nothing can raise: the shifted routes make the loss NaN and the update is skipped.
  state0 = tr.init_state(_copy(params))
  keep = _leaves((state0.params, state0.opt_state))
  s1, m1 = tr._update(state0, _mb(ro, 0), _mb(logp_old, 0), jnp.asarray(shifted[:MB]))
  assert int(m1["skipped"]) == 1 and int(s1.skipped) == 1 and not np.isfinite(float(m1["loss"]))
  for a, b in zip(keep, _leaves((s1.params, s1.opt_state))):
    np.testing.assert_array_equal(a, b)


def test_left_padded_prompts_keep_routes_aligned(env, trainers):
  """R3 replay of routes computed on the unpadded sequences, shifted into the padded layout, gives the
  unpadded logprobs at every response token; left unshifted, it does not.

  The unpadded reference runs every row from column 0 with positions 0..n-1 (one compiled shape): the
  model is causal and its MoE dispatch dropless, so what follows a row's n real tokens cannot change them.
  """
  ro, plen, rlen = env["exact"], env["plen"], env["rlen"]
  tokens, n = np.asarray(ro.tokens), env["plen"] + env["rlen"]
  starts = P - plen
  seq = np.stack([np.roll(tokens[b], -starts[b]) for b in range(B)])  # real tokens first
  seq_mask = np.arange(T)[None, :] < n[:, None]
  logits_u, routes_u = env["apply"](
      env["params"], seq, np.broadcast_to(np.arange(T), (B, T)), None, seq_mask
  )
  lp_u, _ = _np_logp(logits_u, seq)
  routes_u = np.asarray(routes_u)
  aligned = np.full((B, T, L, K), -7, np.int32)  # junk at padding: never checked, never used
  # valid ids (distinct within a token) everywhere, but at the wrong positions
  unshifted = np.broadcast_to(np.arange(K, dtype=np.int32), (B, T, L, K)).copy()
  unshifted[:, :, 1] = -1
  logp_ref = np.full((B, T), np.nan)
  for b in range(B):
    aligned[b, starts[b] : P + rlen[b]] = routes_u[b, : n[b]]
    unshifted[b, : n[b]] = routes_u[b, : n[b]]
    logp_ref[b, starts[b] : P + rlen[b]] = lp_u[b, : n[b]]
  resp = np.asarray(ro.response_mask) > 0
  r3 = trainers["r3"]
  logp_old = np.asarray(r3.old_logprobs(env["params"], _with(ro, routes=aligned)))
  np.testing.assert_allclose(logp_old[resp], logp_ref[resp], rtol=1e-5, atol=1e-5)
  lp_bad = np.asarray(r3.old_logprobs(env["params"], _with(ro, routes=unshifted)))
  padded = plen < P
  assert np.abs(lp_bad - logp_ref)[padded][resp[padded]].max() > 1e-3  # the check can fail


# ------------------------------------------------------------------------------------------------------
# Sharding.
# ------------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize(
    "mesh_cfg,replay,batch",
    [
        ({"fsdp": 2, "expert": 4}, "r2", "noisy"),
        # r3 replaying exact sampler routes computes what r2 does: compared with the single-device r2 step.
        ({"data": 2, "expert": 2, "tensor": 2}, "r3", "exact"),
    ],
)
def test_sharded_train_step_matches_single_device(env, runs, mesh_cfg, replay, batch):
  ref_state, ref_m, ref_per_mb = runs("r2", batch)
  ro = env[batch]
  mesh = make_mesh(mesh_cfg)
  graphdef, abstract = abstract_model(CFG, mesh)
  params = jax.device_put(_copy(env["params"]), state_shardings(abstract, mesh, DEFAULT_RULES))
  tr = Trainer(graphdef, CFG, TrainerConfig(mini_batches=N, replay=replay, optim=OPTIM), mesh=mesh)
  state = tr.init_state(params)
  in_sh = [x.sharding for x in jax.tree.leaves(state)]
  assert all(len(s.device_set) == 8 and s.mesh.shape == mesh.shape for s in in_sh)
  mu = jax.tree.leaves(state.opt_state[1][0].mu)  # Adam's first moment: sharded like the parameters
  for p, m in zip(jax.tree.leaves(state.params), mu):
    assert m.sharding.is_equivalent_to(p.sharding, p.ndim)
  old = jax.tree.leaves(state)
  new, m = tr.train_step(state, ro)
  assert all(x.is_deleted() for x in old)  # the state was donated
  out_sh = [x.sharding for x in jax.tree.leaves(new)]
  assert all(a.is_equivalent_to(b, x.ndim) for a, b, x in zip(out_sh, in_sh, old))
  assert sum(any(s.spec) for s in out_sh) > len(out_sh) // 2  # most of the state is really sharded

  # The compiled update's in/out shardings are the state's mesh shardings.
  logp_old, live_routes, _ = tr.old_pass(new.params, ro)
  routes = pass_routes(replay, "update", sampler=ro.routes, live=live_routes)
  args = tr._shard_batch(_mb((ro, logp_old, routes), 0))
  compiled = tr._update.lower(new, *args).compile()
  for sh in (compiled.input_shardings[0][0], compiled.output_shardings[0]):
    assert all(a.is_equivalent_to(b, x.ndim) for a, b, x in zip(jax.tree.leaves(sh), out_sh, old))

  assert int(new.step) == N and m["skipped_steps"] == 0
  if batch == "exact":  # the fp32-sampler batch: no train-inference gap under r3 either
    assert abs(m["train_infer_kl"]) < 1e-6 and m["is_truncated_frac"] == 0
    assert abs(m["train_infer_ratio_max"] - 1) < 1e-5 and m["router_disagreement_per_decision"] == 0
  for k in ref_m:
    np.testing.assert_allclose(m[k], ref_m[k], rtol=1e-5, atol=1e-5, err_msg=k)
  for a, b in zip(_leaves(new.params), _leaves(ref_state.params)):
    np.testing.assert_allclose(a, b, atol=1e-5)


# ------------------------------------------------------------------------------------------------------
# Gradient accumulation (trainer.micro_batches).
# ------------------------------------------------------------------------------------------------------
MICRO_LOSSES = {  # every built-in loss, and each MiniRL normalizer: each divides by something else
    "minirl": LossConfig(),
    "minirl_x_len": LossConfig(normalizer="responses_x_len"),
    "minirl_length_norm": LossConfig(length_norm=True),
    "grpo": LossConfig(name="grpo"),
    "dapo": LossConfig(name="dapo"),
    "cispo": LossConfig(name="cispo"),
    "gspo": LossConfig(name="gspo"),
}


def _micro_step(env, loss, replay, micro, mesh=None, batch="noisy", pack=False):
  graphdef = env["graphdef"] if mesh is None else abstract_model(CFG, mesh)[0]
  cfg = TrainerConfig(N, replay=replay, loss=loss, optim=OPTIM, micro_batches=micro, pack=pack)
  tr = Trainer(graphdef, CFG, cfg, mesh=mesh)
  params = _copy(env["params"])
  if mesh is not None:
    params = jax.device_put(
        params, state_shardings(abstract_model(CFG, mesh)[1], mesh, DEFAULT_RULES)
    )
  ro = env[batch]
  if loss.name == "dapo":  # a zero-signal group: DAPO's divisor is the kept tokens only
    ro = _with(ro, advantages=np.where(np.arange(B) % 4 == 1, 0.0, np.asarray(ro.advantages)))
  state, m = tr.train_step(tr.init_state(params), ro)
  return state, m, tr.last_minibatch_metrics


def _assert_same_step(a, b, rtol=2e-5, atol=2e-6):
  (sa, ma, pa), (sb, mb, pb) = a, b
  assert ma.keys() == mb.keys()
  for k in ma:
    np.testing.assert_allclose(ma[k], mb[k], rtol=rtol, atol=atol, err_msg=k)
  for x, y in zip(pa, pb):  # each update's metrics, the loss of each one included
    for k in x:
      np.testing.assert_allclose(x[k], y[k], rtol=rtol, atol=atol, err_msg=k)
  for x, y in zip(_leaves(sa.opt_state[1][0].mu), _leaves(sb.opt_state[1][0].mu)):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-7)  # the accumulated (clipped) gradients
  for x, y in zip(_leaves(sa.params), _leaves(sb.params)):
    np.testing.assert_allclose(x, y, rtol=rtol, atol=atol)


@pytest.mark.parametrize(
    "loss,replay,micro",
    [("minirl", "r3", 2), pytest.param("minirl", "r2", 4, marks=pytest.mark.slow)]
    + [
        pytest.param(name, "r2", 2, marks=pytest.mark.slow)
        for name in MICRO_LOSSES
        if name != "minirl"
    ],
)
def test_micro_batches_give_the_one_big_batch_step(env, runs, loss, replay, micro):
  """trainer.micro_batches=M: the same train step as M=1 (float32): old-pass metrics, each update's
  loss and metrics, the accumulated gradient (Adam's first moment) and the parameters, for every loss
  and normalizer (each divides by something different), under R2 and R3."""
  cfg = MICRO_LOSSES[loss]
  ref = runs(replay) if loss == "minirl" else _micro_step(env, cfg, replay, 1)
  got = _micro_step(env, cfg, replay, micro)
  _assert_same_step(got, ref)
  assert ref[2][0]["loss"] != 0  # a loss that can disagree


def test_auto_micro_batches_rule():
  """trainer.micro_batches=0: 1 off CPU and for a loss of unknown denominator; on CPU the fewest
  micro-batches of at most CPU_MICRO_TOKENS (1,024) tokens per device that keep a multiple of the batch
  ways, one row per device at the least."""
  assert auto_micro_batches(32, 128, "cpu") == 4  # the train bench: 4 x 1,024 tokens
  assert auto_micro_batches(32, 128, "tpu") == auto_micro_batches(32, 128, "gpu") == 1
  assert auto_micro_batches(32, 128, "cpu", loss_name="mine") == 1
  assert auto_micro_batches(16, 16, "cpu") == 1  # 256 tokens: one batch
  assert auto_micro_batches(32, 128, "cpu", ways=4) == 1  # 8 rows x 128 per device
  assert auto_micro_batches(64, 128, "cpu", ways=2) == 4  # 32 rows per device -> 4 x 8 rows
  assert auto_micro_batches(24, 128, "cpu") == 3  # 24 rows: 3 x 8 rows (4 does not divide)
  assert auto_micro_batches(4, 1024, "cpu") == 4  # rows of 1,024 tokens: one per micro-batch
  assert auto_micro_batches(6, 4096, "cpu", ways=2) == 3  # longer rows still: one per device
  for rows, length, ways in [(32, 128, 1), (64, 128, 2), (24, 128, 1), (48, 96, 4), (7, 300, 1)]:
    m = auto_micro_batches(rows, length, "cpu", ways)
    assert rows % m == 0 and (rows // m) % ways == 0


def test_auto_micro_batches_is_what_the_update_runs(env, monkeypatch):
  """The trainer's update runs the micro-batches the auto rule picks (a spy on the split): M = 2 when
  the rule's token budget is lowered to the size of half a mini-batch, M = 1 with the default budget.
  """
  import fo_rl.rl.trainer as trainer_lib

  splits = []
  orig = Trainer._split

  def spy(self, tree, n):
    splits.append(n)
    return orig(self, tree, n)

  monkeypatch.setattr(Trainer, "_split", spy)
  cfg = TrainerConfig(N, optim=OPTIM, micro_batches=0, pack=False)  # packed passes do not split
  tr = Trainer(env["graphdef"], CFG, cfg)
  tr.train_step(tr.init_state(_copy(env["params"])), env["noisy"])
  # B / N = 8 rows x 16 tokens = 128 tokens: each update one batch; the old pass runs the global batch
  # as N groups of a mini-batch's size
  assert splits == [N]
  splits.clear()
  monkeypatch.setattr(trainer_lib, "CPU_MICRO_TOKENS", (B // N) * T // 2)
  tr = Trainer(env["graphdef"], CFG, cfg)
  tr.train_step(tr.init_state(_copy(env["params"])), env["noisy"])
  assert splits == [2 * N, 2]  # the old pass: 2 per mini-batch; the update (traced once): M = 2


@pytest.mark.slow
def test_sharded_micro_batches_match_single_device(env, runs):
  # Batch axes data x expert split each 4-row micro-batch 4 ways; tensor 2 splits the heads.
  mesh = make_mesh({"data": 2, "expert": 2, "tensor": 2})
  ref = runs("r3")
  got = _micro_step(env, LossConfig(), "r3", 2, mesh=mesh)
  _assert_same_step(got, ref, rtol=1e-4, atol=1e-5)


def test_micro_batch_weights_are_the_loss_denominators(env):
  """Splitting the rows and weighting each part's loss by its denominator over the whole's sums to the
  whole batch's loss, for every built-in loss (the identity gradient accumulation rests on), and a part's
  plain loss does not (so the weighting matters)."""
  ro, rng = env["noisy"], np.random.default_rng(5)
  logp_old = np.where(ro.response_mask, env["logp_live"] + rng.normal(0, 0.1, (B, T)), 0)
  adv = np.where(np.arange(B) % 4 == 1, 0.0, np.asarray(ro.advantages))
  b = LossInputs(
      jnp.asarray(env["logp_live"], jnp.float32),
      jnp.asarray(logp_old, jnp.float32),
      ro.logp_mu,
      jnp.asarray(adv, jnp.float32),
      ro.response_mask,
  )
  parts = [np.arange(B) % 3 == j for j in range(3)]  # uneven parts: 6, 5, 5 rows
  for name, cfg in MICRO_LOSSES.items():
    whole = float(policy_loss(b, cfg)[0])
    den = float(loss_denominator(b, cfg))
    split = [jax.tree.map(lambda x, j=j: x[parts[j]], b) for j in range(3)]
    weighted = sum(float(policy_loss(p, cfg)[0] * loss_denominator(p, cfg)) / den for p in split)
    assert weighted == pytest.approx(whole, rel=1e-5, abs=1e-7), name
    plain = sum(float(policy_loss(p, cfg)[0]) for p in split) / 3
    assert abs(plain - whole) > 1e-4 * abs(whole), name
  with pytest.raises(ValueError, match=r"rl\.loss\.name='mine'.*trainer\.micro_batches"):
    mine = LossConfig()
    object.__setattr__(mine, "name", "mine")  # a loss registered elsewhere: no known denominator
    loss_denominator(b, mine)


# ------------------------------------------------------------------------------------------------------
# Packed rows (trainer.pack).
# ------------------------------------------------------------------------------------------------------
def test_packing_plan_moves_every_token_once():
  """fo_rl/rl/packing.py against brute force, for 48 rows of width 64 split 2 ways and run as 3
  micro-batches: every real token lands in exactly one packed position of its own shard and comes back
  to its own, each segment is one contiguous run in column order, a row's micro-batch is where its
  tokens went, and heavy-tailed lengths need fewer micro-batches (count) than the rows."""
  rng = np.random.default_rng(3)
  n, W, P_, k, M = 48, 64, 16, 2, 3
  plen = rng.integers(2, P_ + 1, n)
  rlen = np.minimum(rng.geometric(1 / 8, n), W - P_)
  cols = np.arange(W)
  tm = (cols >= P_ - plen[:, None]) & (cols < P_ + rlen[:, None])
  tm[3] = False  # an empty row
  p = packing.plan(tm, M, k)
  per, r = n // k, n // (k * M)
  assert p.src.shape == p.dst.shape == (k, per, W) and p.row_mb.shape == (k, per)
  assert 1 <= int(p.count) < M
  for d in range(k):
    src, dst, tmd = p.src[d], p.dst[d], tm[d * per : (d + 1) * per]
    real = np.flatnonzero(tmd.reshape(-1))
    assert sorted(src[src >= 0].tolist()) == real.tolist()  # each real token once, in its shard
    assert np.all((dst >= 0) == tmd)
    np.testing.assert_array_equal(src.reshape(-1)[dst.reshape(-1)[real]], real)  # dst inverts src
    assert np.all(src[int(p.count) * r :] < 0)  # micro-batches past count hold nothing
    for i in range(per):
      mb = dst[i][dst[i] >= 0] // W // r
      assert (p.row_mb[d, i] == -1) if mb.size == 0 else np.all(mb == p.row_mb[d, i])
    for row in range(src.shape[0]):
      for s_ in set((src[row][src[row] >= 0] // W).tolist()):  # a segment: one run of one row
        pos = np.flatnonzero((src[row] >= 0) & (src[row] // W == s_))
        assert np.all(np.diff(pos) == 1) and np.all(np.diff(src[row][pos]) == 1)
  assert packing.padding_fraction(tm) > 0.5 > packing.padding_fraction(tm, p, M)
  bad = tm.copy()
  bad[1, P_] = False  # a hole inside a row's tokens
  with pytest.raises(ValueError, match="contiguous"):
    packing.plan(bad)
  with pytest.raises(ValueError, match="48 rows do not split into 5 shards x 3 micro-batches"):
    packing.plan(tm, 3, 5)


def test_regather_packs_and_unpacks_like_numpy():
  """packing.regather against numpy indexing, shard by shard, with the fill at padding."""
  rng = np.random.default_rng(0)
  k, a, b, W = 2, 3, 4, 5
  x = rng.normal(size=(k * a, W, 2)).astype(np.float32)
  idx = rng.integers(-1, a * W, (k, b, W)).astype(np.int32)
  got = np.asarray(packing.regather(jnp.asarray(x), jnp.asarray(idx), fill=7.0))
  want = np.full((k * b, W, 2), 7.0, np.float32)
  for d in range(k):
    flat = x[d * a : (d + 1) * a].reshape(a * W, 2)
    for i in range(b):
      for t in range(W):
        if idx[d, i, t] >= 0:
          want[d * b + i, t] = flat[idx[d, i, t]]
  np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("replay,micro", [("r3", 8), pytest.param("r2", 2, marks=pytest.mark.slow)])
def test_packed_rows_give_the_unpacked_step(env, runs, replay, micro):
  """trainer.pack: the forward passes run on packed rows (several responses per row, segment ids,
  per-segment positions) and only the micro-batches that hold tokens run; outputs gathered back: the
  same old-pass metrics, per-update losses and metrics, gradients and parameters as the unpacked step,
  with R2 and R3."""
  cfg = TrainerConfig(N, replay=replay, optim=OPTIM, micro_batches=micro, pack=True)
  tr = Trainer(env["graphdef"], CFG, cfg)
  state, m = tr.train_step(tr.init_state(_copy(env["params"])), env["noisy"])
  _assert_same_step((state, m, tr.last_minibatch_metrics), runs(replay))
  tm = np.asarray(env["noisy"].token_mask)
  if micro == 8:  # rows of 6 to 16 tokens in width 16: the first mini-batch packs into 7 rows of 8
    assert int(tr._plan(tm[:MB], micro).count) == micro - 1


@pytest.mark.parametrize("loss", [pytest.param(n, marks=pytest.mark.slow) for n in MICRO_LOSSES])
def test_packed_rows_give_the_unpacked_step_for_every_loss(env, loss):
  """Every loss and normalizer (each divides by something different) under packing: the same step
  as unpacked micro-batches."""
  ref = _micro_step(env, MICRO_LOSSES[loss], "r2", 4)
  got = _micro_step(env, MICRO_LOSSES[loss], "r2", 4, pack=True)
  _assert_same_step(got, ref)


def test_packed_rows_give_the_unpacked_step_for_a_dense_model(env):
  """A dense model (no routes to replay, no router metric; the packed old pass skips both): packed
  micro-batches give the unpacked step."""
  dense = CFG.replace(num_experts=0)
  graphdef, abstract = abstract_model(dense)
  rng = np.random.default_rng(0)
  params = jax.tree.map(
      lambda a: jnp.asarray(
          rng.uniform(0.8, 1.2, a.shape) if len(a.shape) == 1 else rng.normal(0, 0.15, a.shape),
          np.float32,
      ),
      abstract,
  )
  ro = env["noisy"]
  ro = _with(ro, routes=np.full((B, T, L, dense.route_slots), -1, np.int8))
  out = []
  for pack in (False, True):
    tr = Trainer(graphdef, dense, TrainerConfig(N, optim=OPTIM, micro_batches=4, pack=pack))
    state, m = tr.train_step(tr.init_state(_copy(params)), ro)
    out.append((state, m, tr.last_minibatch_metrics))
  assert "router_disagreement_per_token" not in out[1][1]
  _assert_same_step(out[1], out[0])


@pytest.mark.parametrize("replay", ["r2", "r3"])
def test_int8_routes_give_the_int32_step(env, runs, replay):
  """Routes stored narrow (int8: `route_dtype`, what the sampler returns for up to 128 experts) give
  exactly the step of int32 routes; the old pass hands back live routes, in that dtype, only under R2
  (the only mode whose updates replay them: no HBM held for them otherwise)."""
  ro = env["noisy"]
  narrow = _with(ro, routes=np.asarray(ro.routes).astype(np.int8))
  tr = Trainer(env["graphdef"], CFG, TrainerConfig(N, replay=replay, optim=OPTIM, pack=False))
  state, m = tr.train_step(tr.init_state(_copy(env["params"])), narrow)
  _assert_same_step((state, m, tr.last_minibatch_metrics), runs(replay), rtol=0, atol=0)
  for pack in (False, True):
    cfg = TrainerConfig(N, replay=replay, optim=OPTIM, micro_batches=2, pack=pack)
    tr = Trainer(env["graphdef"], CFG, cfg)
    _, live, _ = tr.old_pass(env["params"], narrow)
    # what the dry run counts as resident during the updates: the same as what old_pass returns
    _, abstract_live = tr.abstract_old_pass(env["params"], narrow)
    if replay == "r2":
      assert live.dtype == jnp.int8 and live.shape == ro.routes.shape
      assert (abstract_live.dtype, abstract_live.shape) == (live.dtype, live.shape)
    else:
      assert live is None and abstract_live is None


@pytest.mark.slow
def test_sharded_packed_rows_match_single_device(env, runs):
  """Packed over a mesh whose batch axes split each micro-batch 4 ways: each shard packs its own rows
  (no data moves between devices), the same step as one device unpacked."""
  mesh = make_mesh({"data": 2, "expert": 2, "tensor": 2})
  graphdef, abstract = abstract_model(CFG, mesh)
  params = jax.device_put(_copy(env["params"]), state_shardings(abstract, mesh, DEFAULT_RULES))
  cfg = TrainerConfig(N, replay="r3", optim=OPTIM, pack=True)
  tr = Trainer(graphdef, CFG, cfg, mesh=mesh)
  state, m = tr.train_step(tr.init_state(params), env["noisy"])
  plan = tr._plan(np.asarray(env["noisy"].token_mask), 2)
  assert plan.src.shape[0] == 4 and {"data", "expert"} <= set(plan.src.sharding.spec[0])
  _assert_same_step((state, m, tr.last_minibatch_metrics), runs("r3"), rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------------------
# Config errors.
# ------------------------------------------------------------------------------------------------------
def test_config_errors_name_the_field(env):
  with pytest.raises(ValueError, match=r"rl\.replay"):
    TrainerConfig(replay="r4")
  with pytest.raises(ValueError, match=r"rl\.mini_batches"):
    TrainerConfig(mini_batches=0)
  dense = CFG.replace(num_experts=0)
  graphdef, _ = abstract_model(dense)
  with pytest.raises(ValueError, match=r"rl\.replay"):
    Trainer(graphdef, dense, TrainerConfig(replay="r3"))
  Trainer(graphdef, dense, TrainerConfig(replay="none"))  # fine without replay
  tr = Trainer(env["graphdef"], CFG, TrainerConfig(mini_batches=3))
  with pytest.raises(ValueError, match=r"rl\.mini_batches=3"):
    tr.train_step(None, env["noisy"])  # rejected before any compute
  with pytest.raises(ValueError, match=r"optim\.learning_rate"):
    OptimConfig(learning_rate=0.0)
  for bad in (-1, 1.5, True):
    with pytest.raises(ValueError, match=r"trainer\.micro_batches"):
      TrainerConfig(micro_batches=bad)
  tr = Trainer(env["graphdef"], CFG, TrainerConfig(mini_batches=N, micro_batches=3))
  with pytest.raises(
      ValueError, match=r"trainer\.micro_batches=3 does not divide the mini-batch of 8"
  ):
    tr.train_step(None, env["noisy"])  # rejected before any compute


@pytest.mark.slow
@pytest.mark.parametrize("replay", ["r2", "r3"])
def test_chunked_logprobs_train_step_matches_whole_logits(env, runs, replay):
  """model.logits_chunk = 5 (never the [B, T, V] logits): the same train step as the whole-logits path,
  every metric (entropy and train-infer KL from the old pass, losses of each update) and the parameters.
  """
  graphdef, _ = abstract_model(CFG.replace(logits_chunk=5))
  tr = Trainer(graphdef, CFG.replace(logits_chunk=5), TrainerConfig(N, replay=replay, optim=OPTIM))
  state, m = tr.train_step(tr.init_state(_copy(env["params"])), env["noisy"])
  state0, m0, _ = runs(replay)
  for k in ("entropy", "train_infer_kl", "loss", "grad_norm"):
    assert float(m[k]) == pytest.approx(float(m0[k]), rel=1e-4, abs=1e-6), k
  for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(state0.params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
