"""The model's analytic FLOPs (fo_rl/model/flops.py) against independent counts: the parameter tree, a
brute-force sum over queries and keys, and XLA's own cost analysis of the compiled forward pass."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fo_rl.model import abstract_model, make_apply, positions_from_mask
from fo_rl.model import flops
from fo_rl.model.init import init_model
from toy import TOY


def _path(p) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in p)


def test_active_parameters_from_the_parameter_tree():
  """matmul_params = every weight a token multiplies by: all non-expert matrices but the embedding
  lookup, k/E of each expert stack (the chosen experts), the router and the head."""
  for cfg in (TOY, TOY.replace(num_experts=0), TOY.replace(tie_word_embeddings=True)):
    _, abstract = abstract_model(cfg)
    total = 0.0
    for path, x in jax.tree_util.tree_flatten_with_path(abstract)[0]:
      name, n = _path(path), math.prod(x.shape)
      if x.ndim < 2:  # norms
        continue
      if "embed_tokens" in name:
        total += n if cfg.tie_word_embeddings else 0  # the tied head multiplies by it
      elif "experts" in name or ("mlp" in name and x.ndim == 3):  # an expert stack [E, ., .]
        total += n * cfg.num_experts_per_tok / cfg.num_experts
      else:
        total += n
    assert flops.matmul_params(cfg) == total, cfg


def test_qwen3_30b_a3b_is_a3b():
  """The published Qwen3-30B-A3B config: about 3.3B activated parameters (Qwen's figure), 3.0B without
  the embedding and head."""
  from fo_rl.config import hf_model
  from fo_rl.model import ModelConfig

  cfg = ModelConfig.from_dict(hf_model("qwen3_moe/qwen3_30b_a3b.config.json"))
  active = flops.matmul_params(cfg)
  assert 3.2e9 < active + cfg.vocab_size * cfg.hidden_size < 3.4e9


def test_attention_flops_by_brute_force():
  cfg = TOY
  per = cfg.num_layers * 4 * cfg.num_heads * cfg.head_dim
  for q, off in ((1, 0), (7, 0), (1, 9), (5, 3)):
    keys = sum(off + t + 1 for t in range(q))  # query t sees the offset's keys and itself
    assert flops.attention_flops(cfg, q, off) == per * keys
  # Decoding n tokens one by one after a prompt of P = prefill of P + n minus the prompt's own.
  assert flops.attention_flops(cfg, 6, 10) == flops.attention_flops(
      cfg, 16
  ) - flops.attention_flops(cfg, 10)
  assert flops.train_flops(cfg, 3, 16) == 3 * flops.forward_flops(cfg, 3, 16)
  assert flops.decode_flops(cfg, 2, 10, 6) == 2 * (
      2 * flops.matmul_params(cfg) * 6 + flops.attention_flops(cfg, 6, 10)
  )


@pytest.mark.parametrize("T", [16, 64])
def test_forward_flops_match_xla_cost_analysis(T):
  """A dense model's compiled forward (reference attention, whole logits): XLA counts what the formula
  does, within the ~1% of what the formula leaves out (norms, rotary, softmax), plus the masked
  half of the T x T attention scores XLA computes (the formula counts the causal half: we compare with
  both)."""
  # Wide enough that matmuls dominate as in a real model (at hidden 32 the elementwise ops are ~5%).
  cfg = TOY.replace(
      num_experts=0,
      attention_impl="reference",
      vocab_size=512,
      hidden_size=128,
      head_dim=32,
      intermediate_size=512,
  )
  graphdef, state = init_model(cfg)
  B = 2
  tokens = jnp.zeros((B, T), jnp.int32)
  mask = jnp.ones((B, T), bool)
  pos = positions_from_mask(mask)
  compiled = jax.jit(make_apply(graphdef)).lower(state, tokens, pos, None, mask).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  hlo = float(cost["flops"])
  causal = flops.forward_flops(cfg, B, T)
  per_key = cfg.num_layers * 4 * cfg.num_heads * cfg.head_dim
  full_scores = B * (2 * flops.matmul_params(cfg) * T + per_key * T * T)  # every query x every key
  assert causal < hlo
  np.testing.assert_allclose(hlo, full_scores, rtol=0.03)
  # The dry run's columns for a program without loops or kernels: the ratio, over the model's FLOPs.
  from fo_rl import dry_run

  # fo_rl/hlo_cost.py counts the matmuls only: XLA's count less its ~1-3% of element-wise work.
  cols = dry_run.flops_columns(compiled, causal, 1, dry_run.CHIPS["TPU v5"])
  assert cols["hlo_loops"] == cols["hlo_kernels"] == 0 and cols["xla_flops"] == hlo
  assert 0.96 * hlo < cols["hlo_flops"] <= hlo
  assert cols["flops_ratio"] == round(cols["hlo_flops"] / causal, 3)


def test_dry_run_counts_a_loop_at_its_trip_count():
  """XLA's cost analysis counts a while loop's body once: the layers as one lax.scan (model.scan_layers)
  cut its count by about the number of layers. The dry run's own count (fo_rl/hlo_cost.py) takes the
  trip count, so the scanned program's ratio is the unrolled one's."""
  from fo_rl import dry_run

  counts = {}
  for scan in (False, True):
    cfg = TOY.replace(num_experts=0, attention_impl="reference", num_layers=4, scan_layers=scan)
    graphdef, state = init_model(cfg)
    mask = jnp.ones((2, 16), bool)
    args = (state, jnp.zeros((2, 16), jnp.int32), positions_from_mask(mask), None, mask)
    compiled = jax.jit(make_apply(graphdef)).lower(*args).compile()
    counts[scan] = dry_run.flops_columns(compiled, flops.forward_flops(cfg, 2, 16), 1, None)
  assert counts[False]["hlo_loops"] == 0 and counts[True]["hlo_loops"] >= 1
  assert counts[True]["xla_flops"] < 0.6 * counts[False]["xla_flops"]
  assert counts[True]["hlo_flops"] == counts[False]["hlo_flops"]
  assert counts[True]["flops_ratio"] == counts[False]["flops_ratio"] > 1  # + the masked scores
