"""Gating and dispatch: numpy references, reference vs fast vs expert-parallel (values and gradients)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fo_rl.model import moe
from fo_rl.parallel.sharding import make_mesh
from fo_rl.sampler.quantize import dequantize_np, quantize_array


def _np_softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("norm", [True, False])
def test_route_live_matches_qwen3_softmax_topk(norm):
  logits = np.random.default_rng(0).normal(size=(50, 8)).astype(np.float32)
  ids, w = moe.route(jnp.asarray(logits), 3, norm)
  p = _np_softmax(logits.astype(np.float64))
  ref_ids = np.argsort(-p, axis=-1)[:, :3]
  ref_w = np.take_along_axis(p, ref_ids, -1)
  if norm:
    ref_w = ref_w / ref_w.sum(-1, keepdims=True)
  np.testing.assert_array_equal(np.asarray(ids), ref_ids)
  np.testing.assert_allclose(np.asarray(w), ref_w, rtol=1e-5, atol=1e-6)


def test_route_replay_uses_given_ids_with_live_softmax():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(20, 6)).astype(np.float32)
  routes = np.stack([rng.choice(6, 2, replace=False) for _ in range(20)]).astype(np.int32)
  ids, w = moe.route(jnp.asarray(logits), 2, True, jnp.asarray(routes))
  np.testing.assert_array_equal(np.asarray(ids), routes)
  # g_i = I_i exp(s_i) / sum_j I_j exp(s_j)
  e = np.exp(np.take_along_axis(logits.astype(np.float64), routes, -1))
  np.testing.assert_allclose(np.asarray(w), e / e.sum(-1, keepdims=True), rtol=1e-5)


def test_router_gets_gradient_under_replay():
  logits = jnp.asarray(np.random.default_rng(2).normal(size=(10, 6)), jnp.float32)
  routes = jnp.asarray(np.tile([[4, 1]], (10, 1)), jnp.int32)
  coef = jnp.asarray(np.random.default_rng(3).normal(size=(10, 2)), jnp.float32)
  g = jax.grad(lambda s: jnp.sum(moe.route(s, 2, True, routes)[1] * coef))(logits)
  g = np.asarray(g)
  assert np.abs(g[:, [1, 4]]).min() > 0  # replayed experts' logits get gradient
  # Others drop out of the renormalized softmax (zero up to float32 rounding of the full softmax).
  assert np.abs(g[:, [0, 2, 3, 5]]).max() < 1e-5 * np.abs(g[:, [1, 4]]).max()


@pytest.mark.parametrize("bad", [-1, 6])
def test_route_rejects_out_of_range_replay(bad):
  logits = jnp.zeros((4, 6))
  routes = jnp.asarray([[0, 1], [2, bad], [3, 4], [5, 0]], jnp.int32)
  with pytest.raises(ValueError, match="outside"):
    moe.route(logits, 2, True, routes)
  # Inside jit nothing can be raised: the bad row's gate weights turn NaN, never a silent clamp.
  _, w = jax.jit(lambda s, r: moe.route(s, 2, True, r))(logits, routes)
  w = np.asarray(w)
  assert np.isnan(w[1]).all() and np.isfinite(np.delete(w, 1, axis=0)).all()


def test_live_and_replayed_gates_are_one_formula():
  """Replaying the live routes gives bit-identical gate weights (R2's first update is on-policy
  exactly), with and without renormalization."""
  logits = jnp.asarray(np.random.default_rng(4).normal(size=(30, 8)) * 3, jnp.float32)
  for norm in (True, False):
    ids, w = moe.route(logits, 3, norm)
    ids_r, w_r = moe.route(logits, 3, norm, ids)
    np.testing.assert_array_equal(np.asarray(ids_r), np.asarray(ids))
    np.testing.assert_array_equal(np.asarray(w_r), np.asarray(w))


def test_replayed_experts_far_below_the_live_max_keep_finite_gates():
  """Replayed experts 200 below the live maximum: their full-softmax probabilities underflow to 0 in
  float32, and renormalizing those was 0/0. The gates are the softmax over the replayed logits (numpy,
  float64), finite, in and out of jit, and so is the router's gradient."""
  rng = np.random.default_rng(5)
  logits = rng.normal(size=(6, 8)).astype(np.float32)
  routes = np.stack([rng.choice(8, 2, replace=False) for _ in range(6)]).astype(np.int32)
  for b in range(6):  # every other expert of the token 200 above the replayed ones
    others = np.setdiff1d(np.arange(8), routes[b])
    logits[b, others] += 200.0
  chosen = np.take_along_axis(logits.astype(np.float64), routes, -1)
  ref = np.exp(chosen - chosen.max(-1, keepdims=True))
  ref /= ref.sum(-1, keepdims=True)
  for fn in (moe.route, jax.jit(moe.route, static_argnums=(1, 2))):
    _, w = fn(jnp.asarray(logits), 2, True, jnp.asarray(routes))
    np.testing.assert_allclose(np.asarray(w), ref, rtol=1e-6)
  coef = jnp.asarray(rng.normal(size=(6, 2)), jnp.float32)
  g = jax.grad(lambda s: jnp.sum(moe.route(s, 2, True, jnp.asarray(routes))[1] * coef))(
      jnp.asarray(logits)
  )
  assert np.isfinite(np.asarray(g)).all() and np.abs(np.asarray(g)).max() > 0
  # Unnormalized gates are the (underflowed) full-softmax probabilities: 0, not NaN.
  _, w = moe.route(jnp.asarray(logits), 2, False, jnp.asarray(routes))
  np.testing.assert_array_equal(np.asarray(w), 0.0)


def test_route_rejects_duplicate_replay_ids():
  """An expert twice in one token's replayed routes is rejected like an out-of-range id: a ValueError
  naming it when concrete, NaN gates for that token inside jit; and by validate_replay_routes (also
  its multi-process path) before any compute."""
  from fo_rl.model import DENSE_ROUTE, validate_replay_routes
  from fo_rl.model.transformer import _validate_global_replay_routes
  from toy import TOY

  logits = jnp.zeros((4, 6))
  routes = jnp.asarray([[0, 1], [2, 2], [3, 4], [5, 0]], jnp.int32)
  with pytest.raises(ValueError, match=r"token \(1,\) lists expert 2 twice"):
    moe.route(logits, 2, True, routes)
  for norm in (True, False):
    _, w = jax.jit(lambda s, r: moe.route(s, 2, norm, r))(logits, routes)
    w = np.asarray(w)
    assert np.isnan(w[1]).all() and np.isfinite(np.delete(w, 1, axis=0)).all()
  # [B=2, T=3, L=3, k=2], layer 1 dense; a duplicate at a real token of MoE layer 2.
  r = np.tile(np.asarray([[0, 1], [DENSE_ROUTE] * 2, [2, 3]], np.int32), (2, 3, 1, 1))
  r[1, 2, 2] = [5, 5]
  mask = np.ones((2, 3), bool)
  for check in (validate_replay_routes, _validate_global_replay_routes):
    with pytest.raises(ValueError, match="layer 2 lists expert 5 twice"):
      check(jnp.asarray(r), TOY, jnp.asarray(mask))
    mask[1, 2] = False  # at a padding position nothing is checked (the model routes it live)
    check(jnp.asarray(r), TOY, jnp.asarray(mask))
    mask[1, 2] = True


def _experts(E=8, D=16, F=24, seed=0):
  k = jax.random.split(jax.random.key(seed), 3)
  return moe.Experts(
      0.3 * jax.random.normal(k[0], (E, D, F)),
      0.3 * jax.random.normal(k[1], (E, D, F)),
      0.3 * jax.random.normal(k[2], (E, F, D)),
  )


def _inputs(N=64, D=16, E=8, k=2, seed=0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(N, D)), jnp.float32)
  ids, w = moe.route(jnp.asarray(rng.normal(size=(N, E)) * 2, jnp.float32), k)
  return x, ids, w


def _np_moe(x, ids, w, ex):
  """Independent numpy definition: y_n = sum_j w_nj * FFN_{ids_nj}(x_n)."""
  x, ids, w = np.asarray(x, np.float64), np.asarray(ids), np.asarray(w, np.float64)
  g, u, d = (np.asarray(a, np.float64) for a in ex)
  y = np.zeros_like(x)
  for n in range(x.shape[0]):
    for j in range(ids.shape[1]):
      e = ids[n, j]
      a = x[n] @ g[e]
      h = a / (1 + np.exp(-a)) * (x[n] @ u[e])
      y[n] += w[n, j] * (h @ d[e])
  return y


@pytest.mark.slow  # (the fast tier compares the two at model level: test_model.py)
@pytest.mark.parametrize("backend,block", [("blocked", 8), ("blocked", 32), ("ragged_dot", 0)])
def test_fast_dispatch_matches_reference_values_and_grads(backend, block):
  x, ids, w = _inputs()
  ex = _experts()
  ref = moe.dispatch_reference(x, ids, w, ex)
  fast = moe.dispatch_fast(x, ids, w, ex, backend=backend, block=max(block, 1))
  np.testing.assert_allclose(np.asarray(ref), _np_moe(x, ids, w, ex), atol=1e-5)
  np.testing.assert_allclose(np.asarray(fast), np.asarray(ref), atol=1e-5)

  def loss(fn, x, w, ex):
    return jnp.sum(jnp.sin(fn(x, ids, w, ex)))

  g_ref = jax.grad(lambda *a: loss(moe.dispatch_reference, *a), argnums=(0, 1, 2))(x, w, ex)
  g_fast = jax.grad(
      lambda *a: loss(lambda *b: moe.dispatch_fast(*b, backend=backend, block=max(block, 1)), *a),
      argnums=(0, 1, 2),
  )(x, w, ex)
  for a, b in zip(jax.tree.leaves(g_ref), jax.tree.leaves(g_fast)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5)


@pytest.mark.slow
def test_fast_dispatch_handles_empty_and_skewed_groups():
  x, _, w = _inputs(N=40)
  ids = jnp.asarray(np.tile([[3, 5]], (40, 1)), jnp.int32)  # all tokens to two experts, six empty
  ex = _experts()
  np.testing.assert_allclose(
      np.asarray(moe.dispatch_fast(x, ids, w, ex, backend="blocked", block=8)),
      np.asarray(moe.dispatch_reference(x, ids, w, ex)),
      atol=1e-5,
  )


@pytest.mark.slow
def test_dense_dispatch_matches_numpy_values_and_grads():
  """moe_impl="dense" (the sampler's decode dispatch): every expert on every token with the routing
  weights folded into the down projection, checked against the numpy definition and the reference's
  gradients; also with int8 expert weights against the same weights dequantized."""
  x, ids, w = _inputs(N=24)
  ex = _experts()
  np.testing.assert_allclose(
      np.asarray(moe.dispatch_dense(x, ids, w, ex)), _np_moe(x, ids, w, ex), atol=1e-5
  )

  def loss(fn, x, w, ex):
    return jnp.sum(jnp.sin(fn(x, ids, w, ex)))

  g_ref = jax.grad(lambda *a: loss(moe.dispatch_reference, *a), argnums=(0, 1, 2))(x, w, ex)
  g_dense = jax.grad(lambda *a: loss(moe.dispatch_dense, *a), argnums=(0, 1, 2))(x, w, ex)
  for a, b in zip(jax.tree.leaves(g_ref), jax.tree.leaves(g_dense)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5)

  q = moe.Experts(*(quantize_array(a, "int8", (a.ndim - 2,)) for a in ex))
  deq = moe.Experts(*(dequantize_np(a) for a in q))
  np.testing.assert_allclose(
      np.asarray(moe.dispatch_dense(x, ids, w, q)), _np_moe(x, ids, w, deq), atol=1e-4
  )


@pytest.mark.slow
@pytest.mark.parametrize(
    "mesh_cfg",
    [
        {"fsdp": 2, "expert": 4},
        {"expert": 4, "tensor": 2},
        {"expert": 8},
        {"data": 2, "expert": 2, "tensor": 2},
    ],
)
def test_expert_parallel_matches_single_device(mesh_cfg):
  mesh = make_mesh(mesh_cfg)
  x, ids, w = _inputs(N=60)  # 60 tokens: not divisible by 8 shards, exercises the padding
  ex = _experts()
  single = moe.dispatch_fast(x, ids, w, ex, backend="blocked", block=8)

  def ep(x, w, ex):
    return moe.dispatch_fast(
        x, ids, w, ex, mesh=mesh, token_axes=("data", "fsdp", "expert"), backend="blocked", block=8
    )

  np.testing.assert_allclose(np.asarray(jax.jit(ep)(x, w, ex)), np.asarray(single), atol=1e-5)
  f_single = lambda x, w, ex: jnp.sum(
      jnp.sin(moe.dispatch_fast(x, ids, w, ex, backend="blocked", block=8))
  )
  f_ep = lambda x, w, ex: jnp.sum(jnp.sin(ep(x, w, ex)))
  g1 = jax.grad(f_single, argnums=(0, 1, 2))(x, w, ex)
  g2 = jax.jit(jax.grad(f_ep, argnums=(0, 1, 2)))(x, w, ex)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5)


# Rules under which the tokens are split over `tensor` too. With the default `expert_mlp -> tensor` the
# expert-parallel psum over `tensor` would add up partial results of different tokens.
_TENSOR_BATCH = {"batch": ("data", "tensor", "expert")}


def _rules(**over):
  from fo_rl.parallel.sharding import DEFAULT_RULES

  over = {**_TENSOR_BATCH, **over}
  return tuple((n, over.get(n, v)) for n, v in DEFAULT_RULES)


@pytest.mark.slow
def test_expert_parallel_psum_axes_come_from_the_rules():
  """The expert-MLP psum runs over the axes of the `expert_mlp` rule (none here), not over `tensor`
  whatever the rules say: with the tokens split over `tensor`, the model's expert-parallel forward
  matches one device (values and routes)."""
  from fo_rl.model import init_model, make_apply
  from toy import TOY

  toks = jax.random.randint(jax.random.key(0), (8, 12), 0, TOY.vocab_size)
  pos = jnp.broadcast_to(jnp.arange(12), (8, 12))
  graphdef, state = init_model(TOY, seed=0)
  logits, routes = jax.jit(make_apply(graphdef))(state, toks, pos)
  mesh = make_mesh({"data": 2, "expert": 2, "tensor": 2})
  rules = _rules(expert_mlp=None)
  graphdef_m, state_m = init_model(TOY, mesh, rules, seed=0)
  logits_m, routes_m = jax.jit(make_apply(graphdef_m))(state_m, toks, pos)
  np.testing.assert_array_equal(np.asarray(routes_m), np.asarray(routes))
  np.testing.assert_allclose(np.asarray(logits_m), np.asarray(logits), atol=2e-5)


def test_expert_parallel_rejects_tokens_and_expert_mlp_on_one_axis():
  """`batch` and `expert_mlp` both on `tensor`: a ValueError naming parallel.rules, raised while
  tracing (before any compile), from the model and from dispatch_fast alike. On a mesh where that axis
  has size 1 nothing is split and nothing is rejected."""
  from fo_rl.model import abstract_model, make_apply
  from toy import TOY

  mesh = make_mesh({"data": 2, "expert": 2, "tensor": 2})
  graphdef, state = abstract_model(TOY, mesh, _rules())
  toks = jax.ShapeDtypeStruct((8, 12), jnp.int32)
  with pytest.raises(ValueError, match=r"parallel.rules.*\['tensor'\].*different tokens"):
    jax.eval_shape(make_apply(graphdef), state, toks, toks)
  x, ids, w = _inputs(N=16)
  with pytest.raises(ValueError, match=r"parallel.rules.*expert_mlp"):
    moe.dispatch_fast(
        x, ids, w, _experts(), mesh=mesh, token_axes=("data", "tensor"), mlp_axes=("tensor",)
    )
  assert moe.expert_parallel_axes(
      make_mesh({"data": 4, "expert": 2}), ("data", "tensor"), ("tensor",)
  ) == (
      ("data", "expert"),
      (),
  )


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["int8", "float8_e4m3fn"])
def test_expert_parallel_quantized_experts_match_numpy(dtype):
  """Quantized expert weights (QTensor: values + per-channel scales, the scales unsharded on their
  size-1 axes) through the expert-parallel path, experts over `expert` and their hidden dimension over
  `tensor`: the numpy definition on the dequantized weights, up to float rounding."""
  mesh = make_mesh({"expert": 4, "tensor": 2})
  x, ids, w = _inputs(N=60)
  ex = _experts()
  q = moe.Experts(*(quantize_array(a, dtype, (a.ndim - 2,)) for a in ex))
  deq = moe.Experts(*(dequantize_np(a) for a in q))
  ref = _np_moe(x, ids, w, deq)
  ep = jax.jit(
      lambda x, w, q: moe.dispatch_fast(
          x, ids, w, q, mesh=mesh, token_axes=("data", "fsdp", "expert"), backend="blocked", block=8
      )
  )(x, w, q)
  np.testing.assert_allclose(np.asarray(ep), ref, atol=1e-4)
  assert np.abs(_np_moe(x, ids, w, ex) - ref).max() > 1e-3  # quantization does change the output


@pytest.mark.parametrize("mesh_cfg", [None, {"fsdp": 2, "expert": 4}])
def test_megablox_dispatch_matches_reference_values_and_grads(mesh_cfg):
  """gmm_backend="megablox" (JAX's Pallas TPU grouped matmul, Pallas interpret mode on CPU; the
  backend "auto" picks on TPU): values and gradients (tokens, routing weights, expert weights: the
  weight gradient is megablox's transposed grouped matmul) against the reference dispatch, with empty
  and skewed groups, on one shard and expert-parallel."""
  x, _, w = _inputs(N=24)
  rng = np.random.default_rng(3)
  ids = jnp.asarray(  # experts 1 and 6 hold most assignments, some experts none
      np.stack([rng.choice([1, 6], 24), rng.choice([0, 2, 6], 24)], 1), jnp.int32
  )
  ex = _experts()
  mesh = make_mesh(mesh_cfg) if mesh_cfg else None
  axes = ("data", "fsdp", "expert")

  def fast(x, w, ex):
    return moe.dispatch_fast(x, ids, w, ex, mesh=mesh, token_axes=axes, backend="megablox")

  def loss(fn, x, w, ex):
    return jnp.sum(jnp.sin(fn(x, ids, w, ex)))

  ref = moe.dispatch_reference(x, ids, w, ex)
  np.testing.assert_allclose(np.asarray(jax.jit(fast)(x, w, ex)), np.asarray(ref), atol=1e-5)
  g_ref = jax.grad(lambda *a: loss(moe.dispatch_reference, *a), argnums=(0, 1, 2))(x, w, ex)
  g_mb = jax.jit(
      jax.grad(lambda *a: loss(lambda x, i, w, e: fast(x, w, e), *a), argnums=(0, 1, 2))
  )(x, w, ex)
  for a, b in zip(jax.tree.leaves(g_ref), jax.tree.leaves(g_mb)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-5)
  assert moe.resolve_gmm_backend("auto", "tpu") == "megablox"
  assert moe.resolve_gmm_backend("auto", "cpu") == "blocked"
