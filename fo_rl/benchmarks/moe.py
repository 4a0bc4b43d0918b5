"""MoE dispatch: the fast dropless path vs the dense one-hot reference, forward + backward, E/k = 4.

Peer = `dispatch_reference` (every expert on every token). Ratio = fast seconds / reference seconds;
lower is better, the target is <= 0.5 on a 2-core CPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fo_rl.benchmarks.common import row, time_jax
from fo_rl.model import moe


def _case(N, D, F, E, k, seed=0):
  keys = jax.random.split(jax.random.key(seed), 5)
  x = jax.random.normal(keys[0], (N, D), jnp.float32)
  ids, w = moe.route(jax.random.normal(keys[1], (N, E)), k)
  ex = moe.Experts(
      *(
          0.05 * jax.random.normal(kk, s)
          for kk, s in zip(keys[2:], [(E, D, F), (E, D, F), (E, F, D)])
      )
  )
  return x, ids, w, ex


def run(threads: int = 2, quick: bool = False):
  sizes = [(1024, 64, 128, 8, 2)] if quick else [(4096, 128, 256, 8, 2), (4096, 256, 512, 16, 4)]
  repeats = 2 if quick else 5
  for N, D, F, E, k in sizes:
    x, ids, w, ex = _case(N, D, F, E, k)

    def fwd_bwd(dispatch):
      def loss(x, w, ex):
        return jnp.sum(dispatch(x, ids, w, ex) ** 2)

      return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))

    ref = fwd_bwd(moe.dispatch_reference)
    t_ref = time_jax(ref, x, w, ex, repeats=repeats)
    for backend in ("blocked", "ragged_dot"):
      fast = fwd_bwd(lambda *a: moe.dispatch_fast(*a, backend=backend, block=64))
      t_fast = time_jax(fast, x, w, ex, repeats=repeats)
      yield row(
          f"moe_fwd_bwd/{backend}_vs_reference/N{N}_D{D}_F{F}_E{E}_k{k}",
          t_fast,
          t_ref,
          "seconds (lower is better; target ratio <= 0.5)",
          backend=jax.default_backend(),
          threads=threads,
      )
