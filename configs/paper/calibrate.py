"""The regime calibration: short on-policy MiniRL runs from the seed-0 cold start, one per candidate
sampler setting, that measure the regime table (per-token train-infer KL, F(2), router disagreement,
response length, pre-clip grad norm) before any suite runs. Only real sampler knobs: the weight dtype
(sampler.weight_dtype int8 / int4 / float8_e4m3fn / float8_e5m2), which parts stay in high precision
(sampler.keep_high_precision: the default keeps embed, norm, router and lm_head) and, when the sampler
has it, sampler.activation_dtype (W8A8).

One setting:

  python -m fo_rl.main --config=configs/paper/calibrate.py:e4m3_router --workdir=workdirs/paper/e4m3_router/seed0 --config.seed=0 --config.sft.cache_dir=workdirs/paper/sft_cache

All settings, then the table (DIR/calibration.md):

  python -m fo_rl.paper --suite=calibrate --seeds=1 --workdir=workdirs/paper

Arg grammar (after the first ':' of --config): "<setting>" | "<setting>:tiny" | "tiny" | "".
Settings (the weight dtype, then what is quantized beyond attention / MLP / experts):
  e4m3          float8_e4m3fn weights; embed, norm, router, lm_head kept (the first miniature's)
  e4m3_router   float8_e4m3fn; router and lm_head quantized too (embed, norm kept)
  int8_router   int8; router and lm_head quantized too
  e4m3_all      float8_e4m3fn; everything quantized but the norms
  e4m3_a8       e4m3 plus FP8 activations (W8A8, sampler.activation_dtype) at every quantized matmul
  e4m3_all_a8   e4m3_all plus FP8 activations (router and lm_head matmuls in FP8 too)
  e5m2_all      float8_e5m2 weights (2 mantissa bits); everything quantized but the norms
  e5m2_all_a8   e5m2_all plus e5m2 activations
  int4_all      int4 weights (W4A16, per channel); everything quantized but the norms
  int4          int4 weights; embed, norm, router, lm_head kept
Each run: the regime's model, task and cold start, on-policy MiniRL (design(1)), CAL_UPDATES updates,
evaluations at step 0 and at the end (the quantized sampler must still be the same policy).
"""

from fo_rl.paper.suites import design, suite_config

CAL_UPDATES = 8

COMMON = {
    **design(1),
    "rl.steps": CAL_UPDATES,
    "eval.every": CAL_UPDATES,
    "rl.replay": "none",
    "sampler.activation_dtype": "none",  # weight-only unless the setting says otherwise
}

VARIANTS = {
    "e4m3": {
        "sampler.weight_dtype": "float8_e4m3fn",
        "sampler.keep_high_precision": ["embed", "norm", "router", "lm_head"],
    },
    "e4m3_router": {
        "sampler.weight_dtype": "float8_e4m3fn",
        "sampler.keep_high_precision": ["embed", "norm"],
    },
    "int8_router": {
        "sampler.weight_dtype": "int8",
        "sampler.keep_high_precision": ["embed", "norm"],
    },
    "e4m3_all": {"sampler.weight_dtype": "float8_e4m3fn", "sampler.keep_high_precision": ["norm"]},
    "e4m3_a8": {
        "sampler.weight_dtype": "float8_e4m3fn",
        "sampler.keep_high_precision": ["embed", "norm", "router", "lm_head"],
        "sampler.activation_dtype": "float8_e4m3fn",
    },
    "e4m3_all_a8": {
        "sampler.weight_dtype": "float8_e4m3fn",
        "sampler.keep_high_precision": ["norm"],
        "sampler.activation_dtype": "float8_e4m3fn",
    },
    "e5m2_all": {"sampler.weight_dtype": "float8_e5m2", "sampler.keep_high_precision": ["norm"]},
    "e5m2_all_a8": {
        "sampler.weight_dtype": "float8_e5m2",
        "sampler.keep_high_precision": ["norm"],
        "sampler.activation_dtype": "float8_e5m2",
    },
    "int4_all": {"sampler.weight_dtype": "int4", "sampler.keep_high_precision": ["norm"]},
    "int4": {
        "sampler.weight_dtype": "int4",
        "sampler.keep_high_precision": ["embed", "norm", "router", "lm_head"],
    },
}

GROUP_BY = None


def get_config(arg: str = ""):
  return suite_config("calibrate", COMMON, VARIANTS, arg)
