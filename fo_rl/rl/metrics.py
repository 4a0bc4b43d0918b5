"""Diagnostics of the two gaps behind the first-order approximation (algorithms.md sections 2 and 6).

All functions are pure, jit-compatible and reduce over *masked* tokens only (mask [B, T] float, 1 on response
tokens, 0 on prompt / padding). Every reduction is in float32 and guarded so that an empty mask gives 0,
never NaN. Log-probability differences are zeroed outside the mask *before* exponentiation, so garbage
(even -inf) in padded positions cannot leak into a result.

Axis letters: B batch, T length, V vocab, L layers, K experts per token (top-k).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = [
    "masked_sum",
    "masked_mean",
    "masked_max",
    "masked_log_ratio",
    "train_infer_kl",
    "k3_kl",
    "frac_ratio_beyond",
    "sequence_log_ratio",
    "masked_quantiles",
    "train_infer_seq_quantiles",
    "token_entropy",
    "router_disagreement",
]


# --------------------------------------------------------------------------------------------------------
# Masked reductions (shared with fo_rl.rl.losses).
# --------------------------------------------------------------------------------------------------------


def masked_sum(x: jax.Array, mask: jax.Array) -> jax.Array:
  """sum_{b,t} mask * x in float32; x is sanitized where mask == 0 (so inf/NaN padding cannot leak)."""
  mask = mask.astype(jnp.float32)
  return jnp.sum(jnp.where(mask > 0, x.astype(jnp.float32), 0.0) * mask)


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
  """sum(mask * x) / max(sum(mask), 1): 0 (not NaN) for an empty mask."""
  return masked_sum(x, mask) / jnp.maximum(jnp.sum(mask.astype(jnp.float32)), 1.0)


def masked_max(x: jax.Array, mask: jax.Array) -> jax.Array:
  """max over tokens with mask > 0; 0 for an empty mask."""
  mask = mask > 0
  m = jnp.max(jnp.where(mask, x.astype(jnp.float32), -jnp.inf))
  return jnp.where(jnp.any(mask), m, 0.0)


def masked_log_ratio(logp_a: jax.Array, logp_b: jax.Array, mask: jax.Array) -> jax.Array:
  """[B, T] log(p_a / p_b) = logp_a - logp_b on masked tokens, exactly 0 elsewhere (safe to exp)."""
  diff = logp_a.astype(jnp.float32) - logp_b.astype(jnp.float32)
  return jnp.where(mask > 0, diff, 0.0)


# --------------------------------------------------------------------------------------------------------
# Training-inference discrepancy.
# --------------------------------------------------------------------------------------------------------


def train_infer_kl(logp_mu: jax.Array, logp_old: jax.Array, mask: jax.Array) -> jax.Array:
  """KL[mu_old || pi_old] estimated on tokens sampled from mu: mean_t (log mu(y_t) - log pi_old(y_t)).

  This is the paper's k1 estimator (algorithms.md section 6). It is unbiased but can be negative on a
  finite batch. logp_mu, logp_old, mask: [B, T].
  """
  return masked_mean(masked_log_ratio(logp_mu, logp_old, mask), mask)


def k3_kl(logp_mu: jax.Array, logp_old: jax.Array, mask: jax.Array) -> jax.Array:
  """k3 estimator of KL[mu_old || pi_old]: mean_t (rho - 1 - log rho), rho = pi_old / mu_old.

  E_{y~mu}[rho] = 1, so the expectation equals E_mu[-log rho] = KL[mu || pi_old]; every term is >= 0.
  """
  log_rho = masked_log_ratio(logp_old, logp_mu, mask)  # [B, T]
  return masked_mean(jnp.exp(log_rho) - 1.0 - log_rho, mask)


def frac_ratio_beyond(
    logp_a: jax.Array, logp_b: jax.Array, mask: jax.Array, tau: float = 2.0
) -> jax.Array:
  """F(tau): fraction of masked tokens with max(rho, 1/rho) > tau, rho = p_a / p_b (R3 paper; tau=2).

  max(rho, 1/rho) > tau  <=>  |log rho| > log tau, which avoids overflowing exp.
  """
  if not tau > 1.0:
    raise ValueError(f"frac_ratio_beyond: tau must be > 1, got {tau!r}")
  log_rho = masked_log_ratio(logp_a, logp_b, mask)  # [B, T]
  beyond = (jnp.abs(log_rho) > jnp.log(jnp.float32(tau))).astype(jnp.float32)
  return masked_mean(beyond, mask)


def sequence_log_ratio(logp_a: jax.Array, logp_b: jax.Array, mask: jax.Array) -> jax.Array:
  """[B] log prod_t (p_a / p_b)(y_t) = sum_t over each row's masked tokens (0 for an empty row)."""
  return jnp.sum(masked_log_ratio(logp_a, logp_b, mask), axis=1)


def masked_quantiles(x: jax.Array, valid: jax.Array, qs: tuple[float, ...]) -> jax.Array:
  """[len(qs)] quantiles (linear interpolation) of x [B] over the entries where valid [B] is True;
  zeros when none is."""
  x = jnp.where(valid, x.astype(jnp.float32), jnp.nan)
  q = jnp.nanquantile(x, jnp.asarray(qs, jnp.float32))
  return jnp.where(jnp.any(valid), q, 0.0)


SEQ_QUANTILES = (0.1, 0.5, 0.9)


def train_infer_seq_quantiles(
    logp_mu: jax.Array, logp_old: jax.Array, mask: jax.Array, qs: tuple[float, ...] = SEQ_QUANTILES
) -> dict[str, jax.Array]:
  """Quantiles over the non-empty responses of the sequence-level train-infer ratios (algorithms.md
  section 8), with w_t = pi_old/mu:

    train_infer_seq_log_ratio_pXX: log W = sum_t log w_t (in log space: W spans orders of magnitude and
      would overflow float32 on long responses);
    train_infer_geo_ratio_pXX: the geometric mean exp(mean_t log w_t), what reject='geometric' bands.
  """
  log_w = sequence_log_ratio(logp_old, logp_mu, mask)  # [B]
  n = jnp.sum(mask.astype(jnp.float32), axis=1)
  valid = n > 0
  geo = jnp.exp(log_w / jnp.maximum(n, 1.0))
  out = {}
  for name, x in (("seq_log_ratio", log_w), ("geo_ratio", geo)):
    for q, v in zip(qs, masked_quantiles(x, valid, qs)):
      out[f"train_infer_{name}_p{round(100 * q):02d}"] = v
  return out


# --------------------------------------------------------------------------------------------------------
# Policy entropy.
# --------------------------------------------------------------------------------------------------------


def token_entropy(logits: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean over masked tokens of H(pi(.|ctx)) = -sum_v p_v log p_v, in nats, from float32 log_softmax.

  logits: [B, T, V], mask: [B, T]. Vocabulary entries with p = 0 (logit -inf) contribute 0.
  """
  logq = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)  # [B, T, V]
  q = jnp.exp(logq)
  ent = -jnp.sum(jnp.where(q > 0, q * logq, 0.0), axis=-1)  # [B, T]
  return masked_mean(ent, mask)


# --------------------------------------------------------------------------------------------------------
# MoE routing.
# --------------------------------------------------------------------------------------------------------


def router_disagreement(
    routes_a: jax.Array, routes_b: jax.Array, token_mask: jax.Array
) -> dict[str, jax.Array]:
  """How often two routings (e.g. sampler vs trainer) pick different expert sets.

  routes_a, routes_b: int32 [B, T, L, K] top-k expert ids in the routes layout of `fo_rl.rl.rollouts`;
    dense (non-MoE) layers hold -1.
  token_mask: [B, T], 1 on the tokens to score.

  A (token, layer) pair is a *decision* when the layer is a MoE layer on either side (any id >= 0); pairs
  that are -1 on both sides (dense layers) are excluded. Two decisions agree when their top-k SETS are
  equal (order inside K does not matter: each set contains the other). A pair that is -1 on one side only is
  counted as a disagreement (it signals a layer-index shift, one of the silent failures of section 5).

  Returns:
    per_decision: share of decisions whose sets differ (R3 paper: ~10% for Qwen3-30B-A3B).
    per_token:    share of scored tokens (those with >= 1 decision) where at least one layer differs.
    num_decisions, num_tokens: the denominators (float32), for weighted aggregation across batches.
  """
  if routes_a.shape != routes_b.shape or routes_a.ndim != 4:
    raise ValueError(
        "router_disagreement: routes must both be [B, T, L, K], got "
        f"{routes_a.shape} and {routes_b.shape}"
    )
  if token_mask.shape != routes_a.shape[:2]:
    raise ValueError(
        f"router_disagreement: token_mask {token_mask.shape} must be [B, T] = {routes_a.shape[:2]}"
    )
  return disagreement_from_counts(router_disagreement_counts(routes_a, routes_b, token_mask))


def router_disagreement_counts(
    routes_a: jax.Array, routes_b: jax.Array, token_mask: jax.Array
) -> dict[str, jax.Array]:
  """The sums behind `router_disagreement` (float32 scalars: num_decisions, num_diff, num_tokens,
  num_tokens_diff): they add up over any split of the tokens (the packed old pass sums them per
  micro-batch)."""
  # Set equality as mutual inclusion: K x K comparisons reduced in one fusion. (Sorting both [B, T, L, K]
  # arrays materialized sorted copies in TPU's tiled layout, whose minor dim K = 8 is padded to 128: the
  # paper_n8 old pass's temporaries were 40.0 GB per chip with the sorts, 29.5 GB without.)
  eq = routes_a[..., :, None] == routes_b[..., None, :]  # [B, T, L, K, K]
  differs = ~(jnp.all(jnp.any(eq, axis=-1), axis=-1) & jnp.all(jnp.any(eq, axis=-2), axis=-1))
  is_moe = jnp.any(routes_a >= 0, axis=-1) | jnp.any(routes_b >= 0, axis=-1)  # [B, T, L]
  decision = is_moe & (token_mask[..., None] > 0)  # [B, T, L]
  f32 = lambda x: jnp.sum(x.astype(jnp.float32))  # noqa: E731
  return {
      "num_decisions": f32(decision),
      "num_diff": f32(differs & decision),
      "num_tokens": f32(jnp.any(decision, axis=-1)),  # tokens with >= 1 decision
      "num_tokens_diff": f32(jnp.any(differs & decision, axis=-1)),  # ... where a layer differs
  }


def disagreement_from_counts(c: dict[str, jax.Array]) -> dict[str, jax.Array]:
  """`router_disagreement`'s shares from `router_disagreement_counts`' sums."""
  return {
      "per_decision": c["num_diff"] / jnp.maximum(c["num_decisions"], 1.0),
      "per_token": c["num_tokens_diff"] / jnp.maximum(c["num_tokens"], 1.0),
      "num_decisions": c["num_decisions"],
      "num_tokens": c["num_tokens"],
  }
