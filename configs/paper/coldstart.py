"""Paper suite 4, cold starts: the paper's section 4.5 recipe (MiniRL + R2, N = 2) from cold starts
distilled from teachers that differ in error rate.

One run (arm err15, seed 0; each arm has its own cold start per seed, cached in sft.cache_dir; err30 is
the careful teacher's own rate, so its cold starts are those of the other suites):

  python -m fo_rl.main --config=configs/paper/coldstart.py:err15 --workdir=workdirs/paper/err15/seed0 --config.seed=0 --config.sft.cache_dir=workdirs/paper/sft_cache

The suite, 4 seeds, paired, with report.md / results.json / coldstart.png:

  python -m fo_rl.paper --suite=coldstart --seeds=4 --workdir=workdirs/paper

Arg grammar (after the first ':' of --config): "<arm>" | "<arm>:tiny" | "tiny" | "" with arm one of
  err15   the careful teacher's worked steps, one plausible mistake in 15% of responses
  err30   the same, 30% (the careful teacher's own rate)
  err45   the same, 45%
"tiny" alone is the tiny version of the first arm (err15); "" is err15 at full size.
The arms differ the way distilled cold starts differ (how often the teacher is wrong), in a style the
model can execute (the worked steps). The 'terse' style is not an arm: the 4-layer model cannot execute
it (greedy 0.28-0.36 at the cold start against 0.83-0.91 for the steps style), a capability gap rather
than a cold-start difference; verbosity is not varied for that reason.
Shared recipe: fo_rl.paper.suites.REGIME with design(2, 216): MiniRL + R2, 16 prompts x 8 samples per RL
step in 2 updates of 64 responses, 216 updates (108 RL steps), an evaluation every 24 updates.
Expected (the paper, section 4.5): once training is stable, different cold starts reach comparable final
accuracy. Measured: see the suite's report.md.
"""

from fo_rl.paper.suites import COLDSTART_UPDATES, design, suite_config

COMMON = {**design(2, COLDSTART_UPDATES), "rl.replay": "r2", "sft.teacher": "careful"}

VARIANTS = {
    "err15": {"sft.error_rate": 0.15},
    "err30": {"sft.error_rate": -1.0},  # the careful teacher's own 0.30: shared cold start
    "err45": {"sft.error_rate": 0.45},
}

GROUP_BY = None  # one figure row


def get_config(arg: str = ""):
  return suite_config("coldstart", COMMON, VARIANTS, arg)
