"""Tiny Hugging Face causal LMs built from configs (nothing downloaded), shared by the tests/test_lm_*.py."""

import torch

transformers = __import__("pytest").importorskip("transformers")
transformers.utils.logging.set_verbosity_error()

VOCAB, CONTEXT = 32, 16


def gpt2(layers=2, heads=4, width=32, **kwargs):
    config = transformers.GPT2Config(n_layer=layers, n_head=heads, n_embd=width, vocab_size=VOCAB, n_positions=CONTEXT,
                                     bos_token_id=0, eos_token_id=0, **kwargs)
    return transformers.GPT2LMHeadModel(config)


def neox(layers=2, heads=4, width=32):
    config = transformers.GPTNeoXConfig(num_hidden_layers=layers, num_attention_heads=heads, hidden_size=width,
                                        intermediate_size=4 * width, vocab_size=VOCAB, max_position_embeddings=CONTEXT,
                                        bos_token_id=0, eos_token_id=0)
    return transformers.GPTNeoXForCausalLM(config)


def llama(layers=2, heads=4, kv_heads=4, width=32):
    config = transformers.LlamaConfig(num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                                      hidden_size=width, intermediate_size=2 * width, vocab_size=VOCAB,
                                      max_position_embeddings=CONTEXT, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return transformers.LlamaForCausalLM(config)


def tokens(n=24, length=CONTEXT, seed=0):
    return torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


def fit(model, tokens, steps: int = 150, lr: float = 3e-3):
    """``model`` trained in place on ``tokens`` [N, T] by full-batch Adam (next-token loss), and returned: a
    network with structure for the agreement tests to measure, in a second or two."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        loss = model(input_ids=tokens, labels=tokens).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model
