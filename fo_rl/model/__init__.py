"""The Qwen3-MoE-style model: config, NNX modules, gating/dispatch, init and the pure forward."""

from fo_rl.model.config import ModelConfig
from fo_rl.model.init import (abstract_model, forward, init_model, make_apply, positions_from_mask)
from fo_rl.model.moe import Experts, dispatch_fast, dispatch_reference, route
from fo_rl.model.qtensor import QTensor, materialize
from fo_rl.model.transformer import (
    DENSE_ROUTE,
    Transformer,
    route_dtype,
    validate_replay_routes,
)

__all__ = [
    "DENSE_ROUTE",
    "route_dtype",
    "Experts",
    "ModelConfig",
    "QTensor",
    "Transformer",
    "abstract_model",
    "dispatch_fast",
    "dispatch_reference",
    "forward",
    "init_model",
    "make_apply",
    "materialize",
    "positions_from_mask",
    "route",
    "validate_replay_routes",
]
