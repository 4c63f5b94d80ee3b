#!/usr/bin/env bash
# The GPU comparison, end to end, in one command (under 8 minutes on one modern GPU):
#
#   benchmarks/gpu.sh                      # uses the python (and torch) found here
#   PYTHON=/opt/venv/bin/python REPEAT=2 benchmarks/gpu.sh
#
# Writes a ~6 GB bf16 Llama checkpoint (tiled random data, straight through
# safetensors) under $BENCH_DATA (default /tmp/distload_bench), warms the page
# cache, then one world-1 run on cuda:0 measures in rotated order: distload,
# from_pretrained(device_map="cuda"), safetensors load_file(device="cuda"),
# fastsafetensors ("cuda:0"), the read floors with 1, 4 and 8 threads into
# pinned memory, and the pinned -> GPU copy floor. Results go to
# benchmarks/results/compare_6GB_gpu.{md,json,png}.
#
# Needs torch with CUDA, safetensors and transformers; fastsafetensors is
# optional (its row then reports the import error). Nothing is downloaded.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
REPEAT=${REPEAT:-3}
DATA=${BENCH_DATA:-/tmp/distload_bench}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
start=$(date +%s)

"$PY" - <<'PY'
import importlib, torch
assert torch.cuda.is_available(), "benchmarks/gpu.sh needs a CUDA GPU"
print(f"torch {torch.__version__}, {torch.cuda.get_device_name(0)}")
for mod in ("safetensors", "transformers", "fastsafetensors", "matplotlib"):
    try:
        m = importlib.import_module(mod)
        print(f"  {mod} {getattr(m, '__version__', '?')}")
    except Exception as e:  # reported, not fatal: that loader's row shows the error
        print(f"  {mod}: missing ({type(e).__name__})")
PY

"$PY" -m benchmarks.compare --gpu-only --size 6GB --repeat "$REPEAT" --data "$DATA" --tag gpu --timeout 150 || status=$?
echo "gpu.sh: $(( $(date +%s) - start )) s in all"
exit "${status:-0}"
