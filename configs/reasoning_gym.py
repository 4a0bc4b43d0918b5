"""A reasoning-gym dataset (procedural reasoning tasks with their own verifiers) as the RL task.

  python -m fo_rl.main --config=configs/reasoning_gym.py --workdir=workdirs/reasoning_gym
  python -m fo_rl.main --config=configs/reasoning_gym.py --workdir=workdirs/rg_basic_arithmetic --config.data.options.dataset=basic_arithmetic
  python -m fo_rl.main --config=configs/reasoning_gym.py:tiny --workdir=/tmp/rg_tiny   # seconds, for tests

Recipe: the default run's model and algorithm (MiniRL, N = 4, R3, FP8 sampler) on `data.options.dataset`
(default `leg_counting`; any name of `reasoning_gym.factory.DATASETS`; an unknown one is an error naming
`data.options.dataset`), `data.options.size` problems generated with `data.options.seed` (10% held out
by question hash). The reward is the dataset's own `score_answer` of the text after the response's
`####` (fo_rl/data/reasoning_gym_task.py). Cold start: SFT on the answers (`#### <answer>`, with the
teacher variant's share of wrong answers); reasoning-gym gives no worked solutions for most datasets, so
the cold start teaches the answer format and RL the rest. The questions are longer than the arithmetic
prompts: sampler.max_prompt_len and sft.max_len are raised to fit them with the committed tokenizer.
Hardware: a CPU is enough for the tiny variant; the full recipe has not been measured (no expected
result is claimed).
"""

from fo_rl.config import base_config, tiny, variant


def get_config(arg: str = ""):
  arg = variant(arg, ("", "tiny"), __file__)
  c = base_config()
  c.name = "reasoning_gym"
  c.data.task = "reasoning_gym"
  c.data.options = {"dataset": "leg_counting", "size": 2000, "seed": 0}
  c.rl.mini_batches = 4
  c.rl.replay = "r3"
  c.sampler.weight_dtype = "float8_e4m3fn"
  c.sampler.max_prompt_len = 384
  c.sft.max_len = 448
  if arg == "tiny":
    c = tiny(c)
    c.data.options = {"dataset": "leg_counting", "size": 200, "seed": 0}
  return c
