"""The run configuration: one ml_collections ConfigDict nested by role, and its validated, typed view.

`base_config()` defines every default once; files in configs/ override what their recipe changes.
`parse(config)` turns the ConfigDict into frozen dataclasses and raises a ValueError naming the field
(`rl.mini_batches`, `model.num_experts_per_tok`, ...) before anything is compiled or written.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import ml_collections

from fo_rl.model.config import ModelConfig
from fo_rl.parallel.sharding import DEFAULT_RULES, mesh_shape, validate_rules
from fo_rl.rl.advantages import ADVANTAGE_MODES
from fo_rl.rl.losses import LOSSES, LossConfig
from fo_rl.rl.trainer import OptimConfig, TrainerConfig
from fo_rl.sampler import quantize as Q
from fo_rl.sampler.sampler import SamplerConfig, SamplingParams

TASKS = ("arithmetic", "countdown", "sorting", "jsonl")
JSONL_OPTIONS = ("train_file", "test_file")


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.name = "run"  # default workdir name: workdirs/<name>
  c.seed = 0
  c.dry_run = (
      False  # compile the trainer update and sampler decode for parallel.topology, then exit
  )

  c.model = ModelConfig(
      vocab_size=320,
      hidden_size=64,
      num_layers=4,
      num_heads=4,
      num_kv_heads=2,
      head_dim=16,
      intermediate_size=128,
      moe_intermediate_size=64,
      num_experts=8,
      num_experts_per_tok=2,
      mlp_only_layers=(),
      rope_theta=10_000.0,
      tie_word_embeddings=False,
  ).to_dict()
  # A Hugging Face Qwen3-MoE checkpoint directory to start from ('' = random init + cold start). With
  # one, model.* comes from its config.json and its tokenizer is used.
  c.init = ml_collections.ConfigDict({"hf_checkpoint": ""})

  c.parallel = ml_collections.ConfigDict()
  c.parallel.mesh = {"data": 1, "fsdp": -1, "expert": 1, "tensor": 1}  # -1: the remaining devices
  c.parallel.rules = [list(r) for r in DEFAULT_RULES]
  c.parallel.sampler_mesh = {"data": -1, "fsdp": 1, "expert": 1, "tensor": 1}
  c.parallel.topology = ""  # TPU topology for --config.dry_run, e.g. "v5p:4x4x4"
  c.parallel.hbm_gib = 0.0  # per-device HBM for the dry run's fit check (0: the topology's default)

  c.data = ml_collections.ConfigDict()
  c.data.task = "arithmetic"
  c.data.options = ml_collections.ConfigDict({"num_digits": 3, "ops": "+-"})  # passed to get_task
  c.data.train_file = ""  # data.task=jsonl: JSON Lines, one {"prompt": ..., "answer": ...} per line
  c.data.test_file = ""
  c.data.data_dir = ""  # tfds data dir ('' = $FO_RL_DATA_DIR or ~/.cache/fo_rl/tfds)
  c.data.tokenizer = (
      ""  # SentencePiece model ('' = the committed fo_rl/data/assets/tokenizer.model)
  )

  c.sft = ml_collections.ConfigDict()
  c.sft.enabled = True
  c.sft.steps = 800
  c.sft.batch_size = 32
  c.sft.learning_rate = 3e-3
  c.sft.warmup_steps = 100
  c.sft.teacher = "careful"  # see fo_rl/data/teachers.py
  c.sft.error_rate = -1.0  # -1: the teacher variant's own rate
  c.sft.max_len = 48  # tokens of prompt + response
  c.sft.cache_dir = (
      ""  # '' = <workdir>/sft; a shared dir reuses a cold start across runs (keyed by hash)
  )

  c.sampler = ml_collections.ConfigDict()
  c.sampler.weight_dtype = "float8_e4m3fn"
  c.sampler.keep_high_precision = list(Q.DEFAULT_KEEP)
  c.sampler.max_new_tokens = 40
  c.sampler.top_k = 0  # RL default: no truncation (algorithms.md section 7)
  c.sampler.top_p = 1.0
  c.sampler.prompt_bucket = 16
  c.sampler.gen_bucket = 16
  c.sampler.moe_impl = (
      "auto"  # auto (dense dispatch when num_experts <= 4 k) | fast | reference | dense
  )
  c.sampler.decode_segments = 0  # windowed decode segments; 0 = automatic (small KV caches only)

  c.rl = ml_collections.ConfigDict()
  c.rl.steps = 200
  c.rl.prompts_per_step = 16
  c.rl.group_size = 8  # G samples per prompt
  c.rl.mini_batches = 4  # N optimizer updates per rollout batch
  c.rl.replay = "r3"  # none | r2 | r3
  c.rl.temperature = 1.0
  c.rl.advantage = "mean"  # mean | std | rloo
  c.rl.loss = ml_collections.ConfigDict(dataclasses.asdict(LossConfig()))

  c.optim = ml_collections.ConfigDict(
      dataclasses.asdict(OptimConfig(learning_rate=7e-5, warmup_steps=10))
  )

  c.eval = ml_collections.ConfigDict()
  c.eval.every = 10  # RL steps
  c.eval.num_prompts = 128
  c.eval.samples = 4  # G for the held-out mean accuracy

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every = 10
  c.checkpoint.max_to_keep = 2
  return c


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """The validated view of a ConfigDict."""

  raw: Any
  seed: int
  model: ModelConfig
  trainer: TrainerConfig
  sampler: SamplerConfig
  sampling: SamplingParams  # eos ids are filled in once the tokenizer is known
  mesh: dict
  sampler_mesh: dict
  rules: tuple
  prompts_per_step: int
  group_size: int
  steps: int
  advantage: str


def _bad(field: str, value, why: str):
  raise ValueError(f"{field}={value!r}: {why}")


def tiny(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Shrink a recipe to seconds on a laptop CPU, keeping its RL knobs (replay, N, loss, sampler dtype)."""
  c.model.hidden_size = 32
  c.model.num_layers = 2
  c.model.num_heads = 2
  c.model.num_kv_heads = 1
  c.model.head_dim = 16
  c.model.intermediate_size = 64
  c.model.moe_intermediate_size = 32
  c.model.num_experts = 4 if c.model.num_experts else 0
  c.sft.steps = 10
  c.sft.batch_size = 8
  c.sft.warmup_steps = 2
  c.sampler.max_new_tokens = 12
  c.rl.steps = 2
  c.rl.prompts_per_step = 4
  c.rl.group_size = 4
  c.eval.every = 1
  c.eval.num_prompts = 4
  c.eval.samples = 2
  c.checkpoint.every = 1
  c.name = c.name + "_tiny"
  return c


THIRD_PARTY = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "third_party"
)


def hf_model(name: str, **overrides) -> dict:
  """model.* of a published Hugging Face config.json kept in third_party/ (e.g.
  "qwen3_moe/qwen3_30b_a3b.config.json"), with ModelConfig overrides (dtype, param_dtype, ...)."""
  import json

  from fo_rl.model.hf import config_from_hf

  path = os.path.join(THIRD_PARTY, name)
  with open(path) as f:
    return config_from_hf(json.load(f), where=path, **overrides).to_dict()


def tiny_moe(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`tiny` for a large-MoE recipe: the same shape family (every layer MoE, top-k of many experts with
  renormalized gates, grouped-query attention, q/k norm, untied head, bf16 params and compute, expert
  parallelism) at CPU size, on the committed tokenizer and a random init + cold start."""
  tiny(c)
  c.model.vocab_size = 320
  c.model.num_heads = 4
  c.model.num_kv_heads = 1
  c.model.head_dim = 8
  c.model.num_experts = 8
  c.model.num_experts_per_tok = 4
  c.model.moe_intermediate_size = 16
  c.model.rope_theta = 10_000.0
  c.init.hf_checkpoint = ""
  c.data.task = "arithmetic"
  c.data.options = ml_collections.ConfigDict({"num_digits": 3, "ops": "+-"})
  c.sft.enabled = True
  c.sampler.prompt_bucket = 16
  c.sampler.gen_bucket = 16
  c.sampler.max_new_tokens = 12
  c.rl.prompts_per_step = 4
  c.rl.group_size = 4
  c.rl.mini_batches = min(int(c.rl.mini_batches), 4)
  c.optim.learning_rate = 3e-5  # the base recipe's: a random-init tiny model, not a pretrained one
  c.optim.warmup_steps = 10
  c.parallel.mesh = {"data": 1, "fsdp": -1, "expert": 2, "tensor": 1}
  c.parallel.sampler_mesh = {"data": -1, "fsdp": 1, "expert": 2, "tensor": 1}
  c.parallel.topology = (
      "v5p:2x2x1"  # for --config.dry_run=True: 4 chips, compiles in a minute on CPU
  )
  c.parallel.hbm_gib = 0.0
  return c


def task_options(c: ml_collections.ConfigDict) -> dict:
  """get_task's options: data.train_file/test_file for data.task=jsonl, else data.options."""
  if c.data.task == "jsonl":
    return {f: c.data.get(f, "") for f in JSONL_OPTIONS}
  return c.data.options.to_dict()


def parse(c: ml_collections.ConfigDict, num_devices: int | None = None) -> RunConfig:
  """Validate everything that can be checked without data or compilation."""
  model = ModelConfig.from_dict(c.model)
  rules = tuple(
      (str(n), a if a is None or isinstance(a, str) else tuple(a)) for n, a in c.parallel.rules
  )
  validate_rules(rules, "parallel.rules")
  if num_devices is not None:
    mesh_shape(c.parallel.mesh, num_devices, "parallel.mesh")
    mesh_shape(c.parallel.sampler_mesh, num_devices, "parallel.sampler_mesh")
  if c.rl.loss.name not in LOSSES:
    _bad("rl.loss.name", c.rl.loss.name, f"unknown loss; known: {sorted(LOSSES)}")
  try:
    loss = LossConfig.from_config(c.rl.loss)
  except ValueError as e:
    raise ValueError(f"rl.loss: {e}") from None
  optim = OptimConfig.from_config(c.optim)
  if c.rl.replay not in ("none", "r2", "r3"):
    _bad("rl.replay", c.rl.replay, "must be one of none, r2, r3")
  if c.rl.replay != "none" and model.num_experts == 0:
    _bad("rl.replay", c.rl.replay, "routing replay needs a MoE model, but model.num_experts=0")
  trainer = TrainerConfig(
      mini_batches=int(c.rl.mini_batches),
      replay=c.rl.replay,
      temperature=float(c.rl.temperature),
      loss=loss,
      optim=optim,
  )
  for f in ("steps", "prompts_per_step", "group_size"):
    if int(c.rl[f]) < 1:
      _bad(f"rl.{f}", c.rl[f], "must be >= 1")
  if c.rl.group_size < 2:
    _bad("rl.group_size", c.rl.group_size, "group-relative advantages need >= 2 samples per prompt")
  global_batch = c.rl.prompts_per_step * c.rl.group_size
  if global_batch % c.rl.mini_batches:
    _bad(
        "rl.mini_batches",
        c.rl.mini_batches,
        f"must divide the global batch rl.prompts_per_step * rl.group_size = {global_batch}",
    )
  if c.rl.advantage not in ADVANTAGE_MODES:
    _bad("rl.advantage", c.rl.advantage, f"must be one of {ADVANTAGE_MODES}")
  if c.data.task not in TASKS:
    _bad("data.task", c.data.task, f"must be one of {TASKS}")
  for f in JSONL_OPTIONS:
    path = c.data.get(f, "")
    if c.data.task == "jsonl" and not path:
      _bad(f"data.{f}", path, "data.task=jsonl needs a JSON Lines file per split")
    if c.data.task == "jsonl" and not os.path.isfile(path):
      _bad(f"data.{f}", path, "no such file")
    if c.data.task != "jsonl" and path:
      _bad(f"data.{f}", path, f"only used with data.task=jsonl, not {c.data.task!r}")
  sampler = SamplerConfig(
      weight_dtype=c.sampler.weight_dtype,
      keep_high_precision=tuple(c.sampler.keep_high_precision),
      prompt_bucket=int(c.sampler.prompt_bucket),
      gen_bucket=int(c.sampler.gen_bucket),
      moe_impl=c.sampler.moe_impl,
      decode_segments=int(c.sampler.decode_segments) or None,
      rules=rules,
  )
  sampling = SamplingParams(
      temperature=float(c.rl.temperature),
      top_k=int(c.sampler.top_k),
      top_p=float(c.sampler.top_p),
      max_new_tokens=int(c.sampler.max_new_tokens),
  )
  if sampling.top_k or sampling.top_p < 1.0:
    # The trainer scores pi at temperature only; truncation in the sampler would bias the IS ratio by
    # the log of the kept mass (algorithms.md section 7).
    _bad(
        "sampler.top_k/top_p",
        (sampling.top_k, sampling.top_p),
        "RL needs an untruncated sampler (top_k=0, top_p=1.0) so that mu and pi share one distribution",
    )
  for f in ("every", "num_prompts", "samples"):
    if int(c.eval[f]) < 1:
      _bad(f"eval.{f}", c.eval[f], "must be >= 1")
  if int(c.checkpoint.every) < 1:
    _bad("checkpoint.every", c.checkpoint.every, "must be >= 1")
  if c.sft.enabled and int(c.sft.steps) < 1:
    _bad("sft.steps", c.sft.steps, "must be >= 1 when sft.enabled")
  return RunConfig(
      raw=c,
      seed=int(c.seed),
      model=model,
      trainer=trainer,
      sampler=sampler,
      sampling=sampling,
      mesh=dict(c.parallel.mesh),
      sampler_mesh=dict(c.parallel.sampler_mesh),
      rules=rules,
      prompts_per_step=int(c.rl.prompts_per_step),
      group_size=int(c.rl.group_size),
      steps=int(c.rl.steps),
      advantage=c.rl.advantage,
  )
