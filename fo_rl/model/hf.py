"""Hugging Face Qwen3-MoE / Qwen3 checkpoints (config.json + *.safetensors) <-> fo_rl parameters.

    cfg, graphdef, state = load_hf_checkpoint("Qwen3-30B-A3B", mesh=mesh, param_dtype="bfloat16")
    save_hf_checkpoint("out", cfg, state)  # readable by transformers' from_pretrained

`TABLE` is the whole mapping: one row per fo_rl parameter, giving its Hugging Face tensor name and the
transforms each way. Hugging Face stores nn.Linear weights as [out, in]; fo_rl stores [in, out] with the head
axes split out (q_proj [D, N, H], o_proj [N, H, D]) and the experts stacked on a leading axis ([E, D, F]).

On-disk expert layouts read:
  * per expert (what the Hub's Qwen3-MoE checkpoints hold, and what transformers 5.x's save_pretrained
    writes, converting back from its in-memory fused parameters):
      model.layers.{i}.mlp.gate.weight                     [E, D]   the router
      model.layers.{i}.mlp.experts.{j}.gate_proj.weight    [F, D]
      model.layers.{i}.mlp.experts.{j}.up_proj.weight      [F, D]
      model.layers.{i}.mlp.experts.{j}.down_proj.weight    [D, F]
  * fused (transformers 5.x's in-memory Qwen3MoeExperts, as a state dict saved without conversion):
      model.layers.{i}.mlp.experts.gate_up_proj            [E, 2F, D]  gate rows first, then up
      model.layers.{i}.mlp.experts.down_proj               [E, D, F]
Saving always writes the per-expert layout.

Public API:
  load_hf_checkpoint(dir, *, mesh, rules, dtype, param_dtype, **overrides) -> (cfg, graphdef, state)
  save_hf_checkpoint(dir, cfg, state, *, max_shard_bytes, dtype, extra_config) -> files written
  load_hf_config(dir, **overrides) / config_from_hf(dict) / config_to_hf(cfg) -> config.json <-> cfg
  hf_tensors(cfg, state, dtype) -> iterator of (HF name, numpy array)

Loading is shape-first: the model's abstract state and its shardings are computed without allocating
anything, every tensor name and shape is checked against the files before any data is read, and each
converted tensor is placed directly into its NamedSharding.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from typing import Any, Callable, Iterator, Mapping

import jax
import ml_dtypes  # noqa: F401  (registers bfloat16 & co. with numpy; safetensors' numpy API needs it)
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from fo_rl.model.config import ModelConfig
from fo_rl.model.init import abstract_model
from fo_rl.parallel.sharding import DEFAULT_RULES, Rules, state_shardings

CONFIG_NAME = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3


# ------------------------------------------------------------------------------------------------
# The mapping table.
# ------------------------------------------------------------------------------------------------
Transform = Callable[
    [Any, ModelConfig], Any
]  # array (numpy, or jax for shape inference), cfg -> array


def _same(w, cfg):
  return w


def _linear(w, cfg):
  """nn.Linear [out, in] <-> fo_rl [in, out] (its own inverse)."""
  return w.T


def _heads_from_hf(n_heads: str) -> Transform:
  """[n*H, D] -> [D, n, H] (q_proj, k_proj, v_proj)."""
  return lambda w, cfg: w.T.reshape(cfg.hidden_size, getattr(cfg, n_heads), cfg.head_dim)


def _heads_to_hf(w, cfg):
  """[D, n, H] -> [n*H, D]."""
  return w.reshape(cfg.hidden_size, -1).T


def _o_from_hf(w, cfg):
  """[D, N*H] -> [N, H, D]."""
  return w.T.reshape(cfg.num_heads, cfg.head_dim, cfg.hidden_size)


def _o_to_hf(w, cfg):
  """[N, H, D] -> [D, N*H]."""
  return w.reshape(-1, cfg.hidden_size).T


@dataclasses.dataclass(frozen=True)
class Fused:
  """An alternative on-disk source for a stacked expert parameter: one [E, ...] tensor."""

  hf: str  # name template, {i} = layer
  shape: Callable[[ModelConfig], tuple[int, ...]]
  from_hf: Transform  # the whole [E, ...] tensor -> fo_rl's [E, ...]


@dataclasses.dataclass(frozen=True)
class Entry:
  path: str  # fo_rl parameter path, '/'-joined; {i} = layer index
  hf: str  # Hugging Face tensor name; {i} = layer, {j} = expert (fo_rl stacks experts on axis 0)
  to_hf: Transform  # fo_rl -> HF (for {j} entries: applied to one expert's slice)
  from_hf: Transform  # HF -> fo_rl (for {j} entries: applied to one expert's tensor)
  layers: str | None = None  # None: not per layer; "all", "moe" or "dense": which layers have it
  fused: Fused | None = None  # expert entries: the fused alternative source (read only)

  @property
  def per_expert(self) -> bool:
    return "{j}" in self.hf


def _F(cfg):
  return cfg.moe_intermediate_size


TABLE: tuple[Entry, ...] = (
    Entry("embed_tokens", "model.embed_tokens.weight", _same, _same),
    Entry(
        "layers/{i}/input_layernorm/weight",
        "model.layers.{i}.input_layernorm.weight",
        _same,
        _same,
        "all",
    ),
    Entry(
        "layers/{i}/self_attn/q_proj",
        "model.layers.{i}.self_attn.q_proj.weight",
        _heads_to_hf,
        _heads_from_hf("num_heads"),
        "all",
    ),
    Entry(
        "layers/{i}/self_attn/k_proj",
        "model.layers.{i}.self_attn.k_proj.weight",
        _heads_to_hf,
        _heads_from_hf("num_kv_heads"),
        "all",
    ),
    Entry(
        "layers/{i}/self_attn/v_proj",
        "model.layers.{i}.self_attn.v_proj.weight",
        _heads_to_hf,
        _heads_from_hf("num_kv_heads"),
        "all",
    ),
    Entry(
        "layers/{i}/self_attn/o_proj",
        "model.layers.{i}.self_attn.o_proj.weight",
        _o_to_hf,
        _o_from_hf,
        "all",
    ),
    Entry(
        "layers/{i}/self_attn/q_norm/weight",
        "model.layers.{i}.self_attn.q_norm.weight",
        _same,
        _same,
        "all",
    ),
    Entry(
        "layers/{i}/self_attn/k_norm/weight",
        "model.layers.{i}.self_attn.k_norm.weight",
        _same,
        _same,
        "all",
    ),
    Entry(
        "layers/{i}/post_attention_layernorm/weight",
        "model.layers.{i}.post_attention_layernorm.weight",
        _same,
        _same,
        "all",
    ),
    # Dense (mlp_only / non-sparse) layers, and every layer of a dense Qwen3.
    Entry(
        "layers/{i}/mlp/gate_proj",
        "model.layers.{i}.mlp.gate_proj.weight",
        _linear,
        _linear,
        "dense",
    ),
    Entry(
        "layers/{i}/mlp/up_proj", "model.layers.{i}.mlp.up_proj.weight", _linear, _linear, "dense"
    ),
    Entry(
        "layers/{i}/mlp/down_proj",
        "model.layers.{i}.mlp.down_proj.weight",
        _linear,
        _linear,
        "dense",
    ),
    # MoE layers.
    Entry("layers/{i}/mlp/router", "model.layers.{i}.mlp.gate.weight", _linear, _linear, "moe"),
    Entry(
        "layers/{i}/mlp/gate_proj",
        "model.layers.{i}.mlp.experts.{j}.gate_proj.weight",
        _linear,
        _linear,
        "moe",
        Fused(
            "model.layers.{i}.mlp.experts.gate_up_proj",
            lambda c: (c.num_experts, 2 * _F(c), c.hidden_size),
            lambda w, c: w[:, : _F(c)].transpose(0, 2, 1),
        ),
    ),
    Entry(
        "layers/{i}/mlp/up_proj",
        "model.layers.{i}.mlp.experts.{j}.up_proj.weight",
        _linear,
        _linear,
        "moe",
        Fused(
            "model.layers.{i}.mlp.experts.gate_up_proj",
            lambda c: (c.num_experts, 2 * _F(c), c.hidden_size),
            lambda w, c: w[:, _F(c) :].transpose(0, 2, 1),
        ),
    ),
    Entry(
        "layers/{i}/mlp/down_proj",
        "model.layers.{i}.mlp.experts.{j}.down_proj.weight",
        _linear,
        _linear,
        "moe",
        Fused(
            "model.layers.{i}.mlp.experts.down_proj",
            lambda c: (c.num_experts, c.hidden_size, _F(c)),
            lambda w, c: w.transpose(0, 2, 1),
        ),
    ),
    Entry("norm/weight", "model.norm.weight", _same, _same),
    Entry("lm_head", "lm_head.weight", _linear, _linear),  # absent when tie_word_embeddings
)
TIED_HEAD = "lm_head.weight"


def _expand(cfg: ModelConfig) -> dict[str, tuple[Entry, int | None]]:
  """Concrete fo_rl path -> (entry, layer index) for this config."""
  out = {}
  for e in TABLE:
    if e.layers is None:
      if e.path == "lm_head" and cfg.tie_word_embeddings:
        continue
      out[e.path] = (e, None)
      continue
    for i in range(cfg.num_layers):
      moe = cfg.is_moe_layer(i)
      if e.layers == "all" or (e.layers == "moe") == moe:
        out[e.path.format(i=i)] = (e, i)
  return out


def _path_str(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def _is_var(x) -> bool:
  return isinstance(x, nnx.Variable)


def _hf_shape(entry: Entry, fo_shape: tuple[int, ...], cfg: ModelConfig) -> tuple[int, ...]:
  """Shape of the HF tensor (one expert's, for {j} entries) for a fo_rl parameter of `fo_shape`."""
  if entry.per_expert:
    fo_shape = fo_shape[1:]
  out = jax.eval_shape(lambda w: entry.to_hf(w, cfg), jax.ShapeDtypeStruct(fo_shape, np.float32))
  return tuple(out.shape)


# ------------------------------------------------------------------------------------------------
# Config.
# ------------------------------------------------------------------------------------------------
_MOE_ONLY_KEYS = (
    "num_experts",
    "num_local_experts",
    "num_experts_per_tok",
    "moe_intermediate_size",
    "norm_topk_prob",
    "decoder_sparse_step",
    "mlp_only_layers",
)


def config_from_hf(hf: Mapping[str, Any], where: str = "config.json", **overrides) -> ModelConfig:
  """ModelConfig from a Qwen3MoeConfig / Qwen3Config dict (transformers 4.x or 5.x spelling).

  Features fo_rl does not implement (rope scaling, sliding windows, attention bias, other activations)
  are an error rather than a silently different model.
  """
  hf = dict(hf)
  model_type = hf.get("model_type")
  if model_type not in ("qwen3_moe", "qwen3"):
    raise ValueError(
        f"{where}: model_type={model_type!r} is not supported (expected 'qwen3_moe' or " f"'qwen3')"
    )
  if hf.get("hidden_act", "silu") != "silu":
    raise ValueError(f"{where}: hidden_act={hf['hidden_act']!r} is not supported (only 'silu')")
  if hf.get("attention_bias", False):
    raise ValueError(f"{where}: attention_bias=true is not supported")
  if hf.get("use_sliding_window", False):
    raise ValueError(f"{where}: use_sliding_window=true is not supported")
  # transformers 5 moved rope_theta into rope_parameters; 4.x had rope_theta (+ rope_scaling).
  rope = hf.get("rope_parameters") or {}
  scaling = hf.get("rope_scaling") or {}
  for name, r in (("rope_parameters", rope), ("rope_scaling", scaling)):
    kind = r.get("rope_type", r.get("type", "default"))
    if kind != "default":
      raise ValueError(f"{where}: {name} of type {kind!r} is not supported (only 'default' RoPE)")
  theta = hf.get("rope_theta", rope.get("rope_theta"))
  if theta is not None:
    hf["rope_theta"] = theta
  if model_type == "qwen3":
    for k in _MOE_ONLY_KEYS:
      hf.pop(k, None)
    hf["num_experts"] = 0
  else:
    if "num_experts" not in hf and "num_local_experts" in hf:
      hf["num_experts"] = hf["num_local_experts"]
    if hf.get("mlp_only_layers") is None:
      hf["mlp_only_layers"] = []
  try:
    return ModelConfig.from_hf(hf, **overrides)
  except (KeyError, TypeError, ValueError) as e:
    raise ValueError(f"{where}: cannot build a ModelConfig: {e}") from e


def config_to_hf(cfg: ModelConfig, dtype: str = "float32") -> dict[str, Any]:
  """config.json contents: Qwen3MoeConfig (a dense model is written as a Qwen3Config)."""
  d = cfg.to_hf()
  d.update(
      torch_dtype=dtype,
      dtype=dtype,
      rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
  )
  if cfg.num_experts == 0:
    for k in _MOE_ONLY_KEYS + ("output_router_logits", "router_aux_loss_coef"):
      d.pop(k, None)
    d.update(model_type="qwen3", architectures=["Qwen3ForCausalLM"])
  return d


def load_hf_config(directory: str, **overrides) -> ModelConfig:
  path = os.path.join(directory, CONFIG_NAME)
  try:
    with open(path) as f:
      hf = json.load(f)
  except FileNotFoundError:
    raise ValueError(f"HF checkpoint {directory!r}: no {CONFIG_NAME}") from None
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not valid JSON: {e}") from None
  return config_from_hf(hf, where=path, **overrides)


# ------------------------------------------------------------------------------------------------
# Reading safetensors.
# ------------------------------------------------------------------------------------------------
class _Files:
  """Tensor name -> (file, shape) over a checkpoint directory; reads tensors lazily (numpy)."""

  def __init__(self, directory: str):
    from safetensors import safe_open

    self._open = safe_open
    self.directory = directory
    index_path = os.path.join(directory, INDEX_NAME)
    if os.path.exists(index_path):
      with open(index_path) as f:
        weight_map = json.load(f)["weight_map"]
      files = sorted(set(weight_map.values()))
    else:
      weight_map = None
      files = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
    if not files:
      raise ValueError(f"HF checkpoint {directory!r}: no *.safetensors files")
    self.file: dict[str, str] = {}
    self.shape: dict[str, tuple[int, ...]] = {}
    for fname in files:
      path = os.path.join(directory, fname)
      if not os.path.exists(path):
        raise ValueError(f"{index_path}: names file {fname!r}, which does not exist")
      with safe_open(path, framework="numpy") as f:
        for name in f.keys():
          if name in self.file:
            raise ValueError(
                f"HF checkpoint {directory!r}: tensor {name!r} is in both "
                f"{self.file[name]!r} and {fname!r}"
            )
          self.file[name] = fname
          self.shape[name] = tuple(f.get_slice(name).get_shape())
    if weight_map is not None:
      for name, fname in weight_map.items():
        if self.file.get(name) != fname:
          actual = f"it is in {self.file[name]!r}" if name in self.file else "it is not there"
          raise ValueError(f"{index_path}: maps tensor {name!r} to {fname!r}, but {actual}")
    self._handles: dict[str, Any] = {}

  def where(self, name: str) -> str:
    return f"tensor {name!r} in {os.path.join(self.directory, self.file[name])!r}"

  def get(self, name: str) -> np.ndarray:
    fname = self.file[name]
    if fname not in self._handles:
      self._handles[fname] = self._open(os.path.join(self.directory, fname), framework="numpy")
    return self._handles[fname].get_tensor(name)

  def close(self):
    self._handles.clear()


@dataclasses.dataclass
class _Source:
  """How one fo_rl parameter is read: HF names (+ expected shapes) and the function assembling it."""

  names: list[tuple[str, tuple[int, ...]]]
  build: Callable[[Callable[[str], np.ndarray]], np.ndarray]


def _plan_source(
    entry: Entry, layer: int | None, fo_shape, cfg: ModelConfig, files: _Files
) -> _Source:
  name = entry.hf.format(i=layer, j="{j}")
  shape = _hf_shape(entry, fo_shape, cfg)
  if not entry.per_expert:
    return _Source([(name, shape)], lambda get: entry.from_hf(get(name), cfg))
  names = [name.format(j=j) for j in range(cfg.num_experts)]
  if entry.fused is not None and not any(n in files.file for n in names):
    fused = entry.fused.hf.format(i=layer)
    if fused in files.file:
      return _Source(
          [(fused, tuple(entry.fused.shape(cfg)))], lambda get: entry.fused.from_hf(get(fused), cfg)
      )
  return _Source(
      [(n, shape) for n in names], lambda get: np.stack([entry.from_hf(get(n), cfg) for n in names])
  )


def _check(files: _Files, sources: Mapping[str, _Source], cfg: ModelConfig) -> None:
  """Every needed tensor present with its shape, and nothing else on disk."""
  needed: dict[str, tuple[int, ...]] = {}
  for src in sources.values():
    needed.update(src.names)
  for name, shape in needed.items():
    if name not in files.file:
      raise ValueError(
          f"HF checkpoint {files.directory!r}: missing tensor {name!r} (shape {shape})"
      )
    if files.shape[name] != shape:
      raise ValueError(
          f"HF checkpoint: {files.where(name)} has shape {files.shape[name]}, expected "
          f"{shape} for this config.json"
      )
  for name in files.file:
    if name in needed:
      continue
    if name == TIED_HEAD and cfg.tie_word_embeddings:
      embed = TABLE[0].hf
      if files.shape[name] != files.shape[embed] or not np.array_equal(
          files.get(name), files.get(embed)
      ):
        raise ValueError(
            f"HF checkpoint: {files.where(name)} differs from {embed!r}, but "
            f"tie_word_embeddings is true (fo_rl would use {embed!r} as the head)"
        )
      continue
    raise ValueError(
        f"HF checkpoint: unexpected {files.where(name)} (not part of a "
        f"{'tied' if cfg.tie_word_embeddings else 'untied'} {cfg.num_layers}-layer model "
        f"with MoE layers {list(cfg.moe_layers)})"
    )


def load_hf_checkpoint(
    directory: str,
    *,
    mesh: Mesh | None = None,
    rules: Rules = DEFAULT_RULES,
    dtype: str | None = None,
    param_dtype: str | None = None,
    seed: int = 0,
    **overrides,
):
  """Read a Hugging Face Qwen3-MoE / Qwen3 checkpoint -> (ModelConfig, graphdef, state).

  dtype / param_dtype (and any other ModelConfig field in `overrides`, e.g. moe_impl) override the
  defaults; parameters are cast to param_dtype. With a mesh each parameter is created directly in its
  NamedSharding (per `rules`); without one it lands on the default device.
  Raises ValueError naming the tensor (and file) on a missing, unexpected or wrongly shaped tensor.
  """
  if dtype is not None:
    overrides["dtype"] = dtype
  if param_dtype is not None:
    overrides["param_dtype"] = param_dtype
  cfg = load_hf_config(directory, **overrides)
  graphdef, abstract = abstract_model(cfg, mesh, rules, seed)
  shardings = state_shardings(abstract, mesh, rules) if mesh is not None else None
  files = _Files(directory)
  table = _expand(cfg)

  leaves = jax.tree_util.tree_flatten_with_path(abstract, is_leaf=_is_var)[0]
  sources: dict[str, _Source] = {}
  for path, var in leaves:
    p = _path_str(path)
    if p not in table:
      raise ValueError(f"internal: fo_rl parameter {p} has no row in fo_rl.model.hf.TABLE")
    entry, layer = table.pop(p)
    sources[p] = _plan_source(entry, layer, var.get_value().shape, cfg, files)
  if table:
    raise ValueError(f"internal: TABLE rows {sorted(table)} match no fo_rl parameter")
  _check(files, sources, cfg)

  pd = np.dtype(cfg.param_dtype)
  flat_shardings = (
      {
          _path_str(p): v.get_value()
          for p, v in jax.tree_util.tree_flatten_with_path(shardings, is_leaf=_is_var)[0]
      }
      if shardings is not None
      else {}
  )

  def load_one(path, var):
    p = _path_str(path)
    want = var.get_value()
    arr = np.ascontiguousarray(sources[p].build(files.get).astype(pd))
    if arr.shape != tuple(want.shape):
      raise ValueError(f"internal: converted {p} has shape {arr.shape}, expected {want.shape}")
    if p in flat_shardings:
      value = jax.make_array_from_callback(arr.shape, flat_shardings[p], lambda idx: arr[idx])
    else:
      value = jax.device_put(arr)
    return var.replace(value)

  try:
    state = jax.tree_util.tree_map_with_path(load_one, abstract, is_leaf=_is_var)
  finally:
    files.close()
  return cfg, graphdef, state


# ------------------------------------------------------------------------------------------------
# Writing.
# ------------------------------------------------------------------------------------------------
def _host_params(state) -> dict[str, Any]:
  """'/'-joined path -> array (still on device), from an nnx.State or a nested (pure) dict."""
  return {
      _path_str(p): (v.get_value() if _is_var(v) else v)
      for p, v in jax.tree_util.tree_flatten_with_path(state, is_leaf=_is_var)[0]
  }


def hf_tensors(cfg: ModelConfig, state, dtype: str = "float32") -> Iterator[tuple[str, np.ndarray]]:
  """(HF name, numpy array) for every tensor of the per-expert Hub layout, in TABLE order."""
  for name, _, fetch in _hf_plan(cfg, state, dtype):
    yield name, fetch()


def _hf_plan(cfg: ModelConfig, state, dtype: str):
  """[(HF name, nbytes, fetch() -> numpy array)] from shapes alone; each fo_rl parameter is copied to
  host once, when first fetched (fetch in order)."""
  params = _host_params(state)
  table = _expand(cfg)
  missing = sorted(set(table) - set(params))
  extra = sorted(set(params) - set(table))
  if missing or extra:
    raise ValueError(
        f"state does not match the config: missing parameters {missing[:5]}, "
        f"unexpected parameters {extra[:5]}"
    )
  expected = {
      _path_str(p): tuple(v.get_value().shape)
      for p, v in jax.tree_util.tree_flatten_with_path(abstract_model(cfg)[1], is_leaf=_is_var)[0]
  }
  for p, value in params.items():
    if tuple(getattr(value, "shape", ())) != expected[p]:
      raise ValueError(
          f"parameter {p} has shape {tuple(getattr(value, 'shape', ()))}, the config "
          f"gives {expected[p]}"
      )
  dt = np.dtype(dtype)
  cache: dict[str, np.ndarray] = {}

  def host(p):
    if p not in cache:
      cache.clear()
      cache[p] = np.asarray(jax.device_get(params[p]))
    return cache[p]

  plan = []
  for p, (entry, layer) in table.items():
    value = params[p]
    if not isinstance(value, (jax.Array, np.ndarray)):
      raise ValueError(f"parameter {p}: cannot save a {type(value).__name__} (plain arrays only)")
    nbytes = math.prod(_hf_shape(entry, tuple(value.shape), cfg)) * dt.itemsize
    if entry.per_expert:
      for j in range(cfg.num_experts):
        plan.append(
            (
                entry.hf.format(i=layer, j=j),
                nbytes,
                lambda p=p, e=entry, j=j: np.ascontiguousarray(e.to_hf(host(p)[j], cfg).astype(dt)),
            )
        )
    else:
      plan.append(
          (
              entry.hf.format(i=layer),
              nbytes,
              lambda p=p, e=entry: np.ascontiguousarray(e.to_hf(host(p), cfg).astype(dt)),
          )
      )
  return plan


def save_hf_checkpoint(
    directory: str,
    cfg: ModelConfig,
    state,
    *,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    dtype: str = "float32",
    extra_config: Mapping[str, Any] | None = None,
) -> list[str]:
  """Write config.json and the weights (Hub per-expert naming) as safetensors; returns the files written.

  One `model.safetensors` when the total fits in max_shard_bytes, else `model-0000k-of-0000n.safetensors`
  shards plus `model.safetensors.index.json`. `extra_config` entries are merged into config.json
  (e.g. bos/eos token ids). The state must be fully addressable from this process.
  """
  from safetensors.numpy import save_file

  if max_shard_bytes <= 0:
    raise ValueError(f"max_shard_bytes={max_shard_bytes}: must be positive")
  plan = _hf_plan(cfg, state, dtype)
  dt = np.dtype(dtype)
  sizes = [nbytes for _, nbytes, _ in plan]
  shards: list[list[int]] = [[]]
  used = 0
  for k, nbytes in enumerate(sizes):
    if shards[-1] and used + nbytes > max_shard_bytes:
      shards.append([])
      used = 0
    shards[-1].append(k)
    used += nbytes

  os.makedirs(directory, exist_ok=True)
  config = config_to_hf(cfg, str(dt))
  config.update(extra_config or {})
  with open(os.path.join(directory, CONFIG_NAME), "w") as f:
    json.dump(config, f, indent=2, sort_keys=True)
  # Remove weights a previous save may have left (a different shard count would mix checkpoints);
  # only files this writer's naming scheme produces are touched.
  for old in os.listdir(directory):
    if old in (SINGLE_FILE, INDEX_NAME) or re.fullmatch(r"model-\d{5}-of-\d{5}\.safetensors", old):
      os.remove(os.path.join(directory, old))

  written = [CONFIG_NAME]
  weight_map = {}
  n = len(shards)
  for s, members in enumerate(shards):
    fname = SINGLE_FILE if n == 1 else f"model-{s + 1:05d}-of-{n:05d}.safetensors"
    tensors = {}
    for k in members:
      name, _, fetch = plan[k]
      tensors[name] = fetch()
      weight_map[name] = fname
    save_file(tensors, os.path.join(directory, fname), metadata={"format": "pt"})
    written.append(fname)
  if n > 1:
    with open(os.path.join(directory, INDEX_NAME), "w") as f:
      json.dump(
          {"metadata": {"total_size": int(sum(sizes))}, "weight_map": weight_map},
          f,
          indent=2,
          sort_keys=True,
      )
    written.append(INDEX_NAME)
  return written
