import pytest
import torch

from fastllc import FastLLCError, make_task
from fastllc.tasks import random_commutative_table


@pytest.mark.parametrize("p", [2, 7, 23])
def test_addition_labels_cover_all_pairs(p):
    task = make_task(p, "add")
    assert task.pairs.shape == (p * p, 2)
    assert torch.equal(task.labels, (task.pairs[:, 0] + task.pairs[:, 1]) % p)
    assert len({tuple(x) for x in task.pairs.tolist()}) == p * p


@pytest.mark.parametrize("p", [2, 3, 10, 31])
def test_random_table_is_symmetric_seeded_and_in_range(p):
    table = random_commutative_table(p, seed=4)
    assert torch.equal(table, table.T)
    assert torch.equal(table, random_commutative_table(p, seed=4))
    assert 0 <= int(table.min()) and int(table.max()) < p
    if p >= 10:
        assert not torch.equal(table, random_commutative_table(p, seed=5))
        assert len(table.unique()) > p // 2  # uniform labels: most values appear


def test_random_task_labels_come_from_the_table():
    task = make_task(11, "random", seed=3)
    table = random_commutative_table(11, seed=3)
    assert torch.equal(task.labels, table[task.pairs[:, 0], task.pairs[:, 1]])


def test_split_is_seeded_disjoint_and_sized():
    task = make_task(23, "add", seed=7)
    assert task.n_train == round(0.8 * 23 * 23)
    assert len(set(task.train.tolist()) | set(task.test.tolist())) == 23 * 23
    assert not set(task.train.tolist()) & set(task.test.tolist())
    assert torch.equal(task.train, make_task(23, "add", seed=7).train)
    assert not torch.equal(task.train, make_task(23, "add", seed=8).train)


@pytest.mark.parametrize("p,kind,message", [(1, "add", "p must be at least 2"), (5, "mul", "unknown task")])
def test_bad_tasks_are_refused(p, kind, message):
    with pytest.raises(FastLLCError, match=message):
        make_task(p, kind)


def test_split_seed_fixed_is_seed_0_and_unknown_split_is_refused():
    from fastllc.tasks import split_seed
    assert [split_seed(s, "per-seed") for s in (0, 4)] == [0, 4] and [split_seed(s, "fixed") for s in (0, 4)] == [0, 0]
    with pytest.raises(FastLLCError, match="^unknown split 'one'; choose one of per-seed, fixed$"):
        split_seed(1, "one")
