"""QTensor: a quantized weight (low-precision values + per-output-channel scales) the model can consume.

The trainer's parameters are plain arrays; the sampler's copy replaces some of them with QTensors inside the
same nnx.Param slots, so both run the one model code. `materialize` is the only place a weight is read.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QTensor:
  """w ~= q * scale. `scale` has q's rank with size 1 on the contracted (input) axes, so slicing or
  gathering q along an output axis (an expert, a vocab row) slices scale the same way."""

  q: jax.Array  # int8 or float8_e4m3fn
  scale: jax.Array  # float32, broadcastable to q

  @property
  def shape(self):
    return self.q.shape

  @property
  def dtype(self):
    return self.q.dtype

  def __getitem__(self, idx) -> "QTensor":
    """Index along leading axes (e.g. pick experts); scale follows when its axis is not size 1."""
    idx = idx if isinstance(idx, tuple) else (idx,)
    sidx = tuple(
        i if self.scale.shape[d] == self.q.shape[d] else slice(None) for d, i in enumerate(idx)
    )
    scale = self.scale[sidx]
    return QTensor(self.q[idx], scale)


def materialize(w, dtype) -> jax.Array:
  """The weight in compute dtype. For a QTensor this is `convert(q) * scale` inside the jitted step: XLA
  fuses the dequantization into the matmul's operand on CPU, and on GPU/TPU it is the pattern the
  compiler's low-precision matmul rewrites start from."""
  if isinstance(w, QTensor):
    return w.q.astype(dtype) * w.scale.astype(dtype)
  return jnp.asarray(w).astype(dtype)
