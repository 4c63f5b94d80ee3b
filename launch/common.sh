# Shared by the launch/*.sh scripts (sourced, not run).
PYTHON=${PYTHON:-python3}

gpu_count() {  # GPUs torch can see on this machine (0 without CUDA)
  "$PYTHON" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)' 2>/dev/null || echo 0
}

has_arg() {  # has_arg --device "$@": whether the user already passed that option
  local want=$1; shift
  for a in "$@"; do [[ $a == "$want" || $a == "$want="* ]] && return 0; done
  return 1
}

free_port() {
  "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])'
}
