"""Paper suites 2-3, off-policy (N = 2, 4, 8 mini-batch updates per rollout): clipping x routing replay.

One run (variant n8_r2, seed 0; every variant shares the seed's cold start through sft.cache_dir):

  python -m fo_rl.main --config=configs/paper/offpolicy.py:n8_r2 --workdir=workdirs/paper/n8_r2/seed0 --config.seed=0 --config.sft.cache_dir=workdirs/paper/sft_cache

The suite (tier 1: N=8 with the paper's three variants and clip-without-replay; tier 2: N=2 R2 / R3 for
finding 3a), 4 seeds, paired:

  python -m fo_rl.paper --suite=offpolicy --seeds=4 --workdir=workdirs/paper --variants=n8_r2_noclip,n8_minirl,n8_r2,n8_r3
  python -m fo_rl.paper --suite=offpolicy --seeds=4 --workdir=workdirs/paper --variants=n2_r2,n2_r3

Arg grammar (after the first ':' of --config): "<variant>" | "<variant>:tiny" | "tiny" | "" where
variant = n<N>_<recipe> (n2_noclip, ..., n8_minirl: 15 variants), N in {2, 4, 8} and recipe one of
  noclip      MiniRL without the clip mask (rl.loss.clip=False), no routing replay
  r2_noclip   MiniRL + R2 (the trainer's old-pass experts replayed), without the clip mask
  r2          MiniRL + R2
  r3          MiniRL + R3 (the sampler's experts replayed)
  minirl      MiniRL with the clip mask, no routing replay (isolates "replay is necessary")
"tiny" alone is the tiny version of the first variant (n2_noclip); "" is n2_noclip at full size.
Shared recipe: fo_rl.paper.suites.REGIME with design(N), the paper's design: the mini-batch is fixed
(8 prompts x 8 samples = 64 responses per update) and the global batch is N x it
(rl.prompts_per_step = 8 N), so updates 2..N of each RL step are off-policy; every run makes 144
gradient updates (144 / N RL steps, the same 9,216 samples at every N), compared at equal updates.
Do not pass --steps or --override=rl.prompts_per_step to the runner: they would break the design.
Expected (the paper, section 4.4): dropping clipping or replay collapses; R2 beats R3 at N=2, R3 beats R2
at N=4 and 8. Measured: see the suite's report.md.
"""

from fo_rl.paper.suites import design, suite_config

COMMON = {"rl.replay": "none", "rl.loss.clip": True}

_RECIPES = {
    "noclip": {"rl.loss.clip": False, "rl.replay": "none"},
    "r2_noclip": {"rl.loss.clip": False, "rl.replay": "r2"},
    "r2": {"rl.replay": "r2"},
    "r3": {"rl.replay": "r3"},
    "minirl": {"rl.replay": "none"},
}

VARIANTS = {
    f"n{n}_{name}": dict(knobs, **design(n)) for n in (2, 4, 8) for name, knobs in _RECIPES.items()
}

GROUP_BY = "rl.mini_batches"  # one figure row per N


def get_config(arg: str = ""):
  return suite_config("offpolicy", COMMON, VARIANTS, arg)
