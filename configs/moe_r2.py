"""Off-policy MiniRL (N = 2) with vanilla Routing Replay (R2) and an FP8 sampler.

  python -m fo_rl.main --config=configs/moe_r2.py --workdir=workdirs/moe_r2
  python -m fo_rl.main --config=configs/moe_r2.py:tiny --workdir=/tmp/tiny   # seconds, for tests

Recipe: as configs/moe_r3.py, but the global batch is split into N = 2 mini-batches and the experts the
*trainer* chose in the old-logprob pass are replayed in every update (R2: unbiased in the first
mini-batch, which the paper finds best at low off-policiness). Hardware: a 2-core CPU.
Expected wall time: about 5 minutes
(the same model, cold start and 200 RL steps as configs/moe_r3.py, which measured 292 s).
Expected result: a rise in held-out accuracy like the default run's; not yet measured for this recipe.
"""

from fo_rl.config import base_config, tiny, variant


def get_config(arg: str = ""):
  arg = variant(arg, ("", "tiny"), __file__)
  c = base_config()
  c.name = "moe_r2"
  c.rl.mini_batches = 2
  c.rl.replay = "r2"
  c.sampler.weight_dtype = "float8_e4m3fn"
  return tiny(c) if arg == "tiny" else c
