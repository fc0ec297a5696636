"""Run a function on two gloo processes and collect what each returns.

Shared by the tests of ``torch.distributed`` fits. The processes are spawned
(fresh interpreters, one torch thread each) and meet through a file store in
a temporary folder, so that no TCP port is raced for with other test runs.
"""

from __future__ import annotations

import pickle
import tempfile
import time
from pathlib import Path

import pytest
import torch

WORLD_SIZE = 2


def _gloo_threads():
    """Names of this process's gloo threads (Linux; ``[]`` elsewhere)."""
    tasks = Path("/proc/self/task")
    if not tasks.is_dir():
        return []
    names = []
    for task in tasks.iterdir():
        try:
            names.append((task / "comm").read_text().strip())
        except OSError:  # the thread ended meanwhile
            pass
    return sorted(name for name in names if "gloo" in name)


def _entry(rank, fn, world_size, out_dir):
    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo", init_method=(Path(out_dir) / "store").as_uri(), rank=rank,
        world_size=world_size)
    try:
        result = fn(rank)
    finally:
        torch.distributed.destroy_process_group()
    # a group kept alive past destroy_process_group() leaves gloo's threads
    # running into interpreter shutdown, where they can abort the process
    leftover = _gloo_threads()
    (Path(out_dir) / f"rank{rank}.pkl").write_bytes(pickle.dumps((result, leftover)))


def run_on_ranks(fn, world_size=WORLD_SIZE, timeout=600):
    """``[fn(0), fn(1), ...]``, each called in its own process of one gloo group.

    ``fn`` must be a module-level function (it is pickled by reference) that
    takes the rank. Skips the test where gloo is unavailable; fails it, instead
    of hanging, when the processes do not finish within ``timeout`` seconds,
    and when a process's gloo threads still run after
    ``destroy_process_group()`` (the group was kept alive; see
    ``skdeepmix._distributed._import_torch_functional_collectives``).
    """
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available")
    with tempfile.TemporaryDirectory() as out_dir:
        context = torch.multiprocessing.start_processes(
            _entry, args=(fn, world_size, out_dir), nprocs=world_size, join=False,
            start_method="spawn")
        deadline = time.monotonic() + timeout
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                for process in context.processes:
                    process.kill()
                pytest.fail(f"the distributed workers did not finish within {timeout} s")
        ranks = [pickle.loads((Path(out_dir) / f"rank{rank}.pkl").read_bytes())
                 for rank in range(world_size)]
    for rank, (_, leftover) in enumerate(ranks):
        assert not leftover, (
            f"rank {rank}: gloo threads {leftover} still ran after destroy_process_group()")
    return [result for result, _ in ranks]
