"""The sampler -> trainer contract: `Rollouts`, one global batch in the trainer's layout (built from the
sampler's output by `Rollouts.from_sample`), the layout of its routes, and which routes each pass of the
train step feeds the gating under Routing Replay (`PASS_ROUTES`, `pass_routes`; algorithms.md section 5).

Layout. A batch has B rows of [prompt (P) | response (T)]: prompts left-padded to P, responses
right-padded to T, so every row's first response token sits at column P. Every per-token array is
[B, P + T] and holds the value *of the token at that column*; positions count real tokens only (0 at a
row's first real prompt token, `fo_rl.model.positions_from_mask`), so padding changes nothing a real token
sees. The model's logits at column j predict token j + 1: response token t (column P + t) is scored by
logits[:, P - 1 + t] (`fo_rl.rl.trainer.token_logprobs`).

Routes. `routes` [B, P + T, L, k] (int8 up to 128 experts: `fo_rl.model.route_dtype`):
`routes[b, j, l]` are the k experts layer l used when token j of row b was fed to the model. One
tensor, one name and one layout from the sampler to the gating: the sampler records it
(`SampleOutput.routes`), `Rollouts.routes` carries it, the model replays it
(`Transformer(tokens, positions, routes)`, `fo_rl.model.forward` / `make_apply`) and returns the routes
it chose live in the same layout; layer l's slice `routes[:, :, l]` [B, T, k] is what its MoE block
and `fo_rl.model.moe.route` take as `routes`. Dense layers hold `DENSE_ROUTE` (-1) everywhere; MoE layers
hold ids in [0, E) at real tokens. Padding columns (token_mask False) are never checked and never
replayed: the model routes them live.

Passes. A train step runs the old-logprob pass (logp_old), then N mini-batch updates. The routes each one
feeds the gating (`PASS_ROUTES`):

    replay | old pass                              | updates
    none   | live                                  | live
    r2     | live (its routes are recorded)        | the old pass's recorded live routes
    r3     | the sampler's (`Rollouts.routes`)     | the sampler's

(Under r3 the old pass also runs live, for the disagreement metrics; `Trainer._old_pass_fn`.)
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

from fo_rl.model import positions_from_mask
from fo_rl.parallel.multihost import host_get

if TYPE_CHECKING:
  from fo_rl.sampler import SampleOutput

# replay mode -> pass -> the routes it feeds the gating: None (live routing), "live" (the routes the
# old-logprob pass chose live: r2 records them) or "sampler" (`Rollouts.routes`).
PASS_ROUTES = {
    "none": {"old": None, "update": None},
    "r2": {"old": None, "update": "live"},
    "r3": {"old": "sampler", "update": "sampler"},
}
REPLAY_MODES = tuple(PASS_ROUTES)
PASSES = ("old", "update")


def pass_routes(replay: str, pass_: str, *, sampler, live=None):
  """The routes pass `pass_` ("old": the old-logprob pass, "update": each mini-batch update) feeds the
  gating under replay mode `replay`: None (live routing), `sampler` (the rollouts' routes) or `live` (the
  old pass's live routes), as `PASS_ROUTES` says."""
  if replay not in PASS_ROUTES:
    raise ValueError(f"rl.replay={replay!r}: must be one of {REPLAY_MODES}")
  if pass_ not in PASSES:
    raise ValueError(f"pass {pass_!r}: must be one of {PASSES}")
  source = PASS_ROUTES[replay][pass_]
  if source == "live" and live is None:
    raise ValueError(f"rl.replay={replay!r}: the {pass_} pass replays the old pass's live routes")
  return {None: None, "live": live, "sampler": sampler}[source]


def replays_sampler(replay: str) -> bool:
  """Whether some pass of replay mode `replay` feeds the sampler's routes to the gating (they are outside
  data, to be validated before use)."""
  return "sampler" in PASS_ROUTES[replay].values()


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Rollouts:
  """A global batch of sampled sequences in the layout of the module docstring ([B, P + T], prompt
  left-padded, response right-padded). Per-token arrays hold the value *of the token at that column*.
  """

  tokens: jax.Array  # [B, P + T] int32
  token_mask: jax.Array  # [B, P + T] bool: real tokens (prompt or response)
  positions: jax.Array  # [B, P + T] int32
  response_mask: jax.Array  # [B, P + T] float32: 1 on sampled response tokens
  logp_mu: jax.Array  # [B, P + T] float32: sampler logprob of each response token, 0 elsewhere
  routes: jax.Array  # [B, P + T, L, k] route_dtype(E): the experts used when each token was fed
  advantages: jax.Array  # [B] float32

  @classmethod
  def from_sample(cls, out: SampleOutput, advantages) -> Rollouts:
    """The rollouts of sampler output `out` ([B, P] prompts, [B, T] responses, routes [B, P + T, L, k])
    with per-row `advantages` [B]."""
    P = out.prompt_tokens.shape[1]
    tokens = jnp.concatenate([out.prompt_tokens, out.tokens], axis=1)
    token_mask = jnp.concatenate([out.prompt_mask, out.response_mask], axis=1)
    if tuple(out.routes.shape[:2]) != tuple(tokens.shape):
      raise ValueError(
          f"SampleOutput.routes has shape {tuple(out.routes.shape)}: expected [B, P + T, L, k] with "
          f"[B, P + T] = {tuple(tokens.shape)}"
      )
    if np.shape(advantages) != tokens.shape[:1]:
      raise ValueError(
          f"advantages have shape {np.shape(advantages)}: expected one per row, [{tokens.shape[0]}]"
      )
    check_logp_mu(out)
    pad = lambda x: jnp.pad(x.astype(jnp.float32), ((0, 0), (P, 0)))  # noqa: E731
    return cls(
        tokens=tokens,
        token_mask=token_mask,
        positions=positions_from_mask(token_mask),
        response_mask=pad(out.response_mask),
        logp_mu=pad(out.logp_mu),
        routes=out.routes,
        advantages=jnp.asarray(advantages, jnp.float32),
    )


def check_logp_mu(out: SampleOutput) -> None:
  """ValueError naming the rows whose response holds a non-finite `logp_mu` (NaN or inf in the sampler's
  logits: the token drawn there is meaningless, and the IS weights and KL metrics would be NaN). Reads
  `out.logp_nonfinite` ([B] bool) when the sampler gave it, else derives it from `logp_mu` and
  `response_mask`; a host (numpy) flag costs no device read (fo_rl/run.py fetches it with the tokens).
  Traced outputs (inside jit) are not checked."""
  bad = out.logp_nonfinite
  if bad is None:
    bad = jnp.any(jnp.asarray(out.response_mask, bool) & ~jnp.isfinite(out.logp_mu), axis=1)
  if isinstance(bad, jax.core.Tracer):
    return
  if isinstance(bad, jax.Array):
    bad = host_get(bad)
  rows = np.flatnonzero(np.asarray(bad))
  if rows.size:
    shown = ", ".join(map(str, rows[:10])) + (", ..." if rows.size > 10 else "")
    raise ValueError(
        f"SampleOutput.logp_mu is not finite at response tokens of {rows.size} of "
        f"{np.shape(bad)[0]} rows (rows {shown}): the sampler's logits held NaN or inf there, so "
        f"those tokens were not drawn from a distribution (check the sampler's weights, "
        f"sampler.weight_dtype and the model's numerics)"
    )
