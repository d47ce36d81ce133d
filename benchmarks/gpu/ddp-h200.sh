#!/usr/bin/env bash
# The data-parallel path at world size 1 on one H200 (docs/distributed.md):
# PyTorch without and with DDP, knlp without and with one NCCL rank, in one
# call. From the repository root on the device machine, with gpu-bin/knlp.xz
# and .deps/cache/brown carried.
set -u
. benchmarks/gpu/common.sh
$K info | tee -a $OUT/card.txt
for b in ${BATCHES:-16 32}; do
    python3 benchmarks/ddp_torch.py --batch $b 2>>$OUT/torch.err | tee -a $OUT/ddp.jsonl
    torchrun --standalone --nproc-per-node 1 benchmarks/ddp_torch.py --ddp --batch $b 2>>$OUT/torch.err | tee -a $OUT/ddp.jsonl
    $K run benchmarks/ddp_gpu.rhai --batch $b --tag plain-b$b --out $OUT/runs 2>>$OUT/knlp.err | grep '^{' | tee -a $OUT/ddp.jsonl
    $K run --nproc 1 benchmarks/ddp_gpu.rhai --batch $b --tag nccl1-b$b --out $OUT/runs 2>>$OUT/knlp.err | grep '^{' | tee -a $OUT/ddp.jsonl
done
tail -n 5 $OUT/*.err
