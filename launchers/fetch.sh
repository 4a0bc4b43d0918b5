#!/usr/bin/env bash
# Copy run logs (and other files) from each worker of a TPU VM to this machine,
# one `gcloud compute tpus tpu-vm scp --recurse --worker=N` per worker, into
#   DEST/worker-N/<basename of each remote path>
# Re-running refreshes the copies. Results written to gs:// (the usual
# --workdir) are not on the workers: copy those with `gcloud storage cp`.
#
# Usage:
#   launchers/fetch.sh --tpu=T [--name=RUN] [--dest=DIR] [--path=REMOTE_PATH ...]
#
# Flags (env var default in brackets):
#   --project=P        GCP project [FO_RL_PROJECT]                     required
#   --zone=Z           zone [FO_RL_ZONE]                               required
#   --tpu=NAME         TPU VM name [FO_RL_TPU_NAME]                    required
#   --name=RUN         fetch the logs of this run (--log-root/RUN); default:
#                      the whole --log-root (all runs)
#   --path=P           also fetch remote path P (file or dir, relative to
#                      $HOME), repeatable, e.g. --path=fo_rl/workdirs/run1
#   --no-logs          fetch only the --path paths
#   --dest=DIR         local destination (default: <repo>/workdirs/tpu_logs/<tpu>)
#   --workers=N        number of workers; default: asks gcloud (tpu-vm describe)
#   --worker=K         fetch from worker K only
#   --log-root=DIR     log root on the workers [FO_RL_LOG_ROOT, fo_rl_logs]
#   --gcloud-flag=F    extra flag for gcloud scp, repeatable
#   --dry-run          print the gcloud commands ('+ gcloud ...'), run nothing
#   -h, --help         this help
#
# Exit status: 0 all copies succeeded; 1 some failed (the others are kept);
# 2 bad usage.

set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

NAME=""
DEST=""
WORKERS=""
ONLY_WORKER=""
NO_LOGS=0
PATHS=()

while [[ $# -gt 0 ]]; do
  FLAG_SHIFT=1
  case "$(flag_name "$1")" in
    --name) take_value "$@"; NAME="${FLAG_VALUE}" ;;
    --path) take_value "$@"; PATHS+=("${FLAG_VALUE}") ;;
    --no-logs) no_value "$1"; NO_LOGS=1 ;;
    --dest) take_value "$@"; DEST="${FLAG_VALUE}" ;;
    --workers) take_value "$@"; WORKERS="${FLAG_VALUE}" ;;
    --worker) take_value "$@"; ONLY_WORKER="${FLAG_VALUE}" ;;
    *) common_flag "$@" || ssh_flag "$@" || usage_error "unknown argument: $1" ;;
  esac
  shift "${FLAG_SHIFT}"
done

require_location
if [[ -n "${NAME}" ]]; then check_name "${NAME}" --name; fi
if [[ -n "${WORKERS}" ]] && ! [[ "${WORKERS}" =~ ^[1-9][0-9]*$ ]]; then
  usage_error "--workers must be a positive number"
fi
if [[ -n "${ONLY_WORKER}" ]] && ! [[ "${ONLY_WORKER}" =~ ^[0-9]+$ ]]; then
  usage_error "--worker must be a worker number (0, 1, ...)"
fi
if [[ "${NO_LOGS}" == 0 ]]; then
  if [[ -n "${NAME}" ]]; then PATHS=("${LOG_ROOT}/${NAME}" ${PATHS[@]+"${PATHS[@]}"}); else PATHS=("${LOG_ROOT}" ${PATHS[@]+"${PATHS[@]}"}); fi
fi
if [[ ${#PATHS[@]} -eq 0 ]]; then
  usage_error "nothing to fetch: --no-logs without --path"
fi
DEST="${DEST:-${FO_RL_REPO_ROOT}/workdirs/tpu_logs/${TPU}}"
loc_args

# Which workers?
if [[ -n "${ONLY_WORKER}" ]]; then
  WORKER_IDS=("${ONLY_WORKER}")
else
  if [[ -z "${WORKERS}" ]]; then
    if describe exists gcloud compute tpus tpu-vm describe "${TPU}" "${LOC[@]}" \
      --format='value(networkEndpoints[].ipAddress)'; then
      if [[ "${DRY_RUN}" == 1 ]]; then
        WORKERS=1
        log "dry run: the worker count comes from that describe; showing worker 0 only (pass --workers=N to see all)"
      else
        WORKERS=$(($(printf '%s\n' "${DESCRIBE_OUT}" | sed 's/[;,]/ /g' | wc -w)))
      fi
    else
      die "TPU VM ${TPU} does not exist (project ${PROJECT}, zone ${ZONE})"
    fi
    if [[ "${WORKERS}" -lt 1 ]]; then
      die "could not count the workers of ${TPU}; pass --workers=N"
    fi
  fi
  WORKER_IDS=()
  for ((k = 0; k < WORKERS; k++)); do WORKER_IDS+=("${k}"); done
fi

FAILED=()
for k in "${WORKER_IDS[@]}"; do
  dir="${DEST}/worker-${k}"
  if [[ "${DRY_RUN}" == 0 ]]; then mkdir -p "${dir}"; fi
  srcs=()
  for p in "${PATHS[@]}"; do srcs+=("${TPU}:${p}"); done
  if ! run gcloud compute tpus tpu-vm scp --recurse "${srcs[@]}" "${dir}/" "${LOC[@]}" \
    "--worker=${k}" ${GCLOUD_FLAGS[@]+"${GCLOUD_FLAGS[@]}"}; then
    FAILED+=("${k}")
    warn "copy from worker ${k} failed; going on with the others"
  fi
done

if [[ ${#FAILED[@]} -gt 0 ]]; then
  die "copies from worker(s) ${FAILED[*]} failed; the rest is in ${DEST}"
fi
if [[ "${DRY_RUN}" == 0 ]]; then log "fetched into ${DEST}"; fi
