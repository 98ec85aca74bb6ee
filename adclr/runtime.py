"""What a seeded run's numbers depend on, fixed in one place: the random generators' seeds, intra-op threads
and per-image augmentation seeds.

- ``seed_everything`` / ``seeded`` seed Python's, numpy's and torch's generators (``seeded``: for a block,
  restoring them after).

- ``intra_op_threads`` sizes PyTorch's intra-op threads against the CPUs this process may actually use
  (its affinity mask and cgroup quota, shared by torchrun's local processes) less the loader workers, so
  that the main job and its workers do not oversubscribe the cores (OpenMP threads that wait for a
  descheduled sibling spin: a 2-core machine ran 9x slower with more threads than cores). An explicit
  ``OMP_NUM_THREADS`` wins. A float32 sum splits differently over a different number of threads, so the
  thread count is part of a run's result; ``configure_threads`` sets it and returns the start-up line
  that says so.
- ``SeededItems`` draws each image's augmentation from a seed of (run seed, epoch, index) alone, so
  the crops do not depend on ``--num_workers``, on which worker loads an image or on the process count.
"""

from __future__ import annotations

import contextlib
import os
import random

import numpy as np
import torch
from torch.utils.data import Dataset

THREADS_ENV = "OMP_NUM_THREADS"


def available_cpus() -> int:
    """CPUs this process may run on: its affinity mask (``taskset``), capped by a cgroup v2 CPU quota."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()
        if quota != "max":
            cpus = min(cpus, max(1, int(quota) // int(period)))
    except (OSError, ValueError):
        pass
    return cpus


def intra_op_threads(num_workers: int, cpus: int, local_processes: int = 1, env=os.environ) -> tuple[int, str]:
    """``(threads, why)``: ``OMP_NUM_THREADS`` when set, else this process's share of ``cpus`` less its
    ``num_workers`` loader workers, at least 1."""
    explicit = env.get(THREADS_ENV, "")
    if explicit.isdigit() and int(explicit) > 0:
        return int(explicit), f"{THREADS_ENV}={explicit}"
    share = max(1, cpus // max(1, local_processes))
    threads = max(1, share - num_workers)
    processes = f" / {local_processes} processes" if local_processes > 1 else ""
    return threads, f"{cpus} available CPUs{processes} - {num_workers} loader workers"


def configure_threads(num_workers: int, env=os.environ) -> str:
    """Set torch's intra-op threads by ``intra_op_threads``; returns the start-up line that reports them."""
    local_processes = int(env.get("LOCAL_WORLD_SIZE", "1") or 1)
    threads, why = intra_op_threads(num_workers, available_cpus(), local_processes, env)
    torch.set_num_threads(threads)
    return (
        f"intra-op threads: {threads} ({why}); a seeded run's numbers depend on this count "
        f"(set {THREADS_ENV} to fix it), not on the machine's load or on which worker loads an image"
    )


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def seeded(seed: int):
    """Run the block under ``seed_everything(seed)``, then restore the Python, numpy and torch CPU RNGs."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        seed_everything(seed)
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


def item_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed mixed from ``(seed, epoch, index)`` (numpy's ``SeedSequence``: nearby inputs, unrelated seeds)."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1, np.uint64)[0] >> np.uint64(1))


class SeededItems(Dataset):
    """``dataset[index]`` computed under ``item_seed(seed, epoch, index)`` (torch, numpy and Python's
    ``random``), with the caller's random state restored after: an image's augmentation is the same in
    the main process and in any loader worker. ``set_epoch`` before each epoch's iteration (workers get
    the dataset, epoch included, when the iteration starts)."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        with seeded(item_seed(self.seed, self.epoch, index)):
            return self.dataset[index]
