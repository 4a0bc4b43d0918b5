"""Sample from a checkpoint with fo_rl's sampler and print every token with its log-probability.

    python -m fo_rl.tools.sample --hf_checkpoint=DIR --prompt="2+2=" [--num_samples=4] \
        [--temperature=1.0] [--top_p=1.0] [--top_k=0] [--max_new_tokens=64] \
        [--weight_dtype=float32|bfloat16|float8_e4m3fn|int8] [--seed=0]
    python -m fo_rl.tools.sample --checkpoint=WORKDIR [--step=N] --prompt="..."

--hf_checkpoint: a Hugging Face Qwen3-MoE / Qwen3 directory (config.json + *.safetensors). Text goes through
  the directory's own tokenizer when it has one (tokenizer.json, read by fo_rl.data.tokenizer.HFTokenizer,
  or a SentencePiece tokenizer.model); without one, --prompt is token ids ("1 2 3" or "1,2,3") and samples
  print as ids. EOS: --eos_id, else generation_config.json's eos_token_id, else config.json's.
--checkpoint: an fo_rl training run directory (fo_rl.main --workdir): its config.json gives the model,
  checkpoints/<step> the parameters (the latest step unless --step), and data.tokenizer (default: the
  committed SentencePiece model) the tokenizer. The prompt is formatted as training formats it: BOS, and
  for data.task=jsonl the template `Question: <prompt>\nAnswer:` (the procedural tasks' prompts are
  typed as they are, e.g. `12+34=`); --prompt_ids sends the ids as given.

The printed logprob of each token is logp_mu: its log-probability under the distribution it was sampled
from (after temperature / top-k / top-p); greedy (--temperature=0) prints log softmax(logits) at the argmax.
Errors (bad flags, missing files) exit with status 1 and one line naming the problem.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
from absl import app, flags, logging

from fo_rl.sampler.quantize import WEIGHT_DTYPES

FLAGS = flags.FLAGS
if "hf_checkpoint" not in flags.FLAGS:  # shared with the other tool when both are imported
  flags.DEFINE_string("hf_checkpoint", None, "Hugging Face checkpoint directory.")
flags.DEFINE_string("checkpoint", None, "fo_rl training run directory (--workdir of fo_rl.main).")
flags.DEFINE_integer("step", None, "With --checkpoint: the checkpoint step (default: the latest).")
flags.DEFINE_string("prompt", None, "Prompt text (token ids when there is no tokenizer).")
flags.DEFINE_bool("prompt_ids", False, "Read --prompt as token ids even when there is a tokenizer.")
flags.DEFINE_integer("num_samples", 1, "Samples of the prompt.")
flags.DEFINE_float("temperature", 1.0, "Sampling temperature; 0 is greedy.")
flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (1.0: off).")
flags.DEFINE_integer("top_k", 0, "Top-k sampling (0: off).")
flags.DEFINE_integer("max_new_tokens", 64, "Maximum generated tokens per sample.")
flags.DEFINE_enum("weight_dtype", "float32", list(WEIGHT_DTYPES), "The sampler's weight dtype.")
flags.DEFINE_integer(
    "eos_id", None, "End-of-sequence id (default: the tokenizer's / config's; -1: none)."
)
flags.DEFINE_integer("seed", 0, "Sampling seed.")


def hf_tokenizer(directory: str):
  """The checkpoint directory's tokenizer (tokenizer.json, else a SentencePiece tokenizer.model), or None
  when it has none (then prompts are token ids)."""
  from fo_rl.data.tokenizer import HFTokenizer, Tokenizer

  if os.path.exists(os.path.join(directory, "tokenizer.json")):
    return HFTokenizer(directory)
  if os.path.exists(os.path.join(directory, "tokenizer.model")):
    return Tokenizer(os.path.join(directory, "tokenizer.model"))
  return None


def parse_ids(text: str, vocab_size: int) -> list[int]:
  try:
    ids = [int(t) for t in text.replace(",", " ").split()]
  except ValueError:
    raise ValueError(
        f"--prompt={text!r}: without a tokenizer the prompt must be token ids, e.g. "
        f"--prompt='1 2 3'"
    ) from None
  bad = [i for i in ids if not 0 <= i < vocab_size]
  if bad:
    raise ValueError(f"--prompt: token id {bad[0]} is outside [0, vocab_size={vocab_size})")
  return ids


def load_hf(directory: str):
  """(ModelConfig, params, tokenizer or None, eos id or None) of a Hugging Face checkpoint."""
  from fo_rl.model.hf import load_hf_checkpoint

  if not os.path.isfile(os.path.join(directory, "config.json")):
    raise ValueError(f"--hf_checkpoint={directory!r}: no config.json there")
  cfg, _, params = load_hf_checkpoint(directory)
  tok = hf_tokenizer(directory)
  with open(os.path.join(directory, "config.json")) as f:
    eos = json.load(f).get("eos_token_id")
  eos = eos[0] if isinstance(eos, list) and eos else eos
  if tok is not None and tok.eos_id is not None:
    eos = tok.eos_id
  return cfg, params, tok, eos


def training_prompt(rc, text: str) -> str:
  """`text` as fo_rl.run's Rollout formats a prompt of the run's task (before BOS): the JSONL template
  for data.task=jsonl; a procedural task's prompt is the text itself."""
  from fo_rl.data import jsonl

  return jsonl.PROMPT_TEMPLATE.format(prompt=text) if rc.data.task == "jsonl" else text


def load_workdir(workdir: str, step: int | None, with_config: bool = False):
  """(ModelConfig, params, tokenizer, eos id) of an fo_rl training run directory (and its RunConfig
  last, `with_config`).

  The checkpoint holds fo_rl.run's `train_bundle` (fo_rl/checkpoint.py); Checkpointer checks the full
  structure, so the whole bundle is described (shapes only, nothing is initialized or compiled) and
  restored onto one device; only the parameters are kept.
  """
  import jax
  import jax.numpy as jnp
  import ml_collections

  from fo_rl import config as config_lib
  from fo_rl.checkpoint import Checkpointer, restore_train_bundle, train_bundle
  from fo_rl.data.tokenizer import Tokenizer
  from fo_rl.model.init import abstract_model
  from fo_rl.rl.optim import abstract_opt_state, make_optimizer
  from fo_rl.rl.trainer import TrainState

  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise ValueError(f"--checkpoint={workdir!r}: no config.json there (not an fo_rl run directory)")
  with open(path) as f:
    rc = config_lib.parse(ml_collections.ConfigDict(json.load(f)))
  ckpt_dir = os.path.join(workdir, "checkpoints")
  ckpt = Checkpointer(ckpt_dir, max_to_keep=None)
  try:
    steps = ckpt.all_steps()
    if not steps:
      raise ValueError(f"--checkpoint={workdir!r}: no checkpoint in {ckpt_dir}")
    step = max(steps) if step is None else step
    if step not in steps:
      raise ValueError(f"--step={step}: {ckpt_dir} has steps {sorted(steps)}")
    _, params = abstract_model(rc.model, None, rc.parallel.rules)
    scalar = jax.ShapeDtypeStruct((), jnp.int32)
    opt_state = abstract_opt_state(make_optimizer(rc.trainer.optim), params)
    state = TrainState(params, opt_state, scalar, scalar)
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one),
        train_bundle(state, jax.random.key(0)),
    )
    try:
      state, _, _ = restore_train_bundle(ckpt, step, target)
    except ValueError:
      raise
    except Exception as e:  # noqa: BLE001 - a damaged step: one line naming it
      first = (str(e).strip().splitlines() or [""])[0][:200]
      older = [s for s in sorted(steps) if s < step]
      raise ValueError(
          f"--checkpoint={workdir!r}: {ckpt_dir}/{step} cannot be restored "
          f"({type(e).__name__}: {first})"
          + (f"; --step={older[-1]} reads the previous one" if older else "")
      ) from None
  finally:
    ckpt.close()
  tok = Tokenizer(rc.data.tokenizer) if rc.data.tokenizer else Tokenizer.default()
  if with_config:
    return rc.model, state.params, tok, tok.eos_id, rc
  return rc.model, state.params, tok, tok.eos_id


def sample(
    hf_checkpoint=None,
    checkpoint=None,
    step=None,
    prompt="",
    prompt_ids=False,
    num_samples=1,
    temperature=1.0,
    top_p=1.0,
    top_k=0,
    max_new_tokens=64,
    weight_dtype="float32",
    eos_id=None,
    seed=0,
    out=sys.stdout,
):
  """The tool as a function: prints to `out` and returns the SampleOutput; raises ValueError on bad
  inputs."""
  from fo_rl.sampler import Sampler, SamplerConfig, SamplingParams

  if (hf_checkpoint is None) == (checkpoint is None):
    raise ValueError("give exactly one of --hf_checkpoint and --checkpoint")
  if num_samples < 1:
    raise ValueError(f"--num_samples={num_samples}: must be >= 1")
  sampling = SamplingParams(
      temperature=temperature, top_k=top_k, top_p=top_p, max_new_tokens=max_new_tokens
  )  # validates the sampling flags
  rc = None
  if hf_checkpoint is not None:
    cfg, params, tok, eos = load_hf(hf_checkpoint)
  else:
    cfg, params, tok, eos, rc = load_workdir(checkpoint, step, with_config=True)
  if eos_id is not None:
    eos = None if eos_id < 0 else eos_id
  if tok is None or prompt_ids:
    ids = parse_ids(prompt, cfg.vocab_size)
  elif rc is not None:  # as training formats its prompts (fo_rl.run.Rollout.prompts)
    ids = tok.encode(training_prompt(rc, prompt), add_bos=True)
  else:
    ids = tok.encode(prompt)
  if not ids:
    raise ValueError("--prompt: empty (the sampler needs at least one prompt token)")
  sampling = SamplingParams(
      temperature=temperature,
      top_k=top_k,
      top_p=top_p,
      max_new_tokens=max_new_tokens,
      eos_ids=() if eos is None else (eos,),
  )
  sampler = Sampler(cfg, SamplerConfig(weight_dtype=weight_dtype), trainer_state=params)
  res = sampler.generate([ids] * num_samples, sampling, seed=seed)
  tokens, logp = np.asarray(res.tokens), np.asarray(res.logp_mu)
  lengths, reasons = np.asarray(res.lengths), res.finish_reason
  shown = ids if tok is None else repr(prompt)
  if rc is not None and tok is not None and not prompt_ids:
    shown = f"{training_prompt(rc, prompt)!r} after BOS (as in training)"
  print(f"prompt ({len(ids)} tokens): {shown}", file=out)
  print(
      f"sampler: weight_dtype={weight_dtype} temperature={temperature} top_k={top_k} top_p={top_p} "
      f"max_new_tokens={max_new_tokens} eos={eos}",
      file=out,
  )
  for b in range(num_samples):
    n = int(lengths[b])
    toks, lps = tokens[b, :n], logp[b, :n]
    print(
        f"\n=== sample {b + 1}/{num_samples}: {n} tokens, finish={reasons[b]}, "
        f"sum logp={lps.sum():.4f} ===",
        file=out,
    )
    if tok is not None:
      print(tok.decode(toks), file=out)
    print(f"{'#':>5} {'id':>8}  {'token':<20} {'logp':>10}", file=out)
    for i, (t, lp) in enumerate(zip(toks, lps)):
      piece = repr(tok.id_to_piece(t)) if tok is not None else ""
      print(f"{i:>5} {int(t):>8}  {piece:<20} {lp:>10.4f}", file=out)
  return res


def main(argv) -> int:
  if not FLAGS["verbosity"].present:  # orbax logs at INFO; errors are one line
    logging.set_verbosity(logging.WARNING)
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if FLAGS.prompt is None:
    raise app.UsageError("--prompt is required")
  try:
    sample(
        FLAGS.hf_checkpoint,
        FLAGS.checkpoint,
        FLAGS.step,
        FLAGS.prompt,
        FLAGS.prompt_ids,
        FLAGS.num_samples,
        FLAGS.temperature,
        FLAGS.top_p,
        FLAGS.top_k,
        FLAGS.max_new_tokens,
        FLAGS.weight_dtype,
        FLAGS.eos_id,
        FLAGS.seed,
    )
  except ValueError as e:
    print(f"fo_rl.tools.sample: error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  app.run(main)
