import torch

from fastllc.sampling.randomness import BLOCK_STEPS, CounterRandomness


def test_draws_depend_only_on_seed_chain_and_step():
    a = CounterRandomness(seed=3, n=50, batch_size=4, dim=6)
    b = CounterRandomness(seed=3, n=50, batch_size=4, dim=6)
    # b visits other chains and steps first: chain 2 at step 40 must not notice
    b.draw(0, 5), b.draw(7, 100)
    for x, y in zip(a.draw(2, 40), b.draw(2, 40)):
        assert torch.equal(x, y)
    assert not torch.equal(a.draw(2, 40)[1], a.draw(3, 40)[1])
    assert not torch.equal(a.draw(2, 40)[1], a.draw(2, 41)[1])
    assert not torch.equal(a.draw(2, 40)[1], CounterRandomness(4, 50, 4, 6).draw(2, 40)[1])


def test_step_ranges_match_single_draws_across_block_boundaries():
    rng = CounterRandomness(seed=1, n=9, batch_size=3, dim=2)
    start, length = BLOCK_STEPS - 3, BLOCK_STEPS + 7
    indices, noise = rng.draw_steps(5, start, length)
    for i in range(length):
        one_indices, one_noise = rng.draw(5, start + i)
        assert torch.equal(indices[i], one_indices) and torch.equal(noise[i], one_noise)
    assert 0 <= int(indices.min()) and int(indices.max()) < 9
