"""Token data and the language-model loss: what every chain of an LM run evaluates.

A data set of N token sequences of length T becomes the pair fastllc's backends draw minibatches from:
inputs = tokens [N, T] (int64) and targets [N, T−1] (int64), targets[i, t] = tokens[i, t+1], the token
predicted at position t, or ``IGNORE`` (−100) where the loss mask is off. The loss of a minibatch B is

    L_B(w) = Σ_{i∈B} Σ_t m[i,t+1] · (−log p_w(x[i,t+1] | x[i,≤t])) / Σ_{i∈B} Σ_t m[i,t+1],

the next-token cross-entropy averaged over the predicted tokens of the minibatch (``next_token_loss``,
which is ``F.cross_entropy(..., ignore_index=-100)``: the same mean Hugging Face's ``labels=`` loss
takes). The mask m [N, T] says which tokens are predicted (default: every token after the first); m[:, 0]
is never read (nothing predicts the first token). L_n(w*) is the same token-weighted mean over all (or a
stated number of leading) sequences, computed in chunks without autograd (``loss_at``).

``tokens`` may be a LongTensor [N, T], a ``datasets.Dataset`` (or anything indexable by the column name)
with an ``input_ids`` column of equal-length sequences, or a DataLoader whose batches are such tensors or
dicts with ``input_ids`` (and optionally ``loss_mask``/``attention_mask``, read as the loss mask).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from ..errors import FastLLCError
from ..sampling.threads import single_threaded_torch

IGNORE = -100  # F.cross_entropy's ignore_index: a position that is not predicted


@dataclass(frozen=True)
class TokenData:
    """N sequences as the (inputs, targets) pair of ``estimate``: tokens [N, T] and targets [N, T−1]."""
    tokens: torch.Tensor  # int64 [N, T]
    targets: torch.Tensor  # int64 [N, T−1]: the next token, or IGNORE where the loss mask is off

    @property
    def pair(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.tokens, self.targets

    @property
    def predicted_tokens(self) -> int:
        return int((self.targets != IGNORE).sum())

    def __len__(self) -> int:
        return len(self.tokens)


def token_data(tokens, loss_mask=None, vocab_size: int | None = None) -> TokenData:
    """``tokens`` (module docstring) and an optional bool/0-1 ``loss_mask`` [N, T] as ``TokenData``; every
    token checked against ``vocab_size`` when given, every sequence must predict at least one token."""
    if isinstance(tokens, TokenData):
        return tokens
    if isinstance(tokens, DataLoader):
        tokens, loader_mask = _from_loader(tokens)
        loss_mask = loader_mask if loss_mask is None else loss_mask
    elif not isinstance(tokens, torch.Tensor):
        tokens = _column(tokens, "input_ids")
    if tokens.dim() != 2 or tokens.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise FastLLCError(f"tokens must be integer token ids of shape [sequences, length], got "
                           f"{tokens.dtype} {tuple(tokens.shape)}")
    tokens = tokens.long().cpu()
    N, T = tokens.shape
    if N == 0 or T < 2:
        raise FastLLCError(f"tokens has shape {(N, T)}: need at least one sequence of at least 2 tokens "
                           "(the loss predicts each token from the ones before it)")
    if bool((tokens < 0).any()) or (vocab_size is not None and bool((tokens >= vocab_size).any())):
        raise FastLLCError(f"tokens must lie in [0, {vocab_size if vocab_size is not None else 'vocab'}), got "
                           f"values from {int(tokens.min())} to {int(tokens.max())}")
    targets = tokens[:, 1:].clone()
    if loss_mask is not None:
        mask = torch.as_tensor(loss_mask).cpu()
        if tuple(mask.shape) != (N, T):
            raise FastLLCError(f"loss_mask has shape {tuple(mask.shape)}, tokens {(N, T)}; give one flag per token")
        if mask.dtype != torch.bool:
            if not bool(((mask == 0) | (mask == 1)).all()):
                raise FastLLCError("loss_mask must be boolean (or 0/1)")
            mask = mask != 0
        targets[~mask[:, 1:]] = IGNORE
        empty = (~mask[:, 1:].any(dim=1)).nonzero().flatten().tolist()
        if empty:
            raise FastLLCError(f"loss_mask leaves sequence {empty[0]} with no predicted token (mask[:, 1:] all "
                               "False); drop such sequences")
    return TokenData(tokens, targets)


def _column(dataset, name: str) -> torch.Tensor:
    try:
        column = dataset[name]
    except (KeyError, TypeError, IndexError):
        raise FastLLCError(f"tokens must be a LongTensor [N, T], a dataset with an {name!r} column or a "
                           f"DataLoader, got {type(dataset).__name__}") from None
    if isinstance(column, torch.Tensor):
        return column
    try:  # a list of lists, an array; datasets ≥ 4 gives a lazy Column, which torch takes once listed
        return torch.as_tensor(column if isinstance(column, (list, tuple)) or hasattr(column, "__array__")
                               else list(column))
    except (ValueError, TypeError):
        raise FastLLCError(f"the {name!r} column must hold sequences of equal length (pad or chunk them "
                           "first)") from None


def _from_loader(loader: DataLoader) -> tuple[torch.Tensor, torch.Tensor | None]:
    tokens, masks = [], []
    for batch in loader:
        if isinstance(batch, dict):
            tokens.append(torch.as_tensor(batch["input_ids"]))
            mask = batch.get("loss_mask", batch.get("attention_mask"))
            masks.append(None if mask is None else torch.as_tensor(mask))
        elif isinstance(batch, torch.Tensor):
            tokens.append(batch)
            masks.append(None)
        elif isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
            tokens.append(batch[0])  # a TensorDataset of one tensor collates to [tensor]
            masks.append(None)
        else:
            raise FastLLCError(f"a DataLoader of token data must yield token tensors or dicts with 'input_ids', "
                               f"got {type(batch).__name__}")
    if not tokens:
        raise FastLLCError("the DataLoader yielded no batches")
    if any(m is None for m in masks) and not all(m is None for m in masks):
        raise FastLLCError("some of the DataLoader's batches carry a mask and some do not")
    return torch.cat(tokens), None if masks[0] is None else torch.cat(masks)


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the predicted tokens: ``logits`` [B, T−1, V] (position t predicts
    token t+1), ``targets`` [B, T−1] with IGNORE where not predicted."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE)


@torch.no_grad()
def loss_at(model: torch.nn.Module, data: TokenData, sequences: int | None = None, chunk: int = 256) -> float:
    """L_n at the model's current weights over the first ``sequences`` sequences (default: all), in chunks
    of ``chunk`` sequences, without autograd: Σ token losses (float64) / predicted tokens.

    ``model`` maps tokens [B, T] to next-token logits [B, T−1, V] (``models.CausalLM``). One torch thread, as
    the backends' own pass at w*: measured on a busy 2-core CPU (1,024 sequences of a tiny GPT-2), 0.27 s on
    one thread against 2.6 s on two (intra-op threads on small ops stall when the cores are shared), and the
    value does not depend on the machine's thread count."""
    with single_threaded_torch():
        return _loss_at(model, data, sequences, chunk)


def _loss_at(model, data: TokenData, sequences, chunk) -> float:
    n = len(data) if sequences is None else min(int(sequences), len(data))
    total, count = torch.zeros((), dtype=torch.float64), 0
    for lo in range(0, n, chunk):
        hi = min(lo + chunk, n)
        targets = data.targets[lo:hi]
        logits = model(data.tokens[lo:hi])
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE,
                                 reduction="sum").double()
        count += int((targets != IGNORE).sum())
    return float(total / count)
