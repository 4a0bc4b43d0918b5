"""Paper suite 1, on-policy (N = 1): MiniRL vs length normalization vs no train-infer IS, each +/- R3.

One run (variant minirl, seed 0; every variant shares the seed's cold start through sft.cache_dir):

  python -m fo_rl.main --config=configs/paper/onpolicy.py:minirl --workdir=workdirs/paper/minirl/seed0 --config.seed=0 --config.sft.cache_dir=workdirs/paper/sft_cache

The whole suite, 3 seeds, with report.md / results.json / onpolicy.png:

  python -m fo_rl.paper --suite=onpolicy --seeds=3 --workdir=workdirs/paper

Arg grammar (after the first ':' of --config): "<variant>" | "<variant>:tiny" | "tiny" | "" where
"tiny" alone is the tiny version of the first variant (minirl) and "" is minirl at full size.
Variants (name: what changes from the shared recipe below):
  minirl                  MiniRL: token-level TIS min(pi_old/mu, 5), no length normalization
  minirl_length_norm      rl.loss.length_norm=True (1/|y| per response, GRPO's normalizer)
  minirl_no_is            rl.loss.train_infer_is=False (no train-infer IS weight)
  minirl_r3               rl.replay=r3 (the sampler's experts replayed)
  minirl_length_norm_r3   length_norm + R3
  minirl_no_is_r3         no train-infer IS + R3
Shared recipe: fo_rl.config.base_config() (4-layer 8-expert top-2 MoE, cold start on the 'careful'
teacher, FP8 e4m3 sampler weights so the training-inference discrepancy is real) with
rl.mini_batches=1 (global batch = mini-batch: on-policy, the clip mask is inactive) and rl.replay=none.
Hardware: a 2-core CPU. Measured (docs/results/paper/report.md): the suite in miniature (--steps=40
--override=rl.prompts_per_step=8 --override=optim.learning_rate=1.5e-4 --override=eval.num_prompts=64,
as in the README) took 16.0 min for 18 runs, about 0.6 min per run after the ~1.5 min shared cold start;
the full recipe (200 RL steps of 16 prompts) takes about 4 min of RL per run.
Expected (the paper, section 4.3): MiniRL best; length normalization stable but worse; no IS collapses;
R3 lowers the train-infer KL but gives no gain. Measured: see the suite's report.md.
"""

from fo_rl.paper.suites import suite_config

COMMON = {
    "rl.mini_batches": 1,
    "rl.replay": "none",
    "sampler.weight_dtype": "float8_e4m3fn",
}

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
