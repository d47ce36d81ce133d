#!/usr/bin/env bash
# The data-parallel path at world size 1 on one H200 (docs/distributed.md):
# PyTorch without and with DDP, knlp without and with one NCCL rank, in one
# call. From the repository root on the device machine, with gpu-bin/knlp.xz
# and .deps/cache/brown carried.
set -u
TORCH_LIB=$(python3 -c 'import torch,os;print(os.path.dirname(torch.__file__))')/lib
export LD_LIBRARY_PATH=$TORCH_LIB
export KNLP_CACHE_DIR=$PWD/.deps/cache NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
[ -x gpu-bin/knlp ] || { xz -d -c gpu-bin/knlp.xz > gpu-bin/knlp && chmod +x gpu-bin/knlp; }
K=gpu-bin/knlp
OUT=${OUT:-/tmp}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a $OUT/card.txt
date -u | tee -a $OUT/card.txt
$K info | tee -a $OUT/card.txt
for b in ${BATCHES:-16 32}; do
    python3 benchmarks/ddp_torch.py --batch $b 2>>$OUT/torch.err | tee -a $OUT/ddp.jsonl
    torchrun --standalone --nproc-per-node 1 benchmarks/ddp_torch.py --ddp --batch $b 2>>$OUT/torch.err | tee -a $OUT/ddp.jsonl
    $K run benchmarks/ddp_gpu.rhai --batch $b --tag plain-b$b --out $OUT/runs 2>>$OUT/knlp.err | grep '^{' | tee -a $OUT/ddp.jsonl
    $K run --nproc 1 benchmarks/ddp_gpu.rhai --batch $b --tag nccl1-b$b --out $OUT/runs 2>>$OUT/knlp.err | grep '^{' | tee -a $OUT/ddp.jsonl
done
tail -n 5 $OUT/*.err
