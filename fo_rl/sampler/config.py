"""The sampler's settings: `SamplerConfig` (how it holds and runs its weights), `SamplingParams` (what one
`Sampler.generate` call samples) and `bucket` (the padded lengths that share compiled code)."""

from __future__ import annotations

import dataclasses

import numpy as np

from fo_rl.model.config import MOE_IMPLS
from fo_rl.model.paged_attention import PAGED_IMPLS
from fo_rl.parallel.sharding import DEFAULT_RULES, inference_rules, validate_rules
from fo_rl.sampler import quantize as Q

ENGINES = ("static", "paged")  # sampler.engine


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
  """How the sampler holds and runs its copy of the weights.

  weight_dtype: float32 | bfloat16 | float8_e4m3fn | float8_e5m2 | int8 | int4. FP8 / int8 / int4 use
    per-output-channel scales (absmax / dtype max, see fo_rl/sampler/quantize.py).
  activation_dtype: none | float8_e4m3fn | float8_e5m2 | int8. "none": weight-only quantization. Otherwise (it must
    equal weight_dtype) the input of every matmul with a quantized weight is quantized per token with
    a dynamic scale and the matmul runs fp8 x fp8 (float32 accumulation) or int8 x int8 (int32), as a
    W8A8 inference engine does (fo_rl/model/qdot.py); the trainer keeps its own precision.
  keep_high_precision: parts left in high precision when weight_dtype is FP8 / int8; parts are
    "embed", "norm", "router", "lm_head", "attn", "mlp", "experts". Default: embeddings, norms, router,
    lm_head (as vLLM / SGLang FP8 Qwen3-MoE checkpoints); attention, dense-MLP and expert weights are
    quantized.
  dtype: activation / matmul-input dtype (None: the model config's dtype). cache_dtype: KV cache dtype
    (None: `dtype`).
  prompt_bucket / gen_bucket: prompt and generation lengths are padded to the next power of two that is
    at least this, so different lengths share compiled code.
  pad_id: token id written at padding positions (prompt left padding, response right padding).
  moe_impl: the sampler's MoE dispatch. "auto" (default): "dense" (fo_rl.model.moe.dispatch_dense: every
    expert on every token in three plain matmuls, no sort / gather / scatter) when num_experts <=
    4 * num_experts_per_tok, i.e. at most 4x the expert FLOPs of a dropless dispatch, and the sampler's
    mesh does not shard the experts (dense would all-gather them every step), where it is the faster
    one (measured on CPU: 0.95x the generate time with the benchmark's E=8 k=2 model), else the
    model's; None: the model's; or any model moe_impl. The routes are the same whatever the
    dispatch (routing comes first); the outputs differ by float rounding only.
  gmm_backend: override the model config's grouped-matmul backend for sampling (None: keep).
  decode_segments: the decode loop runs in this many segments of equal length, each attending over the
    cache slots it can reach (windowed decode, see `decode_loop` in fo_rl/sampler/sampler.py): less
    attention work, at the price of a second copy of the reached part of the KV cache while decoding and
    one compiled step per segment. 1: one loop over the whole bucket. None (default): segments of
    `decode_window` steps (at most `max_decode_segments`) while the KV cache is at most
    `window_cache_mib` MiB per device (small models, where attention is a large part of a step and the
    copy is cheap), else 1.
  rules: the sampler's logical-axis rules (its mesh is given to Sampler).
  engine: "static" (default: the lockstep decoder of fo_rl/sampler/sampler.py, one full-length KV cache
    per row) | "paged" (fo_rl/sampler/engine.py: a paged KV cache, continuous batching over
    `num_slots` decode slots, each prompt prefilled once for all its samples; same samples).
  num_slots: the paged engine's decode slots (sequences decoded at once) per shard. The engine runs
    one shard per device of the mesh axes of the `batch` rule (fo_rl/sampler/engine.py, "Shards"):
    num_slots, num_pages and prefill_rows are each shard's, i.e. each such device's.
  page_size: positions per KV page. num_pages: pages in each shard's pool (page 0 is a trash page);
    None: enough for every slot to hold the longest sequence of the call. A pool smaller than one sequence of the
    longest prompt plus max_new_tokens is an error naming sampler.num_pages; between that and the
    automatic size, sequences are preempted and resumed when the pages run out.
  prefill_chunk / prefill_rows: each engine step prefills up to `prefill_rows` prompts, `prefill_chunk`
    tokens each, interleaved with the decode slots' tokens.
  paged_attention: "auto" (the TPU ragged paged attention kernel on TPU, else "xla") | "xla" | "pallas".
  """

  weight_dtype: str = "float32"
  activation_dtype: str = "none"
  keep_high_precision: tuple[str, ...] = Q.DEFAULT_KEEP
  dtype: str | None = None
  cache_dtype: str | None = None
  prompt_bucket: int = 16
  gen_bucket: int = 16
  pad_id: int = 0
  moe_impl: str | None = "auto"
  gmm_backend: str | None = None
  decode_segments: int | None = None
  decode_window: int = 16
  max_decode_segments: int = 8
  window_cache_mib: float = 256.0
  rules: tuple = inference_rules(DEFAULT_RULES)  # non-expert weights off the expert axis
  engine: str = "static"
  num_slots: int = 64
  page_size: int = 16
  num_pages: int | None = None
  prefill_chunk: int = 64
  prefill_rows: int = 4
  paged_attention: str = "auto"

  def __post_init__(self):
    object.__setattr__(self, "keep_high_precision", tuple(self.keep_high_precision))
    object.__setattr__(
        self,
        "rules",
        tuple((n, a if a is None or isinstance(a, str) else tuple(a)) for n, a in self.rules),
    )
    Q.validate(self.weight_dtype, self.keep_high_precision, self.activation_dtype)
    validate_rules(self.rules, "sampler.rules")
    if self.moe_impl is not None and self.moe_impl not in ("auto",) + MOE_IMPLS:
      raise ValueError(
          f"sampler.moe_impl={self.moe_impl!r}: must be None, 'auto' or one of {MOE_IMPLS}"
      )
    for f in (
        "prompt_bucket",
        "gen_bucket",
        "decode_segments",
        "decode_window",
        "max_decode_segments",
        "num_slots",
        "page_size",
        "prefill_chunk",
        "prefill_rows",
    ):
      if getattr(self, f) is not None and getattr(self, f) < 1:
        raise ValueError(f"sampler.{f}={getattr(self, f)}: must be >= 1")
    if self.engine not in ENGINES:
      raise ValueError(f"sampler.engine={self.engine!r}: must be one of {ENGINES}")
    if self.num_pages is not None and self.num_pages < 2:
      raise ValueError(f"sampler.num_pages={self.num_pages}: must be >= 2 (page 0 is a trash page)")
    if self.paged_attention not in PAGED_IMPLS:
      raise ValueError(
          f"sampler.paged_attention={self.paged_attention!r}: must be one of {PAGED_IMPLS}"
      )


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """temperature 0 is greedy. top_k 0 and top_p 1.0 disable truncation (the RL default: the trainer's
  pi must use the same truncation, algorithms.md section 7). Generation stops at any of `eos_ids` (the
  EOS token is part of the response) or after max_new_tokens."""

  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  max_new_tokens: int = 64
  eos_ids: tuple[int, ...] = ()

  def __post_init__(self):
    eos = self.eos_ids
    eos = () if eos is None else (eos,) if isinstance(eos, (int, np.integer)) else eos
    object.__setattr__(self, "eos_ids", tuple(int(e) for e in eos))
    if self.temperature < 0:
      raise ValueError(f"temperature={self.temperature}: must be >= 0 (0 is greedy)")
    if self.top_k < 0:
      raise ValueError(f"top_k={self.top_k}: must be >= 0 (0 disables top-k)")
    if not 0.0 < self.top_p <= 1.0:
      raise ValueError(f"top_p={self.top_p}: must be in (0, 1] (1 disables top-p)")
    if self.max_new_tokens < 1:
      raise ValueError(f"max_new_tokens={self.max_new_tokens}: must be >= 1")

  @property
  def compile_key(self) -> "SamplingParams":
    """The fields the compiled code depends on (max_new_tokens is a traced value)."""
    return dataclasses.replace(self, max_new_tokens=1)


def bucket(n: int, minimum: int) -> int:
  """The smallest power of two >= max(n, 1) that is also >= minimum (minimum itself if n is small)."""
  b = 1 << max(int(n) - 1, 0).bit_length()
  return max(b, int(minimum))
