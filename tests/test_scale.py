"""Pieces the large (Qwen3) recipes rely on, checked at CPU size: layers as one lax.scan with remat compute
what the layer loop computes, and `init.hf_checkpoint` loads a Hugging Face checkpoint (weights in their
shardings, its tokenizer.json) or names the field that differs from model.*."""

from __future__ import annotations

import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fo_rl import config as config_lib
from fo_rl.model import abstract_model, init_model, make_apply
from fo_rl.parallel.sharding import DEFAULT_RULES, make_mesh
from toy import TOY

# Each test compiles a model or writes and loads a checkpoint: seconds apiece.
pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny_qwen():
  spec = importlib.util.spec_from_file_location(
      "q30", os.path.join(ROOT, "configs/qwen3_30b_a3b.py")
  )
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config("tiny")


def test_scanned_remat_layers_match_the_loop():
  mesh = make_mesh({"data": 1, "fsdp": 4, "expert": 2, "tensor": 1})
  base = TOY.replace(mlp_only_layers=())  # every layer MoE: the layers scan as one
  B, T = 8, 8
  tok = jax.random.randint(jax.random.key(1), (B, T), 0, base.vocab_size)
  pos = jnp.broadcast_to(jnp.arange(T), (B, T))
  routes = jax.random.randint(
      jax.random.key(2), (B, T, base.num_layers, base.num_experts_per_tok), 0, base.num_experts
  )  # R3-style replay
  out = {}
  for name, over in [("loop", {}), ("scan+remat", {"scan_layers": True, "remat": True})]:
    graphdef, params = init_model(
        base.replace(**over), mesh, DEFAULT_RULES
    )  # same seed: same weights
    apply = make_apply(graphdef)

    def f(p):
      logits, r = apply(p, tok, pos, routes)
      return jnp.sum(jax.nn.log_softmax(logits)[..., 3]), r

    out[name] = jax.jit(jax.value_and_grad(f, has_aux=True))(params)
  (l0, r0), g0 = out["loop"]
  for name, ((l, r), g) in out.items():
    np.testing.assert_allclose(l, l0, rtol=1e-6, err_msg=name)
    np.testing.assert_array_equal(r, r0, err_msg=name)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g0)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=name)


def test_scan_falls_back_to_the_loop_for_mixed_layers(toy_model):
  cfg, g1, p1 = toy_model  # layer 1 dense, layers 0 and 2 MoE
  tok = jnp.zeros((2, 4), jnp.int32)
  pos = jnp.broadcast_to(jnp.arange(4), (2, 4))
  g2, _ = abstract_model(cfg.replace(scan_layers=True))  # the graphdef only
  l1, r1 = make_apply(g1)(p1, tok, pos)
  l2, r2 = make_apply(g2)(p1, tok, pos)
  np.testing.assert_allclose(l2, l1, rtol=1e-6)
  np.testing.assert_array_equal(r2, r1)
  assert (np.asarray(r2)[:, :, 1] == -1).all()  # the dense layer


def _hf_dir(tmp_path, c):
  """A Hugging Face checkpoint of the tiny Qwen3 recipe's model, with a tokenizer.json."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

  from fo_rl.model.hf import save_hf_checkpoint

  cfg = config_lib.parse(c).model
  _, params = init_model(cfg, seed=7)
  d = tmp_path / "hf"
  save_hf_checkpoint(str(d), cfg, params, extra_config={"eos_token_id": 3, "bos_token_id": 2})
  tok = Tokenizer(models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=200,
      special_tokens=["<pad>", "<unk>", "<s>", "</s>"],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
  )
  tok.train_from_iterator(["What is 12 + 30? #### 42", "The answer is 7"] * 20, trainer)
  tok.save(str(d / "tokenizer.json"))
  return str(d), params


def test_hf_checkpoint_loads_in_its_shardings_with_its_tokenizer(tmp_path):
  from fo_rl.data.tokenizer import HFTokenizer
  from fo_rl.run import load_pretrained

  c = _tiny_qwen()
  directory, saved = _hf_dir(tmp_path, c)
  rc = config_lib.parse(c, jax.device_count())
  mesh = make_mesh(rc.parallel.mesh)
  graphdef, params = load_pretrained(directory, rc, mesh)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(saved)):
    assert a.dtype == jnp.bfloat16 and a.sharding.mesh.shape == mesh.shape
    np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
  experts = params["layers"][0]["mlp"]["gate_proj"].get_value()
  assert experts.sharding.spec[0] == "expert"
  tok = HFTokenizer(directory)
  ids = tok.encode("What is 12 + 30?", add_bos=True)
  assert tok.decode(ids) == "What is 12 + 30?" and tok.eos_id == 3
  assert tok.vocab_size <= c.model.vocab_size
  assert tok.encode("7", add_eos=True)[-1] == 3


def test_hf_checkpoint_of_another_architecture_names_the_field(tmp_path):
  from fo_rl.run import load_pretrained

  c = _tiny_qwen()
  directory, _ = _hf_dir(tmp_path, c)
  c.model.num_experts_per_tok = 2
  rc = config_lib.parse(c, jax.device_count())
  with pytest.raises(
      ValueError,
      match=r"init.hf_checkpoint=.*differs from model.\* in " r"num_experts_per_tok \(4 vs 2\)",
  ):
    load_pretrained(directory, rc, make_mesh(rc.parallel.mesh))
  with open(os.path.join(directory, "config.json")) as f:
    assert json.load(f)["num_experts_per_tok"] == 4
