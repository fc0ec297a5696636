"""
===============================================
One GaussianMixture fitted by several processes
===============================================

A fit under ``torch.distributed`` (``torchrun``). This script is not run when the
documentation is built.

Run on one machine with 2 processes::

    torchrun --nproc_per_node=2 examples/distributed_fit.py

or on two machines (run on each; ``--node_rank`` 0 and 1, the address of node 0)::

    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=4 \\
        --master_addr=10.0.0.1 --master_port=29500 examples/distributed_fit.py

Every process loads only its own shard of the rows (here: a slice of a data
set that every process can regenerate; in practice, its own files or a slice
of a shared ``np.memmap``), and calls ``fit`` on it. Because
torch.distributed is initialised, ``GaussianMixture`` all-reduces its
sufficient statistics and log-likelihoods, and its k-means initialisation
draws global row indices, so every process ends with the same model: the one
a single process would fit on all the rows. Run without torchrun, the script
fits on all the rows in one process (and prints the same numbers).
"""

import os
import time

import numpy as np
import torch
import torch.distributed as dist
from sklearn.datasets import make_blobs

from skdeepmix import GaussianMixture


def main():
    distributed = "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1
    if distributed:
        # gloo on CPUs; "nccl" with one GPU per process (device=f"cuda:{LOCAL_RANK}")
        dist.init_process_group("gloo")
    rank = dist.get_rank() if distributed else 0
    world_size = dist.get_world_size() if distributed else 1
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))

    # The full data set (200k x 8); each process keeps only its slice of rows.
    X, _ = make_blobs(n_samples=200_000, n_features=8, centers=6, random_state=0)
    bounds = np.linspace(0, len(X), world_size + 1).astype(int)
    shard = X[bounds[rank] : bounds[rank + 1]]

    start = time.perf_counter()
    model = GaussianMixture(
        n_components=6, covariance_type="full", random_state=0, device="cpu",
        verbose=1,  # progress bar on rank 0 only
    ).fit(shard)
    seconds = time.perf_counter() - start

    # Every rank holds the same fitted model; the labels are those of its own rows.
    labels = model.predict(shard)
    print(
        f"rank {rank}/{world_size}: {len(shard)} rows, fit in {seconds:.2f} s, "
        f"{model.n_iter_} EM iterations, lower_bound_={model.lower_bound_:.6f}, "
        f"weights_={np.round(model.weights_, 4).tolist()}, labels of my rows: "
        f"{np.bincount(labels, minlength=6).tolist()}",
        flush=True,
    )
    if distributed:
        # check: the fitted means are identical on every rank
        means = torch.as_tensor(model.means_)
        gathered = [torch.empty_like(means) for _ in range(world_size)]
        dist.all_gather(gathered, means)
        if rank == 0:
            same = all(torch.equal(gathered[0], g) for g in gathered)
            print(f"identical means_ on all {world_size} ranks: {same}")
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
