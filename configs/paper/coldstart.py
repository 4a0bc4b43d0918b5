"""Paper suite 4, cold starts: the same RL recipe from cold starts distilled from different teachers.

One run (variant careful, seed 0; the three teachers give three cold starts per seed, each cached in
sft.cache_dir and shared with the other suites run in the same directory):

  python -m fo_rl.main --config=configs/paper/coldstart.py:careful --workdir=workdirs/paper/careful/seed0 --config.seed=0 --config.sft.cache_dir=workdirs/paper/sft_cache

The whole suite, 3 seeds, with report.md / results.json / coldstart.png:

  python -m fo_rl.paper --suite=coldstart --seeds=3 --workdir=workdirs/paper

Arg grammar (after the first ':' of --config): "<teacher>" | "<teacher>:tiny" | "tiny" | "" with
teacher one of (fo_rl/data/teachers.py)
  careful   worked steps, a mistake in 30% of responses
  terse     a shorter style (raw column values), mistakes in 40% of responses
  noisy     worked steps, mistakes in 60% of responses
"tiny" alone is the tiny version of the first variant (careful); "" is careful at full size.
Shared RL recipe: the fo_rl default (configs/moe_r3.py): MiniRL, N = 4 mini-batch updates, R3, FP8 e4m3
sampler weights; only sft.teacher differs.
Hardware: a 2-core CPU. Measured (docs/results/paper/report.md): the suite in miniature (--steps=40
--override=rl.prompts_per_step=8 --override=optim.learning_rate=1.5e-4 --override=eval.num_prompts=64,
as in the README) took 13.1 min for 9 runs (about 1.5 min of cold start + 0.6 min of RL per run); the
full recipe (200 RL steps of 16 prompts) takes about 4 min of RL per run.
Expected (the paper, section 4.5): once training is stable, different cold starts reach comparable final
accuracy. Measured: see the suite's report.md.
"""

from fo_rl.paper.suites import suite_config

COMMON = {
    "rl.mini_batches": 4,
    "rl.replay": "r3",
    "sampler.weight_dtype": "float8_e4m3fn",
}

VARIANTS = {
    "careful": {"sft.teacher": "careful"},
    "terse": {"sft.teacher": "terse"},
    "noisy": {"sft.teacher": "noisy"},
}

GROUP_BY = None  # one figure row


def get_config(arg: str = ""):
  return suite_config("coldstart", COMMON, VARIANTS, arg)
