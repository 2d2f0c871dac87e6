#!/usr/bin/env bash
# The GPU checks (issue 13) as one short run, for a session lent a CUDA machine: the cuda tests, ViT-B extraction
# official vs ours at batch 1 and 32 (s/clip, ratio, % of the lone matmul), and the ViT-S / ViT-B pretraining step
# (clips/s, % of the lone bf16 / TF32 matmul). About 5 minutes on an H100; each part has its own time limit, so one
# that hangs cannot eat the others.
#
# The GPU machine has python3 with a CUDA torch, pytest and numpy, but no PyAV (marlin.video imports it) and no
# marlin-pytorch (the official reference). Fetch their wheels here, once, into an ignored folder:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl av marlin-pytorch==0.3.4
# then, there, with .whl carried:   bash benchmarks/gpu_check.sh "$OUT"
# Writes env.txt, cuda_tests.txt, extract.txt / extract.json and pretrain_vit_{s,b}.txt into the folder given.
set -uo pipefail
out=$(realpath -m "${1:-gpu_check_out}")
mkdir -p "$out"
cd "$(dirname "$0")/.."
if ! ls .whl/*.whl > /dev/null 2>&1; then
    echo "no wheels in .whl/: see the top of $0" >&2
    exit 2
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 2
export PYTHONPATH="$PWD/src:/tmp/site" PYTHONUNBUFFERED=1

{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
} 2>&1 | tee "$out/env.txt"

timeout 180 python3 -m pytest -m cuda tests/test_cuda.py -p no:cacheprovider -q -rs 2>&1 | tee "$out/cuda_tests.txt"
timeout 180 python3 benchmarks/bench_extract.py --device cuda --batches 1 32 --reps 5 --warmup 2 \
    --json "$out/extract.json" 2>&1 | tee "$out/extract.txt"
timeout 120 python3 benchmarks/bench_pretrain.py --device cuda --model marlin_vit_small --batch 32 --reps 10 \
    --warmup 3 --bf16 2>&1 | tee "$out/pretrain_vit_s.txt"
timeout 120 python3 benchmarks/bench_pretrain.py --device cuda --model marlin_vit_base --batch 16 --reps 10 \
    --warmup 3 --bf16 2>&1 | tee "$out/pretrain_vit_b.txt"
