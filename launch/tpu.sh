#!/usr/bin/env bash
# Cloud TPU VM launcher for eao_jax: create | setup | train | eval | extract | logs | stop | ssh | status | delete.
#
#   launch/tpu.sh [options] SUBCOMMAND [-- extra args for python / the remote command]
#
# Settings come from environment variables; the options below override them. With DRY_RUN=1
# (or --dry_run) every command is printed (one per line, prefixed "+ ", shell-quoted) instead of
# run, and gcloud is not needed. See launch/README.md for the full list and examples.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(cd "$SCRIPT_DIR/.." && pwd)"

usage() {
  cat <<'EOF'
Usage: launch/tpu.sh [options] SUBCOMMAND [-- EXTRA...]

Subcommands:
  create   create the TPU VM (gcloud compute tpus tpu-vm create), or a queued resource when QUEUED=1
  setup    copy this checkout (or git clone REPO_URL) to every worker and pip install it with its [tpu] extra
  train    run python -m eao_jax.main on every worker (detached, log in ~/eao_logs/train.log)
  eval     run python -m eao_jax.evaluate on every worker (foreground)
  extract  run python -m eao_jax.extract on every worker (detached, log in ~/eao_logs/extract.log)
  logs     stream a job's log from one worker: logs [train|eval|extract]
  stop     stop a detached job on every worker: stop [train|eval|extract]
  ssh      run EXTRA as a shell command on WORKER (default: all)
  status   describe the TPU VM / queued resource
  delete   delete the TPU VM (or the queued resource and its node)

Options (each overrides the environment variable in brackets):
  --dry_run                print the commands instead of running them     [DRY_RUN=1]
  --name=NAME              TPU VM name                                      [TPU_NAME]
  --zone=ZONE              e.g. us-central2-b                               [ZONE]
  --project=PROJECT        GCP project (default: gcloud's configured one)   [PROJECT]
  --accelerator_type=TYPE  e.g. v4-32, v5litepod-16 (create)                [ACCELERATOR_TYPE]
  --runtime_version=VER    e.g. tpu-ubuntu2204-base (create)                [RUNTIME_VERSION]
  --config=PATH[:ARG]      config file relative to the repo (train)         [CONFIG]
  --workdir=DIR            checkpoints and logs, gs://... (train)           [WORKDIR]
  --data_dir=DIR           TFDS data_dir, sets --config.data.data_dir (train) [DATA_DIR]
  --task=TASK              evaluation task (eval)                           [EVAL_TASK]
  --checkpoint=DIR         checkpoint to evaluate (eval)                    [CHECKPOINT]
  --output=FILE            results JSON (eval, optional)                    [EVAL_OUTPUT]
  --videos=DIR|LIST        videos to extract, gs://... (extract)            [VIDEOS]
  --features_dir=DIR       extraction output, gs://... (extract)            [FEATURES_DIR]
  --worker=W               worker(s) for ssh/logs: all, 0, 1, ...           [WORKER]
Everything after "--" is appended to the python command (train/eval/extract) or is the command (ssh).
More variables: QUEUED, QUEUED_RESOURCE_ID, SPOT, RESERVED, CREATE_ARGS, SETUP_METHOD, REPO_URL,
REPO_REF, REMOTE_DIR, VENV_DIR, JAX_VERSION, PIP_ARGS, REMOTE_ENV, DETACH, FOLLOW, SSH_ARGS, GCLOUD.
EOF
}

die() {
  echo "tpu.sh: error: $*" >&2
  exit 1
}

note() {
  echo "tpu.sh: $*" >&2
}

set_detach() {  # set_detach DEFAULT: the caller's `detach` (1: start in the background), DETACH=1/0 overrides
  detach=$1
  if [[ -n "${DETACH:-}" ]]; then truthy DETACH && detach=1 || detach=0; fi
}

truthy() {  # truthy VAR_NAME: 1/true/yes/on -> 0; 0/false/no/off/"" -> 1; anything else dies.
  local value
  value="$(printf '%s' "${!1:-}" | tr '[:upper:]' '[:lower:]')"
  case "$value" in
    1 | true | yes | on) return 0 ;;
    "" | 0 | false | no | off) return 1 ;;
    *) die "$1=${!1} must be 1 or 0" ;;
  esac
}

# ---------------------------------------------------------------------------------------------
# Settings: environment first, then options.

SUBCOMMAND=""
EXTRA=()
LOG_JOB=""
while (($#)); do
  case "$1" in
    --dry_run | --dry-run) DRY_RUN=1 ;;
    --name=*) TPU_NAME="${1#*=}" ;;
    --zone=*) ZONE="${1#*=}" ;;
    --project=*) PROJECT="${1#*=}" ;;
    --accelerator_type=*) ACCELERATOR_TYPE="${1#*=}" ;;
    --runtime_version=*) RUNTIME_VERSION="${1#*=}" ;;
    --config=*) CONFIG="${1#*=}" ;;
    --workdir=*) WORKDIR="${1#*=}" ;;
    --data_dir=*) DATA_DIR="${1#*=}" ;;
    --task=*) EVAL_TASK="${1#*=}" ;;
    --checkpoint=*) CHECKPOINT="${1#*=}" ;;
    --output=*) EVAL_OUTPUT="${1#*=}" ;;
    --videos=*) VIDEOS="${1#*=}" ;;
    --features_dir=*) FEATURES_DIR="${1#*=}" ;;
    --worker=*) WORKER="${1#*=}" ;;
    -h | --help | help)
      usage
      exit 0
      ;;
    --)
      shift
      EXTRA=("$@")
      break
      ;;
    -*) die "unknown option '$1' (see launch/tpu.sh --help)" ;;
    *)
      if [[ -z "$SUBCOMMAND" ]]; then
        SUBCOMMAND="$1"
      elif [[ -z "$LOG_JOB" && "$SUBCOMMAND" =~ ^(logs|stop)$ ]]; then
        LOG_JOB="$1"
      else
        die "unexpected argument '$1' (put arguments for python after --)"
      fi
      ;;
  esac
  shift
done

DRY_RUN="${DRY_RUN:-0}"
GCLOUD="${GCLOUD:-gcloud}"
PROJECT="${PROJECT:-}"
QUEUED="${QUEUED:-0}"
SPOT="${SPOT:-0}"
RESERVED="${RESERVED:-0}"
SETUP_METHOD="${SETUP_METHOD:-copy}"
REMOTE_DIR="${REMOTE_DIR:-eao_jax}"
VENV_DIR="${VENV_DIR:-eao_venv}"
LOG_DIR="eao_logs"
JAX_VERSION="${JAX_VERSION:-}"
WORKER="${WORKER:-}"

[[ -n "$SUBCOMMAND" ]] || {
  usage >&2
  die "no subcommand given"
}
truthy DRY_RUN && DRY=1 || DRY=0

# The option that can set a variable instead of the environment (none for some).
option_of() {
  case "$1" in
    TPU_NAME) echo --name ;;
    ZONE) echo --zone ;;
    ACCELERATOR_TYPE) echo --accelerator_type ;;
    RUNTIME_VERSION) echo --runtime_version ;;
    CONFIG) echo --config ;;
    WORKDIR) echo --workdir ;;
    EVAL_TASK) echo --task ;;
    CHECKPOINT) echo --checkpoint ;;
    *) echo "" ;;
  esac
}

require() {
  local name option
  for name in "$@"; do
    if [[ -z "${!name:-}" ]]; then
      option="$(option_of "$name")"
      die "$name is not set: export $name=...${option:+ or pass $option=...} (needed by '$SUBCOMMAND')"
    fi
  done
}

check_name() {  # check_name VAR: GCP resource names are lower-case letters, digits and hyphens.
  [[ "${!1}" =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] || die "$1='${!1}' must be lower-case letters, digits and hyphens, starting with a letter"
}

check_relative() {  # check_relative VAR: a plain relative path on the workers (we rm -rf it).
  [[ "${!1}" =~ ^[A-Za-z0-9_][A-Za-z0-9_.-]*$ ]] || die "$1='${!1}' must be a plain directory name relative to the worker's home"
}

# WORD quoted for a POSIX shell only when it needs it (like Python's shlex.quote).
shq() {
  local squote="'"
  if [[ "$1" =~ ^[-A-Za-z0-9_@%+=:,./]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//$squote/$squote\\$squote$squote}"
  fi
}

# Print (dry run: "+ cmd args...", shell-quoted) or run one command.
run() {
  if ((DRY)); then
    local arg line="+"
    for arg in "$@"; do
      line+=" $(shq "$arg")"
    done
    printf '%s\n' "$line"
  else
    "$@"
  fi
}

need_gcloud() {
  ((DRY)) && return 0
  command -v "$GCLOUD" >/dev/null 2>&1 || die "gcloud not found ('$GCLOUD'): install the Google Cloud SDK (https://cloud.google.com/sdk/docs/install), or use DRY_RUN=1 to only print the commands"
}

location_args() {
  LOCATION=(--zone="$ZONE")
  [[ -z "$PROJECT" ]] || LOCATION+=(--project="$PROJECT")
}

# Remote command on the workers, through gcloud ssh (every worker runs the same command).
remote() {  # remote WORKER COMMAND_STRING
  [[ "$1" =~ ^(all|[0-9]+(,[0-9]+)*)$ ]] || die "WORKER='$1' must be all, a worker number or a comma-separated list (0,1)"
  local ssh_extra=()
  [[ -z "${SSH_ARGS:-}" ]] || read -r -a ssh_extra <<<"$SSH_ARGS"
  run "$GCLOUD" compute tpus tpu-vm ssh "$TPU_NAME" "${LOCATION[@]}" --worker="$1" ${ssh_extra[@]+"${ssh_extra[@]}"} --command="$2"
}

quote_all() {  # quote_all ARGS...: one shell-quoted string
  local out="" arg
  for arg in "$@"; do
    out+="$(shq "$arg") "
  done
  printf '%s' "${out% }"
}

# The python command run on each worker, with REMOTE_ENV="K=V K2=V2" in front of it.
python_command() {  # python_command MODULE ARGS...
  local env_words=()
  [[ -z "${REMOTE_ENV:-}" ]] || read -r -a env_words <<<"$REMOTE_ENV"
  local prefix=""
  ((${#env_words[@]} == 0)) || prefix="env $(quote_all ${env_words[@]+"${env_words[@]}"}) "
  printf '%s' "${prefix}../$(shq "$VENV_DIR")/bin/python -m $(quote_all "$@")"
}

# Wrap a python command so it runs from REMOTE_DIR, logging to ~/eao_logs/JOB.log; detached or not.
job_command() {  # job_command JOB DETACH PYTHON_COMMAND
  local job="$1" detach="$2" cmd="$3" dir log pid
  dir="$(shq "$REMOTE_DIR")"
  log="../$LOG_DIR/$job.log"
  pid="../$LOG_DIR/$job.pid"
  if ((detach)); then
    # shellcheck disable=SC2016  # $! and $(hostname) must expand on the worker.
    # setsid: its own process group, so "stop" can end it and its data workers together.
    printf 'mkdir -p %s && cd %s && { nohup setsid %s > %s 2>&1 < /dev/null & echo $! > %s; } && echo "started %s on $(hostname), log: ~/%s/%s.log"' \
      "$LOG_DIR" "$dir" "$cmd" "$log" "$pid" "$job" "$LOG_DIR" "$job"
  else
    printf 'set -o pipefail; mkdir -p %s && cd %s && %s 2>&1 | tee %s' "$LOG_DIR" "$dir" "$cmd" "$log"
  fi
}

# ---------------------------------------------------------------------------------------------
# Subcommands

cmd_create() {
  require TPU_NAME ZONE ACCELERATOR_TYPE RUNTIME_VERSION
  check_name TPU_NAME
  need_gcloud
  location_args
  local extra=()
  [[ -z "${CREATE_ARGS:-}" ]] || read -r -a extra <<<"$CREATE_ARGS"
  truthy SPOT && extra+=(--spot)
  truthy RESERVED && extra+=(--reserved)
  if truthy QUEUED; then
    local qr="${QUEUED_RESOURCE_ID:-$TPU_NAME-qr}"
    run "$GCLOUD" compute tpus queued-resources create "$qr" --node-id="$TPU_NAME" "${LOCATION[@]}" \
      --accelerator-type="$ACCELERATOR_TYPE" --runtime-version="$RUNTIME_VERSION" ${extra[@]+"${extra[@]}"}
    note "queued; watch with: $GCLOUD compute tpus queued-resources describe $qr --zone=$ZONE (state ACTIVE = ready)"
  else
    run "$GCLOUD" compute tpus tpu-vm create "$TPU_NAME" "${LOCATION[@]}" \
      --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION" ${extra[@]+"${extra[@]}"}
  fi
}

cmd_setup() {
  require TPU_NAME ZONE
  check_relative REMOTE_DIR
  check_relative VENV_DIR
  need_gcloud
  location_args
  local dir venv fetch install
  dir="$(shq "$REMOTE_DIR")"
  venv="$(shq "$VENV_DIR")"
  case "$SETUP_METHOD" in
    copy)
      # Ship the working tree as it is (uncommitted changes included), without VCS, caches, venvs,
      # local workdirs and the test fixtures.
      local tarball="${TMPDIR:-/tmp}/eao_jax-$TPU_NAME.tar.gz"
      run tar -czf "$tarball" --exclude=.git --exclude=venv '--exclude=.venv*' --exclude=__pycache__ \
        --exclude='*.egg-info' --exclude=.pytest_cache --exclude=.ruff_cache --exclude=./build \
        --exclude='./workdir*' --exclude=./tests/data -C "$REPO_ROOT" .
      run "$GCLOUD" compute tpus tpu-vm scp "$tarball" "$TPU_NAME:eao_jax.tar.gz" "${LOCATION[@]}" --worker=all
      fetch="rm -rf $dir && mkdir -p $dir && tar -xzf eao_jax.tar.gz -C $dir && rm eao_jax.tar.gz"
      ;;
    git)
      require REPO_URL
      local url ref
      url="$(shq "$REPO_URL")"
      ref="$(shq "${REPO_REF:-main}")"
      fetch="{ [ -d $dir/.git ] || git clone $url $dir; } && git -C $dir fetch --quiet origin && git -C $dir checkout --quiet $ref && { git -C $dir pull --quiet --ff-only || true; }"
      ;;
    *) die "SETUP_METHOD='$SETUP_METHOD' must be copy or git" ;;
  esac
  local pip_extra=""
  [[ -z "${PIP_ARGS:-}" ]] || pip_extra=" $PIP_ARGS"
  local jax_pin=""
  [[ -z "$JAX_VERSION" ]] || jax_pin=" $(shq "jax[tpu]==$JAX_VERSION")"
  # jax 0.10+ needs Python >= 3.11 and tpu-ubuntu2204-base ships 3.10 (without the venv module): take
  # the newest python3.1x the worker has, else Ubuntu's python3.11; add its venv module when missing.
  install="{ py=; for p in python3.14 python3.13 python3.12 python3.11; do if command -v \$p >/dev/null; then py=\$p; break; fi; done; }"
  install+=" && { [ -n \"\$py\" ] || { sudo apt-get update -qq && sudo apt-get install -y -qq python3.11 && py=python3.11; }; }"
  install+=" && { \$py -m venv $venv || { sudo apt-get update -qq && sudo apt-get install -y -qq \$py-venv && \$py -m venv $venv; }; }"
  install+=" && $venv/bin/pip install -q -U pip"
  # The [tpu] extra picks jax for the worker's Python (0.10 on 3.11, 0.12 on 3.12+); JAX_VERSION pins it.
  install+=" && $venv/bin/pip install -q -e $(shq "./${REMOTE_DIR}[tpu,gcs]")$jax_pin$pip_extra"
  # Import check only: touching TPU devices here would need every host of the slice at once.
  install+=" && $venv/bin/python -c 'import jax, eao_jax; print(\"jax\", jax.__version__)'"
  remote all "set -e; $fetch && $install && mkdir -p $LOG_DIR"
}

cmd_train() {
  require TPU_NAME ZONE CONFIG WORKDIR
  check_relative REMOTE_DIR
  check_relative VENV_DIR
  local config_file="${CONFIG%%:*}"
  if [[ "$config_file" != /* && ! -f "$REPO_ROOT/$config_file" ]]; then
    die "CONFIG=$CONFIG: $config_file is not a file in this repository ($REPO_ROOT)"
  fi
  [[ "$WORKDIR" == gs://* ]] || note "warning: WORKDIR=$WORKDIR is not gs://; on a multi-host TPU every worker must see the same workdir"
  need_gcloud
  location_args
  local args=(eao_jax.main --config="$CONFIG" --workdir="$WORKDIR")
  [[ -z "${DATA_DIR:-}" ]] || args+=(--config.data.data_dir="$DATA_DIR")
  args+=(${EXTRA[@]+"${EXTRA[@]}"})
  local detach
  set_detach 1
  remote all "$(job_command train "$detach" "$(python_command "${args[@]}")")"
  ((detach)) && note "follow with: launch/tpu.sh logs train"
  return 0
}

cmd_eval() {
  require TPU_NAME ZONE EVAL_TASK CHECKPOINT
  check_relative REMOTE_DIR
  check_relative VENV_DIR
  need_gcloud
  location_args
  local args=(eao_jax.evaluate --task="$EVAL_TASK" --checkpoint="$CHECKPOINT")
  [[ -z "${EVAL_OUTPUT:-}" ]] || args+=(--output="$EVAL_OUTPUT")
  args+=(${EXTRA[@]+"${EXTRA[@]}"})
  local detach
  set_detach 0
  # All workers: on a multi-host slice every host must join the JAX runtime.
  remote all "$(job_command eval "$detach" "$(python_command "${args[@]}")")"
}

cmd_extract() {
  require TPU_NAME ZONE VIDEOS FEATURES_DIR
  check_relative REMOTE_DIR
  check_relative VENV_DIR
  [[ "$FEATURES_DIR" == gs://* ]] || note "warning: FEATURES_DIR=$FEATURES_DIR is not gs://; on a multi-host TPU every worker must see the same output"
  need_gcloud
  location_args
  local args=(eao_jax.extract --videos="$VIDEOS" --output="$FEATURES_DIR")
  args+=(${EXTRA[@]+"${EXTRA[@]}"})
  local detach
  set_detach 1
  # Every worker takes its block of the video list; rerunning the same command resumes.
  remote all "$(job_command extract "$detach" "$(python_command "${args[@]}")")"
  ((detach)) && note "follow with: launch/tpu.sh logs extract"
  return 0
}

job_name() {
  local job="${LOG_JOB:-train}"
  [[ "$job" =~ ^(train|eval|extract)$ ]] || die "job '$job' must be train, eval or extract"
  printf '%s' "$job"
}

cmd_logs() {
  require TPU_NAME ZONE
  need_gcloud
  location_args
  local job follow=1
  job="$(job_name)"
  if [[ -n "${FOLLOW:-}" ]]; then truthy FOLLOW && follow=1 || follow=0; fi
  local tail_cmd="tail -n 200"
  ((follow)) && tail_cmd+=" -F"
  remote "${WORKER:-0}" "$tail_cmd $LOG_DIR/$job.log"
}

cmd_stop() {
  require TPU_NAME ZONE
  need_gcloud
  location_args
  local job pid
  job="$(job_name)"
  pid="$LOG_DIR/$job.pid"
  # Negative pid: the whole process group started by setsid (python and its data workers).
  # shellcheck disable=SC2016  # $(...) must expand on the worker, not here.
  remote all "if [ -f $pid ]; then kill -TERM -- -\$(cat $pid) 2>/dev/null && echo \"stopped $job on \$(hostname)\" || echo \"$job not running on \$(hostname)\"; rm -f $pid; else echo \"no $job pid file on \$(hostname)\"; fi"
}

cmd_ssh() {
  require TPU_NAME ZONE
  ((${#EXTRA[@]})) || die "ssh needs a command after --, e.g. launch/tpu.sh ssh -- nvidia-smi"
  need_gcloud
  location_args
  remote "${WORKER:-all}" "${EXTRA[*]}"
}

cmd_status() {
  require TPU_NAME ZONE
  need_gcloud
  location_args
  if truthy QUEUED; then
    run "$GCLOUD" compute tpus queued-resources describe "${QUEUED_RESOURCE_ID:-$TPU_NAME-qr}" "${LOCATION[@]}"
  else
    run "$GCLOUD" compute tpus tpu-vm describe "$TPU_NAME" "${LOCATION[@]}"
  fi
}

cmd_delete() {
  require TPU_NAME ZONE
  need_gcloud
  location_args
  if truthy QUEUED; then
    # --force also deletes the TPU VM the queued resource created.
    run "$GCLOUD" compute tpus queued-resources delete "${QUEUED_RESOURCE_ID:-$TPU_NAME-qr}" "${LOCATION[@]}" --force --quiet
  else
    run "$GCLOUD" compute tpus tpu-vm delete "$TPU_NAME" "${LOCATION[@]}" --quiet
  fi
}

case "$SUBCOMMAND" in
  create) cmd_create ;;
  setup) cmd_setup ;;
  train) cmd_train ;;
  eval) cmd_eval ;;
  extract) cmd_extract ;;
  logs) cmd_logs ;;
  stop) cmd_stop ;;
  ssh) cmd_ssh ;;
  status) cmd_status ;;
  delete) cmd_delete ;;
  *) die "unknown subcommand '$SUBCOMMAND' (create|setup|train|eval|extract|logs|stop|ssh|status|delete)" ;;
esac
