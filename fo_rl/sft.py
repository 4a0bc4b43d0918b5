"""Cold start: supervised fine-tuning on an imperfect teacher's traces.

The teacher is a programmatic solver whose traces contain a configurable rate of mistakes, or a different
solution style (fo_rl/data/teachers.py), so the cold-started model sits well below the ceiling and RL has
room to improve. The result is checkpointed (in `<workdir>/sft`, or in a shared `sft.cache_dir` keyed by
everything that determines it) and reused on re-runs.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
import random
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from fo_rl import config as config_lib
from fo_rl.checkpoint import Checkpointer, abstract_like
from fo_rl.data import teachers
from fo_rl.model import make_apply
from fo_rl.rl.optim import init_opt_state, make_optimizer
from fo_rl.rl.trainer import token_logprobs


def sft_key(rc: config_lib.RunConfig) -> str:
  """A hash of everything the cold-start result depends on: model.*, sft.* (but the cache dir), data.*
  (but the JSONL files when data.task is not jsonl, so keys of earlier cold starts stay valid) and seed,
  as the config's plain data `rc.as_dict`."""
  d = rc.as_dict
  parts = copy.deepcopy(
      {"model": d["model"], "sft": d["sft"], "data": d["data"], "seed": d["seed"]}
  )
  if rc.data.task != "jsonl":
    for f in config_lib.JSONL_OPTIONS:
      parts["data"].pop(f, None)
  parts["sft"].pop("cache_dir", None)
  return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def encode_example(tokenizer, task, record, response: str, max_len: int):
  """(tokens, loss_mask) for prompt + response + EOS; the loss covers the response and its EOS."""
  prompt = tokenizer.encode(task.format_prompt(record), add_bos=True)
  resp = tokenizer.encode(response) + [tokenizer.eos_id]
  ids = (prompt + resp)[:max_len]
  mask = ([0] * len(prompt) + [1] * len(resp))[:max_len]
  return ids, mask


def _batches(tokenizer, task, records, sft: config_lib.SFTConfig, rng: random.Random):
  B, max_len = sft.batch_size, sft.max_len
  while True:
    toks = np.full((B, max_len), tokenizer.pad_id, np.int32)
    mask = np.zeros((B, max_len), np.float32)
    for b in range(B):
      rec = records[rng.randrange(len(records))]
      resp = teachers.teacher(task.problem(rec), sft.teacher, rng, error_rate=sft.error_rate)
      ids, m = encode_example(tokenizer, task, rec, resp, max_len)
      toks[b, : len(ids)] = ids
      mask[b, : len(m)] = m
    yield toks, mask


def cold_start(
    rc: config_lib.RunConfig,
    graphdef,
    params,
    tokenizer,
    task,
    records,
    workdir: str,
    mesh: Mesh | None = None,
    log=print,
    stop=lambda: False,
):
  """Returns (params after SFT, info). Reuses a finished cold start when one is on disk.

  `params` live on `mesh` (None: unsharded); the optimizer (`sft.optim`) and its state are the trainer's
  (fo_rl/rl/optim.py). `stop()` is polled after every SFT step (run.py: a SIGTERM arrived). When it turns
  true, the SFT state (parameters, optimizer state, step) is saved in `<directory>.partial` and
  (params, info) returns with info["preempted"] = True; the next call resumes SFT from there (same
  batches, same result)."""
  sft = rc.sft
  directory = (
      os.path.join(sft.cache_dir, sft_key(rc)) if sft.cache_dir else os.path.join(workdir, "sft")
  )
  ckpt = Checkpointer(directory, max_to_keep=1)
  if ckpt.latest_step() is not None:
    params, meta = ckpt.restore(None, abstract_like(params))
    ckpt.close()
    log(f"cold start: reusing {directory} ({meta.get('steps')} SFT steps)")
    return params, dict(meta, reused=True)

  apply = make_apply(graphdef)
  steps = sft.steps
  tx = make_optimizer(sft.optim)
  opt_state = init_opt_state(tx, params, mesh)
  # Every output of `step` keeps its input's sharding, or the second step compiles everything again.
  shardings = jax.tree.map(lambda x: x.sharding, (params, opt_state))

  @functools.partial(jax.jit, out_shardings=(*shardings, None))
  def step(params, opt_state, toks, mask):
    def loss_fn(p):
      positions = jnp.broadcast_to(jnp.arange(toks.shape[1]), toks.shape)
      logits, _ = apply(p, toks, positions)
      logp = token_logprobs(logits, toks)  # logp[t] = log p(token t | < t)
      return -jnp.sum(logp * mask) / jnp.maximum(jnp.sum(mask), 1.0)

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  it = _batches(tokenizer, task, records, sft, random.Random(rc.seed))
  partial = Checkpointer(directory.rstrip("/") + ".partial", max_to_keep=1)
  first, losses, seconds = 0, [], 0.0
  if partial.latest_step() is not None:  # an SFT preempted earlier: continue it where it stopped
    (params, opt_state), meta = partial.restore(None, abstract_like((params, opt_state)))
    first, losses, seconds = int(meta["step"]), list(meta["losses"]), float(meta["seconds"])
    for _ in range(first):  # the batches it already trained on (host-side only)
      next(it)
    log(f"cold start: resuming SFT at step {first}/{steps} from {partial.directory}")
  t0 = time.time()
  for i in range(first, steps):
    toks, mask = next(it)
    params, opt_state, loss = step(params, opt_state, toks, mask)
    if (i + 1) % max(1, steps // 10) == 0 or i + 1 == steps:
      losses.append(float(loss))
      log(
          f"cold start: SFT step {i + 1}/{steps} loss {losses[-1]:.4f} "
          f"({seconds + time.time() - t0:.0f}s, teacher={sft.teacher})"
      )
    if stop() and i + 1 < steps:
      partial.save(
          i + 1,
          (params, opt_state),
          {"step": i + 1, "losses": losses, "seconds": seconds + time.time() - t0},
          force=True,
      )
      partial.wait()
      partial.close()
      log(f"SIGTERM: saved the cold start at SFT step {i + 1}/{steps} in {partial.directory}")
      return params, {"steps": i + 1, "preempted": True}
  partial.close()
  info = {
      "steps": steps,
      "final_loss": losses[-1],
      "seconds": seconds + time.time() - t0,
      "teacher": sft.teacher,
      "key": sft_key(rc),
  }
  ckpt.save(0, params, info, force=True)
  ckpt.wait()
  ckpt.close()
  shutil.rmtree(partial.directory, ignore_errors=True)  # the finished cold start supersedes it
  return params, dict(info, reused=False, preempted=False)
