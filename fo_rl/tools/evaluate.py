"""Evaluate a checkpoint on held-out files: avg@k, pass@k and the mean response length per set.

    python -m fo_rl.tools.evaluate --hf_checkpoint=DIR --eval_file=aime=examples/aime_style.jsonl \
        [--eval_file=NAME=PATH ...] [--samples=8] [--temperature=1.0] [--max_new_tokens=512] \
        [--verifier=auto|numeric|math|exact] [--prompt_field=prompt] [--answer_field=answer] \
        [--chat_template=auto|none|FILE] [--system_prompt=...] [--chat_template_kwargs=JSON] \
        [--weight_dtype=float32|bfloat16|float8_e4m3fn|int8] [--seed=0] [--output=RESULTS.json]
    python -m fo_rl.tools.evaluate --checkpoint=WORKDIR [--step=N] --eval_file=...

Each file (JSON Lines or Parquet; `NAME=PATH`, or `PATH` named after the file) is read as `eval.files` of
the main job reads it, every problem is sampled `--samples` = k times, and each set reports
`eval/NAME/avg_at_k`, `eval/NAME/pass_at_j` (j = 1, 2, 4, ..., k: the unbiased estimator), `response_length`
and `verifier_timeouts` (fo_rl/data/eval_sets.py). The results print as one JSON object (and go to
`--output`).

--hf_checkpoint: a Hugging Face Qwen3-MoE / Qwen3 directory with its tokenizer.json; prompts go through its
  chat template when it has one (`--chat_template=auto`).
--checkpoint: an fo_rl run directory (fo_rl.main --workdir): its config.json gives the model, the tokenizer
  (init.hf_checkpoint's, else data.tokenizer), and the defaults of the data flags (data.prompt_field,
  answer_field, verifier, chat_template, system_prompt, chat_template_kwargs): prompts are rendered as
  that run rendered them.
Errors (bad flags, a bad file or line, a template error) exit with status 1 and one line naming them.
"""

from __future__ import annotations

import json
import sys

from absl import app, flags, logging

from fo_rl.sampler.quantize import WEIGHT_DTYPES
from fo_rl.tools import sample as sample_tool  # defines the flags both tools share (first)

FLAGS = flags.FLAGS
if "hf_checkpoint" not in FLAGS:  # shared with the other tools when several are imported
  flags.DEFINE_string("hf_checkpoint", None, "Hugging Face checkpoint directory.")
if "checkpoint" not in FLAGS:
  flags.DEFINE_string("checkpoint", None, "fo_rl training run directory (--workdir of fo_rl.main).")
if "step" not in FLAGS:
  flags.DEFINE_integer(
      "step", None, "With --checkpoint: the checkpoint step (default: the latest)."
  )
flags.DEFINE_multi_string("eval_file", [], "NAME=PATH (or PATH) of a held-out set; repeatable.")
flags.DEFINE_integer("samples", 4, "k: samples per problem.")
if "temperature" not in FLAGS:
  flags.DEFINE_float("temperature", 1.0, "Sampling temperature; 0 is greedy.")
if "max_new_tokens" not in FLAGS:
  flags.DEFINE_integer("max_new_tokens", 64, "Maximum generated tokens per sample.")
if "weight_dtype" not in FLAGS:
  flags.DEFINE_enum("weight_dtype", "float32", list(WEIGHT_DTYPES), "The sampler's weight dtype.")
if "seed" not in FLAGS:
  flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.DEFINE_string("prompt_field", None, "The prompt field (default: the run's, else 'prompt').")
flags.DEFINE_string("answer_field", None, "The answer field (default: the run's, else 'answer').")
flags.DEFINE_string(
    "verifier", None, "auto | numeric | math | exact (default: the run's, else auto)."
)
flags.DEFINE_float(
    "verifier_timeout", None, "Seconds per answer for the math verifier (default 5)."
)
flags.DEFINE_string(
    "chat_template", None, "auto | none | a .jinja file (default: the run's, else auto)."
)
flags.DEFINE_string(
    "system_prompt", None, "The chat template's system prompt (default: the run's)."
)
flags.DEFINE_string("chat_template_kwargs", None, "Template variables as a JSON object.")
flags.DEFINE_string("output", None, "Also write the results (JSON) here.")


def _data_settings(rc, overrides: dict) -> dict:
  """The data.* settings: the flags given, else the run's config (--checkpoint), else the defaults."""
  from fo_rl import config as config_lib

  d = dict(config_lib.DATA_DEFAULTS_ADDED)
  if rc is not None:
    d.update({k: rc.as_dict["data"].get(k, v) for k, v in d.items()})
  d.update({k: v for k, v in overrides.items() if v is not None})
  return d


def evaluate(
    eval_files,
    hf_checkpoint=None,
    checkpoint=None,
    step=None,
    samples=4,
    temperature=1.0,
    max_new_tokens=64,
    weight_dtype="float32",
    seed=0,
    out=sys.stdout,
    **data_flags,
) -> dict:
  """The tool as a function: returns (and prints to `out`) the metrics; ValueError on bad inputs."""
  import jax

  from fo_rl.data import chat_template as chat_lib
  from fo_rl.data import eval_sets as eval_sets_lib
  from fo_rl.data.tasks import JsonlTask
  from fo_rl.data.tokenizer import HFTokenizer
  from fo_rl.data.verifiers import VERIFIERS
  from fo_rl.run import evaluate_sets
  from fo_rl.sampler import Sampler, SamplerConfig, SamplingParams

  load_hf, load_workdir = sample_tool.load_hf, sample_tool.load_workdir

  if (hf_checkpoint is None) == (checkpoint is None):
    raise ValueError("give exactly one of --hf_checkpoint and --checkpoint")
  if not eval_files:
    raise ValueError("--eval_file: give at least one held-out file (NAME=PATH or PATH)")
  if samples < 1:
    raise ValueError(f"--samples={samples}: must be >= 1")
  sets_spec = eval_sets_lib.parse_spec(",".join(eval_files), "--eval_file")
  rc = None
  if hf_checkpoint is not None:
    cfg, params, tok, eos = load_hf(hf_checkpoint)
    if tok is None:
      raise ValueError(f"--hf_checkpoint={hf_checkpoint!r}: no tokenizer.json (prompts are text)")
    model_dir = hf_checkpoint
  else:
    cfg, params, tok, eos, rc = load_workdir(checkpoint, step, with_config=True)
    model_dir = rc.init.hf_checkpoint or None
    if model_dir:  # the run trained with its checkpoint's tokenizer
      tok = HFTokenizer(model_dir)
      eos = tok.eos_id
  d = _data_settings(rc, data_flags)
  if d["verifier"] not in ("auto",) + VERIFIERS:
    raise ValueError(f"--verifier={d['verifier']!r}: must be one of {('auto',) + VERIFIERS}")
  kwargs = d["chat_template_kwargs"]
  kwargs = json.loads(kwargs) if isinstance(kwargs, str) and kwargs.strip() else dict(kwargs or {})
  if not isinstance(kwargs, dict):
    raise ValueError(f"--chat_template_kwargs={d['chat_template_kwargs']!r}: not a JSON object")
  template = chat_lib.resolve(d["chat_template"], model_dir, "--chat_template")
  sets = []
  for name, path in sets_spec:
    task = JsonlTask(
        name=name,
        prompt_field=d["prompt_field"],
        answer_field=d["answer_field"],
        verifier=d["verifier"],
        verifier_timeout=float(d["verifier_timeout"]),
    )
    records = task.load_file(path)
    if template is not None:
      task = chat_lib.ChatTask(task, template, d["system_prompt"], kwargs)
      task.format_prompt(records[0])  # a template error now, before anything compiles
    sets.append((name, task, records))
  sampling = SamplingParams(
      temperature=temperature,
      max_new_tokens=max_new_tokens,
      eos_ids=() if eos is None else (eos,),
  )
  sampler = Sampler(cfg, SamplerConfig(weight_dtype=weight_dtype), trainer_state=params)
  metrics = evaluate_sets(sampler, tok, sets, sampling, samples, jax.random.key(seed))
  result = {
      "checkpoint": hf_checkpoint or checkpoint,
      "samples": samples,
      "sets": {
          name: {"file": path, "problems": len(r)}
          for (name, path), (_, _, r) in zip(sets_spec, sets)
      },
      "chat_template": None if template is None else template.source,
      **metrics,
  }
  print(json.dumps(result, indent=2), file=out)
  return result


def main(argv) -> int:
  if not FLAGS["verbosity"].present:  # orbax logs at INFO; errors are one line
    logging.set_verbosity(logging.WARNING)
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    result = evaluate(
        FLAGS.eval_file,
        FLAGS.hf_checkpoint,
        FLAGS.checkpoint,
        FLAGS.step,
        FLAGS.samples,
        FLAGS.temperature,
        FLAGS.max_new_tokens,
        FLAGS.weight_dtype,
        FLAGS.seed,
        prompt_field=FLAGS.prompt_field,
        answer_field=FLAGS.answer_field,
        verifier=FLAGS.verifier,
        verifier_timeout=FLAGS.verifier_timeout,
        chat_template=FLAGS.chat_template,
        system_prompt=FLAGS.system_prompt,
        chat_template_kwargs=FLAGS.chat_template_kwargs,
    )
  except (ValueError, OSError) as e:
    print(f"fo_rl.tools.evaluate: error: {e}", file=sys.stderr)
    return 1
  if FLAGS.output:
    with open(FLAGS.output, "w") as f:
      json.dump(result, f, indent=2)
  return 0


if __name__ == "__main__":
  app.run(lambda argv: sys.exit(main(argv)))
