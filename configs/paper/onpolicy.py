"""Paper suite 1, on-policy (N = 1): MiniRL vs length normalization vs no train-infer IS, each +/- R3.

One run (variant minirl, seed 0; every variant shares the seed's cold start through sft.cache_dir):

  python -m fo_rl.main --config=configs/paper/onpolicy.py:minirl --workdir=workdirs/paper/minirl/seed0 --config.seed=0 --config.sft.cache_dir=workdirs/paper/sft_cache

The suite (tier 1: the four variants the findings need; 4 seeds, paired), with report.md / results.json:

  python -m fo_rl.paper --suite=onpolicy --seeds=4 --workdir=workdirs/paper --variants=minirl,minirl_length_norm,minirl_no_is,minirl_r3

Arg grammar (after the first ':' of --config): "<variant>" | "<variant>:tiny" | "tiny" | "" where
"tiny" alone is the tiny version of the first variant (minirl) and "" is minirl at full size.
Variants (name: what changes from the shared recipe below):
  minirl                  MiniRL: token-level TIS min(pi_old/mu, 5), no length normalization
  minirl_length_norm      rl.loss.length_norm=True (1/|y| per response, GRPO's normalizer)
  minirl_no_is            rl.loss.train_infer_is=False (no train-infer IS weight)
  minirl_r3               rl.replay=r3 (the sampler's experts replayed)
  minirl_length_norm_r3   length_norm + R3 (tier 2)
  minirl_no_is_r3         no train-infer IS + R3 (tier 2)
Shared recipe: fo_rl.paper.suites.REGIME (the calibrated regime: 1-5-digit arithmetic, the quantized
sampler, LR 1.5e-4, a grad clip that binds rarely) with design(1): 8 prompts x 8 samples per RL step =
one update (on-policy: the clip mask is inactive), 144 updates, an evaluation every 24.
Do not pass --steps or --override=rl.prompts_per_step to the runner: they would break the design.
Expected (the paper, section 4.3): MiniRL best; length normalization stable but worse; no IS collapses;
R3 lowers the train-infer KL but gives no gain. Measured: see the suite's report.md.
"""

from fo_rl.paper.suites import design, suite_config

COMMON = {**design(1), "rl.replay": "none"}

VARIANTS = {
    "minirl": {},
    "minirl_length_norm": {"rl.loss.length_norm": True},
    "minirl_no_is": {"rl.loss.train_infer_is": False},
    "minirl_r3": {"rl.replay": "r3"},
    "minirl_length_norm_r3": {"rl.loss.length_norm": True, "rl.replay": "r3"},
    "minirl_no_is_r3": {"rl.loss.train_infer_is": False, "rl.replay": "r3"},
}

GROUP_BY = None  # one figure row


def get_config(arg: str = ""):
  return suite_config("onpolicy", COMMON, VARIANTS, arg)
