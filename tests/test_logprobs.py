"""fo_rl/model/logprobs.py: the chunked log-probs and entropies equal the whole-logits ones (values and
gradients) and a numpy reference; the model's scorer (`make_scorer`) gives the same with any chunk; the
chunked backward does not hold the [B, T, V] logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fo_rl.model import logprobs as LP


def _case(B=3, T=10, D=6, V=17, seed=0):
  rng = np.random.default_rng(seed)
  hidden = jnp.asarray(rng.normal(size=(B, T, D)), jnp.float32)
  head = jnp.asarray(rng.normal(size=(D, V)), jnp.float32)
  tokens = jnp.asarray(rng.integers(0, V, (B, T)), jnp.int32)
  return hidden, head, tokens


def _numpy(hidden, head, tokens, temperature):
  logits = np.asarray(hidden, np.float64) @ np.asarray(head, np.float64) / temperature
  logits -= logits.max(-1, keepdims=True)
  logq = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  B, T = tokens.shape
  logp, ent = np.zeros((B, T)), np.zeros((B, T))
  for b in range(B):
    for t in range(1, T):
      logp[b, t] = logq[b, t - 1, tokens[b, t]]
      ent[b, t] = -(np.exp(logq[b, t - 1]) * logq[b, t - 1]).sum()
  return logp, ent


@pytest.mark.parametrize("chunk", [pytest.param(1, marks=pytest.mark.slow), 3, 4, 9, 64])
def test_chunked_matches_full_and_numpy(chunk):
  """Chunks that do and do not divide T - 1 = 9, and one larger than it; temperature 0.7."""
  hidden, head, tokens = _case()
  want_lp, want_ent = _numpy(hidden, head, np.asarray(tokens), 0.7)
  lp, ent = LP.chunked(hidden, head, tokens, 0.7, chunk, entropy=True)
  np.testing.assert_allclose(lp, want_lp, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(ent, want_ent, rtol=1e-5, atol=1e-6)
  full_lp, full_ent = LP.full(hidden @ head, tokens, 0.7, entropy=True)
  np.testing.assert_allclose(lp, full_lp, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(ent, full_ent, rtol=1e-6, atol=1e-6)
  assert LP.chunked(hidden, head, tokens, 0.7, chunk)[1] is None


@pytest.mark.parametrize("chunk", [pytest.param(2, marks=pytest.mark.slow), 4])
def test_chunked_gradients_match_full(chunk):
  hidden, head, tokens = _case(seed=1)
  w = jnp.asarray(np.random.default_rng(2).normal(size=tokens.shape), jnp.float32)

  def loss(fn):
    def f(h, W):
      lp, ent = fn(h, W)
      return jnp.sum(w * lp) + 0.3 * jnp.sum(w * ent)

    return f

  chunked = loss(lambda h, W: LP.chunked(h, W, tokens, 0.9, chunk, entropy=True))
  full = loss(lambda h, W: LP.full(h @ W, tokens, 0.9, entropy=True))
  g_c = jax.jit(jax.grad(chunked, argnums=(0, 1)))(hidden, head)
  g_f = jax.grad(full, argnums=(0, 1))(hidden, head)
  for a, b in zip(g_c, g_f):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_chunked_backward_holds_one_chunk_of_logits():
  """Compiled temporary memory of grad(sum logp): the whole-logits path holds [B, T, V] float32 several
  times over and grows with T; the chunked one holds a few chunks' worth, whatever T."""
  B, D, V, c = 2, 64, 16384, 64

  def temp(fn, T):
    hidden, head = jnp.zeros((B, T, D)), jnp.zeros((D, V))
    tokens = jnp.zeros((B, T), jnp.int32)
    g = jax.jit(jax.grad(lambda h, W: jnp.sum(fn(h, W, tokens)[0]), argnums=(0, 1)))
    return g.lower(hidden, head).compile().memory_analysis().temp_size_in_bytes

  full = lambda h, W, t: LP.full(h @ W, t)
  chunked = lambda h, W, t: LP.chunked(h, W, t, chunk=c)
  f512, f1024 = temp(full, 512), temp(full, 1024)
  c512, c1024 = temp(chunked, 512), temp(chunked, 1024)
  assert f512 >= B * 512 * V * 4 and f1024 / f512 > 1.8, (f512, f1024)
  assert c1024 / c512 < 1.2 and c1024 < 8 * B * c * V * 4, (c512, c1024)


@pytest.mark.slow
def test_scorer_chunk_matches_whole_logits(toy_model):
  """make_scorer on the toy MoE with replayed routes and left padding: chunk 5 vs chunk 0 (today's
  path), log-probs, entropies and parameter gradients."""
  from fo_rl.model.init import make_scorer, positions_from_mask

  cfg, graphdef, params = toy_model
  B, T = 3, 12
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (B, T)), jnp.int32)
  mask = np.ones((B, T), bool)
  mask[1, :3] = False
  mask = jnp.asarray(mask)
  pos = positions_from_mask(mask)
  (_, _), routes = make_scorer(graphdef)(params, tokens, pos, None, mask)

  def run(chunk):
    score = make_scorer(graphdef, chunk)

    def f(p):
      (lp, ent), _ = score(p, tokens, pos, routes, mask, 0.8, entropy=True)
      return jnp.sum(jnp.where(mask, lp, 0.0)), (lp, ent)

    return jax.value_and_grad(f, has_aux=True)(params)

  (l0, (lp0, ent0)), g0 = run(0)
  (l5, (lp5, ent5)), g5 = run(5)
  np.testing.assert_allclose(lp5, lp0, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(ent5, ent0, rtol=1e-5, atol=1e-6)
  for a, b in zip(jax.tree.leaves(g5), jax.tree.leaves(g0)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_config_rejects_a_negative_chunk():
  from fo_rl.model import ModelConfig

  with pytest.raises(ValueError, match=r"model\.logits_chunk=-1"):
    ModelConfig(logits_chunk=-1)
