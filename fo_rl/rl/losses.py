"""Policy losses: MiniRL (the default) and the variants the paper compares (algorithms.md sections 3-4).

Every loss is a pure, jit-compatible function

    loss_fn(batch: LossInputs, cfg: LossConfig) -> (scalar_loss, metrics: dict[str, jax.Array])

registered by name in `LOSSES`. The loss is *minimized*: it is the negative of the paper's objective J.
`cfg` is a frozen (hashable) dataclass, so it can be closed over or passed as a static jit argument.

Gradient discipline: only log pi_theta (batch.logp) carries gradient. Every IS weight the formulas put
under sg[.] is wrapped in jax.lax.stop_gradient; logp_old / logp_mu are data. (GRPO, DAPO and GSPO
differentiate *through* the ratio r = pi_theta / pi_old, which is a function of log pi_theta, as their
papers define them.)

Numerics: all arithmetic is float32. Log differences are zeroed outside the mask before exp, and masked-out
logp values are replaced by 0, so padding (even -inf) never produces NaN in the value or the gradient. A
fully-masked row contributes exactly zero; an all-masked batch gives loss 0. Every log ratio is clamped to
[-LOG_RATIO_BOUND, LOG_RATIO_BOUND] = [-20, 20] before exp (as verl does for log(pi/pi_old) and for its
rollout-correction ratios): exp(20) ~ 4.9e8 stays finite, where log r > 88 would overflow float32 to inf
and turn an A = 0 token into inf * 0 = NaN. Ratios inside [e^-20, e^20] are unchanged; the share of
tokens whose ratio was clamped is reported (`log_ratio_clamped_frac`), and a clamped ratio differentiated
through (GRPO, DAPO, GSPO) gets zero gradient, like torch.clamp in verl.

Axis letters: B batch (responses), T length.

Choices the paper leaves **open** (each is a LossConfig field, documented at the field):
  * tis_mode: 'discrepancy' caps only pi_old/mu and multiplies by the staleness ratio r (default reading of
    section 3); 'whole' caps pi_theta/mu. Both coincide on-policy (r = 1).
  * normalizer: the constant MiniRL divides the token sum by: 'responses' (B) or 'responses_x_len'
    (B * T, T the response length budget: see `response_budget`).
  * is_level / reject (beyond the paper, algorithms.md section 8): the level of the train-infer IS weight
    (token: the paper's; sequence; none) and the rejection of samples whose pi_old/mu drifted (none: the
    paper's; token; sequence; geometric). See `minirl_loss`.
  * cispo_eps_high: MiniMax-M1 tuned it without publishing a value; 0.28 here (the DAPO clip-higher value,
    also Trinity-RFT's CISPO default). The CISPO lower bound is absent (eps_low ~ inf, as in MiniMax-M1).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from fo_rl.common import from_mapping
from fo_rl.rl.metrics import masked_log_ratio, masked_max, masked_mean

__all__ = [
    "LossInputs",
    "LossConfig",
    "LossFn",
    "LOSSES",
    "register",
    "get_loss",
    "policy_loss",
    "loss_denominator",
    "TIS_MODES",
    "IS_LEVELS",
    "REJECT_MODES",
    "NORMALIZERS",
    "response_budget",
    "LOG_RATIO_BOUND",
]

sg = jax.lax.stop_gradient

TIS_MODES = ("discrepancy", "whole")
IS_LEVELS = ("token", "sequence", "none")
REJECT_MODES = ("none", "token", "sequence", "geometric")
LOG_RATIO_BOUND = 20.0  # |log ratio| clamp before exp (verl's bound): see the module docstring
NORMALIZERS = ("responses", "responses_x_len")


# --------------------------------------------------------------------------------------------------------
# Inputs and config.
# --------------------------------------------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LossInputs:
  """One mini-batch of sampled responses, aligned token by token (a jax pytree).

  logp:       [B, T] log pi_theta(y_t | .) of the sampled tokens, current params (carries gradient).
  logp_old:   [B, T] log pi_old(y_t | .): the trainer's recompute before any update (data).
  logp_mu:    [B, T] log mu_old(y_t | .): the sampler's logprob of the token it sampled (data).
  advantages: [B]    one advantage per response, broadcast over its tokens.
  mask:       [B, T] float, 1 on response tokens, 0 on prompt and padding.

  The arrays may hold prompt columns too (the trainer passes its [B, P + T] layout, responses starting at
  column P): the loss reads the response length budget from the mask (`response_budget`), not from the
  arrays' width.
  """

  logp: jax.Array
  logp_old: jax.Array
  logp_mu: jax.Array
  advantages: jax.Array
  mask: jax.Array

  def __post_init__(self):
    shapes = {
        f.name: getattr(getattr(self, f.name), "shape", None) for f in dataclasses.fields(self)
    }
    # Pytree transformations may build instances with non-array leaves (None, sentinels): skip those.
    if not all(isinstance(s, tuple) for s in shapes.values()):
      return
    bt = shapes["logp"]
    if len(bt) != 2 or any(shapes[k] != bt for k in ("logp_old", "logp_mu", "mask")):
      raise ValueError(
          f"LossInputs: logp, logp_old, logp_mu, mask must share one [B, T] shape: {shapes}"
      )
    if shapes["advantages"] != bt[:1]:
      raise ValueError(f"LossInputs: advantages must be [B] = {bt[:1]}, got {shapes['advantages']}")


def _check_real(name: str, value: Any) -> float:
  if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
    raise ValueError(f"LossConfig.{name} must be a real number, got {value!r}")
  return float(value)


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """Loss hyper-parameters; defaults are the paper's (algorithms.md sections 3-4).

  Knobs that only MiniRL reads: clip, train_infer_is, length_norm, tis_mode, normalizer, tis_cap,
  is_level, seq_tis_cap, reject, reject_low, reject_high.
  The variants use their own fixed normalizers and no IS weight vs mu (table of section 4); each reads
  only its own clip bounds (`LOSS_FIELDS`). A field set to a non-default value that the chosen loss
  would ignore is a ValueError naming it (`ignored_fields`), never a silent no-op; so is a MiniRL knob
  made moot by another (normalizer under length_norm=True; tis_mode, tis_cap, is_level, seq_tis_cap
  under train_infer_is=False; eps_low, eps_high under clip=False; tis_mode, tis_cap under
  is_level='sequence' or 'none'; seq_tis_cap under is_level='token'; the band under reject='none').
  """

  name: str = "minirl"
  # TIS cap C on the train-inference IS weight (paper: 5; peers use 2). Must be >= 1: a cap below 1 would
  # truncate exactly on-policy tokens (ratio 1) and break the exactness of the surrogate at pi = mu.
  tis_cap: float = 5.0
  # MiniRL / GRPO clip, as a gradient mask on r = pi_theta / pi_old (paper: 0.2, 0.27; no dual clip).
  eps_low: float = 0.2
  eps_high: float = 0.27
  clip: bool = True  # MiniRL: apply the staleness mask M_t.
  train_infer_is: bool = True  # MiniRL: multiply by the (capped) pi_old / mu weight.
  # MiniRL: 1/|y_i| per response, then mean over the B responses (GRPO's normalizer). When True it
  # replaces `normalizer` (dividing per-response means by T as well would only rescale the step).
  length_norm: bool = False
  # **open**: 'discrepancy' -> w = min(pi_old/mu, C) * r ; 'whole' -> w = min(pi_theta/mu, C).
  tis_mode: str = "discrepancy"
  # **open**: MiniRL's constant: 'responses' -> / B ; 'responses_x_len' -> / (B * T). B is the mini-batch
  # size (padding rows included) and T the response length budget (`response_budget`: the columns from
  # the first response column to the end), so the divisor depends on the layout only, never on the
  # sampled lengths, and not on the prompt bucket.
  normalizer: str = "responses"
  # MiniRL (beyond the paper, algorithms.md section 8), with w_t = pi_old/mu and W = prod_t w_t over a
  # response: the level of the train-infer IS weight. 'token' (the paper): min(w_t, tis_cap) on token t;
  # 'sequence': min(W, seq_tis_cap) on every token of the response (untruncated, its gradient is the
  # exact gradient of J_seq, tests/test_first_order.py); 'none': no weight (= train_infer_is=False).
  is_level: str = "token"
  # Cap C_seq of the sequence-level weight (is_level='sequence'); >= 1, inf: untruncated. verl's
  # rollout correction suggests 2-10 for sequence weights.
  seq_tis_cap: float = 5.0
  # MiniRL: reject (mask out of the loss, no reweighting) what drifted: 'none' (the paper); 'token': a
  # token whose w_t is outside [reject_low, reject_high]; 'sequence': a whole response whose W is
  # outside; 'geometric': a whole response whose geometric mean exp(mean_t log w_t) is outside
  # (SkyRL's default; verl suggests a band like [0.999, 1.001] there). The normalizer is unchanged:
  # a rejected token adds 0 to MiniRL's sum, the constant it is divided by stays the same.
  reject: str = "none"
  reject_low: float = 0.5
  reject_high: float = 2.0
  gspo_eps_low: float = 3e-4  # GSPO sequence-ratio clip (GSPO paper).
  gspo_eps_high: float = 4e-4
  dapo_eps_high: float = 0.28  # DAPO clip-higher; DAPO's low side uses eps_low.
  # **open**: CISPO upper bound on sg[r]; MiniMax-M1 tuned it without publishing the value.
  cispo_eps_high: float = 0.28

  def __post_init__(self):
    if not isinstance(self.name, str) or self.name not in LOSSES:
      raise ValueError(f"LossConfig.name must be one of {sorted(LOSSES)}, got {self.name!r}")
    for name in ("clip", "train_infer_is", "length_norm"):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f"LossConfig.{name} must be a bool, got {getattr(self, name)!r}")
    if self.tis_mode not in TIS_MODES:
      raise ValueError(f"LossConfig.tis_mode must be one of {TIS_MODES}, got {self.tis_mode!r}")
    if self.normalizer not in NORMALIZERS:
      raise ValueError(
          f"LossConfig.normalizer must be one of {NORMALIZERS}, got {self.normalizer!r}"
      )
    if self.is_level not in IS_LEVELS:
      raise ValueError(f"rl.loss.is_level={self.is_level!r}: must be one of {IS_LEVELS}")
    if self.reject not in REJECT_MODES:
      raise ValueError(f"rl.loss.reject={self.reject!r}: must be one of {REJECT_MODES}")
    seq_cap = _check_real("seq_tis_cap", self.seq_tis_cap)
    if not seq_cap >= 1.0:
      raise ValueError(f"rl.loss.seq_tis_cap={seq_cap!r}: must be >= 1 (inf: no truncation)")
    object.__setattr__(self, "seq_tis_cap", seq_cap)
    lo, hi = _check_real("reject_low", self.reject_low), _check_real(
        "reject_high", self.reject_high
    )
    if not 0.0 <= lo <= 1.0:
      raise ValueError(f"rl.loss.reject_low={lo!r}: must lie in [0, 1] (ratio 1 is never rejected)")
    if not (hi >= 1.0 and hi > lo):
      raise ValueError(
          f"rl.loss.reject_high={hi!r}: must be >= 1 (ratio 1 is never rejected) and > reject_low"
      )
    object.__setattr__(self, "reject_low", lo)
    object.__setattr__(self, "reject_high", hi)
    cap = _check_real("tis_cap", self.tis_cap)
    if not cap >= 1.0:
      raise ValueError(f"LossConfig.tis_cap must be >= 1 (inf disables truncation), got {cap!r}")
    object.__setattr__(self, "tis_cap", cap)
    for name in ("eps_low", "gspo_eps_low"):
      v = _check_real(name, getattr(self, name))
      if not 0.0 <= v <= 1.0:
        raise ValueError(f"LossConfig.{name} must lie in [0, 1], got {v!r}")
      object.__setattr__(self, name, v)
    for name in ("eps_high", "gspo_eps_high", "dapo_eps_high", "cispo_eps_high"):
      v = _check_real(name, getattr(self, name))
      if not v >= 0.0:
        raise ValueError(f"LossConfig.{name} must be >= 0, got {v!r}")
      object.__setattr__(self, name, v)
    ignored = ignored_fields(self)
    if ignored:
      field, why = next(iter(ignored.items()))
      default = _DEFAULTS[field]
      raise ValueError(
          f"rl.loss.{field}={getattr(self, field)!r}: ignored, {why}; leave it at its default "
          f"{default!r}"
      )

  @classmethod
  def from_config(cls, config: Mapping[str, Any] | Any, where: str = "rl.loss") -> "LossConfig":
    """Build from an ml_collections ConfigDict section (or any mapping); missing keys take defaults.

    Raises ValueError naming `where` and an unknown key, or the field whose value is invalid.
    """
    return from_mapping(cls, config, where)


_DEFAULTS = {f.name: f.default for f in dataclasses.fields(LossConfig)}

# --------------------------------------------------------------------------------------------------------
# Registry.
# --------------------------------------------------------------------------------------------------------

LossFn = Callable[[LossInputs, LossConfig], tuple[jax.Array, dict[str, jax.Array]]]
LOSSES: dict[str, LossFn] = {}
# loss name -> the LossConfig fields it reads (None: all of them, no check).
LOSS_FIELDS: dict[str, tuple[str, ...] | None] = {}


def register(name: str, fields: tuple[str, ...] | None = None) -> Callable[[LossFn], LossFn]:
  """Decorator: add a loss to LOSSES under `name` (names are unique). `fields`: the LossConfig fields it
  reads; a non-default value of any other field is then a config error (None: no check)."""

  def deco(fn: LossFn) -> LossFn:
    if name in LOSSES:
      raise ValueError(f"loss {name!r} is already registered")
    LOSSES[name] = fn
    LOSS_FIELDS[name] = None if fields is None else tuple(fields)
    return fn

  return deco


def ignored_fields(cfg: LossConfig) -> dict[str, str]:
  """{field: why} for every field `cfg` sets to a non-default value that its loss would ignore."""
  why: dict[str, str] = {}
  reads = LOSS_FIELDS.get(cfg.name)
  if reads is not None:
    for f in dataclasses.fields(cfg):
      if f.name != "name" and f.name not in reads:
        why[f.name] = f"loss {cfg.name!r} reads only {', '.join(reads) or 'no field'}"
  if cfg.name == "minirl":
    if cfg.length_norm:
      why.setdefault("normalizer", "length_norm=True replaces the normalizer")
    if not cfg.train_infer_is:
      for f in ("tis_mode", "tis_cap", "is_level", "seq_tis_cap"):
        why.setdefault(f, "train_infer_is=False drops the train-infer IS weight")
    if cfg.is_level == "none":
      for f in ("tis_mode", "tis_cap", "seq_tis_cap"):
        why.setdefault(f, "is_level='none' drops the train-infer IS weight")
    if cfg.is_level == "sequence":
      for f in ("tis_mode", "tis_cap"):
        why.setdefault(f, "is_level='sequence' uses seq_tis_cap on the sequence ratio")
    if cfg.is_level == "token":
      why.setdefault("seq_tis_cap", "is_level='token' truncates each token by tis_cap")
    if cfg.reject == "none":
      for f in ("reject_low", "reject_high"):
        why.setdefault(f, "reject='none' rejects nothing")
    if not cfg.clip:
      for f in ("eps_low", "eps_high"):
        why.setdefault(f, "clip=False drops the clip mask")
  return {f: w for f, w in why.items() if getattr(cfg, f) != _DEFAULTS[f]}


def get_loss(name: str) -> LossFn:
  """The loss registered as `name`; ValueError listing the known names otherwise."""
  try:
    return LOSSES[name]
  except KeyError:
    raise ValueError(f"Unknown loss {name!r}; known losses: {sorted(LOSSES)}") from None


def policy_loss(batch: LossInputs, cfg: LossConfig) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Dispatch on cfg.name."""
  return get_loss(cfg.name)(batch, cfg)


def loss_denominator(batch: LossInputs, cfg: LossConfig) -> jax.Array:
  """[] float32: what the loss `cfg.name` divides by on `batch`.

  Every built-in loss is L = -(sum over rows of a per-row term) / denominator, where the denominator
  depends on the masks and advantages only, never on log-probs: B (MiniRL 'responses' and length_norm,
  GRPO, GSPO), B * response_budget (MiniRL 'responses_x_len'), the kept tokens (DAPO) or all tokens
  (CISPO). So for any split of a mini-batch into row subsets i, sum_i L_i * den_i / den = L exactly: the
  trainer's gradient accumulation (trainer.micro_batches) relies on it. A loss registered elsewhere has
  no known denominator: a ValueError (micro-batching it would silently change its normalization).
  """
  b = _f32(batch)
  B = jnp.float32(b.mask.shape[0])
  if cfg.name == "minirl":
    if cfg.length_norm or cfg.normalizer == "responses":
      return B
    return B * response_budget(b.mask)
  if cfg.name in ("grpo", "gspo"):
    return B
  if cfg.name == "dapo":
    return jnp.maximum(jnp.sum(b.mask * (b.advantages != 0)[:, None]), 1.0)
  if cfg.name == "cispo":
    return jnp.maximum(jnp.sum(b.mask), 1.0)
  raise ValueError(
      f"rl.loss.name={cfg.name!r}: its denominator is unknown to loss_denominator, so "
      "trainer.micro_batches > 1 cannot split it exactly; use trainer.micro_batches=1"
  )


# --------------------------------------------------------------------------------------------------------
# Shared pieces.
# --------------------------------------------------------------------------------------------------------


def _f32(batch: LossInputs) -> LossInputs:
  return jax.tree.map(lambda x: jnp.asarray(x).astype(jnp.float32), batch)


def _safe_logp(batch: LossInputs) -> jax.Array:
  """[B, T] logp with masked-out entries replaced by 0 (zero gradient there, no -inf * 0 = NaN)."""
  return jnp.where(batch.mask > 0, batch.logp, 0.0)


def _lengths(mask: jax.Array) -> jax.Array:
  """[B] response lengths |y_i| = sum_t mask."""
  return jnp.sum(mask, axis=1)


def _log_ratio(logp_a: jax.Array, logp_b: jax.Array, mask: jax.Array) -> jax.Array:
  """[B, T] log(p_a / p_b) on masked tokens (0 elsewhere), clamped to [-LOG_RATIO_BOUND, LOG_RATIO_BOUND]."""
  return jnp.clip(masked_log_ratio(logp_a, logp_b, mask), -LOG_RATIO_BOUND, LOG_RATIO_BOUND)


def _clamped(logp_a: jax.Array, logp_b: jax.Array, mask: jax.Array) -> jax.Array:
  """[B, T] bool: masked tokens whose |log(p_a / p_b)| exceeds LOG_RATIO_BOUND (clamped by `_log_ratio`)."""
  return (mask > 0) & (jnp.abs(masked_log_ratio(logp_a, logp_b, mask)) > LOG_RATIO_BOUND)


def response_budget(mask: jax.Array) -> jax.Array:
  """[] float32 T: the response length budget of a [B, W] mask, W minus the first column that holds a
  response token in any row (W for an all-empty mask).

  In the trainer's layout ([prompt P | response T], prompts left-padded, responses right-padded) every
  row's first response token sits at column P, so this is exactly T, whatever the prompt bucket P; on
  response-only arrays ([B, T], responses from column 0) it is T as well.
  """
  W = mask.shape[1]
  has_response = jnp.any(mask > 0, axis=0)  # [W]
  first = jnp.min(jnp.where(has_response, jnp.arange(W), W))
  return jnp.where(first < W, W - first, W).astype(jnp.float32)


def _per_response_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
  """[B] (1/|y_i|) sum_t mask * x; 0 for an empty row."""
  return jnp.sum(x * mask, axis=1) / jnp.maximum(_lengths(mask), 1.0)


def _clip_sides(ratio: jax.Array, adv: jax.Array, eps_low: float, eps_high: float):
  """Where the PPO clip zeroes the gradient: (A > 0 and ratio > 1+eps_high), (A < 0 and ratio < 1-eps_low).

  ratio, adv broadcast against each other; returns two bool arrays of the broadcast shape.
  """
  high = (adv > 0) & (ratio > 1.0 + eps_high)
  low = (adv < 0) & (ratio < 1.0 - eps_low)
  return high, low


def _ppo_objective(ratio: jax.Array, adv: jax.Array, eps_low: float, eps_high: float) -> jax.Array:
  """min(ratio * A, clip(ratio, 1-eps_low, 1+eps_high) * A), elementwise (gradient flows via ratio)."""
  return jnp.minimum(ratio * adv, jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high) * adv)


def _diagnostics(
    batch: LossInputs,
    cfg: LossConfig,
    *,
    weight: jax.Array,
    clip_high: jax.Array,
    clip_low: jax.Array,
    truncated: jax.Array | None = None,
    extra_clamped: jax.Array | None = None,
) -> dict[str, jax.Array]:
  """Metrics common to all losses, over masked tokens (float32, all stop-gradient).

  weight:    [B, T] the per-token weight the loss puts on A * grad log pi_theta before the clip mask.
  clip_*:    [B, T] bool, tokens whose gradient the clip removes (or, for CISPO, whose weight it caps).
  truncated: [B, T] bool, tokens whose IS weight the cap truncated; None where nothing is truncated (no
             weight vs mu, or an infinite cap): then `is_truncated_frac` is not reported.
  extra_clamped: [B, T] bool, more tokens whose log ratio was clamped (beyond log r, log pi_old/mu).
  """
  m = batch.mask
  log_r = sg(_log_ratio(batch.logp, batch.logp_old, m))
  r = jnp.exp(log_r)  # staleness ratio pi_theta / pi_old
  d = jnp.exp(_log_ratio(batch.logp_old, batch.logp_mu, m))  # discrepancy pi_old / mu
  weight = sg(weight)
  clamped = _clamped(sg(batch.logp), batch.logp_old, m) | _clamped(batch.logp_old, batch.logp_mu, m)
  if cfg.name == "minirl" and cfg.tis_mode == "whole":
    clamped = clamped | _clamped(sg(batch.logp), batch.logp_mu, m)
  if extra_clamped is not None:
    clamped = clamped | extra_clamped
  out = {
      "log_ratio_clamped_frac": masked_mean(clamped.astype(jnp.float32), m),
      "is_weight_mean": masked_mean(weight, m),
      "is_weight_max": masked_max(weight, m),
      "clip_frac_high": masked_mean(clip_high.astype(jnp.float32), m),
      "clip_frac_low": masked_mean(clip_low.astype(jnp.float32), m),
      "ratio_mean": masked_mean(r, m),
      "ratio_max": masked_max(r, m),
      "train_infer_ratio_mean": masked_mean(d, m),
      "train_infer_ratio_max": masked_max(d, m),
      "num_tokens": jnp.sum(m),
  }
  if truncated is not None:
    out["is_truncated_frac"] = masked_mean(truncated.astype(jnp.float32), m)
  return out


# --------------------------------------------------------------------------------------------------------
# Losses.
# --------------------------------------------------------------------------------------------------------


def _seq_log_ratio(logp_a: jax.Array, logp_b: jax.Array, mask: jax.Array) -> jax.Array:
  """[B] log prod_t (p_a / p_b)(y_t) over each response's tokens (unclamped; 0 for an empty row)."""
  return jnp.sum(masked_log_ratio(logp_a, logp_b, mask), axis=1)


def _minirl_weight(
    batch: LossInputs, cfg: LossConfig, r: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
  """([B, T] w_t under sg, [B, T] bool truncated or None, [B, T] bool clamped or None) for MiniRL, given
  r = sg[pi_theta / pi_old] [B, T]. With d_t = pi_old/mu and W = prod_t d_t over the response:

  is_level='token', tis_mode='discrepancy':  w = min(d_t, C) * r   (algorithms.md section 3)
  is_level='token', tis_mode='whole':        w = min(pi_theta/mu, C)
  is_level='sequence':                       w = min(W, C_seq) * r  (W clamped to e^+-20, in log space)
  is_level='none' or not train_infer_is:     w = r  (the pi_old/mu factor is dropped, staleness kept)
  `truncated` is None where nothing can be truncated (no weight vs mu, or an infinite cap); `clamped`
  marks the tokens of responses whose |log W| exceeded the bound (sequence level only).
  """
  m = batch.mask
  d = jnp.exp(_log_ratio(batch.logp_old, batch.logp_mu, m))
  if not cfg.train_infer_is or cfg.is_level == "none":
    return sg(r), None, None
  if cfg.is_level == "sequence":
    log_w = _seq_log_ratio(batch.logp_old, batch.logp_mu, m)  # [B]
    w_seq = jnp.exp(jnp.clip(log_w, -LOG_RATIO_BOUND, LOG_RATIO_BOUND))
    tok = lambda x: jnp.broadcast_to(x[:, None], m.shape) & (m > 0)  # noqa: E731  [B] -> [B, T]
    w = sg(jnp.minimum(w_seq, cfg.seq_tis_cap)[:, None] * r)
    truncated = tok(w_seq > cfg.seq_tis_cap) if math.isfinite(cfg.seq_tis_cap) else None
    return w, truncated, tok(jnp.abs(log_w) > LOG_RATIO_BOUND)
  finite = math.isfinite(cfg.tis_cap)
  if cfg.tis_mode == "discrepancy":
    return sg(jnp.minimum(d, cfg.tis_cap) * r), (d > cfg.tis_cap) if finite else None, None
  whole = jnp.exp(sg(_log_ratio(batch.logp, batch.logp_mu, m)))
  return sg(jnp.minimum(whole, cfg.tis_cap)), (whole > cfg.tis_cap) if finite else None, None


def _reject_keep(batch: LossInputs, cfg: LossConfig) -> jax.Array:
  """[B, T] float: 0 on the tokens `cfg.reject` masks out, 1 elsewhere. Compared in log space, on the
  unclamped log ratios: log(pi_old/mu) per token ('token'), its sum over the response ('sequence') or
  its mean over the response ('geometric') must lie in [log reject_low, log reject_high]."""
  m = batch.mask
  log_d = masked_log_ratio(batch.logp_old, batch.logp_mu, m)  # [B, T]
  if cfg.reject == "token":
    x = log_d
  elif cfg.reject == "sequence":
    x = jnp.sum(log_d, axis=1, keepdims=True)
  else:  # geometric
    x = jnp.sum(log_d, axis=1, keepdims=True) / jnp.maximum(_lengths(m), 1.0)[:, None]
  lo = math.log(cfg.reject_low) if cfg.reject_low > 0 else -math.inf
  hi = math.log(cfg.reject_high)
  return jnp.broadcast_to((x >= lo) & (x <= hi), m.shape).astype(jnp.float32)


MINIRL_FIELDS = (
    "tis_cap",
    "eps_low",
    "eps_high",
    "clip",
    "train_infer_is",
    "length_norm",
    "tis_mode",
    "normalizer",
    "is_level",
    "seq_tis_cap",
    "reject",
    "reject_low",
    "reject_high",
)


@register("minirl", MINIRL_FIELDS)
def minirl_loss(batch: LossInputs, cfg: LossConfig) -> tuple[jax.Array, dict[str, jax.Array]]:
  """MiniRL (algorithms.md section 3), as a loss to minimize:

      L = -(1/N) sum_{i,t} mask_it * K_it * M_it * sg[w_it] * A_i * log pi_theta(y_it)

  M_it = 0 iff (A_i > 0 and r_it > 1+eps_high) or (A_i < 0 and r_it < 1-eps_low)   [clip=True]
  w_it: the IS weight of `is_level` (`_minirl_weight`); K_it = 0 on the tokens `reject` masks out
  (`_reject_keep`; 1 everywhere under reject='none').
  N = B ('responses') or B*T ('responses_x_len', T = `response_budget(mask)`); length_norm=True replaces
  1/N by (1/B) * 1/|y_i|.
  Its gradient equals that of -sg[min(pi_old/mu, C)] * min(r A, clip(r) A) (the PPO-shaped form); the
  value logged is the one of the formula above.
  """
  b = _f32(batch)
  adv = b.advantages[:, None]  # [B, 1]
  r = jnp.exp(sg(_log_ratio(b.logp, b.logp_old, b.mask)))  # [B, T] staleness ratio
  w, truncated, seq_clamped = _minirl_weight(b, cfg, r)  # [B, T]
  if cfg.clip:
    high, low = _clip_sides(r, adv, cfg.eps_low, cfg.eps_high)
  else:
    high = low = jnp.zeros(r.shape, bool)
  keep = jnp.where(high | low, 0.0, 1.0)  # M_t
  if cfg.reject != "none":
    accepted = _reject_keep(b, cfg)  # K_t
    keep = keep * accepted
  per_token = sg(keep * w) * adv * _safe_logp(b) * b.mask  # [B, T]
  B = b.mask.shape[0]
  if cfg.length_norm:
    loss = -jnp.sum(_per_response_mean(per_token, b.mask)) / B
  elif cfg.normalizer == "responses":
    loss = -jnp.sum(per_token) / B
  else:
    loss = -jnp.sum(per_token) / (B * response_budget(b.mask))
  metrics = _diagnostics(
      b, cfg, weight=w, clip_high=high, clip_low=low, truncated=truncated, extra_clamped=seq_clamped
  )
  if cfg.reject != "none":
    metrics.update(_reject_metrics(accepted, b.mask))
  return loss, metrics


def _reject_metrics(accepted: jax.Array, mask: jax.Array) -> dict[str, jax.Array]:
  """reject_token_frac: the share of response tokens rejected; reject_response_frac: the share of
  non-empty responses all of whose tokens were rejected."""
  rejected = (1.0 - accepted) * mask  # [B, T]
  nonempty = _lengths(mask) > 0
  whole = nonempty & (jnp.sum(rejected, axis=1) == _lengths(mask))
  return {
      "reject_token_frac": jnp.sum(rejected) / jnp.maximum(jnp.sum(mask), 1.0),
      "reject_response_frac": jnp.sum(whole.astype(jnp.float32))
      / jnp.maximum(jnp.sum(nonempty.astype(jnp.float32)), 1.0),
  }


@register("grpo", ("eps_low", "eps_high"))
def grpo_loss(batch: LossInputs, cfg: LossConfig) -> tuple[jax.Array, dict[str, jax.Array]]:
  """GRPO (no KL term): L = -(1/B) sum_i (1/|y_i|) sum_t min(r_it A_i, clip(r_it, 1-eps_low, 1+eps_high) A_i).

  r = pi_theta / pi_old (differentiated), no IS weight vs mu; A is expected to be (R - mean)/std.
  1/G * 1/|y_i| is read as the mean over the B responses of per-response token means.
  """
  b = _f32(batch)
  adv = b.advantages[:, None]
  r = jnp.exp(_log_ratio(b.logp, b.logp_old, b.mask))  # [B, T], carries gradient
  obj = _ppo_objective(r, adv, cfg.eps_low, cfg.eps_high)
  loss = -jnp.sum(_per_response_mean(obj, b.mask)) / b.mask.shape[0]
  high, low = _clip_sides(sg(r), adv, cfg.eps_low, cfg.eps_high)
  return loss, _diagnostics(b, cfg, weight=r, clip_high=high, clip_low=low)


@register("dapo", ("eps_low", "dapo_eps_high"))
def dapo_loss(batch: LossInputs, cfg: LossConfig) -> tuple[jax.Array, dict[str, jax.Array]]:
  """DAPO token-level loss: L = -(1/sum_{i kept} |y_i|) sum_{i kept, t} min(r A, clip(r, 1-eps_low,
  1+dapo_eps_high) A).

  No KL term, no IS vs mu. DAPO's dynamic sampling drops the groups whose rewards are all equal (no
  signal) from the batch, and so from the token divisor. Here it is a mask inside the loss: a response
  is kept iff A_i != 0. Every advantage mode gives exactly A = 0 to every member of an all-equal group;
  with {0, 1} rewards (the tasks here) a group with signal has no A = 0 member, so the kept responses are
  exactly those of the groups with signal. (With graded rewards a response whose reward equals its
  group's mean is dropped too; it contributes no gradient either way, only divisor tokens.) What is NOT
  implemented is DAPO's oversample-and-refill: the mini-batch shrinks instead of being refilled with
  new groups. The diagnostics cover the kept tokens; `zero_signal_frac` is the share of non-empty
  responses dropped.
  """
  b = _f32(batch)
  adv = b.advantages[:, None]
  nonempty = _lengths(b.mask) > 0  # [B]
  signal = b.advantages != 0  # [B]
  b = dataclasses.replace(b, mask=b.mask * signal[:, None].astype(jnp.float32))
  r = jnp.exp(_log_ratio(b.logp, b.logp_old, b.mask))
  obj = _ppo_objective(r, adv, cfg.eps_low, cfg.dapo_eps_high)
  loss = -jnp.sum(obj * b.mask) / jnp.maximum(jnp.sum(b.mask), 1.0)
  high, low = _clip_sides(sg(r), adv, cfg.eps_low, cfg.dapo_eps_high)
  metrics = _diagnostics(b, cfg, weight=r, clip_high=high, clip_low=low)
  dropped = jnp.sum((nonempty & ~signal).astype(jnp.float32))
  metrics["zero_signal_frac"] = dropped / jnp.maximum(jnp.sum(nonempty.astype(jnp.float32)), 1.0)
  return loss, metrics


@register("cispo", ("cispo_eps_high",))
def cispo_loss(batch: LossInputs, cfg: LossConfig) -> tuple[jax.Array, dict[str, jax.Array]]:
  """CISPO (MiniMax-M1): L = -(1/sum_i |y_i|) sum_{i,t} sg[min(r_it, 1+cispo_eps_high)] A_i log pi_theta.

  No token is masked: the IS weight itself is clipped (lower bound absent, eps_low ~ inf). clip_frac_high
  reports the share of tokens whose weight hit the upper bound; clip_frac_low is always 0.
  """
  b = _f32(batch)
  adv = b.advantages[:, None]
  r = jnp.exp(sg(_log_ratio(b.logp, b.logp_old, b.mask)))
  w = sg(jnp.minimum(r, 1.0 + cfg.cispo_eps_high))
  loss = -jnp.sum(w * adv * _safe_logp(b) * b.mask) / jnp.maximum(jnp.sum(b.mask), 1.0)
  high = r > 1.0 + cfg.cispo_eps_high
  return loss, _diagnostics(b, cfg, weight=w, clip_high=high, clip_low=jnp.zeros_like(high))


@register("gspo", ("gspo_eps_low", "gspo_eps_high"))
def gspo_loss(batch: LossInputs, cfg: LossConfig) -> tuple[jax.Array, dict[str, jax.Array]]:
  """GSPO: L = -(1/B) sum_i min(s_i A_i, clip(s_i, 1-gspo_eps_low, 1+gspo_eps_high) A_i),

  s_i = exp((1/|y_i|) sum_t log(pi_theta / pi_old)(y_it)) (length-normalized sequence ratio, differentiated).
  Empty rows contribute 0. Clip fractions are token-weighted (each token of a clipped sequence counts).
  """
  b = _f32(batch)
  adv = b.advantages  # [B]
  log_r = _log_ratio(b.logp, b.logp_old, b.mask)  # [B, T]
  s = jnp.exp(_per_response_mean(log_r, b.mask))  # [B]
  nonempty = (_lengths(b.mask) > 0).astype(jnp.float32)
  obj = _ppo_objective(s, adv, cfg.gspo_eps_low, cfg.gspo_eps_high) * nonempty
  loss = -jnp.sum(obj) / b.mask.shape[0]
  high, low = _clip_sides(sg(s), adv, cfg.gspo_eps_low, cfg.gspo_eps_high)  # [B]
  tok = lambda x: jnp.broadcast_to(x[:, None], b.mask.shape)  # noqa: E731  [B] -> [B, T]
  metrics = _diagnostics(b, cfg, weight=tok(s), clip_high=tok(high), clip_low=tok(low))
  metrics["seq_ratio_mean"] = jnp.sum(sg(s) * nonempty) / jnp.maximum(jnp.sum(nonempty), 1.0)
  metrics["seq_ratio_max"] = jnp.max(jnp.where(nonempty > 0, sg(s), 0.0))
  metrics["seq_clip_frac"] = jnp.sum((high | low) * nonempty) / jnp.maximum(jnp.sum(nonempty), 1.0)
  return loss, metrics
