"""The sampler -> trainer contract (fo_rl/rl/rollouts.py): `Rollouts.from_sample` against a layout built by
hand, the table of which routes each pass replays, and a train step that notices a broken replay."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fo_rl.model import DENSE_ROUTE, abstract_model, make_apply, positions_from_mask
from fo_rl.rl.rollouts import (
    PASS_ROUTES,
    REPLAY_MODES,
    Rollouts,
    pass_routes,
    replays_sampler,
)
from fo_rl.rl.trainer import Trainer, TrainerConfig
from fo_rl.sampler import SampleOutput, Sampler, SamplerConfig, SamplingParams
from toy import TOY


def _sample(prompts, responses, logps, routes) -> SampleOutput:
  """A SampleOutput of ragged prompts (left-padded to the longest) and responses (right-padded)."""
  B, P, T = len(prompts), max(map(len, prompts)), max(map(len, responses))
  prompt_tokens, prompt_mask = np.zeros((B, P), np.int32), np.zeros((B, P), bool)
  tokens, mask, logp_mu = np.zeros((B, T), np.int32), np.zeros((B, T), bool), np.zeros((B, T))
  for b, (p, r, lp) in enumerate(zip(prompts, responses, logps)):
    prompt_tokens[b, P - len(p) :], prompt_mask[b, P - len(p) :] = p, True
    tokens[b, : len(r)], mask[b, : len(r)], logp_mu[b, : len(r)] = r, True, lp
  lengths = np.asarray([len(r) for r in responses], np.int32)
  return SampleOutput(
      prompt_tokens=jnp.asarray(prompt_tokens),
      prompt_mask=jnp.asarray(prompt_mask),
      tokens=jnp.asarray(tokens),
      logp_mu=jnp.asarray(logp_mu, jnp.float32),
      response_mask=jnp.asarray(mask),
      lengths=jnp.asarray(lengths),
      finished_eos=jnp.asarray(lengths < T),
      routes=jnp.asarray(routes, jnp.int32),
  )


# ------------------------------------------------------------------------------------------------------
# Layout.
# ------------------------------------------------------------------------------------------------------
def test_from_sample_layout():
  # 3 rows, prompt lengths 4 / 2 / 1 (P = 4), response lengths 3 / 1 / 2 (T = 3); L = 3 layers with
  # layer 1 dense, k = 2.
  rng = np.random.default_rng(0)
  routes = rng.integers(0, 8, (3, 7, 3, 2))
  routes[:, :, 1] = DENSE_ROUTE
  out = _sample(
      prompts=[[11, 12, 13, 14], [21, 22], [31]],
      responses=[[15, 16, 17], [23], [32, 33]],
      logps=[[-0.1, -0.2, -0.3], [-0.4], [-0.5, -0.6]],
      routes=routes,
  )
  ro = Rollouts.from_sample(out, [1.5, -0.5, 0.0])

  np.testing.assert_array_equal(
      ro.tokens,
      [[11, 12, 13, 14, 15, 16, 17], [0, 0, 21, 22, 23, 0, 0], [0, 0, 0, 31, 32, 33, 0]],
  )
  np.testing.assert_array_equal(
      ro.token_mask, [[1, 1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 0, 0], [0, 0, 0, 1, 1, 1, 0]]
  )
  # 0 at each row's first real token, counting real tokens only (padding repeats a neighbour's).
  np.testing.assert_array_equal(
      ro.positions, [[0, 1, 2, 3, 4, 5, 6], [0, 0, 0, 1, 2, 2, 2], [0, 0, 0, 0, 1, 2, 2]]
  )
  # Per-token arrays hold the value of the token at that column: response token t sits at column P + t.
  np.testing.assert_array_equal(
      ro.response_mask, [[0, 0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 1, 0, 0], [0, 0, 0, 0, 1, 1, 0]]
  )
  np.testing.assert_allclose(
      ro.logp_mu,
      [[0, 0, 0, 0, -0.1, -0.2, -0.3], [0, 0, 0, 0, -0.4, 0, 0], [0, 0, 0, 0, -0.5, -0.6, 0]],
  )
  np.testing.assert_array_equal(ro.routes, routes)  # [B, P + T, L, k] as the sampler recorded them
  assert (np.asarray(ro.routes)[:, :, 1] == -1).all()  # dense layer: the sentinel
  np.testing.assert_array_equal(ro.advantages, [1.5, -0.5, 0.0])
  dtypes = {k: getattr(ro, k).dtype for k in ro.__dataclass_fields__}
  assert dtypes == {
      "tokens": np.int32,
      "token_mask": np.bool_,
      "positions": np.int32,
      "response_mask": np.float32,
      "logp_mu": np.float32,
      "routes": np.int32,
      "advantages": np.float32,
  }


def test_from_sample_rejects_mismatched_shapes():
  routes = np.zeros((2, 3, 1, 1), np.int32)
  out = _sample([[1], [2]], [[3, 4], [5]], [[0.0, 0.0], [0.0]], routes)
  Rollouts.from_sample(out, [0.0, 0.0])
  short = _sample([[1], [2]], [[3, 4], [5]], [[0.0, 0.0], [0.0]], routes[:, :2])
  with pytest.raises(ValueError, match=r"SampleOutput\.routes"):
    Rollouts.from_sample(short, [0.0, 0.0])
  with pytest.raises(ValueError, match="advantages"):
    Rollouts.from_sample(out, [0.0, 0.0, 0.0])


# ------------------------------------------------------------------------------------------------------
# Which routes each pass replays.
# ------------------------------------------------------------------------------------------------------
def test_pass_table():
  assert REPLAY_MODES == ("none", "r2", "r3") and set(PASS_ROUTES) == set(REPLAY_MODES)
  sampler, live = object(), object()
  got = {
      mode: tuple(pass_routes(mode, p, sampler=sampler, live=live) for p in ("old", "update"))
      for mode in REPLAY_MODES
  }
  assert got == {
      "none": (None, None),  # live routing throughout
      "r2": (None, live),  # old pass live (recorded); updates replay the recorded live routes
      "r3": (sampler, sampler),  # both replay the sampler's
  }
  assert [replays_sampler(m) for m in REPLAY_MODES] == [False, False, True]
  with pytest.raises(ValueError, match="live routes"):
    pass_routes("r2", "update", sampler=sampler)  # r2's updates need the old pass's routes
  with pytest.raises(ValueError, match=r"rl\.replay='r4'"):
    pass_routes("r4", "old", sampler=sampler)
  with pytest.raises(ValueError, match="pass"):
    pass_routes("r3", "eval", sampler=sampler)


# ------------------------------------------------------------------------------------------------------
# A broken replay is noticed.
# ------------------------------------------------------------------------------------------------------
CFG = TOY.replace(vocab_size=64)  # the toy model (tests/toy.py) with this file's vocabulary


def _params(seed=0):
  """Peaky parameters (std 0.15), drawn in numpy, so that a changed expert set moves the logits."""
  rng = np.random.default_rng(seed)
  _, abstract = abstract_model(CFG)
  return jax.tree.map(
      lambda a: jnp.asarray(
          rng.uniform(0.8, 1.2, a.shape) if len(a.shape) == 1 else rng.normal(0.0, 0.15, a.shape),
          np.float32,
      ),
      abstract,
  )


@pytest.mark.slow
def test_routes_reach_the_gating_in_the_passes_the_table_says():
  """Rollouts built from sampler output whose routes are the model's own (a float32 sampler), then the
  same with the MoE routes corrupted. Under none and r2 no pass reads the rollouts' routes: logp_old and
  the updated parameters do not change at all. Under r3 both passes replay them: logp_old and the update
  change, and the update replays the same routes as the old pass (staleness ratio 1)."""
  graphdef, _ = abstract_model(CFG)
  params = _params()
  rng = np.random.default_rng(1)
  B = 4
  prompts = [rng.integers(1, CFG.vocab_size, n) for n in (5, 3, 5, 2)]
  responses = [rng.integers(1, CFG.vocab_size, n) for n in (4, 6, 2, 6)]
  tokens = [np.concatenate([p, r]) for p, r in zip(prompts, responses)]
  # The "sampler": teacher forcing with the same parameters gives its routes (and logp_mu, not needed).
  clean = _sample(
      prompts, responses, [np.zeros(len(r)) for r in responses], np.zeros((B, 11, 3, 2))
  )
  full = np.concatenate([clean.prompt_tokens, clean.tokens], 1)
  mask = np.concatenate([clean.prompt_mask, clean.response_mask], 1)
  assert all((full[b][mask[b]] == tokens[b]).all() for b in range(B))
  _, live = make_apply(graphdef)(params, full, positions_from_mask(jnp.asarray(mask)), None, mask)
  adv = np.asarray([1.0, -1.0, 0.5, -0.5], np.float32)
  ro = Rollouts.from_sample(dataclasses.replace(clean, routes=live), adv)  # the model's own routes
  bad = np.asarray(live).copy()
  bad[:, :, [0, 2]] = (bad[:, :, [0, 2]] + 1) % CFG.num_experts  # every MoE decision changed
  ro_bad = Rollouts.from_sample(dataclasses.replace(clean, routes=jnp.asarray(bad)), adv)

  copy = lambda t: jax.tree.map(jnp.copy, t)  # noqa: E731  (the step donates its state)
  result = {}
  for mode in REPLAY_MODES:
    tr = Trainer(graphdef, CFG, TrainerConfig(mini_batches=1, replay=mode))
    for name, r in (("clean", ro), ("bad", ro_bad)):
      logp_old = np.asarray(tr.old_logprobs(params, r))
      state, _ = tr.train_step(tr.init_state(copy(params)), r)
      leaves = [np.asarray(x) for x in jax.tree.leaves(state.params)]
      result[mode, name] = logp_old, leaves, tr.last_minibatch_metrics[0]

  resp = np.asarray(ro.response_mask) > 0
  for mode in ("none", "r2"):  # the rollouts' routes are never replayed
    (lp, p, _), (lp_bad, p_bad, _) = result[mode, "clean"], result[mode, "bad"]
    np.testing.assert_array_equal(lp, lp_bad)
    for a, b in zip(p, p_bad):
      np.testing.assert_array_equal(a, b)
  (lp, p, _), (lp_bad, p_bad, m_bad) = result["r3", "clean"], result["r3", "bad"]
  np.testing.assert_allclose(lp[resp], result["none", "clean"][0][resp], atol=1e-5)  # own routes
  assert np.abs(lp_bad - lp)[resp].max() > 1e-2  # the old pass replays the rollouts' routes
  assert max(np.abs(a - b).max() for a, b in zip(p, p_bad)) > 0  # ... and so does the update
  assert abs(float(m_bad["ratio_max"]) - 1) < 1e-5  # the same routes as the old pass


@pytest.mark.slow
def test_float32_sampler_to_trainer_boundary():
  """The real sampler with float32 weights, through `Rollouts.from_sample`, into the trainer's old pass:
  on every response token logp_old equals the sampler's logp_mu (to float rounding), live and under r3,
  and the train-inference KL is ~0. A one-column shift of the logprobs or of the response mask (what an
  off-by-one at the boundary gives) is far outside the tolerance."""
  graphdef, _ = abstract_model(CFG)
  params = _params()
  rng = np.random.default_rng(3)
  prompts = [list(rng.integers(8, CFG.vocab_size, n)) for n in (5, 1, 7, 3, 8, 2, 6, 4)]
  sampling = SamplingParams(temperature=1.0, max_new_tokens=12, eos_ids=tuple(range(1, 8)))
  sampler = Sampler(CFG, SamplerConfig(weight_dtype="float32"), trainer_state=params)
  out = sampler.generate(prompts, sampling, seed=0)
  ro = Rollouts.from_sample(out, np.zeros(len(prompts), np.float32))
  resp = np.asarray(ro.response_mask) > 0
  lengths = np.asarray(out.lengths)
  assert resp.sum() == lengths.sum() and len(set(lengths.tolist())) > 1  # ragged responses
  mu = np.asarray(ro.logp_mu)
  assert (mu[resp] < 0).all() and (mu[~resp] == 0).all()
  for mode in ("none", "r3"):
    tr = Trainer(graphdef, CFG, TrainerConfig(replay=mode))
    logp_old, _, m = tr.old_pass(params, ro)
    logp_old, m = np.asarray(logp_old), {k: float(v) for k, v in m.items()}
    # Measured on CPU: max |logp_old - logp_mu| ~ 1e-6, KL ~ 6e-8 (the decode and the trainer's forward
    # are different programs); a one-column shift is off by > 1 nat.
    np.testing.assert_allclose(logp_old[resp], mu[resp], rtol=0, atol=2e-5, err_msg=mode)
    assert abs(m["train_infer_kl"]) < 1e-6 and m["train_infer_k3"] < 1e-9, (mode, m)
    assert m["train_infer_frac_tau2"] == 0 and m["router_disagreement_per_decision"] == 0, mode
    # The check can fail: one column off, in the logprobs or in the mask.
    assert np.abs(np.roll(mu, 1, axis=1) - logp_old)[resp].max() > 0.1, mode
    assert np.abs(np.roll(mu, -1, axis=1) - logp_old)[resp].max() > 0.1, mode
    shifted = np.roll(resp, 1, axis=1)
    assert np.abs(mu - logp_old)[shifted].max() > 0.1, mode


def test_from_sample_rejects_nonfinite_logp_mu():
  """A NaN or inf logp_mu at a response token (NaN / inf sampler logits) is a ValueError naming the
  rows, from `logp_mu` itself or from the sampler's host-side flag `logp_nonfinite`; a non-finite value
  at a padding column is not a sampled token and passes."""
  routes = np.zeros((3, 5, 3, 2), np.int32)
  routes[:, :, 1] = DENSE_ROUTE
  out = _sample(
      prompts=[[11, 12], [21], [31, 32]],
      responses=[[15, 16, 17], [23], [32, 33]],
      logps=[[-0.1, -0.2, -0.3], [-0.4], [-0.5, -0.6]],
      routes=routes,
  )
  adv = np.zeros(3, np.float32)
  Rollouts.from_sample(out, adv)
  for value in (np.nan, np.inf, -np.inf):
    lp = np.asarray(out.logp_mu).copy()
    lp[1, 0] = value
    with pytest.raises(ValueError, match=r"logp_mu is not finite .* 1 of 3 rows \(rows 1\)"):
      Rollouts.from_sample(dataclasses.replace(out, logp_mu=jnp.asarray(lp)), adv)
  lp = np.asarray(out.logp_mu).copy()
  lp[1, 2] = np.nan  # past row 1's single response token
  ro = Rollouts.from_sample(dataclasses.replace(out, logp_mu=jnp.asarray(lp)), adv)
  assert np.isnan(np.asarray(ro.logp_mu)).sum() == 1
  flagged = dataclasses.replace(out, logp_nonfinite=np.asarray([True, False, True]))
  with pytest.raises(ValueError, match=r"2 of 3 rows \(rows 0, 2\)"):
    Rollouts.from_sample(flagged, adv)
