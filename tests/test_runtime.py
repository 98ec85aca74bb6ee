"""What a seeded run depends on: intra-op threads sized against the CPUs and loader workers, and each
image's augmentation drawn from (seed, epoch, index), so ``--num_workers`` does not change a run."""

import random

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from adclr.runtime import SeededItems, configure_threads, intra_op_threads


@pytest.mark.parametrize(
    "workers, cpus, processes, env, expected",
    [
        (2, 2, 1, {}, 1),  # the default run on a 2-core machine: the workers get the other core
        (0, 2, 1, {}, 2),
        (2, 16, 1, {}, 14),
        (2, 16, 2, {}, 6),  # torchrun with 2 local processes: 8 CPUs each, less 2 workers
        (8, 4, 1, {}, 1),  # more workers than CPUs: still one thread
        (2, 16, 1, {"OMP_NUM_THREADS": "3"}, 3),  # an explicit setting wins
        (2, 16, 1, {"OMP_NUM_THREADS": ""}, 14),
    ],
)
def test_threads_are_the_process_share_of_the_cpus_less_its_workers(workers, cpus, processes, env, expected):
    threads, why = intra_op_threads(workers, cpus, processes, env)
    assert threads == expected
    assert ("OMP_NUM_THREADS" in why) == bool(env.get("OMP_NUM_THREADS"))


def test_configure_threads_sets_and_reports_them(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.setattr("adclr.runtime.available_cpus", lambda: 5)
        line = configure_threads(2, env={})
        assert torch.get_num_threads() == 3
        assert line.startswith("intra-op threads: 3 (5 available CPUs - 2 loader workers)")
    finally:
        torch.set_num_threads(before)


class _Draws(Dataset):
    """Each item: draws from torch, numpy and Python's random, as an augmentation might make them."""

    def __len__(self):
        return 12

    def __getitem__(self, index):
        return torch.tensor([torch.rand(()).item(), np.random.rand(), random.random(), index], dtype=torch.float64)


def _epoch(dataset, workers):
    loader = DataLoader(dataset, batch_size=4, num_workers=workers, shuffle=False)
    return torch.cat(list(loader))


def test_an_items_draws_depend_on_seed_epoch_and_index_not_on_the_worker():
    dataset = SeededItems(_Draws(), seed=7)
    main = _epoch(dataset, 0)
    assert torch.equal(main, _epoch(dataset, 2))  # worker processes draw what the main process draws
    assert len(set(main[:, :3].flatten().tolist())) == main[:, :3].numel()  # every draw differs
    assert torch.equal(dataset[5], main[5])  # an item alone, out of order, is the same item
    dataset.set_epoch(1)
    next_epoch = _epoch(dataset, 2)
    assert not torch.isin(next_epoch[:, :3], main[:, :3]).any()  # a new epoch, new draws
    dataset.set_epoch(0)
    assert torch.equal(_epoch(SeededItems(_Draws(), seed=7), 0), main)
    assert not torch.isin(_epoch(SeededItems(_Draws(), seed=8), 0)[:, :3], main[:, :3]).any()


def test_the_callers_random_state_is_left_alone():
    torch.manual_seed(3)
    random.seed(3)
    np.random.seed(3)
    expected = (torch.rand(()).item(), random.random(), np.random.rand())
    torch.manual_seed(3)
    random.seed(3)
    np.random.seed(3)
    SeededItems(_Draws(), seed=0)[4]
    assert (torch.rand(()).item(), random.random(), np.random.rand()) == expected
