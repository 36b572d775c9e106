"""GPT-2's forward and backward for C chains folded into the batch, without autograd (``Gpt2Pass``), its large
activations in buffers kept from step to step (``Workspace``): what ``engines/transformer.py``'s
``Gpt2.losses_and_gradients`` runs."""

from __future__ import annotations

import torch

from .transformer_ops import IGNORE, causal_mask, tanh_gelu_into

class Workspace:
    """Tensors reused every step, by name and shape, allocated at first use: fresh allocations of megabytes cost page
    faults every step once the allocator hands the memory back. One per thread, shared by the folded batches it runs
    one after another (a batch needs them only during its own step): one set of buffers stays warmer in the cache
    than one per batch."""

    def __init__(self, generator: torch.Generator | None = None):
        self.tensors: dict[tuple, torch.Tensor] = {}
        self.generator = generator  # dropout masks (None: torch's global generator)

    def __call__(self, name: str, *shape: int, dtype=torch.float32) -> torch.Tensor:
        tensor = self.tensors.get((name, shape, dtype))
        if tensor is None:
            tensor = self.tensors[name, shape, dtype] = torch.empty(shape, dtype=dtype)
        return tensor


class Gpt2Pass:
    """One forward and backward of ``Gpt2`` over C chains' minibatches [C, m, T] (see ``losses_and_gradients``).

    Forward as ``Gpt2.losses`` with differences of layout only: the final norm and the unembedding run over all T
    positions (the last predicts nothing: its target is IGNORE, its gradient zero), and every large activation lives
    in ``buffers``. Backward: per linear layer ∇b = Σ_tokens ∇y, ∇W = xᵀ·∇y straight into the gradient buffer,
    ∇x = ∇y·Wᵀ (transposed views: MKL ran each of these products within ±5% of the same on contiguous copies,
    interleaved, one thread); the tanh-GELU's slope kept from the forward; the cross-entropy's ∇logits =
    (softmax − onehot)/n_c. Layer norm, its backward (the gain's and bias's sums, the residual's gradient added),
    attention from the fused q | k | v and its backward, and the tanh-GELU run in the fused CPU passes
    (``engine.kernels``, ``transformer_cpu.Kernels``) where they build, else as ATen's operations (``native_layer_norm``
    and its backward; q | k | v copied once into [3, C·m·heads, T, d], scores by ``baddbmm`` onto the causal mask,
    softmax, ``bmm``, differentiated as autograd does; ``tanh_gelu_into``). In training mode (``engine.dropout``)
    GPT-2's dropout after the embedding, on the attention's probabilities (then the attention is ATen's: the fused
    kernels have none) and after both output projections, its masks applied forward and backward."""

    def __init__(self, engine, weights, grads, buffers: Workspace):
        self.engine, self.weights, self.grads, self.buffer = engine, weights, grads, buffers
        self.kernels = engine.kernels  # the fused CPU passes (``transformer_cpu.Kernels``), or None: ATen's operations

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
        embedded = self._dropout("embedded", x, e.dropout.embedded)
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
        if embedded is not None:  # the embedding dropout's mask, already scaled by 1/(1 − p)
            grad.mul_(embedded)
        grad_positions = self.grads[e.wpe]
        torch.sum(grad.view(C, m, T, D), dim=1, out=grad_positions[:, :T])
        grad_positions[:, T:].zero_()
        lookup = torch.ops.aten.embedding_dense_backward(grad.view(-1, D), rows, C * V, -1, False).view(C, V, D)
        if e.wte == e.unembed:  # tied: the lookup's gradient adds to the unembedding's, as autograd accumulates them
            self.grads[e.wte].add_(lookup)
        else:
            self.grads[e.wte].copy_(lookup)
        return losses

    def _dropout(self, name: str, x: torch.Tensor, p: float) -> torch.Tensor | None:
        """Dropout of ``x`` in place (training mode): its mask, scaled by 1/(1 − p), from the workspace's generator
        (the caller seeds it) or else torch's global one (as nn.Dropout draws); None where p is 0. ``masks`` (tests)
        records each mask by name."""
        if not p:
            return None
        mask = self.buffer(f"{name}.dropout", *x.shape)
        torch.rand(x.shape, out=mask, generator=self.buffer.generator).ge_(p).mul_(1 / (1 - p))
        if self.engine.masks is not None:
            self.engine.masks[name] = mask.clone()
        x.mul_(mask)
        return mask

    def _masked(self, name: str, grad: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """∇ through a dropout: ``grad`` times its mask into the buffer ``name`` (``grad`` itself without one)."""
        return grad if mask is None else torch.mul(grad, mask, out=self.buffer(name, *grad.shape))

    def _norm(self, name: str, x: torch.Tensor, pair: tuple[int, int]):
        """LayerNorm with chain c's gain and bias; (its output, what its backward needs)."""
        gain, bias = self.weights[pair[0]], self.weights[pair[1]]
        out = self.buffer(name, *x.shape)
        if self.kernels:
            mean, rstd = self.buffer(f"{name}.mean", *x.shape[:2]), self.buffer(f"{name}.rstd", *x.shape[:2])
            self.kernels.layer_norm(x, gain, bias, self.engine.eps, out, mean, rstd)
            return out, (x, mean, rstd)
        normalised, mean, rstd = torch.native_layer_norm(x, x.shape[-1:], None, None, self.engine.eps)
        return torch.addcmul(bias.unsqueeze(1), normalised, gain.unsqueeze(1), out=out), (x, normalised, mean, rstd)

    def _norm_backward(self, grad: torch.Tensor, kept, pair: tuple[int, int], residual: torch.Tensor | None = None):
        """∇x of ``_norm`` from ∇output (overwritten), plus ``residual`` (the skip connection's gradient) where given;
        the gain's and bias's gradients into the buffer."""
        gain, grad_gain, grad_bias = self.weights[pair[0]], self.grads[pair[0]], self.grads[pair[1]]
        if self.kernels:
            x, mean, rstd = kept
            self.kernels.layer_norm_backward(grad, x, mean, rstd, gain, residual, grad, grad_gain, grad_bias)
            return grad
        x, normalised, mean, rstd = kept
        product = torch.mul(grad, normalised, out=self.buffer("norm_product", *x.shape))
        torch.sum(product, dim=1, out=grad_gain)
        torch.sum(grad, dim=1, out=grad_bias)
        grad.mul_(gain.unsqueeze(1))
        grad_x = torch.ops.aten.native_layer_norm_backward(grad, x, x.shape[-1:], mean, rstd, None, None,
                                                           [True, False, False])[0]
        return grad_x if residual is None else grad_x.add_(residual)

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

    def _block(self, layer: int, block, x: torch.Tensor):
        buf = self.buffer
        a1, norm_1 = self._norm(f"{layer}.a1", x, block.ln_1)
        qkv = self._linear(f"{layer}.qkv" if self.kernels else "qkv", a1, block.c_attn)
        attended, attention = self._attention(layer, qkv, block.scaling)
        x_mid = self._linear(f"{layer}.x_mid", attended, block.attn_proj)
        attention_out = self._dropout(f"{layer}.attention_out", x_mid, self.engine.dropout.residual)
        x_mid.add_(x)
        a2, norm_2 = self._norm(f"{layer}.a2", x_mid, block.ln_2)
        hidden = self._linear("hidden", a2, block.c_fc)
        activation, slope = buf(f"{layer}.activation", *hidden.shape), buf(f"{layer}.slope", *hidden.shape)
        if self.kernels:
            self.kernels.tanh_gelu(hidden, activation, slope)
        else:
            tanh_gelu_into(hidden, activation, slope, buf("gelu_scratch", *hidden.shape))
        x_out = self._linear(f"{layer + 1}.x", activation, block.mlp_proj)
        mlp_out = self._dropout(f"{layer}.mlp_out", x_out, self.engine.dropout.residual)
        x_out.add_(x_mid)
        return x_out, (norm_1, a1, attention, attended, norm_2, a2, activation, slope, attention_out, mlp_out)

    def _block_backward(self, block, kept, grad: torch.Tensor) -> torch.Tensor:
        """∇ of the block's input from ∇ of its output (``grad``, read only)."""
        norm_1, a1, attention, attended, norm_2, a2, activation, slope, attention_out, mlp_out = kept
        grad_hidden = self._linear_backward("grad_activation", self._masked("grad_mlp_out", grad, mlp_out), activation,
                                            block.mlp_proj).mul_(slope)
        grad_a2 = self._linear_backward("grad_a2", grad_hidden, a2, block.c_fc)
        grad_mid = self._norm_backward(grad_a2, norm_2, block.ln_2, residual=grad)
        grad_attended = self._linear_backward("grad_attended", self._masked("grad_attention_out", grad_mid, attention_out),
                                              attended, block.attn_proj)
        grad_qkv = self._attention_backward(attention, grad_attended, block.scaling)
        grad_a1 = self._linear_backward("grad_a1", grad_qkv, a1, block.c_attn)
        return self._norm_backward(grad_a1, norm_1, block.ln_1, residual=grad_mid)

    def _attention(self, layer: int, qkv: torch.Tensor, scaling: float):
        """Causal attention of the fused q | k | v [C, m·T, 3·D]: (the attended values [C, m·T, D], what the
        backward needs)."""
        buf = self.buffer
        C, m, T, D = self.shape
        B, heads = C * m, self.engine.heads
        d = D // heads
        probabilities = buf(f"{layer}.probabilities", B * heads, T, T)
        attended = buf(f"{layer}.attended", C, m * T, D)
        if self._fused_attention():
            self.kernels.causal_attention(qkv.view(B, T, 3 * D), heads, scaling, probabilities,
                                          attended.view(B, T, D))
            return attended, (qkv, probabilities, None, None)
        q_k_v = buf(f"{layer}.q_k_v", 3, B * heads, T, d)
        q_k_v.view(3, B, heads, T, d).copy_(qkv.view(B, T, 3, heads, d).permute(2, 0, 3, 1, 4))
        q, k, v = q_k_v
        scores = torch.baddbmm(self._causal_mask(T), q, k.transpose(1, 2), alpha=scaling,
                               out=buf("scores", B * heads, T, T))
        torch._softmax(scores, -1, False, out=probabilities)
        weights, mask = probabilities, None
        if self.engine.dropout.attention:  # dropout on the probabilities (GPT2Attention's attn_dropout)
            weights = buf(f"{layer}.weights", B * heads, T, T).copy_(probabilities)
            mask = self._dropout(f"{layer}.attention", weights, self.engine.dropout.attention)
        values = torch.bmm(weights, v, out=buf("values", B * heads, T, d))
        attended.view(B, T, heads, d).copy_(values.view(B, heads, T, d).transpose(1, 2))
        return attended, (q_k_v, probabilities, mask, weights)

    def _fused_attention(self) -> bool:
        """Whether the attention runs in the fused kernels: they have no dropout on the probabilities."""
        return self.kernels is not None and not self.engine.dropout.attention

    def _attention_backward(self, kept, grad_attended: torch.Tensor, scaling: float) -> torch.Tensor:
        """∇ of ``_attention``'s q | k | v [C, m·T, 3·D] from ∇ of the attended values."""
        buf = self.buffer
        C, m, T, D = self.shape
        B, heads = C * m, self.engine.heads
        d = D // heads
        grad_qkv = buf("grad_qkv", C, m * T, 3 * D)
        if self._fused_attention():
            qkv, probabilities, _, _ = kept
            self.kernels.causal_attention_backward(qkv.view(B, T, 3 * D), heads, scaling, probabilities,
                                                   grad_attended.view(B, T, D), grad_qkv.view(B, T, 3 * D))
            return grad_qkv
        (q, k, v), probabilities, mask, weights = kept
        grad_values = buf("grad_values", B * heads, T, d)
        grad_values.view(B, heads, T, d).copy_(grad_attended.view(B, T, heads, d).transpose(1, 2))
        grad_q_k_v = buf("grad_q_k_v", 3, B * heads, T, d)
        grad_q, grad_k, grad_v = grad_q_k_v
        grad_probabilities = torch.bmm(grad_values, v.transpose(1, 2), out=buf("grad_probabilities", B * heads, T, T))
        torch.bmm(weights.transpose(1, 2), grad_values, out=grad_v)
        if mask is not None:
            grad_probabilities.mul_(mask)
        grad_scores = torch.ops.aten._softmax_backward_data.out(grad_probabilities, probabilities, -1, torch.float32,
                                                                grad_input=buf("grad_scores", B * heads, T, T))
        torch.bmm(grad_scores, k, out=grad_q).mul_(scaling)
        torch.bmm(grad_scores.transpose(1, 2), q, out=grad_k).mul_(scaling)
        grad_qkv.view(B, T, 3, heads, d).copy_(grad_q_k_v.view(3, B, heads, T, d).permute(1, 3, 0, 2, 4))
        return grad_qkv

    def _causal_mask(self, T: int) -> torch.Tensor:
        key = ("mask", (T, T), torch.float32)
        if key not in self.buffer.tensors:
            self.buffer.tensors[key] = causal_mask(T, self.weights[0])
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
