"""What the two EM benchmarks share: the machine's peaks, the cost model of an
EM iteration, marginal timings and markdown tables.

Used by ``bench_gaussian_mixture.py`` and ``bench_bayesian_mixture.py``.
"""

from __future__ import annotations

import os
import platform
import time
import warnings

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning

CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def measure_peaks(repeats=5, size=2048, copy_values=2**25, clock="wall"):
    """The machine's float32/float64 GEMM rate and memory-copy bandwidth, with
    torch's current thread count (best of ``repeats``, timed by ``clock``).

    Returns
    -------
    peaks : dict
        ``{'float32 GEMM GFLOP/s', 'float64 GEMM GFLOP/s', 'copy GB/s'}``.
    """
    peaks = {}
    generator = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float64):
        a = torch.randn(size, size, dtype=dtype, generator=generator)
        b = torch.randn(size, size, dtype=dtype, generator=generator)
        torch.mm(a, b)  # warm-up
        best = min(_seconds(lambda: torch.mm(a, b), clock) for _ in range(repeats))
        peaks[f"{str(dtype)[6:]} GEMM GFLOP/s"] = 2 * size**3 / best / 1e9
    source = torch.ones(copy_values, dtype=torch.float32)
    target = torch.empty_like(source)
    target.copy_(source)
    best = min(_seconds(lambda: target.copy_(source), clock) for _ in range(repeats))
    peaks["copy GB/s"] = 2 * source.nbytes / best / 1e9  # read + write
    return peaks


def _seconds(function, clock):
    start = CLOCKS[clock]()
    function()
    return CLOCKS[clock]() - start


def iteration_cost(covariance_type, n_samples, n_features, n_components, itemsize):
    """``(flops, bytes)`` of one EM iteration of skdeepmix's fused pass.

    Flops: the two matrix products of the pass (log-densities = coefficients
    x features, statistics = responsibilities x features: ``2 n K F`` each,
    ``F`` feature columns: ``d(d+1)/2 + d + 1`` for 'full', ``2d + 1`` for
    'diag', ``d + 2`` for 'spherical'; 'tied' ``d + 1`` each, plus the
    whitening ``2 n d²`` and the scatter ``2 n d²``).

    Bytes: the data read once, the feature matrix written once and read by
    both products, the (K x n) log-densities touched 8 times (product, max,
    shift, clamp, exp, sum, divide, statistics product). A lower bound of the
    memory traffic when nothing stays in the caches.
    """
    n, d, K = n_samples, n_features, n_components
    columns = {"full": d * (d + 1) // 2 + d + 1, "tied": d + 1, "diag": 2 * d + 1,
               "spherical": d + 2}[covariance_type]
    flops = 4 * n * K * columns
    if covariance_type == "tied":
        flops += 4 * n * d * d
        columns = 2 * d + 1
    return flops, itemsize * n * (d + 3 * columns + 8 * K)


def fit_seconds(make, X, clock="wall"):
    """Seconds of ``make().fit(X)`` (ConvergenceWarning silenced) and the model."""
    model = make()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        start = CLOCKS[clock]()
        model.fit(X)
        seconds = CLOCKS[clock]() - start
    return seconds, model


def machine(shared):
    """The CPU model and core count (and whether the machine was shared)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info
                       if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores" + (", shared (busy)" if shared else "")


def fmt(value):
    if value is None:
        return "–"
    if isinstance(value, (float, np.floating)):
        return f"{value:.4g}"
    return str(value)


def table(rows):
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(row.get(k)) for k in keys) + " |" for row in rows]
    return "\n".join(lines)


def relative(a, b):
    return abs(a - b) / abs(b)
