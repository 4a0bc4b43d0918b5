"""fo_rl/model/attention.py: every implementation against `reference` (values and gradients, float32),
and `reference` itself against a numpy loop over query rows."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fo_rl.model import attention as A


def _inputs(B=2, T=11, N=4, K=2, H=8, seed=0, segments=False, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.normal(size=(B, T, N, H)), dtype)
  k = jnp.asarray(rng.normal(size=(B, T, K, H)), dtype)
  v = jnp.asarray(rng.normal(size=(B, T, K, H)), dtype)
  key_mask = np.ones((B, T), bool)
  key_mask[0, :3] = False  # left padding (a prompt shorter than its bucket)
  key_mask[1, -2:] = False  # right padding
  seg = None
  if segments:  # packed rows: three segments in row 0, two in row 1
    seg = np.zeros((B, T), np.int32)
    seg[0, 5:], seg[0, 8:] = 1, 2
    seg[1, 6:] = 1
    seg = jnp.asarray(seg)
  return q, k, v, jnp.asarray(key_mask), seg


def _numpy_attention(q, k, v, key_mask, seg):
  """Row by row in float64: softmax over the allowed keys; a row with none averages all keys."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  B, T, N, H = q.shape
  K = k.shape[2]
  out = np.zeros_like(q)
  for b in range(B):
    for t in range(T):
      for n in range(N):
        kh = n // (N // K)
        allowed = np.array(
            [
                s <= t and key_mask[b, s] and (seg is None or seg[b, s] == seg[b, t])
                for s in range(T)
            ]
        )
        scores = k[b, :, kh] @ q[b, t, n] / np.sqrt(H)
        if allowed.any():
          w = np.where(allowed, np.exp(scores - scores[allowed].max()), 0.0)
        else:
          w = np.ones(T)
        out[b, t, n] = (w / w.sum()) @ v[b, :, kh]
  return out


@pytest.mark.parametrize("segments", [False, True])
def test_reference_matches_numpy(segments):
  q, k, v, key_mask, seg = _inputs(segments=segments)
  got = A.reference(q, k, v, key_mask, seg)
  want = _numpy_attention(q, k, v, np.asarray(key_mask), None if seg is None else np.asarray(seg))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def _loss(fn, cot):
  return lambda q, k, v: jnp.sum(fn(q, k, v) * cot)


@pytest.mark.parametrize(
    "block_q, block_k, segments",
    [
        pytest.param(4, 4, False, marks=pytest.mark.slow),
        (4, 4, True),
        (3, 5, True),
        pytest.param(16, 16, False, marks=pytest.mark.slow),
        pytest.param(11, 2, True, marks=pytest.mark.slow),
    ],
)
def test_blocked_matches_reference_values_and_gradients(block_q, block_k, segments):
  """Blocks that do and do not divide T = 11 (padded queries and keys), GQA (G = 2), causal masking,
  left and right padding, and segments; the cotangent is random, padding rows included."""
  q, k, v, key_mask, seg = _inputs(segments=segments)
  ref = lambda q, k, v: A.reference(q, k, v, key_mask, seg)
  blk = lambda q, k, v: A.blocked(q, k, v, key_mask, seg, block_q=block_q, block_k=block_k)
  np.testing.assert_allclose(blk(q, k, v), ref(q, k, v), rtol=1e-5, atol=1e-5)
  cot = jnp.asarray(np.random.default_rng(1).normal(size=q.shape), jnp.float32)
  g_ref = jax.grad(_loss(ref, cot), argnums=(0, 1, 2))(q, k, v)
  g_blk = jax.jit(jax.grad(_loss(blk, cot), argnums=(0, 1, 2)))(q, k, v)
  for name, a, b in zip("qkv", g_blk, g_ref):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=f"d{name}")


@pytest.mark.slow
def test_blocked_memory_is_linear_in_length():
  """The compiled forward + backward's temporary memory grows ~linearly with T (reference: ~T^2)."""

  def temp_bytes(impl, T):
    q, k, v, key_mask, _ = _inputs(B=2, T=T, N=2, K=1, H=16)
    if impl == "blocked":
      f = lambda q, k, v: A.blocked(q, k, v, key_mask, block_q=128, block_k=128)
    else:
      f = lambda q, k, v: A.reference(q, k, v, key_mask)
    g = jax.jit(jax.grad(lambda q, k, v: jnp.sum(f(q, k, v)), argnums=(0, 1, 2)))
    return g.lower(q, k, v).compile().memory_analysis().temp_size_in_bytes

  blocked = temp_bytes("blocked", 2048) / temp_bytes("blocked", 1024)
  reference = temp_bytes("reference", 2048) / temp_bytes("reference", 1024)
  assert blocked <= 2.2 and reference >= 3.5, (blocked, reference)


def test_xla_dot_product_attention_takes_the_same_mask():
  """The cudnn path's call, run with implementation="xla" (CPU): same mask, same function."""
  q, k, v, key_mask, seg = _inputs(segments=True)
  got = A.dot_product_attention(q, k, v, key_mask, seg, implementation="xla")
  ref = A.reference(q, k, v, key_mask, seg)
  # Rows with no allowed key are the caller's padding (their outputs are masked out); compare the rest.
  real = np.asarray(A._allowed(jnp.arange(11), jnp.arange(11), key_mask, seg, seg).any(-1))
  np.testing.assert_allclose(np.asarray(got)[real], np.asarray(ref)[real], rtol=1e-5, atol=1e-5)


def test_impl_choice_is_checked_and_resolved():
  with pytest.raises(ValueError, match=r"model\.attention_impl='flash'"):
    A.check_impl("flash")
  with pytest.raises(ValueError, match=r"model\.attention_impl='cudnn' needs a GPU"):
    A.check_impl("cudnn", backend="cpu")
  assert A.resolve("auto", 128, "cpu") == "reference"
  assert A.resolve("auto", A.AUTO_BLOCKED_FROM, "cpu") == "blocked"
  assert A.resolve("auto", 128, "tpu") == "splash"
  assert A.resolve("splash", 8, "cpu") == "splash"  # interpret mode off TPU
  assert A.resolve("auto", 128, "gpu") == "cudnn"
  assert A.resolve("blocked", 8, "cpu") == "blocked"


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["blocked", "splash"])
def test_model_attention_impl_matches_reference(toy_model, impl):
  """The whole toy MoE forward and its parameter gradients, left-padded rows, R3-style replayed routes
  held fixed: model.attention_impl only changes how attention is computed (blocked: blocks of 4 over
  T = 13; splash: the Pallas kernel in interpret mode)."""
  from toy import TOY

  from fo_rl.model.init import abstract_model, make_apply, positions_from_mask

  cfg, graphdef, params = toy_model
  B, T = 3, 13
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, TOY.vocab_size, (B, T)), jnp.int32)
  mask = np.ones((B, T), bool)
  mask[0, :4] = False
  mask = jnp.asarray(mask)
  pos = positions_from_mask(mask)
  _, routes = make_apply(graphdef)(params, tokens, pos, None, mask)

  def loss(impl, p):
    g, _ = abstract_model(cfg.replace(attention_impl=impl))
    logits, _ = make_apply(g)(p, tokens, pos, routes, mask)
    return jnp.sum(jnp.where(mask[..., None], jax.nn.log_softmax(logits), 0.0)[..., :7]), logits

  orig, calls = getattr(A, impl), []

  def counted(*a, **kw):
    calls.append(1)
    return orig(*a, **(dict(kw, block_q=4, block_k=4) if impl == "blocked" else kw))

  setattr(A, impl, counted)
  try:
    (l_b, logits_b), g_b = jax.value_and_grad(lambda p: loss(impl, p), has_aux=True)(params)
  finally:
    setattr(A, impl, orig)
  assert len(calls) == cfg.num_layers  # the knob reached every layer's attention
  (l_r, logits_r), g_r = jax.value_and_grad(lambda p: loss("reference", p), has_aux=True)(params)
  m = np.asarray(mask)
  np.testing.assert_allclose(np.asarray(logits_b)[m], np.asarray(logits_r)[m], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(l_b, l_r, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g_b), jax.tree.leaves(g_r)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_config_names_an_impl_the_backend_cannot_run():
  from fo_rl import config as config_lib

  c = config_lib.base_config()
  c.model.attention_impl = "cudnn"  # this machine has no GPU
  with pytest.raises(ValueError, match=r"model\.attention_impl='cudnn' needs a GPU"):
    config_lib.parse(c)
  c.dry_run = True  # a dry run targets a TPU
  with pytest.raises(ValueError, match=r"model\.attention_impl='cudnn' needs a GPU.*'tpu'"):
    config_lib.parse(c)
  c.model.attention_impl = "splash_v2"
  with pytest.raises(ValueError, match=r"model\.attention_impl='splash_v2'"):
    config_lib.parse(c)
  c.model.attention_impl = "blocked"
  assert config_lib.parse(c).model.attention_impl == "blocked"


def _real_rows(key_mask, seg, T):
  """[B, T] query rows that may attend to some key (the others are padding, which callers mask out)."""
  return np.asarray(A._allowed(jnp.arange(T), jnp.arange(T), key_mask, seg, seg).any(-1))


@pytest.mark.parametrize("segments", [pytest.param(False, marks=pytest.mark.slow), True])
def test_splash_matches_reference_values_and_gradients(segments):
  """JAX's Pallas TPU splash kernel in interpret mode (this CPU), T = 11 padded to its 128 alignment,
  GQA (one MQA kernel per KV head), left and right padding, segments."""
  q, k, v, key_mask, seg = _inputs(segments=segments)
  real = _real_rows(key_mask, seg, q.shape[1])
  spl = lambda q, k, v: A.splash(q, k, v, key_mask, seg)
  ref = lambda q, k, v: A.reference(q, k, v, key_mask, seg)
  out = np.asarray(spl(q, k, v))
  assert np.isfinite(out).all()  # padding rows too
  np.testing.assert_allclose(out[real], np.asarray(ref(q, k, v))[real], rtol=1e-5, atol=1e-5)
  cot = np.random.default_rng(1).normal(size=q.shape) * real[..., None, None]  # padding rows: 0
  cot = jnp.asarray(cot, jnp.float32)
  g_ref = jax.grad(_loss(ref, cot), argnums=(0, 1, 2))(q, k, v)
  g_spl = jax.grad(_loss(spl, cot), argnums=(0, 1, 2))(q, k, v)
  for name, a, b in zip("qkv", g_spl, g_ref):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5, err_msg=f"d{name}")


def test_splash_under_a_mesh_is_sharded_and_matches_reference():
  """attend(impl=splash) on {data: 2, expert: 2, tensor: 2}: shard_map over the batch axes and the
  heads axis (a Pallas call is not partitioned by XLA); same values as reference."""
  from fo_rl.parallel.sharding import make_mesh

  mesh = make_mesh({"data": 2, "fsdp": 1, "expert": 2, "tensor": 2})
  q, k, v, key_mask, seg = _inputs(B=4, T=9, N=4, K=2, segments=False)
  f = jax.jit(
      lambda q, k, v, m: A.attend(
          q, k, v, m, impl="splash", mesh=mesh, batch_axes=("data", "expert"), head_axes=("tensor",)
      )
  )
  hlo = f.lower(q, k, v, key_mask).as_text()
  assert "sdy.manual_computation" in hlo  # the shard_map around the kernel
  out = np.asarray(f(q, k, v, key_mask))
  real = _real_rows(key_mask, None, 9)
  np.testing.assert_allclose(out[real], np.asarray(A.reference(q, k, v, key_mask))[real], atol=1e-5)
  with pytest.raises(ValueError, match=r"model.attention_impl=splash: the heads axis"):
    A.attend(q, k[:, :, :1], v[:, :, :1], key_mask, impl="splash", mesh=mesh, head_axes=("tensor",))
