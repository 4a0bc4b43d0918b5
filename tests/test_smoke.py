"""fo_rl/tools/smoke.py, the install check CI runs in a venv holding requirements.txt alone.

CI runs it for real (`.ci/run`, before the test install); here: its dry run writes a checkpoint that loads
back with its tokenizer, and every command it would run is one the CLI accepts."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def test_checkpoint_it_writes_loads_back_with_its_tokenizer(tmp_path):
  from fo_rl.data.tokenizer import HFTokenizer
  from fo_rl.model.hf import load_hf_checkpoint
  from fo_rl.tools import smoke

  d = str(tmp_path / "hf")
  smoke.write_hf_checkpoint(d)
  cfg, _, state = load_hf_checkpoint(d)
  assert cfg.num_experts > 0 and all(np.isfinite(x).all() for x in jax.tree.leaves(state))
  tok = HFTokenizer(d)
  assert tok.eos_id == 3 and tok.vocab_size <= cfg.vocab_size
  assert tok.decode(tok.encode(smoke.PROMPT, add_bos=True)) == smoke.PROMPT


@pytest.mark.e2e
def test_dry_run_prints_commands_the_main_job_accepts(tmp_path):
  from ml_collections import config_flags  # noqa: F401  (the main job's config loading)

  from fo_rl import config as config_lib
  from fo_rl.tools import smoke

  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run(
      [sys.executable, "-m", "fo_rl.tools.smoke", f"--workdir={tmp_path}", "--dry_run"],
      cwd=REPO,
      env=env,
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  printed = [l[2:] for l in proc.stdout.splitlines() if l.startswith("+ ")]
  cmds = smoke.commands(str(tmp_path))
  assert len(printed) == len(cmds) == 4
  assert not (tmp_path / "run").exists()  # a dry run runs nothing
  assert json.loads((tmp_path / "hf" / "config.json").read_text())["eos_token_id"] == 3
  # The main job's overrides parse against the recipe, and the checkpoint matches its model.
  c = smoke._config()
  for arg in cmds[0][1]:
    if arg.startswith("--config."):
      key, value = arg[len("--config.") :].split("=", 1)
      *path, last = key.split(".")
      node = c
      for p in path:
        node = node[p]
      node[last] = type(node[last])(value) if node[last] is not None else value
  rc = config_lib.parse(c)
  assert rc.rl.steps == 2 and rc.init.hf_checkpoint == str(tmp_path / "hf")
  on_disk = json.loads((tmp_path / "hf" / "config.json").read_text())
  assert on_disk["num_experts"] == rc.model.num_experts
  assert on_disk["hidden_size"] == rc.model.hidden_size
