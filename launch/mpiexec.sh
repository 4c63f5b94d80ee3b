#!/usr/bin/env bash
# Load a checkpoint with mpiexec: over MPI itself (--comm mpi, the default
# here) or over torch.distributed bootstrapped from MPI (--comm torch).
set -euo pipefail
usage() {
  cat <<'USAGE'
usage: launch/mpiexec.sh [-n N] [--hosts H1,H2,...] [--comm mpi|torch] CKPT [options...]

Starts `mpiexec -n N python -m distload.load CKPT --comm COMM ...`.

  -n N          ranks (default 2)
  --hosts LIST  comma-separated hosts for mpiexec (default: this machine)
  --comm        mpi (default: mpi4py moves the bytes; CPU clusters without
                NCCL) or torch (gloo/nccl, rendezvous agreed over MPI)
  options       passed to python -m distload.load (default --device cpu)

Environment: PYTHON (default: the active virtualenv, else this repository's
.venv, else python3), MPIEXEC (default mpiexec next to PYTHON, else on PATH).
Open MPI run as root gets --allow-run-as-root.
Example:      launch/mpiexec.sh -n 4 /ckpt/llama --report r.json
USAGE
}
here=$(cd "$(dirname "$0")" && pwd)
source "$here/common.sh"
n=2 hosts="" comm=mpi
while [[ $# -gt 0 ]]; do
  case $1 in
    -h|--help) usage; exit 0 ;;
    -n) n=$2; shift 2 ;;
    --hosts) hosts=$2; shift 2 ;;
    --comm) comm=$2; shift 2 ;;
    *) break ;;
  esac
done
[[ $# -ge 1 ]] || { usage >&2; exit 2; }
require_distload
py_dir=$(dirname "$(command -v "$PYTHON")")
MPIEXEC=${MPIEXEC:-$([[ -x $py_dir/mpiexec ]] && echo "$py_dir/mpiexec" || command -v mpiexec || true)}
[[ -n $MPIEXEC ]] || { echo "mpiexec not found: pip install 'distload[mpi]'" >&2; exit 1; }
mpi_args=(-n "$n")
[[ -n $hosts ]] && mpi_args+=(-hosts "$hosts")
if "$MPIEXEC" --version 2>/dev/null | grep -q "Open MPI"; then
  [[ -n $hosts ]] && mpi_args=(-n "$n" --host "$hosts")
  [[ $(id -u) == 0 ]] && mpi_args+=(--allow-run-as-root)
fi
extra=()
has_arg --device "$@" || extra+=(--device cpu)
exec "$MPIEXEC" "${mpi_args[@]}" "$PYTHON" -m distload.load "$@" --comm "$comm" "${extra[@]}"
