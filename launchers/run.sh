#!/usr/bin/env bash
# shellcheck disable=SC2016  # $VARS in single quotes are for the remote shell
# Start a command on every worker of a TPU VM, detached (setsid + nohup), so it
# survives the ssh session. Multi-host JAX needs the same program running on all
# workers; this starts it on all of them at once (--worker=all).
#
# Each worker keeps, under --log-root/NAME on its own disk:
#   worker-N.log   stdout+stderr of the command (appended to on each start)
#   worker-N.pid   pid (= process group) of the command
#   command        the command line
# The command runs in --remote-dir with the virtualenv's bin/ first on PATH and
# PYTHONUNBUFFERED=1. Arguments after -- are passed as-is (each one quoted), so
# shell syntax (&&, >, $VAR, FOO=1 cmd) is not interpreted: use
# `-- env FOO=1 python ...` or `-- bash -c '...'` for that.
#
# Idempotent: a worker where NAME is still running says so and starts nothing.
#
# Usage:
#   launchers/run.sh --tpu=T --name=NAME -- python -m fo_rl.main --config=... --workdir=gs://...
#   launchers/run.sh --tpu=T --name=NAME --status
#   launchers/run.sh --tpu=T --name=NAME --stop
#
# Flags (env var default in brackets):
#   --project=P        GCP project [FO_RL_PROJECT]                     required
#   --zone=Z           zone [FO_RL_ZONE]                               required
#   --tpu=NAME         TPU VM name [FO_RL_TPU_NAME]                    required
#   --name=NAME        run name, used for the log dir                  required
#   --status           show on each worker whether NAME runs, and its log tail
#   --stop             stop NAME on each worker (SIGTERM to its process group,
#                      SIGKILL after --stop-timeout seconds, default 30)
#   --remote-dir=DIR   code dir on the workers [FO_RL_REMOTE_DIR, fo_rl]
#   --venv=DIR         virtualenv on the workers [FO_RL_VENV, fo_rl_venv]
#   --log-root=DIR     log root on the workers [FO_RL_LOG_ROOT, fo_rl_logs]
#   --gcloud-flag=F    extra flag for gcloud ssh, repeatable
#   --dry-run          print the gcloud command ('+ gcloud ...'), run nothing
#   -h, --help         this help
#   -- CMD ARGS...     the command to run (required unless --status/--stop)
# Relative remote paths are relative to $HOME on each worker.

set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

NAME=""
ACTION=start
STOP_TIMEOUT=30
CMD=()

while [[ $# -gt 0 ]]; do
  FLAG_SHIFT=1
  case "$(flag_name "$1")" in
    --name) take_value "$@"; NAME="${FLAG_VALUE}" ;;
    --status) no_value "$1"; ACTION=status ;;
    --stop) no_value "$1"; ACTION=stop ;;
    --stop-timeout) take_value "$@"; STOP_TIMEOUT="${FLAG_VALUE}" ;;
    --) shift; CMD=("$@"); break ;;
    *) common_flag "$@" || ssh_flag "$@" || usage_error "unknown argument: $1 (put the command after --)" ;;
  esac
  shift "${FLAG_SHIFT}"
done

require "${NAME}" --name
require_location
check_name "${NAME}" --name
if [[ "${ACTION}" == start && ${#CMD[@]} -eq 0 ]]; then
  usage_error "missing the command to run: put it after --, e.g. -- python -m fo_rl.main --config=..."
fi
if [[ "${ACTION}" != start && ${#CMD[@]} -gt 0 ]]; then
  usage_error "--${ACTION} takes no command"
fi
if ! [[ "${STOP_TIMEOUT}" =~ ^[0-9]+$ ]]; then
  usage_error "--stop-timeout must be a number of seconds"
fi

rs 'set -eu'
rs_var LOGDIR "${LOG_ROOT}/${NAME}"
rs_abs LOGDIR
rs_worker_id
rs 'LOG="$LOGDIR/worker-$W.log"' 'PIDF="$LOGDIR/worker-$W.pid"'
rs 'P=""' 'if [ -f "$PIDF" ]; then P=$(cat "$PIDF"); fi'
# running: $P is alive and not a zombie.
rs 'running() { [ -n "$P" ] && kill -0 "$P" 2>/dev/null && case "$(ps -o stat= -p "$P" 2>/dev/null)" in Z*) false ;; *) true ;; esac; }'

case "${ACTION}" in
  start)
    CMD_LINE="$(shjoin "${CMD[@]}")"
    rs_var DIR "${REMOTE_DIR}"
    rs_abs DIR
    rs_var VENV "${VENV}"
    rs_abs VENV
    rs_var ROOT "${LOG_ROOT}"
    rs_abs ROOT
    rs "if running; then echo \"[worker \$W] $(shq "${NAME}") is already running (pid \$P); not starting another\"; exit 0; fi" \
      'if [ ! -x "$VENV/bin/python" ]; then echo "[worker $W] error: no virtualenv at $VENV; run launchers/setup.sh first" >&2; exit 1; fi' \
      'for f in "$ROOT"/*/"worker-$W.pid"; do if [ "$f" != "$PIDF" ] && [ -f "$f" ] && kill -0 "$(cat "$f")" 2>/dev/null; then echo "[worker $W] warning: another run is still active ($f); the TPU may be busy (run.sh --status/--stop)" >&2; fi; done' \
      'mkdir -p "$LOGDIR"' \
      'cd "$DIR"' \
      'export VIRTUAL_ENV="$VENV" PATH="$VENV/bin:$PATH" PYTHONUNBUFFERED=1'
    rs "set -- ${CMD_LINE}" \
      'printf "%s\n" "$*" > "$LOGDIR/command"' \
      'echo "=== $(date -u +%Y-%m-%dT%H:%M:%SZ) worker $W starts: $*" >> "$LOG"' \
      'setsid nohup sh -c '"'"'echo $$ > "$0"; exec "$@"'"'"' "$PIDF" "$@" >> "$LOG" 2>&1 < /dev/null &' \
      'echo "[worker $W] started, log: $LOG"'
    ;;
  status)
    rs 'if running; then echo "[worker $W] running (pid $P)"; else echo "[worker $W] not running"; fi' \
      'if [ -f "$LOG" ]; then tail -n 5 "$LOG"; fi'
    ;;
  stop)
    rs "if ! running; then echo \"[worker \$W] $(shq "${NAME}") is not running\"; exit 0; fi" \
      'kill -TERM -- "-$P" 2>/dev/null || kill -TERM "$P"' \
      "i=0; while running && [ \$i -lt ${STOP_TIMEOUT} ]; do sleep 1; i=\$((i + 1)); done" \
      'if running; then kill -KILL -- "-$P" 2>/dev/null || kill -KILL "$P"; echo "[worker $W] killed (SIGKILL) pid $P"; else echo "[worker $W] stopped pid $P"; fi'
    ;;
esac

tpu_ssh "$(remote_script)"
