"""ModelConfig: the architecture of a Qwen3-MoE-style decoder, validated before anything compiles.

Field names follow Hugging Face's `Qwen3MoeConfig` where one exists, so `from_hf` / `to_hf` are a rename.
Axis letters used in shape comments across fo_rl/model: B batch, T length, S kv length, N heads, K kv heads,
H head dim, D model, E experts, F hidden (expert or dense MLP), V vocab, L layers, k experts per token.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from fo_rl.common import from_mapping
from fo_rl.model.attention import ATTENTION_IMPLS

DTYPES = ("float32", "bfloat16", "float16")
MOE_IMPLS = ("fast", "reference", "dense")
GMM_BACKENDS = ("auto", "blocked", "ragged_dot", "megablox")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  vocab_size: int = 512
  hidden_size: int = 64  # D
  num_layers: int = 4  # L
  num_heads: int = 4  # N
  num_kv_heads: int = 2  # K
  head_dim: int = 16  # H
  intermediate_size: int = 128  # F of dense MLP layers
  moe_intermediate_size: int = 64  # F of each expert
  num_experts: int = 8  # E; 0 gives a dense model
  num_experts_per_tok: int = 2  # k
  norm_topk_prob: bool = True
  decoder_sparse_step: int = (
      1  # layer i is MoE iff (i + 1) % step == 0 and i not in mlp_only_layers
  )
  mlp_only_layers: tuple[int, ...] = ()
  rope_theta: float = 1_000_000.0
  rms_norm_eps: float = 1e-6
  tie_word_embeddings: bool = False
  dtype: str = "float32"  # activations / matmul inputs; logits are always float32
  param_dtype: str = "float32"
  # "fast" (sorted, dropless, expert-parallel), "reference" (dense one-hot, the test oracle) or "dense"
  # (every expert on every token in three plain matmuls: for few tokens and experts, see moe.py)
  moe_impl: str = "fast"
  # grouped matmul: "blocked" (padded batched matmul), "ragged_dot", "megablox" (JAX's Pallas TPU
  # grouped matmul; interpret mode off TPU), or "auto": blocked on CPU, megablox on TPU, ragged_dot on GPU
  gmm_backend: str = "auto"
  moe_block_size: int = 32  # rows per block of the blocked grouped matmul
  remat: bool = (
      False  # recompute each decoder layer in the backward pass instead of keeping activations
  )
  # Without a KV cache (training, scoring), run the layers as one lax.scan over their weights stacked
  # inside the step: one compiled layer whatever the depth (fast compiles for 48-94 layers), and under
  # remat one layer's recomputation live at a time. Needs identical layers (else the loop is used).
  scan_layers: bool = False
  # Training-forward attention (fo_rl/model/attention.py): "reference" (the whole [T, T] score tensor),
  # "blocked" (flash-style, memory linear in T, every backend), "splash" (TPU), "cudnn" (GPU), or "auto"
  # (splash on TPU, cudnn on GPU, on CPU blocked from attention.AUTO_BLOCKED_FROM positions on).
  attention_impl: str = "auto"
  # The trainer's log-probs and entropies (fo_rl/model/logprobs.py): 0 from the whole float32 logits
  # [B, T, V]; c > 0 from the hidden states c positions at a time, never holding more than [B, c, V].
  logits_chunk: int = 0

  # How fo_rl computes, not what the architecture is: never read from / written to a HF config.json.
  RUNTIME_FIELDS = (
      "dtype",
      "param_dtype",
      "moe_impl",
      "gmm_backend",
      "moe_block_size",
      "remat",
      "scan_layers",
      "attention_impl",
      "logits_chunk",
  )

  def __post_init__(self):
    object.__setattr__(self, "mlp_only_layers", tuple(int(i) for i in self.mlp_only_layers))
    self.validate()

  # ---- derived -------------------------------------------------------------------------------
  def is_moe_layer(self, i: int) -> bool:
    """Qwen3-MoE's rule (modeling_qwen3_moe.Qwen3MoeDecoderLayer)."""
    return (
        self.num_experts > 0
        and i not in self.mlp_only_layers
        and (i + 1) % self.decoder_sparse_step == 0
    )

  @property
  def moe_layers(self) -> tuple[int, ...]:
    return tuple(i for i in range(self.num_layers) if self.is_moe_layer(i))

  @property
  def route_slots(self) -> int:
    """k of the routes tensor [B, T, L, k]; a dense model still has one (-1) slot per layer."""
    return self.num_experts_per_tok if self.num_experts > 0 else 1

  # ---- validation ------------------------------------------------------------------------------
  def validate(self) -> None:
    def bad(field, why):
      raise ValueError(f"model.{field}={getattr(self, field)!r}: {why}")

    for f in (
        "vocab_size",
        "hidden_size",
        "num_layers",
        "num_heads",
        "num_kv_heads",
        "head_dim",
        "moe_block_size",
    ):
      if int(getattr(self, f)) <= 0:
        bad(f, "must be a positive integer")
    if self.num_heads % self.num_kv_heads:
      bad("num_heads", f"must be divisible by model.num_kv_heads={self.num_kv_heads}")
    if self.head_dim % 2:
      bad("head_dim", "must be even (rotary embedding rotates pairs)")
    if self.num_experts < 0:
      bad("num_experts", "must be >= 0 (0 gives a dense model)")
    if self.num_experts > 0:
      if not 1 <= self.num_experts_per_tok <= self.num_experts:
        bad("num_experts_per_tok", f"must be in [1, model.num_experts={self.num_experts}]")
      if self.moe_intermediate_size <= 0:
        bad("moe_intermediate_size", "must be positive for a MoE model")
    if self.decoder_sparse_step < 1:
      bad("decoder_sparse_step", "must be >= 1")
    if any(not 0 <= i < self.num_layers for i in self.mlp_only_layers):
      bad("mlp_only_layers", f"layer indices must be in [0, {self.num_layers})")
    if len(self.moe_layers) < self.num_layers and self.intermediate_size <= 0:
      bad("intermediate_size", "must be positive when some layers are dense")
    if self.dtype not in DTYPES:
      bad("dtype", f"must be one of {DTYPES}")
    if self.param_dtype not in DTYPES:
      bad("param_dtype", f"must be one of {DTYPES}")
    if self.moe_impl not in MOE_IMPLS:
      bad("moe_impl", f"must be one of {MOE_IMPLS}")
    if self.gmm_backend not in GMM_BACKENDS:
      bad("gmm_backend", f"must be one of {GMM_BACKENDS}")
    if int(self.logits_chunk) < 0:
      bad("logits_chunk", "must be >= 0 (0: the whole logits at once)")
    if self.attention_impl not in ATTENTION_IMPLS:
      bad("attention_impl", f"must be one of {ATTENTION_IMPLS}")
    if self.rope_theta <= 0:
      bad("rope_theta", "must be positive")

  # ---- construction ------------------------------------------------------------------------------
  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
    """From a plain dict or an ml_collections ConfigDict section; unknown keys are an error."""
    return from_mapping(cls, d, "model")

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["mlp_only_layers"] = list(self.mlp_only_layers)
    return d

  def replace(self, **kw) -> "ModelConfig":
    return dataclasses.replace(self, **kw)

  # Hugging Face Qwen3MoeConfig <-> ModelConfig.
  _HF_RENAMES = {
      "num_hidden_layers": "num_layers",
      "num_attention_heads": "num_heads",
      "num_key_value_heads": "num_kv_heads",
  }

  @classmethod
  def from_hf(cls, hf: Mapping[str, Any], **overrides) -> "ModelConfig":
    known = {f.name for f in dataclasses.fields(cls)}
    kw = {}
    for key, value in hf.items():
      key = cls._HF_RENAMES.get(key, key)
      if key in known:
        kw[key] = value
    if kw.get("head_dim") is None:
      kw["head_dim"] = hf["hidden_size"] // hf["num_attention_heads"]
    kw.pop("dtype", None)  # compute dtype is fo_rl's choice, not the checkpoint's
    kw.update(overrides)
    return cls(**kw)

  def to_hf(self) -> dict[str, Any]:
    inv = {v: k for k, v in self._HF_RENAMES.items()}
    d = {inv.get(k, k): v for k, v in self.to_dict().items() if k not in self.RUNTIME_FIELDS}
    d.update(
        model_type="qwen3_moe",
        architectures=["Qwen3MoeForCausalLM"],
        hidden_act="silu",
        attention_bias=False,
        attention_dropout=0.0,
        max_position_embeddings=32768,
        output_router_logits=False,
        router_aux_loss_coef=0.0,
        use_sliding_window=False,
        initializer_range=0.02,
        torch_dtype="float32",
    )
    return d
