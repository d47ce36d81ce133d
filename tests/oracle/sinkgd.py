"""SinkGD written from knlp-spec.md 3.5 in PyTorch, the oracle of knlp's.

Usage: sinkgd.py OUT.safetensors
Writes the initial parameters, the gradients of each step, and for every
configuration (tau, n_iter) the parameters after all steps.
"""
import sys

import torch
from safetensors.torch import save_file

LR, WD, EPS, STEPS = 0.05, 0.1, 1e-8, 4
SHAPES = {"w": (7, 5), "conv": (4, 3, 3, 3), "e": (3, 4, 2), "b": (6,)}
CONFIGS = {"s1": (0.1, 5), "s2": (0.05, 10), "s3": (0.2, 3), "plain": (0.1, 0)}


def direction(g, tau, n_iter):
    if n_iter == 0:
        return g / (g.abs().mean() + EPS)
    if g.ndim < 2:
        u = g / torch.clamp(g.abs().sum(), min=EPS)
        return torch.tanh(u / max(EPS, tau))
    u = g.float()
    for _ in range(n_iter):
        u = u / torch.clamp(u.abs().sum(dim=-1, keepdim=True), min=EPS)
        u = u / torch.clamp(u.abs().sum(dim=-2, keepdim=True), min=EPS)
        u = torch.tanh(u / tau)
    rms = lambda t: t.pow(2).mean().sqrt()
    return (u * (rms(g.float()) + EPS) / (rms(u) + EPS)).to(g.dtype)


torch.manual_seed(0)
out = {f"init.{k}": torch.randn(s) for k, s in SHAPES.items()}
for t in range(STEPS):
    for k, s in SHAPES.items():
        # Mixed scales, so that rows and columns differ.
        out[f"grad{t}.{k}"] = torch.randn(s) * torch.rand(s) * 3
for name, (tau, n_iter) in CONFIGS.items():
    ps = {k: out[f"init.{k}"].clone() for k in SHAPES}
    for t in range(STEPS):
        for k, p in ps.items():
            if p.ndim >= 2:  # biases and gains do not decay
                p.mul_(1 - LR * WD)
            p.sub_(LR * direction(out[f"grad{t}.{k}"], tau, n_iter))
    out.update({f"{name}.{k}": p for k, p in ps.items()})
save_file({k: v.contiguous() for k, v in out.items()}, sys.argv[1])
