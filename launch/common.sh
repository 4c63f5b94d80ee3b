# Shared by the launch/*.sh scripts (sourced, not run).

# The interpreter: $PYTHON if set, else the activated virtualenv's, else the
# repository's .venv (what `make demo` / `make venv` build), else python3.
_repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ -z ${PYTHON:-} ]]; then
  if [[ -n ${VIRTUAL_ENV:-} && -x $VIRTUAL_ENV/bin/python ]]; then
    PYTHON=$VIRTUAL_ENV/bin/python
  elif [[ -x $_repo/.venv/bin/python ]]; then
    PYTHON=$_repo/.venv/bin/python
  else
    PYTHON=python3
  fi
fi

require_distload() {  # fail in one line, before launching anything, if $PYTHON cannot run distload
  "$PYTHON" -c 'import importlib.util as u, sys; sys.exit(0 if u.find_spec("torch") and u.find_spec("distload") else 1)' \
    2>/dev/null && return 0
  echo "$(basename "$0"): $PYTHON cannot import torch and distload: run 'make venv' in $_repo," \
    "activate a virtualenv with distload installed, or set PYTHON" >&2
  exit 1
}

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
