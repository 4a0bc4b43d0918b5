"""The tests' toy model: a Qwen3-MoE decoder at the smallest size that still has every feature (MoE
and dense layers, grouped-query attention, top-2 routing); it compiles in seconds on CPU.

    hidden 32, 3 layers (layer 1 dense: `mlp_only_layers=(1,)`; layers 0 and 2 MoE), 4 query heads
    and 2 KV heads of dim 8, dense MLP 48, 8 experts of width 16, top-2, vocabulary 128.

Import it as `from toy import TOY` (pytest puts tests/ on sys.path) and derive variants with
`TOY.replace(...)`. The `toy_model` fixture (tests/conftest.py) holds its parameters at seed 0,
built once per session.
"""

from fo_rl.model import ModelConfig

TOY = ModelConfig(
    vocab_size=128,
    hidden_size=32,
    num_layers=3,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    intermediate_size=48,
    moe_intermediate_size=16,
    num_experts=8,
    num_experts_per_tok=2,
    mlp_only_layers=(1,),
)
