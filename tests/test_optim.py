"""fo_rl.rl.optim: the schedules are optax's (the cold start's cosine one bit for bit), and the optimizer
state is laid out like the parameters (8 fake CPU devices from conftest)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fo_rl import config as config_lib
from fo_rl.rl.optim import (
    OptimConfig,
    abstract_opt_state,
    init_opt_state,
    make_optimizer,
    opt_state_shardings,
)


def _params():
  k1, k2 = jax.random.split(jax.random.key(0))
  return {"w": jax.random.normal(k1, (8, 16)), "b": jax.random.normal(k2, (16,))}


def _updates(tx, steps: int):
  """The parameters after `steps` updates with fixed pseudo-random gradients."""
  params = _params()
  state = tx.init(params)
  out = []
  for i in range(steps):
    g = jax.tree.map(lambda x: jnp.sin(x * (i + 1)) * 3.0, params)  # norm > 1: clipping is active
    upd, state = tx.update(g, state, params)
    params = optax.apply_updates(params, upd)
    out.append(params)
  return out, state


def _assert_same(tx_a, tx_b, steps: int):
  (pa, sa), (pb, sb) = _updates(tx_a, steps), _updates(tx_b, steps)
  assert jax.tree.structure(sa) == jax.tree.structure(sb)
  for a, b in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_cosine_schedule_is_the_cold_starts_optax_chain():
  lr, warmup, steps = 3e-3, 3, 10
  ours = make_optimizer(
      OptimConfig(
          learning_rate=lr,
          warmup_steps=warmup,
          weight_decay=0.01,
          grad_clip=1.0,
          schedule="cosine",
          decay_steps=steps,
          final_fraction=0.1,
      )
  )
  sched = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, steps, lr * 0.1)
  theirs = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, weight_decay=0.01))
  _assert_same(ours, theirs, steps + 3)  # warmup, decay and past its end


def test_sft_view_gives_the_cold_starts_optimizer():
  c = config_lib.tiny(config_lib.base_config())
  c.sft.learning_rate, c.sft.warmup_steps, c.sft.steps = 0.01, 2, 7
  sft = config_lib.parse(c).sft
  sched = optax.warmup_cosine_decay_schedule(0.0, 0.01, 2, 7, 0.01 * 0.1)
  theirs = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, weight_decay=0.01))
  _assert_same(make_optimizer(sft.optim), theirs, 9)
  # The base recipe's: sft.learning_rate, sft.warmup_steps, sft.steps, a tenth of the rate at the end.
  base = config_lib.parse(config_lib.base_config()).sft.optim
  assert (base.learning_rate, base.warmup_steps, base.decay_steps) == (3e-3, 100, 800)
  assert base.learning_rate * base.final_fraction == 3e-3 * 0.1
  assert (base.schedule, base.weight_decay, base.grad_clip) == ("cosine", 0.01, 1.0)


def test_constant_schedule_is_linear_warmup_then_constant():
  lr = 1e-3
  ours = make_optimizer(OptimConfig(learning_rate=lr, warmup_steps=4, eps=1e-4))
  # update k uses lr * (k + 1) / 4: 0.25, 0.5, 0.75, 1, 1, ... x lr (the first update moves)
  rates = [lr * 0.25, lr * 0.5, lr * 0.75] + [lr] * 4
  sched = lambda count: jnp.asarray(rates)[count]
  theirs = optax.chain(
      optax.clip_by_global_norm(1.0), optax.adamw(sched, eps=1e-4, weight_decay=0.0)
  )
  _assert_same(ours, theirs, 7)
  # the first update is not a no-op: parameters change at update 0
  (after,), _ = _updates(ours, 1)
  assert all(
      np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-5
      for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(_params()))
  )
  # no warmup: a constant learning rate (no schedule state), no clipping when grad_clip <= 0
  ours = make_optimizer(OptimConfig(learning_rate=lr, grad_clip=0.0))
  _assert_same(ours, optax.chain(optax.adamw(lr, weight_decay=0.0)), 3)


@pytest.mark.parametrize(
    "kw, field",
    [
        (dict(learning_rate=0.0), "optim.learning_rate"),
        (dict(warmup_steps=-1), "optim.warmup_steps"),
        (dict(schedule="linear"), "optim.schedule"),
        (dict(schedule="cosine", warmup_steps=5, decay_steps=5), "optim.decay_steps"),
    ],
)
def test_bad_optim_config_names_the_field(kw, field):
  with pytest.raises(ValueError, match=field.replace(".", r"\.")):
    OptimConfig(**kw)


def test_from_config_rejects_unknown_keys():
  assert OptimConfig.from_config({"learning_rate": 0.5}) == OptimConfig(learning_rate=0.5)
  with pytest.raises(ValueError, match=r"optim: unknown field\(s\) \['lr'\]"):
    OptimConfig.from_config({"lr": 0.5})


def test_opt_state_is_sharded_like_the_params_and_its_counts_replicated():
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "fsdp"))
  specs = {"w": P("data", "fsdp"), "b": P("fsdp")}
  params = {k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in _params().items()}
  tx = make_optimizer(OptimConfig(learning_rate=1e-3, warmup_steps=2))
  state = init_opt_state(tx, params, mesh)
  adam = state[1][0]  # chain(clip, adamw(...)): adamw's first part is scale_by_adam
  for moments in (adam.mu, adam.nu):
    for k, x in moments.items():
      assert x.sharding.is_equivalent_to(NamedSharding(mesh, specs[k]), x.ndim), (k, x.sharding)
  assert adam.count.sharding.is_equivalent_to(NamedSharding(mesh, P()), 0)
  abstract = abstract_opt_state(
      tx,
      jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), params),
      mesh,
  )
  assert jax.tree.structure(abstract) == jax.tree.structure(state)
  for a, x in zip(jax.tree.leaves(abstract), jax.tree.leaves(state)):
    assert (a.shape, a.dtype) == (x.shape, x.dtype)
    assert a.sharding.is_equivalent_to(x.sharding, x.ndim)
  for s, x in zip(jax.tree.leaves(opt_state_shardings(tx, params, mesh)), jax.tree.leaves(state)):
    assert s == x.sharding or s.is_equivalent_to(x.sharding, x.ndim)
  # without a mesh: shapes only
  plain = abstract_opt_state(tx, _params())
  assert jax.tree.structure(plain) == jax.tree.structure(init_opt_state(tx, _params()))
