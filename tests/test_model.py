"""The decoder: replay semantics, padding, sharded vs single device, dense models, bad configs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fo_rl.model import (
    ModelConfig,
    abstract_model,
    init_model,
    make_apply,
    positions_from_mask,
    validate_replay_routes,
)
from fo_rl.parallel.sharding import DEFAULT_RULES, make_mesh, state_shardings
from toy import TOY

# The toy model (tests/toy.py) with a fourth layer (MoE; layer 1 stays the one dense layer) and this
# file's vocabulary.
CFG = TOY.replace(vocab_size=96, num_layers=4)


@pytest.fixture(scope="module")
def model():
  graphdef, state = init_model(CFG, seed=0)
  return jax.jit(make_apply(graphdef)), state


def _batch(B=4, T=12, seed=0):
  toks = jax.random.randint(jax.random.key(seed), (B, T), 0, CFG.vocab_size)
  return toks, jnp.broadcast_to(jnp.arange(T), (B, T))


def test_routes_layout_and_dense_sentinel(model):
  apply, state = model
  toks, pos = _batch()
  logits, routes = apply(state, toks, pos)
  assert logits.dtype == jnp.float32 and logits.shape == (4, 12, CFG.vocab_size)
  assert routes.dtype == jnp.int32 and routes.shape == (4, 12, CFG.num_layers, 2)
  r = np.asarray(routes)
  assert (r[:, :, 1] == -1).all()  # layer 1 is dense (mlp_only_layers)
  moe_r = r[:, :, [0, 2, 3]]
  assert ((moe_r >= 0) & (moe_r < 8)).all()
  assert (moe_r[..., 0] != moe_r[..., 1]).all()  # top-k ids are distinct


def test_replaying_own_routes_is_exact_and_other_routes_change_logits(model):
  apply, state = model
  toks, pos = _batch()
  logits, routes = apply(state, toks, pos)
  l2, r2 = apply(state, toks, pos, routes)
  np.testing.assert_array_equal(np.asarray(l2), np.asarray(logits))
  np.testing.assert_array_equal(np.asarray(r2), np.asarray(routes))
  other = np.asarray(routes).copy()
  other[:, :, 2] = (other[:, :, 2] + 3) % 8  # shift layer 2's experts only
  l3, r3 = apply(state, toks, pos, jnp.asarray(other))
  np.testing.assert_array_equal(np.asarray(r3), other)
  assert float(jnp.abs(l3 - logits).max()) > 1e-3


@pytest.mark.slow
def test_router_receives_gradient_under_replay(model):
  apply, state = model
  toks, pos = _batch()
  _, routes = apply(state, toks, pos)

  def loss(state):
    logits, _ = apply(state, toks, pos, routes)
    return jnp.mean(jax.nn.log_softmax(logits)[..., 0])

  grads = jax.grad(loss)(state)
  for i in (0, 2, 3):
    assert float(jnp.abs(grads["layers"][i]["mlp"]["router"][...]).max()) > 0


def test_replay_errors_name_the_problem(model):
  apply, state = model
  toks, pos = _batch()
  _, routes = apply(state, toks, pos)
  r = np.asarray(routes).copy()
  r[0, 3, 1, 0] = 5  # a real id in the dense layer: the layer index shifted
  with pytest.raises(ValueError, match="layer 1 is a dense layer"):
    validate_replay_routes(r, CFG)
  logits, _ = apply(state, toks, pos, jnp.asarray(r))  # traced: the shifted layer poisons its row
  assert (
      not np.isfinite(np.asarray(logits[0, 3:])).any() and np.isfinite(np.asarray(logits[1:])).all()
  )
  r = np.asarray(routes).copy()
  r[2, 0, 3, 1] = -1  # a dense sentinel reaching a MoE layer
  with pytest.raises(ValueError, match="layer 3 is a MoE layer"):
    validate_replay_routes(r, CFG)
  r[2, 0, 3, 1] = 8
  with pytest.raises(ValueError, match="outside"):
    validate_replay_routes(r, CFG)
  with pytest.raises(ValueError, match="shape"):
    validate_replay_routes(r[:, :, :3], CFG)


@pytest.mark.slow
def test_bad_replay_inside_jit_poisons_output(model):
  apply, state = model
  graphdef, _ = abstract_model(CFG)  # the graphdef only: no parameters to initialize
  from fo_rl.model import forward

  toks, pos = _batch()
  _, routes = apply(state, toks, pos)
  r = np.asarray(routes).copy()
  r[1, 4, 2, 0] = 9
  logits, _ = jax.jit(lambda s, r: forward(graphdef, s, toks, pos, r))(state, jnp.asarray(r))
  bad = ~np.isfinite(np.asarray(logits))
  assert bad[1, 4:].all() and not bad[0].any()  # row 1 from the bad position on; other rows clean


@pytest.mark.slow
def test_left_padding_matches_unpadded(model):
  apply, state = model
  toks, _ = _batch(B=2, T=10)
  pad = 3
  padded = jnp.concatenate([jnp.zeros((2, pad), jnp.int32), toks], axis=1)
  mask = jnp.concatenate([jnp.zeros((2, pad), bool), jnp.ones((2, 10), bool)], axis=1)
  mask = mask.at[1, :pad].set(True)  # row 1 not padded: its first 3 tokens are real
  pos = positions_from_mask(mask)
  logits_p, routes_p = apply(state, padded, pos, None, mask)
  logits, routes = apply(state, toks, jnp.broadcast_to(jnp.arange(10), (2, 10)))
  np.testing.assert_allclose(np.asarray(logits_p[0, pad:]), np.asarray(logits[0]), atol=1e-5)
  np.testing.assert_array_equal(np.asarray(routes_p[0, pad:]), np.asarray(routes[0]))
  # Replay routes of a left-padded batch stay aligned with their tokens; padding is not checked.
  r = np.asarray(routes_p).copy()
  r[0, :pad] = -7
  l2, _ = apply(state, padded, pos, jnp.asarray(r), mask)
  np.testing.assert_array_equal(np.asarray(l2[0, pad:]), np.asarray(logits_p[0, pad:]))


@pytest.mark.slow
@pytest.mark.parametrize(
    "mesh_cfg", [{"fsdp": 2, "expert": 4}, {"data": 2, "expert": 2, "tensor": 2}]
)
def test_sharded_forward_matches_single_device(model, mesh_cfg):
  apply, state = model
  toks, pos = _batch(B=8, T=12)
  logits, routes = apply(state, toks, pos)
  mesh = make_mesh(mesh_cfg)
  graphdef_m, state_m = init_model(CFG, mesh, seed=0)
  emb = state_m["embed_tokens"][...]
  assert len(emb.sharding.device_set) == 8
  gate = state_m["layers"][0]["mlp"]["gate_proj"][...]
  assert gate.sharding.spec[0] == "expert"
  logits_m, routes_m = jax.jit(make_apply(graphdef_m))(state_m, toks, pos)
  np.testing.assert_allclose(np.asarray(logits_m), np.asarray(logits), atol=2e-5)
  np.testing.assert_array_equal(np.asarray(routes_m), np.asarray(routes))


def test_reference_dispatch_model_matches_fast(model):
  apply, state = model
  toks, pos = _batch()
  g_ref, _ = abstract_model(CFG.replace(moe_impl="reference"))  # the graphdef only
  l_ref, r_ref = jax.jit(make_apply(g_ref))(state, toks, pos)
  l_fast, r_fast = apply(state, toks, pos)
  np.testing.assert_allclose(np.asarray(l_ref), np.asarray(l_fast), atol=1e-5)
  np.testing.assert_array_equal(np.asarray(r_ref), np.asarray(r_fast))


@pytest.mark.slow
def test_dense_model_and_tied_embeddings():
  cfg = CFG.replace(num_experts=0, tie_word_embeddings=True)
  graphdef, state = init_model(cfg)
  assert "lm_head" not in state
  logits, routes = make_apply(graphdef)(state, *_batch())
  assert routes.shape == (4, 12, 4, 1) and (np.asarray(routes) == -1).all()
  assert np.isfinite(np.asarray(logits)).all()


@pytest.mark.parametrize(
    "kw,field",
    [
        (dict(num_experts_per_tok=9), "num_experts_per_tok"),
        (dict(num_heads=5), "num_heads"),
        (dict(mlp_only_layers=(7,)), "mlp_only_layers"),
        (dict(moe_impl="magic"), "moe_impl"),
        (dict(head_dim=7), "head_dim"),
    ],
)
def test_bad_model_config_names_field(kw, field):
  with pytest.raises(ValueError, match=f"model.{field}"):
    CFG.replace(**kw)


def test_unknown_model_field():
  with pytest.raises(ValueError, match="unknown field"):
    ModelConfig.from_dict({"hidden_size": 32, "num_expert": 4})


def test_bad_mesh_and_rules_name_the_field():
  with pytest.raises(ValueError, match="parallel.mesh.*8 are available"):
    make_mesh({"fsdp": 2, "expert": 2})
  with pytest.raises(ValueError, match="parallel.mesh: unknown mesh axis 'model'"):
    make_mesh({"model": 8})
  _, abstract = abstract_model(CFG)
  bad_rules = DEFAULT_RULES + (("extra", "pipeline"),)
  with pytest.raises(ValueError, match=r"parallel.rules\[11\].*unknown mesh axis 'pipeline'"):
    state_shardings(abstract, make_mesh({"fsdp": 8}), bad_rules)
  with pytest.raises(ValueError, match="not divisible"):  # kv_heads=2 over tensor=4
    state_shardings(abstract, make_mesh({"fsdp": 2, "tensor": 4}), DEFAULT_RULES)
