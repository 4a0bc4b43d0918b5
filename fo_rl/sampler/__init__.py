"""The rollout engine: quantized weights (FP8 / int8 / bf16), KV-cache prefill + decode, routed-expert capture,
and the trainer -> sampler weight sync."""

from fo_rl.sampler.quantize import (
    DEFAULT_KEEP,
    PARTS,
    WEIGHT_DTYPES,
    contracted_axes,
    part_of,
    quantize_array,
    quantize_state,
)
from fo_rl.sampler.config import SamplerConfig, SamplingParams, bucket
from fo_rl.sampler.sampler import DecodeState, SampleOutput, Sampler
from fo_rl.sampler.sampling import sample_logits, truncate_logits

__all__ = [
    "DEFAULT_KEEP",
    "DecodeState",
    "PARTS",
    "SampleOutput",
    "Sampler",
    "SamplerConfig",
    "SamplingParams",
    "WEIGHT_DTYPES",
    "bucket",
    "contracted_axes",
    "part_of",
    "quantize_array",
    "quantize_state",
    "sample_logits",
    "truncate_logits",
]
