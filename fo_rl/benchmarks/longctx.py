"""Long sequences: the train step (forward + backward of the trainer's log-probs) of a tiny MoE at T = 2K,
4K, 8K with `model.attention_impl=auto` (fo_rl) vs `reference` (peer: the einsum that materializes the
[B, K, G, T, S] scores).

Memory is the compiled program's temporaries (`compiled.memory_analysis()`): deterministic, no RSS noise,
and nothing has to run, so the reference is measured at 8K too. Targets (issue 13): with `auto` the
temporaries grow linearly (8K / 4K <= 2.2), and `auto` at 2K is no slower than 1.3x `reference`
(interleaved rounds, median; the range is in the row). On CPU `auto` is the blocked (flash-style) path
from attention.AUTO_BLOCKED_FROM (256) positions on, `reference` below.

Rows: `longctx/train_temp_mib/T{T}` (auto vs reference MiB), `longctx/temp_growth_8k_over_4k` (the
growth factor of each), `longctx/train_step_seconds/T2048`, and `longctx/padding_fraction/...`: the share
of the positions the trainer's updates compute that hold no token, with `trainer.pack` (fo_rl: the
packed micro-batches that hold tokens) and without (peer), on the default recipe's batch layout
(configs/moe_r3.py: 16 prompts x 8 responses, mini-batches of 32 run as 4 micro-batches of 8 rows,
prompt bucket 16, `max_new_tokens` 40) filled with its task's prompts and responses
as long as the cold start's teacher writes them (the lengths RL starts from; `careful` teacher), and on
the paper regime's 1-5 digit task (fo_rl/paper/suites.py REGIME), whose lengths vary.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fo_rl.benchmarks.common import rounds, row
from fo_rl.model import ModelConfig, init_model, positions_from_mask
from fo_rl.model.init import make_scorer
from fo_rl.rl import packing

MIB = 2**20


def _cfg(impl: str) -> ModelConfig:
  return ModelConfig(
      vocab_size=320,
      hidden_size=64,
      num_layers=2,
      num_heads=4,
      num_kv_heads=2,
      head_dim=16,
      intermediate_size=128,
      moe_intermediate_size=32,
      num_experts=8,
      num_experts_per_tok=2,
      attention_impl=impl,
  )


def _step(impl: str, T: int, B: int = 1):
  """(jitted grad step, its args): d/dparams of the mean response log-prob, as the update computes it
  (without the optimizer)."""
  cfg = _cfg(impl)
  graphdef, params = init_model(cfg, seed=0)
  score = make_scorer(graphdef, cfg.logits_chunk)
  tokens = jax.random.randint(jax.random.key(1), (B, T), 1, cfg.vocab_size)
  mask = jnp.ones((B, T), bool)
  pos = positions_from_mask(mask)

  def loss(p, tokens, pos, mask):
    (logp, _), _ = score(p, tokens, pos, None, mask)
    return -jnp.mean(logp)

  return jax.jit(jax.value_and_grad(loss)), (params, tokens, pos, mask)


def temp_bytes(impl: str, T: int) -> int:
  fn, args = _step(impl, T)
  return int(fn.lower(*args).compile().memory_analysis().temp_size_in_bytes)


def run(threads: int = 2, quick: bool = False):
  lengths = (2048, 4096) if quick else (2048, 4096, 8192)
  mem = {(impl, T): temp_bytes(impl, T) for T in lengths for impl in ("auto", "reference")}
  for T in lengths:
    yield row(
        f"longctx/train_temp_mib/T{T}",
        mem["auto", T] / MIB,
        mem["reference", T] / MIB,
        "MiB of compiled temporaries (lower is better)",
        backend=jax.default_backend(),
    )
  a, b = lengths[-2], lengths[-1]
  yield row(
      f"longctx/temp_growth_{b // 1024}k_over_{a // 1024}k",
      mem["auto", b] / mem["auto", a],
      mem["reference", b] / mem["reference", a],
      f"x from T={a} to {b} (linear: 2; target for fo_rl <= 2.2)",
  )
  T = 2048
  steps = []
  for impl in ("auto", "reference"):
    fn, args = _step(impl, T)
    jax.block_until_ready(fn(*args))  # compile outside the timed rounds
    steps.append(lambda fn=fn, args=args: jax.block_until_ready(fn(*args)))
  per = rounds(steps, rounds=2 if quick else 7, iters=1)
  (best_a, med_a), (best_r, med_r) = per
  yield row(
      f"longctx/train_step_seconds/T{T}",
      med_a,
      med_r,
      "seconds per forward+backward, median of interleaved rounds (target ratio <= 1.3)",
      best=[round(best_a, 4), round(best_r, 4)],
  )
  from fo_rl.paper.suites import REGIME

  for name, options, max_new in (
      ("default", {"num_digits": 3, "ops": "+-"}, 40),
      ("1to5_digits", REGIME["data.options"], REGIME["sampler.max_new_tokens"]),
  ):
    mask = _layout_mask(options, max_new)
    M = 4  # the recipe's micro-batches on CPU (trainer.micro_batches=0: 8 rows x 80 positions)
    runs = [int(packing.plan(mini, M).count) for mini in mask.reshape(4, 32, -1)]
    computed = sum(runs) * (32 // M) * mask.shape[1]
    yield row(
        f"longctx/padding_fraction/{name}",
        float(1.0 - mask.sum() / computed),
        packing.padding_fraction(mask),
        "share of computed positions that are padding, packed vs rows (lower is better)",
        micro_batches_run=sum(runs),
        micro_batches=4 * M,
    )


def _layout_mask(options: dict, max_new: int):
  """[128, P + T] token mask of the default recipe's layout (16 prompts x 8 responses, prompt bucket 16,
  generation bucket 16) for arithmetic with `options`, responses as long as the `careful` teacher's.
  """
  import numpy as np

  from fo_rl.data import get_task
  from fo_rl.data.tokenizer import Tokenizer
  from fo_rl.sampler.config import bucket

  task = get_task("arithmetic", **options)
  records = task.generate("train", 16, seed=0)
  tok = Tokenizer.default()
  rng = np.random.default_rng(0)
  plen = np.repeat([len(tok.encode(task.format_prompt(r), add_bos=True)) for r in records], 8)
  rlen = np.asarray(
      [
          len(tok.encode(task.teacher(r, "careful", rng), add_eos=True))
          for r in records
          for _ in range(8)
      ]
  )
  P, T = bucket(int(plen.max()), 16), bucket(max_new, 16)
  cols = np.arange(P + T)
  return (cols >= P - plen[:, None]) & (cols < P + np.minimum(rlen, max_new)[:, None])
