"""The paged rollout engine (fo_rl/sampler/engine.py): its SampleOutput against the static sampler's
for the same seed with any number of slots and pages (refills, preemption, shared prompts), and its
bad-input errors. Attention over pages: tests/test_paged_attention.py."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fo_rl.sampler import Sampler, SamplerConfig, SamplingParams
from toy import TOY

SAMPLING = SamplingParams(temperature=1.0, max_new_tokens=24, eos_ids=(3, 7, 11))


# ------------------------------------------------------------------------------------------------
# The engine: same outputs as the static sampler.
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def weights(toy_model):
  _, _, state = toy_model
  return jax.tree_util.tree_map(lambda x: x * 10.0 if x.ndim > 1 else x, state)


@pytest.fixture(scope="module")
def grouped_prompts():
  """8 prompts of 1..15 tokens, each 4 times (G = 4 samples of each), interleaved as the RL loop
  lists them (a prompt's samples next to each other)."""
  rng = np.random.default_rng(0)
  base = [list(rng.integers(12, 128, n)) for n in [1, 15, 3, 9, 4, 12, 2, 7]]
  return [p for p in base for _ in range(4)]


_STATIC = {}


def _static(weights, prompts, sp, seed):
  k = (id(prompts), sp, seed)
  if k not in _STATIC:
    _STATIC[k] = Sampler(TOY, SamplerConfig(), trainer_state=weights).generate(prompts, sp, seed)
  return _STATIC[k]


def _assert_same(out, ref):
  for f in ("prompt_tokens", "prompt_mask", "tokens", "lengths", "finished_eos", "routes"):
    np.testing.assert_array_equal(np.asarray(getattr(out, f)), np.asarray(getattr(ref, f)), f)
  np.testing.assert_array_equal(np.asarray(out.response_mask), np.asarray(ref.response_mask))
  np.testing.assert_allclose(np.asarray(out.logp_mu), np.asarray(ref.logp_mu), atol=1e-5, rtol=0)
  assert not np.asarray(out.logp_nonfinite).any()
  assert out.finish_reason == ref.finish_reason


def _paged(weights, **kw):
  return Sampler(TOY, SamplerConfig(engine="paged", **kw), trainer_state=weights)


def test_engine_matches_static_with_refills_and_shared_prompts(weights, grouped_prompts):
  """Fewer slots than sequences (every slot refilled several times), prompts prefilled once for their
  4 samples: the same SampleOutput as the static sampler, and the prefill fed each prompt's first
  len - 1 tokens once."""
  ref = _static(weights, grouped_prompts, SAMPLING, 1)
  lengths = np.asarray(ref.lengths)
  assert lengths.min() < 8 and lengths.max() == SAMPLING.max_new_tokens  # heavy work imbalance
  # 8 slots of <= 39 positions in pages of 16: one step width, so few compiled variants (fast tier)
  s = _paged(weights, num_slots=8, page_size=16, prefill_chunk=8)
  out = s.generate(grouped_prompts, SAMPLING, seed=1)
  _assert_same(out, ref)
  st = s.engine.stats
  unique = {tuple(p) for p in grouped_prompts}
  assert st["prefill_tokens"] == sum(len(p) - 1 for p in unique)  # once per prompt
  assert st["admissions"] == len(grouped_prompts) and st.get("preemptions", 0) == 0
  # every fed token: each sample's last prompt token and all its response tokens, once
  assert st["decode_tokens"] == len(grouped_prompts) + lengths.sum()


@pytest.mark.slow
@pytest.mark.parametrize(
    "kw",
    [
        dict(num_slots=32, page_size=16, prefill_chunk=16),  # a slot per sequence
        dict(num_slots=6, page_size=4, prefill_chunk=8, prefill_rows=1),  # wider page tables
        dict(num_slots=5, page_size=4, prefill_chunk=8, prefill_rows=2, num_pages=14),  # preempts
        dict(num_slots=3, page_size=8, prefill_chunk=4, num_pages=9),  # the smallest pool allowed
    ],
)
def test_engine_matches_static_for_any_slots_and_pages(weights, grouped_prompts, kw):
  ref = _static(weights, grouped_prompts, SAMPLING, 1)
  s = _paged(weights, **kw)
  out = s.generate(grouped_prompts, SAMPLING, seed=1)
  _assert_same(out, ref)
  if kw.get("num_pages", 99) <= 14:
    assert s.engine.stats["preemptions"] > 0  # the pool ran out and sequences were resumed


@pytest.mark.slow
@pytest.mark.parametrize(
    "sp",
    [
        dataclasses.replace(SAMPLING, top_k=20, top_p=0.9),
        dataclasses.replace(SAMPLING, temperature=0.0),
        dataclasses.replace(SAMPLING, max_new_tokens=1),
    ],
)
def test_engine_matches_static_with_truncation_greedy_and_one_token(weights, grouped_prompts, sp):
  ref = _static(weights, grouped_prompts, sp, 3)
  out = _paged(weights, num_slots=8, page_size=4, prefill_chunk=8).generate(
      grouped_prompts, sp, seed=3
  )
  _assert_same(out, ref)


def test_static_prompt_padding_routes_hold_the_fill_value(weights, grouped_prompts):
  """Prompt padding columns hold the fill value (0 in MoE layers, -1 in dense ones), not the experts
  the padding token happened to route to: the routes do not depend on the other prompts of the batch
  (so the paged engine, which pads nothing, can give the same)."""
  out = _static(weights, grouped_prompts, SAMPLING, 1)
  routes, mask = np.asarray(out.routes), np.asarray(out.prompt_mask)
  pad = routes[:, : mask.shape[1]][~mask]  # [padding positions, L, k]
  assert pad.size
  moe = list(TOY.moe_layers)
  assert np.all(pad[:, moe] == 0) and np.all(pad[:, [1]] == -1)


# ------------------------------------------------------------------------------------------------
# Bad input.
# ------------------------------------------------------------------------------------------------
def test_a_pool_too_small_for_one_sequence_is_rejected_before_compiling(weights):
  s = _paged(weights, num_slots=2, page_size=4, num_pages=8)
  with pytest.raises(ValueError, match=re.escape("sampler.num_pages=8")):
    s.generate([[20] * 15], SAMPLING, seed=0)  # 15 + 24 tokens = 10 pages + a copy + the trash page


@pytest.mark.parametrize(
    "kw, field",
    [
        (dict(engine="vllm"), "sampler.engine"),
        (dict(num_slots=0), "sampler.num_slots"),
        (dict(page_size=0), "sampler.page_size"),
        (dict(num_pages=1), "sampler.num_pages"),
        (dict(prefill_chunk=0), "sampler.prefill_chunk"),
        (dict(paged_attention="flash"), "sampler.paged_attention"),
    ],
)
def test_bad_engine_settings_name_the_field(kw, field):
  with pytest.raises(ValueError, match=re.escape(field)):
    SamplerConfig(**kw)


# ------------------------------------------------------------------------------------------------
# Shards: one engine per device of the sampler mesh's batch axes.
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "mesh_cfg, rows",
    [
        ({"data": 2, "expert": 4}, 32),  # expert-parallel MoE, one prompt's 4 samples per shard
        ({"data": 8}, 30),  # the last shard holds 2 rows, a shard's rows split a prompt's samples
    ],
)
def test_sharded_engine_matches_static(weights, grouped_prompts, mesh_cfg, rows):
  """8 shards, each with its own pool, slots and scheduler, run in one step per device call: the
  static sampler's SampleOutput (on one device) for the same seed; few slots and pages per shard,
  so shards refill, burst and preempt at different steps."""
  from fo_rl.parallel.sharding import make_mesh

  prompts = grouped_prompts[:rows]
  ref = _static(weights, prompts, SAMPLING, 1)
  cfg = SamplerConfig(engine="paged", num_slots=2, page_size=4, prefill_chunk=8, num_pages=14)
  s = Sampler(TOY, cfg, make_mesh(mesh_cfg), trainer_state=weights)
  out = s.generate(prompts, SAMPLING, seed=1)
  _assert_same(out, ref)
  assert s.engine.shards == 8 and s.engine.stats["pages"] == 8 * 14
  assert s.engine.stats["preemptions"] > 0


def test_sharded_engine_steps_move_no_pages_between_devices(weights):
  """The compiled step and burst on 8 shards (data 2 x expert 4): a device's arguments hold its own
  pool, not all of them, updated in place, and every collective is far smaller
  than one layer's pool on one device (the MoE's token all-to-all, the routers' top-k, the loop's
  stop flag): attention reads each device's own pool, and the pools, page tables and output rows
  stay where they are."""
  import re

  from fo_rl.parallel.sharding import make_mesh

  cfg = SamplerConfig(engine="paged", num_slots=8, page_size=4, prefill_chunk=8, num_pages=512)
  s = Sampler(TOY, cfg, make_mesh({"data": 2, "expert": 4}), trainer_state=weights)
  assert s.engine.shards == 8
  pool_bytes = 512 * 4 * 2 * TOY.num_kv_heads * TOY.head_dim * 4  # one shard's, one layer's
  nbytes = {"f32": 4, "s32": 4, "pred": 1, "s8": 1, "u32": 4, "bf16": 2}
  for name, lowered in s.engine.lower(s.params, 32, 16, SAMPLING).items():
    compiled = lowered.compile()
    # Each device holds its own pool: the step's arguments on one device are far less than the
    # pools of all shards (3 layers x 8 shards).
    mem = compiled.memory_analysis()
    assert mem.argument_size_in_bytes < 3 * 8 * pool_bytes / 4, name
    # ... and updates it in place: the buffers are donated (their outputs alias them).
    assert mem.alias_size_in_bytes >= 3 * pool_bytes, name
    seen = 0
    for line in compiled.as_text().splitlines():
      m = re.search(
          r"= (.*?) (all-gather|all-to-all|all-reduce|collective-permute|reduce-scatter)", line
      )
      if not m:
        continue
      seen += 1
      for dt, dims in re.findall(r"(\w+)\[([\d,]*)\]", m.group(1)):
        size = nbytes[dt] * int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
        assert size < pool_bytes / 16, (name, line)
    assert seen, name  # the MoE layers' all-to-all at least
