"""Checkpointing for fo_rl: the only module in fo_rl that talks to orbax.

A checkpoint step holds two items:

* `state`: a pytree of `jax.Array` (params, optimizer state, PRNG keys...),
  possibly sharded over a multi-device / multi-host mesh. Saved with
  `ocp.args.StandardSave` (tensorstore/OCDBT), restored with
  `ocp.args.StandardRestore` directly into the shardings given by the caller's
  abstract state, which may differ from the shardings at save time (different
  mesh shape, fewer devices, replicated vs sharded...).
* `meta`: a small JSON-able dict (data position, counters, config hash...).
  Saved with `ocp.args.JsonSave`; numpy / jax scalars and arrays are turned
  into plain Python numbers / lists first.

Layout on disk (orbax's)::

    <directory>/<step>/state/...   <directory>/<step>/meta/metadata

Atomicity: orbax writes each step into `<step>.orbax-checkpoint-tmp-<ts>` and
renames it to `<step>` only once every item (and every host) has finished, so
a killed process leaves at most a tmp directory, which is never reported by
`Checkpointer.latest_step` and is removed when the next Checkpointer is
opened on the directory.

Damage: `Checkpointer.read_meta` reads a step's meta alone (cheap: the resume check before anything is
built), `list_steps` lists the finalized steps without opening (or creating) the directory, and
`move_aside` renames an unreadable step or cache out of the way (nothing is deleted).

Multi-host: every process must call `save` / `restore` / `wait` /
`close` (they contain barriers); orbax decides which process writes which
file. This module writes no files of its own.

PRNG keys: typed keys (`jax.random.key`, dtype `key<impl>`) are supported.
They are stored as their raw `jax.random.key_data` (uint32, shape
`key.shape + (2,)` for threefry) and re-wrapped with
`jax.random.wrap_key_data` on restore, using the impl from the *abstract*
state's dtype. The on-disk format is therefore plain uint32 and is independent
of orbax's own typed-key support. Raw uint32 keys (`jax.random.PRNGKey`)
are just uint32 arrays and round-trip unchanged; a checkpoint saved with a
typed key can be restored into a raw uint32 `ShapeDtypeStruct` of shape
`(..., 2)` and vice versa.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec, SingleDeviceSharding

from fo_rl.common import UserError
from fo_rl.parallel.multihost import host_get

__all__ = [
    "Checkpointer",
    "CheckpointMismatchError",
    "abstract_like",
    "list_steps",
    "move_aside",
    "train_bundle",
    "restore_train_bundle",
]

log = logging.getLogger(__name__)

_STATE = "state"
_META = "meta"
_MAX_LISTED = 10  # max keys named per category in a mismatch error


class CheckpointMismatchError(UserError):
  """The checkpoint on disk does not match the requested abstract state."""


def list_steps(directory: str | os.PathLike) -> list[int]:
  """The finalized steps in `directory` (names that are integers; orbax's unfinished
  `<step>.orbax-checkpoint-tmp-*` are not), ascending; [] when it does not exist. Reads only."""
  from etils import epath

  path = epath.Path(os.fspath(directory))
  if not path.is_dir():
    return []
  return sorted(int(p.name) for p in path.iterdir() if p.name.isdigit() and p.is_dir())


def move_aside(path: str | os.PathLike, dest_dir: str | os.PathLike | None = None) -> str:
  """Renames `path` (an unreadable checkpoint step or cache) to `<path>.corrupt-<time>`, or into
  `dest_dir` as `<name>.corrupt-<time>`; returns the new path. Process 0 renames; nothing is deleted.
  """
  from etils import epath

  src = epath.Path(os.fspath(path))
  name = f"{src.name}.corrupt-{time.strftime('%Y%m%dT%H%M%S')}"
  dest = (epath.Path(os.fspath(dest_dir)) if dest_dir is not None else src.parent) / name
  if jax.process_index() == 0:
    dest.parent.mkdir(parents=True, exist_ok=True)
    src.rename(dest)
  return os.fspath(dest)


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def abstract_like(tree: Any) -> Any:
  """Pytree of `jax.ShapeDtypeStruct` (with shardings) mirroring `tree`.

  Convenience for building `restore`'s target from a freshly initialized
  state (or use `jax.eval_shape` + your shardings to avoid materializing it).
  """

  def one(x):
    if isinstance(x, jax.ShapeDtypeStruct):
      return x
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))

  return jax.tree.map(one, tree)


def train_bundle(state: Any, rng: jax.Array, mesh=None) -> dict:
  """What a run checkpoints at each step (fo_rl.run; read back by fo_rl.tools.sample):
  `{"train": state (the TrainState), "rng": the run's typed PRNG key as raw key data}`.

  With a `mesh` the key data is replicated over it: a global array every process can save (orbax,
  multi-host). `state` may be ShapeDtypeStructs (a restore target: see `restore_train_bundle`)."""
  data = jax.random.key_data(rng)
  if mesh is not None:
    data = jax.device_put(data, NamedSharding(mesh, PartitionSpec()))
  return {"train": state, "rng": data}


def restore_train_bundle(
    ckpt: "Checkpointer", step: int | None, target: dict
) -> tuple[Any, Any, dict]:
  """(state, rng key, meta) of the `train_bundle` saved at `step` (None: the latest), each array read
  into the sharding of its counterpart in `target` (a `train_bundle` of arrays or ShapeDtypeStructs).
  """
  bundle, meta = ckpt.restore(step, abstract_like(target))
  # Restored key data is committed to one device; through numpy it is uncommitted again, as a fresh key
  # is (else jit sees it on device 0 and the parameters on the mesh: "incompatible devices").
  rng = jax.random.wrap_key_data(np.asarray(host_get(bundle["rng"])))
  return bundle["train"], rng, meta


def _is_prng_dtype(dtype) -> bool:
  try:
    return jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)
  except TypeError:
    return False


def _key_str(k) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def _norm_path(path) -> str:
  """Container-agnostic key path: dict keys, attributes and indices are all
  joined with '/', so `['opt'][0].mu['w']` == orbax metadata's
  `['opt'][0]['mu']['w']` == `opt/0/mu/w`."""
  return "/".join(_key_str(k) for k in path) or "<root>"


def _extend_sharding(sharding, extra_dims: int):
  """Sharding for `key_data(key)` given the sharding of `key`."""
  if sharding is None or extra_dims == 0:
    return sharding
  if isinstance(sharding, NamedSharding):
    spec = tuple(sharding.spec)
    return NamedSharding(sharding.mesh, PartitionSpec(*spec, *([None] * extra_dims)))
  if isinstance(sharding, SingleDeviceSharding):
    return sharding
  if getattr(sharding, "is_fully_replicated", False):
    # Any fully replicated sharding: replicate over the same devices.
    devices = np.array(list(sharding.device_set))
    mesh = jax.sharding.Mesh(devices, ("_replica",))
    return NamedSharding(mesh, PartitionSpec())
  raise NotImplementedError(
      f"Cannot derive the key_data sharding for a PRNG key with sharding {sharding!r}; "
      "use a NamedSharding for PRNG keys in the abstract state."
  )


def _to_physical(state: Any) -> Any:
  """Typed PRNG key arrays -> raw uint32 key data (everything else untouched)."""

  def one(x):
    if hasattr(x, "dtype") and _is_prng_dtype(x.dtype):
      return jax.random.key_data(x)
    return x

  return jax.tree.map(one, state)


def _abstract_to_physical(abstract_state: Any) -> Any:
  def one(x):
    if not isinstance(x, jax.ShapeDtypeStruct):
      raise TypeError(
          "restore() expects abstract_state leaves to be jax.ShapeDtypeStruct "
          f"(with shardings); got {type(x).__name__}. Use abstract_like(tree) "
          "or jax.eval_shape."
      )
    if _is_prng_dtype(x.dtype):
      phys = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(x.shape, x.dtype))
      extra = len(phys.shape) - len(x.shape)
      return jax.ShapeDtypeStruct(
          phys.shape, phys.dtype, sharding=_extend_sharding(x.sharding, extra)
      )
    return x

  return jax.tree.map(one, abstract_state)


def _key_impl_of(abstract_key: jax.ShapeDtypeStruct):
  """PRNG impl of an abstract typed key (public API only: trace key_impl)."""
  found = []

  def probe(k):
    found.append(jax.random.key_impl(k))
    return 0

  jax.eval_shape(probe, jax.ShapeDtypeStruct(abstract_key.shape, abstract_key.dtype))
  return found[0]


def _from_physical(restored: Any, abstract_state: Any) -> Any:
  """Re-wrap raw key data into typed keys where the abstract state asks for them."""

  def one(arr, target):
    if _is_prng_dtype(target.dtype):
      key = jax.random.wrap_key_data(arr, impl=_key_impl_of(target))
      if target.sharding is not None and key.sharding != target.sharding:
        key = jax.device_put(key, target.sharding)
      return key
    return arr

  return jax.tree.map(one, restored, abstract_state)


def _jsonable(x: Any, path: str = "meta") -> Any:
  """Convert numpy / jax scalars and arrays into JSON-able Python values."""
  if isinstance(x, Mapping):
    out = {}
    for k, v in x.items():
      if not isinstance(k, str):
        raise TypeError(f"{path}: JSON object keys must be str, got {k!r}")
      out[k] = _jsonable(v, f"{path}.{k}")
    return out
  if isinstance(x, (list, tuple)):
    return [_jsonable(v, f"{path}[{i}]") for i, v in enumerate(x)]
  if x is None or isinstance(x, (bool, int, float, str)):
    return x
  if isinstance(x, (np.generic, np.ndarray, jax.Array)):
    return np.asarray(x).tolist()
  raise TypeError(f"{path}: value of type {type(x).__name__} is not JSON-serializable")


def _use_distributed_barriers() -> None:
  """Multi-process: make orbax's barriers go through the jax.distributed client (a key-value store)
  instead of its default, a jitted all-device collective. That collective is also issued from orbax's
  background save thread, where it can interleave differently with the training step's collectives
  on each process and deadlock them (seen on CPU/gloo after an async save)."""
  if jax.process_count() == 1:
    return
  from absl import flags

  name = "experimental_orbax_use_distributed_barrier"
  if name in flags.FLAGS:
    flags.FLAGS[name].value = True


# ---------------------------------------------------------------------------
# Checkpointer
# ---------------------------------------------------------------------------


class Checkpointer:
  """Thin wrapper over `orbax.checkpoint.CheckpointManager`.

  Args:
    directory: root directory (local path or any path orbax/etils supports).
    max_to_keep: keep only the newest `max_to_keep` finalized steps
      (`None` keeps all).
    save_interval_steps: `save(step, ...)` without `force` only writes when
      `step % save_interval_steps == 0` or at a JAX preemption sync point
      (orbax's `PreemptionCheckpointingPolicy`), and never for a step <=
      the latest saved step. (Unlike orbax's default policy there is no
      extra "initial save" of the first step.)
    async_save: save in a background thread (the blocking part of `save`
      copies device buffers to host, so the caller may donate/overwrite the
      state right after `save` returns). Call `wait` or
      `close` before exiting.
    read_only: only read (restore, read_meta): the directory is neither
      created nor cleaned of stale tmp directories.
  """

  def __init__(
      self,
      directory: str | os.PathLike,
      max_to_keep: int | None = 3,
      save_interval_steps: int = 1,
      *,
      async_save: bool = True,
      read_only: bool = False,
  ):
    self.directory = os.fspath(directory)
    if "://" not in self.directory:
      self.directory = os.path.abspath(self.directory)
    if max_to_keep is not None and max_to_keep < 1:
      raise ValueError(f"max_to_keep must be None or >= 1, got {max_to_keep}")
    if save_interval_steps < 1:
      raise ValueError(f"save_interval_steps must be >= 1, got {save_interval_steps}")
    _use_distributed_barriers()
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    registry.add(_STATE, ocp.args.StandardSave)
    registry.add(_STATE, ocp.args.StandardRestore)
    registry.add(_META, ocp.args.JsonSave)
    registry.add(_META, ocp.args.JsonRestore)
    options = ocp.CheckpointManagerOptions(
        save_decision_policy=ocp.checkpoint_managers.AnySavePolicy(
            [
                ocp.checkpoint_managers.FixedIntervalPolicy(save_interval_steps),
                ocp.checkpoint_managers.PreemptionCheckpointingPolicy(),
            ]
        ),
        preservation_policy=ocp.checkpoint_managers.LatestN(n=max_to_keep),
        create=not read_only,
        cleanup_tmp_directories=not read_only,
        enable_async_checkpointing=async_save,
    )
    self._manager = ocp.CheckpointManager(
        self.directory, options=options, handler_registry=registry
    )

  # -- queries -------------------------------------------------------------

  def latest_step(self) -> int | None:
    """Newest step in the directory (`None` if there is none).

    Only finalized steps found on disk when this Checkpointer was opened are
    reported, plus steps this instance has `save`d since (orbax lists an
    in-flight async save immediately; `restore` waits for it).
    """
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def read_meta(self, step: int) -> dict:
    """The JSON meta of `step` alone (none of the arrays are read)."""
    restored = self._manager.restore(
        int(step), args=ocp.args.Composite(**{_META: ocp.args.JsonRestore()})
    )
    return dict(restored[_META] or {})

  def should_save(self, step: int) -> bool:
    return self._manager.should_save(step)

  # -- save ----------------------------------------------------------------

  def save(
      self, step: int, state: Any, meta: Mapping[str, Any] | None = None, force: bool = False
  ) -> bool:
    """Save `state` (pytree of jax arrays) and `meta` (JSON-able dict).

    Returns True if a save was started. Without `force`, the save interval
    decides. A step that already exists is never overwritten: it returns
    False (with a warning when `force`). Must be called on every process.
    """
    step = int(step)
    if step in self._manager.all_steps():
      if force:
        log.warning(
            "checkpoint step %d already exists in %s; not overwriting", step, self.directory
        )
      return False
    meta_json = _jsonable(dict(meta or {}))
    return self._manager.save(
        step,
        args=ocp.args.Composite(
            **{
                _STATE: ocp.args.StandardSave(_to_physical(state)),
                _META: ocp.args.JsonSave(meta_json),
            }
        ),
        force=force,
    )

  # -- restore -------------------------------------------------------------

  def _step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def _check_structure(self, step: int, physical_abstract: Any, strict_dtype: bool):
    """Compare key paths / shapes / dtypes against orbax's on-disk metadata."""
    where = f"checkpoint {self._step_dir(step)!r}"
    try:
      saved = self._manager.item_metadata(step)[_STATE]
    except Exception as e:  # noqa: BLE001 - rewrap with the directory name
      raise CheckpointMismatchError(f"cannot read metadata of {where}: {e}") from e
    if saved is None:
      raise CheckpointMismatchError(f"{where} has no '{_STATE}' item")
    saved_tree = getattr(saved, "tree", saved)
    saved_leaves = {
        _norm_path(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(saved_tree)[0]
    }
    want_leaves = {
        _norm_path(p): leaf
        for p, leaf in jax.tree_util.tree_flatten_with_path(physical_abstract)[0]
    }
    missing = sorted(set(want_leaves) - set(saved_leaves))
    unexpected = sorted(set(saved_leaves) - set(want_leaves))
    problems = []
    if missing:
      problems.append(
          f"keys missing from the checkpoint: {missing[:_MAX_LISTED]}"
          + (" ..." if len(missing) > _MAX_LISTED else "")
      )
    if unexpected:
      problems.append(
          f"keys in the checkpoint but not in the abstract state: {unexpected[:_MAX_LISTED]}"
          + (" ..." if len(unexpected) > _MAX_LISTED else "")
      )
    bad = []
    for k in sorted(set(want_leaves) & set(saved_leaves)):
      w, s = want_leaves[k], saved_leaves[k]
      s_shape = tuple(getattr(s, "shape", ()) or ())
      s_dtype = getattr(s, "dtype", None)
      if tuple(w.shape) != s_shape:
        bad.append(f"{k}: shape {s_shape} on disk vs {tuple(w.shape)} requested")
      elif strict_dtype and s_dtype is not None and np.dtype(s_dtype) != np.dtype(w.dtype):
        bad.append(f"{k}: dtype {np.dtype(s_dtype)} on disk vs {np.dtype(w.dtype)} requested")
    if bad:
      problems.append(
          "mismatching leaves: "
          + "; ".join(bad[:_MAX_LISTED])
          + (" ..." if len(bad) > _MAX_LISTED else "")
      )
    if problems:
      raise CheckpointMismatchError(
          f"{where} does not match the abstract state: " + " | ".join(problems)
      )

  def restore(
      self, step: int | None, abstract_state: Any, *, strict_dtype: bool = True
  ) -> tuple[Any, dict]:
    """Restore `(state, meta)` of `step` (`None`: latest step).

    `abstract_state` is a pytree of `jax.ShapeDtypeStruct` with
    shardings; each array is read directly into its target sharding, which
    need not match the sharding it was saved with. Typed PRNG keys in
    `abstract_state` are rebuilt from the stored key data.

    Raises FileNotFoundError if the step does not exist and
    CheckpointMismatchError (naming the directory and the offending keys)
    if the stored tree's keys / shapes (and dtypes, if `strict_dtype`)
    differ from `abstract_state`. With `strict_dtype=False` orbax casts
    to the requested dtypes.
    """
    self.wait()
    if step is None:
      step = self.latest_step()
      if step is None:
        raise FileNotFoundError(f"no checkpoint found in {self.directory!r}")
    step = int(step)
    if step not in self._manager.all_steps():
      # Maybe written by another Checkpointer after this one was opened.
      self._manager.reload()
      if step not in self._manager.all_steps():
        raise FileNotFoundError(
            f"no finalized checkpoint for step {step} in {self.directory!r} "
            f"(available: {self.all_steps()})"
        )
    physical = _abstract_to_physical(abstract_state)
    self._check_structure(step, physical, strict_dtype)
    try:
      restored = self._manager.restore(
          step,
          args=ocp.args.Composite(
              **{
                  _STATE: ocp.args.StandardRestore(physical),
                  _META: ocp.args.JsonRestore(),
              }
          ),
      )
    except ValueError as e:
      raise CheckpointMismatchError(
          f"restoring checkpoint {self._step_dir(step)!r} failed: {e}"
      ) from e
    state = _from_physical(restored[_STATE], abstract_state)
    meta = restored[_META] or {}
    return state, dict(meta)

  # -- lifecycle -----------------------------------------------------------

  def _await_tmp_cleanup(self) -> None:
    # orbax quirk: the removal of stale '<step>.orbax-checkpoint-tmp-*' dirs
    # (cleanup_tmp_directories=True) runs in the background and is only
    # awaited by the next save(); neither wait_until_finished() nor close()
    # joins it. Join it here (private hook, guarded in case it moves).
    fn = getattr(self._manager, "_maybe_await_cleanup_tmp_directory", None)
    if fn is not None:
      fn()

  def wait(self) -> None:
    """Block until any in-flight async save is finalized (all processes)."""
    self._manager.wait_until_finished()
    self._await_tmp_cleanup()

  def close(self) -> None:
    """Wait for pending saves / deletions and release resources."""
    self._await_tmp_cleanup()
    self._manager.close()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
