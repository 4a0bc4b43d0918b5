"""fo_rl/hlo_cost.py: the compiled program's FLOPs and bytes with loops and kernels, against counts made
independently (the matmuls' shapes by hand, the same program unrolled, the model's analytic FLOPs).
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fo_rl.hlo_cost import program_cost
from fo_rl.model import flops, make_apply, positions_from_mask
from fo_rl.model.init import init_model
from toy import TOY

M, D = 16, 32
MATMUL = 2 * M * D * D  # one [16, 32] x [32, 32]


def _loops(x, w):
  """A scan of 7 matmuls, a fori_loop of 5, a data-dependent while loop (at most 9) with a nested scan
  of 3 in its body, and a cond whose expensive branch does 2 matmuls."""

  def body(c, wi):
    return jnp.tanh(c @ wi), None

  c, _ = jax.lax.scan(body, x, w)
  c = jax.lax.fori_loop(0, 5, lambda i, c: jnp.tanh(c @ w[i]), c)

  def cond(s):
    return (s[0] < 9) & (jnp.abs(s[1]).sum() < 1e30)

  def step(s):
    inner, _ = jax.lax.scan(body, s[1], w[:3])
    return s[0] + 1, jnp.tanh(inner @ w[0])

  _, c = jax.lax.while_loop(cond, step, (0, c))
  return jax.lax.cond(c.sum() > 0, lambda c: (c @ w[1]) @ w[2], lambda c: c * 2, c)


def _compiled(f, *args):
  return jax.jit(f).lower(*args).compile()


def test_loops_count_their_trip_counts():
  compiled = _compiled(_loops, jnp.ones((M, D)), jnp.ones((7, D, D)))
  cost = program_cost(compiled.as_text())
  # scan 7 + fori 5 + while 9 x (nested scan 3 + 1) + the cond's expensive branch 2.
  assert cost.flops == MATMUL * (7 + 5 + 9 * 4 + 2)
  assert cost.loops == 4 and cost.bounded_loops == 1 and cost.unknown_loops == 0
  # XLA's own count takes every loop body once.
  xla = compiled.cost_analysis()
  xla = xla[0] if isinstance(xla, (list, tuple)) else xla
  assert xla["flops"] < 0.3 * cost.flops


def test_trip_counts_read_from_the_loop_condition():
  """Without XLA's known_trip_count annotation (TPU's optimized HLO has none), the count comes from the
  condition `i < n`, the initial value in the loop's input tuple and the body's increment."""
  text = _compiled(_loops, jnp.ones((M, D)), jnp.ones((7, D, D))).as_text()
  stripped = re.sub(r', backend_config=\{"dynamic_variables"[^\n]*', "", text)
  assert "known_trip_count" in text and "known_trip_count" not in stripped
  assert program_cost(stripped).flops == program_cost(text).flops


def test_a_loop_without_a_readable_bound_is_counted_once_and_flagged():
  def f(x, w):
    return jax.lax.while_loop(lambda c: jnp.abs(c).sum() < 1e30, lambda c: jnp.tanh(c @ w), x)

  cost = program_cost(_compiled(f, jnp.ones((M, D)), jnp.ones((D, D))).as_text())
  assert cost.unknown_loops == 1 and cost.flops == MATMUL


def test_a_fori_loop_with_a_run_time_bound_is_counted_to_its_cap():
  """fori_loop(0, min(n, 6), ...) with n a run-time input (the packed passes' loop over the micro-batches
  that hold tokens): the bound travels in the loop's tuple unchanged; its initial value min(n, 6) caps
  the count at 6, an upper bound (flagged). Without the cap it cannot be read."""

  def f(x, w, n, cap=True):
    bound = jnp.minimum(n, 6) if cap else n
    return jax.lax.fori_loop(0, bound, lambda i, c: jnp.tanh(c @ w[i]), x)

  args = (jnp.ones((M, D)), jnp.ones((7, D, D)), jnp.int32(3))
  cost = program_cost(_compiled(f, *args).as_text())
  assert cost.flops == 6 * MATMUL and cost.bounded_loops == 1 and cost.unknown_loops == 0
  cost = program_cost(_compiled(lambda *a: f(*a, cap=False), *args).as_text())
  assert cost.unknown_loops == 1 and cost.flops == MATMUL


def test_bytes_count_the_slices_of_a_stacked_operand_and_the_update_of_an_in_place_write():
  """A scan over stacked [L, D, D] weights moves each layer a few times (XLA:CPU slices it into a buffer,
  then the matmul reads it: 3x the stack), not the whole stack per step (48x), and a loop writing one
  row per step into a buffer writes the row (not the buffer)."""
  L, Dw = 48, 256
  x, w = jnp.ones((8, Dw)), jnp.ones((L, Dw, Dw))
  cost = program_cost(
      _compiled(lambda x, w: jax.lax.scan(lambda c, wi: (c @ wi, None), x, w)[0], x, w).as_text()
  )
  assert w.nbytes <= cost.bytes < 4 * w.nbytes

  def fill(buf):
    return jax.lax.fori_loop(
        0,
        1000,
        lambda i, b: jax.lax.dynamic_update_slice(b, jnp.full((1, 64), i, b.dtype), (i, 0)),
        buf,
    )

  buf = jnp.zeros((1000, 64))
  cost = program_cost(_compiled(fill, buf).as_text())
  assert cost.bytes < 10 * buf.nbytes  # 1,000 x the whole buffer would be 1,000x


@pytest.mark.parametrize("moe", [False, True])
def test_model_forward_scanned_equals_unrolled_and_the_analytic_count(moe):
  """The model's forward with its layers as one lax.scan counts the same as unrolled. The dense model
  matches the analytic FLOPs (fo_rl/model/flops.py) plus the masked half of the reference attention's
  scores; the MoE model counts more (XLA:CPU expands `ragged_dot` into matmuls over every expert).
  """
  counts = {}
  for scan in (False, True):
    cfg = TOY.replace(
        attention_impl="reference",
        num_layers=4,
        scan_layers=scan,
        vocab_size=512,
        hidden_size=128,
        head_dim=32,
        intermediate_size=512,
        moe_intermediate_size=128,
        gmm_backend="ragged_dot",
        mlp_only_layers=(),  # layers of one kind run as one scan
        **({} if moe else {"num_experts": 0}),
    )
    graphdef, state = init_model(cfg)
    B, T = 2, 32
    mask = jnp.ones((B, T), bool)
    args = (state, jnp.zeros((B, T), jnp.int32), positions_from_mask(mask), None, mask)
    counts[scan] = program_cost(_compiled(make_apply(graphdef), *args).as_text())
  assert counts[True].loops >= 1 and counts[False].loops == 0
  np.testing.assert_allclose(counts[True].flops, counts[False].flops, rtol=1e-6)
  per_key = cfg.num_layers * 4 * cfg.num_heads * cfg.head_dim
  full_scores = B * (2 * flops.matmul_params(cfg) * T + per_key * T * T)  # every query x every key
  causal = flops.forward_flops(cfg, B, T)
  assert causal < counts[True].flops
  if moe:
    assert counts[True].flops > full_scores
  else:
    np.testing.assert_allclose(counts[True].flops, full_scores, rtol=1e-6)


def test_convolution_window_pairs_by_brute_force():
  """The (output, window) position pairs of a convolution that read real input: the closed forms
  against enumeration, with padding, strides and both dilations (XLA:TPU writes dots as padded
  convolutions and weight gradients as base-dilated ones)."""
  from fo_rl.hlo_cost import _valid_pairs

  rng = np.random.default_rng(0)
  for _ in range(300):
    size, win = int(rng.integers(1, 12)), int(rng.integers(1, 6))
    stride, ld, rd = (int(rng.integers(1, 4)) for _ in range(3))
    lo, hi = int(rng.integers(0, 6)), int(rng.integers(0, 6))
    span = (size - 1) * ld + 1 + lo + hi - ((win - 1) * rd + 1)
    if span < 0:
      continue
    out = span // stride + 1
    brute = sum(
        1
        for o in range(out)
        for k in range(win)
        if 0 <= (p := o * stride + k * rd - lo) <= (size - 1) * ld and p % ld == 0
    )
    assert _valid_pairs(out, win, size, stride, lo, ld, rd) == brute, (
        size,
        win,
        stride,
        ld,
        rd,
        lo,
    )


def test_instructions_spanning_lines_and_sparsecore_computations():
  """A kernel's backend_config may hold a multi-line JSON string whose continuation starts with "}",
  and TPU SparseCore computations end with '}, execution_thread=...': neither ends a computation
  early (the layer loop's body here would lose its root and its trip count)."""
  text = """HloModule m

%body (p: (s32[], f32[4,4])) -> (s32[], f32[4,4]) {
  %p = (s32[], f32[4,4]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x = f32[4,4]{1,0} get-tuple-element(%p), index=1
  %k = f32[4,4]{1,0} custom-call(%x), custom_call_target="tpu_custom_call", backend_config={"custom_call_config":{"body":"abc",
"xprof_metadata":"{\\"block_q\\": 512}"
}}, metadata={op_name="kernel"}
  %d = f32[4,4]{1,0} dot(%k, %x), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %one = s32[] constant(1)
  %n = s32[] add(%i, %one)
  ROOT %t = (s32[], f32[4,4]{1,0}) tuple(%n, %d)
}

%sc (a: s32[8]) -> s32[8] {
  ROOT %a = s32[8]{0} parameter(0)
}, execution_thread="sparsecore"

%cond (p: (s32[], f32[4,4])) -> pred[] {
  %p = (s32[], f32[4,4]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %c = s32[] constant(48)
  ROOT %lt = pred[] compare(%i, %c), direction=LT
}

ENTRY %main (x: f32[4,4]) -> (s32[], f32[4,4]) {
  %x = f32[4,4]{1,0} parameter(0)
  %zero = s32[] constant(0)
  %t = (s32[], f32[4,4]{1,0}) tuple(%zero, %x)
  ROOT %w = (s32[], f32[4,4]{1,0}) while(%t), condition=%cond, body=%body
}
"""
  cost = program_cost(text)
  assert cost.loops == 1 and cost.unknown_loops == 0 and cost.kernels == 1
  assert cost.uncounted_kernels == ("k",)  # an unknown kernel is named, not guessed
  assert cost.flops == 48 * 2 * 4 * 4 * 4
