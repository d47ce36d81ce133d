#!/usr/bin/env bash
# Absorbed latent decoding (issue 10: the latent variants at least as fast
# as mha at 16k context) on one GPU, knlp and the PyTorch anchors in the
# same call: 1k and 16k context, 256 new tokens, bf16, greedy, B = 1 and 32.
#   1. the GPU test of graphed decoding (mha and mla_decoupled) when
#      gpu-bin/graph_decode.xz is carried (`cargo test --release --test
#      attention --no-run`, stripped);
#   2. knlp mha and mla_decoupled, eager and graphed, plus training steps;
#   3. the anchors: Hugging Face's KV-cache loop (mha) and the plain
#      PyTorch MLA with the decoupled key, absorbed (benchmarks/attention_decode_torch.py);
#   4. last, the seed's mla (RoPE over the whole head: expands the cache) in
#      knlp and PyTorch, which is slow at 16k and batch 32.
# Runs on the device machine from the repository root with gpu-bin/knlp.xz.
#   bash benchmarks/gpu/mla-absorbed.sh          # all four parts
#   SKIP_MLA=1 bash benchmarks/gpu/mla-absorbed.sh   # without part 4
set -u
source benchmarks/gpu/common.sh
R=${REPEATS:-2}
if [ -f gpu-bin/graph_decode.xz ]; then
    [ -x gpu-bin/graph_decode ] || { xz -d -c gpu-bin/graph_decode.xz > gpu-bin/graph_decode && chmod +x gpu-bin/graph_decode; }
    timeout 60 gpu-bin/graph_decode --nocapture --test-threads=1 cuda_graph > $OUT/gpu-test.txt 2>&1
    echo "gpu test exit: $?" >> $OUT/gpu-test.txt
fi
timeout 150 $K run benchmarks/attention_decode.rhai --variants mha,mla_decoupled --contexts 1024,16384 \
    --batches 1,32 --repeats $R --train_steps 10 --graph both 2> $OUT/knlp.err | grep --line-buffered '^{' > $OUT/knlp.jsonl
timeout 200 python3 benchmarks/attention_decode_torch.py --variants hf_loop,mla_decoupled --contexts 1024,16384 \
    --batches 1,32 --repeats $R --out $OUT/torch.jsonl > /dev/null 2> $OUT/torch.err
[ -n "${SKIP_MLA:-}" ] || timeout 100 $K run benchmarks/attention_decode.rhai --variants mla --contexts 1024,16384 --batches 1,32 \
    --repeats 1 --train_steps 10 2> $OUT/knlp-mla.err | grep --line-buffered '^{' > $OUT/knlp-mla.jsonl
[ -n "${SKIP_MLA:-}" ] || timeout 80 python3 benchmarks/attention_decode_torch.py --variants mla --contexts 1024,16384 --batches 1,32 \
    --repeats 1 --out $OUT/torch-mla.jsonl > /dev/null 2> $OUT/torch-mla.err
cat $OUT/*.jsonl
tail -n 4 $OUT/*.err $OUT/gpu-test.txt
