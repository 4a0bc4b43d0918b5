"""Paper suites 2-3, off-policy (N = 2, 4, 8 mini-batch updates per rollout): clipping x routing replay.

One run (variant n4_r2, seed 0; every variant shares the seed's cold start through sft.cache_dir):

  python -m fo_rl.main --config=configs/paper/offpolicy.py:n4_r2 --workdir=workdirs/paper/n4_r2/seed0 --config.seed=0 --config.sft.cache_dir=workdirs/paper/sft_cache

The whole suite, 3 seeds, with report.md / results.json / offpolicy.png:

  python -m fo_rl.paper --suite=offpolicy --seeds=3 --workdir=workdirs/paper

Arg grammar (after the first ':' of --config): "<variant>" | "<variant>:tiny" | "tiny" | "" where
variant = n<N>_<recipe> (n2_noclip, ..., n8_minirl: 15 variants), N in {2, 4, 8} and recipe one of
  noclip      MiniRL without the clip mask (rl.loss.clip=False), no routing replay
  r2_noclip   MiniRL + R2 (the trainer's old-pass experts replayed), without the clip mask
  r2          MiniRL + R2
  r3          MiniRL + R3 (the sampler's experts replayed)
  minirl      MiniRL with the clip mask, no routing replay (isolates "replay is necessary")
"tiny" alone is the tiny version of the first variant (n2_noclip); "" is n2_noclip at full size.
Shared recipe: fo_rl.config.base_config() (4-layer 8-expert top-2 MoE, cold start on the 'careful'
teacher, FP8 e4m3 sampler weights) with rl.mini_batches=N: the global batch of
rl.prompts_per_step x rl.group_size responses is split into N updates, so updates 2..N are off-policy.
Hardware: a 2-core CPU. Measured (docs/results/paper/report.md): the suite in miniature (--steps=40
--override=rl.prompts_per_step=8 --override=optim.learning_rate=1.5e-4 --override=eval.num_prompts=64,
as in the README) took 28.4 min for 45 runs, about 0.6 min per run after the shared cold start; the full
recipe (200 RL steps of 16 prompts) takes about 4 min of RL per run.
Expected (the paper, section 4.4): dropping clipping or replay collapses; R2 beats R3 at N=2, R3 beats R2
at N=4 and 8. Measured: see the suite's report.md.
"""

from fo_rl.paper.suites import suite_config

COMMON = {
    "rl.replay": "none",
    "rl.loss.clip": True,
    "sampler.weight_dtype": "float8_e4m3fn",
}

_RECIPES = {
    "noclip": {"rl.loss.clip": False, "rl.replay": "none"},
    "r2_noclip": {"rl.loss.clip": False, "rl.replay": "r2"},
    "r2": {"rl.replay": "r2"},
    "r3": {"rl.replay": "r3"},
    "minirl": {"rl.replay": "none"},
}

VARIANTS = {
    f"n{n}_{name}": dict(knobs, **{"rl.mini_batches": n})
    for n in (2, 4, 8)
    for name, knobs in _RECIPES.items()
}

GROUP_BY = "rl.mini_batches"  # one figure row per N


def get_config(arg: str = ""):
  return suite_config("offpolicy", COMMON, VARIANTS, arg)
