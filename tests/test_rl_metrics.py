"""fo_rl.rl.metrics against plain-numpy loop implementations (float64)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fo_rl.rl import metrics as M


def make_logps(seed, B=5, T=8):
  rng = np.random.default_rng(seed)
  lo = -rng.exponential(1.0, (B, T))
  lm = lo + rng.normal(0, 0.9, (B, T))
  mask = (rng.random((B, T)) < 0.7).astype(np.float64)
  mask[1] = 0.0
  lm = np.where(mask > 0, lm, 50.0)  # padding garbage must not matter
  return lm, lo, mask


def masked_tokens(mask):
  return list(zip(*np.nonzero(mask)))


def test_train_infer_kl():
  for seed in range(3):
    lm, lo, mask = make_logps(seed)
    vals = [lm[i, t] - lo[i, t] for i, t in masked_tokens(mask)]
    assert float(M.train_infer_kl(lm, lo, mask)) == pytest.approx(np.mean(vals), rel=1e-5, abs=1e-6)


def test_k3_kl():
  for seed in range(3):
    lm, lo, mask = make_logps(seed)
    vals = []
    for i, t in masked_tokens(mask):
      rho = math.exp(lo[i, t]) / math.exp(lm[i, t])  # pi_old / mu
      vals.append(rho - 1 - math.log(rho))
    got = float(M.k3_kl(lm, lo, mask))
    assert got == pytest.approx(np.mean(vals), rel=1e-5, abs=1e-6)
    assert got >= 0


def test_kl_estimators_agree_in_expectation():
  """Exact expectations over a categorical mu: k1 and k3 both equal KL[mu || pi_old]."""
  rng = np.random.default_rng(0)
  mu = rng.dirichlet(np.ones(6))
  pi = rng.dirichlet(np.ones(6))
  kl = float(np.sum(mu * np.log(mu / pi)))
  lm, lo = np.log(mu)[None], np.log(pi)[None]
  w = mu[None] * 6  # mask used as a weight: masked_mean(x, w) = sum_v mu_v x_v
  assert float(M.train_infer_kl(lm, lo, w)) == pytest.approx(kl, rel=1e-5)
  assert float(M.k3_kl(lm, lo, w)) == pytest.approx(kl, rel=1e-5)


@pytest.mark.parametrize("tau", [1.5, 2.0, 4.0])
def test_frac_ratio_beyond(tau):
  for seed in range(3):
    lm, lo, mask = make_logps(seed)
    hits = []
    for i, t in masked_tokens(mask):
      rho = math.exp(lo[i, t] - lm[i, t])
      hits.append(max(rho, 1 / rho) > tau)
    got = float(M.frac_ratio_beyond(lo, lm, mask, tau))
    assert got == pytest.approx(np.mean(hits), abs=1e-7)
    assert 0 < np.mean(hits) < 1  # the inputs exercise both outcomes
  with pytest.raises(ValueError, match="tau"):
    M.frac_ratio_beyond(lo, lm, mask, 0.5)


def ref_entropy(logits, mask):
  ents = []
  for i, t in masked_tokens(mask):
    z = np.asarray(logits[i, t], np.float64)
    p = np.exp(z - z.max())
    p /= p.sum()
    ents.append(-sum(pv * math.log(pv) for pv in p if pv > 0))
  return np.mean(ents)


def test_token_entropy():
  rng = np.random.default_rng(0)
  B, T, V = 3, 4, 7
  logits = rng.normal(0, 3, (B, T, V))
  logits[0, 0, 2] = -np.inf  # an excluded vocabulary entry contributes 0, not NaN
  mask = np.ones((B, T))
  mask[2, 1:] = 0
  assert float(M.token_entropy(logits, mask)) == pytest.approx(ref_entropy(logits, mask), rel=1e-5)
  # bf16 logits are upcast to float32 before log_softmax
  bf = jnp.asarray(logits, jnp.bfloat16)
  want = ref_entropy(np.asarray(bf.astype(jnp.float32)), mask)
  assert float(M.token_entropy(bf, mask)) == pytest.approx(want, rel=1e-5)
  # uniform logits: log V nats
  assert float(M.token_entropy(np.zeros((1, 2, V)), np.ones((1, 2)))) == pytest.approx(
      math.log(V), rel=1e-6
  )


# --------------------------------------------------------------------------------------------------------
# Router disagreement.
# --------------------------------------------------------------------------------------------------------


def ref_router(ra, rb, mask):
  decisions = diffs = tokens = tokens_diff = 0
  B, T, L, _ = ra.shape
  for i in range(B):
    for t in range(T):
      if not mask[i, t]:
        continue
      any_dec = any_diff = False
      for layer in range(L):
        a, b = list(ra[i, t, layer]), list(rb[i, t, layer])
        if all(x < 0 for x in a) and all(x < 0 for x in b):
          continue  # dense layer
        any_dec = True
        decisions += 1
        if set(a) != set(b):
          diffs += 1
          any_diff = True
      tokens += any_dec
      tokens_diff += any_diff
  return diffs / max(decisions, 1), tokens_diff / max(tokens, 1), decisions, tokens


def make_routes(seed, B=3, T=6, L=5, K=2, E=8, p_change=0.15):
  rng = np.random.default_rng(seed)
  ra = np.stack([rng.permutation(E)[:K] for _ in range(B * T * L)]).reshape(B, T, L, K)
  rb = ra.copy()
  for idx in np.ndindex(B, T, L):
    if rng.random() < p_change:
      rb[idx] = rng.permutation(E)[:K]
    else:
      rb[idx] = rng.permutation(rb[idx])  # same set, shuffled order inside K
  for dense in (0, 3):  # dense layers hold -1 on both sides
    ra[:, :, dense] = -1
    rb[:, :, dense] = -1
  mask = (rng.random((B, T)) < 0.8).astype(np.float32)
  return ra.astype(np.int32), rb.astype(np.int32), mask


def test_router_disagreement_matches_reference():
  for seed in range(4):
    ra, rb, mask = make_routes(seed)
    got = M.router_disagreement(jnp.asarray(ra), jnp.asarray(rb), jnp.asarray(mask))
    per_dec, per_tok, n_dec, n_tok = ref_router(ra, rb, mask)
    assert float(got["per_decision"]) == pytest.approx(per_dec, abs=1e-7)
    assert float(got["per_token"]) == pytest.approx(per_tok, abs=1e-7)
    assert float(got["num_decisions"]) == n_dec and float(got["num_tokens"]) == n_tok
    assert 0 < per_dec < per_tok < 1  # a token differs if any of its layers differs


def test_router_permuted_k_order_counts_as_equal():
  ra, _, mask = make_routes(0)
  rb = ra[..., ::-1].copy()  # same sets, every order reversed
  got = M.router_disagreement(ra, rb, mask)
  assert float(got["per_decision"]) == 0 and float(got["per_token"]) == 0
  rb[0, 0, 1, 0] = 7 if rb[0, 0, 1, 1] != 7 and rb[0, 0, 1, 0] != 7 else 6  # one real change
  mask = np.ones_like(mask)
  got = M.router_disagreement(ra, rb, mask)
  assert float(got["per_decision"]) == pytest.approx(1 / float(got["num_decisions"]))
  # dense layers excluded: 3 MoE layers per token
  assert float(got["num_decisions"]) == ra.shape[0] * ra.shape[1] * 3


def test_router_one_sided_dense_is_a_disagreement_and_empty_mask_is_zero():
  ra, rb, mask = make_routes(1, p_change=0.0)
  rb[0, 0, 0] = [1, 2]  # layer 0 is dense in ra but routed in rb: a layer-index shift
  mask[0, 0] = 1.0
  got = M.router_disagreement(ra, rb, mask)
  assert float(got["per_decision"]) > 0
  got = M.router_disagreement(ra, rb, np.zeros_like(mask))
  assert all(float(v) == 0 for v in got.values())


def test_router_jit_and_shape_errors():
  ra, rb, mask = make_routes(2)
  got = jax.jit(M.router_disagreement)(ra, rb, mask)
  assert float(got["per_decision"]) == pytest.approx(ref_router(ra, rb, mask)[0], abs=1e-7)
  with pytest.raises(ValueError, match="B, T, L, K"):
    M.router_disagreement(ra[..., 0], rb[..., 0], mask)
  with pytest.raises(ValueError, match="token_mask"):
    M.router_disagreement(ra, rb, mask[:, :2])


def test_masked_helpers_empty_and_garbage():
  x = np.array([[1.0, np.inf, np.nan], [2.0, 5.0, -np.inf]])
  mask = np.array([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
  assert float(M.masked_mean(x, mask)) == pytest.approx(8 / 3)
  assert float(M.masked_max(x, mask)) == 5.0
  assert float(M.masked_mean(x, np.zeros_like(mask))) == 0.0
  assert float(M.masked_max(x, np.zeros_like(mask))) == 0.0


def ref_quantile(xs, q):
  """Linear-interpolation quantile of a Python list (numpy's default method), by hand."""
  xs = sorted(xs)
  pos = q * (len(xs) - 1)
  lo = math.floor(pos)
  hi = min(lo + 1, len(xs) - 1)
  return xs[lo] + (pos - lo) * (xs[hi] - xs[lo])


def test_train_infer_seq_quantiles():
  """Sequence log ratio sum_t log(pi_old/mu) and geometric mean ratio, quantiles over the non-empty rows
  (row 1 is empty and must not count); an all-empty mask gives zeros."""
  for seed in range(3):
    lm, lo, mask = make_logps(seed, B=9)
    rows = [i for i in range(mask.shape[0]) if mask[i].sum() > 0]
    log_w = [sum(lo[i, t] - lm[i, t] for t in range(mask.shape[1]) if mask[i, t]) for i in rows]
    geo = [math.exp(lw / mask[i].sum()) for lw, i in zip(log_w, rows)]
    got = M.train_infer_seq_quantiles(jnp.asarray(lm), jnp.asarray(lo), jnp.asarray(mask))
    assert set(got) == {
        f"train_infer_{n}_p{p}" for n in ("seq_log_ratio", "geo_ratio") for p in ("10", "50", "90")
    }
    for q in (0.1, 0.5, 0.9):
      p = f"{round(100 * q):02d}"
      np.testing.assert_allclose(
          got[f"train_infer_seq_log_ratio_p{p}"], ref_quantile(log_w, q), rtol=1e-5, atol=1e-5
      )
      np.testing.assert_allclose(
          got[f"train_infer_geo_ratio_p{p}"], ref_quantile(geo, q), rtol=1e-5
      )
  empty = M.train_infer_seq_quantiles(jnp.zeros((2, 3)), jnp.ones((2, 3)), jnp.zeros((2, 3)))
  assert all(float(v) == 0.0 for v in empty.values())
