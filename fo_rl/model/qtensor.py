"""QTensor: a quantized weight (low-precision values + per-output-channel scales) the model can consume.

The trainer's parameters are plain arrays; the sampler's copy replaces some of them with QTensors inside the
same nnx.Param slots, so both run the one model code. A weight is read through `materialize` (dequantize)
or, at the matmul sites, through fo_rl/model/qdot.py (quantized matmuls, `act_dtype`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QTensor:
  """w ~= q * scale. `scale` has q's rank with size 1 on the contracted (input) axes, so slicing or
  gathering q along an output axis (an expert, a vocab row) slices scale the same way.

  `act_dtype` (static: part of the tree structure, not a leaf): None for weight-only quantization, or
  the dtype the matmuls quantize their activations to ("float8_e4m3fn" / "float8_e5m2" / "int8",
  fo_rl/model/qdot.py).
  """

  q: jax.Array  # int8, int4, float8_e4m3fn or float8_e5m2
  scale: jax.Array  # float32, broadcastable to q
  act_dtype: str | None = dataclasses.field(default=None, metadata=dict(static=True))

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
    return QTensor(self.q[idx], scale, self.act_dtype)

  def map(self, fn) -> "QTensor":
    """The same layout change (transpose, reshape) applied to q and scale."""
    return QTensor(fn(self.q), fn(self.scale), self.act_dtype)


def materialize(w, dtype) -> jax.Array:
  """The weight in compute dtype. For a QTensor this is `convert(q) * scale` inside the jitted step: XLA
  fuses the dequantization into the matmul's operand on CPU, and on GPU/TPU it is the pattern the
  compiler's low-precision matmul rewrites start from."""
  if isinstance(w, QTensor):
    return w.q.astype(dtype) * w.scale.astype(dtype)
  return jnp.asarray(w).astype(dtype)
