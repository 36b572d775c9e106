"""Tiny Hugging Face causal LMs and TransformerLens HookedTransformers built from configs (nothing downloaded),
shared by the tests/test_lm_*.py."""

import warnings

import pytest
import torch

transformers = __import__("pytest").importorskip("transformers")
transformers.utils.logging.set_verbosity_error()

VOCAB, CONTEXT = 32, 16


def gpt2(layers=2, heads=4, width=32, **kwargs):
    config = transformers.GPT2Config(n_layer=layers, n_head=heads, n_embd=width, vocab_size=VOCAB, n_positions=CONTEXT,
                                     bos_token_id=0, eos_token_id=0, **kwargs)
    return transformers.GPT2LMHeadModel(config)


def neox(layers=2, heads=4, width=32, **kwargs):
    config = transformers.GPTNeoXConfig(num_hidden_layers=layers, num_attention_heads=heads, hidden_size=width,
                                        intermediate_size=4 * width, vocab_size=VOCAB, max_position_embeddings=CONTEXT,
                                        bos_token_id=0, eos_token_id=0, **kwargs)
    return transformers.GPTNeoXForCausalLM(config)


def llama(layers=2, heads=4, kv_heads=4, width=32):
    config = transformers.LlamaConfig(num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                                      hidden_size=width, intermediate_size=2 * width, vocab_size=VOCAB,
                                      max_position_embeddings=CONTEXT, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return transformers.LlamaForCausalLM(config)


def hooked(layers=2, heads=4, width=32, **kwargs):
    """A tiny TransformerLens HookedTransformer of GPT-2's architecture (learned positions, pre-LN blocks, tanh-GELU
    MLP of 4·width units, untied unembedding with a bias); the test is skipped without TransformerLens (or with
    TransformerLens ≥ 4, which no longer has HookedTransformer)."""
    pytest.importorskip("transformer_lens", reason="TransformerLens is not installed (pip install 'fastllc[dev]')")
    try:
        from transformer_lens import HookedTransformer, HookedTransformerConfig
    except ImportError:
        pytest.skip("this TransformerLens has no HookedTransformer (removed in 4.0; fastllc[dev] pins < 4)")
    config = HookedTransformerConfig(n_layers=layers, n_heads=heads, d_model=width, d_head=width // heads,
                                     d_mlp=4 * width, d_vocab=VOCAB, n_ctx=CONTEXT, act_fn="gelu_new",
                                     normalization_type="LN", seed=0, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # 3.x announces TransformerBridge on every construction
        return HookedTransformer(config)


def gpt2_tensors_from_hooked(tensors: dict, layers: int) -> dict:
    """A HookedTransformer's tensors by name (its weights, or masks over them) as those of the equivalent untied
    GPT2LMHeadModel: head axes flattened into GPT-2's q | k | v columns and c_proj rows; ``unembed.b_U`` has no
    counterpart (GPT-2's lm_head has no bias) and is left out."""
    # [heads, d_model, d_head] → [d_model, heads·d_head]
    columns = lambda w: w.permute(1, 0, 2).reshape(w.shape[1], -1)
    out = {"transformer.wte.weight": tensors["embed.W_E"], "transformer.wpe.weight": tensors["pos_embed.W_pos"],
           "transformer.ln_f.weight": tensors["ln_final.w"], "transformer.ln_f.bias": tensors["ln_final.b"],
           "lm_head.weight": tensors["unembed.W_U"].T}
    for layer in range(layers):
        t, h = f"blocks.{layer}.", f"transformer.h.{layer}."
        out[h + "attn.c_attn.weight"] = torch.cat([columns(tensors[t + f"attn.W_{x}"]) for x in "QKV"], dim=1)
        out[h + "attn.c_attn.bias"] = torch.cat([tensors[t + f"attn.b_{x}"].reshape(-1) for x in "QKV"])
        out[h + "attn.c_proj.weight"] = tensors[t + "attn.W_O"].flatten(0, 1)  # [heads·d_head, d_model]
        out[h + "attn.c_proj.bias"] = tensors[t + "attn.b_O"]
        for ours, theirs in (("ln_1", "ln1"), ("ln_2", "ln2")):
            out[h + ours + ".weight"], out[h + ours + ".bias"] = tensors[t + theirs + ".w"], tensors[t + theirs + ".b"]
        for ours, theirs in (("c_fc", "in"), ("c_proj", "out")):
            out[h + f"mlp.{ours}.weight"] = tensors[t + f"mlp.W_{theirs}"]
            out[h + f"mlp.{ours}.bias"] = tensors[t + f"mlp.b_{theirs}"]
    return out


def gpt2_from_hooked(model):
    """The untied GPT2LMHeadModel computing the same function as the HookedTransformer ``model`` (whose
    ``unembed.b_U`` must be zero), with its weights copied."""
    c = model.cfg
    assert not model.unembed.b_U.any(), "GPT-2's lm_head has no bias: b_U must be zero"
    twin = gpt2(layers=c.n_layers, heads=c.n_heads, width=c.d_model, tie_word_embeddings=False)
    state = gpt2_tensors_from_hooked({n: p.detach() for n, p in model.named_parameters()}, c.n_layers)
    twin.load_state_dict(state, strict=False)  # the attention's causal-mask buffers are the model's own
    return twin


def tokens(n=24, length=CONTEXT, seed=0):
    return torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


def fit(model, tokens, steps: int = 150, lr: float = 3e-3):
    """``model`` (a Hugging Face causal LM or a HookedTransformer) trained in place on ``tokens`` [N, T] by
    full-batch Adam (next-token loss; only the weights that require a gradient), and returned: a network with
    structure for the agreement tests to measure, in a second or two."""
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        if hasattr(model, "cfg"):  # a HookedTransformer
            loss = model(tokens, return_type="loss")
        else:
            loss = model(input_ids=tokens, labels=tokens).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model
