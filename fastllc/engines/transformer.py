"""Transformer causal LMs evaluated for C chains at once, the chains folded into the batch dimension: the
math of known families written in plain torch over stacked per-chain weights, what the ``transformer``
backend (``fastllc/backends/transformer.py``) differentiates: GPT-2 with the tanh-GELU by its backward spelt
out (``Gpt2.losses_and_gradients``), the rest with autograd.

Every parameter arrives as a [C, *shape] tensor (a view of the parameter-major buffer,
``sampling/layout.py``) and every activation carries the chain first: [C, m·T, D] for m sequences of T
tokens per chain. A linear layer is one ``torch.baddbmm`` over the chains ([C, m·T, in] · [C, in, out]), the
token embedding one gather from the chains' stacked tables (chain c's token i is row c·V + i), a layer
norm's normalisation runs over all chains at once and its per-chain gain and bias are one ``addcmul``, and
attention runs over the folded batch [C·m·heads, T, d_head] (scores by one ``baddbmm`` onto the causal mask,
softmax, one ``bmm``). The loss of chain c is its mean next-token cross-entropy over its predicted tokens
(``data.next_token_loss`` per chain). No ``torch.func.vmap``: each operation is one batched ATen call over all
chains, and autograd differentiates them (the tanh-GELU has its own backward, ``TanhGELU``), except where the
backward is written out: GPT-2's (``_Gpt2Pass``), the same derivatives without autograd's graph, its activations
in buffers kept from step to step, each weight's gradient written straight into the gradient buffer.

Families (``FAMILIES``, by ``config.model_type`` and the wrapped class; everything else is refused in one
line by ``unsupported``):
    gpt2      ``GPT2LMHeadModel``: learned positions, pre-LN blocks, Conv1D weights [in, out] (x·W), fused
              q | k | v, ``scale_attn_weights`` / ``scale_attn_by_inverse_layer_idx``.
    gpt_neox  ``GPTNeoXForCausalLM`` (Pythia): nn.Linear weights [out, in], q | k | v interleaved per head,
              rotary embeddings on part of each head, parallel or sequential residual.
    llama     ``LlamaForCausalLM``: RMSNorm, separate q, k, v with grouped-query attention, rotary embeddings,
              gated MLP, optional biases, the embedding's padding row (no gradient from the lookup).
Each with the activation its config names (``ACTIVATIONS``) and a tied or untied unembedding. Which tensor
plays which part is read from the Hugging Face module itself (``model.transformer.h[l].attn.c_attn.weight``,
``get_input_embeddings()``, ...), matched by identity to the flat parameter list, so a tied unembedding is
the token embedding's own chain copy and a renamed wrapper changes nothing. The rotary tables come from the
model's own rotary module (whatever RoPE scaling it implements), once per sequence length.

Same function as the module, to fp32 rounding: the operations are the Hugging Face implementation's; only the
blocking of sums differs (batched matmuls over chains; the attention's scale applied inside the score product)
and the tanh-GELU is spelt x·σ(2u), within a few ulps of every activation (checked against the module itself in
tests/test_backend_transformer.py).

Speed (tiny GPT-2: 2 layers, width 64, minibatches of 16 sequences of 32 tokens; one thread of a Zen 4 core):
the step is ~55–60% matmul (MKL's sgemm at ~80 GFLOP/s, of which about a quarter is packing the small
operands); the rest is element-wise passes over the activations, bounded by memory once a group's
activations leave the L2 cache. ``torch.compile`` of the loss and its backward (Inductor, CPU) was measured
and rejected: 1.2–1.3× per step at 8 chains, but 78 s to compile cold and 16 s with a warm cache, per chain
count, against ~15 s for a 200-step run of 16 chains; it would pay only for runs of thousands of steps.
GPT-2's backward written out (no autograd graph, no fresh megabyte tensors each step, no gradient concatenation,
q | k | v copied once): 1.07–1.12× the autograd step end to end at 16 chains
on 2 cores (3 interleaved rounds, load 2–3), 1.14–1.16× per folded batch of 4 chains on one thread. What remains:
~60% sgemm (the attention's 32×32×16 products at ~30–55 GFLOP/s, the rest at ~70–75), ~25% element-wise passes
(the tanh-GELU's seven alone ~5%, layer norms ~8%), ~5% the noise fill.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

IGNORE = -100  # data.IGNORE (not imported: this module is imported by the backend's cheap ``supports``)


_SQRT_2_OVER_PI, _GELU_CUBIC = math.sqrt(2 / math.pi), 0.044715


class TanhGELU(torch.autograd.Function):
    """½x(1 + tanh(√(2/π)(x + 0.044715x³))) (transformers' ``gelu_new``, ``F.gelu(approximate="tanh")``),
    written as x·σ(2u), u = √(2/π)(x + 0.044715x³) (the same function: ½(1 + tanh u) = σ(2u)), with its
    derivative σ + x·σ(1 − σ)·2u' computed in the forward pass and kept instead of x: the backward is one
    multiplication. σ is one of torch's fast vector kernels where tanh is not: forward and backward together,
    one thread of Zen 4, 0.55 ms against ``F.gelu(approximate="tanh")``'s 0.97 ms on 256k elements (2 chains of
    the bench's tiny GPT-2), 3.5–4.2 against 4.1–4.7 ms on 1M (8 chains: memory-bound). Against float64: the
    value within 1.3 ulps of max(1, |y|) (F.gelu's: 1.3), the derivative within 17 (F.gelu's: 9; the sum cancels
    for negative x); tests/test_backend_transformer.py."""

    @staticmethod
    def forward(ctx, x):
        c, a = _SQRT_2_OVER_PI, _GELU_CUBIC
        square = x * x
        s = torch.add(x.new_tensor(2 * c), square, alpha=2 * c * a).mul_(x).sigmoid_()  # σ(2u), 2u = x(2c + 2ca·x²)
        slope = torch.add(x.new_tensor(2 * c), square, alpha=6 * c * a, out=square)  # 2u' = 2c + 6ca·x²
        y = s * x
        derivative = torch.addcmul(s, torch.addcmul(y, y, s, value=-1), slope)  # σ + x·σ·(1 − σ)·2u'
        ctx.save_for_backward(derivative)
        return y

    @staticmethod
    def backward(ctx, grad):
        (derivative,) = ctx.saved_tensors
        return grad * derivative


def _tanh_gelu(x):
    return TanhGELU.apply(x)


def tanh_gelu_into(x: torch.Tensor, y: torch.Tensor, derivative: torch.Tensor, s: torch.Tensor) -> None:
    """``TanhGELU.forward``'s operations, in the same order (the same bits), written into buffers of x's shape:
    y = GELU(x), ``derivative`` its slope; ``s`` and x itself are overwritten (scratch)."""
    c, a = _SQRT_2_OVER_PI, _GELU_CUBIC
    two_c = x.new_tensor(2 * c)
    torch.mul(x, x, out=derivative)  # x²
    torch.add(two_c, derivative, alpha=2 * c * a, out=s).mul_(x).sigmoid_()  # σ(2u)
    torch.mul(s, x, out=y)
    torch.add(two_c, derivative, alpha=6 * c * a, out=x)  # 2u'
    torch.addcmul(y, y, s, value=-1, out=derivative)
    torch.addcmul(s, derivative, x, out=derivative)  # σ + x·σ·(1 − σ)·2u'


ACTIVATIONS = {  # config.activation_function → the same function as transformers' ACT2FN, one kernel each
    "gelu_new": _tanh_gelu, "gelu_pytorch_tanh": _tanh_gelu, "gelu": F.gelu, "relu": F.relu, "silu": F.silu,
    "swish": F.silu,
}
FAMILIES = {  # config.model_type → the causal-LM class whose forward is written here
    "gpt2": "GPT2LMHeadModel", "gpt_neox": "GPTNeoXForCausalLM", "llama": "LlamaForCausalLM",
}


def hf_model(model):
    """The Hugging Face model inside ``fastllc.lm.models.CausalLM``, or None when ``model`` is not one."""
    models = sys.modules.get("fastllc.lm.models")  # never imported here: if it is not loaded, no CausalLM exists
    if models is None or not isinstance(model, models.CausalLM):
        return None
    return model.model


def unsupported(model, loss_fn) -> str | None:
    """Why the engine cannot run ``model`` with ``loss_fn`` (one line), or None when it can. Cheap: reads
    the config and the module tree, computes nothing."""
    hf = hf_model(model)
    if hf is None:
        return (f"the transformer backend runs a fastllc.lm.CausalLM (what fastllc.lm.estimate builds), got "
                f"{type(model).__name__}")
    data = sys.modules.get("fastllc.lm.data")
    if data is None or loss_fn is not data.next_token_loss:
        return "the transformer backend computes fastllc.lm.next_token_loss itself; other losses need backend='generic'"
    family = getattr(getattr(hf, "config", None), "model_type", None)
    if FAMILIES.get(family) != type(hf).__name__:
        return (f"the transformer backend runs {', '.join(FAMILIES.values())}, not {type(hf).__name__} "
                f"(model type {family!r}); use backend='generic'")
    return _unsupported_module(model) or _unsupported_config(hf)


def _unsupported_module(model) -> str | None:
    """Settings of the module tree the written forward does not follow."""
    parameters = list(model.parameters())
    if any(p.dtype != torch.float32 for p in parameters):
        return "the transformer backend runs float32 weights; use backend='generic'"
    if getattr(model, "autocast", None) is not None:
        return "the transformer backend computes in float32; bf16 autocast runs on backend='generic'"
    if not all(p.requires_grad for p in parameters):
        return "the transformer backend samples every weight (some have requires_grad=False); use backend='generic'"
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Dropout) and module.training and module.p > 0:
            return (f"dropout is on in '{name}' (training mode): the transformer backend evaluates the model "
                    "in eval mode (fastllc.lm.sampling_mode); use backend='generic'")
    if getattr(model.model.get_output_embeddings(), "bias", None) is not None:
        return "the transformer backend writes an unembedding without bias; use backend='generic'"
    return None


def _unsupported_config(hf) -> str | None:
    """Options of the family's config that its written forward does not follow."""
    config = hf.config
    if config.model_type == "gpt2":
        if getattr(config, "add_cross_attention", False):
            return "GPT-2 with cross-attention is not a causal LM the transformer backend runs; use backend='generic'"
        activation = config.activation_function
    else:
        activation = config.hidden_act
    if activation not in ACTIVATIONS:
        return (f"activation {activation!r} is not one the transformer backend writes ({', '.join(ACTIVATIONS)}); "
                "use backend='generic'")
    if config.model_type == "llama" and getattr(config, "pretraining_tp", 1) != 1:
        return "Llama with pretraining_tp > 1 is not written in the transformer backend; use backend='generic'"
    if config.model_type != "gpt2" and not hasattr(hf.base_model, "rotary_emb"):
        return ("the transformer backend reads the rotary tables from the model's rotary_emb module, which this "
                "transformers version does not have; use backend='generic'")
    return None


def build(model, names: list[str]):
    """The engine of ``model`` (a CausalLM that ``unsupported`` accepts), its weights indexed as ``names``
    (the flat parameter order, ``contract.flat_parameters``)."""
    tensors = dict(model.named_parameters())
    index = {id(tensors[name]): i for i, name in enumerate(names)}
    hf = hf_model(model)
    return {"gpt2": Gpt2, "gpt_neox": NeoX, "llama": Llama}[hf.config.model_type](hf, index)


class _Engine:
    """The forward shared by the families: token embedding, blocks, final norm, unembedding, per-chain loss."""

    def __init__(self, hf, index: dict[int, int]):
        self.index = index
        embedding = hf.get_input_embeddings()
        self.wte, self.padding_idx = index[id(embedding.weight)], embedding.padding_idx
        self.unembed = index[id(hf.get_output_embeddings().weight)]  # the token embedding's index when tied

    def losses(self, weights, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Each chain's mean next-token loss [C]: ``weights`` the [C, *shape] parameters in flat order,
        ``tokens`` [C, m, T], ``targets`` [C, m, T−1] (IGNORE where not predicted)."""
        C, m, T = tokens.shape
        x = self._embed(weights, tokens)
        for block in self.blocks:
            x = self._block(weights, block, x, m, T)
        D = x.shape[-1]
        x = x.view(C, m, T, D)[:, :, :-1].reshape(C, m * (T - 1), D)  # the last position predicts nothing
        logits = torch.bmm(self._final_norm(weights, x), weights[self.unembed].transpose(1, 2))  # x·Eᵀ, E [C, V, D]
        return chain_cross_entropy(logits, targets)

    def _embed(self, weights, tokens: torch.Tensor) -> torch.Tensor:
        """[C, m·T, D]: chain c's token i is row c·V + i of the chains' stacked tables."""
        C, m, T = tokens.shape
        table = weights[self.wte]
        V, D = table.shape[1:]
        rows = tokens + torch.arange(0, C * V, V, device=tokens.device).view(C, 1, 1)
        x = F.embedding(rows, table.reshape(C * V, D))
        if self.padding_idx is not None:  # nn.Embedding gives its padding row no gradient from the lookup
            x = torch.where((tokens == self.padding_idx).unsqueeze(-1), x.detach(), x)
        return x.view(C, m * T, D)

    def widest(self, T: int) -> int:
        """Floats per token of the widest activation a block keeps: q | k | v, the MLP's hidden units, or the
        attention scores (heads × T)."""
        return max(self.width, self.heads * T)

    def _pair(self, module) -> tuple[int, int | None]:
        """Flat indices of a module's weight and bias (None without one)."""
        return self.index[id(module.weight)], None if module.bias is None else self.index[id(module.bias)]


@dataclass(frozen=True)
class _Gpt2Block:
    """Flat indices of one block's weights."""
    ln_1: tuple[int, int]
    c_attn: tuple[int, int]
    attn_proj: tuple[int, int]
    ln_2: tuple[int, int]
    c_fc: tuple[int, int]
    mlp_proj: tuple[int, int]
    scaling: float


class Gpt2(_Engine):
    """GPT-2 (``GPT2LMHeadModel``): learned positions, pre-LN blocks, Conv1D weights [in, out] (x·W), fused
    q | k | v."""

    def __init__(self, hf, index: dict[int, int]):
        super().__init__(hf, index)
        config, body = hf.config, hf.transformer
        self.wpe, self.ln_f, self.eps = index[id(body.wpe.weight)], self._pair(body.ln_f), config.layer_norm_epsilon
        self.heads = config.n_head
        self.width = max(3 * config.n_embd, config.n_inner or 4 * config.n_embd)
        self.activation = ACTIVATIONS[config.activation_function]
        self.blocks = [_Gpt2Block(self._pair(b.ln_1), self._pair(b.attn.c_attn), self._pair(b.attn.c_proj),
                                  self._pair(b.ln_2), self._pair(b.mlp.c_fc), self._pair(b.mlp.c_proj),
                                  _gpt2_scaling(config, layer)) for layer, b in enumerate(body.h)]

    def _embed(self, weights, tokens):
        C, m, T = tokens.shape
        x = super()._embed(weights, tokens).view(C, m, T, -1) + weights[self.wpe][:, None, :T]
        return x.view(C, m * T, -1)

    def _block(self, weights, block: _Gpt2Block, x: torch.Tensor, m: int, T: int) -> torch.Tensor:
        w = partial(_pair_of, weights)
        C, _, D = x.shape
        qkv = linear(layer_norm(x, *w(block.ln_1), self.eps), *w(block.c_attn))  # [C, m·T, 3·D]
        q, k, v = qkv.view(C * m, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # [C·m, heads, T, d]
        x = x + linear(attend(q, k, v, block.scaling).view(C, m * T, D), *w(block.attn_proj))
        hidden = self.activation(linear(layer_norm(x, *w(block.ln_2), self.eps), *w(block.c_fc)))
        return x + linear(hidden, *w(block.mlp_proj))

    def _final_norm(self, weights, x):
        return layer_norm(x, weights[self.ln_f[0]], weights[self.ln_f[1]], self.eps)

    def losses_and_gradients(self, weights, grads, tokens: torch.Tensor, targets: torch.Tensor,
                             buffers: "Workspace") -> torch.Tensor:
        """``losses`` [C] and their gradient written into ``grads`` (the [C, *shape] views of the gradient buffer,
        every element overwritten), without autograd: the same operations forward, their derivatives spelt out
        backward (``_Gpt2Pass``), in ``buffers`` reused from step to step (the caller's ``Workspace``)."""
        with torch.no_grad():
            return _Gpt2Pass(self, weights, grads, buffers).run(tokens, targets)

    @property
    def writes_gradients(self) -> bool:
        """Whether ``losses_and_gradients`` is written for this model: the tanh-GELU, no embedding padding row."""
        return self.activation is _tanh_gelu and self.padding_idx is None


class Workspace:
    """Tensors reused every step, by name and shape, allocated at first use: fresh allocations of megabytes cost page
    faults every step once the allocator hands the memory back. One per thread, shared by the folded batches it runs
    one after another (a batch needs them only during its own step): one set of buffers stays warmer in the cache
    than one per batch."""

    def __init__(self):
        self.tensors: dict[tuple, torch.Tensor] = {}

    def __call__(self, name: str, *shape: int, dtype=torch.float32) -> torch.Tensor:
        tensor = self.tensors.get((name, shape, dtype))
        if tensor is None:
            tensor = self.tensors[name, shape, dtype] = torch.empty(shape, dtype=dtype)
        return tensor


class _Gpt2Pass:
    """One forward and backward of ``Gpt2`` over C chains' minibatches [C, m, T] (see ``losses_and_gradients``).

    Forward as ``Gpt2.losses`` with three differences of layout only: q | k | v copied once into [3, C·m·heads, T,
    d] (not three reshapes), the final norm and the unembedding run over all T positions (the last predicts nothing:
    its target is IGNORE, its gradient zero), and every large activation lives in ``buffers``. Backward: per linear
    layer ∇b = Σ_tokens ∇y, ∇W = xᵀ·∇y straight into the gradient buffer, ∇x = ∇y·Wᵀ (transposed views: MKL ran
    each of these products within ±5% of the same on contiguous copies, interleaved, one thread); per layer norm
    the gain's and bias's sums and ATen's own ``native_layer_norm_backward``; attention as autograd differentiates
    ``attend``; the tanh-GELU's slope kept from the forward (``tanh_gelu_into``); the cross-entropy's
    ∇logits = (softmax − onehot)/n_c."""

    def __init__(self, engine: Gpt2, weights, grads, buffers: Workspace):
        self.engine, self.weights, self.grads, self.buffer = engine, weights, grads, buffers

    def run(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        e, w, buf = self.engine, self.weights, self.buffer
        C, m, T = tokens.shape
        table = w[e.wte]
        V, D = table.shape[1:]
        self.shape = C, m, T, D
        rows = (tokens + torch.arange(0, C * V, V).view(C, 1, 1)).view(-1)
        x = buf("x0", C, m * T, D)
        torch.index_select(table.reshape(C * V, D), 0, rows, out=x.view(-1, D))
        x.view(C, m, T, D).add_(w[e.wpe][:, None, :T])
        saved = []
        for layer, block in enumerate(e.blocks):
            x, kept = self._block(layer, block, x)
            saved.append(kept)
        a, final = self._norm("final", x, e.ln_f)
        logits = torch.bmm(a, w[e.unembed].transpose(1, 2), out=buf("logits", C, m * T, V))
        losses, grad_logits = self._cross_entropy(logits, targets)

        torch.bmm(grad_logits.transpose(1, 2), a, out=self.grads[e.unembed])
        grad = self._norm_backward(torch.bmm(grad_logits, w[e.unembed], out=buf("grad_a", C, m * T, D)), final, e.ln_f)
        for layer in reversed(range(len(e.blocks))):
            grad = self._block_backward(e.blocks[layer], saved[layer], grad)
        grad_positions = self.grads[e.wpe]
        torch.sum(grad.view(C, m, T, D), dim=1, out=grad_positions[:, :T])
        grad_positions[:, T:].zero_()
        lookup = torch.ops.aten.embedding_dense_backward(grad.view(-1, D), rows, C * V, -1, False).view(C, V, D)
        if e.wte == e.unembed:  # tied: the lookup's gradient adds to the unembedding's, as autograd accumulates them
            self.grads[e.wte].add_(lookup)
        else:
            self.grads[e.wte].copy_(lookup)
        return losses

    def _norm(self, name: str, x: torch.Tensor, pair: tuple[int, int]):
        """LayerNorm with chain c's gain and bias; (its output, what its backward needs)."""
        normalised, mean, rstd = torch.native_layer_norm(x, x.shape[-1:], None, None, self.engine.eps)
        gain, bias = self.weights[pair[0]].unsqueeze(1), self.weights[pair[1]].unsqueeze(1)
        return torch.addcmul(bias, normalised, gain, out=self.buffer(name, *x.shape)), (x, normalised, mean, rstd)

    def _norm_backward(self, grad: torch.Tensor, kept, pair: tuple[int, int]) -> torch.Tensor:
        """∇x of ``_norm`` from ∇output (overwritten); the gain's and bias's gradients into the buffer."""
        x, normalised, mean, rstd = kept
        product = torch.mul(grad, normalised, out=self.buffer("norm_product", *x.shape))
        torch.sum(product, dim=1, out=self.grads[pair[0]])
        torch.sum(grad, dim=1, out=self.grads[pair[1]])
        grad.mul_(self.weights[pair[0]].unsqueeze(1))
        return torch.ops.aten.native_layer_norm_backward(grad, x, x.shape[-1:], mean, rstd, None, None,
                                                         [True, False, False])[0]

    def _linear(self, name: str, x: torch.Tensor, pair: tuple[int, int]) -> torch.Tensor:
        """x [C, N, in] · W [C, in, out] + b into the buffer ``name``."""
        w = self.weights
        weight = w[pair[0]]
        out = self.buffer(name, *x.shape[:2], weight.shape[-1])
        return torch.baddbmm(w[pair[1]].unsqueeze(1), x, weight, out=out)

    def _linear_backward(self, name: str, grad: torch.Tensor, x: torch.Tensor, pair: tuple[int, int]) -> torch.Tensor:
        """∇x of ``_linear`` into the buffer ``name``; ∇W and ∇b into the gradient buffer."""
        weight = self.weights[pair[0]]
        torch.sum(grad, dim=1, out=self.grads[pair[1]])
        torch.bmm(x.transpose(1, 2), grad, out=self.grads[pair[0]])
        return torch.bmm(grad, weight.transpose(1, 2), out=self.buffer(name, *grad.shape[:2], weight.shape[1]))

    def _block(self, layer: int, block: _Gpt2Block, x: torch.Tensor):
        e, buf = self.engine, self.buffer
        C, m, T, D = self.shape
        B, heads = C * m, e.heads
        d = D // heads
        a1, norm_1 = self._norm(f"{layer}.a1", x, block.ln_1)
        qkv = self._linear("qkv", a1, block.c_attn)
        q_k_v = buf(f"{layer}.q_k_v", 3, B * heads, T, d)
        q_k_v.view(3, B, heads, T, d).copy_(qkv.view(B, T, 3, heads, d).permute(2, 0, 3, 1, 4))
        q, k, v = q_k_v
        mask = self._causal_mask(T)
        scores = torch.baddbmm(mask, q, k.transpose(1, 2), alpha=block.scaling, out=buf("scores", B * heads, T, T))
        probabilities = torch._softmax(scores, -1, False, out=buf(f"{layer}.probabilities", B * heads, T, T))
        values = torch.bmm(probabilities, v, out=buf("values", B * heads, T, d))
        attended = buf(f"{layer}.attended", C, m * T, D)
        attended.view(B, T, heads, d).copy_(values.view(B, heads, T, d).transpose(1, 2))
        x_mid = self._linear(f"{layer}.x_mid", attended, block.attn_proj).add_(x)
        a2, norm_2 = self._norm(f"{layer}.a2", x_mid, block.ln_2)
        hidden = self._linear("hidden", a2, block.c_fc)
        activation, slope = buf(f"{layer}.activation", *hidden.shape), buf(f"{layer}.slope", *hidden.shape)
        tanh_gelu_into(hidden, activation, slope, buf("gelu_scratch", *hidden.shape))
        x_out = self._linear(f"{layer + 1}.x", activation, block.mlp_proj).add_(x_mid)
        return x_out, (norm_1, a1, q_k_v, probabilities, attended, norm_2, a2, activation, slope)

    def _block_backward(self, block: _Gpt2Block, kept, grad: torch.Tensor) -> torch.Tensor:
        """∇ of the block's input from ∇ of its output (``grad``, read only)."""
        e, buf = self.engine, self.buffer
        C, m, T, D = self.shape
        B, heads = C * m, e.heads
        d = D // heads
        norm_1, a1, q_k_v, probabilities, attended, norm_2, a2, activation, slope = kept
        grad_hidden = self._linear_backward("grad_activation", grad, activation, block.mlp_proj).mul_(slope)
        grad_a2 = self._linear_backward("grad_a2", grad_hidden, a2, block.c_fc)
        grad_mid = self._norm_backward(grad_a2, norm_2, block.ln_2).add_(grad)
        grad_attended = self._linear_backward("grad_attended", grad_mid, attended, block.attn_proj)
        grad_values = buf("grad_values", B * heads, T, d)
        grad_values.view(B, heads, T, d).copy_(grad_attended.view(B, T, heads, d).transpose(1, 2))
        q, k, v = q_k_v
        grad_q_k_v = buf("grad_q_k_v", 3, B * heads, T, d)
        grad_q, grad_k, grad_v = grad_q_k_v
        grad_probabilities = torch.bmm(grad_values, v.transpose(1, 2), out=buf("grad_probabilities", B * heads, T, T))
        torch.bmm(probabilities.transpose(1, 2), grad_values, out=grad_v)
        grad_scores = torch.ops.aten._softmax_backward_data.out(grad_probabilities, probabilities, -1, torch.float32,
                                                                grad_input=buf("grad_scores", B * heads, T, T))
        torch.bmm(grad_scores, k, out=grad_q).mul_(block.scaling)
        torch.bmm(grad_scores.transpose(1, 2), q, out=grad_k).mul_(block.scaling)
        grad_qkv = buf("grad_qkv", C, m * T, 3 * D)
        grad_qkv.view(B, T, 3, heads, d).copy_(grad_q_k_v.view(3, B, heads, T, d).permute(1, 3, 0, 2, 4))
        grad_a1 = self._linear_backward("grad_a1", grad_qkv, a1, block.c_attn)
        return self._norm_backward(grad_a1, norm_1, block.ln_1).add_(grad_mid)

    def _causal_mask(self, T: int) -> torch.Tensor:
        key = ("mask", (T, T), torch.float32)
        if key not in self.buffer.tensors:
            self.buffer.tensors[key] = _causal_mask(T, self.weights[0])
        return self.buffer.tensors[key]

    def _cross_entropy(self, logits: torch.Tensor, targets: torch.Tensor):
        """(each chain's mean next-token loss [C], ∇ of their sum w.r.t. ``logits`` [C, m·T, V]); position T−1 of each
        sequence predicts nothing."""
        C, m, T, _ = self.shape
        V = logits.shape[-1]
        full = self.buffer("targets", C, m, T, dtype=torch.long)
        full[..., :-1] = targets
        full[..., -1] = IGNORE
        full = full.view(C, m * T, 1)
        counted = full != IGNORE
        picked = full.clamp(min=0)
        log_p = torch._log_softmax(logits, -1, False, out=self.buffer("log_p", C, m * T, V))
        each = torch.where(counted, log_p.gather(-1, picked), 0.0).neg_()  # F.cross_entropy(reduction="none")
        counts = counted.sum(dim=1)  # [C, 1]
        losses = each.view(C, m, T)[:, :, :-1].reshape(C, -1).sum(dim=1) / counts.view(C)
        grad = log_p.exp_()  # softmax, then − onehot, each counted row over its chain's count, the others zero
        grad.scatter_add_(-1, picked, torch.full_like(each, -1.0))
        grad.mul_(torch.where(counted, 1.0 / counts.view(C, 1, 1), 0.0))
        return losses, grad


def _gpt2_scaling(config, layer: int) -> float:
    """GPT2Attention.scaling: 1/√d_head when ``scale_attn_weights``, over (layer + 1) when scaled by layer."""
    scaling = (config.n_embd // config.n_head) ** -0.5 if config.scale_attn_weights else 1.0
    return scaling / (layer + 1) if config.scale_attn_by_inverse_layer_idx else scaling


def _scaling(attention, config) -> float:
    """The attention module's own ``scaling`` where transformers keeps one, else 1/√d_head (older versions)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return getattr(attention, "scaling", head_dim ** -0.5)


class _Rotary(_Engine):
    """Families with rotary position embeddings: cos and sin from the model's own rotary module (any RoPE
    scaling it implements), computed once per sequence length, without autograd."""

    def __init__(self, hf, index: dict[int, int], rotary):
        super().__init__(hf, index)
        self.rotary, self.tables = rotary, {}

    def _cos_sin(self, T: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if T not in self.tables:
            with torch.no_grad():
                positions = torch.arange(T, device=like.device).unsqueeze(0)
                cos, sin = self.rotary(like.new_zeros(1, T, 1), positions)
            self.tables[T] = cos[0].to(like.dtype), sin[0].to(like.dtype)  # [T, rotary dims]
        return self.tables[T]


@dataclass(frozen=True)
class _NeoXBlock:
    ln_1: tuple[int, int]
    qkv: tuple[int, int | None]
    dense: tuple[int, int | None]
    ln_2: tuple[int, int]
    up: tuple[int, int | None]
    down: tuple[int, int | None]
    scaling: float


class NeoX(_Rotary):
    """GPT-NeoX / Pythia (``GPTNeoXForCausalLM``): nn.Linear weights [out, in], fused q | k | v interleaved per
    head, rotary on the first ``rotary_ndims`` of each head, parallel or sequential residual."""

    def __init__(self, hf, index: dict[int, int]):
        super().__init__(hf, index, hf.base_model.rotary_emb)
        config, body = hf.config, hf.gpt_neox
        self.heads, self.eps = config.num_attention_heads, config.layer_norm_eps
        self.parallel = config.use_parallel_residual
        self.width = max(3 * config.hidden_size, config.intermediate_size)
        self.activation = ACTIVATIONS[config.hidden_act]
        self.final = self._pair(body.final_layer_norm)
        self.blocks = [_NeoXBlock(self._pair(b.input_layernorm), self._pair(b.attention.query_key_value),
                                  self._pair(b.attention.dense), self._pair(b.post_attention_layernorm),
                                  self._pair(b.mlp.dense_h_to_4h), self._pair(b.mlp.dense_4h_to_h),
                                  _scaling(b.attention, config)) for b in body.layers]

    def _block(self, weights, block: _NeoXBlock, x: torch.Tensor, m: int, T: int) -> torch.Tensor:
        w = partial(_pair_of, weights)
        C, _, D = x.shape
        qkv = dense(layer_norm(x, *w(block.ln_1), self.eps), *w(block.qkv))  # [C, m·T, 3·D], per head q | k | v
        q, k, v = qkv.view(C * m, T, self.heads, 3 * D // self.heads).transpose(1, 2).chunk(3, dim=-1)
        cos, sin = self._cos_sin(T, x)
        attention = dense(attend(rotate(q, cos, sin), rotate(k, cos, sin), v, block.scaling).view(C, m * T, D),
                          *w(block.dense))
        if self.parallel:
            return x + attention + self._mlp(weights, block, layer_norm(x, *w(block.ln_2), self.eps))
        x = x + attention
        return x + self._mlp(weights, block, layer_norm(x, *w(block.ln_2), self.eps))

    def _mlp(self, weights, block: _NeoXBlock, x: torch.Tensor) -> torch.Tensor:
        w = partial(_pair_of, weights)
        return dense(self.activation(dense(x, *w(block.up))), *w(block.down))

    def _final_norm(self, weights, x):
        return layer_norm(x, weights[self.final[0]], weights[self.final[1]], self.eps)


@dataclass(frozen=True)
class _LlamaBlock:
    norm_1: int
    q: tuple[int, int | None]
    k: tuple[int, int | None]
    v: tuple[int, int | None]
    o: tuple[int, int | None]
    norm_2: int
    gate: tuple[int, int | None]
    up: tuple[int, int | None]
    down: tuple[int, int | None]
    scaling: float


class Llama(_Rotary):
    """Llama (``LlamaForCausalLM``): RMSNorm, separate q, k, v projections with grouped-query attention
    (``num_key_value_heads``), rotary embeddings, gated MLP, optional biases."""

    def __init__(self, hf, index: dict[int, int]):
        super().__init__(hf, index, hf.base_model.rotary_emb)
        config, body = hf.config, hf.model
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.eps = config.rms_norm_eps
        self.width = max(3 * config.hidden_size, config.intermediate_size)
        self.activation = ACTIVATIONS[config.hidden_act]
        self.final = index[id(body.norm.weight)]
        self.blocks = [_LlamaBlock(index[id(b.input_layernorm.weight)], *(self._pair(getattr(b.self_attn, f"{p}_proj"))
                                   for p in "qkvo"), index[id(b.post_attention_layernorm.weight)],
                                   *(self._pair(getattr(b.mlp, f"{p}_proj")) for p in ("gate", "up", "down")),
                                   _scaling(b.self_attn, config)) for b in body.layers]

    def _block(self, weights, block: _LlamaBlock, x: torch.Tensor, m: int, T: int) -> torch.Tensor:
        w = partial(_pair_of, weights)
        C = x.shape[0]
        h = rms_norm(x, weights[block.norm_1], self.eps)
        q, k, v = (dense(h, *w(pair)).view(C * m, T, heads, -1).transpose(1, 2)
                   for pair, heads in ((block.q, self.heads), (block.k, self.kv_heads), (block.v, self.kv_heads)))
        cos, sin = self._cos_sin(T, x)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        if self.kv_heads != self.heads:  # each key/value head serves heads/kv_heads query heads (repeat_kv)
            k, v = (z.repeat_interleave(self.heads // self.kv_heads, dim=1) for z in (k, v))
        x = x + dense(attend(q, k, v, block.scaling).view(C, m * T, -1), *w(block.o))
        h = rms_norm(x, weights[block.norm_2], self.eps)
        return x + dense(self.activation(dense(h, *w(block.gate))) * dense(h, *w(block.up)), *w(block.down))

    def _final_norm(self, weights, x):
        return rms_norm(x, weights[self.final], self.eps)


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """x [C, N, in] · W [C, in, out] + b [C, out], every chain its own W and b (Conv1D's layout)."""
    return torch.baddbmm(b.unsqueeze(1), x, w)


def _pair_of(weights, pair: tuple[int, int | None]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A layer's (weight, bias or None) from the chains' stacked weights by their indices."""
    return weights[pair[0]], None if pair[1] is None else weights[pair[1]]


def dense(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """x [C, N, in] · Wᵀ + b for nn.Linear's W [C, out, in] and b [C, out] (or None)."""
    if b is None:
        return torch.bmm(x, w.transpose(1, 2))
    return torch.baddbmm(b.unsqueeze(1), x, w.transpose(1, 2))


def layer_norm(x: torch.Tensor, g: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm over the last dimension of [C, N, D] with chain c's gain and bias [C, D]. (Folding g and b into the
    next linear layer's weights instead measured no faster.)"""
    return torch.addcmul(b.unsqueeze(1), F.layer_norm(x, x.shape[-1:], eps=eps), g.unsqueeze(1))


def rms_norm(x: torch.Tensor, g: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm (Llama's: x / √(mean x² + ε), then the gain) of [C, N, D] with chain c's gain [C, D]."""
    return g.unsqueeze(1) * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of the first cos.shape[-1] dimensions of each head of x [B, heads, T, d] (transformers'
    ``apply_rotary_pos_emb`` with ``rotate_half``); the rest pass unchanged."""
    n = cos.shape[-1]
    part, rest = (x, None) if n == x.shape[-1] else (x[..., :n], x[..., n:])
    halves = torch.cat((-part[..., n // 2:], part[..., : n // 2]), dim=-1)
    rotated = part * cos + halves * sin
    return rotated if rest is None else torch.cat((rotated, rest), dim=-1)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float) -> torch.Tensor:
    """Causal self-attention of q, k, v [B, heads, T, d] (any strides) → [B, T, heads·d], the heads side by side.
    Scores by one ``baddbmm`` onto the causal mask (−inf above the diagonal), softmax, one ``bmm``: measured 1.3×
    faster forward and backward than ``scaled_dot_product_attention``'s CPU kernel at T = 32, d = 16."""
    B, heads, T, d = q.shape
    q, k, v = (z.reshape(B * heads, T, d) for z in (q, k, v))
    scores = torch.baddbmm(_causal_mask(T, q), q, k.transpose(1, 2), alpha=scaling)
    out = torch.bmm(torch.softmax(scores, dim=-1), v)
    return out.view(B, heads, T, d).transpose(1, 2).reshape(B, T, heads * d)


def _causal_mask(T: int, like: torch.Tensor) -> torch.Tensor:
    """[T, T]: 0 on and below the diagonal, −inf above (what position i may not attend to)."""
    return torch.full((T, T), float("-inf"), dtype=like.dtype, device=like.device).triu_(1)


def chain_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """[C] mean cross-entropy of each chain's logits [C, N, V] against its targets (IGNORE not counted)."""
    C, _, V = logits.shape
    flat = targets.reshape(C, -1)
    each = F.cross_entropy(logits.reshape(-1, V), flat.reshape(-1), ignore_index=IGNORE, reduction="none")
    return each.view(C, -1).sum(dim=1) / (flat != IGNORE).sum(dim=1)


__all__ = ["ACTIVATIONS", "FAMILIES", "Gpt2", "Llama", "NeoX", "TanhGELU", "build", "unsupported"]
