#!/usr/bin/env bash
# Runs on the device machine from the repository root, with gpu-bin/ holding
# knlp.xz (the stripped release binary, xz-compressed to fit the 64 MiB carry)
# and gpt2_torch.py (../shared/bench); carry ["gpu-bin", ".deps/cache"].
set -u
export LD_LIBRARY_PATH=$(python3 -c 'import torch,os;print(os.path.dirname(torch.__file__))')/lib
[ -x gpu-bin/knlp ] || { xz -d -c gpu-bin/knlp.xz > gpu-bin/knlp && chmod +x gpu-bin/knlp; }
K=gpu-bin/knlp
nvidia-smi --query-gpu=name --format=csv,noheader | head -1
echo "== knlp 16"; $K run benchmarks/gpt2_gpu.rhai --batch 16 --steps 20 2>&1 | grep '^{'
echo "== torch adamw"; python3 benchmarks/adamw_step_torch.py 2>&1 | grep '^{'
export KCONFIG_CONFIG=$OUT/m.config
$K defconfig --kconfig Kconfig defconfigs/gpt2-brown-bitter7 >/dev/null
$K config set TEXT_DATA_DIR "$PWD/.deps/cache/brown" >/dev/null
$K config set RUNS_DIR /tmp/runs >/dev/null
rm -rf /tmp/runs
$K train --set DEVICE=cuda --set PARALLEL_JOBS=2 --set PROJECT=gpu2 > $OUT/train.txt 2>&1
$K results gpu2 --runs-dir /tmp/runs > $OUT/results.txt 2>&1
cp /tmp/runs/gpu2/graphs/*.png /tmp/runs/gpu2/graphs/report.md $OUT/
for c in /tmp/runs/gpu2/gpt2_*; do cp $c/system.json $OUT/$(basename $c)-system.json; done
