"""Cold start: supervised fine-tuning on an imperfect teacher's traces.

The teacher is a programmatic solver whose traces contain a configurable rate of mistakes, or a different
solution style (fo_rl/data/teachers.py), so the cold-started model sits well below the ceiling and RL has
room to improve. The result is checkpointed (in `<workdir>/sft`, or in a shared `sft.cache_dir` keyed by
everything that determines it) and reused on re-runs.
"""

from __future__ import annotations

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
from jax.sharding import NamedSharding, PartitionSpec

from fo_rl import config as config_lib
from fo_rl.checkpoint import Checkpointer, abstract_like
from fo_rl.data import teachers
from fo_rl.model import make_apply
from fo_rl.rl.trainer import token_logprobs


def sft_key(c) -> str:
  """A hash of everything the cold-start result depends on."""
  parts = {
      "model": c.model.to_dict(),
      "sft": c.sft.to_dict(),
      "data": c.data.to_dict(),
      "seed": c.seed,
  }
  if (
      c.data.task != "jsonl"
  ):  # the JSONL files are unused (and keys of earlier cold starts stay valid)
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


def _batches(tokenizer, task, records, c, rng: random.Random, max_len: int):
  B = c.sft.batch_size
  rate = None if c.sft.error_rate < 0 else float(c.sft.error_rate)
  while True:
    toks = np.full((B, max_len), tokenizer.pad_id, np.int32)
    mask = np.zeros((B, max_len), np.float32)
    for b in range(B):
      rec = records[rng.randrange(len(records))]
      resp = teachers.teacher(task.problem(rec), c.sft.teacher, rng, error_rate=rate)
      ids, m = encode_example(tokenizer, task, rec, resp, max_len)
      toks[b, : len(ids)] = ids
      mask[b, : len(m)] = m
    yield toks, mask


def cold_start(
    c, graphdef, params, tokenizer, task, records, workdir: str, log=print, stop=lambda: False
):
  """Returns (params after SFT, info). Reuses a finished cold start when one is on disk.

  `stop()` is polled after every SFT step (run.py: a SIGTERM arrived). When it turns true, the SFT state
  (parameters, optimizer state, step) is saved in `<directory>.partial` and (params, info) returns with
  info["preempted"] = True; the next call resumes SFT from there (same batches, same result)."""
  cache_dir = c.sft.get("cache_dir", "") or ""
  directory = os.path.join(cache_dir, sft_key(c)) if cache_dir else os.path.join(workdir, "sft")
  ckpt = Checkpointer(directory, max_to_keep=1)
  if ckpt.latest_step() is not None:
    params, meta = ckpt.restore(None, abstract_like(params))
    ckpt.close()
    log(f"cold start: reusing {directory} ({meta.get('steps')} SFT steps)")
    return params, dict(meta, reused=True)

  apply = make_apply(graphdef)
  steps = int(c.sft.steps)
  sched = optax.warmup_cosine_decay_schedule(
      0.0, c.sft.learning_rate, c.sft.warmup_steps, steps, c.sft.learning_rate * 0.1
  )
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, weight_decay=0.01))
  opt_state = jax.jit(tx.init)(params)
  # Adam's step counts come out on one device: put them on the parameters' mesh, and keep every output
  # of `step` in its input's sharding, or the second step compiles everything again.
  meshes = [
      x.sharding.mesh for x in jax.tree.leaves(params) if isinstance(x.sharding, NamedSharding)
  ]
  if meshes:
    rep = NamedSharding(meshes[0], PartitionSpec())
    opt_state = jax.tree.map(
        lambda x: x if isinstance(x.sharding, NamedSharding) else jax.device_put(x, rep), opt_state
    )
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

  max_len = int(c.sft.get("max_len", 0) or 0) or 64
  it = _batches(tokenizer, task, records, c, random.Random(c.seed), max_len)
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
          f"({seconds + time.time() - t0:.0f}s, teacher={c.sft.teacher})"
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
      "teacher": c.sft.teacher,
      "key": sft_key(c),
  }
  ckpt.save(0, params, info, force=True)
  ckpt.wait()
  ckpt.close()
  shutil.rmtree(partial.directory, ignore_errors=True)  # the finished cold start supersedes it
  return params, dict(info, reused=False, preempted=False)
