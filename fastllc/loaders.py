"""A DataLoader's dataset as tensors, once: every fastllc backend draws its own minibatches from them.

Chains draw minibatches with replacement by counter-based randomness (``sampling/randomness.py``), so
only the *dataset* matters: the loader's sampler, shuffling and ``drop_last`` are ignored, and its
``collate_fn`` is applied to build the tensors. The whole dataset is held in memory (on the sampling
device); a dataset whose items do not collate into tensors is refused with a clear message.
"""

from __future__ import annotations

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten
from torch.utils.data import DataLoader, IterableDataset, TensorDataset
from torch.utils.data._utils.collate import default_collate

from .errors import FastLLCError

_CHUNK = 1024  # examples collated per batch while materialising: the size only affects speed


def is_loader(data) -> bool:
    return isinstance(data, DataLoader)


def materialise(loader: DataLoader):
    """The loader's whole dataset as one batch: the structure of one of its batches, leaves with n rows."""
    dataset = loader.dataset
    if isinstance(dataset, TensorDataset) and loader.collate_fn is default_collate:
        return list(dataset.tensors)  # what default_collate makes of a TensorDataset's items: a list
    if isinstance(dataset, IterableDataset):
        batches = iter(loader)  # no random access: one pass over the loader itself
    else:
        batches = iter(DataLoader(dataset, batch_size=_CHUNK, shuffle=False, collate_fn=loader.collate_fn))
    structure, columns = None, None
    for batch in batches:
        leaves, spec = tree_flatten(batch)
        bad = [type(leaf).__name__ for leaf in leaves if not isinstance(leaf, torch.Tensor)]
        if bad:
            raise FastLLCError(f"cannot turn the DataLoader's dataset into tensors: its batches hold a {bad[0]}; "
                               "pass tensors (inputs, targets) or a dataset whose items collate into tensors")
        if structure is None:
            structure, columns = spec, [[] for _ in leaves]
        elif spec != structure:
            raise FastLLCError("the DataLoader's batches do not all have the same structure")
        for column, leaf in zip(columns, leaves):
            column.append(leaf)
    if structure is None:
        raise FastLLCError("the DataLoader's dataset is empty")
    tensors = [torch.cat(column) for column in columns]
    if len({len(t) for t in tensors}) != 1:
        raise FastLLCError("the tensors of the DataLoader's batches have different numbers of rows")
    return tree_unflatten(tensors, structure)


def as_pair(data) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) from a materialised dataset or a given pair; a clear error for anything else."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        return data[0], data[1]
    raise FastLLCError("data must be a pair (inputs, targets) of tensors, or a DataLoader whose batches are such "
                       "pairs (for other batch structures use fastllc.compat.devinterp with an evaluate function)")
