#!/usr/bin/env bash
# The GPU comparison, end to end, in one command (under 8 minutes on one modern GPU):
#
#   benchmarks/gpu.sh                      # uses the python (and torch) found here
#   PYTHON=/opt/venv/bin/python REPEAT=2 SIZE=1.7GB benchmarks/gpu.sh
#
# Writes a ~6 GB bf16 Llama checkpoint (tiled random data, straight through
# safetensors) under $BENCH_DATA (default /tmp/distload_bench), warms the page
# cache, then one world-1 run on cuda:0 measures in rotated order: distload,
# from_pretrained(device_map="cuda"), safetensors load_file(device="cuda"),
# fastsafetensors ("cuda:0"), the read floors with 1, 4 and 8 threads into
# pinned memory, and the pinned -> GPU copy floor. It prints one table, also
# written to benchmarks/results/compare_<SIZE>_gpu.{md,json,png}.
#
# Runs with whatever torch (with CUDA), safetensors, transformers and accelerate
# the machine has, old or new; distload comes from this checkout (nothing is
# installed or downloaded). A peer that is not installed (fastsafetensors, say)
# is a skipped row, not a failure. Without CUDA it says so and exits 0.
# Exit status: 1 when a measured loader failed or the checksums disagree.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
REPEAT=${REPEAT:-3}
SIZE=${SIZE:-6GB}
DATA=${BENCH_DATA:-/tmp/distload_bench}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
start=$(date +%s)

set +e
"$PY" - <<'PY'
import importlib, sys, torch
if not torch.cuda.is_available():
    print(f"gpu.sh: skipped: CUDA is not available here (torch {torch.__version__})")
    sys.exit(3)
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), {torch.cuda.device_count()} x "
      f"{torch.cuda.get_device_name(0)}")
for mod in ("safetensors", "transformers", "accelerate", "fastsafetensors", "matplotlib"):
    try:
        m = importlib.import_module(mod)
        print(f"  {mod} {getattr(m, '__version__', '?')}")
    except Exception as e:  # reported, not fatal: that loader's row says it was skipped
        print(f"  {mod}: missing ({type(e).__name__})")
PY
rc=$?
set -e
if [ "$rc" = 3 ]; then exit 0; elif [ "$rc" != 0 ]; then exit "$rc"; fi

"$PY" -m benchmarks.compare --gpu-only --size "$SIZE" --repeat "$REPEAT" --data "$DATA" --tag gpu --timeout 150 \
  || status=$?
echo "gpu.sh: $(( $(date +%s) - start )) s in all"
exit "${status:-0}"
