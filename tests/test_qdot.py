"""fo_rl.model.qdot: W8A8 matmuls (per-token dynamic activation scales, per-channel weight scales) against
numpy, int8 integer accumulation, the experts' grouped matmuls on quantized weights (no dequantized
expert stack in the program), and the sampler with quantized activations."""

import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from fo_rl.model import moe
from fo_rl.model.qdot import qdot, qeinsum, qragged_dot
from fo_rl.model.qtensor import QTensor, materialize
from fo_rl.sampler import quantize as Q

QMAX = {"int8": 127.0, "float8_e4m3fn": 448.0, "float8_e5m2": 57344.0}
NP_DTYPE = {
    "int8": np.int8,
    "float8_e4m3fn": ml_dtypes.float8_e4m3fn,
    "float8_e5m2": ml_dtypes.float8_e5m2,
}
DTYPES = ["float8_e4m3fn", "float8_e5m2", "int8"]  # the activation dtypes
LOW = {"int8": "i8", "float8_e4m3fn": "f8E4M3FN", "float8_e5m2": "f8E5M2"}  # in the lowered program


def np_quant(a, dtype, axes):
  """Reference symmetric quantization: scale = absmax over `axes` / qmax (1 for an all-zero slice),
  values round-to-nearest(a / scale) in the low dtype, returned as float64 (q, scale)."""
  a = np.asarray(a, np.float32)
  amax = np.abs(a).max(axis=tuple(axes), keepdims=True)
  scale = np.where(amax > 0, amax / np.float32(QMAX[dtype]), 1).astype(np.float32)
  v = np.clip(a / scale, -QMAX[dtype], QMAX[dtype])
  q = np.round(v) if dtype == "int8" else v.astype(NP_DTYPE[dtype]).astype(np.float32)
  return q.astype(np.float64), scale.astype(np.float64)


def np_qeinsum(spec, x, w_q: QTensor, dtype):
  """float64: x quantized per token over its contracted axes, times the stored weight values."""
  lhs, rest = spec.split(",")
  rhs, out = rest.split("->")
  xq, xs = np_quant(x, dtype, [d for d, c in enumerate(lhs) if c not in out])
  wq = np.asarray(w_q.q.astype(jnp.float32), np.float64)
  ws = np.asarray(w_q.scale, np.float64)
  return np.einsum(spec, xq * xs, wq * ws)


def _rand(shape, seed, spread=True):
  rng = np.random.default_rng(seed)
  a = rng.standard_normal(shape)
  if (
      spread
  ):  # rows (tokens) of very different magnitudes: a per-tensor scale would lose the small ones
    a = a * np.exp(rng.uniform(-3, 3, shape[:1] + (1,) * (len(shape) - 1)))
  return jnp.asarray(a, jnp.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "spec,xshape,wshape,waxes",
    [
        ("btd,dnh->btnh", (3, 5, 32), (32, 4, 8), (0,)),  # q/k/v projections
        ("btnh,nhd->btd", (3, 5, 4, 8), (4, 8, 32), (0, 1)),  # o_proj
        ("nbd,ndf->nbf", (6, 4, 16), (6, 16, 24), (1,)),  # an expert matmul per block
        ("nd,edf->nef", (7, 16), (3, 16, 24), (1,)),  # every expert on every token
    ],
)
def test_qeinsum_matches_numpy(dtype, spec, xshape, wshape, waxes):
  x = _rand(xshape, 0)
  wq = Q.quantize_array(_rand(wshape, 1, spread=False), dtype, waxes, dtype)
  got = jax.jit(lambda x, w: qeinsum(spec, x, w, jnp.float32))(x, wq)
  ref = np_qeinsum(spec, x, wq, dtype)
  np.testing.assert_allclose(np.asarray(got), ref, rtol=2e-5, atol=2e-5 * np.abs(ref).max())
  # the matmul really runs on low-precision operands (the lowered program's dot_general)
  hlo = jax.jit(lambda x, w: qeinsum(spec, x, w, jnp.float32)).lower(x, wq).as_text()
  low = LOW[dtype]
  dots = [l for l in hlo.splitlines() if "dot_general" in l]
  assert dots and all(l.count(f"x{low}>") == 2 for l in dots), dots
  # and activations are quantized: not the weight-only result
  wo = np.einsum(spec, np.asarray(x, np.float64), Q.dequantize_np(wq).astype(np.float64))
  assert np.abs(np.asarray(got) - wo).max() > 1e-4 * np.abs(wo).max()


@pytest.mark.parametrize("dtype", DTYPES)
def test_qdot_and_router_shape(dtype):
  x = _rand((2, 3, 16), 2)
  wq = Q.quantize_array(_rand((16, 12), 3, spread=False), dtype, (0,), dtype)
  got = jax.jit(lambda x, w: qdot(x, w, jnp.float32))(x, wq)
  np.testing.assert_allclose(
      np.asarray(got), np_qeinsum("btd,df->btf", x, wq, dtype), rtol=2e-5, atol=1e-5
  )


def test_int8_accumulates_exactly_in_int32():
  """int8 x int8 products summed in int32: exact. Rows and columns reaching 127 give scales of 1, so the
  output is float32(exact integer sum); with sums past 2^24 of odd products a float32 accumulation
  drops low bits (it differs for these inputs)."""
  rng = np.random.default_rng(0)
  D = 4096
  x = np.full((4, D), 127, np.float32)  # rows of 127: activation scale 1
  x[1, ::2] = -127
  w = (rng.integers(0, 64, (D, 16)) * 2 + 1).astype(np.float32)  # odd: odd products
  w[0] = 127  # each column reaches 127: weight scale 1
  wq = Q.quantize_array(jnp.asarray(w), "int8", (0,), "int8")
  np.testing.assert_array_equal(np.asarray(wq.scale), 1.0)
  got = np.asarray(jax.jit(lambda x, w: qdot(x, w, jnp.float32))(jnp.asarray(x), wq))
  exact = x.astype(np.int64) @ w.astype(np.int64)
  assert exact.max() > 2**24
  np.testing.assert_array_equal(got, exact.astype(np.float32))
  f32 = np.zeros(exact.shape, np.float32)
  for d in range(D):  # sequential float32 accumulation: what int32 accumulation must not be
    f32 += np.float32(x[:, d : d + 1]) * np.float32(w[d][None])
  assert (f32 != exact.astype(np.float32)).any()
  hlo = jax.jit(lambda x, w: qdot(x, w, jnp.float32)).lower(jnp.asarray(x), wq).as_text()
  assert re.search(r"dot_general.*xi8>.*xi8>\) -> tensor<[0-9x]*xi32>", hlo), hlo


def test_weight_only_dense_sites_are_the_dequantized_matmul():
  """activation_dtype none: a dense site is exactly `x @ (q * scale)` (bit-identical to the
  weight-only sampler before W8A8 existed)."""
  x = _rand((3, 5, 32), 4)
  for dtype in DTYPES:
    wq = Q.quantize_array(_rand((32, 4, 8), 5, spread=False), dtype, (0,))
    f = jax.jit(lambda x, w: qeinsum("btd,dnh->btnh", x, w, jnp.float32))
    g = jax.jit(lambda x, w: jnp.einsum("btd,dnh->btnh", x, materialize(w, jnp.float32)))
    np.testing.assert_array_equal(np.asarray(f(x, wq)), np.asarray(g(x, wq)))


def test_qeinsum_rejects_a_scale_over_the_contraction():
  w = QTensor(jnp.ones((4, 6), jnp.int8), jnp.ones((4, 1)), "int8")  # scale per input row: wrong
  with pytest.raises(ValueError, match="varies along contracted axis"):
    qeinsum("nd,df->nf", jnp.ones((2, 4)), w, jnp.float32)


# ------------------------------------------------------------------------------------------------
# Experts.
# ------------------------------------------------------------------------------------------------
E, D, F = 6, 24, 40  # distinct sizes, so an [E, D, F] / [*, D, F] tensor is recognizable in the HLO


def _experts(seed=0):
  k = jax.random.split(jax.random.key(seed), 3)
  return moe.Experts(
      0.3 * jax.random.normal(k[0], (E, D, F)),
      0.3 * jax.random.normal(k[1], (E, D, F)),
      0.3 * jax.random.normal(k[2], (E, F, D)),
  )


def _inputs(N=13, k=2, seed=0):  # N*k and the padded block rows differ from D, F
  rng = np.random.default_rng(seed)
  x = _rand((N, D), seed)
  ids, w = moe.route(jnp.asarray(rng.normal(size=(N, E)) * 2, jnp.float32), k)
  return x, ids, w


def _quantized(ex, dtype, act):
  return moe.Experts(*(Q.quantize_array(a, dtype, (1,), act) for a in ex))


def np_moe_w8a8(x, ids, w, q: moe.Experts, act):
  """numpy: y_n = sum_j w_nj FFN_e(x_n) with every expert matmul's input quantized per (token, expert)
  row (act: the activation dtype, None for weight-only) and the expert weights dequantized."""
  deq = [Q.dequantize_np(a).astype(np.float64) for a in q]
  x, ids, w = np.asarray(x, np.float32), np.asarray(ids), np.asarray(w, np.float64)

  def inp(v):
    if act is None:
      return v.astype(np.float64)
    vq, vs = np_quant(v[None], act, (1,))
    return (vq * vs)[0]

  y = np.zeros(x.shape, np.float64)
  for n in range(x.shape[0]):
    xn = inp(x[n])
    for j in range(ids.shape[1]):
      e = ids[n, j]
      a = xn @ deq[0][e]
      h = (a / (1 + np.exp(-a)) * (xn @ deq[1][e])).astype(np.float32)
      y[n] += w[n, j] * (inp(h) @ deq[2][e])
  return y


DISPATCHES = {
    "blocked": lambda x, i, w, ex: moe.dispatch_fast(x, i, w, ex, backend="blocked", block=8),
    "ragged_dot": lambda x, i, w, ex: moe.dispatch_fast(x, i, w, ex, backend="ragged_dot"),
    "dense": moe.dispatch_dense,
    "reference": moe.dispatch_reference,
}


@pytest.mark.parametrize("dispatch", list(DISPATCHES))
@pytest.mark.parametrize("dtype,act", [(d, d) for d in DTYPES])
def test_quantized_experts_match_numpy(dispatch, dtype, act):
  x, ids, w = _inputs()
  q = _quantized(_experts(), dtype, act)
  got = np.asarray(jax.jit(DISPATCHES[dispatch])(x, ids, w, q))
  ref = np_moe_w8a8(x, ids, w, q, act)
  np.testing.assert_allclose(got, ref, rtol=0, atol=1e-4 * np.abs(ref).max())
  wo = np_moe_w8a8(x, ids, w, q, None)  # weight-only: quantizing activations does change the output
  assert np.abs(got - wo).max() > 1e-3 * np.abs(wo).max()


@pytest.mark.parametrize("dispatch", list(DISPATCHES))
@pytest.mark.parametrize("dtype", DTYPES + ["int4"])
def test_weight_only_experts_scale_after_the_matmul(dispatch, dtype):
  """Weight-only experts apply the scale after the grouped matmul: the same as the dispatch on the
  dequantized float weights up to float32 rounding."""
  x, ids, w = _inputs()
  q = _quantized(_experts(), dtype, None)
  deq = moe.Experts(*(jnp.asarray(Q.dequantize_np(a)) for a in q))
  got = np.asarray(jax.jit(DISPATCHES[dispatch])(x, ids, w, q))
  ref = np.asarray(jax.jit(DISPATCHES[dispatch])(x, ids, w, deq))
  np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5 * np.abs(ref).max())
  np.testing.assert_allclose(got, np_moe_w8a8(x, ids, w, q, None), atol=1e-5 * np.abs(ref).max())


_FLOAT = r"(f32|bf16|f16|f64)"


def _float_weight_stacks(text: str) -> list[str]:
  """Float tensor types in a program text whose two minor dims are an expert matrix's (D, F) or (F, D),
  or the dense dispatch's flattened (D, E*F) / (E*F, D): a dequantized (possibly gathered) expert stack.
  """
  pats = [f"{D}x{F}", f"{F}x{D}", f"{D}x{E * F}", f"{E * F}x{D}"]
  found = re.findall(r"tensor<([0-9x]+)x" + _FLOAT + ">", text)
  return [f"{s}x{t}" for s, t in found if any(s == p or s.endswith("x" + p) for p in pats)]


def _jaxpr_float_stacks(jaxpr) -> list[str]:
  """The same check on a jaxpr's printed types (f32[6,24,40])."""
  out = []
  for m in re.finditer(r"(f32|bf16|f16|f64)\[([0-9,]+)\]", str(jaxpr)):
    dims = m.group(2).split(",")
    if len(dims) >= 2 and tuple(dims[-2:]) in {
        (str(D), str(F)),
        (str(F), str(D)),
        (str(D), str(E * F)),
        (str(E * F), str(D)),
    }:
      out.append(m.group(0))
  return out


@pytest.mark.parametrize("dispatch", list(DISPATCHES))
def test_no_dequantized_expert_stack(dispatch):
  """The quantized experts never become a float [E, D, F] stack (nor a per-block gathered one): with
  activations quantized, none in the lowered program at all; weight-only, none in the jaxpr (the
  backend may upcast the stored values inside the matmul). Reintroducing `materialize` (q * scale)
  in any dispatch makes this fail; the float experts' own program is the positive control."""
  x, ids, w = _inputs()
  ex = _experts()
  fn = jax.jit(DISPATCHES[dispatch])
  assert _float_weight_stacks(fn.lower(x, ids, w, ex).as_text())  # the check sees float stacks
  hlo = fn.lower(x, ids, w, _quantized(ex, "float8_e4m3fn", "float8_e4m3fn")).as_text()
  assert not _float_weight_stacks(hlo), _float_weight_stacks(hlo)
  jaxpr = jax.make_jaxpr(DISPATCHES[dispatch])(x, ids, w, _quantized(ex, "int8", None))
  assert not _jaxpr_float_stacks(jaxpr), _jaxpr_float_stacks(jaxpr)


def test_qragged_dot_per_expert_scales():
  """qragged_dot against numpy, groups of uneven sizes including an empty one."""
  x = _rand((10, D), 7)
  gs = jnp.asarray([3, 0, 4, 1, 2, 0], jnp.int32)
  for act in (None, "float8_e4m3fn"):
    wq = Q.quantize_array(_experts()[0], "float8_e4m3fn", (1,), act)
    got = np.asarray(jax.jit(lambda x, w: qragged_dot(x, w, gs, jnp.float32))(x, wq))
    deq = Q.dequantize_np(wq).astype(np.float64)
    if act is None:
      xs = np.asarray(x, np.float64)
    else:
      xq, s = np_quant(x, act, (1,))
      xs = xq * s
    groups = np.repeat(np.arange(E), np.asarray(gs))
    ref = np.stack([xs[i] @ deq[g] for i, g in enumerate(groups)])
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5 * np.abs(ref).max())


# ------------------------------------------------------------------------------------------------
# The sampler with quantized activations.
# ------------------------------------------------------------------------------------------------
def _token_kl(logits_mu, logits_pi, mask):
  """Mean over real response tokens of the exact KL(mu || pi) of the two next-token distributions."""
  lm = jax.nn.log_softmax(jnp.asarray(logits_mu, jnp.float32))
  lp = jax.nn.log_softmax(jnp.asarray(logits_pi, jnp.float32))
  kl = jnp.sum(jnp.exp(lm) * (lm - lp), -1)
  return float(np.asarray(kl)[mask].mean())


@pytest.mark.slow
def test_sampler_with_fp8_activations(toy_model):
  """sampler.activation_dtype=float8_e4m3fn: logp_mu is the log-prob under the quantized model that
  sampled (a direct teacher-forced forward of the sampler's own QTensor weights gives it back), and the
  train-inference KL (exact, per token, on the same sequences) is larger than with weight-only FP8.
  The routes the sampler reports are the ones that forward takes."""
  from fo_rl.model import make_apply
  from fo_rl.rl.rollouts import Rollouts
  from fo_rl.sampler import Sampler, SamplerConfig, SamplingParams
  from toy import TOY

  _, graphdef, state = toy_model
  state = jax.tree_util.tree_map(
      lambda x: x * 10.0 if x.ndim > 1 else x, state
  )  # sharper, as trained
  apply = jax.jit(make_apply(graphdef))
  rng = np.random.default_rng(0)
  prompts = [list(rng.integers(12, 128, n)) for n in rng.integers(1, 16, 32)]
  sp = SamplingParams(temperature=1.0, max_new_tokens=24, eos_ids=(3, 7, 11))
  fp8 = "float8_e4m3fn"
  s_w = Sampler(TOY, SamplerConfig(weight_dtype=fp8), trainer_state=state)
  s_a = Sampler(TOY, SamplerConfig(weight_dtype=fp8, activation_dtype=fp8), trainer_state=state)
  leaves = jax.tree.leaves(s_a.params, is_leaf=lambda v: isinstance(v, QTensor))
  assert {v.act_dtype for v in leaves if isinstance(v, QTensor)} == {fp8}
  out = s_a.generate(prompts, sp, seed=5)
  ro = Rollouts.from_sample(out, np.zeros(len(prompts), np.float32))
  P = out.prompt_tokens.shape[1]
  mask = np.asarray(out.response_mask)

  def fwd(params, routes=None):
    logits, live = apply(params, ro.tokens, ro.positions, routes, ro.token_mask)
    return np.asarray(logits[:, P - 1 : -1]), np.asarray(live)

  la, routes_a = fwd(s_a.params)
  lw, _ = fwd(s_w.params)
  lt, _ = fwd(state)
  # logp_mu against the same quantized model fed the sampler's experts (a rare near-tie routing flip
  # between the cached decode and the full forward would otherwise dominate the largest gaps)
  lr, _ = fwd(s_a.params, ro.routes)
  lp_a = np.take_along_axis(
      np.asarray(jax.nn.log_softmax(lr)), np.asarray(out.tokens)[..., None], -1
  )
  gap = np.abs(np.asarray(out.logp_mu) - lp_a[..., 0])[mask]
  real = np.asarray(ro.token_mask)
  route_agree = (np.asarray(out.routes)[real] == routes_a[real]).all(-1).mean()
  kl_w, kl_a = _token_kl(lw, lt, mask), _token_kl(la, lt, mask)
  print(
      f"\nlogp_mu vs the fp8-activation forward: max |gap| {gap.max():.2e}, mean {gap.mean():.2e}, "
      f"route agreement {route_agree:.4f}; KL(mu||pi): weight-only {kl_w:.5f}, fp8 activations {kl_a:.5f}"
  )
  assert np.median(gap) < 1e-5 and np.quantile(gap, 0.99) < 1e-3, gap.max()
  assert kl_a > 1.5 * kl_w > 0


@pytest.mark.slow
def test_expert_parallel_w8a8_matches_numpy():
  """The expert-parallel dispatch (experts over `expert`, tokens over `data` and `expert`) with fp8
  weights and activations: the whole-row numpy reference (every row is quantized on the shard that
  computes it, with the experts' hidden dimension whole)."""
  from fo_rl.parallel.sharding import make_mesh

  mesh = make_mesh({"expert": 2, "data": 4})
  x, ids, w = _inputs(N=16)
  q = _quantized(_experts(), "float8_e4m3fn", "float8_e4m3fn")
  ep = jax.jit(
      lambda x, w, q: moe.dispatch_fast(
          x, ids, w, q, mesh=mesh, token_axes=("data", "fsdp", "expert"), backend="blocked", block=8
      )
  )(x, w, q)
  ref = np_moe_w8a8(x, ids, w, q, "float8_e4m3fn")
  np.testing.assert_allclose(np.asarray(ep), ref, rtol=0, atol=1e-4 * np.abs(ref).max())


def test_activation_dtype_is_validated():
  from fo_rl.sampler import SamplerConfig

  SamplerConfig(weight_dtype="int8", activation_dtype="int8")
  with pytest.raises(ValueError, match=r"sampler.activation_dtype='fp8': must be one of"):
    SamplerConfig(weight_dtype="float8_e4m3fn", activation_dtype="fp8")
  for weight in ("float32", "bfloat16", "int8"):  # fp8 activations need fp8 weights
    with pytest.raises(ValueError, match=r"sampler.activation_dtype='float8_e4m3fn'.*weight_dtype"):
      SamplerConfig(weight_dtype=weight, activation_dtype="float8_e4m3fn")
