#!/usr/bin/env bash
# Delete a Cloud TPU VM (and its queued resource, if it was made with
# create.sh --queued). Idempotent: if nothing exists, says so and exits 0.
#
# Usage:
#   launchers/delete.sh --tpu=NAME [--yes]
#
# Flags (env var default in brackets):
#   --project=P      GCP project [FO_RL_PROJECT]                       required
#   --zone=Z         zone [FO_RL_ZONE]                                 required
#   --tpu=NAME       TPU VM name [FO_RL_TPU_NAME]                      required
#   --qr-id=ID       queued resource id (default: the TPU name)
#   -y, --yes        do not ask for confirmation (-q, --quiet: same). Without
#                    it, asks on a terminal and refuses when stdin is not one.
#   --queued         only changes the --dry-run output (assume the TPU was made
#                    with --queued); a real run always looks for the queued
#                    resource first and deletes it with --force (which deletes
#                    its TPU VM too)
#   --dry-run        print the gcloud commands ('+ gcloud ...'), run nothing;
#                    existence checks are printed and assumed to find the TPU
#   -h, --help       this help
#
# Exit status: 0 deleted or nothing to delete; 1 error or not confirmed;
# 2 bad usage.

set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

YES=0
QUEUED=0
QR_ID=""

while [[ $# -gt 0 ]]; do
  FLAG_SHIFT=1
  case "$(flag_name "$1")" in
    -y | --yes | -q | --quiet) no_value "$1"; YES=1 ;;
    --queued) no_value "$1"; QUEUED=1 ;;
    --qr-id) take_value "$@"; QR_ID="${FLAG_VALUE}" ;;
    *) common_flag "$@" || usage_error "unknown argument: $1" ;;
  esac
  shift "${FLAG_SHIFT}"
done

require_location
QR_ID="${QR_ID:-${TPU}}"
loc_args

# confirm WHAT: asks unless --yes or --dry-run.
confirm() {
  if [[ "${YES}" == 1 || "${DRY_RUN}" == 1 ]]; then
    return 0
  fi
  if [[ ! -t 0 ]]; then
    die "refusing to delete $1 without confirmation: stdin is not a terminal; pass --yes"
  fi
  local answer=""
  read -r -p "Delete $1 (project ${PROJECT}, zone ${ZONE})? [y/N] " answer || true
  case "${answer}" in
    y | Y | yes | YES) return 0 ;;
    *) die "not confirmed; nothing deleted" ;;
  esac
}

if [[ "${QUEUED}" == 1 ]]; then qr_assume=exists; else qr_assume=absent; fi

if describe "${qr_assume}" gcloud compute tpus queued-resources describe "${QR_ID}" "${LOC[@]}" --format='value(state.state)'; then
  confirm "queued resource ${QR_ID} and its TPU VM"
  run gcloud compute tpus queued-resources delete "${QR_ID}" "${LOC[@]}" --force --quiet
  if [[ "${DRY_RUN}" == 0 ]]; then log "deleted queued resource ${QR_ID}"; fi
  exit 0
fi

if describe exists gcloud compute tpus tpu-vm describe "${TPU}" "${LOC[@]}" --format='value(state)'; then
  confirm "TPU VM ${TPU}"
  run gcloud compute tpus tpu-vm delete "${TPU}" "${LOC[@]}" --quiet
  if [[ "${DRY_RUN}" == 0 ]]; then log "deleted TPU VM ${TPU}"; fi
  exit 0
fi

log "TPU VM ${TPU} does not exist (no queued resource ${QR_ID} either); nothing to delete"
