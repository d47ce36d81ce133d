"""PyTorch's AdamW step over GPT-2 124M's parameter shapes (fused and foreach),
with gradient clipping at 1.0 as in the anchor, to compare with knlp's step.
  python3 benchmarks/adamw_step_torch.py [--device cuda]"""
import argparse, json, time
import torch

p = argparse.ArgumentParser()
p.add_argument("--device", default="cuda")
p.add_argument("--reps", type=int, default=20)
a = p.parse_args()
torch.manual_seed(0)
L, D, V, T = 12, 768, 50304, 1024
shapes = [(V, D), (T, D)]
for _ in range(L):
    shapes += [(D,), (D,), (3 * D, D), (3 * D,), (D, D), (D,), (D,), (D,), (4 * D, D), (4 * D,), (D, 4 * D), (D,)]
shapes += [(D,), (D,)]
params = [torch.nn.Parameter(torch.randn(s, device=a.device) * 0.02) for s in shapes]
for q in params:
    q.grad = torch.randn_like(q) * 1e-3
n = sum(q.numel() for q in params)
decay = [q for q in params if q.dim() >= 2]
rest = [q for q in params if q.dim() < 2]
for mode in ["fused", "foreach"]:
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=6e-4, betas=(0.9, 0.95), **{mode: True})
    def step():
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    ts = []
    for _ in range(a.reps):
        t = time.time(); step(); torch.cuda.synchronize(); ts.append(time.time() - t)
    ts.sort()
    print(json.dumps(dict(what="adamw_step", impl=f"torch_{mode}", params=n, median_ms=round(ts[len(ts) // 2] * 1e3, 3))), flush=True)
