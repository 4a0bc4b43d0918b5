"""The main job, top to bottom: data, model, cold start, then the RL loop with evaluation and checkpoints.

Each RL step:  sample G responses per prompt with the quantized sampler -> score with the verifier ->
group advantages -> Trainer.train_step (old-logprob pass + N mini-batch updates, replay per config) ->
sync weights to the sampler. Every `eval.every` steps: held-out greedy accuracy and mean accuracy over
`eval.samples` samples. The workdir holds config.json, metrics.jsonl, tb/, checkpoints/, summary.json and
curves.png; re-running with the same workdir resumes from the latest checkpoint.
"""

from __future__ import annotations

import json
import os
import signal
import time

import jax
import numpy as np

from fo_rl import config as config_lib
from fo_rl.checkpoint import Checkpointer, restore_train_bundle, train_bundle
from fo_rl.common import SignalFlag, flatten
from fo_rl.data import get_task
from fo_rl.data.tokenizer import HFTokenizer, Tokenizer
from fo_rl.metrics_writer import MetricsWriter, read_metrics
from fo_rl.model import init_model
from fo_rl.parallel.multihost import host_get
from fo_rl.parallel.sharding import make_mesh
from fo_rl.plots import plot_curves
from fo_rl.rl.advantages import group_advantages
from fo_rl.rl.rollouts import Rollouts
from fo_rl.rl.trainer import Trainer
from fo_rl.sampler import Sampler, SamplingParams
from fo_rl.sft import cold_start

# Fields a resumed run may change (they do not alter what was already computed).
RESUMABLE_CHANGES = ("rl.steps", "eval.", "checkpoint.")


def _check_config(rc: config_lib.RunConfig, workdir: str) -> dict:
  """The config as JSON (`rc.as_dict`); resuming with a different config is an error unless only
  harmless fields changed. Reads only: a rejected run leaves the workdir as it was."""
  path = os.path.join(workdir, "config.json")
  new = rc.as_dict
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    a, b = flatten(old, "."), flatten(new, ".")
    changed = sorted(
        k
        for k in set(a) | set(b)
        if a.get(k) != b.get(k) and not any(k.startswith(p) for p in RESUMABLE_CHANGES)
    )
    if changed:
      raise ValueError(
          f"{path}: this workdir was started with a different config ({changed[:5]} "
          f"differ); use a new --workdir or the same config"
      )
  return new


def _write_config(rc: config_lib.RunConfig, workdir: str) -> None:
  """config.json (after _check_config)."""
  path = os.path.join(workdir, "config.json")
  new = _check_config(rc, workdir)
  if jax.process_index() == 0:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      json.dump(new, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


class Rollout:
  """Prompts -> samples -> rewards, shared by training and evaluation."""

  def __init__(self, sampler: Sampler, tokenizer, task, group_size: int):
    self.sampler, self.tok, self.task, self.G = sampler, tokenizer, task, group_size

  def prompts(self, records):
    return [self.tok.encode(self.task.format_prompt(r), add_bos=True) for r in records]

  def sample(self, records, sampling: SamplingParams, samples: int, seed):
    prompt_ids = [p for p in self.prompts(records) for _ in range(samples)]  # prompt-major
    out = self.sampler.generate(prompt_ids, sampling, seed)
    tokens, lengths, eos = host_get(
        (out.tokens, out.lengths, out.finished_eos)
    )  # all rows, every host
    rewards = np.zeros(len(prompt_ids), np.float32)
    for i in range(len(prompt_ids)):
      n = int(lengths[i]) - int(eos[i])  # drop the EOS token itself
      text = self.tok.decode([int(t) for t in tokens[i, :n]])
      rewards[i] = self.task.verify(text, records[i // samples])
    return out, rewards

  def evaluate(self, records, sampling: SamplingParams, samples: int, seed) -> dict[str, float]:
    greedy = SamplingParams(
        temperature=0.0, max_new_tokens=sampling.max_new_tokens, eos_ids=sampling.eos_ids
    )
    _, r_greedy = self.sample(records, greedy, 1, seed)
    _, r_samp = self.sample(records, sampling, samples, seed)
    return {
        "eval/greedy_accuracy": float(r_greedy.mean()),
        "eval/mean_accuracy": float(r_samp.mean()),
    }


def load_pretrained(directory: str, rc, mesh):
  """(graphdef, params) of the Hugging Face checkpoint `init.hf_checkpoint`, each parameter created in its
  sharding (every host reads the tensors it needs). Its config.json must describe the architecture in
  model.* (the fields fo_rl adds: dtype, remat, ... come from model.*)."""
  from fo_rl.model.hf import load_hf_checkpoint, load_hf_config

  ours = rc.model.RUNTIME_FIELDS
  theirs = load_hf_config(directory)
  differ = [
      f for f in theirs.to_dict() if f not in ours and getattr(theirs, f) != getattr(rc.model, f)
  ]
  if differ:
    raise ValueError(
        f"init.hf_checkpoint={directory!r}: its config.json differs from model.* in "
        + ", ".join(f"{f} ({getattr(theirs, f)!r} vs {getattr(rc.model, f)!r})" for f in differ)
    )
  over = {f: getattr(rc.model, f) for f in ours}
  _, graphdef, params = load_hf_checkpoint(directory, mesh=mesh, rules=rc.parallel.rules, **over)
  return graphdef, params


class SkippedUpdatesError(RuntimeError):
  """`rl.max_skipped_steps` consecutive RL steps had every update skipped for a non-finite loss or
  gradient: the run no longer trains."""


def _fmt_eta(seconds: float) -> str:
  m, s = divmod(int(max(seconds, 0)), 60)
  return f"{m}m{s:02d}s"


def run(c, workdir: str, log=print) -> dict:
  """Run (or resume) the job described by ConfigDict `c` in `workdir`; returns the summary. Everything
  below reads the typed view `rc = config.parse(c)`."""
  t_start = time.time()
  rc = config_lib.parse(c, jax.device_count())
  _check_config(rc, workdir)

  # ---- data, tokenizer, model (bad data is an error before anything is written) ----------------
  hf_dir = rc.init.hf_checkpoint
  if hf_dir:  # a pretrained model: its weights and its tokenizer
    tokenizer = HFTokenizer(hf_dir)
    if tokenizer.eos_id is None:
      raise ValueError(
          f"init.hf_checkpoint={hf_dir!r}: no eos_token_id in its config.json or "
          f"generation_config.json (sampling stops at EOS)"
      )
  else:
    tokenizer = Tokenizer(rc.data.tokenizer) if rc.data.tokenizer else Tokenizer.default()
  if rc.model.vocab_size < tokenizer.vocab_size:
    raise ValueError(
        f"model.vocab_size={rc.model.vocab_size} is smaller than the tokenizer's "
        f"{tokenizer.vocab_size}"
    )
  task = get_task(rc.data.task, **rc.data.task_options())
  data_dir = rc.data.data_dir or None
  train_records = task.load("train", data_dir)
  test_records = task.load("test", data_dir, num_examples=rc.eval.num_prompts)
  os.makedirs(workdir, exist_ok=True)
  _write_config(rc, workdir)
  sampling = SamplingParams(
      temperature=rc.sampling.temperature,
      max_new_tokens=rc.sampling.max_new_tokens,
      eos_ids=(tokenizer.eos_id,),
  )

  mesh = make_mesh(rc.parallel.mesh, where="parallel.mesh")
  sampler_mesh = make_mesh(rc.parallel.sampler_mesh, where="parallel.sampler_mesh")
  rules = rc.parallel.rules
  graphdef, params = (
      load_pretrained(hf_dir, rc, mesh) if hf_dir else init_model(rc.model, mesh, rules, rc.seed)
  )
  trainer = Trainer(graphdef, rc.model, rc.trainer, mesh, rules)

  # ---- resume or cold start --------------------------------------------------------------------
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=rc.checkpoint.max_to_keep)
  latest = ckpt.latest_step()
  state = trainer.init_state(params)
  rng = jax.random.key(rc.seed)
  # SIGTERM (preemption) from here on: SFT saves its progress, the step-0 eval and the RL loop checkpoint.
  preempt = SignalFlag((signal.SIGTERM,))
  if latest is None:
    if rc.sft.enabled:
      params, sft_info = cold_start(
          rc,
          graphdef,
          params,
          tokenizer,
          task,
          train_records,
          workdir,
          mesh=mesh,
          log=log,
          stop=preempt,
      )
      if sft_info.get("preempted"):
        preempt.restore()
        return _finish(
            workdir,
            {"cold_start_accuracy": None, "best_accuracy": None, "step": 0},
            0.0,
            t_start,
            preempted=True,
        )
      state = trainer.init_state(params)
    meta = {
        "step": 0,
        "data_position": 0,
        "cold_start_accuracy": None,
        "best_accuracy": None,
        "wall_seconds": 0.0,
    }
  else:
    state, rng, meta = restore_train_bundle(ckpt, latest, train_bundle(state, rng, mesh))
    log(f"resuming from {workdir}/checkpoints step {latest}")

  sampler = Sampler(rc.model, rc.sampler, sampler_mesh)
  sampler.update_weights(state.params)
  rollout = Rollout(sampler, tokenizer, task, rc.rl.group_size)
  writer = MetricsWriter(workdir, resume_step=meta["step"])
  order = np.random.default_rng(rc.seed).permutation(len(train_records))

  def evaluate(step):
    eval_rng = jax.random.fold_in(
        jax.random.fold_in(rng, 2**31 - 1), step
    )  # disjoint from training's
    m = rollout.evaluate(test_records, sampling, rc.eval.samples, eval_rng)
    acc = m["eval/mean_accuracy"]
    if meta["best_accuracy"] is None or acc > meta["best_accuracy"]:
      meta["best_accuracy"] = acc
    return m

  if meta["step"] == 0 and meta["cold_start_accuracy"] is None:
    m0 = evaluate(0)
    meta["cold_start_accuracy"] = m0["eval/mean_accuracy"]
    meta["cold_start_greedy_accuracy"] = m0["eval/greedy_accuracy"]
    writer.write(0, m0)
    log(
        f"cold start: held-out accuracy {m0['eval/mean_accuracy']:.3f} "
        f"(greedy {m0['eval/greedy_accuracy']:.3f})"
    )
    if preempt.flag:  # SIGTERM during the cold start's eval: keep the cold start and its accuracy
      meta["wall_seconds"] = time.time() - t_start
      ckpt.save(0, train_bundle(state, rng, mesh), meta, force=True)
      log("SIGTERM: checkpointed step 0 (the cold start), exiting")

  # ---- RL loop ---------------------------------------------------------------------------------
  P, G, steps = rc.rl.prompts_per_step, rc.rl.group_size, rc.rl.steps
  t_loop, first_step = time.time(), meta["step"]
  wall_before = float(meta.get("wall_seconds", 0.0))
  last_eval = {}
  N, max_skipped = rc.rl.mini_batches, rc.rl.max_skipped_steps
  fully_skipped = 0  # consecutive RL steps whose every update was skipped (non-finite)
  try:
    last = meta["step"] if preempt.flag else steps  # SIGTERM during the step-0 eval: no RL step
    for step in range(meta["step"], last):
      t0 = time.time()
      pos = meta["data_position"]
      records = [train_records[int(order[(pos + i) % len(order)])] for i in range(P)]
      out, rewards = rollout.sample(records, sampling, G, jax.random.fold_in(rng, step))
      adv = group_advantages(rewards, G, rc.rl.advantage)
      state, m = trainer.train_step(state, Rollouts.from_sample(out, adv))
      sampler.update_weights(state.params)
      meta["data_position"] = pos + P
      meta["step"] = step + 1
      n_tokens = float(np.asarray(host_get(out.lengths)).sum())
      m.update(
          reward_mean=float(rewards.mean()),
          accuracy=float(rewards.mean()),
          tokens_per_second=n_tokens / (time.time() - t0),
          step_seconds=time.time() - t0,
      )
      if (step + 1) % rc.eval.every == 0 or step + 1 == steps:
        last_eval = evaluate(step + 1)
        m.update(last_eval)
      writer.write(step + 1, m)
      done = step + 1 - first_step
      eta = (time.time() - t_loop) / done * (steps - step - 1)
      log(
          f"step {step + 1}/{steps} reward {m['reward_mean']:.3f} "
          f"acc {last_eval.get('eval/mean_accuracy', float('nan')):.3f} "
          f"kl {m['train_infer_kl']:.2e} entropy {m['entropy']:.3f} "
          f"skipped {m['skipped_steps']}/{N} "
          f"tok/s {m['tokens_per_second']:.0f} ETA {_fmt_eta(eta)}"
      )
      fully_skipped = fully_skipped + 1 if m["skipped_steps"] == N else 0
      if max_skipped and fully_skipped >= max_skipped:
        # Every update of these steps was a no-op: stop before checkpointing this one. The metrics
        # written so far stay, and so do the checkpoints already saved (the last one finalized here).
        ckpt.wait()
        latest = ckpt.latest_step()
        raise SkippedUpdatesError(
            f"rl.max_skipped_steps={max_skipped}: every update of the last {fully_skipped} RL "
            f"steps ({step + 2 - fully_skipped}..{step + 1}) was skipped for a non-finite loss or "
            f"gradient (skipped_steps_total {m['skipped_steps_total']}); stopped. metrics.jsonl "
            f"holds steps up to {step + 1}; "
            + ("no checkpoint yet" if latest is None else f"the last checkpoint is step {latest}")
            + " (rl.max_skipped_steps=0 never stops)"
        )
      if (step + 1) % rc.checkpoint.every == 0 or step + 1 == steps or preempt.flag:
        meta["wall_seconds"] = wall_before + time.time() - t_start
        ckpt.save(step + 1, train_bundle(state, rng, mesh), meta, force=True)
      if preempt.flag:
        log(f"SIGTERM: checkpointed step {step + 1}, exiting")
        break
  finally:
    preempt.restore()
    ckpt.wait()
    ckpt.close()
    writer.close()

  return _finish(workdir, meta, wall_before, t_start, preempted=preempt.flag)


def _finish(workdir: str, meta: dict, wall_before: float, t_start: float, preempted: bool) -> dict:
  """Writes summary.json and curves.png (process 0) and returns the summary."""
  rows = read_metrics(workdir)
  evals = [r for r in rows if "eval/mean_accuracy" in r]
  summary = {
      "cold_start_accuracy": meta["cold_start_accuracy"],
      "cold_start_greedy_accuracy": meta.get("cold_start_greedy_accuracy"),
      "final_accuracy": evals[-1]["eval/mean_accuracy"] if evals else None,
      "final_greedy_accuracy": evals[-1]["eval/greedy_accuracy"] if evals else None,
      "best_accuracy": meta["best_accuracy"],
      "steps": meta["step"],
      "wall_seconds": wall_before + time.time() - t_start,  # summed over resumed sessions
      "preempted": bool(preempted),
  }
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "summary.json"), "w") as f:
      json.dump(summary, f, indent=2)
    if rows:
      plot_curves(rows, os.path.join(workdir, "curves.png"))
  return summary
