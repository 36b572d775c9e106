"""Names of parts of a transformer → bool masks over its parameters, per architecture (a table, not string
surgery): what ``restrict=`` and ``groups=`` take in ``fastllc.lm``.

Names (``l`` a layer index, ``h`` a head index, both from 0):
    ``"l{l}h{h}"``   one attention head: the rows of W_Q, W_K, W_V (and their biases) that compute head h's
                     query, key and value, and the columns of the output projection W_O that read head h's
                     output (in nn.Linear's [out, in] terms; the output projection's bias is shared by all
                     heads and not included). Grouped-query attention (Llama-style ``num_key_value_heads`` <
                     heads): head h's key/value rows are those of its key-value head h // (heads/kv-heads),
                     shared with the other query heads of that group.
    ``"l{l} attn"``  the attention module of layer l (every head and the output projection's bias; not the
                     layer norm before it)
    ``"l{l} mlp"``   the MLP module of layer l (not the layer norm before it)
    ``"l{l}"``       the whole block l: attention, MLP and its layer norms
    ``"embed"``      token (and learned position) embeddings
    ``"unembed"``    the final layer norm and the unembedding; with tied embeddings (GPT-2's default) the
                     unembedding IS the token embedding matrix, so "embed" and "unembed" overlap there
    anything else    an exact parameter name or a glob over the model's ``named_parameters()``
A list of names is their union.

Layouts (transformers' own parameter shapes, tested against the models' per-head computation):
    GPT-2     ``attn.c_attn`` is a Conv1D [d_model, 3·d_model] (x @ W): q | k | v blocks of columns, head h
              at columns h·d_head … within each block; ``attn.c_proj`` [d_model, d_model]: head h's rows.
    GPT-NeoX  ``attention.query_key_value`` [3·d_model, d_model] (nn.Linear), per head interleaved: head h
              owns rows h·3·d_head … (h+1)·3·d_head (its q, k, v); ``attention.dense``: head h's columns.
    Llama     ``self_attn.{q,k,v}_proj`` [heads·d_head, d_model], ``o_proj`` [d_model, heads·d_head]
              (also Mistral, Qwen2 and other models laid out as ``model.layers.{l}.self_attn``).
    TransformerLens ``HookedTransformer``: every attention weight keeps a head axis first, so head h is index
              h along dim 0 of ``blocks.{l}.attn.W_Q``/``W_K``/``W_V`` [heads, d_model, d_head], their biases
              ``b_Q``/``b_K``/``b_V`` [heads, d_head] and ``W_O`` [heads, d_head, d_model] (``b_O`` is shared);
              grouped-query models keep keys and values as ``_W_K``/``_W_V``/``_b_K``/``_b_V`` [kv-heads, ...].
              "embed" is ``embed.W_E`` and ``pos_embed.W_pos`` (when the model learns positions), "unembed" is
              ``ln_final`` (when it has parameters) and ``unembed.W_U``, ``unembed.b_U``.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import FastLLCError
from ..sampling.restrict import closest_names
from .models import dimensions, is_hooked_transformer

_HEAD = re.compile(r"^l(\d+)h(\d+)$")
_LAYER = re.compile(r"^l(\d+)(?: (attn|mlp))?$")


@dataclass(frozen=True)
class Layout:
    """Where an architecture keeps each part (``{l}``: the layer index)."""
    block: str  # the prefix of block l's parameters
    attn: str  # the attention module of block l
    mlp: str  # the MLP module of block l
    embed: tuple[str, ...]
    final_norm: str
    kind: str  # "gpt2" | "neox" | "llama" | "hooked": how heads are laid out in the attention weights


LAYOUTS = {
    "gpt2": Layout("transformer.h.{l}.", "transformer.h.{l}.attn.", "transformer.h.{l}.mlp.",
                   ("transformer.wte.weight", "transformer.wpe.weight"), "transformer.ln_f.", "gpt2"),
    "gpt_neox": Layout("gpt_neox.layers.{l}.", "gpt_neox.layers.{l}.attention.", "gpt_neox.layers.{l}.mlp.",
                       ("gpt_neox.embed_in.weight",), "gpt_neox.final_layer_norm.", "neox"),
    "llama": Layout("model.layers.{l}.", "model.layers.{l}.self_attn.", "model.layers.{l}.mlp.",
                    ("model.embed_tokens.weight",), "model.norm.", "llama"),
}
for _alias in ("mistral", "qwen2", "qwen3", "gemma", "olmo"):  # not phi3: its fused qkv_proj has no per-head rows
    LAYOUTS[_alias] = LAYOUTS["llama"]
# TransformerLens, under devinterp 2's name for it (a HookedTransformer has no config.model_type)
LAYOUTS["hooked_transformer"] = Layout("blocks.{l}.", "blocks.{l}.attn.", "blocks.{l}.mlp.",
                                       ("embed.W_E", "pos_embed.W_pos"), "ln_final.", "hooked")


def layout_of(model: nn.Module) -> Layout:
    if is_hooked_transformer(model):
        return LAYOUTS["hooked_transformer"]
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in LAYOUTS:
        raise FastLLCError(f"no head/layer names for model type {model_type!r} (known: "
                           f"{', '.join(sorted(LAYOUTS))}); select its weights by parameter name or glob instead")
    return LAYOUTS[model_type]


def name_mask(model: nn.Module, name, label: str = "restrict") -> dict[str, torch.Tensor]:
    """``name`` (or a list of names, module docstring) as ``{parameter name: bool mask of its shape}``, over
    the Hugging Face model's own ``named_parameters()`` (trainable ones)."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    masks: dict[str, torch.Tensor] = {}
    for item in (name if isinstance(name, (list, tuple)) else [name]):
        if not isinstance(item, str):
            raise FastLLCError(f"{label}: names are strings such as 'l0h1', 'l0 mlp', 'embed', got "
                               f"{type(item).__name__}")
        for key, mask in _one(model, params, item.strip(), label).items():
            masks[key] = masks[key] | mask if key in masks else mask
    return masks


def _full(params, names) -> dict[str, torch.Tensor]:
    return {n: torch.ones(params[n].shape, dtype=torch.bool) for n in names}


def _one(model, params, item: str, label: str) -> dict[str, torch.Tensor]:
    head, layer = _HEAD.match(item), _LAYER.match(item)
    if head or layer or item in ("embed", "unembed"):
        layout = layout_of(model)
        sizes = dimensions(model)
        layers, heads = sizes.layers, sizes.heads
        index = int((head or layer).group(1)) if (head or layer) else 0
        if index >= layers:
            raise FastLLCError(f"{label}: {item!r} names layer {index}; the model has layers 0 to {layers - 1}")
        if head:
            h = int(head.group(2))
            if h >= heads:
                raise FastLLCError(f"{label}: {item!r} names head {h}; layer {index} has heads 0 to {heads - 1}")
            return head_mask(model, params, layout, index, h)
        if layer:
            part = layer.group(2)
            prefix = {None: layout.block, "attn": layout.attn, "mlp": layout.mlp}[part].format(l=index)
            return _full(params, [n for n in params if n.startswith(prefix)])
        if item == "embed":
            return _full(params, [n for n in layout.embed if n in params])
        return _full(params, [n for n in params if n.startswith(layout.final_norm)] + _unembedding(model, params))
    hits = [n for n in params if fnmatch.fnmatchcase(n, item)]
    if not hits:
        raise FastLLCError(f"{label}: {item!r} is neither a part name ('l0h1', 'l0 attn', 'l0 mlp', 'l0', 'embed', "
                           f"'unembed') nor a trainable parameter of the model{closest_names(item, params)}")
    return _full(params, hits)


def _unembedding(model, params) -> list[str]:
    """The names under which ``named_parameters()`` lists the unembedding (the embedding's name when tied;
    TransformerLens: ``unembed.W_U`` and its bias)."""
    if is_hooked_transformer(model):
        return [n for n in params if n.startswith("unembed.")]
    weight = model.get_output_embeddings().weight
    return [next(n for n, p in model.named_parameters() if p is weight)]


def head_mask(model, params, layout: Layout, layer: int, head: int) -> dict[str, torch.Tensor]:
    """Head ``head`` of layer ``layer`` (module docstring's layouts)."""
    sizes = dimensions(model)
    heads, d_head, kv_heads = sizes.heads, sizes.head_width, sizes.kv_heads
    attn = layout.attn.format(l=layer)
    own = slice(head * d_head, (head + 1) * d_head)
    masks = {}

    def rows(name, index, dim=0):
        """Select ``index`` (a slice or an index tensor) along ``dim`` of parameter ``name``, if the model has it."""
        if name not in params:
            return
        mask = torch.zeros(params[name].shape, dtype=torch.bool)
        if isinstance(index, slice):
            mask.narrow(dim, index.start, index.stop - index.start).fill_(True)
        else:
            mask.index_fill_(dim, index, True)
        masks[name] = mask

    if layout.kind == "gpt2":
        width = params[attn + "c_attn.weight"].shape[0]
        qkv = torch.cat([torch.arange(own.start, own.stop) + block * width for block in range(3)])
        rows(attn + "c_attn.weight", qkv, dim=1)  # Conv1D [in, out]: the outputs are columns
        rows(attn + "c_attn.bias", qkv)
        rows(attn + "c_proj.weight", own, dim=0)  # Conv1D [in, out]: head h's inputs are rows
    elif layout.kind == "neox":
        interleaved = slice(head * 3 * d_head, (head + 1) * 3 * d_head)
        rows(attn + "query_key_value.weight", interleaved, dim=0)
        rows(attn + "query_key_value.bias", interleaved)
        rows(attn + "dense.weight", own, dim=1)
    elif layout.kind == "hooked":
        group = head // (heads // kv_heads)
        for name, index in (("W_Q", head), ("b_Q", head), ("W_O", head), *((kv, group) for kv in _HOOKED_KV)):
            rows(attn + name, slice(index, index + 1), dim=0)  # the head axis is first in every one
    else:
        group = head // (heads // kv_heads)
        shared = slice(group * d_head, (group + 1) * d_head)
        for proj, index in (("q_proj", own), ("k_proj", shared), ("v_proj", shared)):
            rows(attn + proj + ".weight", index, dim=0)
            rows(attn + proj + ".bias", index)
        rows(attn + "o_proj.weight", own, dim=1)
    return masks


# TransformerLens's key and value weights: W_K… with as many heads as queries, _W_K… with fewer (grouped-query)
_HOOKED_KV = ("W_K", "W_V", "b_K", "b_V", "_W_K", "_W_V", "_b_K", "_b_V")


def groups_by_name(model: nn.Module, groups) -> dict[str, dict[str, torch.Tensor]]:
    """``"per-head"`` ({"l0h0": …} for every head), ``"per-layer"`` ({"l0": …}), a list of names (each its own
    group) or a dict {group name: name or list of names}, as {group name: {parameter name: mask}}."""
    if isinstance(groups, str):
        sizes = dimensions(model) if groups in ("per-head", "per-layer") else None
        if groups == "per-head":
            groups = [f"l{l}h{h}" for l in range(sizes.layers) for h in range(sizes.heads)]
        elif groups == "per-layer":
            groups = [f"l{l}" for l in range(sizes.layers)]
        else:
            raise FastLLCError(f"groups must be 'per-head', 'per-layer', a list of names or a dict "
                               f"{{group: names}}, not {groups!r}")
    if isinstance(groups, (list, tuple)):
        groups = {str(name): name for name in groups}
    if not isinstance(groups, dict) or not groups:
        raise FastLLCError("groups must be 'per-head', 'per-layer', a non-empty list of names or a dict "
                           "{group: names}")
    return {str(group): name_mask(model, names, label=f"groups[{group!r}]") for group, names in groups.items()}
