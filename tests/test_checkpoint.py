"""Tests for fo_rl.checkpoint (8 fake CPU devices from conftest)."""

import os
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fo_rl.checkpoint import (
    Checkpointer,
    CheckpointMismatchError,
    abstract_like,
    restore_train_bundle,
    train_bundle,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _mesh(shape, names):
  n = int(np.prod(shape))
  return Mesh(np.array(jax.devices()[:n]).reshape(shape), names)


def _make_state(mesh, seed=0):
  """Train-state-like pytree sharded over a (2, 4) ('data', 'model') mesh."""
  k = jax.random.key(seed)
  k1, k2 = jax.random.split(k)
  w = jax.random.normal(k1, (8, 16), jnp.float32)
  e = jax.random.normal(k2, (4, 8, 8), jnp.bfloat16)  # experts axis
  s = lambda *spec: NamedSharding(mesh, P(*spec))  # noqa: E731
  params = {
      "dense": {
          "kernel": jax.device_put(w, s("data", "model")),
          "bias": jax.device_put(jnp.arange(16, dtype=jnp.float32), s("model")),
      },
      "moe": {"experts": jax.device_put(e, s("model", None, "data"))},
  }
  opt = (
      {
          "count": jax.device_put(jnp.int32(7), s()),
          "mu": jax.tree.map(lambda x: x * 0.5, params),
          "nu": jax.tree.map(lambda x: x * x, params),
      },
      None,
  )
  return {"params": params, "opt": opt, "rng": jax.device_put(jax.random.key(seed + 42), s())}


def _assert_tree_equal(a, b):
  la, ta = jax.tree.flatten(a)
  lb, tb = jax.tree.flatten(b)
  assert ta == tb
  for x, y in zip(la, lb):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      assert jax.dtypes.issubdtype(y.dtype, jax.dtypes.prng_key)
      x, y = jax.random.key_data(x), jax.random.key_data(y)
    np.testing.assert_array_equal(
        np.asarray(x.astype(jnp.float32)), np.asarray(y.astype(jnp.float32))
    )


def _assert_shardings(tree, abstract):
  for x, a in zip(jax.tree.leaves(tree), jax.tree.leaves(abstract)):
    assert x.shape == a.shape and x.dtype == a.dtype
    assert x.sharding.is_equivalent_to(a.sharding, x.ndim), (x.sharding, a.sharding)


META = {
    "data_position": 1234,
    "epoch": 1,
    "config_hash": "abc123",
    "counters": {"tokens": 10**12, "episodes": 5},
    "lr": 3e-4,
    "np_scalar": np.float32(0.5),
    "np_int": np.int64(3),
    "arr": np.arange(3),
}


def test_roundtrip_same_sharding_and_meta(tmp_path):
  mesh = _mesh((2, 4), ("data", "model"))
  state = _make_state(mesh)
  ck = Checkpointer(tmp_path / "ckpt")
  assert ck.latest_step() is None
  assert ck.save(10, state, META)
  ck.wait()
  assert ck.latest_step() == 10
  abstract = abstract_like(state)
  restored, meta = ck.restore(10, abstract)
  _assert_tree_equal(state, restored)
  _assert_shardings(restored, abstract)
  assert restored["opt"][1] is None
  assert meta == {
      "data_position": 1234,
      "epoch": 1,
      "config_hash": "abc123",
      "counters": {"tokens": 10**12, "episodes": 5},
      "lr": 3e-4,
      "np_scalar": 0.5,
      "np_int": 3,
      "arr": [0, 1, 2],
  }
  # restore(None) -> latest
  restored2, _ = ck.restore(None, abstract)
  _assert_tree_equal(state, restored2)
  ck.close()
  # Only finalized step directories exist after close.
  entries = os.listdir(tmp_path / "ckpt")
  assert [e for e in entries if e[:1].isdigit()] == ["10"], entries


@pytest.mark.parametrize("target", ["single_device", "transposed_mesh", "replicated_4"])
def test_restore_into_different_sharding(tmp_path, target):
  mesh = _mesh((2, 4), ("data", "model"))
  state = _make_state(mesh)
  with Checkpointer(tmp_path / "ckpt") as ck:
    ck.save(3, state, {"x": 1})

  if target == "single_device":
    tmesh = _mesh((1, 1), ("data", "model"))
    spec_of = lambda a: P()  # noqa: E731
  elif target == "transposed_mesh":
    tmesh = _mesh((4, 2), ("data", "model"))
    # swap which axis shards what, and shard over different dims
    spec_of = lambda a: P(*(["model", "data"] + [None] * (a.ndim - 2))[: a.ndim])  # noqa: E731
  else:
    tmesh = Mesh(np.array(jax.devices()[4:8]), ("r",))
    spec_of = lambda a: P()  # noqa: E731

  def to_target(a):
    ndim = len(a.shape)
    return jax.ShapeDtypeStruct(
        a.shape, a.dtype, sharding=NamedSharding(tmesh, spec_of(a) if ndim else P())
    )

  abstract = jax.tree.map(to_target, abstract_like(state))
  ck2 = Checkpointer(tmp_path / "ckpt")
  assert ck2.latest_step() == 3
  restored, meta = ck2.restore(3, abstract)
  ck2.close()
  _assert_tree_equal(state, restored)
  _assert_shardings(restored, abstract)
  for x in jax.tree.leaves(restored):
    assert x.sharding.device_set == set(tmesh.devices.flat)
  assert meta == {"x": 1}


def test_max_to_keep_interval_and_force(tmp_path):
  mesh = _mesh((2, 4), ("data", "model"))
  state = {"w": jax.device_put(jnp.ones((8, 8)), NamedSharding(mesh, P("data", "model")))}
  ck = Checkpointer(tmp_path / "c", max_to_keep=2, save_interval_steps=5)
  saved = [s for s in range(1, 21) if ck.save(s, state, {"step": s})]
  assert saved == [5, 10, 15, 20]
  assert ck.save(23, state, {"step": 23}, force=True)  # off-interval, forced
  assert not ck.save(23, state, {}, force=True)  # existing step: never overwritten
  assert not ck.save(22, state, {})  # not on interval
  ck.wait()
  assert ck.all_steps() == [20, 23]
  assert ck.latest_step() == 23
  ck.close()
  assert sorted(int(d) for d in os.listdir(tmp_path / "c") if d.isdigit()) == [20, 23]
  # A fresh Checkpointer sees the same steps.
  ck2 = Checkpointer(tmp_path / "c", max_to_keep=2)
  assert ck2.all_steps() == [20, 23] and ck2.latest_step() == 23
  _, meta = ck2.restore(20, abstract_like(state))
  assert meta == {"step": 20}
  with pytest.raises(FileNotFoundError, match="step 5"):
    ck2.restore(5, abstract_like(state))
  ck2.close()


def test_structure_mismatch_errors(tmp_path):
  mesh = _mesh((2, 4), ("data", "model"))
  state = _make_state(mesh)
  d = tmp_path / "mm"
  with Checkpointer(d) as ck:
    ck.save(1, state, {})
  abstract = abstract_like(state)
  ck = Checkpointer(d)

  # renamed key
  bad = jax.tree.map(lambda x: x, abstract)
  bad["params"]["dense"]["b"] = bad["params"]["dense"].pop("bias")
  with pytest.raises(CheckpointMismatchError) as ei:
    ck.restore(1, bad)
  msg = str(ei.value)
  assert str(d) in msg and "params/dense/b" in msg and "params/dense/bias" in msg

  # extra key requested
  bad = jax.tree.map(lambda x: x, abstract)
  bad["new_head"] = jax.ShapeDtypeStruct((4,), jnp.float32, sharding=NamedSharding(mesh, P()))
  with pytest.raises(CheckpointMismatchError, match="new_head"):
    ck.restore(1, bad)

  # shape mismatch
  bad = jax.tree.map(lambda x: x, abstract)
  k = bad["params"]["dense"]["kernel"]
  bad["params"]["dense"]["kernel"] = jax.ShapeDtypeStruct((8, 8), k.dtype, sharding=k.sharding)
  with pytest.raises(CheckpointMismatchError, match=r"params/dense/kernel: shape \(8, 16\)"):
    ck.restore(1, bad)

  # dtype mismatch (strict by default; strict_dtype=False lets orbax cast)
  bad = jax.tree.map(lambda x: x, abstract)
  k = bad["params"]["dense"]["kernel"]
  bad["params"]["dense"]["kernel"] = jax.ShapeDtypeStruct(
      k.shape, jnp.bfloat16, sharding=k.sharding
  )
  with pytest.raises(CheckpointMismatchError, match="params/dense/kernel: dtype float32"):
    ck.restore(1, bad)
  restored, _ = ck.restore(1, bad, strict_dtype=False)
  assert restored["params"]["dense"]["kernel"].dtype == jnp.bfloat16
  ck.close()


def test_prng_key_roundtrip_typed_and_raw(tmp_path):
  mesh = _mesh((2, 4), ("data", "model"))
  rep = NamedSharding(mesh, P())
  typed = jax.device_put(jax.random.key(123), rep)
  batch = jax.device_put(jax.random.split(jax.random.key(7), 8), NamedSharding(mesh, P("data")))
  raw = jax.device_put(jax.random.PRNGKey(5), rep)
  rbg = jax.random.key(9, impl="rbg")
  state = {"key": typed, "keys": batch, "raw": raw, "rbg": rbg}
  with Checkpointer(tmp_path / "k") as ck:
    ck.save(0, state, {})
  ck = Checkpointer(tmp_path / "k")
  abstract = abstract_like(state)
  restored, _ = ck.restore(0, abstract)
  _assert_tree_equal(state, restored)
  assert jax.random.key_impl(restored["rbg"]) == jax.random.key_impl(rbg)
  assert restored["raw"].dtype == jnp.uint32
  _assert_shardings(restored, abstract)
  # Restored keys draw the same numbers.
  np.testing.assert_array_equal(
      jax.random.normal(restored["key"], (4,)), jax.random.normal(typed, (4,))
  )
  # Typed key on disk restores into a raw uint32 target (stored as key_data) ...
  raw_target = dict(abstract, key=jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=rep))
  restored_raw, _ = ck.restore(0, raw_target)
  np.testing.assert_array_equal(restored_raw["key"], jax.random.key_data(typed))
  # ... and a different target sharding for the key batch works.
  single = _mesh((1,), ("x",))
  tgt = dict(
      abstract,
      keys=jax.ShapeDtypeStruct(batch.shape, batch.dtype, sharding=NamedSharding(single, P())),
  )
  restored_single, _ = ck.restore(0, tgt)
  np.testing.assert_array_equal(
      jax.random.key_data(restored_single["keys"]), jax.random.key_data(batch)
  )
  assert restored_single["keys"].sharding.device_set == {jax.devices()[0]}
  ck.close()


def test_train_bundle_roundtrip_on_a_mesh_and_onto_one_device(tmp_path):
  """fo_rl.run's checkpoint: {"train": state, "rng": the key's data replicated over the mesh}; restored
  into the live shardings (a resume) or onto one device (fo_rl.tools.sample)."""
  mesh = _mesh((2, 4), ("data", "model"))
  state = _make_state(mesh)
  del state["rng"]
  rng = jax.random.fold_in(jax.random.key(3), 11)
  bundle = train_bundle(state, rng, mesh)
  assert set(bundle) == {"train", "rng"} and bundle["rng"].dtype == jnp.uint32
  assert bundle["rng"].sharding.is_equivalent_to(NamedSharding(mesh, P()), 1)
  with Checkpointer(tmp_path / "b") as ck:
    ck.save(5, bundle, {"step": 5})
  ck = Checkpointer(tmp_path / "b")
  fresh = _make_state(mesh, seed=1)  # different values, same structure and shardings
  del fresh["rng"]
  got, got_rng, meta = restore_train_bundle(ck, None, train_bundle(fresh, jax.random.key(0), mesh))
  _assert_tree_equal(state, got)
  _assert_shardings(got, abstract_like(state))
  assert meta == {"step": 5}
  np.testing.assert_array_equal(jax.random.normal(got_rng, (3,)), jax.random.normal(rng, (3,)))
  # The restored key is uncommitted, as a fresh one: jit mixes it with arrays on the mesh.
  jax.jit(lambda k, x: jax.random.normal(k, x.shape) + x)(got_rng, state["params"]["dense"]["bias"])
  # Onto one device, from ShapeDtypeStructs (nothing initialized).
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  target = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one),
      train_bundle(abstract_like(state), jax.random.key(0)),
  )
  got1, rng1, _ = restore_train_bundle(ck, 5, target)
  _assert_tree_equal(state, got1)
  assert all(x.sharding.device_set == {jax.devices()[0]} for x in jax.tree.leaves(got1))
  np.testing.assert_array_equal(jax.random.key_data(rng1), jax.random.key_data(rng))
  ck.close()


def test_unfinalized_tmp_dirs_are_never_listed(tmp_path):
  d = tmp_path / "atomic"
  state = {"w": jnp.arange(10.0)}
  with Checkpointer(d) as ck:
    ck.save(1, state, {"s": 1})
  # Simulate a process killed mid-save: orbax writes into
  # '<step>.orbax-checkpoint-tmp-<ts>' and renames only when complete.
  # (orbax 0.12.8 uses '<step>.orbax-checkpoint-tmp'; older ones add '-<ts>').
  shutil.copytree(d / "1", d / "2.orbax-checkpoint-tmp")
  os.makedirs(d / "3.orbax-checkpoint-tmp-1700000000000001" / "state")
  ck = Checkpointer(d)
  assert ck.all_steps() == [1]
  assert ck.latest_step() == 1
  ck.close()
  assert not [p for p in os.listdir(d) if "tmp" in p]  # cleaned up on open


def test_killed_during_async_save(tmp_path):
  """A process SIGKILLed while an async save is in flight never leaves a step
  that latest_step() reports but cannot be restored."""
  d = tmp_path / "killed"
  script = textwrap.dedent(f"""
        import os, sys, signal
        os.environ["JAX_PLATFORMS"] = "cpu"
        sys.path.insert(0, {REPO!r})
        import jax.numpy as jnp
        from fo_rl.checkpoint import Checkpointer
        ck = Checkpointer({str(d)!r})
        ck.save(1, {{"w": jnp.zeros((256, 1024))}}, {{"s": 1}})
        ck.wait()
        big = {{"w": jnp.ones((256, 1024)) , "v": [jnp.full((512, 1024), float(i)) for i in range(24)]}}
        ck.save(2, {{"w": big["w"], "v": big["v"]}}, {{"s": 2}})
        os.kill(os.getpid(), signal.SIGKILL)
    """)
  p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
  assert p.returncode == -9, p.stderr[-2000:]
  leftovers = os.listdir(d)
  assert "1" in leftovers
  assert all(x.isdigit() or ".orbax-checkpoint-tmp" in x for x in leftovers), leftovers
  ck = Checkpointer(d)
  steps = ck.all_steps()
  assert steps and steps[0] == 1 and set(steps) <= {1, 2}
  restored, meta = ck.restore(1, abstract_like({"w": jnp.zeros((256, 1024))}))
  assert meta == {"s": 1} and float(restored["w"].sum()) == 0.0
  if 2 in steps:  # the save won the race: it must then be complete
    tgt = abstract_like({"w": jnp.ones((256, 1024)), "v": [jnp.zeros((512, 1024))] * 24})
    restored, meta = ck.restore(2, tgt)
    assert meta == {"s": 2} and float(restored["v"][23][0, 0]) == 23.0
  ck.close()
  assert not [x for x in os.listdir(d) if "tmp" in x]


def test_async_save_snapshot_allows_deleting_buffers(tmp_path):
  """save() returns after copying device buffers; the caller may then donate /
  delete them while the write happens in the background."""
  mesh = _mesh((2, 4), ("data", "model"))
  state = _make_state(mesh)
  expected = jax.device_get(
      jax.tree.map(
          lambda x: jax.random.key_data(x)
          if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
          else x,
          state,
      )
  )
  abstract = abstract_like(state)
  ck = Checkpointer(tmp_path / "a")
  assert ck.save(4, state, {"ok": True})
  for x in jax.tree.leaves(state):
    x.delete()
  ck.wait()
  restored, meta = ck.restore(4, abstract)
  ck.close()
  assert meta == {"ok": True}
  got = jax.tree.map(
      lambda x: jax.random.key_data(x)
      if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
      else x,
      restored,
  )
  for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(got)):
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def test_relative_directory_and_bad_args(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  with Checkpointer("rel/ckpt") as ck:
    assert ck.directory == str(tmp_path / "rel" / "ckpt")
    ck.save(0, {"w": jnp.ones(3)}, {})
  assert (tmp_path / "rel" / "ckpt" / "0").is_dir()
  with pytest.raises(ValueError):
    Checkpointer(tmp_path / "x", max_to_keep=0)
  with pytest.raises(ValueError):
    Checkpointer(tmp_path / "x", save_interval_steps=0)
  with Checkpointer(tmp_path / "empty") as ck:
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
      ck.restore(None, {"w": jax.ShapeDtypeStruct((3,), jnp.float32)})
    with pytest.raises(TypeError, match="ShapeDtypeStruct"):
      ck.save(0, {"w": jnp.ones(3)}, {})
      ck.restore(0, {"w": jnp.ones(3)})
