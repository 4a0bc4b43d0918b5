"""Shape-first initialization and the pure forward function the losses use.

abstract = nnx.eval_shape(build)            # no memory
shardings = state_shardings(abstract, ...)  # logical axes -> mesh via the rules table
state = jax.jit(init, out_shardings=shardings)()  # each device materializes only its shard
"""

from __future__ import annotations

import jax
from flax import nnx
from jax.sharding import Mesh

from fo_rl.model.config import ModelConfig
from fo_rl.model.transformer import Transformer
from fo_rl.parallel.sharding import DEFAULT_RULES, Rules, state_shardings


def abstract_model(
    cfg: ModelConfig, mesh: Mesh | None = None, rules: Rules = DEFAULT_RULES, seed: int = 0
):
  """(graphdef, abstract state of jax.ShapeDtypeStruct) without allocating parameters."""
  model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(seed), mesh=mesh, rules=rules))
  return nnx.split(model)


def init_model(
    cfg: ModelConfig, mesh: Mesh | None = None, rules: Rules = DEFAULT_RULES, seed: int = 0
):
  """(graphdef, state) with every parameter created directly in its sharding over `mesh`."""
  graphdef, abstract = abstract_model(cfg, mesh, rules, seed)

  def build():
    return nnx.split(Transformer(cfg, rngs=nnx.Rngs(seed), mesh=mesh, rules=rules))[1]

  if mesh is None:
    return graphdef, jax.jit(build)()
  shardings = state_shardings(abstract, mesh, rules)
  return graphdef, jax.jit(build, out_shardings=shardings)()


def forward(graphdef, state, tokens, positions, routes=None, token_mask=None):
  """Pure forward: (logits [B, T, V] float32, the routes chosen live [B, T, L, k] int32); `routes`
  [B, T, L, k]: the routes to replay (`Transformer.__call__`), None: live routing. Usable inside jax.jit.
  """
  logits, live_routes, _ = nnx.merge(graphdef, state)(
      tokens, positions, routes, token_mask=token_mask
  )
  return logits, live_routes


def make_apply(graphdef):
  """apply(state, tokens, positions, routes=None, token_mask=None) -> (logits, live routes)."""

  def apply(state, tokens, positions, routes=None, token_mask=None):
    return forward(graphdef, state, tokens, positions, routes, token_mask)

  return apply


def make_scorer(graphdef, chunk: int = 0):
  """score(state, tokens, positions, routes=None, token_mask=None, temperature=1.0, entropy=False,
  segment_ids=None)
  -> ((logp [B, T], entropy [B, T] or None), live routes): the trainer's view of the model
  (fo_rl/model/logprobs.py). chunk 0: from the whole logits [B, T, V]; chunk > 0: `chunk` positions at a
  time from the hidden states, never holding more than one chunk's logits (forward or backward)."""
  from fo_rl.model import logprobs

  def score(
      state,
      tokens,
      positions,
      routes=None,
      token_mask=None,
      temperature=1.0,
      entropy=False,
      segment_ids=None,
  ):
    model = nnx.merge(graphdef, state)
    kw = dict(token_mask=token_mask, segment_ids=segment_ids)
    if chunk <= 0:
      logits, live_routes, _ = model(tokens, positions, routes, **kw)
      return logprobs.full(logits, tokens, temperature, entropy), live_routes
    hidden, live_routes, _ = model(tokens, positions, routes, return_hidden=True, **kw)
    out = logprobs.chunked(hidden, model.head_matrix(), tokens, temperature, chunk, entropy)
    return out, live_routes

  return score


def positions_from_mask(token_mask):
  """Positions for left-padded rows: 0 at the first real token, counting real tokens only."""
  import jax.numpy as jnp

  return jnp.maximum(jnp.cumsum(token_mask.astype(jnp.int32), axis=-1) - 1, 0)
