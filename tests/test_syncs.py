"""No host reads per chunk or per batch in the inner loops.

On a GPU every read of a tensor's value by Python (``.item()``,
``float(t)``, ``bool(t)``, ``.tolist()``, ``.numpy()``, ...) waits for the
device; in an inner loop it serialises host and device. These tests count
such reads with a :class:`torch.overrides.TorchFunctionMode` (on the CPU,
where they are cheap but counted the same) and check that the number per EM
iteration, or per epoch of :func:`skdeepmix._train.train_epoch`, does not
grow with the number of chunks or batches.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from sklearn.datasets import make_blobs
from sklearn.exceptions import ConvergenceWarning
from torch.overrides import TorchFunctionMode

from skdeepmix import BayesianGaussianMixture, GaussianMixture
from skdeepmix._base import FitContext
from skdeepmix._distributed import RowPartition
from skdeepmix._train import train_epoch

#: tensor methods through which Python reads a value from the device
HOST_READS = {"item", "__float__", "__bool__", "__int__", "__index__", "tolist", "numpy",
              "__array__", "__format__"}


class HostReads(TorchFunctionMode):
    """Counts the host reads of tensors made while active."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", None) in HOST_READS:
            self.count += 1
        return func(*args, **(kwargs or {}))


def test_the_counter_sees_host_reads():
    t = torch.tensor([1.5, 2.0])
    with HostReads() as reads:
        float(t[0]), bool(t[1] > 1), t[0].item(), t.tolist(), t.numpy()
        t.sum() * 2  # no read
    assert reads.count == 5


def _reads_per_iteration(estimator, X, sample_weight=None):
    """Host reads made by each ``_fit_iteration`` of a fit (one list entry each)."""
    counts = []
    fit_iteration = estimator._fit_iteration

    def counted(X, ctx):
        with HostReads() as reads:
            result = fit_iteration(X, ctx)
        counts.append(reads.count)
        return result

    estimator._fit_iteration = counted
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            estimator.fit(X, sample_weight=sample_weight)
    finally:
        del estimator._fit_iteration
    return counts


@pytest.mark.parametrize("covariance_type", ["full", "tied", "diag", "spherical"])
@pytest.mark.parametrize("Estimator", [GaussianMixture, BayesianGaussianMixture])
@pytest.mark.parametrize("weighted", [False, True])
def test_em_host_reads_do_not_grow_with_the_chunks(Estimator, covariance_type, weighted):
    X, _ = make_blobs(2000, 4, centers=3, random_state=0)
    X = X.astype(np.float32)  # float32 also runs the pass's precision check
    weights = np.random.RandomState(0).uniform(0.5, 2.0, len(X)) if weighted else None
    counts = {}
    for chunk_size in (200, 50):  # 10 and 40 chunks per pass
        model = Estimator(n_components=3, covariance_type=covariance_type, max_iter=3,
                          tol=0.0, random_state=0, chunk_size=chunk_size, device="cpu")
        counts[chunk_size] = _reads_per_iteration(model, X, weights)
        assert model.history_[-1]["exact_pass"] == 0.0  # same passes in both runs
    assert len(counts[200]) == 3
    assert counts[200] == counts[50], counts
    assert max(counts[50]) <= 10, counts  # a handful per iteration


@pytest.mark.parametrize("weighted", [False, True])
def test_train_epoch_host_reads_do_not_grow_with_the_batches(weighted):
    X = torch.randn(400, 3, generator=torch.Generator().manual_seed(0))
    weights = torch.rand(400, generator=torch.Generator().manual_seed(1)) if weighted else None
    counts = {}
    for batch_size in (40, 10):  # 10 and 40 batches per epoch
        module = torch.nn.Linear(3, 1)
        # (Adam reads its step counter with .item() per step, but that counter
        # lives on the host whatever the device: no device sync)
        optimizer = torch.optim.SGD(module.parameters(), lr=1e-2, momentum=0.9)
        ctx = FitContext(device=torch.device("cpu"), dtype=torch.float32,
                         generator=torch.Generator().manual_seed(0),
                         partition=RowPartition(400, 3, None))

        def loss_fn(batch, module=module):
            return module(batch).squeeze(1).square()

        with HostReads() as reads:
            train_epoch(loss_fn, optimizer, X, ctx, batch_size=batch_size, phase="test",
                        sample_weight=weights, max_grad_norm=1.0)
        counts[batch_size] = reads.count
    assert counts[40] == counts[10], counts


@pytest.mark.parametrize("covariance_type", ["full", "tied", "diag", "spherical"])
@pytest.mark.parametrize("Estimator", [GaussianMixture, BayesianGaussianMixture])
def test_prediction_host_reads_do_not_grow_with_the_chunks(Estimator, covariance_type):
    X, _ = make_blobs(2000, 4, centers=3, random_state=0)
    X = X.astype(np.float32)
    counts = {}
    for chunk_size in (200, 50):  # 10 and 40 chunks per call
        model = Estimator(n_components=3, covariance_type=covariance_type, max_iter=3,
                          tol=0.0, random_state=0, chunk_size=chunk_size, device="cpu")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            model.fit(X)
        with HostReads() as reads:
            model.score_samples(X), model.predict_proba(X), model.predict(X)
        counts[chunk_size] = reads.count
    assert counts[200] == counts[50], counts
