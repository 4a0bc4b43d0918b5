"""Bad input and damaged state (issue 20): a table of bad values, data and workdirs, each an error that
names what to change, raised before anything is compiled or written.

The table runs `fo_rl.run.run` in process on the `:tiny` config (every case fails in the pre-flight, in
well under a second after the data loads). Each case runs twice: in a fresh workdir, which must not be
created, and in a workdir where an earlier attempt with the same config left a `config.json` (the
lock-out of issue 20 item 3), which must stay byte for byte as it was. The `e2e` tests run
`python -m fo_rl.main` (one line on stderr, exit status 1) and resume a finished tiny run whose
config.json was deleted or replaced, or whose latest checkpoint was damaged.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fo_rl import config as config_lib
from fo_rl.common import UserError

REPO = Path(__file__).resolve().parent.parent


def _load(rel: str):
  spec = importlib.util.spec_from_file_location(
      "fo_rl_bad_input_" + re.sub(r"\W", "_", rel), REPO / rel
  )
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def tiny_config(**overrides):
  """configs/moe_r3.py:tiny with `--config.<dotted>=value` overrides (type checks off, as a user's)."""
  c = _load("configs/moe_r3.py").get_config("tiny")
  for dotted, value in overrides.items():
    *path, last = dotted.split(".")
    node = c
    for p in path:
      node = node[p]
    with node.ignore_type():
      node[last] = value
  return c


def snapshot(d: Path) -> dict:
  """Every file under `d` (relative path -> sha256) and every directory: 'unchanged' means equal."""
  out = {}
  for root, dirs, files in os.walk(d):
    for name in dirs:
      out[os.path.relpath(os.path.join(root, name), d) + "/"] = "dir"
    for name in files:
      p = os.path.join(root, name)
      out[os.path.relpath(p, d)] = hashlib.sha256(Path(p).read_bytes()).hexdigest()
  return out


# ---- data files --------------------------------------------------------------------------------------

LONG_PROMPT = "What is " + "+".join(["1"] * 60) + "?"  # ~130 tokens with the committed tokenizer
LONG_ANSWER = " ".join(f"{i}+1={i + 1}" for i in range(1, 30)) + " #### 30"  # ~200 tokens


def write_jsonl(tmp_path: Path, train_lines, test_lines=None) -> dict:
  files = {}
  for split, lines in (("train", train_lines), ("test", test_lines)):
    if lines is None:
      lines = [{"prompt": f"{i}+{i}?", "answer": str(2 * i)} for i in range(1, 5)]
    p = tmp_path / f"{split}.jsonl"
    p.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n" for ln in lines))
    files[f"data.{split}_file"] = str(p)
  return {"data.task": "jsonl", **files}


SHORT = {"prompt": "2+2?", "answer": "4"}


def hf_dir_with(tmp_path: Path, **model_overrides) -> str:
  """A Hugging Face checkpoint directory holding only config.json: the tiny model with overrides."""
  from fo_rl.model.config import ModelConfig
  from fo_rl.model.hf import config_to_hf

  rc = config_lib.parse(tiny_config())
  d = tmp_path / "hf"
  d.mkdir(exist_ok=True)
  cfg = ModelConfig.from_dict(dict(rc.as_dict["model"], **model_overrides))
  (d / "config.json").write_text(json.dumps(config_to_hf(cfg)))
  return str(d)


# ---- the table ---------------------------------------------------------------------------------------
# (id, overrides or a function of tmp_path returning them, a regex the message must match).
# A * marks a case that issue 20 found broken; the others already worked and must stay so.

CASES = [
    # * errors after config.json was written, or not naming the field
    ("sft_teacher", {"sft.teacher": "sloppy"}, r"^sft\.teacher='sloppy': .*careful"),
    ("sft_batch_size", {"sft.batch_size": 0}, r"^sft\.batch_size=0: must be >= 1"),
    ("sft_error_rate", {"sft.error_rate": 2.0}, r"^sft\.error_rate=2\.0: must be in \[0, 1\]"),
    (
        "sft_learning_rate",
        {"sft.learning_rate": -1e-3},
        r"^sft\.learning_rate=-0\.001: must be > 0",
    ),
    ("sft_max_len", {"sft.max_len": -4}, r"^sft\.max_len=-4"),
    ("sft_truncate", {"sft.truncate": "middle"}, r"^sft\.truncate='middle'"),
    ("seed", {"seed": -1}, r"^seed=-1: must be an integer >= 0"),
    ("checkpoint_max_to_keep", {"checkpoint.max_to_keep": 0}, r"^checkpoint\.max_to_keep=0"),
    ("checkpoint_every", {"checkpoint.every": 0}, r"^checkpoint\.every=0"),
    ("sampler_max_new_tokens", {"sampler.max_new_tokens": 0}, r"^sampler\.max_new_tokens=0"),
    ("sampler_max_prompt_len", {"sampler.max_prompt_len": 1}, r"^sampler\.max_prompt_len=1"),
    ("data_options_ops", {"data.options.ops": "x"}, r"^data\.options\.ops='x'"),
    ("data_options_digits", {"data.options.num_digits": 0}, r"^data\.options\.num_digits=0"),
    (
        "mesh_expert_axis",  # the expert axis (8) does not divide the tiny model's 4 experts
        {"parallel.mesh": {"data": 1, "fsdp": 1, "expert": 8, "tensor": 1}},
        r"^parallel\.mesh=.*'expert'.*size 4.*not divisible.*\(size 8\)",
    ),
    (
        "sampler_mesh_expert_axis",
        {"parallel.sampler_mesh": {"data": 1, "fsdp": 1, "expert": 8, "tensor": 1}},
        r"^parallel\.sampler_mesh=.*not divisible",
    ),
    (
        "hf_missing_dir",
        {"init.hf_checkpoint": "/nonexistent/qwen"},
        r"init\.hf_checkpoint=.*no such directory",
    ),
    (
        "hf_architecture",
        lambda t: {"init.hf_checkpoint": hf_dir_with(t, hidden_size=64, num_heads=4)},
        r"^init\.hf_checkpoint=.*differs from model\.\* in hidden_size \(64 vs 32\)",
    ),
    (
        "sft_response_cut",  # the old policy: the 130-token prompt leaves no response token
        lambda t: {
            **write_jsonl(t, [SHORT, {"prompt": LONG_PROMPT, "answer": "60"}]),
            "sft.truncate": "right",
        },
        r"^sft\.max_len=48: .*train\.jsonl, line 2: prompt \d+ \+ response \d+ tokens",
    ),
    (
        "sft_response_too_long",  # the default policy keeps the response, but this one has ~200 tokens
        lambda t: write_jsonl(t, [SHORT, {"prompt": "count", "answer": LONG_ANSWER}]),
        r"^sft\.max_len=48: .*train\.jsonl, line 2",
    ),
    (
        "prompt_too_long",
        lambda t: {
            **write_jsonl(t, [SHORT, SHORT, {"prompt": LONG_PROMPT, "answer": "60"}]),
            "sampler.max_prompt_len": 64,
        },
        r"^sampler\.max_prompt_len=64: .*train\.jsonl, line 3: the prompt has \d+ tokens",
    ),
    (
        "eval_num_prompts",
        lambda t: {**write_jsonl(t, None, [SHORT]), "eval.num_prompts": 4},
        r"^eval\.num_prompts=4: .*asked for 4 examples, only 1",
    ),
    (
        "tokenizer_missing",
        {"data.tokenizer": "/nonexistent/sp.model"},
        r"^data\.tokenizer=.*no such file",
    ),
    # already named before issue 20
    (
        "vocab_size",
        {"model.vocab_size": 100},
        r"^model\.vocab_size=100 is smaller than the tokenizer",
    ),
    ("mini_batches", {"rl.mini_batches": 3}, r"^rl\.mini_batches=3"),
    ("replay_dense", {"model.num_experts": 0, "rl.replay": "r3"}, r"rl\.replay='r3'"),
    ("loss_name", {"rl.loss.name": "nope"}, r"^rl\.loss\.name='nope'"),
    (
        "mesh_devices",
        {"parallel.mesh": {"data": 3, "fsdp": 1, "expert": 1, "tensor": 1}},
        r"parallel\.mesh",
    ),
    ("rl_learning_rate", {"optim.learning_rate": -1.0}, r"learning_rate"),
    (
        "jsonl_missing_file",
        {
            "data.task": "jsonl",
            "data.train_file": "/nonexistent.jsonl",
            "data.test_file": "/nonexistent.jsonl",
        },
        r"^data\.train_file=.*no such file",
    ),
    (
        "jsonl_bad_line",
        lambda t: write_jsonl(t, [SHORT, '{"prompt": "x"}']),
        r"train\.jsonl, line 2: missing key 'answer'",
    ),
]


def _overrides(spec, tmp_path):
  return spec(tmp_path) if callable(spec) else spec


@pytest.mark.parametrize("existing", [False, True], ids=["fresh", "existing"])
@pytest.mark.parametrize("name,spec,pattern", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_named_before_anything_is_written(tmp_path, name, spec, pattern, existing):
  from fo_rl.run import run

  c = tiny_config(**_overrides(spec, tmp_path))
  workdir = tmp_path / "workdir"
  before = None
  if existing:  # an earlier attempt with this same config wrote config.json (and nothing else)
    workdir.mkdir()
    as_dict = json.loads(c.to_json_best_effort())
    (workdir / "config.json").write_text(json.dumps(as_dict, indent=2, sort_keys=True))
    before = snapshot(workdir)
  logged = []
  with pytest.raises(UserError) as e:
    run(c, str(workdir), log=logged.append)
  assert re.search(pattern, str(e.value)), str(e.value)
  assert "\n" not in str(e.value)
  if existing:
    assert snapshot(workdir) == before
  else:
    assert not workdir.exists()


def test_length_policy_keeps_the_response_and_measures_it(tmp_path):
  """The default sft.truncate='left' drops prompt tokens, not response tokens: the 130-token prompt
  that left nothing to train on (issue 20 item 1) keeps its whole response; the measurement says so.
  """
  from fo_rl.data import get_task
  from fo_rl.data.tokenizer import Tokenizer
  from fo_rl.sft import check_lengths, encode_example, truncate_example

  # truncate_example against a direct construction
  prompt, resp = list(range(100, 130)), list(range(5, 15))
  ids, mask = truncate_example(prompt, resp, 16, "left")
  assert ids == prompt[-6:] + resp and mask == [0] * 6 + [1] * 10
  ids, mask = truncate_example(prompt, resp, 16, "right")
  assert ids == prompt[:16] and sum(mask) == 0
  ids, mask = truncate_example(prompt, list(range(40)), 16, "left")  # response longer than max_len
  assert ids == prompt[-1:] + list(range(15)) and sum(mask) == 15
  assert truncate_example([1, 2], [3], 16, "left") == ([1, 2, 3], [0, 0, 1])  # fits: unchanged

  over = write_jsonl(tmp_path, [SHORT, {"prompt": LONG_PROMPT, "answer": "60"}])
  rc = config_lib.parse(tiny_config(**over))
  tok, task = Tokenizer.default(), get_task("jsonl", train_file=over["data.train_file"])
  records = task.load("train")
  logged = []
  info = check_lengths(rc, tok, task, records, log=logged.append)
  assert info["kept_fraction"] == 1.0 and info["truncated"] == 1 and info["longest"] > 100
  assert "1/2 examples are longer than sft.max_len=48" in logged[0]
  ids, mask = encode_example(tok, task, records[1], "#### 60", 48)
  assert len(ids) == 48 and sum(mask) == len(tok.encode("#### 60")) + 1  # + EOS
  # the default recipe's data fits: nothing truncated, so its cold start is the one it always was
  rc = config_lib.parse(tiny_config())
  arith = get_task("arithmetic", **rc.data.task_options())
  info = check_lengths(rc, tok, arith, arith.generate("train", 200), log=logged.append)
  assert info == {"kept_fraction": 1.0, "truncated": 0, "examples": 200, "longest": info["longest"]}
  assert info["longest"] <= 48


def test_unknown_config_variants_list_the_known_ones():
  for rel, bad, known in (
      ("configs/moe_r3.py", "tyni", "'tiny'"),
      ("configs/moe_r2.py", "Tiny", "'tiny'"),
      ("configs/minirl_onpolicy.py", "small", "'tiny'"),
      ("configs/qwen3_30b_a3b.py", "v5p64", "'v5p-64'"),
      ("configs/qwen3_235b_a22b.py", "v6e", "'v6e-256'"),
  ):
    mod = _load(rel)
    with pytest.raises(
        UserError, match=rf"{re.escape(rel)}:{bad}: unknown variant '{bad}'; known: .*{known}"
    ):
      mod.get_config(bad)
    mod.get_config("tiny")  # the known ones still work
    mod.get_config()


def test_sft_cache_key_ignores_the_length_check_fields():
  from fo_rl.sft import sft_key

  base = config_lib.parse(tiny_config())
  assert sft_key(config_lib.parse(tiny_config(**{"sft.min_kept_fraction": 0.5}))) == sft_key(base)
  assert sft_key(config_lib.parse(tiny_config(**{"sft.truncate": "right"}))) != sft_key(base)


# ---- fo_rl.main: one line on stderr, status 1 --------------------------------------------------------


def _main(args, workdir, timeout=120):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
  return subprocess.run(
      [sys.executable, "-m", "fo_rl.main", *args, f"--workdir={workdir}"],
      cwd=REPO,
      env=env,
      capture_output=True,
      text=True,
      timeout=timeout,
  )


@pytest.mark.e2e
@pytest.mark.parametrize(
    "args,pattern",
    [
        (
            ["--config=configs/moe_r3.py:tyni"],
            r"moe_r3\.py:tyni: unknown variant 'tyni'; known: 'tiny'",
        ),
        (
            ["--config=configs/qwen3_30b_a3b.py:v5p64"],
            r"unknown variant 'v5p64'; known: .*'v5p-64'",
        ),
        (
            ["--config=configs/moe_r3.py:tiny", "rl.steps=1"],
            r"unexpected positional argument\(s\) \['rl\.steps=1'\]",
        ),
        (
            ["--config=configs/moe_r3.py:tiny", "--config.rl.foo=1"],
            r"--config\.rl\.foo: the config has no field 'foo'",
        ),
        (
            ["--config=configs/moe_r3.py:tiny", "--config.sft.teacher=sloppy"],
            r"sft\.teacher='sloppy'",
        ),
        (["--config=configs/moe_r3.py:tiny", "--config.seed=-1"], r"seed=-1"),
    ],
    ids=["variant", "variant_qwen", "positional", "unknown_field", "teacher", "seed"],
)
def test_main_prints_one_line_and_exits_1(tmp_path, args, pattern):
  proc = _main(args, tmp_path / "w")
  lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("fo_rl.main: error: ")]
  assert proc.returncode == 1, proc.stderr[-2000:]
  assert len(lines) == 1 and re.search(pattern, lines[0]), proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
  assert not (tmp_path / "w").exists()


# ---- damaged workdirs: a finished tiny run, then resumes -----------------------------------------------


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, run_caches):
  """A tiny run to completion (2 RL steps, checkpoints 1 and 2); tests copy it."""
  from fo_rl.run import run

  d = tmp_path_factory.mktemp("bad_input") / "done"
  c = tiny_config(**{"sft.cache_dir": str(run_caches / "sft")})
  run(c, str(d), log=lambda s: None)
  return c, d


def _copy(finished_run, tmp_path):
  c, d = finished_run
  w = tmp_path / "w"
  shutil.copytree(d, w)
  return c, w


@pytest.mark.e2e
def test_checkpoints_without_config_json_are_refused(finished_run, tmp_path):
  from fo_rl.run import run

  c, w = _copy(finished_run, tmp_path)
  (w / "config.json").unlink()
  before = snapshot(w)
  bad = tiny_config(**{"rl.mini_batches": 2, "rl.replay": "none", "sft.cache_dir": c.sft.cache_dir})
  with pytest.raises(
      UserError, match=r"checkpoints holds checkpoints but .*config\.json is missing"
  ):
    run(bad, str(w), log=lambda s: None)
  assert snapshot(w) == before


@pytest.mark.e2e
def test_a_checkpoint_carries_its_config(finished_run, tmp_path):
  """config.json replaced by the new config (copied from another run): the checkpoint's own copy of the
  config still refuses the resume, naming the fields."""
  from fo_rl.run import run

  c, w = _copy(finished_run, tmp_path)
  bad = tiny_config(**{"rl.mini_batches": 2, "rl.replay": "none", "sft.cache_dir": c.sft.cache_dir})
  (w / "config.json").write_text(bad.to_json_best_effort())
  before = snapshot(w)
  with pytest.raises(
      UserError,
      match=r"checkpoints/2: this checkpoint was trained with a different config \(\['rl\.mini_batches', 'rl\.replay'\]",
  ):
    run(bad, str(w), log=lambda s: None)
  assert snapshot(w) == before


@pytest.mark.e2e
def test_damaged_latest_checkpoint_falls_back(finished_run, tmp_path):
  """Step 2's largest data file truncated: one line naming checkpoints/2 and the cause, the run resumes
  from step 1 (moving step 2 to checkpoints.corrupt/, nothing deleted) with harmless changes allowed and
  logged (rl.steps, parallel.*: restored into the new mesh), and finishes; the step-2 metrics match.
  """
  from fo_rl.metrics_writer import read_metrics
  from fo_rl.run import run

  c, w = _copy(finished_run, tmp_path)
  data = max(
      (p for p in (w / "checkpoints" / "2").rglob("*") if p.is_file()),
      key=lambda p: p.stat().st_size,
  )
  size = data.stat().st_size
  with open(data, "r+b") as f:
    f.truncate(size // 3)
  old_rows = {r["step"]: r for r in read_metrics(str(w))}
  new = tiny_config(**{"rl.steps": 3, "sft.cache_dir": c.sft.cache_dir})
  new.parallel.mesh = {"data": 2, "fsdp": -1, "expert": 2, "tensor": 1}
  logged = []
  summary = run(new, str(w), log=logged.append)
  text = "\n".join(logged)
  assert (
      "changed fields (allowed on resume): parallel.mesh.data: 1 -> 2; parallel.mesh.expert: 1 -> 2; "
      "rl.steps: 2 -> 3" in text
  )
  bad = [ln for ln in logged if "checkpoints/2 cannot be restored" in ln]
  assert len(bad) == 1, text
  assert "falling back to checkpoint step 1" in text and "resuming from" in text
  assert summary["steps"] == 3
  moved = list((w / "checkpoints.corrupt").iterdir())
  assert len(moved) == 1 and moved[0].name.startswith("2.corrupt-")
  assert (moved[0] / data.relative_to(w / "checkpoints" / "2")).stat().st_size == size // 3
  rows = {r["step"]: r for r in read_metrics(str(w))}
  assert rows[2]["entropy"] == pytest.approx(old_rows[2]["entropy"], rel=1e-5)
  assert json.loads((w / "config.json").read_text())["rl"]["steps"] == 3


@pytest.mark.e2e
def test_damaged_sft_cache_is_recomputed(finished_run, tmp_path):
  """A cold start whose cache cannot be read is named, moved aside and computed again (same loss)."""
  from fo_rl.run import run

  c, w = _copy(finished_run, tmp_path)
  cache = tmp_path / "sft_cache"
  shutil.copytree(c.sft.cache_dir, cache)
  (key,) = [p for p in cache.iterdir() if not p.name.endswith(".partial")]
  data = max((p for p in key.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
  with open(data, "r+b") as f:
    f.truncate(10)
  fresh = tmp_path / "fresh"
  logged = []
  run(tiny_config(**{"sft.cache_dir": str(cache), "rl.steps": 1}), str(fresh), log=logged.append)
  text = "\n".join(logged)
  assert re.search(
      rf"cached cold start {re.escape(str(key))} cannot be read \(.*\); moved to .*corrupt", text
  ), text
  assert "SFT step 10/10" in text
  assert any(p.name.startswith(key.name + ".corrupt-") for p in cache.iterdir())


# ---- fo_rl.tools.sample --checkpoint -----------------------------------------------------------------


@pytest.mark.slow
def test_sample_tool_names_a_damaged_step_and_formats_prompts_as_training(tmp_path):
  """A truncated data file in the latest step: one ValueError line naming the step directory and the
  previous step; the prompt gets BOS and, for data.task=jsonl, the training template."""
  import io

  import jax
  import numpy as np

  from fo_rl.checkpoint import Checkpointer
  from fo_rl.data import jsonl
  from fo_rl.model import init_model
  from fo_rl.rl.trainer import Trainer
  from fo_rl.tools import sample as tool

  c = tiny_config(**write_jsonl(tmp_path, None))
  rc = config_lib.parse(c)
  (tmp_path / "config.json").write_text(c.to_json_best_effort())
  graphdef, params = init_model(rc.model, None, rc.parallel.rules, seed=0)
  state = Trainer(graphdef, rc.model, rc.trainer).init_state(params)
  bundle = {"train": state, "rng": jax.random.key_data(jax.random.key(0))}
  with Checkpointer(tmp_path / "checkpoints") as ck:
    for step in (1, 2):
      ck.save(step, bundle, {"step": step}, force=True)
  buf = io.StringIO()
  out = tool.sample(
      checkpoint=str(tmp_path), prompt="2+2?", temperature=0.0, max_new_tokens=2, out=buf
  )
  _, _, tok, _ = tool.load_workdir(str(tmp_path), None)
  ids = tok.encode(jsonl.PROMPT_TEMPLATE.format(prompt="2+2?"), add_bos=True)
  assert ids[0] == tok.bos_id and f"prompt ({len(ids)} tokens)" in buf.getvalue()
  assert "'Question: 2+2?\\nAnswer:' after BOS" in buf.getvalue()
  assert np.asarray(out.lengths)[0] >= 1
  step2 = tmp_path / "checkpoints" / "2"
  data = max((p for p in step2.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
  with open(data, "r+b") as f:
    f.truncate(10)
  with pytest.raises(ValueError) as e:
    tool.load_workdir(str(tmp_path), None)
  msg = str(e.value)
  assert re.search(rf"{re.escape(str(step2))} cannot be restored \(.+\); --step=1 reads", msg), msg
  assert "\n" not in msg
  tool.load_workdir(str(tmp_path), 1)  # the previous step still reads


@pytest.mark.slow
def test_damaged_partial_cold_start_is_restarted(tmp_path):
  """A preempted SFT's `.partial` that cannot be read: named, moved aside, SFT starts over, and gives
  the cold start an uninterrupted SFT gives (same losses)."""
  from fo_rl.data import get_task
  from fo_rl.data.tokenizer import Tokenizer
  from fo_rl.model import init_model
  from fo_rl.sft import cold_start

  rc = config_lib.parse(tiny_config(**{"sft.steps": 3, "sft.warmup_steps": 1}))
  tok, task = Tokenizer.default(), get_task("arithmetic", **rc.data.task_options())
  records = task.generate("train", 64)
  graphdef, params = init_model(rc.model, None, rc.parallel.rules, rc.seed)

  def go(workdir, stop=lambda: False):
    logged = []
    p, info = cold_start(
        rc, graphdef, params, tok, task, records, str(workdir), log=logged.append, stop=stop
    )
    return info, "\n".join(logged)

  ref, _ = go(tmp_path / "ref")
  info, _ = go(tmp_path / "w", stop=lambda: True)  # preempted after SFT step 1
  assert info["preempted"] and info["steps"] == 1
  partial = tmp_path / "w" / "sft.partial"
  data = max((p for p in partial.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
  with open(data, "r+b") as f:
    f.truncate(10)
  info, text = go(tmp_path / "w")
  assert re.search(
      r"preempted SFT in .*sft\.partial cannot be read \(.+\); moved to .*corrupt", text
  ), text
  assert info["final_loss"] == ref["final_loss"] and not info["preempted"]
  assert "resuming SFT" not in text
  assert any(p.name.startswith("sft.partial.corrupt-") for p in (tmp_path / "w").iterdir())


def test_resume_compares_fields_added_since_at_their_defaults():
  """A workdir started before a field existed (its config.json lacks it) resumes when the field is at
  its default, and `rl.advantage: mean` (before `auto`) equals `auto` under minirl; a real change, or a
  new field away from its default, is refused."""
  from fo_rl import config as config_lib
  from fo_rl.run import _config_changes

  new = config_lib.parse(config_lib.tiny(config_lib.base_config())).as_dict
  old = json.loads(json.dumps(new))
  del old["model"]["logits_chunk"], old["model"]["attention_impl"], old["rl"]["max_skipped_steps"]
  old["rl"]["advantage"] = "mean"
  assert _config_changes(old, new) == ([], [])
  changed = json.loads(json.dumps(new))
  changed["model"]["logits_chunk"] = 64
  assert _config_changes(old, changed)[0] == ["model.logits_chunk"]
  old["rl"]["advantage"] = "rloo"
  assert _config_changes(old, new)[0] == ["rl.advantage"]
