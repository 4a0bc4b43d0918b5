#!/usr/bin/env bash
# shellcheck disable=SC2016  # $VARS in single quotes are for the remote shell
# Put fo_rl on every worker of a TPU VM (--worker=all) and install it into a
# virtualenv: jax[tpu] (pinned to the jax== line of requirements.txt) plus
# requirements.txt. Safe to re-run: it refreshes the code and pip-installs again
# (a no-op when nothing changed); it never deletes files on the workers.
#
# Code comes from the local checkout (default) or from git (--repo-url):
#   local: the files git tracks plus untracked, non-ignored ones (so no .venv,
#          .git or workdirs) are packed into a tarball, copied to every worker
#          with `gcloud compute tpus tpu-vm scp --worker=all` and unpacked over
#          --remote-dir. Outside a git checkout: the whole --src directory minus
#          .git, .venv, workdirs and __pycache__.
#   git:   every worker fetches --repo-ref from --repo-url into --remote-dir and
#          checks it out (the VM needs read access to the repository).
#
# Usage:
#   launchers/setup.sh --tpu=NAME [--repo-url=URL [--repo-ref=REF]] [--code-only]
#
# Flags (env var default in brackets):
#   --project=P        GCP project [FO_RL_PROJECT]                     required
#   --zone=Z           zone [FO_RL_ZONE]                               required
#   --tpu=NAME         TPU VM name [FO_RL_TPU_NAME]                    required
#   --src=DIR          local checkout to copy (default: this repository)
#   --repo-url=URL     clone from git instead of copying the local checkout
#   --repo-ref=REF     branch, tag or commit for --repo-url (default: HEAD)
#   --remote-dir=DIR   code dir on the workers [FO_RL_REMOTE_DIR, fo_rl]
#   --venv=DIR         virtualenv on the workers [FO_RL_VENV, fo_rl_venv]
#   --python=PY        interpreter for the venv (default python3.11; installed
#                      with apt when missing)
#   --jax-version=V    jax[tpu] version (default: jax== in requirements.txt)
#   --code-only        only refresh the code; skip python/venv/pip
#   --gcloud-flag=F    extra flag for gcloud ssh/scp, repeatable
#                      (e.g. --gcloud-flag=--internal-ip)
#   --dry-run          print the gcloud commands ('+ gcloud ...'), run nothing
#   -h, --help         this help
# Relative remote paths are relative to $HOME on each worker.

set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

SRC="${FO_RL_REPO_ROOT}"
REPO_URL=""
REPO_REF="HEAD"
PY="python3.11"
JAX_VERSION=""
CODE_ONLY=0

while [[ $# -gt 0 ]]; do
  FLAG_SHIFT=1
  case "$(flag_name "$1")" in
    --src) take_value "$@"; SRC="${FLAG_VALUE}" ;;
    --repo-url) take_value "$@"; REPO_URL="${FLAG_VALUE}" ;;
    --repo-ref) take_value "$@"; REPO_REF="${FLAG_VALUE}" ;;
    --python) take_value "$@"; PY="${FLAG_VALUE}" ;;
    --jax-version) take_value "$@"; JAX_VERSION="${FLAG_VALUE}" ;;
    --code-only) no_value "$1"; CODE_ONLY=1 ;;
    *) common_flag "$@" || ssh_flag "$@" || usage_error "unknown argument: $1" ;;
  esac
  shift "${FLAG_SHIFT}"
done

require_location
if [[ -z "${REPO_URL}" && ! -d "${SRC}" ]]; then
  usage_error "--src '${SRC}' is not a directory"
fi
if [[ -z "${JAX_VERSION}" && "${CODE_ONLY}" == 0 ]]; then
  if [[ -f "${SRC}/requirements.txt" ]]; then
    JAX_VERSION="$(sed -n 's/^jax==\([^[:space:];#]*\).*/\1/p' "${SRC}/requirements.txt" | head -n 1)"
  fi
  if [[ -z "${JAX_VERSION}" ]]; then
    usage_error "no 'jax==' line in ${SRC}/requirements.txt; pass --jax-version"
  fi
fi
loc_args

REMOTE_TARBALL="fo_rl_src.tar.gz"

# make_tarball SRC OUT: packs the checkout at SRC into OUT.
make_tarball() {
  local src="$1" out="$2" list f
  export COPYFILE_DISABLE=1 # no macOS ._ files
  if git -C "${src}" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    list="${out}.files"
    (cd "${src}" && git ls-files -z --cached --others --exclude-standard) |
      while IFS= read -r -d '' f; do
        if [[ -e "${src}/${f}" || -L "${src}/${f}" ]]; then printf '%s\0' "${f}"; fi
      done >"${list}"
    tar -czf "${out}" -C "${src}" --null -T "${list}"
    rm -f "${list}"
  else
    warn "${src} is not a git checkout; copying all of it except .git, .venv, workdirs, __pycache__"
    tar -czf "${out}" -C "${src}" --exclude=.git --exclude=.venv --exclude=workdirs \
      --exclude=__pycache__ --exclude='*.pyc' .
  fi
}

# ------------------------------------------------------------ 1. local package
if [[ -z "${REPO_URL}" ]]; then
  if [[ "${DRY_RUN}" == 1 ]]; then
    TARBALL="${TMPDIR:-/tmp}/fo_rl_src.XXXXXX/${REMOTE_TARBALL}"
    log "dry run: would pack ${SRC} into ${TARBALL}"
  else
    TMP_DIR="$(mktemp -d "${TMPDIR:-/tmp}/fo_rl_src.XXXXXX")"
    trap 'rm -rf "${TMP_DIR}"' EXIT
    TARBALL="${TMP_DIR}/${REMOTE_TARBALL}"
    make_tarball "${SRC}" "${TARBALL}"
    log "packed ${SRC} into ${TARBALL} ($(du -h "${TARBALL}" | cut -f1))"
  fi
  run gcloud compute tpus tpu-vm scp "${TARBALL}" "${TPU}:${REMOTE_TARBALL}" "${LOC[@]}" \
    --worker=all ${GCLOUD_FLAGS[@]+"${GCLOUD_FLAGS[@]}"}
fi

# ------------------------------------------------------------ 2. remote script
rs 'set -eu'
rs_var DIR "${REMOTE_DIR}"
rs_abs DIR
rs_worker_id
if [[ -z "${REPO_URL}" ]]; then
  rs 'echo "[worker $W] unpacking the code into $DIR"' \
    'mkdir -p "$DIR"' \
    "tar -xzf \"\$HOME/${REMOTE_TARBALL}\" -C \"\$DIR\"" \
    "rm -f \"\$HOME/${REMOTE_TARBALL}\""
else
  rs_var URL "${REPO_URL}"
  rs_var REF "${REPO_REF}"
  rs 'echo "[worker $W] fetching $URL $REF into $DIR"' \
    'if [ ! -d "$DIR/.git" ]; then mkdir -p "$DIR"; git init -q "$DIR"; fi' \
    'git -C "$DIR" remote remove origin >/dev/null 2>&1 || true' \
    'git -C "$DIR" remote add origin "$URL"' \
    'git -C "$DIR" fetch -q origin "$REF"' \
    'git -C "$DIR" checkout -q --force FETCH_HEAD' \
    'echo "[worker $W] at commit $(git -C "$DIR" rev-parse HEAD)"'
fi
if [[ "${CODE_ONLY}" == 0 ]]; then
  rs_var VENV "${VENV}"
  rs_abs VENV
  rs_var PY "${PY}"
  rs_var JAX "${JAX_VERSION}"
  rs 'if ! "$PY" -c "import ensurepip, venv" >/dev/null 2>&1; then echo "[worker $W] installing ${PY##*/} with apt"; sudo DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 -qq update; sudo DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 -qq install -y "${PY##*/}" "${PY##*/}-venv"; fi' \
    'if [ ! -x "$VENV/bin/python" ]; then echo "[worker $W] creating $VENV"; "$PY" -m venv "$VENV"; fi' \
    'echo "[worker $W] pip install jax[tpu]==$JAX -r $DIR/requirements.txt"' \
    '"$VENV/bin/python" -m pip install -q --upgrade pip' \
    '"$VENV/bin/python" -m pip install -q "jax[tpu]==$JAX" -r "$DIR/requirements.txt"' \
    '"$VENV/bin/python" -c "import jax, sys; print(\"[worker $W] python\", sys.version.split()[0], \"jax\", jax.__version__)"'
fi
rs 'echo "[worker $W] setup done"'

tpu_ssh "$(remote_script)"
