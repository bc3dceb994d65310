#!/usr/bin/env bash
# Runs pilaf_jax on a Cloud TPU VM pod slice: every host gets the code and runs the same command.
#
#   launch/tpu_pod.sh create        # Create the TPU VM slice.
#   launch/tpu_pod.sh copy          # Copy this checkout (tracked + untracked, not ignored) to every host.
#   launch/tpu_pod.sh run           # pip install and run pilaf_jax.main on every host.
#   launch/tpu_pod.sh ssh [CMD]     # A shell on host 0, or CMD on every host.
#   launch/tpu_pod.sh delete        # Delete the slice.
#   launch/tpu_pod.sh all           # create, copy, run, delete (the slice is deleted on any failure).
#
# Settings (environment variables; defaults in brackets):
#   TPU_NAME [pilaf-pod]  ZONE [us-east5-a]  PROJECT [gcloud's default]
#   ACCELERATOR_TYPE [v5p-64]  RUNTIME_VERSION [v2-alpha-tpuv5]   (v4-64: tpu-ubuntu2204-base)
#   SPOT [0]: 1 creates a spot (preemptible) slice.
#   CONFIG [configs/llama3_8b_tpu_pod.py]  WORKDIR [required for run: gs://BUCKET/RUN]
#   EXTRA_ARGS ['']: more flags for pilaf_jax.main, e.g. '--config.seed=1'.
#   REMOTE_DIR [pilaf_jax]: checkout directory on the hosts (relative to the home directory).
#   PYTHON_VERSION [3.11]  JAX_VERSION [0.10.2]: `run` installs the package and jax[tpu] into a uv
#     virtualenv VENV [~/pilaf_venv] on each host (TPU VM images ship an older Python than the
#     package needs). SETUP replaces that whole install command.
#   DRY_RUN [0]: 1 prints the commands instead of running them.
#
# Checkpoints, logs and metrics go to WORKDIR, which must be a bucket every host can write (gcsfs, from
# the package's [gcs] extra). The label store (SQLite) stays on host 0's disk, under PILAF_LOCAL_DIR
# [~/.cache/pilaf_jax] or at --config.labelling.store_path, and is copied to WORKDIR/labels.sqlite at
# every checkpoint; a new slice resumes from that copy (see launch/README.md for what a lost VM costs).
set -euo pipefail

TPU_NAME="${TPU_NAME:-pilaf-pod}"
ZONE="${ZONE:-us-east5-a}"
PROJECT="${PROJECT:-}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v5p-64}"
RUNTIME_VERSION="${RUNTIME_VERSION:-v2-alpha-tpuv5}"
SPOT="${SPOT:-0}"
CONFIG="${CONFIG:-configs/llama3_8b_tpu_pod.py}"
WORKDIR="${WORKDIR:-}"
EXTRA_ARGS="${EXTRA_ARGS:-}"
REMOTE_DIR="${REMOTE_DIR:-pilaf_jax}"
PYTHON_VERSION="${PYTHON_VERSION:-3.11}"
JAX_VERSION="${JAX_VERSION:-0.10.2}"
VENV="${VENV:-~/pilaf_venv}"
SETUP="${SETUP:-python3 -m pip install -q --user uv && python3 -m uv venv -q --allow-existing \
--python ${PYTHON_VERSION} ${VENV} && python3 -m uv pip install -q --python ${VENV}/bin/python \
'jax[tpu]==${JAX_VERSION}' -e '.[gcs]' && . ${VENV}/bin/activate}"
DRY_RUN="${DRY_RUN:-0}"

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ARCHIVE="${TMPDIR:-/tmp}/${TPU_NAME}-code.tar.gz"

gcloud_tpu=(gcloud compute tpus tpu-vm)
common=(--zone="${ZONE}")
if [[ -n "${PROJECT}" ]]; then common+=(--project="${PROJECT}"); fi

# Prints a command (arguments with spaces or shell characters in single quotes), then runs it unless
# DRY_RUN=1.
run() {
  local shown=() arg
  for arg in "$@"; do
    if [[ "${arg}" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
      shown+=("${arg}")
    else
      shown+=("'${arg//\'/\'\\\'\'}'")
    fi
  done
  echo "+ ${shown[*]}"
  if [[ "${DRY_RUN}" != 1 ]]; then "$@"; fi
}

create() {
  local extra=()
  if [[ "${SPOT}" == 1 ]]; then extra+=(--spot); fi
  run "${gcloud_tpu[@]}" create "${TPU_NAME}" "${common[@]}" \
    --accelerator-type="${ACCELERATOR_TYPE}" --version="${RUNTIME_VERSION}" "${extra[@]}"
}

copy() {
  # An archive of what git would commit (tracked and untracked, not ignored): no workdirs, no caches.
  run bash -c "cd $(printf '%q' "${REPO_ROOT}") && git ls-files -z --cached --others --exclude-standard \
| tar --null -czf $(printf '%q' "${ARCHIVE}") -T -"
  run "${gcloud_tpu[@]}" scp "${ARCHIVE}" "${TPU_NAME}:code.tar.gz" "${common[@]}" --worker=all
  run "${gcloud_tpu[@]}" ssh "${TPU_NAME}" "${common[@]}" --worker=all \
    --command="rm -rf ${REMOTE_DIR} && mkdir -p ${REMOTE_DIR} && tar -xzf code.tar.gz -C ${REMOTE_DIR}"
}

# WORKDIR and CONFIG, checked before anything is created or paid for.
check_run_settings() {
  if [[ -z "${WORKDIR}" ]]; then
    echo "tpu_pod.sh: set WORKDIR=gs://BUCKET/RUN (a bucket every host can write)." >&2
    exit 2
  fi
  if [[ ! -f "${REPO_ROOT}/${CONFIG}" ]]; then
    echo "tpu_pod.sh: CONFIG=${CONFIG} is not a file of this checkout; set CONFIG=configs/<name>.py." >&2
    exit 2
  fi
}

# Deletes the slice when `all` ends, however it ends (a failed copy or run, an error, Ctrl-C).
delete_on_exit() {
  local status=$?
  trap - EXIT
  if [[ "${status}" != 0 ]]; then
    echo "tpu_pod.sh: failed (exit status ${status}); deleting the slice ${TPU_NAME} so that it stops costing." >&2
  fi
  delete || echo "tpu_pod.sh: could not delete ${TPU_NAME}: delete it by hand (launch/tpu_pod.sh delete)." >&2
  exit "${status}"
}

train() {
  check_run_settings
  local cmd="cd ${REMOTE_DIR} && ${SETUP} \
&& python -m pilaf_jax.main --config=${CONFIG} --workdir=${WORKDIR} ${EXTRA_ARGS}"
  run "${gcloud_tpu[@]}" ssh "${TPU_NAME}" "${common[@]}" --worker=all --command="${cmd}"
}

shell() {
  if [[ $# -gt 0 ]]; then
    run "${gcloud_tpu[@]}" ssh "${TPU_NAME}" "${common[@]}" --worker=all --command="$*"
  else
    run "${gcloud_tpu[@]}" ssh "${TPU_NAME}" "${common[@]}" --worker=0
  fi
}

delete() {
  run "${gcloud_tpu[@]}" delete "${TPU_NAME}" "${common[@]}" --quiet
}

usage() {
  awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}"
}

main() {
  local sub="${1:-}"
  shift || true
  case "${sub}" in
    create) create ;;
    copy) copy ;;
    run) train ;;
    ssh) shell "$@" ;;
    delete) delete ;;
    all)
      # Delete the slice whatever happens once it exists: an idle pod slice is expensive.
      check_run_settings
      trap 'exit 130' INT TERM
      trap delete_on_exit EXIT
      create
      copy
      train ;;
    -h|--help|help) usage ;;
    *) usage >&2; exit 2 ;;
  esac
}

main "$@"
