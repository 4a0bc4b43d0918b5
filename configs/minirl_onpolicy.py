"""On-policy MiniRL (N = 1, global batch = mini-batch), no routing replay, FP8 sampler.

  python -m fo_rl.main --config=configs/minirl_onpolicy.py --workdir=workdirs/minirl_onpolicy
  python -m fo_rl.main --config=configs/minirl_onpolicy.py:tiny --workdir=/tmp/tiny   # for tests

Recipe: the paper's on-policy best: one update per rollout batch, so the staleness ratio is 1 and the
clip mask is inactive; the token-level IS weight min(pi_old / mu, 5) corrects the FP8 sampler's
training-inference discrepancy; no replay (the paper finds R3 gives no gain on-policy).
Hardware: a 2-core CPU. Expected wall time: about 5 minutes
(the same model, cold start and 200 RL steps as configs/moe_r3.py, which measured 292 s).
Expected result: a rise in held-out accuracy like the default run's; not yet measured for this recipe.
"""

from fo_rl.config import base_config, tiny, variant


def get_config(arg: str = ""):
  arg = variant(arg, ("", "tiny"), __file__)
  c = base_config()
  c.name = "minirl_onpolicy"
  c.rl.mini_batches = 1
  c.rl.replay = "none"
  c.sampler.weight_dtype = "float8_e4m3fn"
  return tiny(c) if arg == "tiny" else c
