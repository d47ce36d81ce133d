#!/usr/bin/env bash
# Are knlp's losses at world size 1 the same as without the process group?
# Each configuration twice at batch 16 (run-to-run noise of the GPU kernels),
# then with deterministic kernels. From the repository root on the device
# machine, with gpu-bin/knlp.xz and .deps/cache/brown carried.
set -u
. benchmarks/gpu/common.sh
S=${STEPS:-40}
for i in 1 2; do
    $K run benchmarks/ddp_gpu.rhai --steps $S --tag plain-$i --out $OUT/runs 2>>$OUT/knlp.err | grep '^{' | tee -a $OUT/repeat.jsonl
    $K run --nproc 1 benchmarks/ddp_gpu.rhai --steps $S --tag nccl1-$i --out $OUT/runs 2>>$OUT/knlp.err | grep '^{' | tee -a $OUT/repeat.jsonl
done
export CUBLAS_WORKSPACE_CONFIG=:4096:8
for i in 1 2; do
    $K run benchmarks/ddp_gpu.rhai --steps $S --det true --tag det-plain-$i --out $OUT/runs 2>>$OUT/knlp.err | grep '^{' | tee -a $OUT/repeat.jsonl
done
$K run --nproc 1 benchmarks/ddp_gpu.rhai --steps $S --det true --tag det-nccl1 --out $OUT/runs 2>>$OUT/knlp.err | grep '^{' | tee -a $OUT/repeat.jsonl
rm -rf $OUT/runs
tail -n 5 $OUT/knlp.err
