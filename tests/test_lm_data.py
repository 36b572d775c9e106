"""fastllc.lm.data: token data, the next-token loss against a hand computation, L_n(w*) in chunks."""

import math

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from fastllc.errors import FastLLCError
from fastllc.lm import IGNORE, CausalLM, loss_at, next_token_loss, token_data

from lm_models import VOCAB, gpt2, tokens


def hand_loss(logits, toks, mask):
    """Σ over predicted positions of −log softmax(logits[i, t])[toks[i, t+1]], / their count: plain loops."""
    total, count = 0.0, 0
    for i in range(toks.shape[0]):
        for t in range(toks.shape[1] - 1):
            if mask[i, t + 1]:
                row = logits[i, t].double()
                total += -(row[toks[i, t + 1]] - torch.logsumexp(row, 0)).item()
                count += 1
    return total / count


@pytest.mark.parametrize("n,length", [(1, 2), (3, 7), (5, 17)])  # awkward shapes: one sequence, primes, 2^k+1
def test_next_token_loss_equals_hand_computation(n, length):
    toks = torch.randint(0, 11, (n, length))
    mask = torch.rand(n, length) < 0.6
    mask[:, 1] = True  # every sequence predicts something
    logits = torch.randn(n, length - 1, 11)
    data = token_data(toks, loss_mask=mask)
    # fp32 log-softmax against a float64 hand loop: a few ulps of a number ~3
    assert next_token_loss(logits, data.targets).item() == pytest.approx(hand_loss(logits, toks, mask), rel=1e-6)


def test_token_data_shifts_and_masks():
    toks = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    mask = torch.tensor([[1, 1, 0, 1], [0, 0, 1, 1]])
    data = token_data(toks, loss_mask=mask)
    assert data.tokens.tolist() == toks.tolist()
    assert data.targets.tolist() == [[2, IGNORE, 4], [IGNORE, 7, 8]]
    assert data.predicted_tokens == 4 and len(data) == 2


def test_token_data_from_dataset_column_and_loader():
    toks = tokens(10)
    assert torch.equal(token_data({"input_ids": toks.tolist()}).tokens, toks)
    rows = [{"input_ids": toks[i], "attention_mask": torch.ones(toks.shape[1], dtype=torch.long)} for i in range(10)]
    rows[3]["attention_mask"][-5:] = 0
    data = token_data(DataLoader(rows, batch_size=4))
    assert torch.equal(data.tokens, toks)
    assert (data.targets[3, -5:] == IGNORE).all() and (data.targets[2] != IGNORE).all()
    assert torch.equal(token_data(DataLoader(TensorDataset(toks), batch_size=3)).tokens, toks)


@pytest.mark.parametrize("bad,match", [
    (torch.zeros(3, 4), "integer token ids"),
    (torch.zeros(4, dtype=torch.long), "integer token ids"),
    (torch.zeros(3, 1, dtype=torch.long), "at least 2 tokens"),
    (torch.full((2, 3), VOCAB), "must lie in"),
    ({"text": ["a"]}, "input_ids"),
    ({"input_ids": [[1, 2], [3]]}, "equal length"),
])
def test_token_data_refuses_bad_input(bad, match):
    with pytest.raises(FastLLCError, match=match):
        token_data(bad, vocab_size=VOCAB)


def test_loss_mask_leaving_a_sequence_empty_is_refused():
    with pytest.raises(FastLLCError, match="sequence 1 with no predicted token"):
        token_data(tokens(3, 5), loss_mask=torch.tensor([[1] * 5, [1, 0, 0, 0, 0], [1] * 5]))
    with pytest.raises(FastLLCError, match="loss_mask has shape"):
        token_data(tokens(3, 5), loss_mask=torch.ones(3, 4))


@pytest.mark.parametrize("chunk", [1, 5, 7, 1000])
def test_loss_at_in_chunks_equals_the_token_weighted_mean(chunk):
    model = gpt2().eval()
    toks = tokens(13)
    mask = torch.rand(13, toks.shape[1]) < 0.5
    mask[:, 1] = True
    data = token_data(toks, loss_mask=mask)
    lm = CausalLM(model)
    with torch.no_grad():
        expected = hand_loss(lm(toks), toks, mask)
    # fp32 logits, float64 sums in both; chunking changes only the order of the float64 additions
    assert loss_at(lm, data, chunk=chunk) == pytest.approx(expected, rel=1e-6)
    with torch.no_grad():
        first = hand_loss(lm(toks[:4]), toks[:4], mask[:4])
    assert loss_at(lm, data, sequences=4, chunk=chunk) == pytest.approx(first, rel=1e-6)


def test_loss_at_equals_transformers_own_labels_loss():
    model = gpt2().eval()
    toks = tokens(6)
    with torch.no_grad():
        theirs = model(input_ids=toks, labels=toks).loss.item()
    assert loss_at(CausalLM(model), token_data(toks)) == pytest.approx(theirs, rel=1e-6)
    assert math.isfinite(theirs)


def test_a_lazy_column_of_a_newer_datasets_is_read_as_its_rows():
    """datasets ≥ 4 returns ``dataset["input_ids"]`` as a lazy Column (iterable, not a list): read row by row."""
    class Column:
        def __init__(self, rows):
            self.rows = rows

        def __iter__(self):
            return iter(self.rows)

    class Dataset:
        def __getitem__(self, name):
            return Column([[1, 2, 3], [4, 5, 6]])

    assert torch.equal(token_data(Dataset()).tokens, torch.tensor([[1, 2, 3], [4, 5, 6]]))
