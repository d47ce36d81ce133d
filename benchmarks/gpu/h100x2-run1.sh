#!/usr/bin/env bash
# Runs on the device machine from the repository root, with gpu-bin/ holding
# knlp.xz (the stripped release binary, xz-compressed to fit the 64 MiB carry)
# and gpt2_torch.py (../shared/bench); carry ["gpu-bin", ".deps/cache"].
# One device call: anchor and knlp in the same call, then a 2-cell matrix on 2 GPUs.
set -u
export LD_LIBRARY_PATH=$(python3 -c 'import torch,os;print(os.path.dirname(torch.__file__))')/lib
export NCCL_NVLS_ENABLE=0
xz -d -c gpu-bin/knlp.xz > gpu-bin/knlp && chmod +x gpu-bin/knlp
K=gpu-bin/knlp
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$K info
echo "== anchor 16"; python3 gpu-bin/gpt2_torch.py --batch 16 --steps 20 2>&1 | grep '^{'
echo "== knlp 16"; $K run benchmarks/gpt2_gpu.rhai --batch 16 --steps 20 2>&1 | grep '^{'
echo "== matrix on 2 GPUs"
export KCONFIG_CONFIG=$OUT/m.config
$K defconfig --kconfig Kconfig defconfigs/gpt2-brown-bitter7 >/dev/null
$K config set TEXT_DATA_DIR "$PWD/.deps/cache/brown" >/dev/null
$K config set RUNS_DIR "$OUT/runs" >/dev/null
( for i in $(seq 1 90); do sleep 0.5; nvidia-smi --query-compute-apps=pid,gpu_uuid,used_memory --format=csv,noheader; done ) > $OUT/apps.txt 2>&1 &
W=$!
time $K train --set DEVICE=cuda --set PARALLEL_JOBS=2 --set PROJECT=gpu2 2>&1 | tail -8
kill $W 2>/dev/null
echo "== GPUs used by running cells (pid, gpu uuid, memory)"; sort -u $OUT/apps.txt | head -10
nvidia-smi --query-gpu=index,uuid --format=csv,noheader
$K results gpu2 --runs-dir $OUT/runs --columns cell,status,final_ppl,sparsity,time_s,peak_mem_mb,throughput
$K graphs gpu2 --runs-dir $OUT/runs | tail -3
rm -rf $OUT/runs/gpu2/*/checkpoints
