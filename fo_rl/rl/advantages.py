"""Group-relative advantages (algorithms.md sections 3-4).

rewards: [P*G] float, ordered prompt-major: the G samples of prompt p sit at rows p*G .. p*G + G-1.
Returns one advantage per response, [P*G] float32. Pure and jit-compatible (group_size, mode static).

`rl.advantage='auto'` (the default) picks the loss's own mode (`resolve_advantage`, `LOSS_ADVANTAGES`).

Modes:
  'mean' (MiniRL default): A_i = R_i - (1/G) sum_j R_j            (no std division)
  'std'  (GRPO/CISPO/GSPO/DAPO default): A_i = (R_i - mean) / (std + eps), std the population std
         (ddof=0).
         TRL/verl use the unbiased std (ddof=1); for fixed G the two differ by the constant sqrt(G/(G-1)).
  'rloo' (**open** alternative): A_i = R_i - (1/(G-1)) sum_{j != i} R_j   (leave-one-out baseline)
         = G/(G-1) * (R_i - mean). Unlike 'mean', it keeps E[A grad log pi] exactly unbiased; 'mean'
         shrinks it by the constant (G-1)/G (tests/test_first_order.py checks both).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = [
    "ADVANTAGE_MODES",
    "LOSS_ADVANTAGES",
    "resolve_advantage",
    "group_advantages",
    "group_has_signal",
]

ADVANTAGE_MODES = ("mean", "std", "rloo")
AUTO = "auto"
# loss name -> the advantage modes its objective is defined with, its default first (algorithms.md
# section 4): MiniRL centres by the group mean (RLOO is the **open** leave-one-out reading of that mean);
# GRPO, CISPO, GSPO and DAPO divide by the group std.
LOSS_ADVANTAGES = {
    "minirl": ("mean", "rloo"),
    "grpo": ("std",),
    "cispo": ("std",),
    "gspo": ("std",),
    "dapo": ("std",),
}


def resolve_advantage(advantage: str, loss: str, allow_mismatch: bool = False) -> str:
  """The advantage mode `rl.advantage` stands for under `rl.loss.name=loss`.

  'auto' is the loss's own (`LOSS_ADVANTAGES`, first entry). An explicit mode the loss is not defined
  with (e.g. 'mean' for grpo, which would silently train GRPO on unscaled advantages) is a ValueError
  naming rl.advantage, unless `allow_mismatch` (rl.allow_advantage_mismatch=True) says it is intended.
  A loss missing from the table has no default: 'auto' is an error there, any mode is accepted.
  """
  if not isinstance(allow_mismatch, bool):
    raise ValueError(f"rl.allow_advantage_mismatch={allow_mismatch!r}: must be a bool")
  if advantage != AUTO and advantage not in ADVANTAGE_MODES:
    raise ValueError(f"rl.advantage={advantage!r}: must be {AUTO!r} or one of {ADVANTAGE_MODES}")
  own = LOSS_ADVANTAGES.get(loss)
  if advantage == AUTO:
    if own is None:
      raise ValueError(
          f"rl.advantage={AUTO!r}: loss {loss!r} has no default advantage; set one of "
          f"{ADVANTAGE_MODES}"
      )
    return own[0]
  if own is not None and advantage not in own and not allow_mismatch:
    raise ValueError(
        f"rl.advantage={advantage!r}: loss {loss!r} is defined with {' or '.join(own)} advantages; "
        f"use rl.advantage={AUTO!r} (= {own[0]!r}), or set rl.allow_advantage_mismatch=True to train "
        f"it on {advantage!r} anyway"
    )
  return advantage


def _grouped(rewards: jax.Array, group_size: int, min_group: int = 1) -> jax.Array:
  """[P*G] -> [P, G] float32 after validating the layout."""
  if isinstance(group_size, bool) or not isinstance(group_size, int):
    raise ValueError(f"group_size must be an int, got {group_size!r}")
  if group_size < min_group:
    raise ValueError(f"group_size must be >= {min_group}, got {group_size}")
  rewards = jnp.asarray(rewards)
  if rewards.ndim != 1:
    raise ValueError(f"rewards must be 1-D [P*G] (prompt-major), got shape {rewards.shape}")
  if rewards.shape[0] % group_size:
    raise ValueError(
        f"len(rewards)={rewards.shape[0]} is not a multiple of group_size={group_size}"
    )
  return rewards.astype(jnp.float32).reshape(-1, group_size)


def group_advantages(
    rewards: jax.Array, group_size: int, mode: str = "mean", eps: float = 1e-6
) -> jax.Array:
  """[P*G] advantages from [P*G] prompt-major rewards; see the module docstring for the modes."""
  if mode not in ADVANTAGE_MODES:
    raise ValueError(f"Unknown advantage mode {mode!r}; known modes: {ADVANTAGE_MODES}")
  r = _grouped(rewards, group_size, min_group=2 if mode == "rloo" else 1)  # [P, G]
  mean = jnp.mean(r, axis=1, keepdims=True)  # [P, 1]
  if mode == "mean":
    adv = r - mean
  elif mode == "std":
    adv = (r - mean) / (jnp.std(r, axis=1, keepdims=True) + eps)
  else:  # rloo
    others = (jnp.sum(r, axis=1, keepdims=True) - r) / (group_size - 1)
    adv = r - others
  return adv.reshape(-1)


def group_has_signal(rewards: jax.Array, group_size: int) -> jax.Array:
  """[P*G] bool: True for the samples of groups whose rewards are not all equal.

  DAPO's dynamic sampling keeps only these groups (all-equal groups have zero advantage in every mode).
  """
  r = _grouped(rewards, group_size)  # [P, G]
  varied = jnp.max(r, axis=1) > jnp.min(r, axis=1)  # [P]
  return jnp.repeat(varied, group_size)
