"""The optimizer of RL and of the SFT cold start: AdamW with grad-norm clipping and a warmup schedule,
and its state laid out on the mesh (Adam's moments sharded exactly like the parameters).

`make_optimizer(OptimConfig)` builds the optax transformation; `init_opt_state` / `abstract_opt_state`
create its state (or the ShapeDtypeStructs of it) in the shardings both `Trainer` and `sft.cold_start` use.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from fo_rl.common import from_mapping

SCHEDULES = ("constant", "cosine")


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """AdamW with global grad-norm clipping and a learning-rate schedule. The paper does not state these
  (algorithms.md section 6: open); the defaults suit the tiny CPU models.

  schedule: "constant": linear warmup over `warmup_steps` updates, lr x (k + 1) / warmup_steps at update
    k (so the first update moves), then `learning_rate` (RL's `optim.*`);
    "cosine": linear warmup, then cosine decay to `final_fraction * learning_rate` at `decay_steps`
    (warmup included), i.e. optax.warmup_cosine_decay_schedule (the SFT cold start's, from `sft.*`).
  """

  learning_rate: float = 1e-4
  warmup_steps: int = 0  # optimizer updates (not RL steps)
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  weight_decay: float = 0.0
  grad_clip: float = 1.0  # global norm; <= 0 disables
  schedule: str = "constant"
  decay_steps: int = 0  # cosine: the schedule's length in updates, warmup included
  final_fraction: float = 0.0  # cosine: the final learning rate as a fraction of learning_rate

  def __post_init__(self):
    if not self.learning_rate > 0:
      raise ValueError(f"optim.learning_rate={self.learning_rate!r}: must be > 0")
    if self.warmup_steps < 0:
      raise ValueError(f"optim.warmup_steps={self.warmup_steps!r}: must be >= 0")
    if self.schedule not in SCHEDULES:
      raise ValueError(f"optim.schedule={self.schedule!r}: must be one of {SCHEDULES}")
    if self.schedule == "cosine" and not self.decay_steps > self.warmup_steps:
      raise ValueError(
          f"optim.decay_steps={self.decay_steps!r}: the cosine schedule needs more steps than "
          f"optim.warmup_steps={self.warmup_steps}"
      )

  @classmethod
  def from_config(cls, d, where: str = "optim") -> "OptimConfig":
    return from_mapping(cls, d, where)


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
  """optax.chain(clip_by_global_norm (when grad_clip > 0), adamw(schedule))."""
  lr = cfg.learning_rate
  if cfg.schedule == "cosine":
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, lr, cfg.warmup_steps, cfg.decay_steps, lr * cfg.final_fraction
    )
  elif cfg.warmup_steps:
    # Update k (0-based) uses lr * min(1, (k + 1) / warmup_steps): the first update is not a no-op
    # (a warmup from 0 gave update 0 a learning rate of 0), and update warmup_steps - 1 reaches lr.
    warmup = cfg.warmup_steps
    schedule = lambda count: lr * jnp.minimum(1.0, (count + 1) / warmup)
  else:
    schedule = lr
  parts = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.grad_clip > 0 else []
  parts.append(optax.adamw(schedule, cfg.b1, cfg.b2, cfg.eps, weight_decay=cfg.weight_decay))
  return optax.chain(*parts)


def opt_state_shardings(tx: optax.GradientTransformation, params, mesh: Mesh):
  """The shardings of `tx.init(params)`: each parameter's moments get exactly that parameter's sharding
  (left to the compiler, zeros_like comes out replicated: every device would hold the full moments);
  every other leaf (step counts) is replicated. `params` are arrays or ShapeDtypeStructs with shardings.
  """
  replicated = NamedSharding(mesh, PartitionSpec())
  return optax.tree_map_params(
      tx,
      lambda _, s: s,
      jax.eval_shape(tx.init, params),
      jax.tree.map(lambda x: x.sharding, params),
      transform_non_params=lambda _: replicated,
  )


def init_opt_state(tx: optax.GradientTransformation, params, mesh: Mesh | None = None):
  """`tx.init(params)` in `opt_state_shardings` (mesh None: as jit places it, for unsharded params)."""
  if mesh is None:
    return jax.jit(tx.init)(params)
  return jax.jit(tx.init, out_shardings=opt_state_shardings(tx, params, mesh))(params)


def abstract_opt_state(tx: optax.GradientTransformation, params, mesh: Mesh | None = None):
  """What `init_opt_state` returns, as ShapeDtypeStructs (with its shardings when `mesh` is given);
  `params` are ShapeDtypeStructs. Nothing is allocated or compiled."""
  opt = jax.eval_shape(tx.init, params)
  if mesh is None:
    return opt
  return jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      opt,
      opt_state_shardings(tx, params, mesh),
  )
