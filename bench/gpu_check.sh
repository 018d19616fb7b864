#!/usr/bin/env bash
# Everything we check on a GPU, in order of value, in one command (GPU time is rare: never lose it).
#   bash bench/gpu_check.sh [OUT_DIR]         # about 7 minutes on one H100/H200; each part has its own time limit, 9.5 minutes in all
# 1. the kernel tests natively on CUDA (the same files CI runs through Triton's CPU interpreter)
# 2. bench/kernels.py: each kernel against eager, torch.compile and Liger-Kernel at Qwen2-0.5B's shapes
# 3. bench/train_step.py: a whole SFT step of a 0.5B-shaped model, kernels on/off vs transformers, MFU
# 4. bench/profile_step.py: where that step's GPU time goes, by kernel and by group; the same for a decode step
# 5. bench/decode.py: decode with CUDA graphs vs transformers, and batch-1 decode's share of the memory bandwidth
# Liger-Kernel, when missing, is installed from wheels in .whl/ if present (no network needed).
# Each part has its own time limit and writes its own log, so one failure does not lose the rest.
set -uo pipefail
OUT=${1:-${OUT:-gpu_out}}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/device.txt"
if ! $PY -c "import liger_kernel" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi

echo "== 1. kernel tests on CUDA"
timeout 90 $PY -m pytest -q -p no:cacheprovider tests/test_kernels_pointwise.py tests/test_kernels_linear.py \
    tests/test_kernels_steps.py "tests/test_engine.py::test_cuda_graph_decode_equals_eager" \
    "tests/test_sft.py::test_grad_norm_and_clipping_equal_float64" 2>&1 | tee "$OUT/tests.log" | tail -25

echo "== 2. kernels vs eager / torch.compile / Liger"
timeout 150 $PY bench/kernels.py --reps 30 2>&1 | tee "$OUT/kernels.md"

echo "== 3. a whole SFT step, 0.5B shapes, B=16 x T=1024, bf16 autocast"
timeout 45 $PY -m nanopost.testing /tmp/r05 --shape 0.5b >/dev/null
timeout 110 $PY bench/train_step.py --device cuda --precision bf16-autocast --model /tmp/r05 --batch 16 \
    --seq-lens 1024 --steps 3 --impls nanopost nanopost-torch transformers 2>&1 | tee "$OUT/train_step.md"

echo "== 4. where the step's GPU time goes"
timeout 50 $PY bench/profile_step.py --model /tmp/r05 --batch 16 --seq-len 1024 2>&1 | tee "$OUT/profile_step.md"
timeout 40 $PY bench/profile_step.py --model /tmp/r05 --decode 1 2>&1 | tee "$OUT/profile_decode.md"

echo "== 5. decode: CUDA graphs vs transformers (bf16, random 0.5B weights)"
timeout 85 $PY bench/decode.py --model /tmp/r05 --device cuda --batch-sizes 1 16 --new-tokens 128 --repeats 2 \
    --peak-gbps 4800 --impls nanopost-graphs transformers 2>&1 | tee "$OUT/decode.md"
