"""Oracle for tests/mechint.rs: small random GPT-2s built and run by
Hugging Face transformers (no network).

  hf_gpt2.py make OUT      write OUT/{gelu_new,gelu_untied}/ (config.json +
                           model.safetensors) and OUT/expected.safetensors:
                           tokens, logits, hidden states, eager attention
                           patterns and a head-ablation of each model
  hf_gpt2.py run DIR TOKENS OUT
                           load DIR with GPT2LMHeadModel.from_pretrained and
                           write its logits for TOKENS (a safetensors file
                           with 'tokens') to OUT
"""
import sys

import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers import GPT2Config, GPT2LMHeadModel

transformers.logging.set_verbosity_error()

ABLATE = (1, 2)  # (layer, head) zeroed at hook_z before c_proj


def build(seed, activation, tie):
    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=2, n_head=4, n_embd=32, n_positions=24, vocab_size=97,
                     activation_function=activation, tie_word_embeddings=tie,
                     layer_norm_epsilon=1e-5, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                     attn_implementation="eager")
    m = GPT2LMHeadModel(cfg).eval()
    # Non-trivial norms and biases, so folding and centering are tested.
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or name.endswith("ln_f.weight"):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn_like(p))
    return m


def make(out):
    expected = {}
    torch.manual_seed(123)
    tokens = torch.randint(0, 97, (2, 16))
    expected["tokens"] = tokens
    for name, (seed, act, tie) in {"gelu_new": (0, "gelu_new", True), "gelu_untied": (1, "gelu", False)}.items():
        m = build(seed, act, tie)
        m.save_pretrained(f"{out}/{name}", safe_serialization=True)
        with torch.no_grad():
            o = m(tokens, output_hidden_states=True, output_attentions=True)
            expected[f"{name}.logits"] = o.logits.contiguous()
            for i, h in enumerate(o.hidden_states):
                expected[f"{name}.hidden.{i}"] = h.contiguous()
            for i, a in enumerate(o.attentions):
                expected[f"{name}.attn.{i}"] = a.contiguous()
            layer, head = ABLATE
            hs = m.config.n_embd // m.config.n_head

            def zero_head(module, args):
                z = args[0].clone()
                z[..., head * hs:(head + 1) * hs] = 0
                return (z,)

            h = m.transformer.h[layer].attn.c_proj.register_forward_pre_hook(zero_head)
            expected[f"{name}.ablated"] = m(tokens).logits.contiguous()
            h.remove()
    save_file(expected, f"{out}/expected.safetensors")


def run(d, tokens_file, out):
    m = GPT2LMHeadModel.from_pretrained(d, attn_implementation="eager").eval()
    tokens = load_file(tokens_file)["tokens"]
    with torch.no_grad():
        save_file({"logits": m(tokens).logits.contiguous()}, out)


if __name__ == "__main__":
    if sys.argv[1] == "make":
        make(sys.argv[2])
    else:
        run(*sys.argv[2:5])
