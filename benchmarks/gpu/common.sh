# Sourced by the device scripts: torch's libraries on the loader path, the
# carried knlp unpacked as $K, $OUT (default /tmp), and the card recorded.
export LD_LIBRARY_PATH=$(python3 -c 'import torch,os;print(os.path.dirname(torch.__file__))')/lib
export KNLP_CACHE_DIR=$PWD/.deps/cache NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
[ -x gpu-bin/knlp ] || { xz -d -c gpu-bin/knlp.xz > gpu-bin/knlp && chmod +x gpu-bin/knlp; }
K=gpu-bin/knlp
OUT=${OUT:-/tmp}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a $OUT/card.txt
date -u | tee -a $OUT/card.txt
