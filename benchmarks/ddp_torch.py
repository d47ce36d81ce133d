"""PyTorch anchor for benchmarks/ddp_gpu.rhai: the cost of DistributedDataParallel
at world size 1 on GPT-2 124M (bf16 autocast, fused AdamW, clipping at 1.0,
random tokens). Prints one JSON line.
  python3 benchmarks/ddp_torch.py                                   # no DDP
  torchrun --standalone --nproc-per-node 1 benchmarks/ddp_torch.py --ddp
"""
import argparse, json, os, time
import torch, torch.nn as nn, torch.nn.functional as F

ap = argparse.ArgumentParser()
ap.add_argument("--batch", type=int, default=16)
ap.add_argument("--block", type=int, default=1024)
ap.add_argument("--steps", type=int, default=60)
ap.add_argument("--ddp", action="store_true")
a = ap.parse_args()
torch.backends.cuda.matmul.allow_tf32 = True
torch.backends.cudnn.allow_tf32 = True

class Layer(nn.Module):
    """Pre-norm transformer layer with GPT-2's shapes."""
    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.n1, self.n2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.up, self.down = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = (z.reshape(b, t, self.heads, d // self.heads).transpose(1, 2)
                   for z in self.qkv(self.n1(x)).chunk(3, dim=-1))
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.out(att.transpose(1, 2).reshape(b, t, d))
        return x + self.down(F.gelu(self.up(self.n2(x))))

class Gpt(nn.Module):
    def __init__(self, vocab=50304, block=1024, d=768, layers=12, heads=12):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(block, d)
        self.layers = nn.ModuleList(Layer(d, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.tok.weight

    def forward(self, idx):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for layer in self.layers:
            x = layer(x)
        return self.head(self.norm(x))

if a.ddp:
    torch.distributed.init_process_group("nccl")
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
dev = "cuda"
torch.manual_seed(0)
model = Gpt().to(dev)
net = torch.nn.parallel.DistributedDataParallel(model) if a.ddp else model
opt = torch.optim.AdamW(model.parameters(), lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
x = torch.randint(0, 50257, (a.batch, a.block), device=dev)
y = torch.randint(0, 50257, (a.batch, a.block), device=dev)
times = []
for i in range(a.steps):
    t = time.perf_counter()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = net(x)
    loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), y.view(-1))
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    times.append(time.perf_counter() - t)
ms = sorted(times[10:])
print(json.dumps({"what": "ddp_world1", "impl": "torch", "ddp": a.ddp, "batch": a.batch, "block": a.block,
                  "median_step_ms": round(ms[len(ms) // 2] * 1e3, 3), "last_loss": loss.item()}))
if a.ddp:
    torch.distributed.destroy_process_group()
