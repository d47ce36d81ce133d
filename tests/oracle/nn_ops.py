"""Inputs and torch.nn.functional's outputs for the layer functions test.

Usage: nn_ops.py OUT.safetensors   (read by tests/scripts/nn_oracle.rhai)
"""
import sys

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

torch.manual_seed(0)
t = {}
x, w, b = torch.randn(4, 6), torch.randn(5, 6), torch.randn(5)
t.update({"lin.x": x, "lin.w": w, "lin.b": b, "lin.out": F.linear(x, w, b), "lin.nobias": F.linear(x, w)})
t["gelu.tanh"] = F.gelu(x, approximate="tanh")
img, cw, cb = torch.randn(2, 3, 9, 9), torch.randn(4, 3, 3, 3), torch.randn(4)
t.update({"img": img, "conv.w": cw, "conv.b": cb})
t["conv.out"] = F.conv2d(img, cw, cb, stride=2, padding=1)
gw = torch.randn(6, 1, 3, 3)
t["conv.gw"] = gw
t["conv.grouped"] = F.conv2d(torch.cat([img, img], 1), gw, None, padding=(1, 0), dilation=2, groups=6)
t["maxpool"] = F.max_pool2d(img, 3, stride=2, padding=1)
t["maxpool.ceil"] = F.max_pool2d(img, 2, ceil_mode=True)
t["avgpool"] = F.avg_pool2d(img, 2)
t["avgpool.pad"] = F.avg_pool2d(img, 3, stride=2, padding=1, count_include_pad=False)
rm, rv, bw, bb = torch.randn(3), torch.rand(3) + 0.5, torch.randn(3), torch.randn(3)
t.update({"bn.rm": rm.clone(), "bn.rv": rv.clone(), "bn.w": bw, "bn.b": bb})
rm2, rv2 = rm.clone(), rv.clone()
t["bn.train"] = F.batch_norm(img, rm2, rv2, bw, bb, training=True, momentum=0.1, eps=1e-5)
t.update({"bn.rm_after": rm2, "bn.rv_after": rv2})
t["bn.eval"] = F.batch_norm(img, rm, rv, bw, bb, training=False)
lw, lb = torch.randn(9, 9), torch.randn(9, 9)
t.update({"ln.w": lw, "ln.b": lb, "ln.out": F.layer_norm(img, (9, 9), lw, lb), "ln.plain": F.layer_norm(img, (9,))})
ids, emb = torch.randint(0, 10, (3, 4)), torch.randn(10, 5)
t.update({"emb.ids": ids, "emb.w": emb, "emb.out": F.embedding(ids, emb)})
q, k, v = torch.randn(2, 2, 5, 4), torch.randn(2, 2, 5, 4), torch.randn(2, 2, 5, 4)
t.update({"q": q, "k": k, "v": v})
t["sdpa.causal"] = F.scaled_dot_product_attention(q, k, v, is_causal=True)
s = (q @ k.transpose(-2, -1)) / 2.0
s = s.masked_fill(~torch.ones(5, 5, dtype=torch.bool).tril(), float("-inf"))
t["sdpa.pattern"] = s.softmax(-1)
keep = torch.rand(5, 5) > 0.3
keep[:, 0] = True
t["sdpa.keep"] = keep
t["sdpa.masked"] = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, scale=0.3)
t["einsum"] = torch.einsum("bhqd,bhkd->bhqk", q, k)
logits, y = torch.randn(6, 7), torch.tensor([0, 3, -100, 6, 2, 1])
t.update({"ce.logits": logits, "ce.y": y})
t["ce.smooth"] = F.cross_entropy(logits, y, label_smoothing=0.1)
t["ce.none"] = F.cross_entropy(logits, y, reduction="none")
t["ce.sum"] = F.cross_entropy(logits, y, reduction="sum")
seq, sy = torch.randn(2, 7, 3), torch.randint(0, 7, (2, 3))
t.update({"ce.seq": seq, "ce.seq_y": sy, "ce.seq_out": F.cross_entropy(seq, sy)})
save_file({k: v.contiguous() for k, v in t.items()}, sys.argv[1])
