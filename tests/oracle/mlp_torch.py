"""The MLP of tests/scripts/mlp_oracle.rhai in PyTorch, from the weights
that script saved: forward, label-smoothed cross-entropy, gradients, and
three torch.optim.AdamW steps with the same parameter groups.

Usage: mlp_torch.py FILE.safetensors   (prints the largest differences; exits 1 on a mismatch)
"""
import sys

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

t = load_file(sys.argv[1])
names = ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias", "out.weight"]
p = {n: t[f"init.{n}"].clone().requires_grad_(True) for n in names}


def forward(x):
    h = F.linear(x.flatten(1), p["fc1.weight"], p["fc1.bias"]).relu()
    h = F.linear(h, p["fc2.weight"], p["fc2.bias"]).tanh()
    return F.linear(h, p["out.weight"])


x, y = t["x"], t["y"]
logits = forward(x)
loss = F.cross_entropy(logits, y, label_smoothing=0.1)
loss.backward()
gaps = {"logits": (logits - t["logits"]).abs().max().item(), "loss": (loss - t["loss"]).abs().item()}
for n in names:
    gaps[f"grad.{n}"] = (p[n].grad - t[f"grad.{n}"]).abs().max().item()
# knlp's groups: out.* at lr 1e-3 without decay; fc1.bias with decay 0.5 (a
# bias, decayed only because its group says so); the other weights decay at
# 0.1 and the remaining bias does not.
groups = [
    {"params": [p["out.weight"]], "lr": 1e-3, "weight_decay": 0.0},
    {"params": [p["fc1.bias"]], "weight_decay": 0.5},
    {"params": [p["fc1.weight"], p["fc2.weight"]], "weight_decay": 0.1},
    {"params": [p["fc2.bias"]], "weight_decay": 0.0},
]
opt = torch.optim.AdamW(groups, lr=1e-2)
opt.zero_grad()
for _ in range(3):
    F.cross_entropy(forward(x), y, label_smoothing=0.1).backward()
    opt.step()
    opt.zero_grad()
for n in names:
    gaps[f"after.{n}"] = (p[n].detach() - t[f"after.{n}"]).abs().max().item()
worst = max(gaps.values())
for k, v in gaps.items():
    print(f"{k}: {v:.3e}")
print(f"largest gap {worst:.3e}")
sys.exit(0 if worst < 1e-5 else 1)
