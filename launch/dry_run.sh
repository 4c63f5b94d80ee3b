#!/usr/bin/env bash
# Print the plan (which rank of which node reads which file) without reading
# any tensor data. --nnodes emulates several nodes on this machine.
set -euo pipefail
usage() {
  cat <<'USAGE'
usage: launch/dry_run.sh [-n NPROC] [--nnodes N] CKPT [options...]

Starts N torchrun agents on this machine (c10d rendezvous on 127.0.0.1, a
free port), each with NPROC ranks, running `python -m distload.load CKPT
--dry-run`; rank 0 prints the plan. With N > 1 you see how distload spreads
the files over nodes before ranks.

  -n NPROC     ranks per (emulated) node (default 2)
  --nnodes N   emulated nodes (default 1)
  options      passed to python -m distload.load (default --device cpu)

Environment: PYTHON (default: the active virtualenv, else this repository's .venv, else python3).
Example:     launch/dry_run.sh --nnodes 2 -n 4 /ckpt/llama
USAGE
}
here=$(cd "$(dirname "$0")" && pwd)
source "$here/common.sh"
nproc=2 nnodes=1
while [[ $# -gt 0 ]]; do
  case $1 in
    -h|--help) usage; exit 0 ;;
    -n|--nproc) nproc=$2; shift 2 ;;
    --nnodes) nnodes=$2; shift 2 ;;
    *) break ;;
  esac
done
[[ $# -ge 1 ]] || { usage >&2; exit 2; }
require_distload
extra=()
has_arg --device "$@" || extra+=(--device cpu)
port=$(free_port)
pids=()
trap 'for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done' EXIT
for ((k = 0; k < nnodes; k++)); do
  # Agent 0 serves the rendezvous store; the rest join it.
  OMP_NUM_THREADS=1 "$PYTHON" -m torch.distributed.run --nnodes "$nnodes" --nproc_per_node "$nproc" \
    --rdzv_backend c10d --rdzv_endpoint "127.0.0.1:$port" --rdzv_id "dry-run-$port" \
    --rdzv_conf "is_host=$((k == 0 ? 1 : 0))" -m distload.load "$@" --dry-run "${extra[@]}" &
  pids+=($!)
done
status=0
for p in "${pids[@]}"; do wait "$p" || status=$?; done
pids=()
exit "$status"
