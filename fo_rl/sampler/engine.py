"""The paged rollout engine: a paged KV cache, continuous batching, prompts prefilled once for all their
samples (`sampler.engine="paged"`; `Sampler.generate` routes here).

    out = Sampler(model_cfg, SamplerConfig(engine="paged", num_slots=64)).generate(prompts, sp, seed)

`generate` returns what the static sampler (fo_rl/sampler/sampler.py) returns for the same prompts and
seed: the same `SampleOutput` layout ([prompt P | response T] buckets, routes in the replay layout), the
same samples (each draw is a function of (seed, row, response index) only: `fold_in(key, j)`, row `r` of
the batch's Threefry counters, see fo_rl/sampler/sampling.py), so the tokens, lengths and finish reasons
are equal and logp_mu / routes equal to float rounding, whatever the number of slots or pages
(tests/test_engine.py checks it in float32).

The KV cache of every layer is one pool of `num_pages` pages of `page_size` positions
(fo_rl/model/paged_attention.py; page 0 is a trash page). A sequence owns a page table (its pages in
position order). There are `num_slots` decode slots; each engine step feeds one token per busy slot
and, interleaved with them in the same step, up to `prefill_rows` prefill chunks of `prefill_chunk`
tokens. When a sequence ends its pages are freed and its slot takes the next waiting sample in the
next step.

Shared prompts. The rows of one prompt (a prompt listed G times: the G samples) share one prefill of
the prompt's first `len - 1` tokens (its "prefix"): each sample's sequence starts with the prefix's full
pages in its page table (shared, reference-counted) and a private copy of the prefix's last, partly
filled page (copy-on-write, done inside the step), then feeds the prompt's LAST token itself as its
first decode step, which gives the logits y_0 is drawn from. So the prefill samples nothing and
computes no logits at all (the last position is the only one sampled from, and it is fed per sample:
one token per sample instead of the whole prompt), and every step computes logits only for the slots
that draw a token. The prefix's routes are recorded once and repeated for each sample of the prompt;
the last prompt token's routes come from each sample's own first step.

Running out of pages: a slot that needs a page for its next token when none is free preempts the most
recently admitted sequence (possibly itself): its pages are freed and it goes back to the front of the
queue; when it resumes, its tokens so far (prompt + fed response tokens) are prefilled again into
fresh pages (routes and samples are not recorded twice: they are already in the output), and its
decode continues where it stopped. A pool too small for one sequence of the longest prompt plus
max_new_tokens is rejected before anything runs (ValueError naming `sampler.num_pages`).

Where the scheduler lives: on the host, between jitted fixed-shape steps. Each step reads back the
tokens the slots drew (D int32s), decides EOS / length / preemption / admission in plain Python with
numpy page tables, and sends the next step's layout (a few small int32 arrays). The scheduling is
irregular (variable-length prefixes, reference-counted shared pages, copy-on-write, preemption, a FIFO
queue with prompts not yet prefilled): on the host it is a few hundred lines of ordinary code; in a
`lax.while_loop` carry every one of those decisions would be a fixed-shape masked scatter / cumsum. The
price is one host round trip per step (a few hundred microseconds). Two things keep it off the hot
path: (1) when the host has nothing to decide between steps (no prefill chunk, no copy, pages for the
next steps allocated ahead), `engine_burst` runs up to BURST decode steps in one `lax.while_loop` with
the slots' bookkeeping (feed, position, count, done) in the carry, stopping early when a slot finishes
and a sequence is waiting for it; the host then replays the draws through the same rules. So the long
tail of a batch (a few sequences running to max_new_tokens after the rest ended) runs on device in
bursts. (2) A step computes `Dv` decode positions, the power of two >= the busy slots (at least 8),
not `num_slots`, so the tail costs what its few sequences cost.

Shards. The engine runs one shard per device of the mesh axes the sampler's `batch` rule names (on the
30B recipe's sampler mesh, data 4 x expert 8: 32 shards, one per chip): each shard owns rows
[i Bs, (i + 1) Bs) of the batch (Bs = ceil(B / shards); so a prompt's G samples share one shard's prefill
when the batch lists them together, as the RL loop does), `num_pages` pages of its own (`sampler.num_pages`
is per shard), `num_slots` decode slots and `prefill_rows` prefill rows, and its own host scheduler
(`_Shard`). One device call runs every shard's step: the flat tokens are [shards x N] (shard i's block on
its device), the pools and output buffers have a leading shard axis on the same devices, attention runs
per device over its own pool under shard_map (fo_rl.model.paged_attention.attend), the scatters into
the outputs are per shard, and everything else is the model's batch-parallel forward, whose MoE layers
dispatch tokens to the experts across the `expert` axis as in the trainer (attention data-parallel,
experts expert-parallel). So no page, page table or output row crosses devices, and the KV cache a chip
holds is its pool, whatever the batch. The shards agree on the step's shape (the largest Dv and width,
prefill rows when any shard prefills, a burst only when every shard can) and are otherwise independent;
a shard with nothing left feeds padding. The draws are indexed by the global row, so the samples do not
depend on the number of shards either (tests/test_engine.py).

Compiled variants: (Dv, prefill rows present or not, burst or single step, page-table widths). The XLA
attention gathers W page-table columns per sequence; the host puts the Dv // 8 longest sequences in
the last positions, which read the full width, and the others read only `main_width` columns
(`PagedBatch.main_width`), both powers of two: short sequences do not pay for the longest one.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from fo_rl.model import paged_attention as PA
from fo_rl.model.transformer import route_dtype
from fo_rl.parallel.sharding import batch_spec, batch_ways, validate_rules
from fo_rl.sampler.config import SamplingParams, bucket
from fo_rl.sampler.sampler import SampleOutput, logits_at
from fo_rl.sampler.sampling import sample_logits

_MIN_WIDTH = 4  # the smallest page-table width bucket
_MIN_SLOTS = 8  # the fewest decode positions of a step


@dataclasses.dataclass(eq=False)
class _Prefix:
  """Tokens whose KV is prefilled once: a prompt's first len - 1 tokens (shared by its rows) or a
  preempted row's tokens so far (private)."""

  tokens: np.ndarray
  u: int | None  # unique prompt whose prefix routes this prefill records (None: a resume)
  waiting: int  # rows still to be admitted from it
  pages: list = dataclasses.field(default_factory=list)
  done: int = 0  # positions computed
  started: bool = False

  @property
  def ready(self) -> bool:
    return self.started and self.done == len(self.tokens)


@dataclasses.dataclass(eq=False)
class _Row:
  r: int  # row of the batch
  prompt: np.ndarray
  prefix: _Prefix
  resp: list = dataclasses.field(default_factory=list)  # tokens drawn
  done: bool = False  # draws no more tokens
  eos: bool = False
  pos: int = 0  # next position to feed
  pages: list = dataclasses.field(default_factory=list)
  admitted: int = -1  # admission stamp (preemption picks the latest)

  def token_at(self, pos: int) -> int:
    n = len(self.prompt)
    return int(self.prompt[pos]) if pos < n else int(self.resp[pos - n])

  @property
  def finished(self) -> bool:  # every token drawn has been fed (the last one for its routes)
    return self.done and self.pos == len(self.prompt) + len(self.resp)


class PoolExhausted(RuntimeError):
  pass


class _Pages:
  """Reference-counted page allocator (page 0 is never handed out)."""

  def __init__(self, n: int):
    self.ref = np.zeros(n, np.int32)
    self.free = collections.deque(range(1, n))

  def alloc(self) -> int | None:
    if not self.free:
      return None
    p = self.free.popleft()
    self.ref[p] = 1
    return p

  def incref(self, p: int):
    self.ref[p] += 1

  def decref(self, pages):
    for p in pages:
      self.ref[p] -= 1
      if self.ref[p] == 0:
        self.free.append(p)


def engine_step(
    params, bufs, inp, key, *, graphdef, sampling, num_decode, chunk, impl, main_slots, main_width
):
  """One engine step of S shards: feed the flat tokens `inp` (per shard the layout of
  fo_rl.model.paged_attention.PagedBatch; every array has a leading shard axis S), write their KV into
  each shard's page pools and their routes into its outputs, draw a token for every decode slot that
  samples. Returns (the updated buffers, the tokens drawn [S, D])."""
  model = nnx.merge(graphdef.graphdef, params)
  D = num_decode
  S, N = inp["tokens"].shape
  batch = PA.PagedBatch(
      positions=inp["pos"],
      valid=inp["valid"],
      page_table=inp["page_table"],
      kv_len=inp["kv_len"],
      copy_src=inp["copy_src"],
      copy_dst=inp["copy_dst"],
      num_decode=D,
      chunk=chunk,
      impl=impl,
      main_slots=main_slots,
      main_width=main_width,
      shards=S,
  )
  valid = inp["valid"].reshape(S * N, 1)
  h, routes, cache = model(
      inp["tokens"].reshape(S * N, 1),
      inp["pos"].reshape(S * N, 1),
      token_mask=valid,
      key_mask=valid,
      cache=[{"pages": p} for p in bufs["pages"]],
      cache_index=batch,
      return_hidden=True,
  )
  # [S, N, L k] in the buffers' narrow dtype (route_dtype): a flat minor axis, which a TPU tiles
  # without padding (an [.., L, k] minor pair would be padded to whole (8, 128) tiles: 16x at L = 48,
  # k = 8)
  routes = routes[:, 0].reshape(S, N, -1).astype(bufs["routes"].dtype)
  put = jax.vmap(lambda buf, i, j, x: buf.at[i, j].set(x, mode="drop"))  # per shard
  out_routes = put(bufs["routes"], inp["route_row"], inp["route_col"], routes[:, :D])
  prompt_routes = bufs["prompt_routes"]
  if N > D:
    prompt_routes = put(prompt_routes, inp["pre_u"], inp["pre_col"], routes[:, D:])
  # Logits only where a token is drawn: the decode slots.
  hd = h[:, 0].reshape(S, N, -1)[:, :D].reshape(S * D, -1)
  logits = logits_at(model, hd)
  keys = jax.vmap(lambda j: jax.random.fold_in(key, j))(inp["draw"].reshape(-1))
  tok, lp = jax.vmap(
      lambda k, x, r: sample_logits(
          k, x[None], sampling.temperature, sampling.top_k, sampling.top_p, r
      )
  )(keys, logits, inp["row"].reshape(-1))
  tok, lp = tok[:, 0].reshape(S, D), lp[:, 0].reshape(S, D)
  bufs = dict(
      pages=[c["pages"] for c in cache],
      routes=out_routes,
      prompt_routes=prompt_routes,
      tokens=put(bufs["tokens"], inp["sample_row"], inp["draw"], tok),
      logp=put(bufs["logp"], inp["sample_row"], inp["draw"], lp),
  )
  return bufs, tok


def engine_burst(
    params, bufs, inp, key, *, graphdef, sampling, num_decode, steps, impl, main_slots, main_width
):
  """Up to `steps` decode-only engine steps in one `lax.while_loop`, the slots' bookkeeping in the
  carry (arrays [S, D]: S shards of D slots): each slot feeds the token it drew last (its first feed:
  inp["tokens"]), draws while not done (EOS or its cap), and goes idle after feeding its last token.
  The loop stops after `steps`, when every slot is idle, or as soon as a slot of a shard that has a
  sequence waiting (inp["refill"] [S]) finishes, so that the host can refill it. The host has given
  every slot the pages its next `steps` positions need. Returns (buffers, tokens drawn per iteration
  [steps, S, D], iterations run)."""
  S, D = inp["tokens"].shape
  Bs, T = bufs["tokens"].shape[1:]
  Pl = bufs["routes"].shape[2] - T
  plen, lrows, cap = inp["plen"], inp["lrow"], inp["cap"]
  zeros = jnp.zeros((S, D), jnp.int32)

  def body(c):
    i, bufs, feed, pos, count, done, active, hist, _ = c
    sample = active & ~done
    step_inp = dict(
        tokens=feed,
        pos=pos,
        valid=active,
        page_table=inp["page_table"],
        kv_len=jnp.where(active, pos + 1, 1),
        copy_src=zeros,
        copy_dst=zeros,
        route_row=jnp.where(active, lrows, Bs),
        route_col=Pl - plen + pos,
        row=inp["row"],
        draw=jnp.maximum(pos - plen + 1, 0),
        sample_row=jnp.where(sample, lrows, Bs),
    )
    bufs, tok = engine_step(
        params,
        bufs,
        step_inp,
        key,
        graphdef=graphdef,
        sampling=sampling,
        num_decode=D,
        chunk=0,
        impl=impl,
        main_slots=main_slots,
        main_width=main_width,
    )
    is_eos = jnp.zeros((S, D), bool)
    for e in sampling.eos_ids:
      is_eos = is_eos | (tok == e)
    count = count + sample.astype(jnp.int32)
    finished = active & done  # fed its last token in this step
    done = done | (sample & (is_eos | (count >= cap)))
    return (
        i + 1,
        bufs,
        jnp.where(sample, tok, feed),
        pos + active.astype(jnp.int32),
        count,
        done,
        active & ~finished,
        hist.at[i].set(tok),
        jnp.any(finished & inp["refill"][:, None]),
    )

  init = (
      jnp.zeros((), jnp.int32),
      bufs,
      inp["tokens"],
      inp["pos"],
      inp["count"],
      inp["done"],
      inp["active"],
      jnp.zeros((steps, S, D), jnp.int32),
      jnp.zeros((), bool),
  )
  out = jax.lax.while_loop(lambda c: (c[0] < steps) & ~c[8] & jnp.any(c[6]), body, init)
  return out[1], out[7], out[0]


_TRACES = collections.Counter()  # engine_step traces (compiles), per step variant


def _counted_step(params, bufs, inp, key, **kw):  # (named arguments: `bufs` is donated by name)
  _TRACES["engine_step"] += 1
  return engine_step(params, bufs, inp, key, **kw)


_step = jax.jit(
    _counted_step,
    static_argnames=(
        "graphdef",
        "sampling",
        "num_decode",
        "chunk",
        "impl",
        "main_slots",
        "main_width",
    ),
    donate_argnames=("bufs",),
)
_burst = jax.jit(
    engine_burst,
    static_argnames=(
        "graphdef",
        "sampling",
        "num_decode",
        "steps",
        "impl",
        "main_slots",
        "main_width",
    ),
    donate_argnames=("bufs",),
)
BURST = 32  # decode steps per device call when no prefill, copy or refill needs the host


class _Graph:
  """A graphdef as a jit static argument with its hash computed once (flax hashes a graphdef by
  walking it: a cost on every step call otherwise)."""

  def __init__(self, graphdef):
    self.graphdef, self._hash = graphdef, hash(graphdef)

  def __hash__(self):
    return self._hash

  def __eq__(self, other):
    return isinstance(other, _Graph) and (
        self.graphdef is other.graphdef or self.graphdef == other.graphdef
    )


class _Shard:
  """The host scheduler of one engine shard: its rows of the batch, its pool of pages, its decode
  slots and prefill rows (see the module docstring). The engine runs every shard's step in one device
  call; each shard plans its part of it (`plan`, `lay_out_*`) and records what its slots drew (`drawn`).
  Rows are this shard's local rows 0 .. len(rows) - 1 of its output buffers (global row `base + r`).
  """

  def __init__(self, config, prompts, caps, base, n_pages, sampling):
    self.config, self.sampling, self.n_pages = config, sampling, n_pages
    self.base = base
    self.caps = caps
    # Unique prompts share one prefix prefill.
    uniq, self.u_of_row, self.prefixes = {}, np.zeros(len(prompts), np.int32), []
    for r, p in enumerate(prompts):
      t = tuple(p.tolist())
      if t not in uniq:
        uniq[t] = len(self.prefixes)
        self.prefixes.append(_Prefix(tokens=p[:-1], u=len(self.prefixes), waiting=0))
      self.u_of_row[r] = uniq[t]
      self.prefixes[uniq[t]].waiting += 1
    self.rows = [
        _Row(r=r, prompt=p, prefix=self.prefixes[self.u_of_row[r]]) for r, p in enumerate(prompts)
    ]
    self.alloc = _Pages(n_pages)
    self.waiting = collections.deque(self.rows)
    self.slots: list[_Row | None] = [None] * config.num_slots
    self.prefilling: list[_Prefix] = []  # started, not ready
    self.stamp = 0
    self.stats = collections.Counter()
    self.busy, self.chunks, self.copies = [], [], []

  def note_peak(self):
    self.stats["peak_pages"] = max(
        self.stats["peak_pages"], self.n_pages - 1 - len(self.alloc.free)
    )

  @property
  def live(self) -> bool:
    return bool(self.waiting) or any(x is not None for x in self.slots)

  def release_prefix(self, pf: _Prefix):
    self.alloc.decref(pf.pages)
    pf.pages = []

  def preempt(self, row: _Row):
    """Free `row`'s pages and slot; it resumes later from a private prefill of its tokens so far."""
    self.alloc.decref(row.pages)
    row.pages = []
    self.slots[self.slots.index(row)] = None
    seq = np.asarray([row.token_at(p) for p in range(row.pos)], np.int32)
    row.prefix = _Prefix(tokens=seq, u=None, waiting=1)
    self.waiting.appendleft(row)
    self.stats["preemptions"] += 1

  def victim(self):
    live = [x for x in self.slots if x is not None]
    return max(live, key=lambda x: x.admitted) if live else None

  def drop_idle_prefix(self) -> bool:
    """Free the pages of a prefix no live sequence uses yet (it is prefilled again later)."""
    held = {id(p): p for p in self.prefixes + [x.prefix for x in self.waiting] if p.pages}
    for pf in sorted(held.values(), key=lambda p: (p.ready, p.done)):  # least progress first
      if pf in self.prefilling or pf.ready:
        self.release_prefix(pf)
        pf.done, pf.started = 0, False
        if pf in self.prefilling:
          self.prefilling.remove(pf)
        self.stats["prefix_drops"] += 1
        return True
    return False

  def admit(self, row: _Row, slot: int) -> bool:
    """Put `row` in `slot`: its page table starts with its prefix's full pages (shared) and a copy
    of the prefix's partly filled last page (the prefix's last row takes that page itself)."""
    pf, ps = row.prefix, self.config.page_size
    full, rem = divmod(len(pf.tokens), ps)
    own = list(pf.pages[:full])
    for p in own:
      self.alloc.incref(p)
    if rem:
      last = pf.pages[full]
      if pf.waiting == 1:  # no other row will copy it: the prefix's reference moves to the row
        pf.pages = pf.pages[:full]
        own.append(last)
      else:
        new = self.alloc.alloc()
        if new is None:
          self.alloc.decref(own)
          return False
        self.copies.append((last, new))
        own.append(new)
    row.pages, row.pos = own, len(pf.tokens)
    pf.waiting -= 1
    if pf.waiting == 0:
      self.release_prefix(pf)
    self.slots[slot] = row
    return True

  def plan(self):
    """Admit, allocate the pages of the tokens fed now, pick the prefill chunks: sets `busy` (slots
    that feed a token), `chunks` ((prefix, start, n) each) and `copies` ((src, dst) pages)."""
    c, ps, slots = self.config, self.config.page_size, self.slots
    while True:
      self.copies = []
      # 1. Admission: free slots take the first waiting rows whose prefix is ready.
      for row in list(self.waiting):
        if None not in slots:
          break
        pf = row.prefix
        if len(pf.tokens) == 0:
          pf.started = True
        if pf.ready and self.admit(row, slots.index(None)):
          self.waiting.remove(row)
          row.admitted = self.stamp = self.stamp + 1
          self.stats["admissions"] += 1
      # 2. Pages for the tokens the slots feed now (oldest first; preempt the newest when out).
      for row in sorted((x for x in slots if x is not None), key=lambda x: x.admitted):
        if row not in slots:
          continue  # preempted in this loop
        while len(row.pages) <= row.pos // ps:
          p = self.alloc.alloc()
          if p is None and self.drop_idle_prefix():
            continue
          if p is None:
            v = self.victim()
            self.preempt(v)
            if v is row:
              break
            continue
          row.pages.append(p)
      # 3. Prefill: start the prefixes of the next waiting rows (resumes first), one chunk each.
      lookahead = sum(1 for x in self.waiting if x.prefix.started)
      for row in self.waiting:
        pf = row.prefix
        if len(self.prefilling) >= c.prefill_rows or lookahead >= c.num_slots:
          break
        if not pf.started and len(pf.tokens):
          pf.started = True
          self.prefilling.append(pf)
          lookahead += pf.waiting
      self.chunks = []
      for pf in list(self.prefilling):
        start = pf.done
        n = min(c.prefill_chunk, len(pf.tokens) - start)
        ok = True
        while len(pf.pages) * ps < start + n:
          p = self.alloc.alloc()
          if p is None:
            ok = False
            break
          pf.pages.append(p)
        if ok:
          self.chunks.append((pf, start, n))
      self.busy = [i for i, x in enumerate(slots) if x is not None]
      if self.busy or self.chunks or not self.live:
        self.note_peak()
        return
      # Only prefixes hold pages and none can grow or be admitted: drop one and retry.
      if not self.drop_idle_prefix():
        raise PoolExhausted(
            f"sampler.num_pages={self.n_pages}: the page pool cannot make progress (no sequence "
            f"can run and no prefill chunk fits); raise sampler.num_pages"
        )

  def pages_ahead(self) -> bool:
    """Give each busy slot the pages of its next BURST positions (up to its last possible one);
    False when the pool cannot (the per-step path then preempts as needed)."""
    ps = self.config.page_size
    for i in self.busy:
      row = self.slots[i]
      last = min(row.pos + BURST, len(row.prompt) + int(self.caps[row.r])) - 1
      while len(row.pages) <= last // ps:
        p = self.alloc.alloc()
        if p is None:
          return False
        row.pages.append(p)
    return True

  def decode_layout(self, Dv: int):
    """(perm, main_width, W) for a step of Dv decode positions: perm[d] is the slot at position d
    (None: idle); the Dv // 8 longest sequences (in pages) sit at the last positions, which read the
    full page-table width W; the others read only `main_width` columns (`PagedBatch.main_width`)."""
    L = max(1, Dv // 8)
    order = sorted(self.busy, key=lambda i: len(self.slots[i].pages))
    n_long = min(L, len(order))
    main, long = order[: len(order) - n_long], order[len(order) - n_long :]
    perm = main + [None] * (Dv - L - len(main)) + long + [None] * (L - n_long)
    need = lambda group: max([len(self.slots[i].pages) for i in group] + [1])
    main_w = bucket(need(main), _MIN_WIDTH)
    return perm, main_w, max(main_w, bucket(need(order), _MIN_WIDTH))

  def widths(self, chunk: int) -> list[int]:
    """Page-table columns the step's prefill rows read (`chunk`: the step's C)."""
    ps = self.config.page_size
    return [-(-(st + chunk) // ps) for _, st, _ in self.chunks]

  def lay_out_burst(self, a: dict, s: int, perm):
    """Write this shard's slots (in `perm`'s positions) into row `s` of a burst's inputs `a`."""
    for d, i in enumerate(perm):
      if i is None:
        continue
      row = self.slots[i]
      a["tokens"][s, d], a["pos"][s, d] = row.token_at(row.pos), row.pos
      a["count"][s, d], a["done"][s, d], a["active"][s, d] = len(row.resp), row.done, True
      a["cap"][s, d], a["plen"][s, d] = self.caps[row.r], len(row.prompt)
      a["row"][s, d], a["lrow"][s, d] = self.base + row.r, row.r
      a["page_table"][s, d, : len(row.pages)] = row.pages
    a["refill"][s] = bool(self.waiting)
    self.note_peak()

  def lay_out_step(self, a: dict, s: int, perm, Rs: int, C: int, Pl: int):
    """Write this shard's decode slots and prefill chunks into row `s` of a step's inputs `a` (Rs
    prefill rows of C tokens; prompt bucket Pl)."""
    Dv = len(perm)
    for j, (src, dst) in enumerate(self.copies):
      a["copy_src"][s, j], a["copy_dst"][s, j] = src, dst
    for d, i in enumerate(perm):
      if i is None:
        continue
      row = self.slots[i]
      n = len(row.prompt)
      a["tokens"][s, d] = row.token_at(row.pos)
      a["pos"][s, d] = row.pos
      a["valid"][s, d] = True
      a["page_table"][s, d, : len(row.pages)] = row.pages
      a["kv_len"][s, d] = row.pos + 1
      a["row"][s, d] = self.base + row.r
      a["route_row"][s, d] = row.r  # (positions from n - 1 on: each fed once, resumes included)
      a["route_col"][s, d] = Pl - n + row.pos
      if not row.done:
        a["sample_row"][s, d] = row.r
        a["draw"][s, d] = row.pos - n + 1
    for q in range(Rs):
      base = Dv + q * C
      if q >= len(self.chunks):
        continue
      pf, st, n = self.chunks[q]
      a["tokens"][s, base : base + n] = pf.tokens[st : st + n]
      a["pos"][s, base : base + C] = st + np.arange(C)
      a["valid"][s, base : base + n] = True
      a["page_table"][s, Dv + q, : len(pf.pages)] = pf.pages
      a["kv_len"][s, Dv + q] = st + C
      if pf.u is not None:
        plen = len(pf.tokens) + 1
        a["pre_u"][s, q * C : q * C + n] = pf.u
        a["pre_col"][s, q * C : q * C + n] = Pl - plen + st + np.arange(n)
    self.stats["decode_tokens"] += len(self.busy)
    self.stats["prefill_tokens"] += sum(n for _, _, n in self.chunks)

  def drawn(self, perm, tokens):
    """The host's record of one step: each busy slot fed one token and drew `tokens[d]` (position d
    of `perm`) unless done (the rules `engine_burst` applies on device); finished rows free their
    pages and slots; prefill chunks advance."""
    eos_ids = self.sampling.eos_ids
    for d, i in enumerate(perm):
      row = None if i is None else self.slots[i]
      if row is None:  # idle position, or (in a burst) a slot that finished in an earlier step
        continue
      if not row.done:
        t = int(tokens[d])
        row.resp.append(t)
        row.eos = t in eos_ids
        row.done = row.eos or len(row.resp) >= self.caps[row.r]
      row.pos += 1
      if row.finished:
        self.alloc.decref(row.pages)
        row.pages = []
        self.slots[i] = None
    for pf, st, n in self.chunks:
      pf.done = st + n
      if pf.ready:
        self.prefilling.remove(pf)
    self.chunks, self.copies = [], []
    self.busy = [i for i, x in enumerate(self.slots) if x is not None]


class PagedEngine:
  """The paged engine of one Sampler (its weights, mesh and config): one shard per device of the
  batch axes of the sampler's mesh (see "Shards" in the module docstring)."""

  def __init__(self, sampler):
    self.s = sampler
    self.config = sampler.config
    self.impl = PA.resolve(self.config.paged_attention, sampler.mesh.devices.flat[0].platform)
    self.graph = _Graph(sampler.graphdef)
    mesh, rules = sampler.mesh, self.config.rules
    self.shards = batch_ways(rules, mesh.shape)
    self._sharded = lambda ndim: NamedSharding(mesh, batch_spec(rules, ndim))
    table = validate_rules(rules)
    self._pool_sharding = NamedSharding(
        mesh,
        PA.pool_spec(
            mesh, table.get("batch", ()), table.get("heads", ()), sampler.model_cfg.num_kv_heads
        ),
    )
    self._finalize = jax.jit(jax.vmap(self._finalize_impl))
    self.stats = {}

  @staticmethod
  def _finalize_impl(routes, prompt_routes, u_of_row, prefix_cols):
    """Prompt columns [P - len, P - 1) of each row from its prompt's shared prefill (one shard)."""
    Pl = prompt_routes.shape[1]
    shared = prompt_routes[u_of_row]  # [B, P, L k]
    head = jnp.where(prefix_cols[:, :, None], shared, routes[:, :Pl])
    return routes.at[:, :Pl].set(head)

  # ---- host side --------------------------------------------------------------------------------
  def pages_needed(self, prompt_len: int, max_new: int) -> int:
    """Pages one sequence of `prompt_len` prompt tokens and `max_new` response tokens holds at most,
    with the copy of its prompt's shared last page."""
    return -(-(prompt_len + max_new) // self.config.page_size) + 1

  def num_pages(self, prompt_lens: Sequence[int], max_new: int, rows: int | None = None) -> int:
    """The pool size of each shard: sampler.num_pages, or (None) enough pages for every slot (at most
    `rows`, the shard's rows) to hold a sequence of the longest prompt at max_new_tokens, plus the
    prefixes and chunks in flight."""
    c = self.config
    if c.num_pages is not None:
      return c.num_pages
    longest = max(prompt_lens)
    slots = c.num_slots if rows is None else min(c.num_slots, rows)
    return (
        1
        + slots * self.pages_needed(longest, max_new)
        + (c.prefill_rows + 1) * (-(-(longest + c.prefill_chunk) // c.page_size))
    )

  def _page_shape(self, n_pages: int) -> tuple:
    """One shard's pool of one layer: [n_pages, page_size, 2K, H]."""
    cfg = self.s.model_cfg
    return (n_pages, self.config.page_size, 2 * cfg.num_kv_heads, cfg.head_dim)

  def pool_bytes(self, n_pages: int) -> int:
    """Bytes of one shard's pools, every layer."""
    n = math.prod(self._page_shape(n_pages)) * self.s.model_cfg.num_layers
    return n * self.s._cache_dtype.itemsize

  def _buffers(self, n_pages, rows, uniq, Pl, T):
    """Abstract (ShapeDtypeStruct) step buffers: per layer the pools [S, n_pages, ps, 2K, H], and the
    outputs of `rows` rows per shard ([S, rows, ...]; `uniq` prompts' routes per shard)."""
    cfg, c, S = self.s.model_cfg, self.config, self.shards
    route = (cfg.num_layers, cfg.route_slots)
    sds = lambda shape, dt, sh=None: jax.ShapeDtypeStruct(
        shape, dt, sharding=sh or self._sharded(len(shape))
    )
    pool = (S, *self._page_shape(n_pages))
    rdt, Lk = route_dtype(cfg.num_experts), math.prod(route)
    return dict(
        pages=[sds(pool, self.s._cache_dtype, self._pool_sharding) for _ in range(cfg.num_layers)],
        routes=sds((S, rows, Pl + T, Lk), rdt),  # (flat [L k]: see engine_step)
        prompt_routes=sds((S, uniq, Pl, Lk), rdt),
        tokens=sds((S, rows, T), jnp.int32),
        logp=sds((S, rows, T), jnp.float32),
    )

  def _step_inputs(self, Dv, W, Rs, C):
    """Host arrays of one engine step over every shard (the layout `engine_step` reads)."""
    S, N = self.shards, Dv + Rs * C
    z = lambda *shape, dt=np.int32: np.zeros((S, *shape), dt)
    return dict(
        tokens=z(N),
        pos=z(N),
        valid=z(N, dt=bool),
        page_table=z(Dv + Rs, W),
        kv_len=np.ones((S, Dv + Rs), np.int32),
        copy_src=z(self.config.num_slots),
        copy_dst=z(self.config.num_slots),
        route_row=z(Dv),
        route_col=z(Dv),
        row=z(Dv),
        draw=z(Dv),
        sample_row=z(Dv),
        pre_u=z(Rs * C),
        pre_col=z(Rs * C),
    )

  def _burst_inputs(self, Dv, W):
    S = self.shards
    z = lambda *shape, dt=np.int32: np.zeros((S, *shape), dt)
    return dict(
        tokens=z(Dv),
        pos=z(Dv),
        count=z(Dv),
        done=z(Dv, dt=bool),
        active=z(Dv, dt=bool),
        cap=np.ones((S, Dv), np.int32),
        plen=np.ones((S, Dv), np.int32),
        row=z(Dv),
        lrow=z(Dv),
        page_table=z(Dv, W),
        refill=z(dt=bool),
    )

  def _alloc(self, abstract: dict) -> dict:
    """The step buffers of `_buffers`, made on their devices: empty pools, routes at the fill value,
    pad tokens, zero logprobs."""
    fill, pad = self.s._route_fill.reshape(-1).astype(abstract["routes"].dtype), self.config.pad_id
    make = lambda: dict(
        pages=[jnp.zeros(a.shape, a.dtype) for a in abstract["pages"]],
        routes=jnp.broadcast_to(jnp.asarray(fill), abstract["routes"].shape),
        prompt_routes=jnp.broadcast_to(jnp.asarray(fill), abstract["prompt_routes"].shape),
        tokens=jnp.full(abstract["tokens"].shape, pad, jnp.int32),
        logp=jnp.zeros(abstract["logp"].shape, jnp.float32),
    )
    return jax.jit(make, out_shardings=jax.tree.map(lambda a: a.sharding, abstract))()

  def _put(self, a: dict):
    """Host arrays [S, ...] onto their shards' devices, in one transfer call."""
    return jax.device_put(a, {k: self._sharded(v.ndim) for k, v in a.items()})

  def step_shapes(self, batch: int, prompt_len: int, sampling: SamplingParams) -> dict:
    """The largest step a `generate` of `batch` prompts of at most `prompt_len` tokens can run: every
    slot of every shard busy (Dv = num_slots), each sequence at its longest (page-table width W for
    prompt_len + max_new_tokens, all of them read in full), `prefill_rows` chunks; the pool of
    `num_pages` pages per shard (sampler.num_pages, else the automatic size)."""
    c = self.config
    rows = -(-batch // self.shards)
    return dict(
        rows=rows,
        prompt_len=prompt_len,
        gen_len=bucket(sampling.max_new_tokens, c.gen_bucket),
        num_pages=self.num_pages([prompt_len], sampling.max_new_tokens, rows),
        slots=c.num_slots,
        width=bucket(self.pages_needed(prompt_len, sampling.max_new_tokens), _MIN_WIDTH),
    )

  def lower(self, params, batch: int, prompt_len: int, sampling: SamplingParams) -> dict:
    """Lower the engine's two step functions at their largest shapes (`step_shapes`) for abstract
    `params` (nothing is allocated): {"prefill": one step with `prefill_rows` prefill chunks beside
    the decode slots, "decode": a burst of BURST decode steps}; fo_rl/dry_run.py compiles them."""
    c, S = self.config, self.shards
    sh = self.step_shapes(batch, prompt_len, sampling)
    Dv, W = sh["slots"], sh["width"]
    bufs = self._buffers(sh["num_pages"], sh["rows"], sh["rows"], prompt_len, sh["gen_len"])
    key = jax.eval_shape(lambda: jax.random.key(0))
    key = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=NamedSharding(self.s.mesh, P()))
    abstract = lambda a: {
        k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=self._sharded(v.ndim))
        for k, v in a.items()
    }
    static = dict(
        graphdef=self.graph,
        sampling=sampling.compile_key,
        num_decode=Dv,
        impl=self.impl,
        main_slots=Dv - max(1, Dv // 8),
        main_width=W,
    )
    R, C = c.prefill_rows, c.prefill_chunk
    return {
        "prefill": _step.lower(
            params, bufs, abstract(self._step_inputs(Dv, W, R, C)), key, chunk=C, **static
        ),
        "decode": _burst.lower(
            params, bufs, abstract(self._burst_inputs(Dv, W)), key, steps=BURST, **static
        ),
    }

  def generate(self, prompts, sampling: SamplingParams, seed=0, max_new_per_row=None):
    s, c = self.s, self.config
    if s.params is None:
      raise RuntimeError("Sampler has no weights: call update_weights(trainer_state) first")
    tok, mask = s.pad_prompts(prompts)
    B, Pl = tok.shape
    T = bucket(sampling.max_new_tokens, c.gen_bucket)
    max_new = sampling.max_new_tokens
    ps, C, R, S = c.page_size, c.prefill_chunk, c.prefill_rows, self.shards
    prompts = [np.asarray(p, np.int32) for p in prompts]
    lens = [len(p) for p in prompts]
    Bs = -(
        -B // S
    )  # rows per shard: shard i holds rows [i Bs, (i + 1) Bs) (the last may hold fewer)
    n_pages = self.num_pages(lens, max_new, Bs)
    need = self.pages_needed(max(lens), max_new) + 1  # + the trash page
    if n_pages < need:
      raise ValueError(
          f"sampler.num_pages={n_pages}: too small for one sequence of the longest prompt "
          f"({max(lens)} tokens) plus max_new_tokens={max_new} at sampler.page_size={ps}: "
          f"needs at least {need}"
      )
    key = seed if isinstance(seed, jax.Array) else jax.random.key(int(seed))
    key = jax.device_put(key, NamedSharding(s.mesh, P()))
    caps = np.full(B, max_new, np.int32) if max_new_per_row is None else max_new_per_row
    shards = [
        _Shard(
            c,
            prompts[i * Bs : (i + 1) * Bs],
            caps[i * Bs : (i + 1) * Bs],
            i * Bs,
            n_pages,
            sampling,
        )
        for i in range(S)
    ]
    U = max(1, max(len(x.prefixes) for x in shards))
    bufs = self._alloc(self._buffers(n_pages, Bs, U, Pl, T))
    stats = collections.Counter()

    while any(x.live for x in shards):
      for x in shards:
        x.plan()
      chunks = any(x.chunks for x in shards)
      Dv = min(c.num_slots, bucket(max(len(x.busy) for x in shards), _MIN_SLOTS))
      main_slots = Dv - max(1, Dv // 8)
      if not chunks and not any(x.copies for x in shards) and all(x.pages_ahead() for x in shards):
        # Nothing for the host to do between decode steps: a burst of decode steps on device, the
        # slots' pages allocated ahead for it (the draws then replayed here, step by step).
        lays = [x.decode_layout(Dv) for x in shards]
        main_w = max(m for _, m, _ in lays)
        W = max(w for _, _, w in lays)
        a = self._burst_inputs(Dv, W)
        for i, (x, (perm, _, _)) in enumerate(zip(shards, lays)):
          x.lay_out_burst(a, i, perm)
        bufs, hist, n_run = _burst(
            s.params,
            bufs,
            self._put(a),
            key,
            graphdef=self.graph,
            sampling=sampling.compile_key,
            num_decode=Dv,
            steps=BURST,
            impl=self.impl,
            main_slots=main_slots,
            main_width=main_w,
        )
        hist, n_run = np.asarray(hist), int(n_run)
        stats["bursts"] += 1
        stats["steps"] += n_run
        stats["slot_tokens"] += S * Dv * n_run
        for it in range(n_run):
          for i, (x, (perm, _, _)) in enumerate(zip(shards, lays)):
            x.stats["decode_tokens"] += sum(y is not None for y in x.slots)
            x.drawn(perm, hist[it, i])
        continue

      # One step: the decode slots' tokens and the prefill chunks.
      Rs = R if chunks else 0
      lays = [x.decode_layout(Dv) for x in shards]
      main_w = max(m for _, m, _ in lays)
      need_w = [w for _, _, w in lays] + [w for x in shards for w in x.widths(C)]
      if Rs:
        need_w.append(-(-C // ps))
      W = bucket(max(need_w), _MIN_WIDTH)
      a = self._step_inputs(Dv, W, Rs, C)
      a["route_row"][:], a["sample_row"][:], a["pre_u"][:] = Bs, Bs, U
      if Rs:
        a["kv_len"][:, Dv:] = C
      for i, (x, (perm, _, _)) in enumerate(zip(shards, lays)):
        x.lay_out_step(a, i, perm, Rs, C, Pl)
      stats["steps"] += 1
      stats["slot_tokens"] += S * Dv
      bufs, drawn = _step(
          s.params,
          bufs,
          self._put(a),
          key,
          graphdef=self.graph,
          sampling=sampling.compile_key,
          num_decode=Dv,
          chunk=C if Rs else 0,
          impl=self.impl,
          main_slots=main_slots,
          main_width=main_w,
      )
      drawn = np.asarray(drawn)
      for i, (x, (perm, _, _)) in enumerate(zip(shards, lays)):
        x.drawn(perm, drawn[i])

    for x in shards:  # (peak_pages: the sum of each shard's peak)
      stats.update(x.stats)
    stats["pages"] = S * n_pages
    stats["shards"] = S
    self.stats = dict(stats)
    rows = [row for x in shards for row in x.rows]
    lengths = np.asarray([len(x.resp) for x in rows], np.int32)
    eos = np.asarray([x.eos for x in rows])
    u_of_row = np.zeros((S, Bs), np.int32)
    prefix_cols = np.zeros((S, Bs, Pl), bool)
    for i, x in enumerate(shards):
      u_of_row[i, : len(x.rows)] = x.u_of_row
      for r, row in enumerate(x.rows):
        prefix_cols[i, r, Pl - len(row.prompt) : Pl - 1] = True
    rows_of = self._put(dict(u=u_of_row, c=prefix_cols))
    routes = self._finalize(bufs["routes"], bufs["prompt_routes"], rows_of["u"], rows_of["c"])
    flat = lambda x: x.reshape(S * Bs, *x.shape[2:])[:B]
    lengths_d = jnp.asarray(lengths)
    response_mask = jnp.arange(T)[None, :] < lengths_d[:, None]
    logp = flat(bufs["logp"])
    return SampleOutput(
        prompt_tokens=tok,
        prompt_mask=mask,
        tokens=flat(bufs["tokens"]),
        logp_mu=logp,
        response_mask=response_mask,
        lengths=lengths_d,
        finished_eos=jnp.asarray(eos),
        routes=flat(routes).reshape(B, Pl + T, *self.s._route_fill.shape),
        logp_nonfinite=jnp.any(response_mask & ~jnp.isfinite(logp), axis=1),
    )
