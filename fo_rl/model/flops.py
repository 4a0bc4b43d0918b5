"""The model's analytic FLOPs: what a forward (or forward + backward) pass must compute, by the formula.

Used by the dry run (fo_rl/dry_run.py) beside the compiled program's own count (`cost_analysis()`): their
ratio shows compute the program spends beyond the model's (recomputation under `model.remat`, padded or
replicated work, a dense dispatch computing every expert).

Counted: every matmul with a weight (2 FLOPs per multiply-add): the attention projections, the dense MLPs,
the router, the k chosen experts of each MoE token (not all E: the *active* parameters), the output
projection; plus causal attention itself, 2 x 2 x heads x head_dim x (keys a query sees) per query for
QK^T and the weighted sum of V. Not counted (each well under 1% at these sizes): norms, rotary
embeddings, softmaxes, the gating and the loss. A backward pass costs 2x its forward (the gradients with
respect to the activations and to the weights), so a training step is 3x a forward: the familiar
6 x active parameters x tokens, plus attention.
"""

from __future__ import annotations

from fo_rl.model.config import ModelConfig


def matmul_params(cfg: ModelConfig) -> int:
  """Weights one token multiplies by in a forward pass (active parameters, embedding lookup excluded,
  the output projection included)."""
  D, N, K, H = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  attn = D * (N + 2 * K) * H + N * H * D
  total = D * cfg.vocab_size  # lm_head (or the tied embedding used as the head)
  for i in range(cfg.num_layers):
    total += attn
    if cfg.num_experts and cfg.is_moe_layer(i):
      total += D * cfg.num_experts + cfg.num_experts_per_tok * 3 * D * cfg.moe_intermediate_size
    else:
      total += 3 * D * cfg.intermediate_size
  return total


def attention_flops(cfg: ModelConfig, query_len: int, key_offset: int = 0) -> int:
  """Forward FLOPs of causal attention for one sequence, all layers: `query_len` new queries, the first
  of which sees `key_offset + 1` keys (a prefill has offset 0; decoding token t of a sequence whose
  prompt is P long has offset P + t)."""
  keys_seen = query_len * key_offset + query_len * (query_len + 1) // 2
  return cfg.num_layers * 4 * cfg.num_heads * cfg.head_dim * keys_seen


def forward_flops(cfg: ModelConfig, rows: int, seq_len: int) -> int:
  """A forward pass over `rows` sequences of `seq_len` tokens (the trainer's full-length rows)."""
  return rows * (2 * matmul_params(cfg) * seq_len + attention_flops(cfg, seq_len))


def train_flops(cfg: ModelConfig, rows: int, seq_len: int) -> int:
  """Forward + backward over `rows` x `seq_len` tokens: 3 x `forward_flops`."""
  return 3 * forward_flops(cfg, rows, seq_len)


def decode_flops(cfg: ModelConfig, rows: int, prompt_len: int, new_tokens: int) -> int:
  """Generating `new_tokens` tokens for each of `rows` sequences after a `prompt_len` prompt, one token
  at a time (each attends to the prompt and the tokens before it)."""
  return rows * (
      2 * matmul_params(cfg) * new_tokens + attention_flops(cfg, new_tokens, key_offset=prompt_len)
  )


def engine_step_flops(
    cfg: ModelConfig,
    decode: int,
    context: int,
    prefill_rows: int = 0,
    chunk: int = 0,
    prefill_context: int = 0,
) -> int:
  """One step of the paged engine: `decode` sequences feed one token each at position `context` - 1
  (attending to `context` keys) and draw from it; `prefill_rows` chunks of `chunk` prompt tokens end
  at position `prefill_context` - 1 (no output projection: nothing is drawn from them)."""
  head = cfg.hidden_size * cfg.vocab_size
  return decode * (
      2 * matmul_params(cfg) + attention_flops(cfg, 1, key_offset=context - 1)
  ) + prefill_rows * (
      2 * (matmul_params(cfg) - head) * chunk
      + attention_flops(cfg, chunk, key_offset=prefill_context - chunk)
  )
