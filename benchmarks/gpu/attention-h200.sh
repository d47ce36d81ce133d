#!/usr/bin/env bash
# Attention decode and training on one H200, the PyTorch anchor and knlp in
# the same call. Runs on the device machine from the repository root with
# gpu-bin/knlp.xz (the stripped release binary); carry ["gpu-bin"].
#   bash benchmarks/gpu/attention-h200.sh a    # 1k context: HF generate/loop, torch MLA, every knlp variant, training
#   bash benchmarks/gpu/attention-h200.sh b    # 4k and 16k contexts
#   bash benchmarks/gpu/attention-h200.sh c    # knlp alone at 1k (re-measure after a change)
set -u
export LD_LIBRARY_PATH=$(python3 -c 'import torch,os;print(os.path.dirname(torch.__file__))')/lib
export PYTHONUNBUFFERED=1
[ -x gpu-bin/knlp ] || { xz -d -c gpu-bin/knlp.xz > gpu-bin/knlp && chmod +x gpu-bin/knlp; }
K=gpu-bin/knlp
OUT=${OUT:-/tmp}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a $OUT/card.txt
date -u | tee -a $OUT/card.txt
case ${1:-a} in
a)
    python3 benchmarks/attention_decode_torch.py --variants hf_generate,hf_loop,mla,ra_mla,mla_kvsplice \
        --contexts 1024 --batches 1,32 --repeats 3 --out $OUT/torch-1k.jsonl > /dev/null 2> $OUT/torch-1k.err
    $K run benchmarks/attention_decode.rhai --contexts 1024 --batches 1,32 --repeats 3 \
        --variants mha,ra,mla,ra_mla,mla_kvsplice,ra_mla_kvsplice,sba,ra_route,kv_tying,kv_tying_t \
        2> $OUT/knlp-1k.err | grep --line-buffered '^{' > $OUT/knlp-1k.jsonl
    ;;
b)
    python3 benchmarks/attention_decode_torch.py --variants hf_loop,mla,ra_mla,mla_kvsplice \
        --contexts 4096,16384 --batches 1,32 --repeats 2 --out $OUT/torch-long.jsonl > /dev/null 2> $OUT/torch-long.err
    $K run benchmarks/attention_decode.rhai --contexts 4096,16384 --batches 1,32 --repeats 2 --train_steps 0 \
        --variants mha,mla,ra_mla,mla_kvsplice,kv_tying 2> $OUT/knlp-long.err | grep --line-buffered '^{' > $OUT/knlp-long.jsonl
    ;;
c)
    # knlp only, 1k context: re-measure after a change (no anchor rerun).
    $K run benchmarks/attention_decode.rhai --contexts 1024 --batches 1,32 --repeats 3 --train_steps 0 \
        --variants ${VARIANTS:-mha,mla,ra_mla,mla_kvsplice,sba} 2> $OUT/knlp-1k-c.err | grep --line-buffered '^{' > $OUT/knlp-1k-c.jsonl
    ;;
esac
tail -n 3 $OUT/*.err
