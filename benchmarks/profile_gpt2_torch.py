"""Where torch.compile's GPT-2 124M step is faster than eager: the CUDA
kernel time of one training step by kind (matmul, attention, elementwise,
norms, loss, optimizer), eager against torch.compile, from torch.profiler.
The model, optimizer and step are the anchor's (../shared/bench/gpt2_torch.py,
loaded from the path given). Prints JSON lines.
  python3 benchmarks/profile_gpt2_torch.py gpu-bin/gpt2_torch.py [--batch 16] [--steps 3]"""
import json, sys, time
from collections import defaultdict

anchor, rest = sys.argv[1], sys.argv[2:]
src = open(anchor).read()
# The anchor's definitions and argument parsing, without its measurement loop.
sys.argv = [anchor] + rest
g = {"__name__": "anchor"}
exec(compile(src[: src.index("for mode in a.modes")], anchor, "exec"), g)
torch, F, a, GPT, dev = g["torch"], g["F"], g["a"], g["GPT"], g["dev"]

KINDS = [  # first match wins
    ("attention", ("flash", "fmha", "attention")),
    ("matmul", ("gemm", "nvjet", "cutlass", "sm90_", "sm80_", "xmma")),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    ("loss", ("cross_entropy", "log_softmax", "nll")),
    ("norm", ("layer_norm", "layernorm")),
    ("embedding", ("embedding", "index")),
]

def kind(name):
    n = name.lower()
    for k, keys in KINDS:
        if any(s in n for s in keys):
            return k
    return "triton (fused)" if n.startswith("triton") else "other elementwise/copy"

for mode in ["eager", "compile"]:
    torch.manual_seed(0)
    m = GPT().to(dev)
    opt = torch.optim.AdamW(m.parameters(), lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    f = torch.compile(m) if mode == "compile" else m
    x = torch.randint(0, 50257, (a.batch, a.block), device=dev)
    y = torch.randint(0, 50257, (a.batch, a.block), device=dev)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = f(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(5):
        step()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(a.steps):
            step()
        torch.cuda.synchronize()
    by_kind, by_name, count = defaultdict(float), defaultdict(float), defaultdict(int)
    # Kernels are the entries with self device time (operators own none).
    for e in prof.key_averages():
        if e.self_device_time_total > 0:
            t = e.self_device_time_total / 1000.0 / a.steps  # ms per step
            by_kind[kind(e.key)] += t
            by_name[e.key[:90]] += t
            count[e.key[:90]] += e.count
    if not by_kind:
        print(json.dumps(dict(what="gpt2_step_profile", mode=mode, error="no CUDA kernel events",
                              sample=[str(e)[:200] for e in list(prof.key_averages())[:3]])), flush=True)
    total = sum(by_kind.values())
    print(json.dumps(dict(what="gpt2_step_profile", mode=mode, batch=a.batch, gpu_ms_per_step=round(total, 2),
                          kernels_per_step=round(sum(count.values()) / a.steps),
                          by_kind={k: round(v, 2) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])})), flush=True)
    top = sorted(by_name.items(), key=lambda kv: -kv[1])[:25]
    print(json.dumps(dict(what="gpt2_step_top_kernels", mode=mode,
                          top=[dict(name=n, ms=round(v, 3), calls=count[n] // a.steps) for n, v in top])), flush=True)
    del m, opt, f
    torch.cuda.empty_cache()
