"""Test setup: 8 fake CPU devices, set before jax is imported anywhere; the shared toy model.

Tiers (markers registered in pyproject.toml; README "Quick start"): `slow`, `e2e`, `multiprocess`,
`tpu_compile`. CI runs every test; the fast development tier is
`-m "not slow and not e2e and not multiprocess and not tpu_compile"`."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402  (must come after XLA_FLAGS)

jax.config.update("jax_default_matmul_precision", "highest")


import pytest  # noqa: E402

from toy import TOY  # noqa: E402  (tests/toy.py)


@pytest.fixture(scope="session")
def toy_model():
  """(TOY, graphdef, params): the toy model initialized at seed 0 on one device, once per session
  (its init program takes seconds to compile). Every test that asks for it gets the same `params`:
  never donate them or change them in place; derive new arrays instead."""
  from fo_rl.model import init_model

  graphdef, params = init_model(TOY, seed=0)
  return TOY, graphdef, params


@pytest.fixture(scope="module")
def run_caches(tmp_path_factory):
  """For the requesting module only: a persistent XLA compilation cache shared by the in-process tiny
  runs (test_configs, test_preemption: same model, so their sampler, eval and cold-start programs compile
  once; tests/test_main.py's subprocesses use the same directory) and a shared cold-start dir."""
  from jax.experimental.compilation_cache import compilation_cache as cc

  d = tmp_path_factory.getbasetemp() / "fo_rl_run_caches"
  (d / "xla").mkdir(parents=True, exist_ok=True)
  settings = {
      "jax_compilation_cache_dir": str(d / "xla"),
      "jax_persistent_cache_min_compile_time_secs": 0.0,
      "jax_persistent_cache_min_entry_size_bytes": -1,
  }
  old = {k: getattr(jax.config, k) for k in settings}
  for k, v in settings.items():
    jax.config.update(k, v)
  cc.reset_cache()  # jax decides once per process whether to use the cache: decide again
  yield d
  for k, v in old.items():
    jax.config.update(k, v)
  cc.reset_cache()
