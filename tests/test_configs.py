"""Every recipe in configs/ (any depth): it loads, each documented arg parses, its docstring gives its own
command, and a tiny variant of it really runs (in-process, 8 fake CPU devices from conftest).

Written generically: a config added later (e.g. configs/qwen3_30b_a3b.py) is picked up by the glob. Tiny
variants whose config equals (but for the name) one that already runs are not run twice; moe_r3's tiny
variant runs end to end through `python -m fo_rl.main` in tests/test_main.py.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
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


@pytest.mark.e2e
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


# ---- the typed view -------------------------------------------------------------------------------------


def _old_sft_key(c) -> str:
  """sft.sft_key as it was computed from the ConfigDict before the typed view (cached cold starts on disk
  carry these keys): the new one must give the same bytes."""
  import hashlib

  parts = {
      "model": c.model.to_dict(),
      "sft": c.sft.to_dict(),
      "data": c.data.to_dict(),
      "seed": c.seed,
  }
  if c.data.task != "jsonl":
    for f in config_lib.JSONL_OPTIONS:
      parts["data"].pop(f, None)
  parts["sft"].pop("cache_dir", None)
  for f, default in config_lib.DATA_DEFAULTS_ADDED.items():  # issue 17's data fields, at defaults
    if parts["data"].get(f) == default:
      parts["data"].pop(f)
  for f in ("truncate", "min_kept_fraction"):  # added later, out of the key at their defaults
    parts["sft"].pop(f, None)
  for f, default in (("attention_impl", "auto"), ("logits_chunk", 0)):  # added later: out of the
    if parts["model"].get(f) == default:  # key at their defaults (a recipe may set them, e.g. 30B)
      parts["model"].pop(f)
  return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def test_sft_key_is_unchanged(tmp_path):
  from fo_rl.sft import sft_key

  base = config_lib.base_config()
  assert sft_key(config_lib.parse(base)) == "f41e570e60a73fc8"  # computed before the typed view
  assert sft_key(config_lib.parse(_load("configs/moe_r3.py").get_config("tiny"))) == (
      "614b1abe16b4cd17"
  )
  for rel in CONFIG_FILES:
    mod = _load(rel)
    for arg in _documented_args(rel, mod):
      c = mod.get_config(arg) if arg else mod.get_config()
      c.sft.cache_dir = "/elsewhere"  # not part of the key
      assert sft_key(config_lib.parse(c)) == _old_sft_key(c), f"{rel}:{arg}"
  for split in ("train", "test"):
    (tmp_path / f"{split}.jsonl").write_text('{"prompt": "1", "answer": "1"}\n')
  c = config_lib.tiny(config_lib.base_config())
  c.data.task = "jsonl"
  c.data.train_file, c.data.test_file = str(tmp_path / "train.jsonl"), str(tmp_path / "test.jsonl")
  rc = config_lib.parse(c)
  assert sft_key(rc) == _old_sft_key(c) != sft_key(config_lib.parse(config_lib.tiny(base)))
  assert rc.as_dict["data"]["train_file"] == c.data.train_file  # the key's copy left as_dict alone


def test_view_is_typed_frozen_and_keeps_the_plain_config():
  c = _load("configs/moe_r3.py").get_config("tiny")
  rc = config_lib.parse(c)
  assert rc.as_dict == json.loads(c.to_json_best_effort())  # what config.json holds
  assert (rc.name, rc.seed, rc.dry_run) == ("moe_r3_tiny", 0, False)
  assert (rc.rl.steps, rc.rl.global_batch, rc.rl.replay) == (2, 32, "r3")  # 2N prompts x 4
  assert rc.rl.loss == rc.trainer.loss and rc.trainer.optim == rc.optim
  assert (rc.trainer.mini_batches, rc.trainer.replay) == (rc.rl.mini_batches, rc.rl.replay)
  assert rc.trainer.micro_batches == 0  # auto (fo_rl.rl.trainer.auto_micro_batches)
  c.trainer.micro_batches = 2
  assert config_lib.parse(c).trainer.micro_batches == 2
  assert rc.sampling.max_new_tokens == c.sampler.max_new_tokens == 12
  # The sampler's rules: the trainer's, but non-expert weights not split over `expert` (decode would
  # all-gather them every token).
  assert dict(rc.parallel.rules)["embed"] == ("fsdp", "expert")
  assert dict(rc.sampler.rules)["embed"] == ("fsdp",) and rc.sampler.decode_segments is None
  assert {k: v for k, v in rc.sampler.rules if k != "embed"} == {
      k: v for k, v in rc.parallel.rules if k != "embed"
  }
  assert rc.sft.error_rate is None and rc.sft.max_len == 48 and rc.sft.optim.schedule == "cosine"
  assert rc.optim.schedule == "constant" and rc.optim.learning_rate == c.optim.learning_rate
  assert rc.data.task_options() == {"num_digits": 3, "ops": "+-"}
  assert (rc.eval.every, rc.checkpoint.every, rc.checkpoint.max_to_keep) == (1, 1, 2)
  assert rc.init.hf_checkpoint == ""
  for view in (rc, rc.rl, rc.sft, rc.data, rc.parallel, rc.eval, rc.checkpoint, rc.init):
    with pytest.raises(dataclasses.FrozenInstanceError):
      view.seed = 1
  c.init.hf_checkpoint = "~/ckpt"
  c.sft.error_rate, c.sft.max_len = 0.25, 0
  rc = config_lib.parse(c)
  assert rc.init.hf_checkpoint == os.path.expanduser("~/ckpt")
  assert (rc.sft.error_rate, rc.sft.max_len) == (0.25, 64)


@pytest.mark.parametrize(
    "section",
    [
        "",
        "model",
        "init",
        "parallel",
        "data",
        "sft",
        "sampler",
        "rl",
        "rl.loss",
        "optim",
        "trainer",
        "eval",
        "checkpoint",
    ],
)
def test_unknown_key_in_any_section_is_an_error_naming_it(section):
  c = config_lib.base_config()
  node = _get(c, section) if section else c
  node["not_a_field"] = 1
  with pytest.raises(ValueError) as e:
    config_lib.parse(c)
  assert str(e.value).startswith(
      f"{section or 'config'}: unknown field(s) ['not_a_field']"
  ), e.value


@pytest.mark.parametrize(
    "field, value, named",
    [
        ("rl.steps", 0, "rl.steps"),
        ("rl.mini_batches", 0, "rl.mini_batches"),
        ("rl.mini_batches", 3, "rl.mini_batches"),
        ("rl.group_size", 1, "rl.group_size"),
        ("rl.replay", "r4", "rl.replay"),
        ("rl.temperature", 0.0, "rl.temperature"),
        ("rl.advantage", "median", "rl.advantage"),
        ("rl.max_skipped_steps", -1, "rl.max_skipped_steps"),
        ("rl.max_skipped_steps", 2.5, "rl.max_skipped_steps"),
        ("trainer.micro_batches", -1, "trainer.micro_batches=-1: must be 0 (auto) or an integer"),
        ("trainer.pack", "yes", "trainer.pack"),
        (
            "trainer.micro_batches",
            3,
            "trainer.micro_batches=3 does not divide the mini-batch of 32",
        ),
        ("rl.loss.name", "ppo", "rl.loss.name"),
        ("rl.loss.tis_cap", 0.5, "rl.loss"),
        ("optim.learning_rate", 0.0, "optim.learning_rate"),
        ("model.num_heads", 3, "model.num_heads"),
        ("data.task", "chess", "data.task"),
        ("data.train_file", "/x.jsonl", "data.train_file"),
        ("sampler.top_k", 5, "sampler.top_k/top_p"),
        ("sampler.moe_impl", "sparse", "sampler.moe_impl"),
        ("eval.samples", 0, "eval.samples"),
        ("checkpoint.every", 0, "checkpoint.every"),
        ("checkpoint.max_to_keep", 0, "checkpoint.max_to_keep"),
        ("sft.steps", 0, "sft.steps"),
        ("sft.batch_size", 0, "sft.batch_size"),
        ("sft.learning_rate", 0.0, "sft.learning_rate"),
        ("sft.warmup_steps", 800, "sft.warmup_steps"),
        ("parallel.rules", [["batch", "nope"]], "parallel.rules"),
    ],
)
def test_bad_field_is_an_error_naming_it(field, value, named):
  c = config_lib.base_config()
  *path, last = field.split(".")
  node = _get(c, ".".join(path))
  with node.ignore_type():
    node[last] = value
  with pytest.raises(ValueError) as e:
    config_lib.parse(c)
  assert named in str(e.value), e.value


@pytest.mark.parametrize(
    "overrides, kwargs",
    [
        ({"rl.replay": "r4"}, dict(replay="r4")),
        ({"rl.mini_batches": 0}, dict(mini_batches=0)),
        ({"rl.temperature": -1.0}, dict(temperature=-1.0)),
        ({"rl.replay": "r3", "model.num_experts": 0}, dict(replay="r3", num_experts=0)),
    ],
)
def test_rl_fields_are_checked_in_one_place(overrides, kwargs):
  """config.parse and the Trainer's own config reject rl.replay / mini_batches / temperature with one
  message: the check lives once, in rl/trainer.py (check_rl_fields)."""
  from fo_rl.rl.trainer import check_rl_fields

  c = config_lib.base_config()
  for field, value in overrides.items():
    *path, last = field.split(".")
    node = _get(c, ".".join(path))
    with node.ignore_type():
      node[last] = value
  with pytest.raises(ValueError) as from_parse:
    config_lib.parse(c)
  args = {"mini_batches": 1, "replay": "none", "temperature": 1.0, **kwargs}
  with pytest.raises(ValueError) as from_trainer:
    check_rl_fields(**args)
  assert str(from_parse.value) == str(from_trainer.value)


def test_disabled_sft_is_not_validated():
  c = config_lib.base_config()
  c.sft.enabled, c.sft.steps = False, 0
  assert config_lib.parse(c).sft.enabled is False


def test_jobs_read_only_the_typed_view():
  """run.py, sft.py and dry_run.py take the ConfigDict only to parse it: no `c.<field>` reads."""
  import ast

  for rel in ("fo_rl/run.py", "fo_rl/sft.py", "fo_rl/dry_run.py"):
    tree = ast.parse((REPO / rel).read_text())
    reads = [
        f"{rel}:{n.lineno}: {n.value.id}.{n.attr}"
        for n in ast.walk(tree)
        if isinstance(n, ast.Attribute)
        and isinstance(n.value, ast.Name)
        and n.value.id in ("c", "config")
    ]
    assert not reads, reads


def test_a_batch_the_mesh_cannot_split_is_an_error_naming_the_mesh():
  """A batch axis of size > 1 that does not divide a trainer batch (global, mini- or micro-batch) is an
  error naming parallel.mesh and the batch size, at parse time (never a silent replication)."""
  c = config_lib.base_config()  # 16 prompts x 8 = 128 responses, N = 4: mini-batches of 32
  config_lib.parse(c, 8)  # fsdp 8 splits them
  c.trainer.micro_batches = 8  # micro-batches of 4 rows on 8 devices
  with pytest.raises(ValueError) as e:
    config_lib.parse(c, 8)
  msg = str(e.value)
  assert msg.startswith("parallel.mesh: the batch is split over mesh axes fsdp=8 (8 ways)"), msg
  assert "micro-batch (mini-batch / trainer.micro_batches) of 4 rows" in msg
  config_lib.parse(c, 4)  # 4 devices split 4 rows
  config_lib.parse(c)  # the device count unknown: checked again when the trainer is built
  c.trainer.micro_batches = 1
  c.parallel.mesh = {"data": 2, "fsdp": -1, "expert": 1, "tensor": 1}
  c.rl.prompts_per_step = 3  # 24 responses: mini-batches of 6 over data 2 x fsdp 4
  with pytest.raises(ValueError, match=r"data=2, fsdp=4 \(8 ways\).*mini-batch .* of 6 rows"):
    config_lib.parse(c, 8)
