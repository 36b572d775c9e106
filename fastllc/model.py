"""The study's one-hidden-layer MLP for binary operations on Z_p.

    logits(a, b) = U · GELU(L·E[a] + b_L + R·E[b] + b_R)

E (p×e) is one embedding shared by both operands, L and R (h×e, with biases) are independent maps for
a and b, U (h→p) has no bias. ``PARAM_SHAPES`` names every parameter and its shape; fast backends
stack these with a leading chain dimension, [C, *shape], in this order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def param_shapes(p: int, embed: int, hidden: int) -> dict[str, tuple[int, ...]]:
    """Parameter names (as in ``ModularMLP.state_dict()``) and shapes, in the canonical order."""
    return {
        "embed.weight": (p, embed),
        "left.weight": (hidden, embed),
        "left.bias": (hidden,),
        "right.weight": (hidden, embed),
        "right.bias": (hidden,),
        "unembed.weight": (p, hidden),
    }


class ModularMLP(nn.Module):
    """Embedding p→e shared by both operands, Linear(e,h) per operand, summed, GELU, Linear(h,p) without bias."""

    def __init__(self, p: int, embed: int = 8, hidden: int = 32):
        super().__init__()
        self.p, self.embed_dim, self.hidden_dim = p, embed, hidden
        self.embed = nn.Embedding(p, embed)
        self.left = nn.Linear(embed, hidden)
        self.right = nn.Linear(embed, hidden)
        self.unembed = nn.Linear(hidden, p, bias=False)

    def forward(self, pairs: torch.Tensor) -> torch.Tensor:
        """pairs [B, 2] int64 → logits [B, p]."""
        pre = self.left(self.embed(pairs[:, 0])) + self.right(self.embed(pairs[:, 1]))
        return self.unembed(F.gelu(pre))

    def architecture(self) -> dict[str, int]:
        return {"p": self.p, "embed": self.embed_dim, "hidden": self.hidden_dim}


INPUT_WEIGHTS = ("embed.weight", "left.weight", "right.weight")  # what ``init_scale`` scales (not the biases)


@torch.no_grad()
def scale_input_weights(model: ModularMLP, factor: float) -> ModularMLP:
    """Multiply the embedding and both first-layer weight matrices by ``factor`` in place: the study's
    architectures figure initialised them ×0.5 (seed_results.json, "init")."""
    parameters = dict(model.named_parameters())
    for name in INPUT_WEIGHTS:
        parameters[name].mul_(factor)
    return model
