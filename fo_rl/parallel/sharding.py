"""Meshes and the one logical-axis rules table.

Every parameter carries logical axis names (metadata `axes` on its nnx.Param). A rules table, kept in the
config, maps each logical name to zero or more mesh axes; `logical_to_spec` applies it. The mesh always has
the four axes MESH_AXES (size-1 axes are free), so one rules table serves every mesh shape.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "expert", "tensor")

# Logical name -> mesh axes. `batch` is the activation batch; the rest name parameter dimensions.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp", "expert")),
    ("vocab", "tensor"),
    # Non-expert weights (and their Adam moments) split their embed dim over fsdp and expert together
    # (MaxText's convention): on a mesh with an expert axis they are not replicated over it. An expert
    # weight [E, D, F] keeps E on expert and D on fsdp (an axis is used once per array).
    ("embed", ("fsdp", "expert")),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("expert", "expert"),
    ("expert_mlp", "tensor"),
    ("router", None),
    ("norm", None),
)

Rules = Sequence[tuple[str, Any]]


def _as_axes(value) -> tuple[str, ...]:
  if value is None:
    return ()
  if isinstance(value, str):
    return (value,)
  return tuple(value)


def validate_rules(rules: Rules, where: str = "parallel.rules") -> dict[str, tuple[str, ...]]:
  """Rules as a dict; a rule naming an unknown mesh axis is an error naming the rule."""
  table: dict[str, tuple[str, ...]] = {}
  for i, rule in enumerate(rules):
    if len(rule) != 2:
      raise ValueError(f"{where}[{i}]={rule!r}: a rule is a pair (logical_name, mesh_axes)")
    name, axes = rule[0], _as_axes(rule[1])
    unknown = [a for a in axes if a not in MESH_AXES]
    if unknown:
      raise ValueError(
          f"{where}[{i}]: rule {name!r} names unknown mesh axis {unknown[0]!r}; "
          f"mesh axes are {MESH_AXES}"
      )
    if name in table:
      raise ValueError(f"{where}[{i}]: logical axis {name!r} has two rules")
    table[name] = axes
  return table


def mesh_shape(
    mesh_cfg: Mapping[str, int], num_devices: int, where: str = "parallel.mesh"
) -> tuple[int, ...]:
  """Resolve {data, fsdp, expert, tensor} sizes; one of them may be -1 (fill with what is left)."""
  unknown = sorted(set(mesh_cfg) - set(MESH_AXES))
  if unknown:
    raise ValueError(f"{where}: unknown mesh axis {unknown[0]!r}; mesh axes are {MESH_AXES}")
  sizes = [int(mesh_cfg.get(a, 1)) for a in MESH_AXES]
  fills = [i for i, s in enumerate(sizes) if s == -1]
  if len(fills) > 1:
    raise ValueError(f"{where}: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
  for a, s in zip(MESH_AXES, sizes):
    if s == 0 or s < -1:
      raise ValueError(f"{where}.{a}={s}: must be a positive size or -1")
  known = math.prod(s for s in sizes if s != -1)
  if fills:
    if num_devices % known:
      raise ValueError(f"{where}: {dict(zip(MESH_AXES, sizes))} cannot fill {num_devices} devices")
    sizes[fills[0]] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(
        f"{where}: {dict(zip(MESH_AXES, sizes))} has {math.prod(sizes)} devices but "
        f"{num_devices} are available; set the sizes to multiply to {num_devices} "
        f"(or make one of them -1)"
    )
  return tuple(sizes)


def make_mesh(
    mesh_cfg: Mapping[str, int] | None = None, devices=None, where: str = "parallel.mesh"
) -> Mesh:
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(mesh_cfg or {"fsdp": -1}, len(devices), where)
  if devices[0].platform == "tpu":
    from jax.experimental import mesh_utils

    arr = mesh_utils.create_device_mesh(shape, devices)
  else:
    arr = np.asarray(devices).reshape(shape)
  return Mesh(arr, MESH_AXES)


def logical_to_spec(
    axes: Sequence[str | None], rules: Rules, shape=None, mesh: Mesh | None = None, name: str = "?"
) -> P:
  """PartitionSpec for logical `axes` under `rules`; checks divisibility when shape and mesh are given."""
  table = validate_rules(rules) if not isinstance(rules, dict) else rules
  used: set[str] = set()
  out = []
  for dim, logical in enumerate(axes):
    if logical is None:
      out.append(None)
      continue
    if logical not in table:
      raise ValueError(
          f"parameter {name}: logical axis {logical!r} has no rule in parallel.rules "
          f"(known: {sorted(table)})"
      )
    mesh_axes = tuple(a for a in table[logical] if a not in used)
    used.update(mesh_axes)
    if shape is not None and mesh is not None and mesh_axes:
      n = math.prod(mesh.shape[a] for a in mesh_axes)
      if shape[dim] % n:
        raise ValueError(
            f"parameter {name}: dimension {dim} ({logical!r}, size {shape[dim]}) is not "
            f"divisible by mesh axes {mesh_axes} (size {n}); change parallel.mesh or "
            f"parallel.rules"
        )
    out.append(mesh_axes[0] if len(mesh_axes) == 1 else (mesh_axes or None))
  return P(*out)


def _path_name(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def state_shardings(abstract_state, mesh: Mesh, rules: Rules):
  """A pytree like `abstract_state` (an nnx.State of Params) with a NamedSharding per variable."""
  table = validate_rules(rules)

  def one(path, var):
    axes = var.get_metadata().get("axes")
    if axes is None:
      raise ValueError(f"parameter {_path_name(path)} has no logical axis names")
    value = var.get_value()
    shape = getattr(value, "shape", None)
    spec = logical_to_spec(axes, table, shape, mesh, _path_name(path))
    return var.replace(NamedSharding(mesh, spec))

  return jax.tree_util.tree_map_with_path(
      one, abstract_state, is_leaf=lambda x: isinstance(x, nnx.Variable)
  )


def dividing_axes(axes, mesh: Mesh, size: int) -> tuple[str, ...]:
  """The mesh axes of `axes`, in order, that split a dimension of `size` evenly (each one kept only if
  the product so far still divides it)."""
  keep, n = [], 1
  for a in axes:
    if size % (n * mesh.shape[a]) == 0:
      keep.append(a)
      n *= mesh.shape[a]
  return tuple(keep)


def batch_ways(rules: Rules, mesh_sizes: Mapping[str, int]) -> int:
  """How many ways the mesh axes of the `batch` rule split a batch (the product of their sizes)."""
  return math.prod(mesh_sizes[a] for a in validate_rules(rules).get("batch", ()))


def check_batch_split(
    rules: Rules, mesh_sizes: Mapping[str, int], batch: int, what: str, where: str = "parallel.mesh"
) -> None:
  """The mesh axes of the `batch` rule (those of size > 1) must split a batch of `batch` rows evenly:
  otherwise `batch_spec` would leave some of them out and every device on them would repeat the same
  rows' compute. A ValueError naming `where`, the axes and the batch size."""
  axes = [a for a in validate_rules(rules).get("batch", ()) if mesh_sizes[a] > 1]
  n = batch_ways(rules, mesh_sizes)
  if batch % n:
    sizes = ", ".join(f"{a}={mesh_sizes[a]}" for a in axes)
    raise ValueError(
        f"{where}: the batch is split over mesh axes {sizes} ({n} ways), which does not divide the "
        f"{what} of {batch} rows; change {where} (or the 'batch' rule of parallel.rules) or the batch "
        f"size (the rows would otherwise be replicated, repeating their compute)"
    )


def inference_rules(rules: Rules) -> tuple[tuple[str, Any], ...]:
  """The sampler's rules from the trainer's: the same, but non-expert weights (the `embed` rule) are not
  split over the `expert` axis, which a decode step would all-gather them over on every token (the
  trainer amortizes that gather over a whole sequence; a decode step cannot)."""
  return tuple(
      (n, tuple(a for a in _as_axes(v) if a != "expert") or None) if n == "embed" else (n, v)
      for n, v in rules
  )


def batch_spec(
    rules: Rules, ndim: int, mesh: Mesh | None = None, batch_size: int | None = None
) -> P:
  """Spec of an activation [B, ...]: B over the mesh axes the `batch` rule names (those that divide B)."""
  axes = validate_rules(rules).get("batch", ())
  if mesh is not None and batch_size is not None:
    axes = dividing_axes(axes, mesh, batch_size)
  lead = axes[0] if len(axes) == 1 else (tuple(axes) or None)
  return P(lead, *([None] * (ndim - 1)))
