"""Micro-benchmark of one layer's absorbed latent attention core on CUDA
(bf16, CUDA-graph replays), against mha's SDPA over per-head K/V of the same
context: where does the absorbed step spend its time?

  python3 benchmarks/absorb_micro.py [--contexts 1024,16384] [--batches 1,32]
"""
import argparse, json, math
import torch

def graphed(fn, iters=50):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay(); torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(iters):
        g.replay()
    b.record(); torch.cuda.synchronize()
    return a.elapsed_time(b) * 1000 / iters  # us

def main():
    p = argparse.ArgumentParser()
    p.add_argument("--contexts", default="1024,16384")
    p.add_argument("--batches", default="1,32")
    a = p.parse_args()
    dev, bf = "cuda", torch.bfloat16
    H, hs, r, dr = 12, 64, 256, 32
    w = r + dr
    for S in map(int, a.contexts.split(",")):
        for B in map(int, a.batches.split(",")):
            torch.manual_seed(0)
            slot = torch.randn(B, S, w, device=dev, dtype=bf)
            qq = torch.randn(B, H, w, device=dev, dtype=bf) / math.sqrt(w)
            mask = torch.zeros(1, 1, S, device=dev, dtype=bf)
            q = torch.randn(B, H, 1, hs, device=dev, dtype=bf)
            k = torch.randn(B, H, S, hs, device=dev, dtype=bf)
            v = torch.randn(B, H, S, hs, device=dev, dtype=bf)
            m4 = torch.zeros(1, 1, 1, S, device=dev, dtype=bf)
            sc = 1 / math.sqrt(hs + dr)
            lat = slot[..., :r]
            st = {}
            def scores():
                st["s"] = torch.bmm(qq, slot.transpose(1, 2))
            def scores_mt():  # scores^T = slot @ qq^T: [B, S, H]
                st["t"] = torch.bmm(slot, qq.transpose(1, 2))
            def softmax():
                st["p"] = (st["s"] * sc + mask).softmax(-1, dtype=torch.float32).to(bf)
            def mix():
                st["o"] = torch.bmm(st["p"], lat)
            def mix_split(cs):
                def f():
                    nc = S // cs
                    pp = st["p"].view(B, H, nc, cs).transpose(1, 2).reshape(B * nc, H, cs)
                    o = torch.bmm(pp, lat.reshape(B * nc, cs, r) if lat.is_contiguous() else lat.view(B * nc, cs, r))
                    st["o2"] = o.view(B, nc, H, r).sum(1, dtype=torch.float32).to(bf)
                return f
            def mix_t():  # o^T = lat^T @ p^T: [B, r, H]
                st["o3"] = torch.bmm(lat.transpose(1, 2), st["p"].transpose(1, 2))
            def whole():
                scores(); softmax(); mix()
            def sdpa():
                st["y"] = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=m4)
            res = {"S": S, "B": B}
            for name, fn in [("scores", scores), ("scores_mt", scores_mt), ("softmax", softmax), ("mix", mix),
                             ("mix_split256", mix_split(256)), ("mix_split1024", mix_split(1024)), ("mix_t", mix_t),
                             ("absorbed_whole", whole), ("mha_sdpa", sdpa)]:
                try:
                    res[name] = round(graphed(fn), 1)
                except Exception as e:
                    res[name] = "err: " + str(e)[:80]
            scores(); softmax(); mix(); mix_split(256)()
            res["split_err"] = (st["o"].float() - st["o2"].float()).abs().max().item()
            res["bytes_slot_MB"] = round(slot.numel() * 2 / 2**20, 1)
            res["bytes_kv_MB"] = round((k.numel() + v.numel()) * 2 / 2**20, 1)
            print(json.dumps(res), flush=True)

if __name__ == "__main__":
    main()
