"""Check an install: every runtime path runs with what `pip install -r requirements.txt` installs.

    python -m fo_rl.tools.smoke --workdir=/tmp/fo_rl_smoke [--dry_run]

CI runs this in a fresh virtualenv holding `requirements.txt` alone (no test requirements), so a runtime
import that only the test requirements provide (torch, transformers, ...) fails there. It writes a small
Hugging Face-format checkpoint with fo_rl's own saver (the tiny Qwen3-MoE of
`configs/qwen3_30b_a3b.py:tiny`, safetensors) and a `tokenizer.json` (the `tokenizers` library), then runs,
each as its own process, as a user would:
  1. the main job from that checkpoint (on 2 CPU devices: the recipe's expert axis is 2) (`init.hf_checkpoint`): 2 RL steps with its tokenizer, a checkpoint,
     metrics.jsonl, TensorBoard events and curves.png;
  2. `fo_rl.tools.score` on it (logits of a batch of token ids);
  3. `fo_rl.tools.sample` on the checkpoint with an FP8 sampler, and on the training run's checkpoint.
Each step's output is checked; the first failure exits with status 1 naming the step. `--dry_run` writes
the checkpoint and prints the commands without running them.
"""

from __future__ import annotations

import glob
import json
import os
import shlex
import subprocess
import sys

import numpy as np
from absl import app, flags

FLAGS = flags.FLAGS
if "workdir" not in FLAGS:  # fo_rl.main defines it too (both may be imported in one test process)
  flags.DEFINE_string("workdir", None, "Where the checkpoint, the run and the outputs go.")
if "dry_run" not in FLAGS:
  flags.DEFINE_bool("dry_run", False, "Write the checkpoint, print the commands, run nothing.")

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(REPO, "configs", "qwen3_30b_a3b.py")
PROMPT = "What is 12 + 30?"


def _config():
  """The tiny Qwen3-MoE recipe (the config file as the main job loads it)."""
  import importlib.util

  spec = importlib.util.spec_from_file_location("qwen3_30b_a3b", CONFIG)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config("tiny")


def write_hf_checkpoint(directory: str) -> None:
  """The tiny recipe's model, freshly initialized, saved as a Hugging Face checkpoint with a byte-level
  BPE tokenizer.json (ids 2 / 3 are BOS / EOS, as in config.json)."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

  from fo_rl import config as config_lib
  from fo_rl.model.hf import save_hf_checkpoint
  from fo_rl.model.init import init_model

  cfg = config_lib.parse(_config()).model
  _, params = init_model(cfg, seed=7)
  save_hf_checkpoint(directory, cfg, params, extra_config={"eos_token_id": 3, "bos_token_id": 2})
  tok = Tokenizer(models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=min(200, cfg.vocab_size),
      special_tokens=["<pad>", "<unk>", "<s>", "</s>"],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
  )
  text = ["Using the numbers 3 5 7, make 22. Answer: 3*5+7 #### 22", f"{PROMPT} #### 42"]
  tok.train_from_iterator(text * 20, trainer)
  tok.save(os.path.join(directory, "tokenizer.json"))


def commands(workdir: str) -> list[tuple[str, list[str]]]:
  """(step name, argv) of each process the smoke test runs, in order."""
  hf, run = os.path.join(workdir, "hf"), os.path.join(workdir, "run")
  py = [sys.executable, "-m"]
  return [
      (
          "main job from the HF checkpoint",
          py
          + [
              "fo_rl.main",
              f"--config={CONFIG}:tiny",
              f"--workdir={run}",
              f"--config.init.hf_checkpoint={hf}",
              "--config.rl.steps=2",
              "--config.eval.every=2",
              "--config.checkpoint.every=2",
          ],
      ),
      (
          "fo_rl.tools.score",
          py
          + [
              "fo_rl.tools.score",
              f"--hf_checkpoint={hf}",
              f"--input_ids={os.path.join(workdir, 'ids.npy')}",
              f"--output={os.path.join(workdir, 'logits.npy')}",
          ],
      ),
      (
          "fo_rl.tools.sample on the HF checkpoint (FP8 sampler)",
          py
          + [
              "fo_rl.tools.sample",
              f"--hf_checkpoint={hf}",
              f"--prompt={PROMPT}",
              "--num_samples=2",
              "--max_new_tokens=8",
              "--weight_dtype=float8_e4m3fn",
          ],
      ),
      (
          "fo_rl.tools.sample on the run's checkpoint",
          py
          + [
              "fo_rl.tools.sample",
              f"--checkpoint={run}",
              f"--prompt={PROMPT}",
              "--max_new_tokens=8",
          ],
      ),
  ]


def _check(name: str, workdir: str, stdout: str) -> str | None:
  """What is missing from a step's output, or None."""
  run = os.path.join(workdir, "run")
  if name.startswith("main job"):
    rows = [json.loads(l) for l in open(os.path.join(run, "metrics.jsonl")) if l.strip()]
    if not any("loss" in r for r in rows):
      return f"{run}/metrics.jsonl has no training row"
    for pattern in ("events.out.tfevents.*", "curves.png", "checkpoints/*"):
      if not glob.glob(os.path.join(run, "**", pattern), recursive=True):
        return f"no {pattern} under {run}"
  elif name == "fo_rl.tools.score":
    logits = np.load(os.path.join(workdir, "logits.npy"))
    if logits.shape[:2] != (2, 6) or not np.isfinite(logits).all():
      return f"logits of shape {logits.shape}, finite: {np.isfinite(logits).all()}"
  elif "logprob" not in stdout and "logp" not in stdout:
    return "no sampled token with its logprob in the output"
  return None


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not FLAGS.workdir:
    raise app.UsageError("--workdir is required")
  workdir = os.path.abspath(FLAGS.workdir)
  os.makedirs(workdir, exist_ok=True)
  write_hf_checkpoint(os.path.join(workdir, "hf"))
  np.save(os.path.join(workdir, "ids.npy"), np.arange(12, dtype=np.int32).reshape(2, 6) + 4)
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
  # The tiny recipe's mesh has an expert axis of 2: on a CPU, ask XLA for 2 devices.
  env.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
  for name, cmd in commands(workdir):
    print(f"+ {shlex.join(cmd)}", flush=True)
    if FLAGS.dry_run:
      continue
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
      print(proc.stdout[-2000:] + proc.stderr[-4000:], file=sys.stderr)
      print(f"smoke: FAILED: {name} (exit status {proc.returncode})", file=sys.stderr)
      return 1
    problem = _check(name, workdir, proc.stdout)
    if problem:
      print(proc.stdout[-2000:], file=sys.stderr)
      print(f"smoke: FAILED: {name}: {problem}", file=sys.stderr)
      return 1
    print(f"smoke: ok: {name}", flush=True)
  print("smoke: every runtime path ran" if not FLAGS.dry_run else "smoke: dry run", flush=True)
  return 0


if __name__ == "__main__":
  app.run(lambda argv: sys.exit(main(argv)))
