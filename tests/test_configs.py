"""Every recipe in configs/ (any depth): it loads, each documented arg parses, its docstring gives its own
command, and a tiny variant of it really runs (in-process, 8 fake CPU devices from conftest).

Written generically: a config added later (e.g. configs/qwen3_30b_a3b.py) is picked up by the glob. Tiny
variants whose config equals (but for the name) one that already runs are not run twice; moe_r3's tiny
variant runs end to end through `python -m fo_rl.main` in tests/test_main.py.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import time
from pathlib import Path

import jax
import pytest

from fo_rl import config as config_lib
from fo_rl.metrics_writer import read_metrics

REPO = Path(__file__).resolve().parents[1]
CONFIG_FILES = sorted(
    p.relative_to(REPO).as_posix()
    for p in (REPO / "configs").rglob("*.py")
    if p.name != "__init__.py"
)
RUN_ELSEWHERE = {
    "configs/moe_r3.py": "tests/test_main.py"
}  # tiny variants run end to end elsewhere

# What "tiny" promises (README: runs in seconds on a laptop CPU), whatever the full recipe's size.
TINY_MAX_PARAMS = 2_000_000
TINY_LIMITS = {
    "rl.steps": 4,
    "sft.steps": 50,
    "eval.num_prompts": 16,
    "sampler.max_new_tokens": 32,
    "rl.prompts_per_step": 8,
    "rl.group_size": 8,
}


def _load(rel: str):
  spec = importlib.util.spec_from_file_location(
      "fo_rl_test_config_" + re.sub(r"\W", "_", rel), REPO / rel
  )
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def _documented_args(rel: str, mod) -> list[str]:
  """ "" and "tiny", every `--config=configs/<rel>:ARG` in the docstring, and each name in a module-level
  VARIANTS / TOPOLOGIES / ARGS table (and "<name>:tiny" where the docstring's grammar offers it)."""
  doc = mod.__doc__ or ""
  args = ["", "tiny"]
  args += re.findall(rf"--config={re.escape(rel)}:(\S+)", doc)
  with_tiny = (
      re.search(r'"<\w+>:tiny"', doc) is not None
  )  # the docstring's grammar has "<name>:tiny"
  for table in ("VARIANTS", "TOPOLOGIES", "ARGS"):
    for name in getattr(mod, table, ()) or ():
      args += [str(name)] + ([f"{name}:tiny"] if with_tiny else [])
  return list(dict.fromkeys(args))


def _get(c, dotted: str):
  for part in dotted.split("."):
    c = c[part]
  return c


def _mesh_devices(c) -> int:
  """A device count the config's training mesh accepts (its fixed sizes; -1 axes fill with 1)."""
  return math.prod(max(int(s), 1) for s in c.parallel.mesh.values())


def _num_params(c) -> int:
  from fo_rl.model.init import abstract_model

  _, abstract = abstract_model(config_lib.parse(c).model)
  return sum(math.prod(x.shape) for x in jax.tree.leaves(abstract))


def _fingerprint(c) -> str:
  """The config minus what cannot change a run: its name and the dry run's target topology."""
  d = json.loads(c.to_json_best_effort())
  d.pop("name", None)
  for k in ("topology", "hbm_gib"):
    d["parallel"].pop(k, None)
  return json.dumps(d, sort_keys=True)


def test_configs_are_found():
  assert {"configs/moe_r3.py", "configs/moe_r2.py", "configs/minirl_onpolicy.py"} <= set(
      CONFIG_FILES
  )


@pytest.mark.parametrize("rel", CONFIG_FILES)
def test_config_documents_its_own_command(rel):
  mod = _load(rel)
  doc = mod.__doc__ or ""
  cmds = re.findall(rf"python -m fo_rl\.main --config={re.escape(rel)}(?::\S+)?(?:[^\n]*)", doc)
  assert cmds, f"{rel}: the docstring should give `python -m fo_rl.main --config={rel}...`"
  for cmd in cmds:
    assert "--workdir=" in cmd or "--config.dry_run=True" in cmd, f"{rel}: {cmd!r} has no --workdir"
  assert any("--workdir=" in cmd for cmd in cmds), f"{rel}: no documented command runs the recipe"
  # Every --config.<field>= the docstring shows is a real field (ml_collections would reject it).
  c = mod.get_config()
  for field in re.findall(r"--config\.([\w.]+)=", doc):
    try:
      _get(c, field)
    except (KeyError, AttributeError):
      pytest.fail(f"{rel}: the docstring overrides --config.{field}, which is not a field")


@pytest.mark.parametrize("rel", CONFIG_FILES)
def test_every_documented_variant_parses(rel):
  mod = _load(rel)
  assert callable(getattr(mod, "get_config", None)), f"{rel} has no get_config(arg)"
  failures = []
  for arg in _documented_args(rel, mod):
    where = f"{rel}:{arg}" if arg else rel
    try:
      c = mod.get_config(arg) if arg else mod.get_config()  # config_flags calls get_config() bare
      config_lib.parse(c, _mesh_devices(c))
      json.loads(c.to_json_best_effort())  # what run() writes to config.json
      if arg.split(":")[-1] == "tiny":
        config_lib.parse(c, jax.device_count())  # it runs here: 8 fake devices
    except Exception as e:  # noqa: BLE001 - report every variant at once
      failures.append(f"{where}: {type(e).__name__}: {e}")
  assert not failures, "\n".join(failures)


@pytest.mark.parametrize("rel", CONFIG_FILES)
def test_tiny_variant_is_tiny(rel):
  """A large-model recipe's tiny variant is still laptop-sized: no checkpoint download, few parameters,
  a handful of steps."""
  c = _load(rel).get_config("tiny")
  assert (
      "tiny" in c.name
  ), f"{rel}:tiny shares its default workdir name {c.name!r} with the full run"
  assert not c.init.get("hf_checkpoint"), f"{rel}:tiny starts from a checkpoint"
  assert c.sft.enabled or c.init.get("hf_checkpoint"), f"{rel}:tiny has nothing to start RL from"
  for field, limit in TINY_LIMITS.items():
    assert int(_get(c, field)) <= limit, f"{rel}:tiny {field}={_get(c, field)} > {limit}"
  n = _num_params(c)
  assert n <= TINY_MAX_PARAMS, f"{rel}:tiny has {n:,} parameters (> {TINY_MAX_PARAMS:,})"


def _tiny_runs():
  """(rel, None) for a tiny variant to run here; (rel, reason) to skip."""
  seen = {}
  for rel in RUN_ELSEWHERE:
    seen[_fingerprint(_load(rel).get_config("tiny"))] = f"{rel}:tiny in {RUN_ELSEWHERE[rel]}"
  out = []
  for rel in CONFIG_FILES:
    try:
      fp = _fingerprint(_load(rel).get_config("tiny"))
    except Exception:  # noqa: BLE001 - test_every_documented_variant_parses reports it
      out.append((rel, None))
      continue
    if fp in seen:
      out.append((rel, f"same config as {seen[fp]}"))
    else:
      seen[fp] = f"{rel}:tiny"
      out.append((rel, None))
  return out


TINY_RUNS = _tiny_runs()


@pytest.mark.parametrize("rel, skip", TINY_RUNS, ids=[r for r, _ in TINY_RUNS])
def test_tiny_variant_runs(rel, skip, tmp_path, run_caches):
  if skip:
    pytest.skip(skip)
  from fo_rl.run import run

  c = _load(rel).get_config("tiny")
  c.sft.cache_dir = str(run_caches / "sft")
  workdir = tmp_path / "run"
  t0 = time.time()
  summary = run(c, str(workdir), log=lambda s: None)
  print(f"{rel}:tiny ran in {time.time() - t0:.0f}s")
  steps = int(c.rl.steps)
  assert summary["steps"] == steps and summary["preempted"] is False
  rows = read_metrics(str(workdir))
  assert [r["step"] for r in rows] == list(range(steps + 1))
  for r in rows[1:]:
    for k in ("loss", "reward_mean", "train_infer_kl", "entropy", "grad_norm", "update_norm"):
      assert math.isfinite(r[k]), (rel, r["step"], k, r[k])
    assert r["skipped_steps"] == 0
  assert summary["final_accuracy"] is not None and summary["cold_start_accuracy"] is not None
  assert (workdir / "checkpoints" / str(steps)).is_dir()
  assert (workdir / "curves.png").stat().st_size > 0
