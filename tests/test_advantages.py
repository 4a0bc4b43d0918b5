"""fo_rl.rl.advantages against plain-numpy loop implementations of the group baselines."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fo_rl.rl.advantages import (
    ADVANTAGE_MODES,
    LOSS_ADVANTAGES,
    group_advantages,
    group_has_signal,
    resolve_advantage,
)


def ref_advantages(rewards, G, mode, eps=1e-6):
  """Loops over prompts p and samples i; rewards are prompt-major (p*G + i)."""
  out = np.zeros(len(rewards))
  for p in range(len(rewards) // G):
    group = [float(rewards[p * G + i]) for i in range(G)]
    mean = sum(group) / G
    std = math.sqrt(sum((x - mean) ** 2 for x in group) / G)
    for i, x in enumerate(group):
      if mode == "mean":
        out[p * G + i] = x - mean
      elif mode == "std":
        out[p * G + i] = (x - mean) / (std + eps)
      else:
        others = [group[j] for j in range(G) if j != i]
        out[p * G + i] = x - sum(others) / len(others)
  return out


def random_rewards(seed, P, G, binary=True):
  rng = np.random.default_rng(seed)
  r = rng.integers(0, 2, P * G).astype(np.float64) if binary else rng.normal(size=P * G)
  r[:G] = 1.0  # an all-equal group (zero signal)
  return r


@pytest.mark.parametrize("mode", ADVANTAGE_MODES)
@pytest.mark.parametrize("P,G", [(3, 4), (5, 16), (2, 2)])
@pytest.mark.parametrize("binary", [True, False])
def test_modes_match_reference(mode, P, G, binary):
  r = random_rewards(P * G, P, G, binary)
  got = np.asarray(group_advantages(jnp.asarray(r), G, mode))
  assert got.shape == (P * G,) and got.dtype == np.float32
  np.testing.assert_allclose(got, ref_advantages(r, G, mode), rtol=1e-5, atol=1e-6)


def test_default_is_mean_without_std():
  r = np.array([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0])
  np.testing.assert_allclose(group_advantages(r, 4), ref_advantages(r, 4, "mean"), atol=1e-7)
  # 'std' really differs from 'mean' on the same data (guards against an ignored mode)
  assert not np.allclose(group_advantages(r, 4, "std"), group_advantages(r, 4, "mean"))


def test_properties():
  r = random_rewards(7, 6, 8, binary=False)
  for mode in ADVANTAGE_MODES:
    a = np.asarray(group_advantages(r, 8, mode)).reshape(6, 8)
    np.testing.assert_allclose(a.sum(1), 0.0, atol=1e-5)  # every mode is centred per group
  rloo = np.asarray(group_advantages(r, 8, "rloo"))
  mean = np.asarray(group_advantages(r, 8, "mean"))
  np.testing.assert_allclose(rloo, mean * 8 / 7, rtol=1e-5, atol=1e-6)  # rloo = G/(G-1) (R - mean)
  a = np.asarray(group_advantages(r, 8, "std")).reshape(6, 8)
  np.testing.assert_allclose(a[1:].std(1), 1.0, rtol=1e-4)  # group 0 is all-equal: A = 0
  assert np.all(a[0] == 0)
  # an all-equal group gives exactly 0 in every mode (no division blow-up)
  for mode in ADVANTAGE_MODES:
    assert np.all(np.asarray(group_advantages(np.ones(8), 4, mode)) == 0.0)


def test_jit():
  r = random_rewards(0, 4, 4)
  f = jax.jit(group_advantages, static_argnums=(1, 2))
  np.testing.assert_allclose(f(r, 4, "std"), ref_advantages(r, 4, "std"), rtol=1e-5, atol=1e-6)


def test_group_has_signal():
  r = np.array([1, 1, 1, 0, 0, 0, 0, 1, 0, 1], np.float32)
  got = np.asarray(group_has_signal(r, 2))
  want = np.array([False, False, True, True, False, False, True, True, True, True])
  np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize(
    "args,match",
    [
        ((np.ones(6), 4), "multiple of group_size"),
        ((np.ones(6), 0), "group_size must be >= 1"),
        ((np.ones(6), 2.0), "group_size must be an int"),
        ((np.ones(6), True), "group_size must be an int"),
        ((np.ones((2, 3)), 3), "1-D"),
        ((np.ones(6), 1, "rloo"), "group_size must be >= 2"),
        ((np.ones(6), 3, "median"), "known modes"),
    ],
)
def test_errors(args, match):
  with pytest.raises(ValueError, match=match):
    group_advantages(*args)


def test_group_size_one_mean_and_std_are_zero():
  np.testing.assert_array_equal(group_advantages(np.arange(4.0), 1, "mean"), np.zeros(4))
  np.testing.assert_array_equal(group_advantages(np.arange(4.0), 1, "std"), np.zeros(4))


# --------------------------------------------------------------------------------------------------------
# rl.advantage follows the loss.
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "loss,want",
    [("minirl", "mean"), ("grpo", "std"), ("cispo", "std"), ("gspo", "std"), ("dapo", "std")],
)
def test_auto_is_the_losss_own(loss, want):
  assert resolve_advantage("auto", loss) == want
  assert resolve_advantage(want, loss) == want


def test_every_registered_loss_has_a_default_advantage():
  from fo_rl.rl.losses import LOSSES

  assert set(LOSS_ADVANTAGES) == set(LOSSES)
  assert all(set(m) <= set(ADVANTAGE_MODES) for m in LOSS_ADVANTAGES.values())


@pytest.mark.parametrize(
    "loss,mode", [("grpo", "mean"), ("gspo", "rloo"), ("dapo", "mean"), ("minirl", "std")]
)
def test_mismatch_is_an_error_unless_allowed(loss, mode):
  with pytest.raises(ValueError, match=f"rl.advantage='{mode}'.*{loss}.*allow_advantage_mismatch"):
    resolve_advantage(mode, loss)
  assert resolve_advantage(mode, loss, allow_mismatch=True) == mode


def test_rloo_is_minirls_open_alternative():
  assert resolve_advantage("rloo", "minirl") == "rloo"


def test_bad_values_name_the_field():
  with pytest.raises(ValueError, match="rl.advantage='median'"):
    resolve_advantage("median", "minirl")
  with pytest.raises(ValueError, match="rl.allow_advantage_mismatch"):
    resolve_advantage("mean", "minirl", allow_mismatch="yes")
  with pytest.raises(ValueError, match="rl.advantage='auto'.*no default"):
    resolve_advantage("auto", "my_loss")
  assert resolve_advantage("std", "my_loss") == "std"  # a loss outside the table: any mode


def test_the_run_config_trains_each_loss_on_its_own_advantage():
  """config.parse: grpo by default gets 'std' (it used to get 'mean' silently); an explicit mismatch is an
  error naming rl.advantage; the default run (minirl) keeps 'mean'."""
  from fo_rl import config as C

  c = C.base_config()
  assert C.parse(c).rl.advantage == "mean"
  for name in ("grpo", "cispo", "gspo", "dapo"):
    c = C.base_config()
    c.rl.loss.name = name
    rc = C.parse(c)
    assert rc.rl.advantage == "std", name
  c.rl.advantage = "mean"
  with pytest.raises(ValueError, match="rl.advantage='mean'"):
    C.parse(c)
  c.rl.allow_advantage_mismatch = True
  assert C.parse(c).rl.advantage == "mean"
