#!/usr/bin/env bash
# The CUDA-graphed GPT-2 decode (issue 10's batch-1 target) on one GPU: the
# GPU test of the graph, knlp mha eager and graphed, and the PyTorch anchor
# (Hugging Face generate and its plain KV-cache loop), 1k context, 256 new
# tokens, bf16, greedy, B = 1 and 32, in the same call. Runs on the device
# machine from the repository root with gpu-bin/knlp.xz and
# gpu-bin/graph_decode.xz (stripped release binaries: knlp, and
# `cargo test --release --test attention --no-run`, whose
# graph tests live in tests/attention/graph_decode.rs); carry them in.
#   bash benchmarks/gpu/graph-decode.sh          # REPEATS=3 timed runs (medians)
set -u
source benchmarks/gpu/common.sh
if [ -f gpu-bin/graph_decode.xz ]; then
    [ -x gpu-bin/graph_decode ] || { xz -d -c gpu-bin/graph_decode.xz > gpu-bin/graph_decode && chmod +x gpu-bin/graph_decode; }
    gpu-bin/graph_decode --nocapture --test-threads=1 cuda_graph > $OUT/gpu-test.txt 2>&1
    echo "gpu test exit: $?" >> $OUT/gpu-test.txt
fi
$K run benchmarks/attention_decode.rhai --variants mha --contexts 1024 --batches 1,32 --repeats ${REPEATS:-3} \
    --train_steps 0 --graph both 2> $OUT/knlp-1k.err | grep --line-buffered '^{' > $OUT/knlp-1k.jsonl
python3 benchmarks/attention_decode_torch.py --variants hf_loop,hf_generate --contexts 1024 --batches 1,32 \
    --repeats ${REPEATS:-3} --out $OUT/torch-1k.jsonl > /dev/null 2> $OUT/torch-1k.err
cat $OUT/knlp-1k.jsonl $OUT/torch-1k.jsonl
tail -n 5 $OUT/*.err $OUT/gpu-test.txt
