"""fo_rl.rl.losses against independent float64 numpy implementations of algorithms.md sections 3-4.

The numpy references below are written from the formulas with explicit Python loops; they never call the
code under test. Gradients are central finite differences of the reference in float64, with every term the
formula puts under sg[.] computed from a *frozen* copy of log pi_theta (so it is held fixed), plus a
hand-derived gradient for MiniRL.
"""

import itertools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from fo_rl.rl import losses as L

# --------------------------------------------------------------------------------------------------------
# Random batches: prompt prefixes, padding, one fully-masked row, both signs of A, a zero A, both clip
# sides triggered, some train-infer ratios above the cap.
# --------------------------------------------------------------------------------------------------------


def make_batch(seed, B=7, T=9):
  rng = np.random.default_rng(seed)
  lo = -rng.exponential(1.0, (B, T)) - 0.05
  lp = lo + rng.normal(0.0, 0.3, (B, T))
  lm = lo + rng.normal(0.0, 0.8, (B, T))
  mask = np.zeros((B, T))
  for i in range(B):
    start = rng.integers(0, 3)
    end = rng.integers(start + 1, T + 1)
    mask[i, start:end] = 1.0
  mask[2] = 0.0  # a padding row
  # Forced train-infer ratios pi_old / mu above the default cap C = 5 on response tokens.
  for i in (0, 3):
    t = int(np.flatnonzero(mask[i])[0])
    lm[i, t] = lo[i, t] - 2.5
  adv = rng.normal(0.0, 1.0, B)
  adv[1] = 0.0
  adv[0], adv[3] = abs(adv[0]) + 0.1, -abs(adv[3]) - 0.1
  # Wild but finite values at masked positions: they must not matter.
  lp = np.where(mask > 0, lp, -40.0)
  lm = np.where(mask > 0, lm, 30.0)
  return dict(logp=lp, logp_old=lo, logp_mu=lm, advantages=adv, mask=mask)


def gspo_batch(seed):
  """make_batch with pi_theta within ~1e-3 of pi_old, so sequence ratios straddle GSPO's (3e-4, 4e-4)
  band: row 0 (A > 0) is pushed above 1 + 4e-4, row 3 (A < 0) below 1 - 3e-4, the rest are random.
  """
  d = make_batch(seed)
  rng = np.random.default_rng(100 + seed)
  B, T = d["mask"].shape
  shift = rng.choice([-2e-3, 0.0, 2e-3], size=(B, 1))
  shift[0], shift[3] = 2e-3, -2e-3
  lp = d["logp_old"] + shift + rng.normal(0.0, 5e-4, (B, T))
  d["logp"] = np.where(d["mask"] > 0, lp, -40.0)
  return d


def to_inputs(d, dtype=jnp.float32):
  return L.LossInputs(**{k: jnp.asarray(v, dtype) for k, v in d.items()})


def jax_value_and_grad(d, cfg):
  """(loss, dloss/dlogp, metrics) from the code under test."""
  inputs = to_inputs(d)

  def f(logp):
    return L.policy_loss(
        L.LossInputs(logp, inputs.logp_old, inputs.logp_mu, inputs.advantages, inputs.mask), cfg
    )

  (loss, metrics), grad = jax.value_and_grad(f, has_aux=True)(inputs.logp)
  return float(loss), np.asarray(grad, np.float64), {k: float(v) for k, v in metrics.items()}


def finite_diff(f, lp, mask, h=1e-6):
  """Central differences of a float64 scalar function f(lp) on masked entries (0 elsewhere)."""
  g = np.zeros_like(lp)
  for i, t in zip(*np.nonzero(mask)):
    up, dn = lp.copy(), lp.copy()
    up[i, t] += h
    dn[i, t] -= h
    g[i, t] = (f(up) - f(dn)) / (2 * h)
  return g


# --------------------------------------------------------------------------------------------------------
# Numpy references (float64, loops).
# --------------------------------------------------------------------------------------------------------


def ref_budget(mask):
  """The response length budget: columns from the first one holding a response token (any row) to the end."""
  W = mask.shape[1]
  first = min((t for i in range(mask.shape[0]) for t in range(W) if mask[i, t]), default=0)
  return W - first


def ref_minirl_weight(lp_sg, lo, lm, cfg):
  """(w, truncated) for one token, exactly as section 3 / the LossConfig docs describe."""
  r = math.exp(lp_sg - lo)
  d = math.exp(lo - lm)
  if not cfg.train_infer_is:
    return r, d > cfg.tis_cap
  if cfg.tis_mode == "discrepancy":
    return min(d, cfg.tis_cap) * r, d > cfg.tis_cap
  whole = math.exp(lp_sg - lm)
  return min(whole, cfg.tis_cap), whole > cfg.tis_cap


def ref_seq_log_ratio(d, i):
  """log W_i = sum_t log(pi_old / mu) over row i's response tokens (a plain Python sum)."""
  lo, lm, mask = d["logp_old"], d["logp_mu"], d["mask"]
  return sum(lo[i, t] - lm[i, t] for t in range(mask.shape[1]) if mask[i, t])


def ref_weight(lp_sg, d, cfg, i, t):
  """(w, truncated) for token t of row i under every is_level (LossConfig docs, algorithms.md sec. 8)."""
  lo, lm = d["logp_old"][i, t], d["logp_mu"][i, t]
  if not cfg.train_infer_is or cfg.is_level == "none":
    return math.exp(lp_sg[i, t] - lo), math.exp(lo - lm) > cfg.tis_cap
  if cfg.is_level == "sequence":
    W = math.exp(ref_seq_log_ratio(d, i))
    return min(W, cfg.seq_tis_cap) * math.exp(lp_sg[i, t] - lo), W > cfg.seq_tis_cap
  return ref_minirl_weight(lp_sg[i, t], lo, lm, cfg)


def ref_accepted(d, cfg, i, t):
  """K_t: 1 unless cfg.reject masks token t of row i (ratios compared as ratios, not logs)."""
  lo, lm, mask = d["logp_old"], d["logp_mu"], d["mask"]
  if cfg.reject == "none":
    return 1.0
  if cfg.reject == "token":
    x = math.exp(lo[i, t] - lm[i, t])
  elif cfg.reject == "sequence":
    x = math.exp(ref_seq_log_ratio(d, i))
  else:  # geometric mean of the per-token ratios
    ratios = [math.exp(lo[i, u] - lm[i, u]) for u in range(mask.shape[1]) if mask[i, u]]
    x = math.prod(ratios) ** (1.0 / len(ratios))
  return 1.0 if cfg.reject_low <= x <= cfg.reject_high else 0.0


def ref_minirl_mask(r, a, eps_low, eps_high):
  """M_t: 0 iff (A > 0 and r > 1 + eps_high) or (A < 0 and r < 1 - eps_low)."""
  if (a > 0 and r > 1 + eps_high) or (a < 0 and r < 1 - eps_low):
    return 0.0
  return 1.0


def ref_minirl(lp, d, cfg, lp_sg=None):
  """-(1/N) sum_{i,t} mask M sg[w] A log pi, with sg terms evaluated at lp_sg (held fixed)."""
  lp_sg = lp if lp_sg is None else lp_sg
  lo, lm, adv, mask = d["logp_old"], d["logp_mu"], d["advantages"], d["mask"]
  B, T = lp.shape
  total = 0.0
  for i in range(B):
    row, n = 0.0, 0
    for t in range(T):
      if mask[i, t] == 0:
        continue
      n += 1
      w, _ = ref_weight(lp_sg, d, cfg, i, t)
      r = math.exp(lp_sg[i, t] - lo[i, t])
      m = ref_minirl_mask(r, adv[i], cfg.eps_low, cfg.eps_high) if cfg.clip else 1.0
      row += ref_accepted(d, cfg, i, t) * m * w * adv[i] * lp[i, t]
    if cfg.length_norm:
      row = row / n if n else 0.0
    total += row
  if cfg.length_norm or cfg.normalizer == "responses":
    return -total / B
  return -total / (B * ref_budget(mask))


def ref_minirl_grad(d, cfg):
  """Hand-derived: dL/dlogp_it = -(1/N) mask M w A  (with 1/N -> 1/(B |y_i|) under length_norm)."""
  lp, lo, lm, adv, mask = (d[k] for k in ("logp", "logp_old", "logp_mu", "advantages", "mask"))
  B, T = lp.shape
  g = np.zeros((B, T))
  for i in range(B):
    n = mask[i].sum()
    for t in range(T):
      if mask[i, t] == 0:
        continue
      w, _ = ref_weight(lp, d, cfg, i, t)
      r = math.exp(lp[i, t] - lo[i, t])
      m = ref_minirl_mask(r, adv[i], cfg.eps_low, cfg.eps_high) * ref_accepted(d, cfg, i, t)
      m = m if cfg.clip else ref_accepted(d, cfg, i, t)
      if cfg.length_norm:
        norm = B * n
      else:
        norm = B if cfg.normalizer == "responses" else B * ref_budget(mask)
      g[i, t] = -m * w * adv[i] / norm
  return g


def ref_ppo_term(ratio, a, eps_low, eps_high):
  clipped = min(max(ratio, 1 - eps_low), 1 + eps_high)
  return min(ratio * a, clipped * a)


def ref_grpo(lp, d, cfg):
  """-(1/B) sum_i (1/|y_i|) sum_t min(r A, clip(r) A), r differentiated."""
  lo, adv, mask = d["logp_old"], d["advantages"], d["mask"]
  B, T = lp.shape
  total = 0.0
  for i in range(B):
    terms = [
        ref_ppo_term(math.exp(lp[i, t] - lo[i, t]), adv[i], cfg.eps_low, cfg.eps_high)
        for t in range(T)
        if mask[i, t]
    ]
    if terms:
      total += sum(terms) / len(terms)
  return -total / B


def ref_dapo(lp, d, cfg):
  """-(1/sum_{i kept}|y_i|) sum_{i kept,t} min(r A, clip(r, 1-eps_low, 1+dapo_eps_high) A); a response is
  kept iff A_i != 0 (dynamic sampling: zero-signal groups leave the batch and the divisor)."""
  lo, adv, mask = d["logp_old"], d["advantages"], d["mask"]
  total, n = 0.0, 0
  for i, t in zip(*np.nonzero(mask)):
    if adv[i] == 0:
      continue
    total += ref_ppo_term(math.exp(lp[i, t] - lo[i, t]), adv[i], cfg.eps_low, cfg.dapo_eps_high)
    n += 1
  return -total / n if n else 0.0


def ref_cispo(lp, d, cfg, lp_sg=None):
  """-(1/sum|y_i|) sum_{i,t} sg[min(r, 1+eps)] A log pi."""
  lp_sg = lp if lp_sg is None else lp_sg
  lo, adv, mask = d["logp_old"], d["advantages"], d["mask"]
  total, n = 0.0, 0
  for i, t in zip(*np.nonzero(mask)):
    w = min(math.exp(lp_sg[i, t] - lo[i, t]), 1 + cfg.cispo_eps_high)
    total += w * adv[i] * lp[i, t]
    n += 1
  return -total / n if n else 0.0


def ref_gspo_seq_ratio(lp, lo, mask, i):
  toks = [lp[i, t] - lo[i, t] for t in range(lp.shape[1]) if mask[i, t]]
  return math.exp(sum(toks) / len(toks)) if toks else None


def ref_gspo(lp, d, cfg):
  """-(1/B) sum_i min(s_i A_i, clip(s_i, 1-3e-4, 1+4e-4) A_i), s_i = exp(mean_t log r)."""
  lo, adv, mask = d["logp_old"], d["advantages"], d["mask"]
  B = lp.shape[0]
  total = 0.0
  for i in range(B):
    s = ref_gspo_seq_ratio(lp, lo, mask, i)
    if s is not None:
      total += ref_ppo_term(s, adv[i], cfg.gspo_eps_low, cfg.gspo_eps_high)
  return -total / B


# --------------------------------------------------------------------------------------------------------
# Reference metrics.
# --------------------------------------------------------------------------------------------------------


def ref_metrics(d, cfg):
  """Per-token weight / clip sides / truncation, as documented for each loss, then masked stats."""
  lp, lo, lm, adv, mask = (d[k] for k in ("logp", "logp_old", "logp_mu", "advantages", "mask"))
  ws, highs, lows, truncs, rs = [], [], [], [], []
  for i, t in zip(*np.nonzero(mask)):
    if cfg.name == "dapo" and adv[i] == 0:
      continue  # dropped by dynamic sampling
    r = math.exp(lp[i, t] - lo[i, t])
    disc = math.exp(lo[i, t] - lm[i, t])
    trunc = disc > cfg.tis_cap
    if cfg.name == "minirl":
      w, trunc = ref_weight(lp, d, cfg, i, t)
      el, eh, ratio, on = cfg.eps_low, cfg.eps_high, r, cfg.clip
    elif cfg.name == "grpo":
      w, el, eh, ratio, on = r, cfg.eps_low, cfg.eps_high, r, True
    elif cfg.name == "dapo":
      w, el, eh, ratio, on = r, cfg.eps_low, cfg.dapo_eps_high, r, True
    elif cfg.name == "gspo":
      s = ref_gspo_seq_ratio(lp, lo, mask, i)
      w, el, eh, ratio, on = s, cfg.gspo_eps_low, cfg.gspo_eps_high, s, True
    else:  # cispo: no mask; the weight is capped above
      w = min(r, 1 + cfg.cispo_eps_high)
      el, eh, ratio, on = None, cfg.cispo_eps_high, r, False
    if cfg.name == "cispo":
      high, low = r > 1 + cfg.cispo_eps_high, False
    else:
      high = on and adv[i] > 0 and ratio > 1 + eh
      low = on and adv[i] < 0 and ratio < 1 - el
    ws.append(w), highs.append(high), lows.append(low), truncs.append(trunc), rs.append(r)
  out = {
      "is_weight_mean": np.mean(ws),
      "is_weight_max": np.max(ws),
      "is_truncated_frac": np.mean(truncs),
      "clip_frac_high": np.mean(highs),
      "clip_frac_low": np.mean(lows),
      "ratio_mean": np.mean(rs),
      "ratio_max": np.max(rs),
  }
  if not ref_truncates(cfg):
    del out["is_truncated_frac"]
  return out


def ref_truncates(cfg):
  """Whether the loss truncates an IS weight at all (is_truncated_frac is reported only then)."""
  if cfg.name != "minirl" or not cfg.train_infer_is or cfg.is_level == "none":
    return False
  return math.isfinite(cfg.seq_tis_cap if cfg.is_level == "sequence" else cfg.tis_cap)


def assert_close(got, want, rtol=2e-5, atol=2e-6, what=""):
  np.testing.assert_allclose(got, want, rtol=rtol, atol=atol, err_msg=what)


# --------------------------------------------------------------------------------------------------------
# MiniRL: every knob, value + gradient.
# --------------------------------------------------------------------------------------------------------

KNOBS = list(
    itertools.product(
        [True, False],  # clip
        [True, False],  # train_infer_is
        [False, True],  # length_norm
        ["discrepancy", "whole"],  # tis_mode
        ["responses", "responses_x_len"],  # normalizer
    )
)


def moot_knob(
    train_infer_is=True, length_norm=False, tis_mode="discrepancy", normalizer="responses"
):
  """The knob another one makes moot (set to a non-default value, an error), or None."""
  if length_norm and normalizer != "responses":
    return "normalizer"
  if not train_infer_is and tis_mode != "discrepancy":
    return "tis_mode"
  return None


@pytest.mark.parametrize("clip,tis,length_norm,tis_mode,normalizer", KNOBS)
def test_minirl_knobs_value_and_grad(clip, tis, length_norm, tis_mode, normalizer):
  knobs = dict(
      clip=clip,
      train_infer_is=tis,
      length_norm=length_norm,
      tis_mode=tis_mode,
      normalizer=normalizer,
  )
  moot = moot_knob(tis, length_norm, tis_mode, normalizer)
  if moot:
    with pytest.raises(ValueError, match=f"rl.loss.{moot}=.*ignored"):
      L.LossConfig(**knobs)
    return
  cfg = L.LossConfig(**knobs)
  for seed in (0, 1):
    d = make_batch(seed)
    loss, grad, _ = jax_value_and_grad(d, cfg)
    lp0 = d["logp"].copy()
    assert_close(loss, ref_minirl(lp0, d, cfg), what="value")
    fd = finite_diff(lambda lp: ref_minirl(lp, d, cfg, lp_sg=lp0), lp0, d["mask"])
    assert_close(grad, fd, rtol=1e-4, atol=1e-6, what="grad vs finite differences")
    assert_close(grad, ref_minirl_grad(d, cfg), rtol=1e-5, atol=1e-7, what="grad vs hand")


def test_fixture_exercises_every_branch():
  """The random batches really hit both clip sides, the cap, zero / both-sign A and a padding row."""
  cfg = L.LossConfig()
  for seed in (0, 1):
    m = ref_metrics(make_batch(seed), cfg)
    assert m["clip_frac_high"] > 0 and m["clip_frac_low"] > 0
    assert m["is_truncated_frac"] > 0
  d = make_batch(0)
  assert (
      (d["advantages"] > 0).any() and (d["advantages"] < 0).any() and (d["advantages"] == 0).any()
  )
  assert (d["mask"].sum(1) == 0).any()


def test_minirl_knobs_change_the_result():
  """Each knob matters on this batch (guards against a knob that is silently ignored)."""
  d = make_batch(0)
  base_loss, base_grad, _ = jax_value_and_grad(d, L.LossConfig())
  for change in (
      dict(clip=False),
      dict(train_infer_is=False),
      dict(length_norm=True),
      dict(tis_mode="whole"),
      dict(normalizer="responses_x_len"),
      dict(tis_cap=2.0),
      dict(eps_high=0.1),
      dict(eps_low=0.05),
  ):
    _, grad, _ = jax_value_and_grad(d, L.LossConfig(**change))
    assert not np.allclose(grad, base_grad, rtol=1e-4, atol=1e-7), change


def with_prompt_columns(d, P, rng):
  """d with P extra masked columns on the left (a prompt bucket, as the trainer's [B, P + T] layout),
  holding random junk."""
  B = d["mask"].shape[0]
  pad = lambda x, junk: np.concatenate([junk, x], axis=1)  # noqa: E731
  out = {k: pad(v, rng.normal(0.0, 3.0, (B, P))) for k, v in d.items() if k != "advantages"}
  out["mask"] = pad(d["mask"], np.zeros((B, P)))
  out["advantages"] = d["advantages"]
  return out


@pytest.mark.parametrize(  # length_norm replaces the normalizer: one case for it
    "normalizer, length_norm",
    [("responses", False), ("responses_x_len", False), ("responses", True)],
)
def test_normalizer_does_not_depend_on_the_prompt_bucket(normalizer, length_norm):
  """The trainer passes [B, P + T] arrays: the same responses behind prompt buckets of 0, 5 and 16
  columns give the same loss and gradient (responses_x_len divides by B * T, T the response budget).
  """
  cfg = L.LossConfig(normalizer=normalizer, length_norm=length_norm)
  rng = np.random.default_rng(0)
  d = make_batch(0)
  d["mask"][:, 0] = np.where(d["mask"].sum(1) > 0, 1.0, 0.0)  # responses start at column 0: T = 9
  loss, grad, _ = jax_value_and_grad(d, cfg)
  if normalizer == "responses_x_len" and not length_norm:
    assert_close(loss, ref_minirl(d["logp"], d, cfg), what="value")
    assert ref_budget(d["mask"]) == d["mask"].shape[1]
  for P in (5, 16):
    loss_p, grad_p, _ = jax_value_and_grad(with_prompt_columns(d, P, rng), cfg)
    assert loss_p == pytest.approx(loss, rel=1e-6, abs=1e-8), P
    np.testing.assert_allclose(grad_p[:, P:], grad, rtol=1e-6, atol=1e-9)
    assert np.all(grad_p[:, :P] == 0)


def test_response_budget():
  m = np.zeros((3, 10))
  m[0, 4:7] = 1
  m[1, 4:10] = 1
  assert float(L.response_budget(jnp.asarray(m))) == 6  # responses start at column 4
  m[2, 3] = 1
  assert float(L.response_budget(jnp.asarray(m))) == 7
  assert float(L.response_budget(jnp.zeros((2, 5)))) == 5  # no response: the width


def test_minirl_gradient_equals_ppo_shaped_form():
  """Section 3: -sg[min(pi_old/mu, C)] * min(r A, clip(r) A) has MiniRL's gradient (r differentiated)."""
  cfg = L.LossConfig()
  for seed in (0, 1, 2):
    d = make_batch(seed)
    lo, lm, adv, mask = d["logp_old"], d["logp_mu"], d["advantages"], d["mask"]
    B = mask.shape[0]

    def ppo_form(lp):
      total = 0.0
      for i, t in zip(*np.nonzero(mask)):
        tis = min(math.exp(lo[i, t] - lm[i, t]), cfg.tis_cap)  # data only: fixed
        total += tis * ref_ppo_term(
            math.exp(lp[i, t] - lo[i, t]), adv[i], cfg.eps_low, cfg.eps_high
        )
      return -total / B

    _, grad, _ = jax_value_and_grad(d, cfg)
    assert_close(grad, finite_diff(ppo_form, d["logp"], mask), rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------------------------------------
# Variants: value + gradient.
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("name", ["grpo", "dapo", "gspo"])
def test_ratio_differentiated_variants(name, seed):
  """GRPO, DAPO, GSPO differentiate through r (or s): finite differences of the full reference."""
  ref = {"grpo": ref_grpo, "dapo": ref_dapo, "gspo": ref_gspo}[name]
  cfg = L.LossConfig(name=name)
  d = gspo_batch(seed) if name == "gspo" else make_batch(seed)
  loss, grad, _ = jax_value_and_grad(d, cfg)
  assert_close(loss, ref(d["logp"], d, cfg), what="value")
  h = 1e-7 if name == "gspo" else 1e-6
  assert_close(
      grad, finite_diff(lambda lp: ref(lp, d, cfg), d["logp"], d["mask"], h), rtol=1e-3, atol=1e-6
  )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cispo_value_and_grad(seed):
  cfg = L.LossConfig(name="cispo")
  d = make_batch(seed)
  loss, grad, _ = jax_value_and_grad(d, cfg)
  lp0 = d["logp"].copy()
  assert_close(loss, ref_cispo(lp0, d, cfg), what="value")
  fd = finite_diff(lambda lp: ref_cispo(lp, d, cfg, lp_sg=lp0), lp0, d["mask"])
  assert_close(grad, fd, rtol=1e-4, atol=1e-6)


def test_gspo_fixture_clips_both_sides():
  cfg = L.LossConfig(name="gspo")
  for seed in (0, 1, 2):
    d = gspo_batch(seed)
    m = ref_metrics(d, cfg)
    assert m["clip_frac_high"] > 0 and m["clip_frac_low"] > 0
    _, _, metrics = jax_value_and_grad(d, cfg)
    for k, v in m.items():
      assert_close(metrics[k], v, rtol=1e-5, atol=1e-6, what=k)
    s = [
        ref_gspo_seq_ratio(d["logp"], d["logp_old"], d["mask"], i)
        for i in range(d["mask"].shape[0])
    ]
    s = [x for x in s if x is not None]
    assert metrics["seq_ratio_mean"] == pytest.approx(np.mean(s), rel=1e-6)
    assert metrics["seq_ratio_max"] == pytest.approx(np.max(s), rel=1e-6)


@pytest.mark.parametrize("name", ["minirl", "grpo", "dapo", "cispo", "gspo"])
def test_metrics_match_reference(name):
  for seed in (0, 1):
    d = make_batch(seed)
    cfg = L.LossConfig(name=name)
    _, _, metrics = jax_value_and_grad(d, cfg)
    for k, v in ref_metrics(d, cfg).items():
      assert_close(metrics[k], v, rtol=1e-5, atol=1e-6, what=f"{name}.{k}")
    kept = d["mask"] * (d["advantages"] != 0)[:, None] if name == "dapo" else d["mask"]
    assert metrics["num_tokens"] == kept.sum()


@pytest.mark.parametrize("tis_mode", ["discrepancy", "whole"])
@pytest.mark.parametrize("train_infer_is", [True, False])
def test_minirl_metrics_every_weight_mode(tis_mode, train_infer_is):
  if moot_knob(train_infer_is, tis_mode=tis_mode):
    return
  d = make_batch(3)
  cfg = L.LossConfig(tis_mode=tis_mode, train_infer_is=train_infer_is, clip=False)
  _, _, metrics = jax_value_and_grad(d, cfg)
  ref = ref_metrics(d, cfg)
  for k, v in ref.items():
    assert_close(metrics[k], v, rtol=1e-5, atol=1e-6, what=k)
  assert metrics["clip_frac_high"] == 0 and metrics["clip_frac_low"] == 0


# --------------------------------------------------------------------------------------------------------
# Gradient discipline, degenerate masks, padding garbage, jit / dtypes.
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cfg",
    [
        L.LossConfig(),
        L.LossConfig(tis_mode="whole"),
        L.LossConfig(train_infer_is=False, length_norm=True),
        L.LossConfig(name="cispo"),
    ],
    ids=["minirl", "minirl-whole", "minirl-noIS-lennorm", "cispo"],
)
def test_sg_weights_do_not_leak_gradient(cfg):
  """With every weight under sg, logp_old and logp_mu get exactly zero gradient."""
  x = to_inputs(make_batch(0))
  g_old, g_mu = jax.grad(
      lambda lo, lm: L.policy_loss(L.LossInputs(x.logp, lo, lm, x.advantages, x.mask), cfg)[0],
      argnums=(0, 1),
  )(x.logp_old, x.logp_mu)
  assert np.all(np.asarray(g_old) == 0) and np.all(np.asarray(g_mu) == 0)


def test_grpo_differentiates_through_ratio():
  """Contrast: GRPO's ratio is not under sg, so logp_old does receive gradient (the check above can fail)."""
  x = to_inputs(make_batch(0))
  g_old = jax.grad(
      lambda lo: L.policy_loss(
          L.LossInputs(x.logp, lo, x.logp_mu, x.advantages, x.mask), L.LossConfig(name="grpo")
      )[0]
  )(x.logp_old)
  assert np.abs(np.asarray(g_old)).max() > 1e-3


@pytest.mark.parametrize("name", sorted(L.LOSSES))
def test_fully_masked_row_contributes_zero(name):
  d = make_batch(0)
  cfg = L.LossConfig(name=name)
  loss, grad, metrics = jax_value_and_grad(d, cfg)
  d2 = {k: v.copy() for k, v in d.items()}
  d2["logp"][2] += 3.0  # row 2 is fully masked: change everything about it
  d2["logp_old"][2] -= 1.0
  d2["logp_mu"][2] += 2.0
  d2["advantages"][2] = 7.0
  loss2, grad2, metrics2 = jax_value_and_grad(d2, cfg)
  assert loss2 == pytest.approx(loss, abs=1e-7)
  np.testing.assert_array_equal(grad2, grad)
  assert np.all(grad[2] == 0)
  for k in metrics:
    assert metrics2[k] == pytest.approx(metrics[k], abs=1e-7), k


@pytest.mark.parametrize("name", sorted(L.LOSSES))
def test_all_masked_batch_is_zero_not_nan(name):
  d = make_batch(0)
  d["mask"] = np.zeros_like(d["mask"])
  loss, grad, metrics = jax_value_and_grad(d, L.LossConfig(name=name))
  assert loss == 0.0
  assert np.all(grad == 0)
  assert all(np.isfinite(v) for v in metrics.values())
  assert metrics["is_weight_max"] == 0 and metrics["ratio_mean"] == 0


@pytest.mark.parametrize("name", sorted(L.LOSSES))
def test_inf_and_nan_padding_are_ignored(name):
  d = make_batch(1)
  cfg = L.LossConfig(name=name)
  loss, grad, metrics = jax_value_and_grad(d, cfg)
  bad = {k: v.copy() for k, v in d.items()}
  pad = d["mask"] == 0
  bad["logp"][pad] = -np.inf
  bad["logp_old"][pad] = np.nan
  bad["logp_mu"][pad] = np.inf
  loss2, grad2, metrics2 = jax_value_and_grad(bad, cfg)
  assert loss2 == pytest.approx(loss, rel=1e-6, abs=1e-7)
  np.testing.assert_allclose(grad2, grad, rtol=1e-6, atol=1e-8)
  for k in metrics:
    assert metrics2[k] == pytest.approx(metrics[k], rel=1e-6, abs=1e-7), k


EXTREME_CFGS = [
    L.LossConfig(),
    L.LossConfig(tis_cap=float("inf")),
    L.LossConfig(tis_mode="whole", tis_cap=float("inf")),
    L.LossConfig(clip=False),
    L.LossConfig(train_infer_is=False),
    L.LossConfig(name="grpo"),
    L.LossConfig(name="dapo"),
    L.LossConfig(name="cispo"),
    L.LossConfig(name="gspo"),
]


def extreme_batch():
  """make_batch with |log ratio| of 100 on response tokens (exp overflows float32 past 88): pi_theta far
  above and below pi_old, pi_old far above and below mu, on a row with A = 0 and on rows with A != 0.
  """
  d = make_batch(0)
  rows = {1: 0.0, 0: None, 3: None}  # row 1 has A = 0
  for i in rows:
    ts = np.flatnonzero(d["mask"][i])
    t0, t1 = ts[0], ts[-1]
    d["logp"][i, t0] = d["logp_old"][i, t0] + 100.0  # r = e^100
    d["logp_mu"][i, t0] = d["logp_old"][i, t0] - 100.0  # pi_old / mu = e^100
    if t1 != t0:
      d["logp"][i, t1] = d["logp_old"][i, t1] - 100.0  # r = e^-100
      d["logp_mu"][i, t1] = d["logp_old"][i, t1] + 100.0
  assert d["advantages"][1] == 0.0
  return d


@pytest.mark.parametrize("cfg", EXTREME_CFGS, ids=lambda c: f"{c.name}-{c.tis_mode}-{c.tis_cap}")
def test_extreme_log_ratios_stay_finite(cfg):
  """log ratios of +-100 (exp overflows float32 to inf past 88): the loss, its gradient and every metric
  stay finite (the ratios are clamped to e^+-20, verl's bound), tokens with A = 0 get exactly zero
  gradient, and the clamped share is reported."""
  d = extreme_batch()
  loss, grad, metrics = jax_value_and_grad(d, cfg)
  assert np.isfinite(loss), loss
  assert np.all(np.isfinite(grad)), grad
  assert all(np.isfinite(v) for v in metrics.values()), metrics
  assert np.all(grad[1] == 0)  # A = 0: no gradient, and no NaN
  assert metrics["log_ratio_clamped_frac"] > 0
  assert metrics["ratio_max"] == pytest.approx(math.exp(L.LOG_RATIO_BOUND), rel=1e-5)


def test_extreme_minirl_value_is_the_clamped_reference():
  """The clamp is the only change: the numpy reference with every log ratio clamped to [-20, 20] gives
  the loss and gradient; without extreme values nothing is clamped (the metric is 0)."""
  cfg = L.LossConfig(tis_cap=float("inf"), clip=False)
  d = extreme_batch()
  clamp = lambda x: np.clip(x, -L.LOG_RATIO_BOUND, L.LOG_RATIO_BOUND)  # noqa: E731
  dc = dict(d)  # logp_mu moved so that every log ratio is its clamped value, relative to logp_old
  dc["logp_mu"] = d["logp_old"] - clamp(d["logp_old"] - d["logp_mu"])
  lp_sg = d["logp_old"] + clamp(d["logp"] - d["logp_old"])  # the staleness ratio, clamped
  loss, grad, _ = jax_value_and_grad(d, cfg)
  want = ref_minirl(d["logp"], dc, cfg, lp_sg=lp_sg)
  assert_close(loss, want, rtol=1e-5, what="value")
  # The surrogate is linear in log pi_theta (weights held at lp_sg): its gradient at entry (i, t) is its
  # value at the unit vector e_it (finite differences would drown in the e^40 weights' cancellation).
  want_grad = np.zeros_like(grad)
  for i, t in zip(*np.nonzero(d["mask"])):
    e = np.zeros_like(grad)
    e[i, t] = 1.0
    want_grad[i, t] = ref_minirl(e, dc, cfg, lp_sg=lp_sg)
  assert np.abs(want_grad).max() > 1e16  # the clamped weight e^20 * e^20 is in play
  assert_close(grad, want_grad, rtol=1e-5, atol=1e-7, what="grad")
  _, _, m = jax_value_and_grad(make_batch(0), L.LossConfig())
  assert m["log_ratio_clamped_frac"] == 0


@pytest.mark.parametrize("name", sorted(L.LOSSES))
def test_jit_and_bf16_inputs(name):
  d = make_batch(0)
  cfg = L.LossConfig(name=name)
  f = jax.jit(jax.value_and_grad(lambda x: L.policy_loss(x, cfg), has_aux=True))
  (loss, metrics), grads = f(to_inputs(d, jnp.bfloat16))
  assert loss.dtype == jnp.float32 and all(v.dtype == jnp.float32 for v in metrics.values())
  assert grads.logp.dtype == jnp.bfloat16 and np.all(
      np.isfinite(np.asarray(grads.logp, np.float32))
  )
  # static-argument style also works: LossConfig is hashable
  g = jax.jit(L.policy_loss, static_argnums=1)
  loss32, _ = g(to_inputs(d), cfg)
  assert loss32 == pytest.approx(jax_value_and_grad(d, cfg)[0], rel=1e-5, abs=1e-6)


def test_on_policy_all_minirl_weightings_coincide():
  """pi_theta = pi_old = mu: w = 1, no clip, and every MiniRL weighting gives the same gradient."""
  d = make_batch(0)
  d["logp_old"] = d["logp"].copy()
  d["logp_mu"] = d["logp"].copy()
  grads = []
  for tis, mode, clip in itertools.product([True, False], ["discrepancy", "whole"], [True, False]):
    if moot_knob(tis, tis_mode=mode):
      continue
    _, g, m = jax_value_and_grad(d, L.LossConfig(train_infer_is=tis, tis_mode=mode, clip=clip))
    assert m["clip_frac_high"] == 0 and m["clip_frac_low"] == 0 and m["is_weight_max"] == 1.0
    grads.append(g)
  for g in grads[1:]:
    np.testing.assert_allclose(g, grads[0], rtol=1e-6, atol=1e-8)
  # ... and equals plain REINFORCE: -(1/B) mask * A
  want = -(d["mask"] * d["advantages"][:, None]) / d["mask"].shape[0]
  np.testing.assert_allclose(grads[0], want, rtol=1e-6, atol=1e-8)


# --------------------------------------------------------------------------------------------------------
# Registry and config.
# --------------------------------------------------------------------------------------------------------


def test_registry():
  assert {"minirl", "grpo", "cispo", "gspo", "dapo"} <= set(L.LOSSES)
  assert L.get_loss("minirl") is L.LOSSES["minirl"]
  with pytest.raises(ValueError, match="known losses.*cispo.*minirl"):
    L.get_loss("ppo2")
  with pytest.raises(ValueError, match="already registered"):
    L.register("minirl")(lambda b, c: None)


def test_config_defaults_are_the_papers():
  c = L.LossConfig()
  assert (c.name, c.tis_cap, c.eps_low, c.eps_high) == ("minirl", 5.0, 0.2, 0.27)
  assert (c.clip, c.train_infer_is, c.length_norm) == (True, True, False)
  assert (c.tis_mode, c.normalizer) == ("discrepancy", "responses")
  assert (c.gspo_eps_low, c.gspo_eps_high, c.dapo_eps_high) == (3e-4, 4e-4, 0.28)
  assert (c.is_level, c.reject) == ("token", "none")  # the paper's token-level TIS, no rejection
  assert hash(c) == hash(L.LossConfig())


def test_from_config():
  cd = ml_collections.ConfigDict(
      dict(name="minirl", tis_cap=2, clip=False, normalizer="responses_x_len")
  )
  c = L.LossConfig.from_config(cd)
  assert (c.name, c.tis_cap, c.clip, c.normalizer) == ("minirl", 2.0, False, "responses_x_len")
  assert isinstance(c.tis_cap, float)
  assert L.LossConfig.from_config({}) == L.LossConfig()
  with pytest.raises(ValueError, match="'tis_capp'"):
    L.LossConfig.from_config(ml_collections.ConfigDict(dict(tis_capp=2.0)))


@pytest.mark.parametrize(
    "field,value",
    [
        ("tis_cap", -1.0),
        ("tis_cap", 0.5),
        ("tis_cap", float("nan")),
        ("eps_low", -0.1),
        ("eps_low", 1.5),
        ("eps_high", -0.01),
        ("gspo_eps_low", -1e-4),
        ("gspo_eps_high", -1e-4),
        ("dapo_eps_high", -0.28),
        ("cispo_eps_high", -1.0),
        ("clip", 1),
        ("length_norm", "yes"),
        ("tis_mode", "sequence"),
        ("normalizer", "tokens"),
        ("name", "ppo"),
        ("eps_high", "0.2"),
    ],
)
def test_bad_config_values_name_the_field(field, value):
  with pytest.raises(ValueError, match=field):
    L.LossConfig.from_config({field: value})


def test_loss_inputs_shape_checks():
  d = {k: jnp.asarray(v) for k, v in make_batch(0).items()}
  with pytest.raises(ValueError, match="advantages"):
    L.LossInputs(**{**d, "advantages": d["advantages"][:3]})
  with pytest.raises(ValueError, match="shape"):
    L.LossInputs(**{**d, "mask": d["mask"][:, :4]})
  leaves = jax.tree.leaves(L.LossInputs(**d))
  assert len(leaves) == 5


# --------------------------------------------------------------------------------------------------------
# Knobs a loss would ignore are errors; DAPO's dynamic sampling.
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["grpo", "dapo", "cispo", "gspo"])
@pytest.mark.parametrize(
    "field,value",
    [
        ("clip", False),
        ("train_infer_is", False),
        ("length_norm", True),
        ("tis_mode", "whole"),
        ("normalizer", "responses_x_len"),
        ("tis_cap", 2.0),
    ],
)
def test_minirl_knobs_on_a_variant_are_errors(name, field, value):
  """A MiniRL-only knob set on a variant that ignores it: a ValueError naming it, not a no-op."""
  with pytest.raises(ValueError, match=f"rl.loss.{field}=.*ignored.*{name}"):
    L.LossConfig.from_config({"name": name, field: value})
  L.LossConfig(name=name)  # the defaults are fine


@pytest.mark.parametrize(
    "name,field,value",
    [
        ("minirl", "gspo_eps_low", 1e-3),
        ("minirl", "dapo_eps_high", 0.3),
        ("minirl", "cispo_eps_high", 0.3),
        ("grpo", "dapo_eps_high", 0.3),
        ("dapo", "eps_high", 0.3),
        ("cispo", "eps_low", 0.1),
        ("gspo", "eps_high", 0.3),
    ],
)
def test_other_losses_bounds_are_errors(name, field, value):
  with pytest.raises(ValueError, match=f"rl.loss.{field}=.*ignored"):
    L.LossConfig(name=name, **{field: value})


@pytest.mark.parametrize(
    "knobs,field",
    [
        (dict(length_norm=True, normalizer="responses_x_len"), "normalizer"),
        (dict(train_infer_is=False, tis_mode="whole"), "tis_mode"),
        (dict(train_infer_is=False, tis_cap=2.0), "tis_cap"),
        (dict(clip=False, eps_high=0.3), "eps_high"),
        (dict(clip=False, eps_low=0.1), "eps_low"),
    ],
)
def test_minirl_moot_knobs_are_errors(knobs, field):
  with pytest.raises(ValueError, match=f"rl.loss.{field}=.*ignored"):
    L.LossConfig(**knobs)


def test_every_variant_reads_its_own_bounds():
  """Each registered field list is real: changing a listed bound changes that loss's gradient."""
  for name, field, value in [
      ("grpo", "eps_high", 0.05),
      ("dapo", "dapo_eps_high", 0.05),
      ("cispo", "cispo_eps_high", 0.01),
      ("gspo", "gspo_eps_high", 0.01),
  ]:
    d = gspo_batch(0) if name == "gspo" else make_batch(0)
    _, g0, _ = jax_value_and_grad(d, L.LossConfig(name=name))
    _, g1, _ = jax_value_and_grad(d, L.LossConfig(name=name, **{field: value}))
    assert not np.allclose(g0, g1, rtol=1e-4, atol=1e-9), (name, field)


def test_dapo_drops_zero_signal_groups_from_the_divisor():
  """DAPO's dynamic sampling: responses with A = 0 (all-equal groups) leave the loss and its token
  divisor, so appending a zero-signal group of long responses changes nothing."""
  cfg = L.LossConfig(name="dapo")
  d = make_batch(0)
  loss, grad, m = jax_value_and_grad(d, cfg)
  assert m["zero_signal_frac"] == pytest.approx(1 / 6)  # row 1 (A = 0) of the 6 non-empty rows
  e = make_batch(5)
  e["advantages"][:] = 0.0
  e["mask"][:] = 1.0
  both = {k: np.concatenate([d[k], e[k]], axis=0) for k in d}
  loss2, grad2, m2 = jax_value_and_grad(both, cfg)
  assert loss2 == pytest.approx(loss, rel=1e-6)
  np.testing.assert_allclose(grad2[: len(grad)], grad, rtol=1e-6, atol=1e-9)
  assert np.all(grad2[len(grad) :] == 0)
  assert m2["num_tokens"] == m["num_tokens"]
  assert m2["zero_signal_frac"] == pytest.approx((1 + 7) / (6 + 7))


# --------------------------------------------------------------------------------------------------------
# Sequence-level corrections: is_level, reject.
# --------------------------------------------------------------------------------------------------------

SEQ_CFGS = {
    "seq": dict(is_level="sequence"),
    "seq-uncapped": dict(is_level="sequence", seq_tis_cap=float("inf")),
    "seq-lennorm": dict(is_level="sequence", seq_tis_cap=2.0, length_norm=True),
    "seq-noclip-x_len": dict(is_level="sequence", clip=False, normalizer="responses_x_len"),
    "none": dict(is_level="none"),
    "tok-reject-token": dict(reject="token"),
    "tok-reject-seq": dict(reject="sequence", reject_low=0.2, reject_high=5.0),
    "tok-reject-geo": dict(reject="geometric", reject_low=0.8, reject_high=1.25),
    "seq-reject-geo": dict(
        is_level="sequence", reject="geometric", reject_low=0.8, reject_high=1.2
    ),
    "none-reject-geo-lennorm": dict(is_level="none", reject="geometric", length_norm=True),
    "whole-reject-token": dict(tis_mode="whole", reject="token", reject_low=0.0, reject_high=1.5),
    "noclip-reject-seq": dict(clip=False, reject="sequence", reject_low=0.1, reject_high=3.0),
}


@pytest.mark.parametrize("knobs", list(SEQ_CFGS.values()), ids=list(SEQ_CFGS))
def test_sequence_corrections_value_and_grad(knobs):
  """Every is_level x reject combination against the float64 loop reference: value, gradient (finite
  differences and hand-derived), padding rows and varied lengths (make_batch), the clip mask."""
  cfg = L.LossConfig(**knobs)
  for seed in (0, 1, 2):
    d = make_batch(seed)
    loss, grad, metrics = jax_value_and_grad(d, cfg)
    lp0 = d["logp"].copy()
    assert_close(loss, ref_minirl(lp0, d, cfg), what="value")
    fd = finite_diff(lambda lp: ref_minirl(lp, d, cfg, lp_sg=lp0), lp0, d["mask"])
    assert_close(grad, fd, rtol=1e-4, atol=1e-6, what="grad vs finite differences")
    assert_close(grad, ref_minirl_grad(d, cfg), rtol=1e-5, atol=1e-7, what="grad vs hand")
    for k, v in ref_metrics(d, cfg).items():
      assert_close(metrics[k], v, rtol=1e-5, atol=1e-6, what=k)
    if cfg.reject != "none":
      acc = np.array(
          [
              [ref_accepted(d, cfg, i, t) if d["mask"][i, t] else 1.0 for t in range(9)]
              for i in range(7)
          ]
      )
      rej = (1 - acc) * d["mask"]
      nonempty = d["mask"].sum(1) > 0
      whole = nonempty & (rej.sum(1) == d["mask"].sum(1))
      assert_close(metrics["reject_token_frac"], rej.sum() / d["mask"].sum(), what="tokens")
      assert_close(metrics["reject_response_frac"], whole.sum() / nonempty.sum(), what="responses")
    else:
      assert "reject_token_frac" not in metrics


def test_sequence_fixture_exercises_the_branches():
  """On these batches the sequence cap truncates some rows and not others, and every rejection mode
  rejects some but not all responses or tokens (guards against a vacuous reference comparison)."""
  fracs = {}
  for name in ("seq", "tok-reject-token", "tok-reject-seq", "tok-reject-geo", "seq-reject-geo"):
    cfg = L.LossConfig(**SEQ_CFGS[name])
    vals = [jax_value_and_grad(make_batch(s), cfg)[2] for s in (0, 1, 2)]
    key = "is_truncated_frac" if cfg.reject == "none" else "reject_token_frac"
    fracs[name] = [m[key] for m in vals]
    assert any(0 < f < 1 for f in fracs[name]), (name, fracs[name])
  assert all(
      f["reject_response_frac"] > 0
      for f in [jax_value_and_grad(make_batch(0), L.LossConfig(**SEQ_CFGS["tok-reject-geo"]))[2]]
  )


def test_sequence_level_differs_from_token_level():
  d = make_batch(0)
  _, g_tok, _ = jax_value_and_grad(d, L.LossConfig(tis_cap=float("inf")))
  _, g_seq, _ = jax_value_and_grad(d, L.LossConfig(is_level="sequence", seq_tis_cap=float("inf")))
  _, g_none, _ = jax_value_and_grad(d, L.LossConfig(is_level="none"))
  _, g_off, _ = jax_value_and_grad(d, L.LossConfig(train_infer_is=False))
  assert not np.allclose(g_tok, g_seq, rtol=1e-3)
  np.testing.assert_array_equal(g_none, g_off)  # is_level='none' is train_infer_is=False


def test_rejection_band_containing_everything_changes_nothing():
  d = make_batch(1)
  base = jax_value_and_grad(d, L.LossConfig())
  for mode in ("token", "sequence", "geometric"):
    cfg = L.LossConfig(reject=mode, reject_low=0.0, reject_high=float("inf"))
    loss, grad, m = jax_value_and_grad(d, cfg)
    assert loss == pytest.approx(base[0], rel=1e-6) and np.array_equal(grad, base[1]), mode
    assert m["reject_token_frac"] == 0 and m["reject_response_frac"] == 0


def test_sequence_ratio_extremes_are_finite():
  """A long response whose summed log(pi_old/mu) is +-150 (W overflows float32): the sequence weight is
  clamped to e^20 (reported), an uncapped one too, and the loss and gradient stay finite; rejection
  compares the unclamped logs, so the response is rejected."""
  d = make_batch(0)
  d["logp_mu"] = np.where(
      d["mask"] > 0, d["logp_old"] - 30.0 * np.sign(d["advantages"][:, None] + 0.5), 0.0
  )
  for cfg in (
      L.LossConfig(is_level="sequence", seq_tis_cap=float("inf")),
      L.LossConfig(is_level="sequence"),
      L.LossConfig(is_level="sequence", reject="sequence", reject_high=1e30),
  ):
    loss, grad, m = jax_value_and_grad(d, cfg)
    assert np.isfinite(loss) and np.all(np.isfinite(grad)), cfg
    assert all(np.isfinite(v) for v in m.values())
    assert m["log_ratio_clamped_frac"] > 0
  assert m["reject_response_frac"] > 0  # log W = 30 |y| > log 1e30 ~ 69 for |y| >= 3


@pytest.mark.parametrize(
    "knobs,field",
    [
        (dict(is_level="sequence", tis_cap=2.0), "tis_cap"),
        (dict(is_level="sequence", tis_mode="whole"), "tis_mode"),
        (dict(is_level="none", tis_cap=2.0), "tis_cap"),
        (dict(is_level="token", seq_tis_cap=2.0), "seq_tis_cap"),
        (dict(train_infer_is=False, is_level="sequence"), "is_level"),
        (dict(reject_low=0.1), "reject_low"),
        (dict(reject_high=3.0), "reject_high"),
        (dict(name="grpo", is_level="sequence"), "is_level"),
        (dict(name="gspo", reject="geometric"), "reject"),
        (dict(name="dapo", reject="token"), "reject"),
    ],
)
def test_sequence_knobs_that_would_be_ignored_are_errors(knobs, field):
  with pytest.raises(ValueError, match=f"rl.loss.{field}=.*ignored"):
    L.LossConfig(**knobs)


@pytest.mark.parametrize(
    "field,value",
    [
        ("is_level", "x"),
        ("reject", "mask"),
        ("seq_tis_cap", 0.5),
        ("reject_low", 1.5),
        ("reject_low", -0.1),
        ("reject_high", 0.9),
        ("seq_tis_cap", float("nan")),
    ],
)
def test_bad_sequence_knobs_name_the_field(field, value):
  knobs = {field: value}
  if field.startswith("reject_"):
    knobs["reject"] = "token"
  with pytest.raises(ValueError, match=f"{field}"):
    L.LossConfig.from_config(knobs)


@pytest.mark.parametrize(
    "knobs,reported",
    [
        (dict(), True),
        (dict(tis_mode="whole"), True),
        (dict(is_level="sequence"), True),
        (dict(tis_cap=float("inf")), False),
        (dict(is_level="sequence", seq_tis_cap=float("inf")), False),
        (dict(is_level="none"), False),
        (dict(train_infer_is=False), False),
        (dict(name="grpo"), False),
        (dict(name="dapo"), False),
        (dict(name="cispo"), False),
        (dict(name="gspo"), False),
    ],
)
def test_is_truncated_frac_only_where_something_is_truncated(knobs, reported):
  _, _, m = jax_value_and_grad(make_batch(0), L.LossConfig(**knobs))
  assert ("is_truncated_frac" in m) == reported
