#!/usr/bin/env bash
# shellcheck disable=SC2016,SC2034  # remote-shell strings; variables used by the scripts
# Shared helpers for the fo_rl Cloud TPU launchers. Sourced by the other
# scripts in this directory; running it directly does nothing.
#
# Defaults come from the environment; flags always win:
#   FO_RL_PROJECT          GCP project               (--project)
#   FO_RL_ZONE             zone, e.g. us-east5-a     (--zone)
#   FO_RL_TPU_NAME         TPU VM name               (--tpu)
#   FO_RL_ACCELERATOR      accelerator, e.g. v5p-64  (--accelerator)
#   FO_RL_RUNTIME_VERSION  TPU software version      (--version)
#   FO_RL_REMOTE_DIR       repo dir on the VM        (--remote-dir, default fo_rl)
#   FO_RL_VENV             virtualenv on the VM      (--venv, default fo_rl_venv)
#   FO_RL_LOG_ROOT         run logs on the VM        (--log-root, default fo_rl_logs)
# Relative remote paths are relative to $HOME on each worker.
#
# Flag syntax: --flag=value or --flag value; '_' and '-' are interchangeable in
# flag names (--repo_url == --repo-url).

set -euo pipefail

FO_RL_LAUNCHERS_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
FO_RL_REPO_ROOT="$(cd "${FO_RL_LAUNCHERS_DIR}/.." && pwd)"
SCRIPT_NAME="$(basename "$0")"

PROJECT="${FO_RL_PROJECT:-}"
ZONE="${FO_RL_ZONE:-}"
TPU="${FO_RL_TPU_NAME:-}"
REMOTE_DIR="${FO_RL_REMOTE_DIR:-fo_rl}"
VENV="${FO_RL_VENV:-fo_rl_venv}"
LOG_ROOT="${FO_RL_LOG_ROOT:-fo_rl_logs}"
DRY_RUN=0
GCLOUD_FLAGS=()   # extra flags for gcloud ssh/scp (--gcloud-flag, repeatable)
MISSING=()
FLAG_VALUE=""
FLAG_SHIFT=1
DESCRIBE_OUT=""

# ---------------------------------------------------------------- messages

log() { printf '%s: %s\n' "${SCRIPT_NAME}" "$*" >&2; }
warn() { printf '%s: warning: %s\n' "${SCRIPT_NAME}" "$*" >&2; }
die() {
  printf '%s: error: %s\n' "${SCRIPT_NAME}" "$*" >&2
  exit 1
}
usage_error() {
  printf '%s: error: %s (see %s --help)\n' "${SCRIPT_NAME}" "$*" "${SCRIPT_NAME}" >&2
  exit 2
}

# Prints the comment block at the top of the calling script (after the shebang).
usage() {
  awk 'NR == 1 || /^# shellcheck / { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "$0"
}

# ---------------------------------------------------------------- quoting

# shq ARG: ARG quoted for a POSIX shell (like Python's shlex.quote).
shq() {
  local s="$1" q="'\\''"
  if [[ -n "${s}" && "${s}" != *[!A-Za-z0-9_@%+=:,./-]* ]]; then
    printf '%s' "${s}"
  else
    printf "'%s'" "${s//\'/${q}}"
  fi
}

# shjoin ARGS...: all ARGS quoted and joined by spaces, one line.
shjoin() {
  local out="" a
  for a in "$@"; do
    out+="${out:+ }$(shq "${a}")"
  done
  printf '%s' "${out}"
}

# ---------------------------------------------------------------- running

# run CMD...: prints '+ CMD' (stdout in --dry-run, else stderr) and runs CMD
# unless --dry-run.
run() {
  if [[ "${DRY_RUN}" == 1 ]]; then
    printf '+ %s\n' "$(shjoin "$@")"
    return 0
  fi
  printf '+ %s\n' "$(shjoin "$@")" >&2
  "$@"
}

# describe ASSUME CMD...: runs a read-only gcloud describe.
#   returns 0 if the resource exists (its stdout is in DESCRIBE_OUT),
#   returns 1 if gcloud reports NOT_FOUND,
#   exits on any other error (auth, permissions, wrong project, ...).
# In --dry-run it only prints CMD and returns as if ASSUME (exists|absent).
describe() {
  local assume="$1" errfile rc=0
  shift
  DESCRIBE_OUT=""
  if [[ "${DRY_RUN}" == 1 ]]; then
    printf '+ %s\n' "$(shjoin "$@")"
    log "dry run: not checking; assuming the resource is ${assume/exists/there}"
    [[ "${assume}" == exists ]]
    return
  fi
  printf '+ %s\n' "$(shjoin "$@")" >&2
  errfile="$(mktemp "${TMPDIR:-/tmp}/fo_rl_gcloud.XXXXXX")"
  DESCRIBE_OUT="$("$@" 2>"${errfile}")" || rc=$?
  if [[ "${rc}" == 0 ]]; then
    rm -f "${errfile}"
    return 0
  fi
  if [[ "${rc}" != 127 ]] && grep -qiE 'NOT_FOUND|not found' "${errfile}"; then
    rm -f "${errfile}"
    return 1
  fi
  cat "${errfile}" >&2
  rm -f "${errfile}"
  die "'${*:1:6}' failed (exit ${rc}); see the gcloud error above"
}

# ---------------------------------------------------------------- flags

# flag_name ARG: the flag part of ARG ('--foo_bar=1' -> '--foo-bar').
flag_name() {
  local a="$1" name
  if [[ "${a}" != --?* ]]; then
    printf '%s' "${a}"
    return 0
  fi
  name="${a%%=*}"
  printf '%s' "${name//_/-}"
}

# take_value "$@": reads the value of the flag in $1 ('--f=v' or '--f v') into
# FLAG_VALUE and sets FLAG_SHIFT to the number of words consumed.
take_value() {
  local name
  name="$(flag_name "$1")"
  if [[ "$1" == *=* ]]; then
    FLAG_VALUE="${1#*=}"
    FLAG_SHIFT=1
  elif [[ $# -ge 2 && "$2" != --* ]]; then
    FLAG_VALUE="$2"
    FLAG_SHIFT=2
  else
    usage_error "flag ${name} needs a value (${name}=VALUE)"
  fi
}

# no_value ARG: boolean flags take no '=value'.
no_value() {
  if [[ "$1" == *=* ]]; then
    usage_error "flag $(flag_name "$1") takes no value"
  fi
  FLAG_SHIFT=1
}

# common_flag "$@": handles the flags every script takes. Returns 1 if $1 is
# not one of them.
common_flag() {
  FLAG_SHIFT=1
  case "$(flag_name "$1")" in
    --project) take_value "$@"; PROJECT="${FLAG_VALUE}" ;;
    --zone) take_value "$@"; ZONE="${FLAG_VALUE}" ;;
    --tpu | --tpu-name) take_value "$@"; TPU="${FLAG_VALUE}" ;;
    --dry-run) no_value "$1"; DRY_RUN=1 ;;
    -h | --help) usage; exit 0 ;;
    *) return 1 ;;
  esac
}

# ssh_flag "$@": flags of the scripts that ssh/scp into the workers.
ssh_flag() {
  FLAG_SHIFT=1
  case "$(flag_name "$1")" in
    --remote-dir) take_value "$@"; REMOTE_DIR="${FLAG_VALUE}" ;;
    --venv) take_value "$@"; VENV="${FLAG_VALUE}" ;;
    --log-root) take_value "$@"; LOG_ROOT="${FLAG_VALUE}" ;;
    --gcloud-flag) take_value "$@"; GCLOUD_FLAGS+=("${FLAG_VALUE}") ;;
    *) return 1 ;;
  esac
}

# require VALUE FLAG [ENVVAR]: records FLAG as missing if VALUE is empty.
require() {
  if [[ -z "$1" ]]; then
    MISSING+=("$2${3:+ (or set $3)}")
  fi
}

# check_required: exits with a usage error naming every missing flag.
check_required() {
  local msg="" m
  if [[ ${#MISSING[@]} -eq 0 ]]; then
    return 0
  fi
  for m in "${MISSING[@]}"; do
    msg+="${msg:+, }${m}"
  done
  usage_error "missing required flag ${msg}"
}

# require_location: --project, --zone, --tpu, checked and validated; and
# gcloud on PATH unless --dry-run.
require_location() {
  require "${PROJECT}" --project FO_RL_PROJECT
  require "${ZONE}" --zone FO_RL_ZONE
  require "${TPU}" --tpu FO_RL_TPU_NAME
  check_required
  if [[ "${DRY_RUN}" == 0 ]] && ! command -v gcloud >/dev/null 2>&1; then
    die "gcloud not found on PATH; install the Google Cloud CLI (https://cloud.google.com/sdk/docs/install)"
  fi
  local re='^[a-z]([-a-z0-9]*[a-z0-9])?$'
  if ! [[ "${TPU}" =~ ${re} ]]; then
    usage_error "--tpu '${TPU}' is not a valid TPU name (lowercase letters, digits, '-'; starts with a letter)"
  fi
}

# check_name VALUE FLAG: VALUE must be usable as a file name.
check_name() {
  local re='^[A-Za-z0-9][A-Za-z0-9._-]*$'
  if ! [[ "$1" =~ ${re} ]]; then
    usage_error "$2 '$1' must match [A-Za-z0-9][A-Za-z0-9._-]*"
  fi
}

# ---------------------------------------------------------------- gcloud

# Arguments every gcloud TPU command gets.
loc_args() {
  LOC=("--zone=${ZONE}" "--project=${PROJECT}")
}

# tpu_ssh SCRIPT: runs the one-line shell SCRIPT on every worker.
tpu_ssh() {
  loc_args
  run gcloud compute tpus tpu-vm ssh "${TPU}" "${LOC[@]}" --worker=all \
    ${GCLOUD_FLAGS[@]+"${GCLOUD_FLAGS[@]}"} "--command=$1"
}

# ---------------------------------------------------------------- remote shell
# Remote scripts are built as a list of statements and joined into one line,
# so --dry-run shows one line per gcloud command. They are plain POSIX sh.

REMOTE=()

# rs STATEMENT...: appends statements to the remote script.
rs() { REMOTE+=("$@"); }

# rs_var NAME VALUE: NAME=VALUE, VALUE quoted.
rs_var() { REMOTE+=("$1=$(shq "$2")"); }

# rs_abs NAME: makes $NAME absolute (relative to $HOME) on the worker.
rs_abs() { REMOTE+=("case \"\$$1\" in /*) ;; *) $1=\"\$HOME/\$$1\" ;; esac"); }

# rs_worker_id: W=<worker number> from the TPU metadata server, falling back
# to the '-w-N' suffix of the hostname.
rs_worker_id() {
  REMOTE+=('W=$(curl -sf -m 5 -H "Metadata-Flavor: Google" http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number 2>/dev/null || true)'
    'if [ -z "$W" ]; then W=$(hostname); W=${W##*-w-}; fi')
}

# remote_script: prints REMOTE joined into one line.
remote_script() {
  local out="" s
  for s in "${REMOTE[@]}"; do
    if [[ -z "${out}" ]]; then
      out="${s}"
    elif [[ "${out}" == *'&' ]]; then
      out+=" ${s}"
    else
      out+="; ${s}"
    fi
  done
  printf '%s' "${out}"
}
