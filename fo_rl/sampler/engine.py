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
  """One engine step: feed the flat tokens `inp` (layout: fo_rl.model.paged_attention.PagedBatch),
  write their KV into the page pools and their routes into the outputs, draw a token for every decode
  slot that samples. Returns (the updated buffers, the tokens drawn [D])."""
  model = nnx.merge(graphdef.graphdef, params)
  D = num_decode
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
  )
  valid = inp["valid"][:, None]
  h, routes, cache = model(
      inp["tokens"][:, None],
      inp["pos"][:, None],
      token_mask=valid,
      key_mask=valid,
      cache=[{"pages": p} for p in bufs["pages"]],
      cache_index=batch,
      return_hidden=True,
  )
  routes = routes[:, 0]  # [N, L, k]
  out_routes = bufs["routes"].at[inp["route_row"], inp["route_col"]].set(routes[:D], mode="drop")
  prompt_routes = bufs["prompt_routes"]
  if routes.shape[0] > D:
    prompt_routes = prompt_routes.at[inp["pre_u"], inp["pre_col"]].set(routes[D:], mode="drop")
  # Logits only where a token is drawn: the decode slots.
  logits = logits_at(model, h[:D, 0])
  keys = jax.vmap(lambda j: jax.random.fold_in(key, j))(inp["draw"])
  tok, lp = jax.vmap(
      lambda k, x, r: sample_logits(
          k, x[None], sampling.temperature, sampling.top_k, sampling.top_p, r
      )
  )(keys, logits, inp["row"])
  tok, lp = tok[:, 0], lp[:, 0]
  bufs = dict(
      pages=[c["pages"] for c in cache],
      routes=out_routes,
      prompt_routes=prompt_routes,
      tokens=bufs["tokens"].at[inp["sample_row"], inp["draw"]].set(tok, mode="drop"),
      logp=bufs["logp"].at[inp["sample_row"], inp["draw"]].set(lp, mode="drop"),
  )
  return bufs, tok


def engine_burst(
    params, bufs, inp, key, *, graphdef, sampling, num_decode, steps, impl, main_slots, main_width
):
  """Up to `steps` decode-only engine steps in one `lax.while_loop`, the slots' bookkeeping in the
  carry: each slot feeds the token it drew last (its first feed: inp["tokens"]), draws while not done
  (EOS or its cap), and goes idle after feeding its last token. The loop stops after `steps`, when
  every slot is idle, or (inp["refill"]) as soon as a slot finishes, so that the host can refill it.
  The host has given every slot the pages its next `steps` positions need. Returns (buffers, tokens
  drawn per iteration [steps, D], iterations run)."""
  D = num_decode
  B, T = bufs["tokens"].shape
  Pl = bufs["routes"].shape[1] - T
  plen, rows, cap = inp["plen"], inp["row"], inp["cap"]
  zeros = jnp.zeros((D,), jnp.int32)

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
        route_row=jnp.where(active, rows, B),
        route_col=Pl - plen + pos,
        row=rows,
        draw=jnp.maximum(pos - plen + 1, 0),
        sample_row=jnp.where(sample, rows, B),
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
    is_eos = jnp.zeros((D,), bool)
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
        jnp.any(finished) & inp["refill"],
    )

  init = (
      jnp.zeros((), jnp.int32),
      bufs,
      inp["tokens"],
      inp["pos"],
      inp["count"],
      inp["done"],
      inp["active"],
      jnp.zeros((steps, D), jnp.int32),
      jnp.zeros((), bool),
  )
  out = jax.lax.while_loop(lambda c: (c[0] < steps) & ~c[8] & jnp.any(c[6]), body, init)
  return out[1], out[7], out[0]


_TRACES = collections.Counter()  # engine_step traces (compiles), per step variant


def _counted_step(*args, **kw):
  _TRACES["engine_step"] += 1
  return engine_step(*args, **kw)


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


class PagedEngine:
  """The paged engine of one Sampler (its weights, mesh and config)."""

  def __init__(self, sampler):
    self.s = sampler
    self.config = sampler.config
    self.impl = PA.resolve(self.config.paged_attention)
    self.graph = _Graph(sampler.graphdef)
    self._finalize = jax.jit(self._finalize_impl)
    self.stats = {}

  @staticmethod
  def _finalize_impl(routes, prompt_routes, u_of_row, prefix_cols):
    """Prompt columns [P - len, P - 1) of each row from its prompt's shared prefill."""
    Pl = prompt_routes.shape[1]
    shared = prompt_routes[u_of_row]  # [B, P, L, k]
    head = jnp.where(prefix_cols[:, :, None, None], shared, routes[:, :Pl])
    return routes.at[:, :Pl].set(head)

  # ---- host side --------------------------------------------------------------------------------
  def pages_needed(self, prompt_len: int, max_new: int) -> int:
    """Pages one sequence of `prompt_len` prompt tokens and `max_new` response tokens holds at most,
    with the copy of its prompt's shared last page."""
    return -(-(prompt_len + max_new) // self.config.page_size) + 1

  def num_pages(self, prompt_lens: Sequence[int], max_new: int) -> int:
    """The pool size for a call: sampler.num_pages, or (None) enough pages for every slot to hold a
    sequence of the longest prompt at max_new_tokens, plus the prefixes and chunks in flight."""
    c = self.config
    if c.num_pages is not None:
      return c.num_pages
    longest = max(prompt_lens)
    return (
        1
        + c.num_slots * self.pages_needed(longest, max_new)
        + (c.prefill_rows + 1) * (-(-(longest + c.prefill_chunk) // c.page_size))
    )

  def _pages_ahead(self, slots, busy, alloc: _Pages, caps) -> bool:
    """Give each busy slot the pages of its next BURST positions (up to its last possible one);
    False when the pool cannot (the per-step path then preempts as needed)."""
    ps = self.config.page_size
    for i in busy:
      row = slots[i]
      last = min(row.pos + BURST, len(row.prompt) + int(caps[row.r])) - 1
      while len(row.pages) <= last // ps:
        p = alloc.alloc()
        if p is None:
          return False
        row.pages.append(p)
    return True

  def generate(self, prompts, sampling: SamplingParams, seed=0, max_new_per_row=None):
    s, c = self.s, self.config
    if s.params is None:
      raise RuntimeError("Sampler has no weights: call update_weights(trainer_state) first")
    tok, mask = s.pad_prompts(prompts)
    B, Pl = tok.shape
    T = bucket(sampling.max_new_tokens, c.gen_bucket)
    max_new = sampling.max_new_tokens
    ps, D, C, R = c.page_size, c.num_slots, c.prefill_chunk, c.prefill_rows
    prompts = [np.asarray(p, np.int32) for p in prompts]
    lens = [len(p) for p in prompts]
    n_pages = self.num_pages(lens, max_new)
    need = self.pages_needed(max(lens), max_new) + 1  # + the trash page
    if n_pages < need:
      raise ValueError(
          f"sampler.num_pages={n_pages}: too small for one sequence of the longest prompt "
          f"({max(lens)} tokens) plus max_new_tokens={max_new} at sampler.page_size={ps}: "
          f"needs at least {need}"
      )
    cfg = s.model_cfg
    rep = NamedSharding(s.mesh, P())
    key = seed if isinstance(seed, jax.Array) else jax.random.key(int(seed))
    key = jax.device_put(key, rep)

    # Unique prompts share one prefix prefill.
    uniq, u_of_row = {}, np.zeros(B, np.int32)
    prefixes = []
    for r, p in enumerate(prompts):
      t = tuple(p.tolist())
      if t not in uniq:
        uniq[t] = len(prefixes)
        prefixes.append(_Prefix(tokens=p[:-1], u=len(prefixes), waiting=0))
      u_of_row[r] = uniq[t]
      prefixes[uniq[t]].waiting += 1
    U = len(prefixes)
    caps = np.full(B, max_new, np.int32) if max_new_per_row is None else max_new_per_row
    rows = [_Row(r=r, prompt=prompts[r], prefix=prefixes[u_of_row[r]]) for r in range(B)]

    fill = jnp.asarray(s._route_fill)
    route_shape = (cfg.num_layers, cfg.route_slots)
    pool_shape = (n_pages, ps, 2 * cfg.num_kv_heads, cfg.head_dim)
    bufs = jax.device_put(
        dict(
            pages=[jnp.zeros(pool_shape, s._cache_dtype) for _ in range(cfg.num_layers)],
            routes=jnp.broadcast_to(fill, (B, Pl + T, *route_shape)),
            prompt_routes=jnp.broadcast_to(fill, (U, Pl, *route_shape)),
            tokens=jnp.full((B, T), c.pad_id, jnp.int32),
            logp=jnp.zeros((B, T), jnp.float32),
        ),
        rep,
    )

    alloc = _Pages(n_pages)
    waiting = collections.deque(rows)
    slots: list[_Row | None] = [None] * D
    prefilling: list[_Prefix] = []  # started, not ready
    stamp = 0
    stats = collections.Counter()

    def release_prefix(pf: _Prefix):
      alloc.decref(pf.pages)
      pf.pages = []

    def preempt(row: _Row):
      """Free `row`'s pages and slot; it resumes later from a private prefill of its tokens so far."""
      alloc.decref(row.pages)
      row.pages = []
      slots[slots.index(row)] = None
      seq = np.asarray([row.token_at(p) for p in range(row.pos)], np.int32)
      row.prefix = _Prefix(tokens=seq, u=None, waiting=1)
      waiting.appendleft(row)
      stats["preemptions"] += 1

    def victim(exclude=None):
      live = [x for x in slots if x is not None and x is not exclude]
      return max(live, key=lambda x: x.admitted) if live else None

    def drop_idle_prefix() -> bool:
      """Free the pages of a prefix no live sequence uses yet (it is prefilled again later)."""
      held = {id(p): p for p in prefixes + [x.prefix for x in waiting] if p.pages}
      for pf in sorted(held.values(), key=lambda p: (p.ready, p.done)):  # least progress first
        if pf in prefilling or pf.ready:
          release_prefix(pf)
          pf.done, pf.started = 0, False
          if pf in prefilling:
            prefilling.remove(pf)
          stats["prefix_drops"] += 1
          return True
      return False

    def admit(row: _Row, slot: int, copies: list) -> bool:
      """Put `row` in `slot`: its page table starts with its prefix's full pages (shared) and a copy
      of the prefix's partly filled last page (the prefix's last row takes that page itself)."""
      pf = row.prefix
      full, rem = divmod(len(pf.tokens), ps)
      own = list(pf.pages[:full])
      for p in own:
        alloc.incref(p)
      if rem:
        last = pf.pages[full]
        if pf.waiting == 1:  # no other row will copy it: the prefix's reference moves to the row
          pf.pages = pf.pages[:full]
          own.append(last)
        else:
          new = alloc.alloc()
          if new is None:
            alloc.decref(own)
            return False
          copies.append((last, new))
          own.append(new)
      row.pages, row.pos = own, len(pf.tokens)
      pf.waiting -= 1
      if pf.waiting == 0:
        release_prefix(pf)
      slots[slot] = row
      return True

    def decode_layout(busy):
      """(perm, main_width, W): the device position of each busy slot (perm[d]: the slot at position
      d, None: idle; Dv = len(perm) positions, the power of two >= the busy slots, at least
      _MIN_SLOTS and at most num_slots, so a step with few busy slots computes few), the Dv // 8
      longest sequences (in pages) at the last positions, the page-table width the other positions
      read (`PagedBatch.main_width`) and the full width."""
      Dv = min(D, bucket(len(busy), _MIN_SLOTS))  # positions: fewer when few slots are busy
      L = max(1, Dv // 8)
      order = sorted(busy, key=lambda i: len(slots[i].pages))
      n_long = min(L, len(order))
      main, long = order[: len(order) - n_long], order[len(order) - n_long :]
      perm = main + [None] * (Dv - L - len(main)) + long + [None] * (L - n_long)
      need = lambda group: max([len(slots[i].pages) for i in group] + [1])
      main_w = bucket(need(main), _MIN_WIDTH)
      return perm, main_w, max(main_w, bucket(need(order), _MIN_WIDTH))

    def feed_and_draw(busy, drawn):
      """The host's record of one step: each busy slot fed one token and drew `drawn[i]` unless done
      (the rules `engine_burst` applies on device); finished rows free their pages and slots."""
      for i in busy:
        row = slots[i]
        if not row.done:
          t = int(drawn[i])
          row.resp.append(t)
          row.eos = t in sampling.eos_ids
          row.done = row.eos or len(row.resp) >= caps[row.r]
        row.pos += 1
        if row.finished:
          alloc.decref(row.pages)
          row.pages = []
          slots[i] = None

    while waiting or any(x is not None for x in slots):
      copies = []
      # 1. Admission: free slots take the first waiting rows whose prefix is ready.
      for row in list(waiting):
        if None not in slots:
          break
        pf = row.prefix
        if len(pf.tokens) == 0:
          pf.started = True
        if pf.ready and admit(row, slots.index(None), copies):
          waiting.remove(row)
          row.admitted = stamp = stamp + 1
          stats["admissions"] += 1
      # 2. Pages for the tokens the slots feed now (oldest first; preempt the newest when out).
      for row in sorted((x for x in slots if x is not None), key=lambda x: x.admitted):
        if row not in slots:
          continue  # preempted in this loop
        while len(row.pages) <= row.pos // ps:
          p = alloc.alloc()
          if p is None and drop_idle_prefix():
            continue
          if p is None:
            v = victim()
            preempt(v)
            if v is row:
              break
            continue
          row.pages.append(p)
      # 3. Prefill: start the prefixes of the next waiting rows (resumes first), one chunk each.
      lookahead = sum(1 for x in waiting if x.prefix.started)
      for row in waiting:
        pf = row.prefix
        if len(prefilling) >= R or lookahead >= D:
          break
        if not pf.started and len(pf.tokens):
          pf.started = True
          prefilling.append(pf)
          lookahead += pf.waiting
      chunks = []
      for pf in list(prefilling):
        start = pf.done
        n = min(C, len(pf.tokens) - start)
        ok = True
        while len(pf.pages) * ps < start + n:
          p = alloc.alloc()
          if p is None:
            ok = False
            break
          pf.pages.append(p)
        if ok:
          chunks.append((pf, start, n))
      busy = [i for i, x in enumerate(slots) if x is not None]
      if not busy and not chunks:
        # Only prefixes hold pages and none can grow or be admitted: drop one and retry.
        if drop_idle_prefix():
          continue
        raise PoolExhausted(
            f"sampler.num_pages={n_pages}: the page pool cannot make progress (no sequence can "
            f"run and no prefill chunk fits); raise sampler.num_pages"
        )

      # 4a. Nothing for the host to do between decode steps: a burst of decode steps on device, the
      # slots' pages allocated ahead for it (the draws then replayed here, step by step).
      if busy and not chunks and not copies and self._pages_ahead(slots, busy, alloc, caps):
        perm, main_w, W = decode_layout(busy)
        Dv = len(perm)
        a = dict(
            tokens=np.zeros(Dv, np.int32),
            pos=np.zeros(Dv, np.int32),
            count=np.zeros(Dv, np.int32),
            done=np.zeros(Dv, bool),
            active=np.zeros(Dv, bool),
            cap=np.ones(Dv, np.int32),
            plen=np.ones(Dv, np.int32),
            row=np.zeros(Dv, np.int32),
            page_table=np.zeros((Dv, W), np.int32),
            refill=np.asarray(bool(waiting)),
        )
        for d, i in enumerate(perm):
          if i is None:
            continue
          row = slots[i]
          a["tokens"][d], a["pos"][d] = row.token_at(row.pos), row.pos
          a["count"][d], a["done"][d], a["active"][d] = len(row.resp), row.done, True
          a["cap"][d], a["plen"][d], a["row"][d] = caps[row.r], len(row.prompt), row.r
          a["page_table"][d, : len(row.pages)] = row.pages
        stats["peak_pages"] = max(stats["peak_pages"], n_pages - 1 - len(alloc.free))
        bufs, hist, n_run = _burst(
            s.params,
            bufs,
            a,
            key,
            graphdef=self.graph,
            sampling=sampling.compile_key,
            num_decode=Dv,
            steps=BURST,
            impl=self.impl,
            main_slots=Dv - max(1, Dv // 8),
            main_width=main_w,
        )
        hist, n_run = np.asarray(hist), int(n_run)
        hist = hist[:, [perm.index(i) if i in perm else 0 for i in range(D)]]  # host slot order
        stats["bursts"] += 1
        stats["steps"] += n_run
        stats["slot_tokens"] += Dv * n_run
        for it in range(n_run):
          stats["decode_tokens"] += sum(x is not None for x in slots)
          feed_and_draw([i for i, x in enumerate(slots) if x is not None], hist[it])
        continue

      # 4. The step's layout.
      Rs = R if chunks else 0
      perm, main_w, W = decode_layout(busy)
      Dv = len(perm)
      Q = Dv + Rs
      need_w = [W] + [-(-(st + C) // ps) for _, st, _ in chunks]
      if Rs:
        need_w.append(-(-C // ps))
      W = bucket(max(need_w), _MIN_WIDTH)
      N = Dv + Rs * C
      a = dict(
          tokens=np.zeros(N, np.int32),
          pos=np.zeros(N, np.int32),
          valid=np.zeros(N, bool),
          page_table=np.zeros((Q, W), np.int32),
          kv_len=np.ones(Q, np.int32),
          copy_src=np.zeros(D, np.int32),
          copy_dst=np.zeros(D, np.int32),
          route_row=np.full(Dv, B, np.int32),
          route_col=np.zeros(Dv, np.int32),
          row=np.zeros(Dv, np.int32),
          draw=np.zeros(Dv, np.int32),
          sample_row=np.full(Dv, B, np.int32),
          pre_u=np.full(Rs * C, U, np.int32),
          pre_col=np.zeros(Rs * C, np.int32),
      )
      for j, (src, dst) in enumerate(copies):
        a["copy_src"][j], a["copy_dst"][j] = src, dst
      for d, i in enumerate(perm):
        if i is None:
          continue
        row = slots[i]
        n = len(row.prompt)
        a["tokens"][d] = row.token_at(row.pos)
        a["pos"][d] = row.pos
        a["valid"][d] = True
        a["page_table"][d, : len(row.pages)] = row.pages
        a["kv_len"][d] = row.pos + 1
        a["row"][d] = row.r
        a["route_row"][d] = row.r  # (positions from n - 1 on: each fed once, resumes included)
        a["route_col"][d] = Pl - n + row.pos
        if not row.done:
          a["sample_row"][d] = row.r
          a["draw"][d] = row.pos - n + 1
      for q in range(Rs):
        base = Dv + q * C
        a["kv_len"][Dv + q] = C
        if q >= len(chunks):
          continue
        pf, st, n = chunks[q]
        a["tokens"][base : base + n] = pf.tokens[st : st + n]
        a["pos"][base : base + C] = st + np.arange(C)
        a["valid"][base : base + n] = True
        a["page_table"][Dv + q, : len(pf.pages)] = pf.pages
        a["kv_len"][Dv + q] = st + C
        if pf.u is not None:
          plen = len(pf.tokens) + 1
          a["pre_u"][q * C : q * C + n] = pf.u
          a["pre_col"][q * C : q * C + n] = Pl - plen + st + np.arange(n)
      stats["steps"] += 1
      stats["peak_pages"] = max(stats["peak_pages"], n_pages - 1 - len(alloc.free))
      stats["decode_tokens"] += len(busy)
      stats["prefill_tokens"] += sum(n for _, _, n in chunks)
      stats["slot_tokens"] += Dv
      bufs, drawn = _step(
          s.params,
          bufs,
          a,
          key,
          graphdef=self.graph,
          sampling=sampling.compile_key,
          num_decode=Dv,
          chunk=C if Rs else 0,
          impl=self.impl,
          main_slots=Dv - max(1, Dv // 8),
          main_width=main_w,
      )
      drawn = np.asarray(drawn)[[perm.index(i) if i in perm else 0 for i in range(D)]]

      # 5. Bookkeeping: draws, EOS / length, finished rows free their pages and slots.
      feed_and_draw(busy, drawn)
      for pf, st, n in chunks:
        pf.done = st + n
        if pf.ready:
          prefilling.remove(pf)

    stats["pages"] = n_pages
    self.stats = dict(stats)
    lengths = np.asarray([len(x.resp) for x in rows], np.int32)
    eos = np.asarray([x.eos for x in rows])
    prefix_cols = np.zeros((B, Pl), bool)
    for r, n in enumerate(lens):
      prefix_cols[r, Pl - n : Pl - 1] = True
    routes = self._finalize(bufs["routes"], bufs["prompt_routes"], u_of_row, prefix_cols)
    lengths_d = jnp.asarray(lengths)
    response_mask = jnp.arange(T)[None, :] < lengths_d[:, None]
    logp = bufs["logp"]
    return SampleOutput(
        prompt_tokens=tok,
        prompt_mask=mask,
        tokens=bufs["tokens"],
        logp_mu=logp,
        response_mask=response_mask,
        lengths=lengths_d,
        finished_eos=jnp.asarray(eos),
        routes=routes.astype(route_dtype(self.s.model_cfg.num_experts)),
        logp_nonfinite=jnp.any(response_mask & ~jnp.isfinite(logp), axis=1),
    )
