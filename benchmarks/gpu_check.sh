#!/usr/bin/env bash
# Everything distload asks of a CUDA machine, in one prepared run:
#
#   benchmarks/gpu_check.sh                # PYTHON, REPEAT, SIZE, BENCH_DATA as for gpu.sh
#   REPEAT=1 SIZE=1.7GB benchmarks/gpu_check.sh     # the short form (about 4 minutes)
#
# 1. pytest tests/test_cuda_stage.py (from the repo root: this checkout's distload): the
#    copy stage's stream and event ordering, CUDA loads with casts, the world-1
#    NCCL test mode (replicated, FSDP2 scatter and slice, an injected read error:
#    TorchComm on NCCL, the gloo side group, in-stream status exchanges), pinned
#    memory given back, reader threads on the rank's GPU; with 2 GPUs or more, a
#    2-rank torchrun job (loads on each rank's own GPU, and a hung peer that must
#    fail the other rank inside NCCL's timeout).
# 2. benchmarks/gpu.sh: distload against from_pretrained(device_map="cuda") and
#    the read and pinned -> GPU floors, one table.
# Exit status: non-zero when either step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHON="$PY"
echo "== 1/2 GPU tests"
timeout "${TEST_TIMEOUT:-600}" "$PY" -m pytest -q -p no:cacheprovider -o addopts="" -rs tests/test_cuda_stage.py
tests=$?
echo "== 2/2 GPU comparison"
benchmarks/gpu.sh
bench=$?
echo "gpu_check.sh: tests exit $tests, comparison exit $bench"
[ "$tests" = 0 ] && [ "$bench" = 0 ]
