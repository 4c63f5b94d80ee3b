#!/usr/bin/env bash
# Run the same command on every node: the torchrun agents meet in a c10d
# rendezvous on the head node, and distload spreads the files over the nodes.
set -euo pipefail
usage() {
  cat <<'USAGE'
usage: launch/torchrun_multinode.sh --nnodes N --head HOST[:PORT] [-n NPROC] [--id RUN_ID] CKPT [options...]

Run it on each of the N nodes with the same arguments. It starts
`torchrun --nnodes N --nproc_per_node NPROC --rdzv_backend c10d
 --rdzv_endpoint HOST:PORT --rdzv_id RUN_ID -m distload.load CKPT ...`.

  --nnodes N        number of nodes (required)
  --head HOST:PORT  a host every node can reach that serves the rendezvous
                    (the first node); PORT defaults to 29400
  -n NPROC          ranks per node (default: the number of GPUs, else 2)
  --id RUN_ID       rendezvous id shared by the nodes of one job (default distload)
  options           passed to python -m distload.load; --device defaults to
                    cuda when GPUs are present, else cpu

Environment: PYTHON (default: the active virtualenv, else this repository's .venv, else python3).
Example (on node0 and node1):
  launch/torchrun_multinode.sh --nnodes 2 --head node0:29400 /ckpt/llama --report r.json
USAGE
}
here=$(cd "$(dirname "$0")" && pwd)
source "$here/common.sh"
nnodes="" head="" nproc="" run_id=distload
while [[ $# -gt 0 ]]; do
  case $1 in
    -h|--help) usage; exit 0 ;;
    --nnodes) nnodes=$2; shift 2 ;;
    --head) head=$2; shift 2 ;;
    -n|--nproc) nproc=$2; shift 2 ;;
    --id) run_id=$2; shift 2 ;;
    *) break ;;
  esac
done
[[ -n $nnodes && -n $head && $# -ge 1 ]] || { usage >&2; exit 2; }
require_distload
[[ $head == *:* ]] || head="$head:29400"
gpus=$(gpu_count)
nproc=${nproc:-$([[ $gpus -gt 0 ]] && echo "$gpus" || echo 2)}
extra=()
has_arg --device "$@" || extra+=(--device "$([[ $gpus -gt 0 ]] && echo cuda || echo cpu)")
exec "$PYTHON" -m torch.distributed.run --nnodes "$nnodes" --nproc_per_node "$nproc" \
  --rdzv_backend c10d --rdzv_endpoint "$head" --rdzv_id "$run_id" -m distload.load "$@" "${extra[@]}"
