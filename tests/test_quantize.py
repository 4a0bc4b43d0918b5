"""fo_rl.sampler.quantize against a numpy reference: per-output-channel scales, round trip, layouts, parts."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from fo_rl.model import QTensor, init_model
from fo_rl.sampler import quantize as Q
from toy import TOY

CFG = TOY  # the toy model (tests/toy.py)
# jitted: eager quantization compiles every small op of every parameter shape separately (slow tests)
quantize_state = jax.jit(Q.quantize_state, static_argnums=(1, 2))
NP_DTYPE = {
    "int8": np.int8,
    "int4": ml_dtypes.int4,
    "float8_e4m3fn": ml_dtypes.float8_e4m3fn,
    "float8_e5m2": ml_dtypes.float8_e5m2,
}
QMAX = {"int8": 127.0, "int4": 7.0, "float8_e4m3fn": 448.0, "float8_e5m2": 57344.0}
DTYPES = list(QMAX)
# Float grids: mantissa bits and the smallest subnormal step (in units of the channel's scale).
FLOAT_GRID = {"float8_e4m3fn": (3, 2.0**-9), "float8_e5m2": (2, 2.0**-16)}


def np_quantize(w, dtype, axes):
  """Reference: scale = absmax over the contracted axes / qmax; q = round-to-nearest(w / scale)."""
  w = np.asarray(w, np.float32)
  scale = (np.abs(w).max(axis=axes, keepdims=True) / np.float32(QMAX[dtype])).astype(np.float32)
  x = np.clip(w / scale, -QMAX[dtype], QMAX[dtype])
  q = np.round(x).astype(NP_DTYPE[dtype]) if dtype.startswith("int") else x.astype(NP_DTYPE[dtype])
  return q, scale


@pytest.fixture(scope="module")
def state(toy_model):
  return toy_model[2]  # init_model(CFG)[1], shared by the session


def _flat(state):
  return {
      "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in p): v.get_value()
      for p, v in jax.tree_util.tree_flatten_with_path(
          state, is_leaf=lambda x: isinstance(x, nnx.Variable)
      )[0]
  }


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shape,axes",
    [
        ((32, 4, 8), (0,)),
        ((4, 8, 32), (0, 1)),
        ((8, 32, 16), (1,)),
        ((8, 16, 32), (1,)),
        ((32, 8), (0,)),
        ((128, 32), (1,)),
    ],
)
def test_round_trip_matches_numpy(dtype, shape, axes):
  rng = np.random.default_rng(0)
  # channels with very different magnitudes: a per-tensor scale would lose the small ones
  w = (
      rng.standard_normal(shape) * np.exp(rng.uniform(-4, 2, shape[:1] + (1,) * (len(shape) - 1)))
  ).astype(np.float32)
  qt = jax.jit(Q.quantize_array, static_argnums=(1, 2))(jnp.asarray(w), dtype, axes)
  q_ref, s_ref = np_quantize(w, dtype, axes)
  expect_scale = tuple(1 if d in axes else n for d, n in enumerate(shape))
  assert qt.q.dtype == jnp.dtype(dtype) and qt.scale.shape == expect_scale
  np.testing.assert_allclose(np.asarray(qt.scale), s_ref, rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(qt.q.astype(jnp.float32)), q_ref.astype(np.float32))
  err = np.abs(Q.dequantize_np(qt) - w)
  if dtype.startswith("int"):  # half a step of the channel's grid
    assert np.all(err <= 0.5 * s_ref * (1 + 1e-5) + 1e-12)
  else:  # m mantissa bits -> relative error <= 2^-(m+1) (normals), half a subnormal step x scale
    bits, sub = FLOAT_GRID[dtype]
    bound = np.maximum(2.0 ** -(bits + 1) * np.abs(w), 0.5 * sub * s_ref)
    assert np.all(err <= bound * (1 + 1e-5))
    # and the grid is that coarse: some error comes near the bound (e5m2 is not e4m3)
    assert np.any(err > 0.5 * 2.0 ** -(bits + 1) * np.abs(w))
  # every channel's largest entry lands on qmax exactly (the grid is per output channel)
  amax = np.abs(np.asarray(qt.q.astype(jnp.float32))).max(axis=axes)
  np.testing.assert_array_equal(amax, QMAX[dtype])


def test_zero_channel_stays_zero():
  w = jnp.zeros((4, 3)).at[:, 1].set(jnp.arange(4.0))
  for dtype in DTYPES:
    qt = Q.quantize_array(w, dtype, (0,))
    back = Q.dequantize_np(qt)
    assert np.all(np.isfinite(np.asarray(qt.scale))) and np.all(back[:, [0, 2]] == 0)
    np.testing.assert_allclose(back[:, 1], np.arange(4.0), rtol=2**-3, atol=0.5 * 3 / 7)


EXPECTED_SCALES = (
    {  # the output channels of every weight layout, for CFG (D=32 N=4 K=2 H=8 E=8 F=16)
        "embed_tokens": (128, 1),
        "lm_head": (1, 128),
        "layers/0/self_attn/q_proj": (1, 4, 8),
        "layers/0/self_attn/k_proj": (1, 2, 8),
        "layers/0/self_attn/v_proj": (1, 2, 8),
        "layers/0/self_attn/o_proj": (1, 1, 32),
        "layers/0/mlp/router": (1, 8),
        "layers/0/mlp/gate_proj": (8, 1, 16),
        "layers/0/mlp/up_proj": (8, 1, 16),
        "layers/0/mlp/down_proj": (8, 1, 32),
        "layers/1/mlp/gate_proj": (1, 48),
        "layers/1/mlp/up_proj": (1, 48),
        "layers/1/mlp/down_proj": (1, 32),
        "layers/0/input_layernorm/weight": (1,),
        "layers/0/self_attn/q_norm/weight": (1,),
        "norm/weight": (1,),
    }
)


@pytest.mark.parametrize("dtype", DTYPES)
def test_scale_axes_for_every_layout(state, dtype):
  q = _flat(quantize_state(state, dtype, ()))  # quantize every part
  src = _flat(state)
  for name, shape in EXPECTED_SCALES.items():
    assert isinstance(q[name], QTensor), name
    assert q[name].scale.shape == shape, (name, q[name].scale.shape)
  for name, qt in q.items():  # and every parameter agrees with the numpy reference
    axes = tuple(
        d
        for d, n in enumerate(qt.scale.shape)
        if n == 1 and qt.q.shape[d] != 1 or qt.scale.ndim == 1
    )
    q_ref, s_ref = np_quantize(np.asarray(src[name]), dtype, axes)
    np.testing.assert_allclose(np.asarray(qt.scale), s_ref, rtol=1e-6, err_msg=name)
    np.testing.assert_array_equal(
        np.asarray(qt.q.astype(jnp.float32)), q_ref.astype(np.float32), err_msg=name
    )


def test_default_keeps_embed_norm_router_lm_head(state):
  q = _flat(quantize_state(state, "float8_e4m3fn", Q.DEFAULT_KEEP))
  for name, v in q.items():
    part = Q.part_of(tuple(name.split("/")), len(v.shape))
    if part in Q.DEFAULT_KEEP:
      assert not isinstance(v, QTensor) and v.dtype == jnp.float32, name
    else:
      assert part in ("attn", "mlp", "experts") and isinstance(v, QTensor), name
      assert v.q.dtype == jnp.float8_e4m3fn
  assert {Q.part_of(tuple(n.split("/")), len(v.shape)) for n, v in q.items()} == set(Q.PARTS)


def test_float_dtypes_and_validation(state):
  bf = _flat(quantize_state(state, "bfloat16", Q.DEFAULT_KEEP))
  assert all(not isinstance(v, QTensor) and v.dtype == jnp.bfloat16 for v in bf.values())
  f32 = _flat(quantize_state(state, "float32", ()))
  src = _flat(state)
  assert all(np.array_equal(np.asarray(f32[n]), np.asarray(src[n])) for n in src)
  with pytest.raises(ValueError, match="weight_dtype"):
    Q.quantize_state(state, "float8_e3m4")
  with pytest.raises(ValueError, match="activation_dtype='int4'"):  # int4 is weight-only (W4A16)
    Q.quantize_state(state, "int4", activation_dtype="int4")
  with pytest.raises(ValueError, match="unknown part"):
    Q.quantize_state(state, "int8", keep_high_precision=("embedding",))


@pytest.mark.slow
def test_quantized_model_runs_close_to_float(state):
  graphdef, _ = init_model(CFG)
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, 128, (2, 9)), jnp.int32)
  pos = jnp.broadcast_to(jnp.arange(9), (2, 9))
  fwd = jax.jit(lambda st: nnx.merge(graphdef, st)(tokens, pos)[0])
  ref = fwd(state)
  # every part quantized, embeddings, norms and lm_head included (fp8: the coarser of the two grids)
  out = fwd(quantize_state(state, "float8_e4m3fn", ()))
  rel = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
  assert 0 < rel < 0.1, rel
