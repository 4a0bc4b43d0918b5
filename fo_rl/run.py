"""The main job, top to bottom: data, model, cold start, then the RL loop with evaluation and checkpoints.

Each RL step:  sample G responses per prompt with the quantized sampler -> score with the verifier ->
group advantages -> Trainer.train_step (old-logprob pass + N mini-batch updates, replay per config) ->
sync weights to the sampler. Every `eval.every` steps: held-out greedy accuracy and mean accuracy over
`eval.samples` samples. The workdir holds config.json, metrics.jsonl, tb/, checkpoints/, summary.json and
curves.png; re-running with the same workdir resumes from the newest checkpoint that restores.

Pre-flight: everything that needs no compilation (config, workdir and checkpoint configs, data and
lengths, the HF checkpoint, both meshes against the parameter shapes) is checked before anything is
written; config.json is written once that and any restore succeeded.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import time

import jax
import numpy as np

from fo_rl import config as config_lib
from fo_rl.checkpoint import (
    Checkpointer,
    CheckpointMismatchError,
    list_steps,
    move_aside,
    restore_train_bundle,
    train_bundle,
)
from fo_rl.common import SignalFlag, UserError, flatten
from fo_rl.data import chat_template as chat_lib
from fo_rl.data import eval_sets as eval_sets_lib
from fo_rl.data import get_task, verifiers
from fo_rl.data.tasks import JsonlTask
from fo_rl.data.tokenizer import HFTokenizer, Tokenizer
from fo_rl.metrics_writer import MetricsWriter, read_metrics
from fo_rl.model import init_model
from fo_rl.model.init import abstract_model
from fo_rl.parallel.multihost import host_get
from fo_rl.parallel.sharding import make_mesh, state_shardings
from fo_rl.plots import plot_curves
from fo_rl.rl.advantages import group_advantages, resolve_advantage
from fo_rl.rl.rollouts import Rollouts
from fo_rl.rl.trainer import Trainer
from fo_rl.sampler import Sampler, SamplingParams
from fo_rl.sft import LENGTH_SAMPLE, check_lengths, cold_start

# Fields a resumed run may change: they alter neither what was computed nor what a step computes
# (rl.steps: how many steps; trainer.*: how a mini-batch runs; parallel.*: the checkpoint is restored
# into the new meshes).
RESUMABLE_CHANGES = ("rl.steps", "eval.", "checkpoint.", "parallel.", "trainer.")


def _comparable(d: dict) -> dict:
  """A config's fields as a resume compares them: flat, and `rl.advantage=auto` as the mode it stands
  for (a workdir started with 'mean' before 'auto' existed ran what 'auto' runs for minirl)."""
  flat = flatten(d, ".")
  if flat.get("rl.advantage") == "auto":
    try:
      flat["rl.advantage"] = resolve_advantage("auto", flat.get("rl.loss.name", "minirl"))
    except ValueError:
      pass
  return flat


def _config_changes(old: dict, new: dict) -> tuple[list[str], list[str]]:
  """(changed fields a resume may not change, changed fields it may: RESUMABLE_CHANGES), as
  `field: old -> new` for the allowed ones. A field the old config lacks (added to fo_rl since the
  workdir was started) counts as unchanged at its default: a new field's default is the behaviour of
  before it existed."""
  a, b = _comparable(old), _comparable(new)
  defaults = flatten(config_lib.base_config().to_dict(), ".")
  diff = sorted(
      k
      for k in set(a) | set(b)
      if a.get(k) != b.get(k) and not (k not in a and k in defaults and b.get(k) == defaults[k])
  )
  allowed = [k for k in diff if any(k.startswith(p) for p in RESUMABLE_CHANGES)]
  refused = [k for k in diff if k not in allowed]
  return refused, [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in allowed]


def _check_config(rc: config_lib.RunConfig, workdir: str, log=None) -> dict:
  """The config as JSON (`rc.as_dict`); resuming with a different config is an error unless only
  harmless fields changed (those are logged). Checkpoints without config.json are refused too. Reads
  only: a rejected run leaves the workdir as it was."""
  path = os.path.join(workdir, "config.json")
  new = rc.as_dict
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    refused, allowed = _config_changes(old, new)
    if refused:
      raise UserError(
          f"{path}: this workdir was started with a different config ({refused[:5]} "
          f"differ); use a new --workdir or the same config"
      )
    if allowed and log is not None:
      log(f"resuming {workdir} with changed fields (allowed on resume): " + "; ".join(allowed))
  elif list_steps(os.path.join(workdir, "checkpoints")):
    raise UserError(
        f"{workdir}/checkpoints holds checkpoints but {path} is missing: the config they were "
        f"trained with is unknown; restore config.json or use a new --workdir"
    )
  return new


def _check_checkpoint_config(rc: config_lib.RunConfig, ckpt_dir: str) -> None:
  """The resume guard that does not depend on config.json: the config saved in the newest readable
  checkpoint's meta (run() puts it in every one) must match, but for RESUMABLE_CHANGES. Reads only.
  """
  for step in reversed(list_steps(ckpt_dir)):
    ckpt = Checkpointer(ckpt_dir, max_to_keep=None, read_only=True)
    try:
      meta = ckpt.read_meta(step)
    except Exception:  # noqa: BLE001 - unreadable: the restore falls back past it, and says why
      continue
    finally:
      ckpt.close()
    if "config" not in meta:  # written before checkpoints carried their config
      return
    refused, _ = _config_changes(meta["config"], rc.as_dict)
    if refused:
      raise UserError(
          f"{ckpt_dir}/{step}: this checkpoint was trained with a different config ({refused[:5]} "
          f"differ); use a new --workdir or the same config"
      )
    return


def _preflight_data(rc: config_lib.RunConfig, tokenizer, task, log):
  """(train records, test records), checked: data errors (file and line), eval.num_prompts against the
  test split, prompts longer than sampler.max_prompt_len."""
  data_dir = rc.data.data_dir or None
  try:
    train_records = task.load("train", data_dir)
  except (ValueError, OSError) as e:
    raise UserError(str(e)) from None
  try:
    test_records = task.load("test", data_dir, num_examples=rc.eval.num_prompts)
  except (ValueError, OSError) as e:
    prefix = f"eval.num_prompts={rc.eval.num_prompts}: " if "asked for" in str(e) else ""
    raise UserError(prefix + str(e)) from None
  for split, records, path in (
      ("train", train_records, rc.data.train_file),
      ("test", test_records, rc.data.test_file),
  ):
    n = len(records) if rc.data.task == "jsonl" else min(len(records), LENGTH_SAMPLE)
    _check_prompt_lengths(rc, tokenizer, task, records, n, split, path)
  return train_records, test_records


def _check_prompt_lengths(rc, tokenizer, task, records, n, split, path) -> None:
  """The first `n` prompts of `records` fit sampler.max_prompt_len (a chat template's error: a UserError
  naming the template file)."""
  limit = rc.max_prompt_len
  for i in range(n):
    rec = records[i]
    try:
      text = task.format_prompt(rec)
    except ValueError as e:  # the chat template's error names its file
      raise UserError(f"data.chat_template: {e}") from None
    length = len(tokenizer.encode(text, add_bos=True))
    if length > limit:
      where = (
          f"{path}, line {rec['line']}" if "line" in rec else f"{rc.data.task} {split} example {i}"
      )
      raise UserError(
          f"sampler.max_prompt_len={limit}: {where}: the prompt has {length} tokens (BOS and "
          f"template included); shorten it or raise sampler.max_prompt_len"
      )


def _chat_task(rc: config_lib.RunConfig, task, hf_dir: str, log):
  """(task, template): the task with its prompts rendered through the chat template data.chat_template
  asks for (auto: the HF checkpoint's, when it has one), or the task itself and None."""
  try:
    template = chat_lib.resolve(rc.data.chat_template, hf_dir or None)
  except ValueError as e:
    raise UserError(f"data.chat_template={rc.data.chat_template!r}: {e}") from None
  if template is None:
    return task, None
  log(f"prompts go through the chat template of {template.source}")
  return (
      chat_lib.ChatTask(task, template, rc.data.system_prompt, rc.data.template_kwargs()),
      template,
  )


def load_eval_sets(rc: config_lib.RunConfig, tokenizer, template) -> list:
  """[(name, task, records)] of eval.files: each file read with data.prompt_field / answer_field /
  verifier, its prompts rendered as training renders them and checked against sampler.max_prompt_len.
  """
  sets = []
  for name, path in rc.eval.file_sets():
    task = JsonlTask(
        prompt_field=rc.data.prompt_field,
        answer_field=rc.data.answer_field,
        verifier=rc.data.verifier,
        verifier_timeout=rc.data.verifier_timeout,
        name=name,
    )
    try:
      records = task.load_file(path)
    except (ValueError, OSError) as e:
      raise UserError(f"eval.files: {e}") from None
    if template is not None:
      task = chat_lib.ChatTask(task, template, rc.data.system_prompt, rc.data.template_kwargs())
    _check_prompt_lengths(rc, tokenizer, task, records, len(records), f"eval set {name}", path)
    sets.append((name, task, records))
  return sets


def evaluate_sets(sampler, tokenizer, sets, sampling: SamplingParams, samples: int, seed) -> dict:
  """Per eval set: avg@k, pass@j and the mean response length (fo_rl/data/eval_sets.py) from
  k = `samples` samples of every problem, and the verifier's timeouts."""
  out = {}
  for i, (name, task, records) in enumerate(sets):
    rollout = Rollout(sampler, tokenizer, task, samples)
    res, rewards = rollout.sample(records, sampling, samples, jax.random.fold_in(seed, i + 1))
    lengths, eos = host_get((res.lengths, res.finished_eos))
    generated = np.asarray(lengths, np.int64) - np.asarray(eos, np.int64)
    shape = (len(records), samples)
    out.update(eval_sets_lib.summarize(name, rewards.reshape(shape), generated.reshape(shape)))
    out[f"eval/{name}/verifier_timeouts"] = rollout.last_timeouts
  return out


def _preflight_mesh(rc: config_lib.RunConfig):
  """(trainer mesh, sampler mesh): both divide every sharded parameter dimension (abstract shapes:
  nothing is allocated or compiled)."""
  mesh = make_mesh(rc.parallel.mesh, where="parallel.mesh")
  sampler_mesh = make_mesh(rc.parallel.sampler_mesh, where="parallel.sampler_mesh")
  _, abstract = abstract_model(rc.model, None, rc.parallel.rules)
  for name, m, value in (
      ("parallel.mesh", mesh, rc.parallel.mesh),
      ("parallel.sampler_mesh", sampler_mesh, rc.parallel.sampler_mesh),
  ):
    try:
      state_shardings(abstract, m, rc.parallel.rules)
    except ValueError as e:
      raise UserError(f"{name}={value}: {e}") from None
  return mesh, sampler_mesh


def _check_hf(directory: str, rc: config_lib.RunConfig) -> None:
  """init.hf_checkpoint: an existing directory whose config.json describes the architecture in
  model.* (the fields fo_rl adds: dtype, remat, ... come from model.*)."""
  from fo_rl.model.hf import load_hf_config

  if not os.path.isdir(directory):
    raise UserError(f"init.hf_checkpoint={directory!r}: no such directory")
  try:
    theirs = load_hf_config(directory)
  except ValueError as e:
    raise UserError(f"init.hf_checkpoint={directory!r}: {e}") from None
  ours = rc.model.RUNTIME_FIELDS
  differ = [
      f for f in theirs.to_dict() if f not in ours and getattr(theirs, f) != getattr(rc.model, f)
  ]
  if differ:
    raise UserError(
        f"init.hf_checkpoint={directory!r}: its config.json differs from model.* in "
        + ", ".join(f"{f} ({getattr(theirs, f)!r} vs {getattr(rc.model, f)!r})" for f in differ)
    )


def _cause(e: BaseException) -> str:
  """One line: the exception's type and the first line of its message (at most 200 characters)."""
  first = (str(e).strip().splitlines() or [""])[0]
  return f"{type(e).__name__}: {first[:200]}"


def _restore_newest_intact(ckpt_dir: str, max_to_keep, target, log):
  """(Checkpointer, step, state, rng, meta): the newest step of `ckpt_dir` that restores. A step that
  does not is named with its cause in one line and moved aside (into `<ckpt_dir>.corrupt/`, nothing
  deleted) once an older one restored, so the run continues from there and saves its steps again.
  None of them restoring is a UserError naming the newest and its cause."""
  ckpt = Checkpointer(ckpt_dir, max_to_keep=max_to_keep)
  bad = []
  for step in sorted(ckpt.all_steps(), reverse=True):
    try:
      state, rng, meta = restore_train_bundle(ckpt, step, target)
    except CheckpointMismatchError:
      if not bad:  # the newest step does not match the model: not damage, the config differs
        ckpt.close()
        raise
      bad.append((step, "does not match the model"))
      continue
    except Exception as e:  # noqa: BLE001 - a damaged step: say which and why, try the previous one
      log(f"checkpoint {ckpt_dir}/{step} cannot be restored ({_cause(e)})")
      bad.append((step, _cause(e)))
      continue
    if bad:
      ckpt.close()
      moved = [move_aside(os.path.join(ckpt_dir, str(b)), ckpt_dir + ".corrupt") for b, _ in bad]
      if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("fo_rl.run: corrupt checkpoints moved aside")
      log(
          f"falling back to checkpoint step {step}, the newest intact one; moved the unreadable "
          f"step(s) to {', '.join(moved)}"
      )
      ckpt = Checkpointer(ckpt_dir, max_to_keep=max_to_keep)
    return ckpt, step, state, rng, meta
  ckpt.close()
  step, cause = bad[0]
  raise UserError(
      f"checkpoint {ckpt_dir}/{step} cannot be restored ({cause}), nor can any older step "
      f"({[b for b, _ in bad[1:]]}); use a new --workdir or remove {ckpt_dir}"
  )


def _write_config(rc: config_lib.RunConfig, workdir: str) -> None:
  """config.json (after _check_config), once the pre-flight and any restore succeeded."""
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
    self.last_timeouts = 0  # answers of the last sample() that ran out of the verifier's time

  def prompts(self, records):
    return [self.tok.encode(self.task.format_prompt(r), add_bos=True) for r in records]

  def sample(self, records, sampling: SamplingParams, samples: int, seed):
    prompt_ids = [p for p in self.prompts(records) for _ in range(samples)]  # prompt-major
    out = self.sampler.generate(prompt_ids, sampling, seed)
    tokens, lengths, eos, nonfinite = host_get(
        (out.tokens, out.lengths, out.finished_eos, out.logp_nonfinite)
    )  # all rows, every host
    # The non-finite-logp flag on the host: Rollouts.from_sample checks it without a device read.
    out = dataclasses.replace(out, logp_nonfinite=nonfinite)
    rewards = np.zeros(len(prompt_ids), np.float32)
    timeouts_before = verifiers.verifier_timeouts()
    for i in range(len(prompt_ids)):
      n = int(lengths[i]) - int(eos[i])  # drop the EOS token itself
      text = self.tok.decode([int(t) for t in tokens[i, :n]])
      rewards[i] = self.task.verify(text, records[i // samples])
    self.last_timeouts = verifiers.verifier_timeouts() - timeouts_before
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
  from fo_rl.model.hf import load_hf_checkpoint

  _check_hf(directory, rc)
  over = {f: getattr(rc.model, f) for f in rc.model.RUNTIME_FIELDS}
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

  # ---- pre-flight: every check that needs no compilation; nothing is written -------------------
  ckpt_dir = os.path.join(workdir, "checkpoints")
  _check_config(rc, workdir, log)
  _check_checkpoint_config(rc, ckpt_dir)
  resuming = bool(list_steps(ckpt_dir))
  hf_dir = rc.init.hf_checkpoint
  if hf_dir:  # a pretrained model: its weights and its tokenizer
    _check_hf(hf_dir, rc)
    try:
      tokenizer = HFTokenizer(hf_dir)
    except (ValueError, OSError) as e:
      raise UserError(f"init.hf_checkpoint={hf_dir!r}: {e}") from None
    if tokenizer.eos_id is None:
      raise UserError(
          f"init.hf_checkpoint={hf_dir!r}: no eos_token_id in its config.json or "
          f"generation_config.json (sampling stops at EOS)"
      )
  elif rc.data.tokenizer:
    if not os.path.isfile(rc.data.tokenizer):
      raise UserError(f"data.tokenizer={rc.data.tokenizer!r}: no such file (a SentencePiece model)")
    tokenizer = Tokenizer(rc.data.tokenizer)
  else:
    tokenizer = Tokenizer.default()
  if rc.model.vocab_size < tokenizer.vocab_size:
    raise UserError(
        f"model.vocab_size={rc.model.vocab_size} is smaller than the tokenizer's "
        f"{tokenizer.vocab_size}"
    )
  task = get_task(rc.data.task, **rc.data.task_options())
  task, template = _chat_task(rc, task, hf_dir, log)
  train_records, test_records = _preflight_data(rc, tokenizer, task, log)
  eval_sets = load_eval_sets(rc, tokenizer, template)
  if rc.sft.enabled and not resuming:
    check_lengths(rc, tokenizer, task, train_records, log)
  mesh, sampler_mesh = _preflight_mesh(rc)
  sampling = SamplingParams(
      temperature=rc.sampling.temperature,
      max_new_tokens=rc.sampling.max_new_tokens,
      eos_ids=(tokenizer.eos_id,),
  )

  rules = rc.parallel.rules
  graphdef, params = (
      load_pretrained(hf_dir, rc, mesh) if hf_dir else init_model(rc.model, mesh, rules, rc.seed)
  )
  trainer = Trainer(graphdef, rc.model, rc.trainer, mesh, rules)

  # ---- resume (the newest intact checkpoint), then config.json, or a cold start -----------------
  state = trainer.init_state(params)
  rng = jax.random.key(rc.seed)
  latest = None
  if resuming:
    ckpt, latest, state, rng, meta = _restore_newest_intact(
        ckpt_dir, rc.checkpoint.max_to_keep, train_bundle(state, rng, mesh), log
    )
  os.makedirs(workdir, exist_ok=True)
  _write_config(rc, workdir)
  if not resuming:
    ckpt = Checkpointer(ckpt_dir, max_to_keep=rc.checkpoint.max_to_keep)
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
    log(f"resuming from {workdir}/checkpoints step {latest}")
  meta["config"] = rc.as_dict  # in every checkpoint: the resume guard (_check_checkpoint_config)

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
    if eval_sets:
      sets = evaluate_sets(sampler, tokenizer, eval_sets, sampling, rc.eval.samples, eval_rng)
      meta["eval_sets"] = dict(sets, step=step)
      m.update(sets)
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
          tokens_per_second=n_tokens / (time.time() - t0),
          step_seconds=time.time() - t0,
          verifier_timeouts=rollout.last_timeouts,
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
  if meta.get("eval_sets"):  # eval.files: the last evaluation of each set (its step included)
    summary["eval_sets"] = meta["eval_sets"]
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "summary.json"), "w") as f:
      json.dump(summary, f, indent=2)
    if rows:
      plot_curves(rows, os.path.join(workdir, "curves.png"))
  return summary
