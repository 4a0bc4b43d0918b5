"""Cold start: supervised fine-tuning on an imperfect teacher's traces.

The teacher is a programmatic solver whose traces contain a configurable rate of mistakes, or a different
solution style (fo_rl/data/teachers.py), so the cold-started model sits well below the ceiling and RL has
room to improve. The result is checkpointed (in `<workdir>/sft`, or in a shared `sft.cache_dir` keyed by
everything that determines it) and reused on re-runs; a cached cold start that cannot be read is moved
aside (`<dir>.corrupt-<time>`, nothing deleted) and computed again.

Length: an example (BOS + prompt + response + EOS) longer than `sft.max_len` is truncated by
`sft.truncate` ("left": prompt tokens go first, the response is kept; "right": the first `max_len`
tokens). `check_lengths` (run.py's pre-flight) measures the fraction of response tokens that survive and
refuses a cold start that would train on too little (`sft.min_kept_fraction`).
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
from fo_rl.checkpoint import Checkpointer, abstract_like, move_aside
from fo_rl.common import UserError
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
  # Fields added later stay out of the key at their defaults.
  for f, default in config_lib.DATA_DEFAULTS_ADDED.items():
    if parts["data"].get(f) == default:
      parts["data"].pop(f)
  # Not in the key (cold starts cached before these fields existed stay valid): the pre-flight threshold,
  # and the default truncation policy ("left" and the former "right" give the same examples whenever
  # every example fits sft.max_len, which the default recipes' data does).
  parts["sft"].pop("min_kept_fraction", None)
  if parts["sft"].get("truncate") == "left":
    parts["sft"].pop("truncate", None)
  # model.attention_impl=auto runs `reference` at cold-start lengths, as before the field existed, and
  # model.logits_chunk=0 is the whole-logits path of before.
  if parts["model"].get("attention_impl") == "auto":
    parts["model"].pop("attention_impl")
  if parts["model"].get("logits_chunk") == 0:
    parts["model"].pop("logits_chunk")
  return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def truncate_example(prompt: list, resp: list, max_len: int, truncate: str = "left"):
  """(tokens, loss_mask) of prompt + resp cut to at most `max_len` tokens; the mask covers `resp`.

  "left": whole while it fits; else prompt tokens are dropped from the left (the response starts with
  as much prompt context as fits, at least its last token), and a response longer than
  `max_len - 1` keeps its first `max_len - 1` tokens. "right": the first `max_len` tokens."""
  if truncate == "left" and len(prompt) + len(resp) > max_len:
    keep = max(1, max_len - len(resp))
    prompt, resp = prompt[-keep:], resp[: max_len - keep]
  elif truncate not in ("left", "right"):
    raise ValueError(f"truncate={truncate!r}: must be 'left' or 'right'")
  ids = (prompt + resp)[:max_len]
  mask = ([0] * len(prompt) + [1] * len(resp))[:max_len]
  return ids, mask


def encode_example(tokenizer, task, record, response: str, max_len: int, truncate: str = "left"):
  """(tokens, loss_mask) for BOS + prompt + response + EOS cut to `max_len` (`truncate_example`); the
  loss covers the response and its EOS."""
  prompt = tokenizer.encode(task.format_prompt(record), add_bos=True)
  resp = tokenizer.encode(response) + [tokenizer.eos_id]
  return truncate_example(prompt, resp, max_len, truncate)


LENGTH_SAMPLE = 512  # training examples check_lengths encodes (all of them when there are fewer)


def check_lengths(rc: config_lib.RunConfig, tokenizer, task, records, log=print) -> dict:
  """Pre-flight of the cold start's lengths: encodes the teacher's response to the first
  `LENGTH_SAMPLE` training records (with its own RNG: the training batches are untouched) and measures
  the fraction of response tokens (EOS included) that `sft.max_len` / `sft.truncate` keep.

  Returns {"kept_fraction", "truncated" (examples cut), "examples", "longest"}; a kept fraction below
  `sft.min_kept_fraction` is a UserError naming sft.max_len and the first example whose response is cut
  the most (its file and line for data.task=jsonl)."""
  sft = rc.sft
  rng = random.Random(rc.seed)
  n = min(len(records), LENGTH_SAMPLE)
  kept = total = truncated = longest = 0
  worst = None  # (lost fraction, index, prompt length, response length)
  for i in range(n):
    rec = records[i]
    prompt = tokenizer.encode(task.format_prompt(rec), add_bos=True)
    resp = tokenizer.encode(
        teachers.teacher(task.problem(rec), sft.teacher, rng, error_rate=sft.error_rate)
    ) + [tokenizer.eos_id]
    _, mask = truncate_example(prompt, resp, sft.max_len, sft.truncate)
    k = int(sum(mask))
    kept, total = kept + k, total + len(resp)
    longest = max(longest, len(prompt) + len(resp))
    if len(prompt) + len(resp) > sft.max_len:
      truncated += 1
      lost = 1 - k / len(resp)
      if lost > 0 and (worst is None or lost > worst[0]):
        worst = (lost, i, len(prompt), len(resp))
  frac = kept / max(total, 1)
  info = {"kept_fraction": frac, "truncated": truncated, "examples": n, "longest": longest}
  if truncated:
    log(
        f"cold start: {truncated}/{n} examples are longer than sft.max_len={sft.max_len} (longest "
        f"{longest} tokens); sft.truncate={sft.truncate!r} keeps {frac:.1%} of the response tokens"
    )
  if frac < sft.min_kept_fraction:
    _, i, lp, lr = worst
    rec = records[i]
    if rc.data.task == "jsonl" and "line" in rec:
      where = f"{rc.data.train_file}, line {rec['line']}"
    else:
      where = f"training example {i} ({task.format_prompt(rec)!r:.60})"
    raise UserError(
        f"sft.max_len={sft.max_len}: the cold start would train on only {frac:.1%} of the teacher's "
        f"response tokens (sft.min_kept_fraction={sft.min_kept_fraction}, "
        f"sft.truncate={sft.truncate!r}, {n} examples measured); e.g. {where}: prompt {lp} + "
        f"response {lr} tokens. Raise sft.max_len (the longest example has {longest} tokens)"
    )
  return info


def _batches(tokenizer, task, records, sft: config_lib.SFTConfig, rng: random.Random):
  B, max_len = sft.batch_size, sft.max_len
  while True:
    toks = np.full((B, max_len), tokenizer.pad_id, np.int32)
    mask = np.zeros((B, max_len), np.float32)
    for b in range(B):
      rec = records[rng.randrange(len(records))]
      resp = teachers.teacher(task.problem(rec), sft.teacher, rng, error_rate=sft.error_rate)
      ids, m = encode_example(tokenizer, task, rec, resp, max_len, sft.truncate)
      toks[b, : len(ids)] = ids
      mask[b, : len(m)] = m
    yield toks, mask


def _cause(e: BaseException) -> str:
  """One line: the exception's type and the first line of its message (at most 200 characters)."""
  first = (str(e).strip().splitlines() or [""])[0]
  return f"{type(e).__name__}: {first[:200]}"


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
    try:
      cached, meta = ckpt.restore(None, abstract_like(params))
    except Exception as e:  # noqa: BLE001 - a damaged cache: named, kept aside, and recomputed
      ckpt.close()
      aside = move_aside(directory)
      log(
          f"cold start: the cached cold start {directory} cannot be read ({_cause(e)}); moved to "
          f"{aside}, computing it again"
      )
      ckpt = Checkpointer(directory, max_to_keep=1)
    else:
      ckpt.close()
      log(f"cold start: reusing {directory} ({meta.get('steps')} SFT steps)")
      return cached, dict(meta, reused=True)

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
    try:
      (params, opt_state), meta = partial.restore(None, abstract_like((params, opt_state)))
    except Exception as e:  # noqa: BLE001 - a damaged partial cold start: named, kept aside, restarted
      partial.close()
      aside = move_aside(partial.directory)
      log(
          f"cold start: the preempted SFT in {directory}.partial cannot be read ({_cause(e)}); moved "
          f"to {aside}, starting SFT over"
      )
      partial = Checkpointer(directory.rstrip("/") + ".partial", max_to_keep=1)
      meta = {"step": 0, "losses": [], "seconds": 0.0}
    first, losses, seconds = int(meta["step"]), list(meta["losses"]), float(meta["seconds"])
    for _ in range(first):  # the batches it already trained on (host-side only)
      next(it)
    if first:
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
