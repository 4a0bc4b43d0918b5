"""fo_rl.sampler: logprobs and routes against the trainer's teacher-forced forward, quantized samplers
(KL, router disagreement, R3), sampling semantics against numpy, bucketing and weight sync."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding

from fo_rl.model import QTensor, init_model, make_apply, validate_replay_routes
from fo_rl.parallel.sharding import DEFAULT_RULES, make_mesh, state_shardings
from fo_rl.model.init import abstract_model
from fo_rl.model.qtensor import materialize
from fo_rl.rl.rollouts import Rollouts
from fo_rl.sampler import (
    Sampler,
    SamplerConfig,
    SamplingParams,
    bucket,
    quantize_state,
    sample_logits,
    truncate_logits,
)
from fo_rl.sampler.sampling import exponential, threefry2x32
from toy import TOY

CFG = TOY  # the toy model (tests/toy.py)
MOE = list(CFG.moe_layers)  # [0, 2]; layer 1 is dense
SAMPLING = SamplingParams(temperature=1.0, max_new_tokens=24, eos_ids=(3, 7, 11))


@pytest.fixture(scope="module")
def trainer(toy_model):
  """A trainer state with weights 10x the init scale (std 0.2): sharper next-token distributions and
  router logits, closer to a trained model than the near-uniform init."""
  _, graphdef, state = toy_model  # init_model(CFG, seed=0), shared by the session
  state = jax.tree_util.tree_map(lambda x: x * 10.0 if x.ndim > 1 else x, state)
  return graphdef, state, jax.jit(make_apply(graphdef))


@pytest.fixture(scope="module")
def prompts():
  rng = np.random.default_rng(0)
  return [
      list(rng.integers(12, 128, n)) for n in rng.integers(1, 16, 32)
  ]  # lengths 1..15 -> P = 16


_SAMPLERS = {}


def sampler(trainer, weight_dtype) -> Sampler:
  if weight_dtype not in _SAMPLERS:
    _SAMPLERS[weight_dtype] = Sampler(
        CFG, SamplerConfig(weight_dtype=weight_dtype), trainer_state=trainer[1]
    )
  return _SAMPLERS[weight_dtype]


def rollouts(out) -> Rollouts:
  """What the trainer sees of `out` (zero advantages: unused here)."""
  return Rollouts.from_sample(out, np.zeros(out.tokens.shape[0], np.float32))


def trainer_logp(trainer, out, replay: bool = False):
  """Teacher-forced log pi(response token) at temperature 1 (no truncation), and the trainer's routes."""
  _, state, apply = trainer
  ro = rollouts(out)
  logits, routes = apply(
      state, ro.tokens, ro.positions, ro.routes if replay else None, ro.token_mask
  )
  Pl = out.prompt_tokens.shape[1]
  lp = jnp.take_along_axis(jax.nn.log_softmax(logits[:, Pl - 1 : -1]), out.tokens[..., None], -1)[
      ..., 0
  ]
  return np.asarray(lp), np.asarray(routes), np.asarray(logits[:, Pl - 1 : -1])


def check_well_formed(out, sp: SamplingParams):
  tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
  mask, logp = np.asarray(out.response_mask), np.asarray(out.logp_mu)
  B, T = tokens.shape
  assert T >= sp.max_new_tokens and np.all((lengths >= 1) & (lengths <= sp.max_new_tokens))
  np.testing.assert_array_equal(mask, np.arange(T)[None] < lengths[:, None])
  assert np.all((tokens >= 0) & (tokens < CFG.vocab_size)) and np.all(tokens[~mask] == 0)
  assert np.all(np.isfinite(logp)) and np.all(logp[mask] <= 0) and np.all(logp[~mask] == 0)
  for b, reason in enumerate(out.finish_reason):
    real = tokens[b, : lengths[b]]
    assert not np.isin(real[:-1], sp.eos_ids).any()
    if reason == "eos":
      assert real[-1] in sp.eos_ids
    else:
      assert lengths[b] == sp.max_new_tokens and real[-1] not in sp.eos_ids
  # routes: the model's replay layout, valid ids in MoE layers everywhere, -1 in dense layers
  routes = np.asarray(out.routes)
  assert routes.shape == (
      B,
      out.prompt_tokens.shape[1] + T,
      CFG.num_layers,
      CFG.num_experts_per_tok,
  )
  assert np.all((routes[:, :, MOE] >= 0) & (routes[:, :, MOE] < CFG.num_experts))
  assert np.all(routes[:, :, [1]] == -1)
  validate_replay_routes(routes, CFG, np.asarray(rollouts(out).token_mask))


def test_float32_sampler_matches_trainer(trainer, prompts):
  out = sampler(trainer, "float32").generate(prompts, SAMPLING, seed=1)
  check_well_formed(out, SAMPLING)
  assert out.prompt_tokens.shape == (32, 16) and out.tokens.shape == (32, 32)
  np.testing.assert_array_equal(np.asarray(out.prompt_mask).sum(1), [len(p) for p in prompts])
  assert set(out.finish_reason) == {"eos", "length"}
  lp, routes, _ = trainer_logp(trainer, out)
  mask = np.asarray(out.response_mask)
  np.testing.assert_allclose(np.asarray(out.logp_mu)[mask], lp[mask], atol=1e-4, rtol=0)
  real = np.asarray(rollouts(out).token_mask)
  np.testing.assert_array_equal(np.asarray(out.routes)[real], routes[real])  # prompt + response
  assert out.routes.dtype == jnp.int8  # the narrowest dtype holding the toy's ids (route_dtype)


def test_route_dtype_is_the_narrowest_that_holds_every_id():
  from fo_rl.model import DENSE_ROUTE, route_dtype

  for E, dt in [
      (8, jnp.int8),
      (128, jnp.int8),
      (129, jnp.int16),
      (32768, jnp.int16),
      (32769, jnp.int32),
  ]:
    assert route_dtype(E) == dt, E
    info = jnp.iinfo(dt)
    assert info.min <= DENSE_ROUTE and E - 1 <= info.max


def _gaps(trainer, out):
  mask = np.asarray(out.response_mask)
  mu = np.asarray(out.logp_mu)[mask]
  live_lp, live_routes, _ = trainer_logp(trainer, out)
  r3_lp, _, _ = trainer_logp(trainer, out, replay=True)
  real = np.asarray(rollouts(out).token_mask)
  a = np.sort(np.asarray(out.routes)[:, :, MOE], -1)[real]
  b = np.sort(live_routes[:, :, MOE], -1)[real]
  disagree = np.any(a != b, axis=-1)  # [tokens, MoE layers]: top-k sets differ
  return mu - live_lp[mask], mu - r3_lp[mask], disagree


@pytest.mark.slow
@pytest.mark.parametrize("weight_dtype", ["float8_e4m3fn", "int8"])
def test_quantized_sampler_kl_routes_and_r3(trainer, prompts, weight_dtype):
  out = sampler(trainer, weight_dtype).generate(prompts, SAMPLING, seed=2)
  check_well_formed(out, SAMPLING)
  live, r3, disagree = _gaps(trainer, out)
  kl, se = live.mean(), live.std() / np.sqrt(live.size)
  print(
      f"\n[{weight_dtype}] tokens={live.size} KL[mu||pi] ~ mean(logp_mu - logp_pi) = {kl:.5f} "
      f"(+- {se:.5f}); router disagreement: {disagree.mean():.3%} of (token, layer) top-k sets, "
      f"{disagree.any(-1).mean():.3%} of tokens; mean |logp_mu - logp_pi|: live {np.abs(live).mean():.5f}"
      f", R3 {np.abs(r3).mean():.5f}"
  )
  assert np.abs(live).max() > 1e-3  # the sampler really computes with quantized weights
  assert -3 * se < kl < 0.1  # small, non-negative within noise
  assert 0 < disagree.mean() < 0.5  # quantization flips some routing decisions
  assert np.abs(r3).mean() < 0.8 * np.abs(live).mean()  # R3 lowers the trainer-sampler gap


def _is_q(x):
  return isinstance(x, QTensor)


@pytest.mark.slow
@pytest.mark.parametrize("weight_dtype", ["int8", "float8_e4m3fn"])
def test_quantized_sampler_is_the_trainer_on_its_dequantized_weights(
    trainer, prompts, weight_dtype
):
  """The int8 / fp8 sampler runs the trainer's model on the dequantized weights: teacher-forcing its
  samples through the trainer with the sampler's weights dequantized (q * scale in float32, the rest
  as synced) gives its logp_mu up to float rounding and its routes at every real token. With the
  original float weights the gap is large: the quantization is real, and this check could fail."""
  s = sampler(trainer, weight_dtype)
  out = s.generate(prompts, SAMPLING, seed=3)
  graphdef, _, apply = trainer
  deq = jax.tree_util.tree_map(
      lambda v: materialize(v, jnp.float32) if isinstance(v, QTensor) else v,
      s.params,
      is_leaf=_is_q,
  )
  assert any(isinstance(v, QTensor) for v in jax.tree.leaves(s.params, is_leaf=_is_q))
  lp, routes, _ = trainer_logp((graphdef, deq, apply), out)
  mask, mu = np.asarray(out.response_mask), np.asarray(out.logp_mu)
  np.testing.assert_allclose(mu[mask], lp[mask], atol=1e-4, rtol=0)
  real = np.asarray(rollouts(out).token_mask)
  np.testing.assert_array_equal(np.asarray(out.routes)[real], routes[real])
  lp_float, _, _ = trainer_logp(trainer, out)
  assert np.abs(mu - lp_float)[mask].max() > 0.05


@pytest.mark.slow
def test_bf16_sampler_matches_bf16_trainer(trainer, prompts):
  """Production precision (model.dtype = param_dtype = bfloat16, sampler.weight_dtype = bfloat16): the
  sampler (KV-cache decode) and the trainer (teacher-forced forward) run one bf16 model with different
  op orders. Replaying the sampler's routes (R3) the logprobs agree to bf16 rounding (measured: max
  0.04, mean 0.009 nats); live, bf16 rounding flips a few near-tied routing decisions (~1% of tokens),
  and only those tokens differ by more. A one-column shift of logp_mu is far outside these bounds.
  """
  cfg = CFG.replace(dtype="bfloat16", param_dtype="bfloat16")
  state = jax.tree.map(lambda x: x.astype(jnp.bfloat16), trainer[1])
  graphdef = abstract_model(cfg)[0]
  bf16 = (graphdef, state, jax.jit(make_apply(graphdef)))
  s = Sampler(cfg, SamplerConfig(weight_dtype="bfloat16"), trainer_state=state)
  out = s.generate(prompts, SAMPLING, seed=3)
  check_well_formed(out, SAMPLING)
  mask, mu = np.asarray(out.response_mask), np.asarray(out.logp_mu)
  r3_lp, _, _ = trainer_logp(bf16, out, replay=True)
  gap = np.abs(mu - r3_lp)[mask]
  assert gap.max() < 0.15 and gap.mean() < 0.03, (gap.max(), gap.mean())
  live_lp, live_routes, _ = trainer_logp(bf16, out)
  real = np.asarray(rollouts(out).token_mask)
  agree = np.all(np.asarray(out.routes)[real] == live_routes[real], axis=-1)  # [tokens, layers]
  assert agree.mean() > 0.97, agree.mean()
  assert np.median(np.abs(mu - live_lp)[mask]) < 0.03
  assert np.abs(np.roll(mu, 1, axis=1) - r3_lp)[mask].mean() > 10 * gap.mean()


@pytest.mark.slow
def test_greedy_is_deterministic_and_scores_at_temperature_one(trainer, prompts):
  s = sampler(trainer, "float32")
  greedy = dataclasses.replace(SAMPLING, temperature=0.0)
  a = s.generate(prompts, greedy, seed=0)
  b = s.generate(prompts, greedy, seed=123)
  np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
  check_well_formed(a, greedy)
  lp, _, logits = trainer_logp(trainer, a)
  mask = np.asarray(a.response_mask)
  np.testing.assert_array_equal(np.asarray(a.tokens)[mask], logits.argmax(-1)[mask])
  np.testing.assert_allclose(np.asarray(a.logp_mu)[mask], lp[mask], atol=1e-4, rtol=0)


def test_same_seed_reproduces(trainer, prompts):
  s = sampler(trainer, "float32")
  a, b, c = (s.generate(prompts, SAMPLING, seed=seed) for seed in (5, 5, 6))
  for f in ("tokens", "logp_mu", "routes", "lengths"):
    np.testing.assert_array_equal(np.asarray(getattr(a, f)), np.asarray(getattr(b, f)))
  assert not np.array_equal(np.asarray(a.tokens), np.asarray(c.tokens))


@pytest.mark.slow
def test_no_recompile_within_buckets(trainer):
  s = sampler(trainer, "float32")
  rng = np.random.default_rng(1)
  s.generate(
      [list(rng.integers(12, 128, n)) for n in (3, 12, 9, 1) * 8], SAMPLING, seed=0
  )  # warm-up
  before = s.num_compiles()
  for lens, max_new, seed in (((16, 2, 5, 7) * 8, 17, 1), ((9, 9, 9, 9) * 8, 32, 2)):
    out = s.generate(
        [list(rng.integers(12, 128, n)) for n in lens],
        dataclasses.replace(SAMPLING, max_new_tokens=max_new),
        seed=seed,
    )
    assert int(np.asarray(out.lengths).max()) <= max_new
  assert s.num_compiles() == before
  s.generate([list(rng.integers(12, 128, 17))] * 32, SAMPLING, seed=0)  # P: 16 -> 32, compiles once
  after = s.num_compiles()
  assert after["prefill"] == before["prefill"] + 1 and after["decode"] == before["decode"] + 1


# ------------------------------------------------------------------------------------------------
# Sampling semantics on hand-made logits, against numpy.
# ------------------------------------------------------------------------------------------------
PROBS = np.array(
    [
        [0.40, 0.25, 0.15, 0.10, 0.05, 0.03, 0.02, 0.0, 0.0, 0.0],
        [0.05, 0.05, 0.30, 0.02, 0.33, 0.05, 0.10, 0.04, 0.03, 0.03],
        [0.10] * 10,
        [0.91, 0.01, 0.01, 0.01, 0.01, 0.01, 0.01, 0.01, 0.01, 0.01],
    ]
)


def np_truncated_probs(logits, temperature, top_k, top_p):
  """Reference: softmax(logits / T); keep the top_k; renormalize; keep the smallest most-probable
  prefix whose mass reaches top_p (token i kept iff the mass before it is < top_p); renormalize."""
  x = logits.astype(np.float64) / temperature
  out = np.zeros_like(x)
  for r in range(x.shape[0]):
    order = np.argsort(-x[r], kind="stable")
    keep = order[:top_k] if top_k else order
    p = np.exp(x[r, keep] - x[r, keep].max())
    p /= p.sum()
    before = np.cumsum(p) - p
    keep, p = keep[before < top_p], p[before < top_p]
    out[r, keep] = p / p.sum()
  return out


@pytest.mark.parametrize(
    "temperature,top_k,top_p",
    [  # the fast tier samples with no truncation and with top-k and top-p together
        (1.0, 0, 1.0),
        pytest.param(1.0, 3, 1.0, marks=pytest.mark.slow),
        pytest.param(1.0, 0, 0.7, marks=pytest.mark.slow),
        (1.0, 2, 0.5),
        pytest.param(0.5, 0, 0.9, marks=pytest.mark.slow),
        pytest.param(2.0, 5, 0.8, marks=pytest.mark.slow),
    ],
)
def test_truncation_matches_numpy(temperature, top_k, top_p):
  rng = np.random.default_rng(0)
  logits = np.log(np.maximum(PROBS, 1e-9)).astype(np.float32)
  logits[2] += rng.normal(0, 0.3, 10).astype(np.float32)  # break the ties of the uniform row
  ref = np_truncated_probs(logits, temperature, top_k, top_p)
  x = np.asarray(truncate_logits(jnp.asarray(logits), temperature, top_k, top_p))
  np.testing.assert_array_equal(np.isfinite(x), ref > 0)  # exactly the intended tokens are kept
  reps = 2000
  big = jnp.asarray(np.repeat(logits, reps, axis=0))
  fn = jax.jit(sample_logits, static_argnums=(2, 3, 4))
  tok, lp = fn(jax.random.key(0), big, temperature, top_k, top_p)
  tok, lp = np.asarray(tok).reshape(4, reps), np.asarray(lp).reshape(4, reps)
  rows = np.arange(4)[:, None]
  assert np.all(ref[rows, tok] > 0)  # never a truncated token
  np.testing.assert_allclose(lp, np.log(ref[rows, tok]), atol=2e-5)  # log renormalized probability
  freq = np.stack([np.bincount(t, minlength=10) for t in tok]) / reps
  np.testing.assert_allclose(freq, ref, atol=0.04)  # and sampled from it


@pytest.mark.slow
def test_threefry_and_exponential_match_jax():
  """The sampler's unrolled Threefry-2x32 is bit-identical to JAX's, and its Exp(1) draws are the ones
  jax.random.exponential makes from the same key (partitionable threefry, JAX's default)."""
  rng = np.random.default_rng(0)
  k1, k2 = (jnp.asarray(rng.integers(0, 2**32, 4), jnp.uint32) for _ in range(2))
  counts = jnp.asarray(rng.integers(0, 2**32, (4, 2, 1000)), jnp.uint32)
  for i in range(4):
    # jax's threefry_2x32 hashes the two halves of a flat count array as the block's two words
    ref = jax.extend.random.threefry_2x32((k1[i], k2[i]), counts[i].ravel()).reshape(2, 1000)
    ours = jax.jit(threefry2x32)(k1[i], k2[i], counts[i, 0], counts[i, 1])
    np.testing.assert_array_equal(np.stack([np.asarray(o) for o in ours]), np.asarray(ref))
  with jax.threefry_partitionable(True):
    key = jax.random.fold_in(jax.random.key(3), 7)
    for shape in ((64, 512), (3, 5), (7,)):
      np.testing.assert_array_equal(
          np.asarray(jax.jit(exponential, static_argnums=1)(key, shape)),
          np.asarray(jax.random.exponential(key, shape)),
      )
    # a shard's rows [offset, offset + 3) draw that slice of the whole batch's draws (per-shard decode)
    part = jax.jit(exponential, static_argnums=1)(key, (3, 5), jnp.int32(2))
    np.testing.assert_array_equal(
        np.asarray(part), np.asarray(jax.random.exponential(key, (8, 5)))[2:5]
    )
  e = np.asarray(exponential(jax.random.key(5), (200_000,)), np.float64)
  assert abs(e.mean() - 1) < 0.01 and abs(e.var() - 1) < 0.03
  for t in (0.1, 1.0, 3.0):  # the Exp(1) tail P(E > t) = exp(-t)
    assert abs((e > t).mean() - np.exp(-t)) < 0.005


def _np_exponential(key, shape, row_offset, wrap=False):
  """numpy reference of `exponential`: each element's flat index in the larger array as a uint64,
  split into its (hi, lo) words, hashed by JAX's own threefry_2x32, bits = the XOR of the two output
  words, u = 23 of them as a float in [0, 1), -log(1 - u)."""
  rows, inner = shape[0], int(np.prod(shape[1:]))
  idx = (np.arange(rows, dtype=np.uint64)[:, None] + np.uint64(row_offset)) * np.uint64(inner)
  idx = (idx + np.arange(inner, dtype=np.uint64)[None, :]).ravel()
  hi, lo = (idx >> np.uint64(32)).astype(np.uint32), (idx & np.uint64(2**32 - 1)).astype(np.uint32)
  if wrap:  # a uint32 counter: the flat index modulo 2^32
    hi = np.zeros_like(hi)
  k = np.asarray(jax.random.key_data(key))
  out = np.asarray(jax.extend.random.threefry_2x32(tuple(k), np.concatenate([hi, lo])))
  bits = out[: idx.size] ^ out[idx.size :]
  u = ((bits >> np.uint32(9)) | np.uint32(0x3F800000)).view(np.float32) - np.float32(1)
  return -np.log1p(-u.astype(np.float64)).reshape(shape), hi


def test_draws_past_2_32_counters_do_not_wrap():
  """Rows x vocabulary past 2^32 (rows 28267.. at Qwen's vocabulary of 151936): the counters carry
  into the high word of JAX's 64-bit counter instead of wrapping to the draws of the first rows."""
  key = jax.random.fold_in(jax.random.key(3), 7)
  V, offset = 151_936, 28_267  # rows 28267..28270 hold flat indices on both sides of 2^32
  ours = np.asarray(jax.jit(exponential, static_argnums=1)(key, (4, V), jnp.int32(offset)))
  ref, hi = _np_exponential(key, (4, V), offset)
  assert hi.min() == 0 and hi.max() == 1  # the slice crosses 2^32
  np.testing.assert_allclose(ours, ref, rtol=1e-6)
  # A wrapped uint32 counter would repeat the first rows' draws past 2^32.
  wrapped, _ = _np_exponential(key, (4, V), offset, wrap=True)
  past = hi.reshape(4, V) == 1
  assert np.isclose(ours[past], wrapped[past]).mean() < 0.01  # (only chance coincidences)
  np.testing.assert_array_equal(ref[~past], wrapped[~past])
  # A whole batch of one row and an offset of 0 is unchanged (the existing test checks it vs jax).
  np.testing.assert_array_equal(
      np.asarray(exponential(key, (2, 7), jnp.int32(0))), np.asarray(exponential(key, (2, 7)))
  )


def test_greedy_logp_is_untruncated_temperature_one():
  logits = jnp.log(jnp.asarray(PROBS[:2] + 1e-9, jnp.float32))
  tok, lp = sample_logits(jax.random.key(0), logits, 0.0, 3, 0.5)
  np.testing.assert_array_equal(np.asarray(tok), [0, 4])
  np.testing.assert_allclose(np.asarray(lp), np.log([0.40, 0.33]), atol=1e-5)


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (1.0, 3, 0.9), (0.0, 0, 1.0)])
def test_nonfinite_logits_give_a_nan_logp(temperature, top_k, top_p):
  """All-NaN, one NaN or one +inf logit in a row: the token drawn is meaningless, and its logp is NaN
  (never a finite number that would pass for a real draw); the other rows are untouched."""
  x = np.tile(np.linspace(-1.0, 1.0, 10, dtype=np.float32), (4, 1))
  x[0] = np.nan
  x[1, 3] = np.nan
  x[2, 3] = np.inf
  tok, lp = sample_logits(jax.random.key(0), jnp.asarray(x), temperature, top_k, top_p)
  lp = np.asarray(lp)
  assert np.isnan(lp[:3]).all() and np.isfinite(lp[3])
  assert ((np.asarray(tok) >= 0) & (np.asarray(tok) < 10)).all()


@pytest.mark.slow
def test_nonfinite_sampler_rows_are_flagged_and_rejected_by_the_trainer(trainer):
  """A NaN in the sampler's forward (the embedding of token 5, in one prompt only): that row's logp_mu
  is NaN, `SampleOutput.logp_nonfinite` flags exactly that row, and `Rollouts.from_sample` (the
  sampler -> trainer boundary) raises naming it, from the device flag and from a host copy alike."""
  _, state, _ = trainer
  poisoned = jax.tree_util.tree_map(
      lambda x: x.at[5].set(jnp.nan) if x.shape == (CFG.vocab_size, CFG.hidden_size) else x, state
  )
  s = Sampler(CFG, SamplerConfig(weight_dtype="float32"), trainer_state=poisoned)
  prompts = [[12, 13, 14], [20, 21], [30, 5, 31], [40]]
  out = s.generate(prompts, dataclasses.replace(SAMPLING, max_new_tokens=4), seed=0)
  np.testing.assert_array_equal(np.asarray(out.logp_nonfinite), [False, False, True, False])
  lp, mask = np.asarray(out.logp_mu), np.asarray(out.response_mask)
  assert np.isnan(lp[2, 0]) and np.isfinite(lp[[0, 1, 3]][mask[[0, 1, 3]]]).all()
  adv = np.zeros(4, np.float32)
  for o in (out, dataclasses.replace(out, logp_nonfinite=np.asarray(out.logp_nonfinite))):
    with pytest.raises(ValueError, match=r"logp_mu is not finite .* 1 of 4 rows \(rows 2\)"):
      Rollouts.from_sample(o, adv)


# ------------------------------------------------------------------------------------------------
# Weight sync across meshes.
# ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_update_weights_across_meshes(trainer, prompts):
  _, state, _ = trainer
  rules = DEFAULT_RULES
  trainer_mesh = make_mesh({"fsdp": 2, "expert": 4})
  _, abstract = abstract_model(CFG, trainer_mesh, rules)
  place = lambda st: jax.device_put(st, state_shardings(abstract, trainer_mesh, rules))
  sampler_mesh = make_mesh({"data": 4, "tensor": 2})
  s = Sampler(CFG, SamplerConfig(weight_dtype="int8"), mesh=sampler_mesh)
  flat = lambda st: jax.tree_util.tree_leaves(st)
  for scale in (1.0, 1.5):
    src = jax.tree_util.tree_map(lambda x: x * scale, state)
    s.update_weights(place(src))
    assert s.num_compiles()["update_weights"] == 1  # the second sync reuses the first compile
    expect = jax.jit(quantize_state, static_argnums=1)(src, "int8")
    for got, want, sh in zip(flat(s.params), flat(expect), flat(s.param_shardings)):
      np.testing.assert_array_equal(
          np.asarray(got.astype(jnp.float32)), np.asarray(want.astype(jnp.float32))
      )
      assert got.sharding.is_equivalent_to(sh, got.ndim) and got.dtype == want.dtype
  assert isinstance(s.params["layers"][0]["mlp"]["gate_proj"].get_value(), QTensor)
  q = s.params["layers"][0]["self_attn"]["q_proj"].get_value()
  assert q.q.sharding.spec[1] == "tensor" and q.scale.sharding.spec[0] is None  # heads over tensor
  # the sharded sampler samples what the single-device one does
  s.update_weights(place(state))
  single = sampler(trainer, "int8")
  a = s.generate(prompts, SAMPLING, seed=7)
  b = single.generate(prompts, SAMPLING, seed=7)
  assert a.tokens.sharding.spec[0] == "data" and s.loop_axes(len(prompts)) == ("data",)
  np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
  np.testing.assert_allclose(np.asarray(a.logp_mu), np.asarray(b.logp_mu), atol=1e-4)
  np.testing.assert_array_equal(np.asarray(a.routes), np.asarray(b.routes))


# ------------------------------------------------------------------------------------------------
# The user tool: python -m fo_rl.tools.sample.
# ------------------------------------------------------------------------------------------------
# End to end but seconds long: not marked e2e, so the fast tier reaches fo_rl/tools/sample.py.
def test_sample_tool_hf_checkpoint_matches_transformers(tmp_path):
  import io

  import torch
  from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

  from fo_rl.tools import sample as tool

  torch.manual_seed(0)
  hf_cfg = Qwen3MoeConfig(
      vocab_size=128,
      hidden_size=32,
      intermediate_size=48,
      moe_intermediate_size=16,
      num_hidden_layers=3,
      num_attention_heads=4,
      num_key_value_heads=2,
      head_dim=8,
      num_experts=8,
      num_experts_per_tok=2,
      mlp_only_layers=[1],
      eos_token_id=3,
      initializer_range=0.2,
      tie_word_embeddings=False,
  )
  model = Qwen3MoeForCausalLM(hf_cfg).eval()
  model.save_pretrained(tmp_path)  # no tokenizer: prompts and samples are token ids
  prompt = [5, 17, 99, 42]
  buf = io.StringIO()
  out = tool.sample(
      hf_checkpoint=str(tmp_path),
      prompt=" ".join(map(str, prompt)),
      temperature=0.0,
      max_new_tokens=6,
      eos_id=-1,
      num_samples=2,
      out=buf,
  )
  text = buf.getvalue()
  assert "=== sample 2/2: 6 tokens, finish=length" in text
  n = int(np.asarray(out.lengths)[0])
  ours, lp = np.asarray(out.tokens)[0, :n], np.asarray(out.logp_mu)[0, :n]
  with torch.no_grad():
    ref = model.generate(
        torch.tensor([prompt]),
        do_sample=False,
        max_new_tokens=6,
        min_new_tokens=6,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=0,
    )
  ref_tokens = ref.sequences[0, len(prompt) :].numpy()
  ref_lp = np.array(
      [torch.log_softmax(l[0].float(), -1)[t].item() for l, t in zip(ref.logits, ref_tokens)]
  )
  np.testing.assert_array_equal(ours, ref_tokens)  # greedy continuation of transformers
  np.testing.assert_allclose(lp, ref_lp, atol=1e-4)  # printed logp = temperature-1 logprob
  assert f"{lp[0]:.4f}" in text
  with pytest.raises(ValueError, match="token ids"):
    tool.sample(hf_checkpoint=str(tmp_path), prompt="hello", out=io.StringIO())


@pytest.mark.e2e
def test_sample_tool_fo_rl_workdir(tmp_path):
  """A run directory laid out as fo_rl.run writes it: config.json + checkpoints/<step> of the bundle."""
  import io
  import json

  from fo_rl import config as config_lib
  from fo_rl.checkpoint import Checkpointer
  from fo_rl.rl.trainer import Trainer
  from fo_rl.tools import sample as tool

  c = config_lib.base_config()
  rc = config_lib.parse(c)
  (tmp_path / "config.json").write_text(json.dumps(json.loads(c.to_json_best_effort())))
  graphdef, params = init_model(rc.model, None, rc.parallel.rules, seed=3)
  state = Trainer(graphdef, rc.model, rc.trainer).init_state(params)
  with Checkpointer(tmp_path / "checkpoints") as ck:
    ck.save(
        7, {"train": state, "rng": jax.random.key_data(jax.random.key(0))}, {"step": 7}, force=True
    )
  cfg, restored, tok, eos = tool.load_workdir(str(tmp_path), None)  # the latest step
  assert cfg == rc.model and eos == tok.eos_id == 3
  for a, b in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with pytest.raises(ValueError, match="has steps"):
    tool.load_workdir(str(tmp_path), 5)
  buf = io.StringIO()
  out = tool.sample(
      checkpoint=str(tmp_path), prompt="12+34=", temperature=0.0, max_new_tokens=4, out=buf
  )
  assert np.asarray(out.lengths)[0] >= 1 and "'12+34='" in buf.getvalue()
  assert "=== sample 1/1:" in buf.getvalue()


def test_chunked_decode_equals_one_call(trainer, prompts):
  s = sampler(trainer, "float32")
  full = s.generate(prompts, SAMPLING, seed=11)
  tok, mask = s.pad_prompts(prompts)
  st = s.decode(s.prefill(tok, mask, SAMPLING, seed=11), SAMPLING, limit=5)
  assert int(st.step) == 5
  st = s.decode(
      s.decode(s.decode(st, SAMPLING, limit=9), SAMPLING, limit=21), SAMPLING
  )  # segments end
  # at 16 and 32: the third call starts in the second one, over slots the second call wrote
  for a, b in (
      ("tokens", "tokens"),
      ("logp", "logp_mu"),
      ("routes", "routes"),
      ("lengths", "lengths"),
  ):
    np.testing.assert_array_equal(np.asarray(getattr(st, a)), np.asarray(getattr(full, b)))


@pytest.mark.slow
def test_windowed_decode_and_dense_dispatch_change_nothing(trainer, prompts):
  """The default sampler decodes in segments that attend over a window of the cache and dispatches
  densely (moe_impl="auto" -> "dense" for E=8 k=2); one segment over the whole bucket with the model's
  own dispatch must give the same samples, routes and (to rounding) logprobs."""
  s = sampler(trainer, "float32")
  B, T = len(prompts), bucket(
      SAMPLING.max_new_tokens, s.config.gen_bucket
  )  # 32 rows, T = 32, P = 16
  assert s.segment_ends(B, 16, T) == [16, 32] and s.model_cfg.moe_impl == "dense"
  plain = Sampler(CFG, SamplerConfig(decode_segments=1, moe_impl=None), trainer_state=trainer[1])
  assert plain.segment_ends(B, 16, T) == [T] and plain.model_cfg.moe_impl == "fast"
  a, b = s.generate(prompts, SAMPLING, seed=4), plain.generate(prompts, SAMPLING, seed=4)
  for f in ("tokens", "routes", "lengths", "finished_eos"):
    np.testing.assert_array_equal(np.asarray(getattr(a, f)), np.asarray(getattr(b, f)))
  np.testing.assert_allclose(np.asarray(a.logp_mu), np.asarray(b.logp_mu), atol=1e-5)
  with pytest.raises(ValueError, match="moe_impl"):
    SamplerConfig(moe_impl="sparse")
  # the automatic rule: segments of decode_window steps, at most max_decode_segments, small caches only
  assert s.segment_ends(B, 16, 256) == list(range(32, 257, 32))
  assert Sampler(CFG, SamplerConfig(decode_window=8)).segment_ends(B, 16, T) == [8, 16, 24, 32]
  assert Sampler(CFG, SamplerConfig(window_cache_mib=0.1)).segment_ends(B, 16, T) == [T]
  with pytest.raises(ValueError, match="decode_segments"):
    SamplerConfig(decode_segments=0)


# ------------------------------------------------------------------------------------------------
# Per-shard decode loops.
# ------------------------------------------------------------------------------------------------
def test_loop_axes_are_the_batch_axes_that_hold_no_weights():
  mesh = make_mesh({"data": 2, "fsdp": 2, "expert": 2})
  s = Sampler(CFG, SamplerConfig(), mesh=mesh)
  assert s.loop_axes(8) == ("data",)  # fsdp and expert also split the batch, but they hold weights
  assert s.loop_axes(3) == ()  # 3 rows do not split over data
  assert Sampler(CFG, SamplerConfig(), mesh=make_mesh({"fsdp": 8})).loop_axes(8) == ()
  no_tensor = tuple(
      (n, "tensor") if n == "batch" else (n, None if a == "tensor" else a) for n, a in DEFAULT_RULES
  )  # tensor splits the batch only
  assert Sampler(
      CFG, SamplerConfig(rules=no_tensor), mesh=make_mesh({"data": 2, "tensor": 4})
  ).loop_axes(8) == ("tensor",)


@pytest.mark.slow
@pytest.mark.parametrize("mesh_shape", [{"data": 8}, {"data": 2, "expert": 4}])
def test_per_shard_decode_samples_what_one_device_does(trainer, prompts, mesh_shape):
  """The batch split over `data`, each shard decoding in its own loop (with its own early exit;
  {"data": 2, "expert": 4}: each loop dispatches its tokens over 4 expert shards), samples exactly what one
  device does: same tokens, lengths, routes (padding columns hold the fill value whichever loop ran
  longest) and, to float rounding, logprobs; with top-k / top-p (the sorted draw) and in chunked calls.
  """
  sp = dataclasses.replace(SAMPLING, top_k=20, top_p=0.9)
  s = Sampler(CFG, SamplerConfig(), mesh=make_mesh(mesh_shape), trainer_state=trainer[1])
  assert s.loop_axes(len(prompts)) == ("data",)
  one = sampler(trainer, "float32")
  tok, mask = s.pad_prompts(prompts)
  st = s.decode(s.prefill(tok, mask, sp, seed=2), sp, limit=9)
  assert int(st.step) == 9
  st = s.decode(st, sp)
  ref = one.generate(prompts, sp, seed=2)
  lengths = np.asarray(ref.lengths)
  assert (
      lengths.min() < lengths.max() == sp.max_new_tokens
  )  # the shards' rows end at different steps
  for a, b in (
      ("tokens", "tokens"),
      ("routes", "routes"),
      ("lengths", "lengths"),
      ("eos", "finished_eos"),
  ):
    np.testing.assert_array_equal(np.asarray(getattr(st, a)), np.asarray(getattr(ref, b)))
  np.testing.assert_allclose(np.asarray(st.logp), np.asarray(ref.logp_mu), atol=1e-5)
  routes, P = np.asarray(st.routes), tok.shape[1]
  after = np.arange(routes.shape[1])[None] >= P + lengths[:, None]  # never-fed response columns
  assert np.all(routes[after][:, MOE] == 0) and np.all(routes[after][:, [1]] == -1)


# ------------------------------------------------------------------------------------------------
# Ahead-of-time lowering (what fo_rl/dry_run.py compiles).
# ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_lower_gives_the_functions_generate_runs(trainer, prompts):
  """`Sampler.lower` lowers the weight sync, prefill and decode for abstract inputs; the lowered decode
  takes exactly the shardings the compiled prefill returns, and the compiled functions run on real
  arrays sample what `generate` does (per-shard loops over `data`, experts over `expert`)."""
  _, state, _ = trainer
  rules = DEFAULT_RULES
  trainer_mesh = make_mesh({"fsdp": 2, "expert": 4})
  _, abstract = abstract_model(CFG, trainer_mesh, rules)
  shardings = state_shardings(abstract, trainer_mesh, rules)
  abstract = jax.tree.map(
      lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), abstract, shardings
  )
  s = Sampler(CFG, SamplerConfig(weight_dtype="int8"), mesh=make_mesh({"data": 2, "expert": 4}))
  B, Pl, T = len(prompts), 16, bucket(SAMPLING.max_new_tokens, s.config.gen_bucket)
  lowered = s.lower(abstract, B, Pl, SAMPLING)
  assert sorted(lowered) == ["decode", "prefill", "update_weights"]
  compiled = {name: low.compile() for name, low in lowered.items()}
  out_sh = jax.tree.leaves(compiled["prefill"].output_shardings)
  in_sh = jax.tree.leaves(compiled["decode"].input_shardings[0][1])  # (params, state, limit)
  shapes = jax.tree.leaves(lowered["prefill"].out_info)
  assert len(out_sh) == len(in_sh) == len(shapes) == 11 + 2 * CFG.num_layers
  for a, b, x in zip(out_sh, in_sh, shapes):
    assert a.is_equivalent_to(b, len(x.shape)), (a, b, x.shape)
  assert tuple(shapes[0].shape) == (B, CFG.num_kv_heads, CFG.head_dim, Pl + T)  # layer 0's cache

  placed = jax.device_put(state, shardings)
  s.update_weights(placed)
  params = compiled["update_weights"](placed)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(s.params)):
    np.testing.assert_array_equal(
        np.asarray(a.astype(jnp.float32)), np.asarray(b.astype(jnp.float32))
    )
  tok, mask = s.pad_prompts(prompts)
  replicated = NamedSharding(s.mesh, jax.sharding.PartitionSpec())
  key = jax.device_put(jax.random.key(9), replicated)
  max_new = jax.device_put(jnp.int32(SAMPLING.max_new_tokens), replicated)
  st = compiled["decode"](params, compiled["prefill"](params, tok, mask, key, max_new), max_new)
  ref = s.generate(prompts, SAMPLING, seed=9)
  for a, b in (
      ("tokens", "tokens"),
      ("logp", "logp_mu"),
      ("routes", "routes"),
      ("lengths", "lengths"),
  ):
    np.testing.assert_array_equal(np.asarray(getattr(st, a)), np.asarray(getattr(ref, b)))
