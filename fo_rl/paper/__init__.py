"""The paper's findings in miniature: run a suite of variants x seeds, then judge each finding by code.

  python -m fo_rl.paper --suite=onpolicy|offpolicy|coldstart|calibrate --seeds=4 --workdir=DIR
      [--parallel=K] [--steps=S] [--variants=a,b] [--tiny] [--override=field=value ...]
      [--dry_run] [--report_only]

Every variant of a suite is a config in configs/paper/<suite>.py (`get_config("<variant>")`). Each
(variant, seed) is one subprocess

  python -m fo_rl.main --config=configs/paper/<suite>.py:<variant> --workdir=DIR/<variant>/seed<k>
      --config.seed=<k> --config.sft.cache_dir=DIR/sft_cache [--config.rl.steps=S ...]

run from the repository root, with its CPU threads limited (each of the K parallel runs is pinned to
cpu_count // K cores) so runs do not fight. All variants of a seed share one cold start (SFT runs once
per (teacher, seed) and is cached in DIR/sft_cache): the first run of each cold start goes alone, the
runs that need the same cold start wait until it is on disk. A run whose workdir already holds a
summary.json for its number of steps is skipped, so an interrupted sweep is resumed by running the same
command again (an unfinished run resumes from its own checkpoint).

Then everything under DIR (every suite that has runs there) is read back into DIR/results.json (curves
and per-run statistics), the verdict rules of `verdicts.py` are applied to it, and DIR/report.md and one figure per
suite (DIR/<suite>.png) are written. `--report_only` does only that.

The design (`suites.py`, issue 15): a fixed mini-batch of 64 responses, global batch N x it, every run
the same number of gradient updates, 4 seeds paired by seed; the regime (task, sampler, learning rate,
grad clip) chosen by the calibration suite, whose table `--suite=calibrate` writes to DIR/calibration.md.

Modules (one concern each): `suites` (the configs' helpers and loader, import-light: the recipes in
configs/paper/ import only it), `sweep` (the plan and its execution), `results` (runs read back into
results.json), `verdicts` (the rules and the findings), `report` (report.md and the figures),
`__main__` (the command line). This package's `__init__` imports nothing.
"""
