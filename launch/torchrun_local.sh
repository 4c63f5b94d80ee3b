#!/usr/bin/env bash
# Load a checkpoint on every GPU (or N CPU ranks) of this machine with torchrun.
set -euo pipefail
usage() {
  cat <<'USAGE'
usage: launch/torchrun_local.sh [-n NPROC] CKPT [distload.load options...]

Starts `torchrun --standalone --nproc_per_node NPROC -m distload.load CKPT ...`.

  -n NPROC   ranks on this machine (default: the number of GPUs, else 2 CPU ranks)
  CKPT       checkpoint directory, .safetensors file or *.safetensors.index.json
  options    passed to python -m distload.load (see its --help); --device
             defaults to cuda when GPUs are present, else cpu

Environment: PYTHON (default: the active virtualenv, else this repository's .venv, else python3).
Example:     launch/torchrun_local.sh /ckpt/llama --dtype bf16 --report report.json
USAGE
}
here=$(cd "$(dirname "$0")" && pwd)
source "$here/common.sh"
nproc=""
while [[ $# -gt 0 ]]; do
  case $1 in
    -h|--help) usage; exit 0 ;;
    -n|--nproc) nproc=$2; shift 2 ;;
    *) break ;;
  esac
done
[[ $# -ge 1 ]] || { usage >&2; exit 2; }
require_distload
gpus=$(gpu_count)
nproc=${nproc:-$([[ $gpus -gt 0 ]] && echo "$gpus" || echo 2)}
extra=()
has_arg --device "$@" || extra+=(--device "$([[ $gpus -gt 0 ]] && echo cuda || echo cpu)")
exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$nproc" -m distload.load "$@" "${extra[@]}"
