"""The study's MLP, C copies at once: the batched forward and hand-written backward (``ChainBatch``).

It serves training (``train.py``: seeds of one configuration trained together) and the ``torch`` sampling
backend (``backends/torch.py``); it is not a backend itself. The ``triton`` backend runs the same
computation in its own kernel (``kernels/mlp_sgld.py``).

One step for all chains (a_i, b_i the operands, y_i the label of example i of the minibatch):
forward (one-hot inputs: the first layer is a row gather, never a matmul)
    x_i = [E[a_i], E[b_i]]                       [C, m, 2e]
    z   = x·[L R]ᵀ + b_L + b_R,  u = GELU(z)     [C, m, h]
    s   = u·Uᵀ,  L_m = mean_i −log softmax(s_i)[y_i]
backward, scaled by a per-chain factor k_c (sampling passes k_c = −drift_c = −ε_c·nβ_c/2, so that
G = −drift·∇L_m directly; training passes 1)
    δs = k/m·(softmax(s) − onehot(y)),  ∇U = δsᵀ·u,  δz = (δs·U) ⊙ GELU′(z)
    ∇b_L = ∇b_R = Σ_i δz_i,  [∇L ∇R] = δzᵀ·x,  ∇E = scatter-add of δz·[L R] at rows a_i and b_i

The gather of embedding rows is the "key algebraic saving" of one-hot inputs (docs/design.md) taken per example instead of per
table: with m ≈ p both cost the same FLOPs, but this way scatters rows of width e, not h, and needs
fewer operations per step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..model import ModularMLP, param_shapes
from ..sampling.contract import is_cross_entropy
from ..sampling.layout import ParameterMajor

_gelu_backward = torch.ops.aten.gelu_backward


def is_study_mlp(model, loss_fn) -> bool:
    """Whether ``model`` with ``loss_fn`` is what this engine computes: the study's MLP with cross-entropy."""
    return isinstance(model, ModularMLP) and is_cross_entropy(loss_fn)


class ChainBatch(ParameterMajor):
    """Weights and gradients of C chains of one architecture (parameter-major), and the fused step."""

    def __init__(self, p: int, embed: int, hidden: int, w_star: torch.Tensor, batch_size: int,
                 loss_offset: float = 0.0):
        """``w_star``: [C, d] chain-major starting weights (canonical order). ``loss_offset`` δ > 0: the chains
        follow the published study's −log(p_y + δ) (``SGLDConfig.chain_loss``) instead of cross-entropy."""
        self.loss_offset = loss_offset
        shapes = param_shapes(p, embed, hidden)
        super().__init__(shapes.values(), len(w_star))
        self.p, self.e, self.h, self.m = p, embed, hidden, batch_size
        self.W = self.to_parameter_major(w_star)
        self.G = torch.empty_like(self.W)
        self.param, self.grad = (dict(zip(shapes, self.views(flat))) for flat in (self.W, self.G))
        device = w_star.device
        self.LR = torch.empty(self.C, hidden, 2 * embed, device=device)
        self.row_offset = (torch.arange(self.C, device=device) * p).view(self.C, 1, 1)  # chain c's E rows
        self.minus_one = torch.full((self.C, batch_size, 1), -1.0, device=device)

    def loss_and_scaled_grad(self, operands: torch.Tensor, y: torch.Tensor, scale: torch.Tensor,
                             loss_sum: torch.Tensor) -> None:
        """Writes m·L_m of each chain into ``loss_sum`` [C] and k_c·∇L_m into G.

        operands [C, m, 2] and y [C, m] int64; scale [C, 1, 1] holds k_c/m (the mean's 1/m folded in).
        """
        C, m, p, e = self.C, self.m, self.p, self.e
        param, grad = self.param, self.grad
        E, U = param["embed.weight"], param["unembed.weight"]
        rows = (operands + self.row_offset).view(-1)  # [C·m·2]: rows a_i, b_i of chain c's E in E.view(C·p, e)
        x = E.view(C * p, e).index_select(0, rows).view(C, m, 2 * e)
        torch.cat((param["left.weight"], param["right.weight"]), dim=2, out=self.LR)
        bias = (param["left.bias"] + param["right.bias"]).unsqueeze(1)
        z = torch.baddbmm(bias, x, self.LR.transpose(1, 2))
        u = F.gelu(z)
        log_probs = torch.log_softmax(torch.bmm(u, U.transpose(1, 2)), dim=-1)  # [C, m, p]
        y = y.unsqueeze(-1)
        if self.loss_offset:  # −log(p_y + δ), p_y from the log-softmax: its logit gradient is cross-entropy's
            p_y = log_probs.gather(-1, y).exp_()  # scaled by p_y/(p_y + δ) per example   [C, m, 1]
            offset = p_y + self.loss_offset
            torch.sum(offset.log(), dim=(1, 2), out=loss_sum)
            scale = p_y.div_(offset).mul_(scale)  # k/m·p_y/(p_y + δ)
        else:
            torch.sum(log_probs.gather(-1, y), dim=(1, 2), out=loss_sum)  # −m·L_m: negated and scaled once, at the end

        d_logits = log_probs.exp_()  # softmax, in place (a hand-rolled single-exp softmax measured slower)
        d_logits.scatter_add_(-1, y, self.minus_one)
        d_logits.mul_(scale)  # δs = k/m·(softmax − onehot), per example ·p_y/(p_y + δ) for the published loss
        torch.bmm(d_logits.transpose(1, 2), u, out=grad["unembed.weight"])
        dz = _gelu_backward(torch.bmm(d_logits, U), z)  # [C, m, h]
        torch.sum(dz, dim=1, out=grad["left.bias"])
        grad["right.bias"].copy_(grad["left.bias"])
        d_LR = torch.bmm(dz.transpose(1, 2), x)  # [C, h, 2e]
        grad["left.weight"].copy_(d_LR[..., :e])
        grad["right.weight"].copy_(d_LR[..., e:])
        d_x = torch.bmm(dz, self.LR)  # [C, m, 2e]
        grad["embed.weight"].zero_().view(C * p, e).index_add_(0, rows, d_x.view(-1, e))
