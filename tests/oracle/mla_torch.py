"""Oracle for tests/attention/mla_oracle.rs: knlp's mla_decoupled weights
loaded into the plain PyTorch latent-attention GPT of
benchmarks/attention_decode_torch.py (DeepSeek-V2's decoupled key,
absorbed single-token decoding), written independently of knlp's code.

  mla_torch.py WEIGHTS CONFIG OUT
      WEIGHTS: knlp's parameters (safetensors, knlp names); CONFIG: a JSON
      file {n_layer, n_head, n_embd, d_latent, vocab, context, prompt_len,
      new_tokens}. Writes OUT (safetensors): `full` (logits of a full
      forward over `tokens` from WEIGHTS), `tokens` (greedy cached decode
      from the first prompt_len of them) and `steps` [N, B, vocab] (the
      logits each new token came from).
"""
import importlib.util
import json
import pathlib
import sys

import torch
from safetensors.torch import load_file, save_file

ROOT = pathlib.Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("anchor", ROOT / "benchmarks/attention_decode_torch.py")
anchor = importlib.util.module_from_spec(spec)
spec.loader.exec_module(anchor)


def main(weights, config, out):
    c = json.load(open(config))
    w = load_file(weights)
    L, H, d, r = c["n_layer"], c["n_head"], c["n_embd"], c["d_latent"]
    dr = d // H // 2
    m = anchor.LatentGPT("mla_decoupled", c["vocab"], c["context"], L, H, d, r, 0.5).eval()
    sd = {"wte.weight": w["transformer.wte.weight"], "wpe.weight": w["transformer.wpe.weight"],
          "ln_f.weight": w["transformer.ln_f.weight"], "ln_f.bias": w["transformer.ln_f.bias"]}
    for i in range(L):
        k, t = f"transformer.h.{i}.", f"blocks.{i}."
        for a, b in [("ln_1", "ln1"), ("ln_2", "ln2"), ("attn.q_proj", "attn.q_proj"),
                     ("attn.to_kv_latent", "attn.to_kv_latent"), ("attn.from_kv_latent", "attn.from_kv_latent"),
                     ("attn.c_proj", "attn.c_proj"), ("mlp.c_fc", "mlp.0"), ("mlp.c_proj", "mlp.2")]:
            sd[t + b + ".weight"] = w[k + a + ".weight"]
            sd[t + b + ".bias"] = w[k + a + ".bias"]
        # knlp's joint rope_qk: H query blocks of dr rows, then the shared key's.
        qk_w, qk_b = w[k + "attn.rope_qk.weight"], w[k + "attn.rope_qk.bias"]
        sd[t + "attn.q_rope.weight"], sd[t + "attn.q_rope.bias"] = qk_w[:H * dr], qk_b[:H * dr]
        sd[t + "attn.k_rope.weight"], sd[t + "attn.k_rope.bias"] = qk_w[H * dr:], qk_b[H * dr:]
    m.load_state_dict(sd, strict=True)
    tokens = torch.randint(0, c["vocab"], (2, c["prompt_len"] + c["new_tokens"]),
                           generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        full = m(tokens, last_only=False)
        toks, _, _, _, steps = anchor.run_latent(m, tokens[:, :c["prompt_len"]], c["new_tokens"],
                                                 torch.device("cpu"), keep_logits=True)
    save_file({"tokens": tokens.contiguous(), "full": full.contiguous(), "generated": toks.contiguous(),
               "steps": torch.stack(steps).contiguous()}, out)


if __name__ == "__main__":
    main(*sys.argv[1:4])
