"""Hugging Face checkpoints: parity with transformers, round trips, errors, sharded loading, the score tool."""

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

torch.set_num_threads(2)

import transformers  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

from fo_rl.model import make_apply  # noqa: E402
from fo_rl.model.hf import (config_from_hf, load_hf_checkpoint, save_hf_checkpoint)  # noqa: E402
from fo_rl.parallel.sharding import DEFAULT_RULES, make_mesh, state_shardings  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
B, T = 2, 9
TOL = 1e-4

BASE = dict(
    vocab_size=128,
    hidden_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    intermediate_size=48,
    rms_norm_eps=1e-6,
    rope_parameters={"rope_type": "default", "rope_theta": 1e6},
)  # not HF's default 1e4
MOE = dict(BASE, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16)
CONFIGS = {
    # mixed: layer 1 dense via mlp_only_layers
    "moe_norm": ("qwen3_moe", dict(MOE, norm_topk_prob=True, mlp_only_layers=[1])),
    # layer 1 the only MoE layer (decoder_sparse_step=2), unnormalized top-k, tied embeddings
    "moe_tied": (
        "qwen3_moe",
        dict(MOE, norm_topk_prob=False, decoder_sparse_step=2, tie_word_embeddings=True),
    ),
    "dense": ("qwen3", dict(BASE, tie_word_embeddings=True)),
}


def _hf_model(name, seed=0):
  kind, kw = CONFIGS[name]
  if kind == "qwen3":
    model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**kw))
  else:
    model = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(**kw))
  torch.manual_seed(seed)
  with torch.no_grad():  # HF's init (std 0.02, unit norms) is too tame to catch a transposed norm
    for p in model.parameters():
      if p.ndim == 1:
        p.uniform_(0.5, 1.5)
      else:
        p.normal_(0.0, 0.15)
  return model.eval()


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
  """name -> (checkpoint dir written by transformers' save_pretrained, torch model), built lazily."""
  cache = {}

  def get(name):
    if name not in cache:
      model = _hf_model(name)
      d = str(tmp_path_factory.mktemp(name))
      model.save_pretrained(d)
      cache[name] = (d, model)
    return cache[name]

  return get


def _ids(vocab=128, seed=0):
  return np.random.default_rng(seed).integers(0, vocab, (B, T)).astype(np.int32)


def _positions():
  return jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))


def _torch_forward(model, ids):
  moe = isinstance(model, transformers.Qwen3MoeForCausalLM)
  with torch.no_grad():
    out = model(
        torch.tensor(ids, dtype=torch.long), **({"output_router_logits": True} if moe else {})
    )
  router = [r.numpy() for r in out.router_logits] if moe else []
  return out.logits.numpy(), router


def _fo_forward(graphdef, state, ids, routes=None):
  logits, live_routes = jax.jit(make_apply(graphdef))(state, jnp.asarray(ids), _positions(), routes)
  return np.asarray(logits), np.asarray(live_routes)


def _pure(state):
  return jax.tree.map(np.asarray, nnx.to_pure_dict(state))


def _assert_tree_equal(a, b):
  la, ta = jax.tree.flatten(a)
  lb, tb = jax.tree.flatten(b)
  assert ta == tb
  for x, y in zip(la, lb):
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(x, y)


# ------------------------------------------------------------------------------------------------
# Parity with transformers.
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CONFIGS))
def test_parity_logits_and_routes(hf, name):
  d, model = hf(name)
  cfg, graphdef, state = load_hf_checkpoint(d)
  kind, kw = CONFIGS[name]
  assert cfg.rope_theta == 1e6 and cfg.num_experts == kw.get("num_experts", 0)
  assert cfg.tie_word_embeddings == kw.get("tie_word_embeddings", False)
  ids = _ids()
  logits, routes = _fo_forward(graphdef, state, ids)
  ref, router_logits = _torch_forward(model, ids)
  diff = float(np.abs(logits - ref).max())
  print(f"{name}: max |logits - transformers| = {diff:.2e} (max |logits| {np.abs(ref).max():.2f})")
  assert diff <= TOL

  assert len(router_logits) == len(cfg.moe_layers)
  if kind == "qwen3_moe":
    assert 0 < len(cfg.moe_layers) < cfg.num_layers  # both layer kinds are exercised
  k = cfg.num_experts_per_tok
  for i in range(cfg.num_layers):
    if not cfg.is_moe_layer(i):
      assert (routes[:, :, i, :] == -1).all()
      continue
    hf_top = np.argsort(-router_logits[cfg.moe_layers.index(i)], axis=-1)[:, :k].reshape(B, T, k)
    np.testing.assert_array_equal(np.sort(routes[:, :, i, :], -1), np.sort(hf_top, -1))


def test_fused_expert_layout_loads_the_same(hf, tmp_path):
  """transformers 5's in-memory layout (mlp.experts.gate_up_proj / down_proj, 3-D) also loads."""
  d, model = hf("moe_norm")
  sd = {k: v.numpy() for k, v in model.state_dict().items()}
  assert "model.layers.0.mlp.experts.gate_up_proj" in sd
  shutil.copy(os.path.join(d, "config.json"), tmp_path)
  save_file(sd, str(tmp_path / "model.safetensors"))
  _, _, fused = load_hf_checkpoint(str(tmp_path))
  _, _, per_expert = load_hf_checkpoint(d)
  _assert_tree_equal(_pure(fused), _pure(per_expert))


def test_bf16_checkpoint(hf, tmp_path):
  d, model = hf("moe_norm")
  model_bf16 = _hf_model("moe_norm").to(torch.bfloat16)
  model_bf16.save_pretrained(str(tmp_path / "bf16"))
  cfg, _, state = load_hf_checkpoint(str(tmp_path / "bf16"))  # param_dtype float32 (the default)
  _, _, state32 = load_hf_checkpoint(d)
  rounded = jax.tree.map(lambda x: x.astype(jnp.bfloat16).astype(np.float32), _pure(state32))
  _assert_tree_equal(_pure(state), rounded)
  _, _, state_bf = load_hf_checkpoint(str(tmp_path / "bf16"), param_dtype="bfloat16")
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(_pure(state_bf)))
  # ... and our bfloat16 writer gives the same bits back.
  save_hf_checkpoint(str(tmp_path / "ours"), cfg, state32, dtype="bfloat16")
  assert json.load(open(tmp_path / "ours" / "config.json"))["torch_dtype"] == "bfloat16"
  _, _, again = load_hf_checkpoint(str(tmp_path / "ours"), param_dtype="bfloat16")
  _assert_tree_equal(_pure(again), _pure(state_bf))


# ------------------------------------------------------------------------------------------------
# Round trips through our writer.
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name,max_shard_bytes", [("moe_norm", 20_000), ("moe_tied", 10**9), ("dense", 10**9)]
)
def test_save_round_trip(hf, tmp_path, name, max_shard_bytes):
  d, model = hf(name)
  cfg, graphdef, state = load_hf_checkpoint(d)
  out = str(tmp_path / "out")
  files = save_hf_checkpoint(out, cfg, state, max_shard_bytes=max_shard_bytes)
  sharded = max_shard_bytes < 10**9
  assert ("model.safetensors.index.json" in files) == sharded
  assert (len([f for f in files if f.endswith(".safetensors")]) > 1) == sharded
  names = set()
  for f in files:
    if f.endswith(".safetensors"):
      names |= set(load_file(os.path.join(out, f)))
  assert names == set(
      load_file(os.path.join(d, "model.safetensors"))
  )  # same names as save_pretrained
  if cfg.num_experts:
    assert "model.layers.0.mlp.experts.7.down_proj.weight" in names or cfg.moe_layers[0] != 0
  # transformers reads our checkpoint and computes the same logits,
  cls = transformers.Qwen3MoeForCausalLM if cfg.num_experts else transformers.Qwen3ForCausalLM
  reloaded = cls.from_pretrained(out).eval()
  ids = _ids(seed=1)
  np.testing.assert_array_equal(_torch_forward(reloaded, ids)[0], _torch_forward(model, ids)[0])
  # and we read it back bit for bit.
  cfg2, _, state2 = load_hf_checkpoint(out)
  assert cfg2 == cfg
  _assert_tree_equal(_pure(state2), _pure(state))
  if sharded:  # saving again over it leaves no stale shards behind
    save_hf_checkpoint(out, cfg, state)
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]


# ------------------------------------------------------------------------------------------------
# Errors.
# ------------------------------------------------------------------------------------------------
def _edited_copy(src, dst, edit):
  shutil.copytree(src, dst)
  path = os.path.join(dst, "model.safetensors")
  tensors = load_file(path)
  edit(tensors)
  save_file(tensors, path, metadata={"format": "pt"})
  return str(dst)


@pytest.mark.parametrize(
    "what,name",
    [
        ("missing", "model.layers.2.mlp.experts.5.up_proj.weight"),
        ("missing", "model.layers.1.mlp.down_proj.weight"),
        ("missing", "lm_head.weight"),
        ("extra", "model.layers.0.mlp.shared_expert.weight"),
        ("extra", "model.layers.1.mlp.gate.weight"),  # a router in a dense layer
        ("shape", "model.layers.0.self_attn.k_proj.weight"),
        ("shape", "model.layers.0.mlp.experts.0.gate_proj.weight"),
    ],
)
def test_bad_tensors_name_the_tensor(hf, tmp_path, what, name):
  d, _ = hf("moe_norm")

  def edit(t):
    if what == "missing":
      del t[name]
    elif what == "extra":
      t[name] = np.zeros((8, 32), np.float32)
    else:
      t[name] = t[name][:-1]

  bad = _edited_copy(d, tmp_path / "bad", edit)
  with pytest.raises(ValueError, match=name.replace(".", r"\.")) as e:
    load_hf_checkpoint(bad)
  if what != "missing":
    assert "model.safetensors" in str(e.value)  # names the file too


def test_tied_head_on_disk(hf, tmp_path):
  """A tied checkpoint may also store lm_head.weight, if it equals the embedding."""
  d, _ = hf("moe_tied")
  same = _edited_copy(
      d,
      tmp_path / "same",
      lambda t: t.__setitem__("lm_head.weight", t["model.embed_tokens.weight"].copy()),
  )
  load_hf_checkpoint(same)
  differs = _edited_copy(
      d,
      tmp_path / "differs",
      lambda t: t.__setitem__("lm_head.weight", t["model.embed_tokens.weight"] + 1),
  )
  with pytest.raises(ValueError, match="lm_head.weight.*tie_word_embeddings"):
    load_hf_checkpoint(differs)


def test_sharded_error_names_the_shard(hf, tmp_path):
  d, _ = hf("moe_norm")
  cfg, _, state = load_hf_checkpoint(d)
  out = tmp_path / "sharded"
  save_hf_checkpoint(str(out), cfg, state, max_shard_bytes=20_000)
  weight_map = json.load(open(out / "model.safetensors.index.json"))["weight_map"]
  name = "model.layers.2.mlp.experts.1.down_proj.weight"
  shard = out / weight_map[name]
  t = load_file(str(shard))
  t[name] = t[name][:, :-1]
  save_file(t, str(shard), metadata={"format": "pt"})
  with pytest.raises(ValueError, match=rf"{name.replace('.', '[.]')}.*{weight_map[name]}"):
    load_hf_checkpoint(str(out))


def test_unsupported_configs():
  ok = dict(MOE, model_type="qwen3_moe")
  assert config_from_hf(ok).num_experts == 8
  v5 = dict(ok)
  v5["num_local_experts"] = v5.pop("num_experts")  # transformers 5's spelling
  assert config_from_hf(v5).num_experts == 8 and config_from_hf(v5).rope_theta == 1e6
  for bad, match in [
      (dict(ok, model_type="llama"), "model_type"),
      (dict(ok, rope_scaling={"rope_type": "yarn", "factor": 4.0}), "yarn"),
      (dict(ok, rope_parameters={"rope_type": "linear", "factor": 2.0}), "linear"),
      (dict(ok, use_sliding_window=True), "sliding"),
      (dict(ok, hidden_act="gelu"), "gelu"),
  ]:
    with pytest.raises(ValueError, match=match):
      config_from_hf(bad)


# ------------------------------------------------------------------------------------------------
# Sharded loading.
# ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_sharded_load_matches_single_device(hf):
  d, _ = hf("moe_norm")
  mesh = make_mesh({"fsdp": 2, "expert": 4})
  cfg, graphdef, state = load_hf_checkpoint(d, mesh=mesh)
  _, graphdef1, state1 = load_hf_checkpoint(d)
  expected = state_shardings(nnx.eval_shape(lambda: state), mesh, DEFAULT_RULES)
  got_leaves = jax.tree.leaves(nnx.to_pure_dict(state))
  want_leaves = jax.tree.leaves(nnx.to_pure_dict(expected), is_leaf=lambda x: hasattr(x, "spec"))
  assert len(got_leaves) == len(want_leaves)
  for x, s in zip(got_leaves, want_leaves):
    assert x.sharding.is_equivalent_to(s, x.ndim), (x.sharding, s)
  experts = state["layers"][0]["mlp"]["gate_proj"].get_value()
  assert experts.sharding.spec[0] == "expert" and len(experts.sharding.device_set) == 8
  assert experts.addressable_shards[0].data.shape == (2, 16, 16)  # [E/4, D/2, F]
  _assert_tree_equal(_pure(state), _pure(state1))
  ids = _ids(seed=2)
  logits, routes = _fo_forward(graphdef, state, ids)
  logits1, routes1 = _fo_forward(graphdef1, state1, ids)
  np.testing.assert_allclose(logits, logits1, atol=1e-5, rtol=0)
  np.testing.assert_array_equal(routes, routes1)


# ------------------------------------------------------------------------------------------------
# The score tool.
# ------------------------------------------------------------------------------------------------
def _set(a, idx, value):
  a = a.copy()
  a[idx] = value
  return a


def _run_score(*args):
  return subprocess.run(
      [sys.executable, "-m", "fo_rl.tools.score", *args],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=120,
  )


# End to end (`python -m fo_rl.tools.score` twice, then in-process calls) but seconds long: not
# marked e2e, so the fast tier reaches fo_rl/tools/score.py.
def test_score_tool(hf, tmp_path):
  from fo_rl.tools.score import score

  d, _ = hf("moe_norm")
  cfg, graphdef, state = load_hf_checkpoint(d)
  ids = _ids(seed=3)
  np.save(tmp_path / "ids.npy", ids)
  ref_logits, ref_routes = _fo_forward(graphdef, state, ids)

  r = _run_score(
      f"--hf_checkpoint={d}",
      f"--input_ids={tmp_path / 'ids.npy'}",
      f"--output={tmp_path / 'logits.npy'}",
      f"--routes_output={tmp_path / 'routes.npy'}",
  )
  assert r.returncode == 0, r.stderr
  logits, routes = np.load(tmp_path / "logits.npy"), np.load(tmp_path / "routes.npy")
  assert logits.dtype == np.float32 and logits.shape == (B, T, cfg.vocab_size)
  assert routes.dtype == np.int32 and routes.shape == (
      B,
      T,
      cfg.num_layers,
      cfg.num_experts_per_tok,
  )
  np.testing.assert_allclose(logits, ref_logits, atol=1e-5, rtol=0)
  np.testing.assert_array_equal(routes, ref_routes)

  # Replaying the routes it wrote reproduces the logits.
  score(
      d,
      str(tmp_path / "ids.npy"),
      str(tmp_path / "replayed.npy"),
      replay_routes=str(tmp_path / "routes.npy"),
  )
  np.testing.assert_allclose(np.load(tmp_path / "replayed.npy"), logits, atol=1e-5, rtol=0)
  # Replaying other (valid) routes changes them.
  other = routes.copy()
  other[:, :, cfg.moe_layers[0], :] = (routes[:, :, cfg.moe_layers[0], :] + 1) % cfg.num_experts
  np.save(tmp_path / "other.npy", other)
  score(
      d,
      str(tmp_path / "ids.npy"),
      str(tmp_path / "other_logits.npy"),
      replay_routes=str(tmp_path / "other.npy"),
  )
  assert np.abs(np.load(tmp_path / "other_logits.npy") - logits).max() > 1e-3

  # Invalid replay routes: nonzero exit, a message, nothing written.
  bad = routes.copy()
  bad[1, 4, cfg.moe_layers[-1], 0] = cfg.num_experts
  np.save(tmp_path / "bad_routes.npy", bad)
  r = _run_score(
      f"--hf_checkpoint={d}",
      f"--input_ids={tmp_path / 'ids.npy'}",
      f"--output={tmp_path / 'never.npy'}",
      f"--replay_routes={tmp_path / 'bad_routes.npy'}",
  )
  assert r.returncode != 0
  assert "bad_routes.npy" in r.stderr and f"layer {cfg.moe_layers[-1]}" in r.stderr, r.stderr
  assert not os.path.exists(tmp_path / "never.npy")

  dense = routes.copy()
  dense[0, 0, 1, 1] = 3  # layer 1 is dense (mlp_only_layers)
  np.save(tmp_path / "dense_routes.npy", dense)
  with pytest.raises(ValueError, match="dense_routes.npy.*layer 1 is a dense layer"):
    score(
        d,
        str(tmp_path / "ids.npy"),
        str(tmp_path / "never.npy"),
        replay_routes=str(tmp_path / "dense_routes.npy"),
    )
  np.save(tmp_path / "short_routes.npy", routes[:, :-1])
  with pytest.raises(ValueError, match="short_routes.npy.*shape"):
    score(
        d,
        str(tmp_path / "ids.npy"),
        str(tmp_path / "never.npy"),
        replay_routes=str(tmp_path / "short_routes.npy"),
    )

  # Bad input ids name the file.
  for fname, arr, match in [
      ("float_ids.npy", ids.astype(np.float32), "dtype float32"),
      ("rank3_ids.npy", ids[None], "rank 2"),
      ("big_ids.npy", _set(ids, (1, 2), 128), "token id 128 at \\[1, 2\\]"),
      ("neg_ids.npy", -ids - 1, "outside"),
  ]:
    np.save(tmp_path / fname, arr)
    with pytest.raises(ValueError, match=f"{fname}.*{match}"):
      score(d, str(tmp_path / fname), str(tmp_path / "never.npy"))
  with pytest.raises(ValueError, match="missing.npy.*no such file"):
    score(d, str(tmp_path / "missing.npy"), str(tmp_path / "never.npy"))
  assert not os.path.exists(tmp_path / "never.npy")
