"""The run configuration: one ml_collections ConfigDict nested by role, and its validated, typed view.

`base_config()` defines every default once; files in configs/ override what their recipe changes.
`parse(config)` turns the ConfigDict into a `RunConfig`: one frozen view per role (`model`, `init`,
`parallel`, `data`, `sft`, `sampler` + `sampling`, `rl` (with `rl.loss`), `optim`, `eval`, `checkpoint`),
each built, and its fields validated, once; a bad value is a ValueError naming the field
(`rl.mini_batches`, `model.num_experts_per_tok`, ...) before anything is compiled or written, and so is a
key that is no field of its section. The jobs (run.py, sft.py, dry_run.py) read only the view;
`RunConfig.as_dict` is the config as plain JSON data (config.json, the resume check, the SFT cache key).
"""

from __future__ import annotations

import dataclasses
import json
import os

import ml_collections

from fo_rl.common import UserError, from_mapping, unknown_keys
from fo_rl.data import teachers as teachers_lib
from fo_rl.data.tasks import ProceduralTask
from fo_rl.model.attention import check_impl as check_attention_impl
from fo_rl.model.config import ModelConfig
from fo_rl.parallel.sharding import (
    DEFAULT_RULES,
    MESH_AXES,
    check_batch_split,
    inference_rules,
    mesh_shape,
    validate_rules,
)
from fo_rl.rl.advantages import resolve_advantage
from fo_rl.rl.losses import LOSSES, LossConfig
from fo_rl.rl.optim import OptimConfig
from fo_rl.rl.trainer import TrainerConfig, check_micro_batches, check_rl_fields
from fo_rl.sampler import quantize as Q
from fo_rl.sampler.config import SamplerConfig, SamplingParams

TASKS = ("arithmetic", "countdown", "sorting", "jsonl", "reasoning_gym")
VERIFIERS = ("auto", "numeric", "math", "exact")
# data.* fields added with issue 17, at their defaults (what every run did before they existed): the SFT
# cache key leaves them out there, so earlier cold starts stay valid.
DATA_DEFAULTS_ADDED = {
    "prompt_field": "prompt",
    "answer_field": "answer",
    "verifier": "auto",
    "verifier_timeout": 5.0,
    "chat_template": "auto",
    "system_prompt": "",
    "chat_template_kwargs": "",
}
JSONL_OPTIONS = ("train_file", "test_file")
RL_OPTIM_FIELDS = ("learning_rate", "warmup_steps", "b1", "b2", "eps", "weight_decay", "grad_clip")
SAMPLING_FIELDS = (
    "max_new_tokens",
    "top_k",
    "top_p",
    "max_prompt_len",
)  # of sampler.*: SamplingParams (and RunConfig.max_prompt_len), not SamplerConfig
SECTIONS = (
    "name",
    "seed",
    "dry_run",
    "model",
    "init",
    "parallel",
    "data",
    "sft",
    "sampler",
    "rl",
    "optim",
    "trainer",
    "eval",
    "checkpoint",
)


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
  c.data.test_file = ""  # (or Parquet: a .parquet file with those columns)
  c.data.prompt_field = "prompt"  # the fields of data files (data.task=jsonl and eval.files)
  c.data.answer_field = "answer"
  # Answer checking of data files: numeric | math (math-verify) | exact | auto (numeric when every
  # answer of the file is a plain number, else math); math gives each answer at most verifier_timeout s.
  c.data.verifier = "auto"
  c.data.verifier_timeout = 5.0
  # Chat template: auto (the HF checkpoint's, if it has one) | none | a .jinja file; its system prompt
  # ('' = none) and extra template variables as a JSON object, e.g. '{"enable_thinking": false}'.
  c.data.chat_template = "auto"
  c.data.system_prompt = ""
  c.data.chat_template_kwargs = ""
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
  # An example longer than sft.max_len: "left" drops prompt tokens from the left (the response and its
  # EOS are kept whole while they fit), "right" keeps the first sft.max_len tokens (the response's end,
  # or all of it, is lost).
  c.sft.truncate = "left"
  # Pre-flight: the fraction of response tokens kept after truncation, measured on the training data,
  # must be at least this (else an error naming sft.max_len and the first example cut).
  c.sft.min_kept_fraction = 0.9
  c.sft.cache_dir = (
      ""  # '' = <workdir>/sft; a shared dir reuses a cold start across runs (keyed by hash)
  )

  c.sampler = ml_collections.ConfigDict()
  c.sampler.weight_dtype = "float8_e4m3fn"
  c.sampler.keep_high_precision = list(Q.DEFAULT_KEEP)
  # none (weight-only) | float8_e4m3fn | float8_e5m2 | int8 (= weight_dtype): per-token activation
  # quantization, W8A8
  c.sampler.activation_dtype = "none"
  c.sampler.max_new_tokens = 40
  c.sampler.max_prompt_len = 256  # tokens (BOS included); a longer prompt in the data is an error
  c.sampler.top_k = 0  # RL default: no truncation (algorithms.md section 7)
  c.sampler.top_p = 1.0
  c.sampler.prompt_bucket = 16
  c.sampler.gen_bucket = 16
  c.sampler.moe_impl = (
      "auto"  # auto (dense dispatch when num_experts <= 4 k) | fast | reference | dense
  )
  c.sampler.decode_segments = 0  # windowed decode segments; 0 = automatic (small KV caches only)
  # static (lockstep decoder) | paged (paged KV cache + continuous batching, fo_rl/sampler/engine.py;
  # the same samples). The paged engine's slots, pages (0 = automatic pool size) and prefill chunks:
  c.sampler.engine = "static"
  c.sampler.num_slots = 64
  c.sampler.page_size = 16
  c.sampler.num_pages = 0
  c.sampler.prefill_chunk = 64
  c.sampler.prefill_rows = 4
  c.sampler.paged_attention = (
      "auto"  # auto (the TPU ragged paged attention kernel on TPU) | xla | pallas
  )

  c.rl = ml_collections.ConfigDict()
  c.rl.steps = 200
  c.rl.prompts_per_step = 16
  c.rl.group_size = 8  # G samples per prompt
  c.rl.mini_batches = 4  # N optimizer updates per rollout batch
  c.rl.replay = "r3"  # none | r2 | r3
  c.rl.temperature = 1.0
  # auto (the loss's own: mean for minirl, std for grpo/cispo/gspo/dapo) | mean | std | rloo; a mode
  # the loss is not defined with is an error unless rl.allow_advantage_mismatch=True.
  c.rl.advantage = "auto"
  c.rl.allow_advantage_mismatch = False
  c.rl.loss = ml_collections.ConfigDict(dataclasses.asdict(LossConfig()))
  # Stop with an error after this many consecutive RL steps whose every update was skipped for a
  # non-finite loss or gradient (0: never stop).
  c.rl.max_skipped_steps = 3

  # The RL optimizer: linear warmup, then constant (OptimConfig's schedule fields are the cold start's,
  # set from sft.*).
  optim = OptimConfig(learning_rate=7e-5, warmup_steps=10)
  c.optim = ml_collections.ConfigDict({f: getattr(optim, f) for f in RL_OPTIM_FIELDS})

  # How the trainer runs a mini-batch (never what it computes): micro_batches M splits each mini-batch's
  # forward/backward into M micro-batches with gradient accumulation (one optimizer step per mini-batch;
  # the old-logprob pass runs at the same micro-batch size), trading time for activation memory; 0 (auto):
  # 1 on TPU/GPU, on CPU micro-batches of about 1,024 tokens per device (faster there: their activations
  # stay in the caches; fo_rl.rl.trainer.auto_micro_batches).
  # pack (on by default): the forward passes run on packed rows (several responses end to end with
  # segment ids) and skip the micro-batches left without tokens, which cuts the padding they compute
  # when a pass runs more than one micro-batch; losses, normalizers and metrics are those of the
  # unpacked rows. False runs every row as it is.
  c.trainer = ml_collections.ConfigDict({"micro_batches": 0, "pack": True})

  c.eval = ml_collections.ConfigDict()
  c.eval.every = 10  # RL steps
  c.eval.num_prompts = 128
  c.eval.samples = 4  # G for the held-out mean accuracy; k of avg@k / pass@k on eval.files
  # Held-out sets from files (JSON Lines or Parquet, data.prompt_field / answer_field / verifier):
  # NAME=PATH[,NAME=PATH...] ('' = none); every problem of each set is sampled eval.samples times.
  c.eval.files = ""

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every = 10
  c.checkpoint.max_to_keep = 2
  return c


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
  c.rl.group_size = 4
  # At least 2N prompts: every mini-batch has >= 8 rows, which the tests' 8 CPU devices split evenly (a
  # batch the trainer's mesh cannot split is an error, not a silent replication).
  c.rl.prompts_per_step = max(4, 2 * c.rl.mini_batches)
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
  c.rl.group_size = 4
  c.rl.mini_batches = min(int(c.rl.mini_batches), 4)
  c.rl.prompts_per_step = max(4, 2 * c.rl.mini_batches)  # mini-batches of >= 8 rows, as in `tiny`
  c.optim.learning_rate = 3e-5  # the base recipe's: a random-init tiny model, not a pretrained one
  c.optim.warmup_steps = 10
  c.parallel.mesh = {"data": 1, "fsdp": -1, "expert": 2, "tensor": 1}
  c.parallel.sampler_mesh = {"data": -1, "fsdp": 1, "expert": 2, "tensor": 1}
  c.parallel.topology = (
      "v5p:2x2x1"  # for --config.dry_run=True: 4 chips, compiles in a minute on CPU
  )
  c.parallel.hbm_gib = 0.0
  return c


# --------------------------------------------------------------------------------------------------------
# The typed view: one frozen dataclass per section, each validating its own fields when built.
# --------------------------------------------------------------------------------------------------------


def _bad(field: str, value, why: str):
  raise UserError(f"{field}={value!r}: {why}")


def variant(arg: str, known, config_file: str) -> str:
  """`arg` (the part after ':' in `--config=FILE:ARG`) if it is one of `known` ('' = the default),
  else a UserError naming the config file and the known variants. Every file in configs/ calls it.
  """
  known = tuple(known)
  if arg not in known:
    name = os.path.relpath(config_file) if os.path.isabs(config_file) else config_file
    listed = ", ".join(repr(k) for k in known if k)
    raise UserError(
        f"--config={name}:{arg}: unknown variant {arg!r}; known: {listed} (or none: {name})"
    )
  return arg


def _at_least(section: str, view, fields, minimum: int = 1) -> None:
  """Integer fields of a view that must be >= minimum (stored as int)."""
  for f in fields:
    if int(getattr(view, f)) < minimum:
      _bad(f"{section}.{f}", getattr(view, f), f"must be >= {minimum}")
    object.__setattr__(view, f, int(getattr(view, f)))


def _set(view, **values) -> None:
  """Normalize fields of a frozen view in its __post_init__."""
  for k, v in values.items():
    object.__setattr__(view, k, v)


@dataclasses.dataclass(frozen=True)
class InitConfig:
  """init.*: where the parameters come from."""

  hf_checkpoint: str = ""  # a Hugging Face checkpoint directory, user-expanded; '' = random init

  def __post_init__(self):
    _set(self, hf_checkpoint=os.path.expanduser(str(self.hf_checkpoint or "")))


@dataclasses.dataclass(frozen=True)
class ParallelConfig:
  """parallel.*: the trainer's and the sampler's meshes, the logical-axis rules, the dry run's target."""

  mesh: dict
  sampler_mesh: dict
  rules: tuple
  topology: str = ""
  hbm_gib: float = 0.0

  def __post_init__(self):
    _set(
        self,
        mesh=dict(self.mesh),
        sampler_mesh=dict(self.sampler_mesh),
        rules=tuple(
            (str(n), a if a is None or isinstance(a, str) else tuple(a)) for n, a in self.rules
        ),
        topology=str(self.topology or ""),
        hbm_gib=float(self.hbm_gib or 0.0),
    )
    validate_rules(self.rules, "parallel.rules")

  def check_devices(self, num_devices: int) -> None:
    """Both meshes fit `num_devices` devices."""
    mesh_shape(self.mesh, num_devices, "parallel.mesh")
    mesh_shape(self.sampler_mesh, num_devices, "parallel.sampler_mesh")


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """data.*: the task, its options, the data files' fields and verifier, the chat template, and the
  tokenizer."""

  task: str
  options: dict  # get_task's options (data.task != jsonl)
  train_file: str = ""  # data.task=jsonl: the JSON Lines (or Parquet) file of each split
  test_file: str = ""
  data_dir: str = ""  # tfds data dir ('' = the default)
  tokenizer: str = ""  # SentencePiece model ('' = the committed one)
  prompt_field: str = "prompt"
  answer_field: str = "answer"
  verifier: str = "auto"  # auto | numeric | math | exact
  verifier_timeout: float = 5.0  # seconds per answer (math)
  chat_template: str = "auto"  # auto | none | a .jinja file
  system_prompt: str = ""
  chat_template_kwargs: str = ""  # a JSON object: extra template variables ('' = none)

  def __post_init__(self):
    _set(self, options=dict(self.options))
    if self.task not in TASKS:
      _bad("data.task", self.task, f"must be one of {TASKS}")
    for f in JSONL_OPTIONS:
      path = getattr(self, f)
      if self.task == "jsonl" and not path:
        _bad(f"data.{f}", path, "data.task=jsonl needs a JSON Lines file per split")
      if self.task == "jsonl" and not os.path.isfile(path):
        _bad(f"data.{f}", path, "no such file")
      if self.task != "jsonl" and path:
        _bad(f"data.{f}", path, f"only used with data.task=jsonl, not {self.task!r}")
    for f in ("prompt_field", "answer_field"):
      if not isinstance(getattr(self, f), str) or not getattr(self, f):
        _bad(f"data.{f}", getattr(self, f), "must be a non-empty field name")
    if self.verifier not in VERIFIERS:
      _bad("data.verifier", self.verifier, f"must be one of {VERIFIERS}")
    t = self.verifier_timeout
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not t > 0 or t == float("inf"):
      _bad("data.verifier_timeout", t, "must be a finite number of seconds > 0")
    _set(self, verifier_timeout=float(t))
    ct = str(self.chat_template or "")
    if ct not in ("auto", "none") and not os.path.isfile(os.path.expanduser(ct)):
      _bad("data.chat_template", ct, "must be auto, none or an existing template file (.jinja)")
    _set(self, chat_template=ct if ct in ("auto", "none") else os.path.expanduser(ct))
    if not isinstance(self.system_prompt, str):
      _bad("data.system_prompt", self.system_prompt, "must be a string ('' = no system message)")
    self.template_kwargs()  # validates data.chat_template_kwargs
    if self.task == "reasoning_gym":
      _check_reasoning_gym(self.options)
    elif self.task != "jsonl":
      _check_task_options(self.task, self.options)

  def template_kwargs(self) -> dict:
    """data.chat_template_kwargs as a dict (the template's extra variables)."""
    raw = self.chat_template_kwargs
    if isinstance(raw, dict):
      return dict(raw)
    if not str(raw or "").strip():
      return {}
    try:
      value = json.loads(raw)
    except json.JSONDecodeError as e:
      _bad(
          "data.chat_template_kwargs",
          raw,
          f"not JSON ({e.msg}); e.g. '{{\"enable_thinking\": false}}'",
      )
    if not isinstance(value, dict):
      _bad("data.chat_template_kwargs", raw, "must be a JSON object")
    return value

  def task_options(self) -> dict:
    """get_task's options: the files, fields and verifier for data.task=jsonl, else data.options."""
    if self.task == "jsonl":
      return dict(
          {f: getattr(self, f) for f in JSONL_OPTIONS},
          prompt_field=self.prompt_field,
          answer_field=self.answer_field,
          verifier=self.verifier,
          verifier_timeout=self.verifier_timeout,
      )
    return dict(self.options)


def _check_reasoning_gym(options: dict) -> None:
  """data.options for data.task=reasoning_gym: a known dataset, the generator's own config."""
  from fo_rl.data import reasoning_gym_task as rg

  try:
    rg.ReasoningGymTask(**options).check()
  except rg.OptionError as e:
    raise UserError(f"data.options.{e.field}={e.value!r}: {e.why}") from None


def _check_task_options(task: str, options: dict) -> None:
  """data.options against the task's difficulty knobs (and num_train / num_test / seed), without data."""
  try:
    ProceduralTask(task, **options)
  except TypeError as e:  # an unknown keyword of the difficulty dataclass
    raise UserError(f"data.options: {e} (data.task={task!r})") from None
  except ValueError as e:  # "<knob> must be ..."
    knob = next((k for k in options if str(e).startswith(k)), None)
    if knob is None:
      raise UserError(f"data.options={options!r}: {e}") from None
    raise UserError(f"data.options.{knob}={options[knob]!r}: {e}") from None


SFT_TRUNCATE = ("left", "right")


@dataclasses.dataclass(frozen=True)
class SFTConfig:
  """sft.*: the cold start (fo_rl/sft.py). Validated only when enabled."""

  enabled: bool
  steps: int
  batch_size: int
  learning_rate: float
  warmup_steps: int
  teacher: str  # see fo_rl/data/teachers.py
  error_rate: float | None = None  # None (config: < 0): the teacher variant's own rate
  max_len: int = 0  # tokens of prompt + response (config 0: 64)
  cache_dir: str = ""  # '' = <workdir>/sft
  truncate: str = "left"  # left: drop prompt tokens from the left | right: keep the first max_len
  min_kept_fraction: float = 0.9  # pre-flight: response tokens kept after truncation, at least

  def __post_init__(self):
    rate = self.error_rate
    if rate is not None and not (rate < 0 or rate <= 1):  # NaN or > 1
      _bad("sft.error_rate", rate, "must be in [0, 1] (or < 0: the teacher's own rate)")
    if int(self.max_len or 0) < 0:
      _bad("sft.max_len", self.max_len, "must be >= 1 (0: 64)")
    _set(
        self,
        enabled=bool(self.enabled),
        steps=int(self.steps),
        batch_size=int(self.batch_size),
        learning_rate=float(self.learning_rate),
        warmup_steps=int(self.warmup_steps),
        error_rate=None if rate is None or rate < 0 else float(rate),
        max_len=int(self.max_len or 0) or 64,
        cache_dir=str(self.cache_dir or ""),
        min_kept_fraction=float(self.min_kept_fraction),
    )
    if not self.enabled:
      return
    if self.teacher not in teachers_lib.TEACHERS:
      _bad("sft.teacher", self.teacher, f"unknown teacher; known: {sorted(teachers_lib.TEACHERS)}")
    if self.truncate not in SFT_TRUNCATE:
      _bad("sft.truncate", self.truncate, f"must be one of {SFT_TRUNCATE}")
    if not 0 <= self.min_kept_fraction <= 1:
      _bad("sft.min_kept_fraction", self.min_kept_fraction, "must be in [0, 1]")
    if self.steps < 1:
      _bad("sft.steps", self.steps, "must be >= 1 when sft.enabled")
    _at_least("sft", self, ("batch_size",))
    if not self.learning_rate > 0:
      _bad("sft.learning_rate", self.learning_rate, "must be > 0")
    if not 0 <= self.warmup_steps < self.steps:
      _bad("sft.warmup_steps", self.warmup_steps, f"must be in [0, sft.steps={self.steps})")

  @property
  def optim(self) -> OptimConfig:
    """The cold start's optimizer: AdamW (weight decay 0.01, grad norm clipped at 1), linear warmup
    over sft.warmup_steps, then cosine decay to a tenth of sft.learning_rate at sft.steps."""
    return OptimConfig(
        learning_rate=self.learning_rate,
        warmup_steps=self.warmup_steps,
        weight_decay=0.01,
        grad_clip=1.0,
        schedule="cosine",
        decay_steps=self.steps,
        final_fraction=0.1,
    )


@dataclasses.dataclass(frozen=True)
class RLConfig:
  """rl.*: the RL loop and its policy loss."""

  steps: int
  prompts_per_step: int
  group_size: int  # G samples per prompt
  mini_batches: int  # N optimizer updates per rollout batch
  replay: str  # none | r2 | r3
  temperature: float
  advantage: str  # auto | mean | std | rloo; resolved here ('auto' -> the loss's own)
  allow_advantage_mismatch: bool  # accept an rl.advantage the loss is not defined with
  loss: LossConfig
  max_skipped_steps: int  # stop after this many consecutive fully skipped RL steps (0: never)

  def __post_init__(self):
    check_rl_fields(self.mini_batches, self.replay, self.temperature)
    k = self.max_skipped_steps
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
      _bad("rl.max_skipped_steps", k, "must be an integer >= 0 (0: never stop)")
    _set(self, mini_batches=int(self.mini_batches), temperature=float(self.temperature))
    _at_least("rl", self, ("steps", "prompts_per_step", "group_size"))
    if self.group_size < 2:
      _bad(
          "rl.group_size", self.group_size, "group-relative advantages need >= 2 samples per prompt"
      )
    if self.global_batch % self.mini_batches:
      _bad(
          "rl.mini_batches",
          self.mini_batches,
          f"must divide the global batch rl.prompts_per_step * rl.group_size = {self.global_batch}",
      )
    _set(
        self,
        advantage=resolve_advantage(self.advantage, self.loss.name, self.allow_advantage_mismatch),
    )

  @property
  def global_batch(self) -> int:
    """Responses per RL step: prompts_per_step * group_size."""
    return self.prompts_per_step * self.group_size

  @classmethod
  def from_config(cls, d) -> "RLConfig":
    d = dict(d.to_dict() if hasattr(d, "to_dict") else d)
    loss = d.get("loss", {})
    name = loss.get("name", LossConfig.name)
    if name not in LOSSES:
      _bad("rl.loss.name", name, f"unknown loss; known: {sorted(LOSSES)}")
    d["loss"] = LossConfig.from_config(loss, "rl.loss")
    return from_mapping(cls, d, "rl")


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  """eval.*: the held-out evaluation."""

  every: int  # RL steps
  num_prompts: int
  samples: int  # G for the held-out mean accuracy; k of avg@k / pass@k on the eval files
  files: str = ""  # NAME=PATH[,NAME=PATH...]: held-out sets from files (fo_rl/data/eval_sets.py)

  def __post_init__(self):
    _at_least("eval", self, ("every", "num_prompts", "samples"))
    if not isinstance(self.files, str):
      _bad("eval.files", self.files, "must be a string NAME=PATH[,NAME=PATH...]")
    self.file_sets()

  def file_sets(self) -> list:
    """[(name, path)] of eval.files (checked: each file exists, names are distinct)."""
    from fo_rl.data.eval_sets import parse_spec

    try:
      return parse_spec(self.files, "eval.files")
    except ValueError as e:
      raise UserError(str(e)) from None


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  """checkpoint.*: the RL loop's checkpoints."""

  every: int
  max_to_keep: int | None  # None keeps every step

  def __post_init__(self):
    _at_least("checkpoint", self, ("every",))
    if self.max_to_keep is not None:
      _at_least("checkpoint", self, ("max_to_keep",))


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """The validated view of a ConfigDict (see `parse`)."""

  name: str
  seed: int
  dry_run: bool
  model: ModelConfig
  init: InitConfig
  parallel: ParallelConfig
  data: DataConfig
  sft: SFTConfig
  sampler: SamplerConfig  # sampler.* (not the sampling fields); rules: sharding.inference_rules
  sampling: SamplingParams  # RL sampling: sampler.top_k/top_p/max_new_tokens at rl.temperature
  rl: RLConfig
  optim: OptimConfig  # the RL optimizer
  trainer: TrainerConfig  # rl.* and optim.* as the Trainer takes them
  eval: EvalConfig
  checkpoint: CheckpointConfig
  as_dict: dict  # the whole config as plain JSON data (what config.json holds)
  max_prompt_len: int = 256  # sampler.max_prompt_len: the longest prompt (tokens, BOS included)


def _sampler(d: dict, rules: tuple, rl: RLConfig) -> tuple[SamplerConfig, SamplingParams]:
  """sampler.*: SamplerConfig (its weights and compiled code) and the RL SamplingParams (eos ids are
  filled in once the tokenizer is known)."""
  known = [f.name for f in dataclasses.fields(SamplerConfig) if f.name != "rules"]
  unknown_keys(d, known + list(SAMPLING_FIELDS), "sampler")
  d = dict(d)
  sampling = {f: d.pop(f) for f in SAMPLING_FIELDS if f in d}
  for f in ("prompt_bucket", "gen_bucket"):
    if f in d:
      d[f] = int(d[f])
  if "decode_segments" in d:
    d["decode_segments"] = int(d["decode_segments"] or 0) or None  # 0: automatic
  if "num_pages" in d:
    d["num_pages"] = int(d["num_pages"] or 0) or None  # 0: automatic
  d["keep_high_precision"] = tuple(d.get("keep_high_precision", Q.DEFAULT_KEEP))
  sampler = from_mapping(SamplerConfig, dict(d, rules=rules), "sampler")
  sampling.pop("max_prompt_len", None)  # RunConfig.max_prompt_len (parse)
  try:
    sampling = SamplingParams(
        temperature=rl.temperature,
        top_k=int(sampling.get("top_k", 0)),
        top_p=float(sampling.get("top_p", 1.0)),
        max_new_tokens=int(sampling.get("max_new_tokens", SamplingParams.max_new_tokens)),
    )
  except ValueError as e:  # "max_new_tokens=0: must be >= 1": name the section
    raise UserError(f"sampler.{e}") from None
  if sampling.top_k or sampling.top_p < 1.0:
    # The trainer scores pi at temperature only; truncation in the sampler would bias the IS ratio by
    # the log of the kept mass (algorithms.md section 7).
    _bad(
        "sampler.top_k/top_p",
        (sampling.top_k, sampling.top_p),
        "RL needs an untruncated sampler (top_k=0, top_p=1.0) so that mu and pi share one distribution",
    )
  return sampler, sampling


def parse(c: ml_collections.ConfigDict, num_devices: int | None = None) -> RunConfig:
  """Validate everything that can be checked without data or compilation; returns the typed view.

  num_devices: also check that parallel.mesh and parallel.sampler_mesh fit that many devices. Every
  error is a `UserError` (a ValueError) naming the field."""
  try:
    return _parse(c, num_devices)
  except UserError:
    raise
  except ValueError as e:  # a lower layer's check (model.*, parallel.*, rl.*): its message names it
    raise UserError(str(e)) from None


def _parse(c: ml_collections.ConfigDict, num_devices: int | None) -> RunConfig:
  d = json.loads(c.to_json_best_effort() if hasattr(c, "to_json_best_effort") else json.dumps(c))
  unknown_keys(d, SECTIONS, "config")
  model = ModelConfig.from_dict(d["model"])
  # A dry run compiles for a TPU topology (on a CPU host): check the choice against the target.
  check_attention_impl(model.attention_impl, "tpu" if d.get("dry_run") else None)
  parallel = from_mapping(ParallelConfig, d["parallel"], "parallel")
  if num_devices is not None:
    parallel.check_devices(num_devices)
  rl = RLConfig.from_config(d["rl"])
  optim = OptimConfig.from_config(d["optim"])
  check_rl_fields(rl.mini_batches, rl.replay, rl.temperature, model.num_experts)
  tr = dict(d.get("trainer", {}))
  unknown_keys(tr, ["micro_batches", "pack"], "trainer")
  if not isinstance(tr.get("pack", True), bool):
    _bad("trainer.pack", tr["pack"], "must be true or false")
  micro = tr.get("micro_batches", 0)
  mini = rl.global_batch // rl.mini_batches
  check_micro_batches(micro, mini)
  if num_devices is not None:  # the trainer's batches split evenly over its mesh's batch axes
    sizes = dict(zip(MESH_AXES, mesh_shape(parallel.mesh, num_devices)))
    for what, n in (
        ("global batch (rl.prompts_per_step * rl.group_size)", rl.global_batch),
        ("mini-batch (global batch / rl.mini_batches)", mini),
        # (auto, 0, only picks micro-batches the batch axes split)
        ("micro-batch (mini-batch / trainer.micro_batches)", mini // max(micro, 1)),
    ):
      check_batch_split(parallel.rules, sizes, n, what)
  data = from_mapping(DataConfig, d["data"], "data")
  sampler, sampling = _sampler(d["sampler"], inference_rules(parallel.rules), rl)
  seed = d["seed"]
  if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
    _bad("seed", seed, "must be an integer >= 0")
  max_prompt_len = d["sampler"].get("max_prompt_len", 256)
  if isinstance(max_prompt_len, bool) or not isinstance(max_prompt_len, int) or max_prompt_len < 2:
    _bad("sampler.max_prompt_len", max_prompt_len, "must be an integer >= 2 (BOS and one token)")
  return RunConfig(
      name=str(d.get("name", "run")),
      seed=seed,
      dry_run=bool(d.get("dry_run", False)),
      model=model,
      init=from_mapping(InitConfig, d.get("init", {}), "init"),
      parallel=parallel,
      data=data,
      sft=from_mapping(SFTConfig, d["sft"], "sft"),
      sampler=sampler,
      sampling=sampling,
      rl=rl,
      optim=optim,
      trainer=TrainerConfig(
          mini_batches=rl.mini_batches,
          replay=rl.replay,
          temperature=rl.temperature,
          loss=rl.loss,
          optim=optim,
          micro_batches=micro,
          pack=tr.get("pack", True),
      ),
      eval=from_mapping(EvalConfig, d["eval"], "eval"),
      checkpoint=from_mapping(CheckpointConfig, d["checkpoint"], "checkpoint"),
      as_dict=d,
      max_prompt_len=max_prompt_len,
  )
