"""Tests for the Cloud TPU launcher scripts in launchers/.

A fake `gcloud` (written into tmp_path, first on PATH) records every call's
argv as a JSON line and answers `describe` from environment variables, so the
scripts run end to end without GCP. The remote shell scripts that run.sh and
setup.sh send over ssh are also executed locally (HOME pointed at tmp_path) to
check quoting, detaching, idempotence and stop.
"""

import json
import os
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCHERS = REPO / "launchers"
SCRIPTS = ["create.sh", "setup.sh", "run.sh", "fetch.sh", "delete.sh"]
ALL_SH = sorted(p.name for p in LAUNCHERS.glob("*.sh"))

PROJECT, ZONE, TPU = "proj-1", "us-east5-a", "fo-rl-test"
LOC = [f"--zone={ZONE}", f"--project={PROJECT}"]

FAKE_GCLOUD = textwrap.dedent("""\
    #!{python}
    # Fake gcloud for tests: records argv, answers describe from env vars.
    import json, os, shutil, sys

    argv = sys.argv[1:]
    with open(os.environ["FAKE_GCLOUD_LOG"], "a") as f:
        f.write(json.dumps(argv) + "\\n")

    def fail(msg):
        sys.stderr.write(msg + "\\n")
        sys.exit(1)

    fail_on = os.environ.get("FAKE_FAIL_ON")
    if fail_on and fail_on in argv:
        fail("ERROR: (gcloud) simulated failure")

    if "describe" in argv:
        if os.environ.get("FAKE_DESCRIBE_ERROR"):
            fail("ERROR: (gcloud.compute.tpus.tpu-vm.describe) PERMISSION_DENIED: "
                 "Permission 'tpu.nodes.get' denied")
        kind = "queued-resources" if "queued-resources" in argv else "tpu-vm"
        state = os.environ.get("FAKE_QR" if kind == "queued-resources" else "FAKE_TPU", "")
        if not state:
            name = argv[argv.index("describe") + 1]
            fail(f"ERROR: (gcloud.compute.tpus.{{kind}}.describe) NOT_FOUND: "
                 f"Resource 'projects/p/locations/z/nodes/{{name}}' was not found")
        fmt = next((a for a in argv if a.startswith("--format=")), "")
        if "networkEndpoints" in fmt:
            n = int(os.environ.get("FAKE_WORKERS", "1"))
            print(";".join(f"10.0.0.{{i + 2}}" for i in range(n)))
        else:
            print(state)
        sys.exit(0)

    # scp: keep a copy of local sources so tests can look at them.
    keep = os.environ.get("FAKE_SCP_KEEP")
    if keep and "scp" in argv:
        for a in argv[argv.index("scp") + 1:]:
            if not a.startswith("-") and os.path.isfile(a):
                shutil.copy(a, keep)
    sys.exit(0)
    """)


# ---------------------------------------------------------------- helpers


class Launcher:
  """Runs launcher scripts against the fake gcloud."""

  def __init__(self, tmp_path: Path):
    self.tmp = tmp_path
    self.bin = tmp_path / "bin"
    self.bin.mkdir()
    gcloud = self.bin / "gcloud"
    gcloud.write_text(FAKE_GCLOUD.format(python=sys.executable))
    gcloud.chmod(0o755)
    self.log = tmp_path / "gcloud_calls.jsonl"
    self.env = {k: v for k, v in os.environ.items() if not k.startswith(("FO_RL_", "FAKE_"))}
    self.env.update(
        PATH=f"{self.bin}{os.pathsep}{os.environ['PATH']}",
        FAKE_GCLOUD_LOG=str(self.log),
        TMPDIR=str(tmp_path),
    )

  def run(self, script, *args, env=None, stdin=subprocess.DEVNULL, timeout=60):
    full_env = dict(self.env)
    full_env.update(env or {})
    return subprocess.run(
        [str(LAUNCHERS / script), *args],
        env=full_env,
        stdin=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
    )

  def located(self, script, *args, **kw):
    """Runs with --project/--zone/--tpu given as flags."""
    return self.run(script, f"--project={PROJECT}", f"--zone={ZONE}", f"--tpu={TPU}", *args, **kw)

  def calls(self):
    if not self.log.exists():
      return []
    return [json.loads(line) for line in self.log.read_text().splitlines()]

  def reset(self):
    if self.log.exists():
      self.log.unlink()


@pytest.fixture
def launcher(tmp_path):
  return Launcher(tmp_path)


def ok(proc):
  assert (
      proc.returncode == 0
  ), f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
  return proc


def subcommand(call):
  """['compute', 'tpus', 'tpu-vm', 'create', ...] -> 'tpu-vm create'."""
  assert call[:2] == ["compute", "tpus"], call
  return f"{call[2]} {call[3]}"


def only(calls, sub):
  found = [c for c in calls if subcommand(c) == sub]
  assert len(found) == 1, (sub, calls)
  return found[0]


def remote_command(call):
  cmds = [a for a in call if a.startswith("--command=")]
  assert len(cmds) == 1, call
  return cmds[0][len("--command=") :]


def dry_run_commands(stdout):
  """Parses dry-run stdout: one '+ gcloud ...' line per command."""
  lines = stdout.splitlines()
  assert lines, "dry run printed nothing"
  for line in lines:
    assert line.startswith("+ gcloud "), line
  return [shlex.split(line[2:])[1:] for line in lines]


# ---------------------------------------------------------------- all scripts


@pytest.mark.parametrize("name", ALL_SH)
def test_script_basics(name):
  path = LAUNCHERS / name
  text = path.read_text()
  assert text.startswith("#!/usr/bin/env bash\n")
  assert "\nset -euo pipefail\n" in text
  assert path.stat().st_mode & stat.S_IXUSR, f"{name} is not executable (chmod +x)"


@pytest.mark.parametrize("name", SCRIPTS)
def test_help(launcher, name):
  proc = ok(launcher.run(name, "--help"))
  assert "Usage:" in proc.stdout
  assert "--dry-run" in proc.stdout and "--project" in proc.stdout
  assert "shellcheck" not in proc.stdout
  assert launcher.calls() == []


@pytest.mark.parametrize(
    "name, extra, flags",
    [
        ("create.sh", [], ["--project", "--zone", "--tpu", "--accelerator"]),
        ("setup.sh", [], ["--project", "--zone", "--tpu"]),
        ("run.sh", ["--", "true"], ["--project", "--zone", "--tpu", "--name"]),
        ("fetch.sh", [], ["--project", "--zone", "--tpu"]),
        ("delete.sh", ["--yes"], ["--project", "--zone", "--tpu"]),
    ],
)
def test_missing_required_flags(launcher, name, extra, flags):
  proc = launcher.run(name, *extra)
  assert proc.returncode == 2, proc
  for flag in flags:
    assert flag in proc.stderr, (flag, proc.stderr)
  assert "FO_RL_PROJECT" in proc.stderr  # says which env var works too
  assert launcher.calls() == []


def test_missing_single_flag_named(launcher):
  proc = launcher.run("create.sh", f"--project={PROJECT}", f"--tpu={TPU}", "--accelerator=v5p-8")
  assert proc.returncode == 2
  assert "missing required flag --zone (or set FO_RL_ZONE)" in proc.stderr
  assert "--project" not in proc.stderr and "--tpu" not in proc.stderr


def test_flag_without_value_and_unknown_flag(launcher):
  proc = launcher.run("create.sh", "--zone")
  assert proc.returncode == 2 and "--zone needs a value" in proc.stderr
  proc = launcher.located("create.sh", "--accelerator=v5p-8", "--bogus")
  assert proc.returncode == 2 and "--bogus" in proc.stderr
  assert launcher.calls() == []


def test_gcloud_missing(launcher, tmp_path):
  # A PATH with just what the scripts need before they look for gcloud.
  bare = tmp_path / "bare"
  bare.mkdir()
  for tool in ["bash", "dirname", "basename"]:
    os.symlink(shutil.which(tool), bare / tool)
  proc = launcher.located("delete.sh", "--yes", env={"PATH": str(bare)})
  assert proc.returncode == 1 and "gcloud not found" in proc.stderr
  # --dry-run does not need gcloud.
  ok(launcher.located("delete.sh", "--dry-run", env={"PATH": str(bare)}))


def test_invalid_tpu_name(launcher):
  proc = launcher.run(
      "delete.sh", f"--project={PROJECT}", f"--zone={ZONE}", "--tpu=Bad_Name", "--yes"
  )
  assert proc.returncode == 2 and "--tpu" in proc.stderr
  assert launcher.calls() == []


# ---------------------------------------------------------------- dry run

DRY_RUN_CASES = [
    ("create.sh", ["--accelerator=v5p-64", "--spot"], {}),
    ("create.sh", ["--accelerator=v6e-16", "--queued", "--reserved"], {}),
    ("delete.sh", ["--yes"], {"FAKE_TPU": "READY"}),
    ("delete.sh", ["--queued", "--yes"], {"FAKE_QR": "ACTIVE"}),
    ("run.sh", ["--name=r1", "--", "python", "-m", "fo_rl.main", "--workdir=gs://b/x y"], {}),
    ("run.sh", ["--name=r1", "--stop"], {}),
    ("fetch.sh", ["--name=r1", "--workers=3", "--dest={tmp}/out"], {}),
    ("setup.sh", ["--repo-url=https://example.com/fo_rl.git"], {}),
]


@pytest.mark.parametrize("name, args, fake_env", DRY_RUN_CASES)
def test_dry_run_prints_exactly_what_a_real_run_runs(launcher, tmp_path, name, args, fake_env):
  args = [a.format(tmp=tmp_path) for a in args]
  dry = ok(launcher.located(name, "--dry-run", *args))
  assert launcher.calls() == [], "gcloud must not be called in --dry-run"
  printed = dry_run_commands(dry.stdout)
  ok(launcher.located(name, *args, env=fake_env))
  assert printed == launcher.calls()


def test_dry_run_setup_local_copy(launcher, tmp_path):
  src = make_src(tmp_path)
  dry = ok(launcher.located("setup.sh", "--dry-run", f"--src={src}"))
  assert launcher.calls() == []
  scp, ssh = dry_run_commands(dry.stdout)
  assert subcommand(scp) == "tpu-vm scp" and "--worker=all" in scp
  assert subcommand(ssh) == "tpu-vm ssh" and "--worker=all" in ssh
  assert list(tmp_path.glob("fo_rl_src.*")) == []  # nothing packed either


def test_dry_run_env_defaults(launcher):
  env = {
      "FO_RL_PROJECT": PROJECT,
      "FO_RL_ZONE": ZONE,
      "FO_RL_TPU_NAME": TPU,
      "FO_RL_ACCELERATOR": "v5litepod-16",
      "FO_RL_RUNTIME_VERSION": "my-runtime",
  }
  dry = ok(launcher.run("create.sh", "--dry-run", env=env))
  _, create = dry_run_commands(dry.stdout)
  assert create == [
      "compute",
      "tpus",
      "tpu-vm",
      "create",
      TPU,
      *LOC,
      "--accelerator-type=v5litepod-16",
      "--version=my-runtime",
  ]
  # Flags win over the environment.
  dry = ok(
      launcher.run(
          "create.sh", "--dry-run", "--zone=europe-west4-b", "--accelerator", "v5litepod-8", env=env
      )
  )
  _, create = dry_run_commands(dry.stdout)
  assert "--zone=europe-west4-b" in create and "--accelerator-type=v5litepod-8" in create


# ---------------------------------------------------------------- create


def test_create_spot(launcher):
  ok(launcher.located("create.sh", "--accelerator=v5p-64", "--spot"))
  describe, create = launcher.calls()
  assert describe == ["compute", "tpus", "tpu-vm", "describe", TPU, *LOC, "--format=value(state)"]
  assert create == [
      "compute",
      "tpus",
      "tpu-vm",
      "create",
      TPU,
      *LOC,
      "--accelerator-type=v5p-64",
      "--version=v2-alpha-tpuv5",
      "--spot",
  ]


@pytest.mark.parametrize(
    "accelerator, version",
    [
        ("v6e-8", "v2-alpha-tpuv6e"),
        ("v5litepod-16", "v2-alpha-tpuv5-lite"),
        ("v5p-128", "v2-alpha-tpuv5"),
        ("v4-32", "tpu-ubuntu2204-base"),
    ],
)
def test_create_default_runtime_version(launcher, accelerator, version):
  ok(launcher.located("create.sh", f"--accelerator={accelerator}"))
  create = only(launcher.calls(), "tpu-vm create")
  assert f"--version={version}" in create
  assert "--spot" not in create and "--reserved" not in create


def test_create_reserved_explicit_version_and_passthrough(launcher):
  ok(
      launcher.located(
          "create.sh",
          "--accelerator-type=v5p-64",
          "--reserved",
          "--runtime_version=v2-custom",
          "--",
          "--network=my-net",
          "--internal-ips",
      )
  )
  create = only(launcher.calls(), "tpu-vm create")
  assert create[-4:] == ["--version=v2-custom", "--reserved", "--network=my-net", "--internal-ips"]


def test_create_unknown_accelerator_needs_version(launcher):
  proc = launcher.located("create.sh", "--accelerator=v9x-8")
  assert proc.returncode == 2 and "--version" in proc.stderr
  assert launcher.calls() == []


def test_create_spot_and_reserved_conflict(launcher):
  proc = launcher.located("create.sh", "--accelerator=v5p-8", "--spot", "--reserved")
  assert proc.returncode == 2 and "--spot" in proc.stderr and "--reserved" in proc.stderr
  assert launcher.calls() == []


def test_create_is_idempotent(launcher):
  proc = ok(
      launcher.located("create.sh", "--accelerator=v5p-64", "--spot", env={"FAKE_TPU": "READY"})
  )
  assert "already exists" in proc.stderr and "READY" in proc.stderr
  assert [subcommand(c) for c in launcher.calls()] == ["tpu-vm describe"]


def test_create_existing_but_preempted_fails(launcher):
  proc = launcher.located(
      "create.sh", "--accelerator=v5p-64", "--spot", env={"FAKE_TPU": "PREEMPTED"}
  )
  assert proc.returncode == 1 and "PREEMPTED" in proc.stderr and "delete.sh" in proc.stderr
  assert [subcommand(c) for c in launcher.calls()] == ["tpu-vm describe"]


def test_create_describe_error_is_not_taken_for_absent(launcher):
  proc = launcher.located("create.sh", "--accelerator=v5p-64", env={"FAKE_DESCRIBE_ERROR": "1"})
  assert proc.returncode == 1 and "PERMISSION_DENIED" in proc.stderr
  assert [subcommand(c) for c in launcher.calls()] == ["tpu-vm describe"]


def test_create_queued(launcher):
  ok(launcher.located("create.sh", "--accelerator=v5p-64", "--queued", "--spot"))
  calls = launcher.calls()
  assert [subcommand(c) for c in calls] == [
      "tpu-vm describe",
      "queued-resources describe",
      "queued-resources create",
  ]
  assert calls[2] == [
      "compute",
      "tpus",
      "queued-resources",
      "create",
      TPU,
      *LOC,
      f"--node-id={TPU}",
      "--accelerator-type=v5p-64",
      "--runtime-version=v2-alpha-tpuv5",
      "--spot",
  ]


def test_create_queued_custom_id_and_idempotent(launcher):
  ok(launcher.located("create.sh", "--accelerator=v5p-64", "--queued", "--qr_id=my-qr"))
  assert only(launcher.calls(), "queued-resources create")[4] == "my-qr"
  launcher.reset()
  proc = ok(
      launcher.located(
          "create.sh", "--accelerator=v5p-64", "--queued", env={"FAKE_QR": "WAITING_FOR_RESOURCES"}
      )
  )
  assert "already exists" in proc.stderr
  assert "queued-resources create" not in [subcommand(c) for c in launcher.calls()]
  launcher.reset()
  proc = launcher.located(
      "create.sh", "--accelerator=v5p-64", "--queued", env={"FAKE_QR": "FAILED"}
  )
  assert proc.returncode == 1 and "FAILED" in proc.stderr
  assert "queued-resources create" not in [subcommand(c) for c in launcher.calls()]


# ---------------------------------------------------------------- delete


def test_delete_absent_is_fine(launcher):
  proc = ok(launcher.located("delete.sh", "--yes"))
  assert "nothing to delete" in proc.stderr
  assert [subcommand(c) for c in launcher.calls()] == [
      "queued-resources describe",
      "tpu-vm describe",
  ]


def test_delete_tpu_vm(launcher):
  ok(launcher.located("delete.sh", "--yes", env={"FAKE_TPU": "READY"}))
  delete = only(launcher.calls(), "tpu-vm delete")
  assert delete == ["compute", "tpus", "tpu-vm", "delete", TPU, *LOC, "--quiet"]


def test_delete_queued_resource_first(launcher):
  ok(launcher.located("delete.sh", "-q", env={"FAKE_QR": "ACTIVE", "FAKE_TPU": "READY"}))
  calls = launcher.calls()
  assert [subcommand(c) for c in calls] == ["queued-resources describe", "queued-resources delete"]
  assert calls[1] == [
      "compute",
      "tpus",
      "queued-resources",
      "delete",
      TPU,
      *LOC,
      "--force",
      "--quiet",
  ]


@pytest.mark.parametrize("flag", ["--yes", "-y", "--quiet", "-q"])
def test_delete_confirmation_flags(launcher, flag):
  ok(launcher.located("delete.sh", flag, env={"FAKE_TPU": "READY"}))
  only(launcher.calls(), "tpu-vm delete")


def test_delete_without_yes_refuses_when_not_a_terminal(launcher):
  proc = launcher.located("delete.sh", env={"FAKE_TPU": "READY"})
  assert proc.returncode == 1 and "--yes" in proc.stderr
  assert all(c[3] == "describe" for c in launcher.calls())


# ---------------------------------------------------------------- setup


def make_src(tmp_path):
  """A small git checkout with tracked, untracked and ignored files."""
  src = tmp_path / "src"
  (src / "fo_rl").mkdir(parents=True)
  (src / "fo_rl" / "__init__.py").write_text("")
  (src / "requirements.txt").write_text("# pins\njax==1.2.3  # comment\njaxlib==1.2.3\n")
  (src / ".gitignore").write_text(".venv/\n/workdirs/\n*.pyc\n")
  git = ["git", "-C", str(src), "-c", "user.email=t@t", "-c", "user.name=t"]
  subprocess.run(["git", "init", "-q", str(src)], check=True)
  subprocess.run([*git, "add", "."], check=True)
  subprocess.run([*git, "commit", "-qm", "init"], check=True)
  (src / "untracked.py").write_text("x = 1\n")
  (src / ".venv" / "bin").mkdir(parents=True)
  (src / ".venv" / "bin" / "python").write_text("big\n")
  (src / "workdirs").mkdir()
  (src / "workdirs" / "ckpt").write_text("big\n")
  (src / "fo_rl" / "mod.pyc").write_text("")
  return src


def run_remote(script, home, extra_path=(), timeout=60):
  """Runs a --command script locally the way sshd would (login shell -c)."""
  env = {k: v for k, v in os.environ.items() if not k.startswith(("FO_RL_", "VIRTUAL_ENV"))}
  env["HOME"] = str(home)
  env["PATH"] = os.pathsep.join([*map(str, extra_path), os.environ["PATH"]])
  return subprocess.run(
      ["bash", "-c", script], env=env, capture_output=True, text=True, timeout=timeout, cwd=home
  )


def fake_worker_bin(tmp_path, worker="3"):
  """curl that answers the metadata server's agent-worker-number."""
  b = tmp_path / "workerbin"
  b.mkdir(exist_ok=True)
  curl = b / "curl"
  curl.write_text(f"#!/bin/sh\necho {worker}\n")
  curl.chmod(0o755)
  return b


def test_setup_copies_the_checkout(launcher, tmp_path):
  src = make_src(tmp_path)
  keep = tmp_path / "kept"
  keep.mkdir()
  ok(launcher.located("setup.sh", f"--src={src}", "--code_only", env={"FAKE_SCP_KEEP": str(keep)}))
  scp, ssh = launcher.calls()
  assert subcommand(scp) == "tpu-vm scp"
  assert scp[-4:] == [f"{TPU}:fo_rl_src.tar.gz", *LOC, "--worker=all"]
  assert subcommand(ssh) == "tpu-vm ssh" and ssh[4] == TPU
  assert ssh[5:8] == [*LOC, "--worker=all"]
  assert list(tmp_path.glob("fo_rl_src.*")) == []  # local temp dir cleaned up

  # Unpack on a pretend worker with the script that went over ssh.
  home = tmp_path / "home"
  home.mkdir()
  shutil.copy(keep / "fo_rl_src.tar.gz", home / "fo_rl_src.tar.gz")
  script = remote_command(ssh)
  assert "pip" not in script  # --code-only
  proc = run_remote(script, home, [fake_worker_bin(tmp_path)])
  assert proc.returncode == 0, proc.stderr
  got = sorted(
      str(p.relative_to(home / "fo_rl")) for p in (home / "fo_rl").rglob("*") if p.is_file()
  )
  assert got == [".gitignore", "fo_rl/__init__.py", "requirements.txt", "untracked.py"]
  assert not (home / "fo_rl_src.tar.gz").exists()
  # Re-running unpacks over the old copy and keeps files it does not ship.
  (home / "fo_rl" / "workdirs").mkdir()
  (home / "fo_rl" / "workdirs" / "keep").write_text("")
  shutil.copy(keep / "fo_rl_src.tar.gz", home / "fo_rl_src.tar.gz")
  assert run_remote(script, home, [fake_worker_bin(tmp_path)]).returncode == 0
  assert (home / "fo_rl" / "workdirs" / "keep").exists()


def test_setup_installs_pinned_jax_into_venv(launcher, tmp_path):
  src = make_src(tmp_path)
  ok(launcher.located("setup.sh", f"--src={src}", "--python=fakepy"))
  script = remote_command(launcher.calls()[-1])
  assert "JAX=1.2.3;" in script and '"jax[tpu]==$JAX"' in script

  # Run the install part with a fake interpreter that logs what it is asked.
  home = tmp_path / "home"
  (home / "fo_rl").mkdir(parents=True)
  (home / "fo_rl_src.tar.gz").write_bytes(b"")
  bin_dir = fake_worker_bin(tmp_path)
  pylog = tmp_path / "py.log"
  fakepy = bin_dir / "fakepy"
  fakepy.write_text(textwrap.dedent(f"""\
        #!/bin/sh
        echo "$0 $*" >> {pylog}
        if [ "$1" = -m ] && [ "$2" = venv ]; then mkdir -p "$3/bin"; cp "$0" "$3/bin/python"; fi
        exit 0
        """))
  fakepy.chmod(0o755)
  script = script.replace('tar -xzf "$HOME/fo_rl_src.tar.gz" -C "$DIR"', "true")
  for _ in range(2):
    proc = run_remote(script, home, [bin_dir])
    assert proc.returncode == 0, proc.stderr
  lines = pylog.read_text().splitlines()
  venv = home / "fo_rl_venv"
  assert sum("-m venv" in line for line in lines) == 1  # venv made once
  assert (
      f"{venv}/bin/python -m pip install -q jax[tpu]==1.2.3 -r {home}/fo_rl/requirements.txt"
      in lines
  )
  assert "[worker 3] setup done" in proc.stdout


def test_setup_default_jax_pin_matches_requirements(launcher):
  pin = next(
      line.split("==")[1].split()[0]
      for line in (REPO / "requirements.txt").read_text().splitlines()
      if line.startswith("jax==")
  )
  ok(launcher.located("setup.sh", "--repo_url=https://example.com/r.git"))
  assert f"JAX={pin};" in remote_command(launcher.calls()[-1])


def test_setup_git_clone(launcher, tmp_path):
  ok(
      launcher.located(
          "setup.sh",
          "--repo_url=https://example.com/o/fo_rl.git",
          "--repo_ref=v1.0",
          "--remote_dir=/opt/code",
          "--venv=/opt/venv",
      )
  )
  (ssh,) = launcher.calls()  # no scp
  script = remote_command(ssh)
  assert "URL=https://example.com/o/fo_rl.git;" in script and "REF=v1.0;" in script
  assert "DIR=/opt/code;" in script and "VENV=/opt/venv;" in script

  # The clone part really works against a local repository.
  origin = make_src(tmp_path)
  ok(launcher.located("setup.sh", f"--repo-url={origin}", "--code-only"))
  script = remote_command(launcher.calls()[-1])
  home = tmp_path / "home"
  home.mkdir()
  for _ in range(2):  # idempotent
    proc = run_remote(script, home, [fake_worker_bin(tmp_path)])
    assert proc.returncode == 0, proc.stderr
  assert (home / "fo_rl" / "fo_rl" / "__init__.py").exists()
  assert not (home / "fo_rl" / "untracked.py").exists()


def test_setup_gcloud_flag_passthrough(launcher):
  ok(launcher.located("setup.sh", "--repo-url=u", "--gcloud-flag=--internal-ip"))
  assert "--internal-ip" in launcher.calls()[-1]


# ---------------------------------------------------------------- run

USER_ARGS = ["it's", "$HOME", "a b", ";", '"q"', "*", "--workdir=gs://bucket/run 1"]


def test_run_command_quoting(launcher):
  ok(
      launcher.located(
          "run.sh",
          "--name=exp1",
          "--",
          "python",
          "-m",
          "fo_rl.main",
          "--config=configs/qwen3_30b_a3b.py",
          *USER_ARGS,
      )
  )
  (ssh,) = launcher.calls()
  assert ssh[:5] == ["compute", "tpus", "tpu-vm", "ssh", TPU]
  assert ssh[5:8] == [*LOC, "--worker=all"]
  script = remote_command(ssh)
  # The user's command is set as the positional args, each word quoted once.
  words = script.split("; set -- ", 1)[1].split('; printf "%s\\n" "$*"', 1)[0]
  assert shlex.split(words) == [
      "python",
      "-m",
      "fo_rl.main",
      "--config=configs/qwen3_30b_a3b.py",
      *USER_ARGS,
  ]
  assert words.startswith("python -m fo_rl.main --config=configs/qwen3_30b_a3b.py 'it'")
  assert "setsid nohup" in script and "< /dev/null &" in script
  assert subprocess.run(["bash", "-n", "-c", script]).returncode == 0


@pytest.fixture
def worker_home(tmp_path):
  """A pretend worker: $HOME with the repo dir and a venv whose python is ours."""
  home = tmp_path / "home"
  (home / "fo_rl").mkdir(parents=True)
  (home / "fo_rl_venv" / "bin").mkdir(parents=True)
  os.symlink(sys.executable, home / "fo_rl_venv" / "bin" / "python")
  pids = []
  yield home, pids
  for pid in pids:
    try:
      os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
      pass


def wait_for(pred, timeout=20.0):
  end = time.time() + timeout
  while time.time() < end:
    if pred():
      return True
    time.sleep(0.1)
  return False


def alive(pid):
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  # A zombie is not running.
  try:
    return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
  except FileNotFoundError:
    return False


@pytest.mark.skipif(shutil.which("setsid") is None, reason="needs setsid (util-linux)")
def test_run_detaches_and_is_idempotent_and_stops(launcher, tmp_path, worker_home):
  home, pids = worker_home
  prog = (
      "import json, os, sys, time; print('ARGV=' + json.dumps(sys.argv[1:])); "
      "print('CWD=' + os.getcwd()); sys.stdout.flush(); time.sleep(120)"
  )
  ok(launcher.located("run.sh", "--name=exp1", "--", "python", "-c", prog, *USER_ARGS))
  script = remote_command(launcher.calls()[-1])
  path = [fake_worker_bin(tmp_path, worker="3")]

  t0 = time.time()
  proc = run_remote(script, home, path, timeout=30)
  assert proc.returncode == 0, proc.stderr
  assert time.time() - t0 < 15, "the ssh command must return while the run goes on"
  assert "[worker 3] started" in proc.stdout

  logdir = home / "fo_rl_logs" / "exp1"
  log, pidfile = logdir / "worker-3.log", logdir / "worker-3.pid"
  # The log's header line quotes the command, "CWD=" included: wait for the program's own output line.
  assert wait_for(lambda: pidfile.exists() and "\nCWD=" in log.read_text())
  pid = int(pidfile.read_text())
  pids.append(pid)
  assert alive(pid)
  assert os.getsid(pid) == pid, "the run must be in its own session (setsid)"
  text = log.read_text()
  assert f"ARGV={json.dumps(USER_ARGS)}" in text  # argv arrives exactly
  assert f"CWD={home / 'fo_rl'}" in text
  assert (logdir / "command").read_text().startswith("python -c ")

  # Second start: already running, nothing new started.
  proc = run_remote(script, home, path, timeout=30)
  assert proc.returncode == 0 and "already running" in proc.stdout
  assert int(pidfile.read_text()) == pid
  assert log.read_text().count(" starts: ") == 1

  # Another run on the same worker is started but warned about (TPU busy).
  launcher.reset()
  ok(launcher.located("run.sh", "--name=exp2", "--", "python", "-c", "pass"))
  proc = run_remote(remote_command(launcher.calls()[-1]), home, path)
  assert proc.returncode == 0 and "another run is still active" in proc.stderr
  assert "exp1/worker-3.pid" in proc.stderr

  # --status and --stop.
  launcher.reset()
  ok(launcher.located("run.sh", "--name=exp1", "--status"))
  proc = run_remote(remote_command(launcher.calls()[-1]), home, path)
  assert f"[worker 3] running (pid {pid})" in proc.stdout
  launcher.reset()
  ok(launcher.located("run.sh", "--name=exp1", "--stop", "--stop-timeout=10"))
  proc = run_remote(remote_command(launcher.calls()[-1]), home, path)
  assert proc.returncode == 0 and f"stopped pid {pid}" in proc.stdout
  assert wait_for(lambda: not alive(pid), timeout=10)
  proc = run_remote(remote_command(launcher.calls()[-1]), home, path)
  assert "is not running" in proc.stdout


def test_run_without_venv_fails_clearly(launcher, tmp_path):
  ok(launcher.located("run.sh", "--name=exp1", "--", "python", "-V"))
  home = tmp_path / "home"
  home.mkdir()
  proc = run_remote(remote_command(launcher.calls()[-1]), home, [fake_worker_bin(tmp_path)])
  assert proc.returncode == 1 and "setup.sh" in proc.stderr


def test_run_argument_errors(launcher):
  proc = launcher.located("run.sh", "--name=exp1")
  assert proc.returncode == 2 and "--" in proc.stderr and "command" in proc.stderr
  proc = launcher.located("run.sh", "--name=../x", "--", "true")
  assert proc.returncode == 2 and "--name" in proc.stderr
  proc = launcher.located("run.sh", "--name=x", "--stop", "--", "true")
  assert proc.returncode == 2
  assert launcher.calls() == []


# ---------------------------------------------------------------- fetch


def test_fetch_per_worker(launcher, tmp_path):
  dest = tmp_path / "out"
  ok(
      launcher.located(
          "fetch.sh",
          "--name=exp1",
          f"--dest={dest}",
          "--path=fo_rl/workdirs/exp1",
          env={"FAKE_TPU": "READY", "FAKE_WORKERS": "3"},
      )
  )
  describe, *scps = launcher.calls()
  assert subcommand(describe) == "tpu-vm describe"
  assert len(scps) == 3
  for k, scp in enumerate(scps):
    assert scp == [
        "compute",
        "tpus",
        "tpu-vm",
        "scp",
        "--recurse",
        f"{TPU}:fo_rl_logs/exp1",
        f"{TPU}:fo_rl/workdirs/exp1",
        f"{dest}/worker-{k}/",
        *LOC,
        f"--worker={k}",
    ]
    assert (dest / f"worker-{k}").is_dir()


def test_fetch_one_worker_all_runs(launcher, tmp_path):
  ok(
      launcher.located(
          "fetch.sh", "--worker=2", f"--dest={tmp_path / 'o'}", "--log_root=/data/logs"
      )
  )
  (scp,) = launcher.calls()  # no describe needed
  assert f"{TPU}:/data/logs" in scp and "--worker=2" in scp


def test_fetch_keeps_going_when_a_worker_fails(launcher, tmp_path):
  proc = launcher.located(
      "fetch.sh", "--workers=3", f"--dest={tmp_path / 'o'}", env={"FAKE_FAIL_ON": "--worker=1"}
  )
  assert proc.returncode == 1 and "worker(s) 1" in proc.stderr
  assert [c[-1] for c in launcher.calls()] == ["--worker=0", "--worker=1", "--worker=2"]


def test_fetch_absent_tpu(launcher, tmp_path):
  proc = launcher.located("fetch.sh", f"--dest={tmp_path / 'o'}")
  assert proc.returncode == 1 and "does not exist" in proc.stderr


# ---------------------------------------------------------------- quoting helper


def test_shq_round_trips():
  words = ["plain", "", "it's", "a b", "$x", "`y`", "*", "--f=a;b", "new\nline", "ü"]
  script = f'source {shlex.quote(str(LAUNCHERS / "common.sh"))}; shjoin "$@"'
  out = subprocess.run(
      ["bash", "-c", script, "x", *words], capture_output=True, text=True, check=True
  ).stdout
  assert shlex.split(out) == words


# ---------------------------------------------------------------- shellcheck


def test_shellcheck():
  scripts = sorted(str(p) for p in LAUNCHERS.glob("*.sh"))
  assert scripts
  if shutil.which("shellcheck") is None:
    msg = (
        "shellcheck is not installed (apt-get install -y shellcheck, "
        "brew install shellcheck); it is required when CI is set"
    )
    if os.environ.get("CI"):
      pytest.fail(msg)
    pytest.skip(msg)
  proc = subprocess.run(["shellcheck", "-x", *scripts], capture_output=True, text=True)
  assert proc.returncode == 0, proc.stdout + proc.stderr


# ---------------------------------------------------------------- docs


def doc_commands():
  """`launchers/...` commands in the bash blocks of docs/tpu.md and launchers/README.md."""
  cmds = []
  for doc in [REPO / "docs" / "tpu.md", LAUNCHERS / "README.md"]:
    in_block = False
    joined = ""
    for line in doc.read_text().splitlines():
      if line.startswith("```"):
        in_block = not in_block
        continue
      if not in_block:
        continue
      joined += line
      if joined.endswith("\\"):
        joined = joined[:-1]
        continue
      cmd, joined = joined.strip(), ""
      if cmd.startswith("launchers/"):
        cmds.append((doc.name, cmd))
  return cmds


@pytest.mark.parametrize("doc, cmd", doc_commands())
def test_documented_commands_parse(launcher, doc, cmd):
  script, rest = cmd.split(" ", 1) if " " in cmd else (cmd, "")
  env = {
      "FO_RL_PROJECT": PROJECT,
      "FO_RL_ZONE": ZONE,
      "FO_RL_TPU_NAME": TPU,
      "FO_RL_ACCELERATOR": "v5p-64",
      "WORKDIR": "gs://b/w",
  }
  full_env = dict(launcher.env, **env)
  proc = subprocess.run(
      ["bash", "-c", f"{REPO}/{script} --dry-run {rest}"],
      env=full_env,
      capture_output=True,
      text=True,
      timeout=60,
  )
  assert proc.returncode == 0, (doc, cmd, proc.stderr)
  dry_run_commands(proc.stdout)
  assert launcher.calls() == []
