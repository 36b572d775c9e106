"""fastllc.lm.names: each head's mask checked against the model's own per-head computation (hooks on the
output projection), the layer/part names against the parameter lists, errors, per-head groups."""

import pytest
import torch

from fastllc.errors import FastLLCError
from fastllc.lm import groups_by_name, name_mask

from lm_models import gpt2, llama, neox, tokens

MODELS = {"gpt2": gpt2, "neox": neox, "llama": llama}


def out_projection(model, layer):
    """The module whose input is the heads' outputs concatenated [.., heads·d_head], head h at slice h."""
    kind = model.config.model_type
    if kind == "gpt2":
        return model.transformer.h[layer].attn.c_proj, "c_proj.weight"
    if kind == "gpt_neox":
        return model.gpt_neox.layers[layer].attention.dense, "dense.weight"
    return model.model.layers[layer].self_attn.o_proj, "o_proj.weight"


def run(model, toks, module, zero_head=None, d_head=8):
    """(input, output) of ``module``; with ``zero_head`` that head's slice of its input set to 0 first."""
    seen = {}

    def pre(_, args):
        x = args[0].clone()
        if zero_head is not None:
            x[..., zero_head * d_head:(zero_head + 1) * d_head] = 0
        seen["in"] = x
        return (x,)

    handles = [module.register_forward_pre_hook(pre),
               module.register_forward_hook(lambda _, __, out: seen.__setitem__("out", out))]
    with torch.no_grad():
        model(input_ids=toks)
    for h in handles:
        h.remove()
    return seen["in"], seen["out"]


def perturb(model, masks, skip=()):
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, mask in masks.items():
            if not any(name.endswith(s) for s in skip):
                params[name].add_(torch.where(mask, torch.randn(mask.shape), 0.0))


@pytest.mark.parametrize("arch", MODELS)
@pytest.mark.parametrize("layer,head", [(0, 0), (1, 2), (0, 3)])
def test_head_mask_moves_exactly_that_heads_computation(arch, layer, head):
    model, toks, d_head = MODELS[arch]().eval(), tokens(3), 8  # width 32, 4 heads
    module, out_name = out_projection(model, layer)
    masks = name_mask(model, f"l{layer}h{head}")
    before_in, _ = run(model, toks, module)
    perturb(model, masks, skip=(out_name,))  # its query/key/value weights: only its own output moves
    after_in, _ = run(model, toks, module)
    changed = (after_in != before_in).reshape(-1, 4, d_head).any(dim=(0, 2))
    assert changed.tolist() == [h == head for h in range(4)]
    # its output-projection weights read its output and nothing else: with its slice zeroed they do nothing
    _, quiet = run(model, toks, module, zero_head=head)
    perturb(model, {n: m for n, m in masks.items() if n.endswith(out_name)})
    _, still = run(model, toks, module, zero_head=head)
    assert torch.equal(quiet, still)
    _, loud = run(model, toks, module)
    assert not torch.equal(loud, run(model, toks, module, zero_head=head)[1])


@pytest.mark.parametrize("arch", MODELS)
def test_heads_partition_the_attention_projections(arch):
    """Every head's mask is disjoint from the others' and together they cover q, k, v and the output
    projection's weight (biases of q/k/v too), and nothing outside attention."""
    model = MODELS[arch]()
    heads = [name_mask(model, f"l1h{h}") for h in range(4)]
    names = set().union(*heads)
    assert names and all(".1." in n and ("attn" in n or "attention" in n) for n in names)
    for name in names:
        count = sum(m[name].int() for m in heads if name in m)
        assert (count == 1).all(), name
    per_head = sum(m.sum() for m in heads[0].values())
    width, d_head = 32, 8
    bias = 0 if arch == "llama" else 3 * d_head
    assert per_head == 3 * width * d_head + bias + d_head * width


def test_grouped_query_heads_share_their_key_value_rows():
    model = llama(kv_heads=2)
    a, b, c = (name_mask(model, f"l0h{h}") for h in (0, 1, 2))
    k = "model.layers.0.self_attn.k_proj.weight"
    assert torch.equal(a[k], b[k]) and not (a[k] & c[k]).any()
    assert not (a["model.layers.0.self_attn.q_proj.weight"] & b["model.layers.0.self_attn.q_proj.weight"]).any()


def test_part_names_of_gpt2():
    model = gpt2()
    def full(name):
        masks = name_mask(model, name)
        assert all(m.all() for m in masks.values())
        return set(masks)
    assert full("l0 attn") == {f"transformer.h.0.attn.{p}.{w}" for p in ("c_attn", "c_proj") for w in ("weight", "bias")}
    assert full("l1 mlp") == {f"transformer.h.1.mlp.{p}.{w}" for p in ("c_fc", "c_proj") for w in ("weight", "bias")}
    assert full("l0") == {n for n, _ in model.named_parameters() if n.startswith("transformer.h.0.")}
    assert full("embed") == {"transformer.wte.weight", "transformer.wpe.weight"}
    # tied: the unembedding is the token embedding
    assert full("unembed") == {"transformer.ln_f.weight", "transformer.ln_f.bias", "transformer.wte.weight"}
    assert full(["l0 mlp", "transformer.h.1.ln_*"]) == full("l0 mlp") | {f"transformer.h.1.{ln}.{w}" for ln in
                                                                      ("ln_1", "ln_2") for w in ("weight", "bias")}


def test_part_names_of_neox_and_llama():
    m = neox()
    assert set(name_mask(m, "embed")) == {"gpt_neox.embed_in.weight"}
    assert set(name_mask(m, "unembed")) == {"gpt_neox.final_layer_norm.weight", "gpt_neox.final_layer_norm.bias",
                                            "lm_head.weight"}
    assert set(name_mask(m, "l1 mlp")) == {f"gpt_neox.layers.1.mlp.{p}.{w}" for p in ("dense_h_to_4h", "dense_4h_to_h")
                                          for w in ("weight", "bias")}
    m = llama()
    assert set(name_mask(m, "unembed")) == {"model.norm.weight", "lm_head.weight"}
    assert set(name_mask(m, "l0 attn")) == {f"model.layers.0.self_attn.{p}_proj.weight" for p in "qkvo"}


@pytest.mark.parametrize("name,match", [("l2h0", "layers 0 to 1"), ("l0h4", "heads 0 to 3"), ("l5 mlp", "layers 0 to 1"),
                                        ("transformer.h.0.atn.*", "closest"), (3, "strings")])
def test_bad_names_are_refused(name, match):
    with pytest.raises(FastLLCError, match=match):
        name_mask(gpt2(), name)


def test_groups_by_name():
    model = gpt2()
    heads = groups_by_name(model, "per-head")
    assert list(heads) == [f"l{l}h{h}" for l in range(2) for h in range(4)]
    assert list(groups_by_name(model, "per-layer")) == ["l0", "l1"]
    both = groups_by_name(model, {"mlps": ["l0 mlp", "l1 mlp"], "h": "l1h1"})
    assert set(both["mlps"]) == set(name_mask(model, "l0 mlp")) | set(name_mask(model, "l1 mlp"))
    with pytest.raises(FastLLCError, match="per-head"):
        groups_by_name(model, "per-neuron")
