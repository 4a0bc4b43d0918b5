#!/usr/bin/env bash
# Create a Cloud TPU VM for fo_rl. Idempotent: if the TPU VM (or, with
# --queued, its queued resource) already exists, says so and exits 0.
#
# Usage:
#   launchers/create.sh --tpu=NAME --accelerator=v5p-64 [--spot | --reserved]
#                       [--queued] [--version=RUNTIME] [-- EXTRA_GCLOUD_FLAGS...]
#
# Flags (env var default in brackets):
#   --project=P          GCP project [FO_RL_PROJECT]                  required
#   --zone=Z             zone, e.g. us-east5-a [FO_RL_ZONE]            required
#   --tpu=NAME           TPU VM name [FO_RL_TPU_NAME]                  required
#   --accelerator=TYPE   e.g. v5p-64, v6e-16 [FO_RL_ACCELERATOR]       required
#                        (--accelerator-type is an alias)
#   --version=RUNTIME    TPU software version [FO_RL_RUNTIME_VERSION];
#                        default from the accelerator: v6e -> v2-alpha-tpuv6e,
#                        v5p -> v2-alpha-tpuv5, v5litepod/v5e -> v2-alpha-tpuv5-lite,
#                        v4/v3/v2 -> tpu-ubuntu2204-base (--runtime-version: alias)
#   --spot               Spot capacity (cheap, can be preempted at any time)
#   --reserved           capacity from your reservation
#                        (neither: on-demand)
#   --queued             request through a queued resource
#                        (gcloud compute tpus queued-resources create); returns
#                        once the request is queued, not when the TPU is READY
#   --qr-id=ID           queued resource id (default: the TPU name)
#   --dry-run            print the gcloud commands ('+ gcloud ...'), run nothing;
#                        existence checks are printed and assumed to say "absent"
#   -h, --help           this help
#   -- FLAGS...          passed through to the gcloud create command, e.g.
#                        -- --network=my-net --subnetwork=my-subnet --internal-ips
#
# Exit status: 0 created or already there; 1 error (also: it exists but is
# PREEMPTED/TERMINATED/STOPPED/being deleted, or the queued resource FAILED);
# 2 bad usage.

set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

ACCELERATOR="${FO_RL_ACCELERATOR:-}"
VERSION="${FO_RL_RUNTIME_VERSION:-}"
SPOT=0
RESERVED=0
QUEUED=0
QR_ID=""
EXTRA=()

while [[ $# -gt 0 ]]; do
  FLAG_SHIFT=1
  case "$(flag_name "$1")" in
    --accelerator | --accelerator-type) take_value "$@"; ACCELERATOR="${FLAG_VALUE}" ;;
    --version | --runtime-version) take_value "$@"; VERSION="${FLAG_VALUE}" ;;
    --spot) no_value "$1"; SPOT=1 ;;
    --reserved) no_value "$1"; RESERVED=1 ;;
    --queued) no_value "$1"; QUEUED=1 ;;
    --qr-id) take_value "$@"; QR_ID="${FLAG_VALUE}" ;;
    --) shift; EXTRA=("$@"); break ;;
    *) common_flag "$@" || usage_error "unknown argument: $1" ;;
  esac
  shift "${FLAG_SHIFT}"
done

require "${ACCELERATOR}" --accelerator FO_RL_ACCELERATOR
require_location
if [[ "${SPOT}" == 1 && "${RESERVED}" == 1 ]]; then
  usage_error "--spot and --reserved are mutually exclusive"
fi
if [[ -z "${VERSION}" ]]; then
  case "${ACCELERATOR}" in
    v6e-*) VERSION=v2-alpha-tpuv6e ;;
    v5p-*) VERSION=v2-alpha-tpuv5 ;;
    v5litepod-* | v5e-*) VERSION=v2-alpha-tpuv5-lite ;;
    v4-* | v3-* | v2-*) VERSION=tpu-ubuntu2204-base ;;
    *) usage_error "no default runtime for --accelerator=${ACCELERATOR}; pass --version (or set FO_RL_RUNTIME_VERSION)" ;;
  esac
fi
QR_ID="${QR_ID:-${TPU}}"

CAPACITY=()
if [[ "${SPOT}" == 1 ]]; then CAPACITY=(--spot); fi
if [[ "${RESERVED}" == 1 ]]; then CAPACITY=(--reserved); fi
loc_args

# 1. Does the TPU VM already exist?
if describe absent gcloud compute tpus tpu-vm describe "${TPU}" "${LOC[@]}" --format='value(state)'; then
  state="${DESCRIBE_OUT//[[:space:]]/}"
  case "${state}" in
    PREEMPTED | TERMINATED | STOPPED | STOPPING | DELETING)
      die "TPU VM ${TPU} exists but is ${state}; delete it (launchers/delete.sh) and run create.sh again" ;;
  esac
  log "TPU VM ${TPU} already exists (state: ${state:-unknown}); nothing to do"
  exit 0
fi

if [[ "${QUEUED}" == 1 ]]; then
  # 2. Is the request already queued?
  if describe absent gcloud compute tpus queued-resources describe "${QR_ID}" "${LOC[@]}" --format='value(state.state)'; then
    state="${DESCRIBE_OUT//[[:space:]]/}"
    case "${state}" in
      FAILED | SUSPENDED | SUSPENDING | DELETING)
        die "queued resource ${QR_ID} exists but is ${state}; delete it (launchers/delete.sh) and run create.sh --queued again" ;;
    esac
    log "queued resource ${QR_ID} already exists (state: ${state:-unknown}); nothing to do"
    exit 0
  fi
  run gcloud compute tpus queued-resources create "${QR_ID}" "${LOC[@]}" \
    "--node-id=${TPU}" "--accelerator-type=${ACCELERATOR}" "--runtime-version=${VERSION}" \
    ${CAPACITY[@]+"${CAPACITY[@]}"} ${EXTRA[@]+"${EXTRA[@]}"}
  if [[ "${DRY_RUN}" == 0 ]]; then
    log "queued resource ${QR_ID} requested; the TPU VM ${TPU} is usable once its state is ACTIVE:"
    log "  gcloud compute tpus queued-resources describe ${QR_ID} --zone=${ZONE} --project=${PROJECT} --format='value(state.state)'"
  fi
else
  run gcloud compute tpus tpu-vm create "${TPU}" "${LOC[@]}" \
    "--accelerator-type=${ACCELERATOR}" "--version=${VERSION}" \
    ${CAPACITY[@]+"${CAPACITY[@]}"} ${EXTRA[@]+"${EXTRA[@]}"}
fi
