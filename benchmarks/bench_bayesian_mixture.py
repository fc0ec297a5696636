"""Benchmark: skdeepmix.BayesianGaussianMixture beside scikit-learn's.

Workload (issue 11): ``100_000 x 32`` rows from a 16-component mixture,
``n_components=16``, 'full' and 'diag', float32 and float64, both libraries
starting from the *same* initial state (scikit-learn's own k-means
initialisation with ``max_iter=0``, given to both through ``warm_start``).

* Time per **marginal** iteration: ``(time of 40 iterations - time of 8) / 32``
  (``tol=0``), so that validation, the priors and the final E-step do not
  count; ratio = scikit-learn's time / ours, same dtype.
* The lower bounds after 40 iterations and their relative difference.
* Peak memory of a fit in a fresh process, above the resident memory with the
  data loaded (the kernel's high-water mark is reset once the data are
  loaded), for two chunk sizes and two numbers of rows: it follows the chunk
  size, not the number of rows.

Threads: ``--threads`` (default 1) for torch and for numpy's BLAS alike. The
default run is meant for a busy shared machine; its timings are labelled so.

Run::

    OMP_NUM_THREADS=1 python benchmarks/bench_bayesian_mixture.py   # ~10 min
    python benchmarks/bench_bayesian_mixture.py --quick --out /tmp/b.md  # seconds

Writes ``benchmarks/results/bayesian_mixture.md`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import sklearn
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import BayesianGaussianMixture as SklearnBayesianGaussianMixture

from skdeepmix import BayesianGaussianMixture

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "bayesian_mixture.md"
STATE = ["weight_concentration_", "mean_precision_", "means_", "degrees_of_freedom_",
         "covariances_", "precisions_cholesky_"]


def make_data(n_samples, n_features, n_components, seed=0):
    """A Gaussian mixture with random means and per-feature scales."""
    rng = np.random.RandomState(seed)
    centers = rng.normal(scale=4.0, size=(n_components, n_features))
    labels = rng.randint(n_components, size=n_samples)
    scales = rng.uniform(0.5, 1.5, size=(n_components, n_features))
    return centers[labels] + rng.normal(size=(n_samples, n_features)) * scales[labels]


def initial_state(X, n_components, covariance_type):
    """scikit-learn's initial state (k-means, then the first M-step)."""
    start = SklearnBayesianGaussianMixture(n_components=n_components,
                                           covariance_type=covariance_type,
                                           max_iter=0, random_state=0).fit(X)
    return {name: getattr(start, name) for name in STATE}


def _cast(value, dtype):
    if isinstance(value, tuple):
        return tuple(np.asarray(v, dtype=dtype) for v in value)
    return np.asarray(value, dtype=dtype)


def timed_fit(make, X, state, n_iter):
    """Seconds of ``fit`` for ``n_iter`` iterations from ``state``, and the model."""
    model = make(n_iter)
    for name, value in state.items():
        setattr(model, name, _cast(value, X.dtype))
    model.converged_, model.lower_bound_ = False, -np.inf
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        start = time.perf_counter()
        model.fit(X)
        elapsed = time.perf_counter() - start
    assert model.n_iter_ == n_iter, (model.n_iter_, n_iter)
    return elapsed, model


def marginal(make, X, state, short, long, repeats):
    """Best-of-``repeats`` marginal seconds per iteration and the long run's model."""
    best, model = np.inf, None
    for _ in range(repeats):
        t_short, _ = timed_fit(make, X, state, short)
        t_long, model = timed_fit(make, X, state, long)
        best = min(best, (t_long - t_short) / (long - short))
    return best, model


def run_timings(n_samples, n_features, n_components, short, long, repeats):
    X64 = make_data(n_samples, n_features, n_components)
    data = {"float64": X64, "float32": X64.astype(np.float32)}
    timings, bounds = [], []
    for covariance_type in ["full", "diag"]:
        state = initial_state(X64, n_components, covariance_type)
        common = dict(n_components=n_components, covariance_type=covariance_type, tol=0.0,
                      warm_start=True)
        reference = {}
        for dtype, X in data.items():
            sk_time, sk = marginal(
                lambda n: SklearnBayesianGaussianMixture(**common, max_iter=n),
                X, state, short, long, repeats)
            ours_time, ours = marginal(
                lambda n, dt=dtype: BayesianGaussianMixture(**common, max_iter=n, dtype=dt,
                                                            device="cpu"),
                X, state, short, long, repeats)
            reference[dtype] = float(np.ravel(sk.lower_bound_)[0])
            label = f"{covariance_type}, {dtype}"
            timings += [
                {"metric": f"scikit-learn {label}: s per marginal iteration",
                 "time": sk_time, "ratio": 1.0},
                {"metric": f"skdeepmix {label}: s per marginal iteration",
                 "time": ours_time, "ratio": sk_time / ours_time},
            ]
            bounds.append({
                "run": label,
                "scikit-learn lower_bound_": reference[dtype],
                "skdeepmix lower_bound_": ours.lower_bound_,
                "relative difference": abs(ours.lower_bound_ - reference[dtype])
                / abs(reference[dtype]),
                "vs scikit-learn float64": abs(ours.lower_bound_ - reference["float64"])
                / abs(reference["float64"]),
            })
            print(timings[-2], timings[-1], bounds[-1], sep="\n", flush=True)
    return timings, bounds


_MEMORY_SCRIPT = r"""
import sys, time, warnings
import numpy as np, torch
torch.set_num_threads(int(sys.argv[5]))
from skdeepmix import BayesianGaussianMixture

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) / 1024  # MiB
n, d, K, chunk = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
rng = np.random.RandomState(0)
X = np.empty((n, d), dtype=np.float32)
for start in range(0, n, 50_000):  # built in blocks: no large temporaries
    stop = min(start + 50_000, n)
    X[start:stop] = rng.standard_normal((stop - start, d))
    X[start:stop] += 4 * rng.randint(K, size=stop - start)[:, None]
warnings.simplefilter("ignore")
model = dict(n_components=K, covariance_type="full", tol=0, random_state=0, device="cpu")
BayesianGaussianMixture(**model, max_iter=1).fit(X[:1000])  # lazy imports, allocator
with open("/proc/self/clear_refs", "w") as f:  # reset the peak (VmHWM) to now
    f.write("5")
base = status("VmRSS")
start = time.perf_counter()
BayesianGaussianMixture(**model, max_iter=3, chunk_size=chunk).fit(X)
print(X.nbytes / 2**20, base, status("VmHWM"), time.perf_counter() - start)
"""


def run_memory(n_features, n_components, rows, chunks, threads):
    """Peak RSS above the loaded data, one fresh process per (rows, chunk)."""
    if not Path("/proc/self/clear_refs").exists():
        return []
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(threads))
    out = []
    for n_samples in rows:
        for chunk in chunks:
            result = subprocess.run(
                [sys.executable, "-c", _MEMORY_SCRIPT, str(n_samples), str(n_features),
                 str(n_components), str(chunk), str(threads)],
                check=True, capture_output=True, text=True, env=env,
            ).stdout.split()
            data_mib, base_mib, peak_mib, seconds = map(float, result)
            out.append({
                "rows": n_samples, "chunk_size": chunk, "data MiB": data_mib,
                "peak above data MiB": peak_mib - base_mib,
                # the largest E-step temporary: chunk x K x d values (float32)
                "chunk x K x d x 4 bytes, MiB": chunk * n_components * n_features * 4 / 2**20,
                "fit s (k-means + 3 iterations)": seconds,
            })
            print(out[-1], flush=True)
    return out


def _fmt(value):
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _table(rows):
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(_fmt(row[k]) for k in keys) + " |" for row in rows]
    return "\n".join(lines)


def _machine(shared):
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    text = f"{cpu}, {os.cpu_count()} cores"
    return text + (", shared (busy)" if shared else "")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (seconds)")
    parser.add_argument("--threads", type=int, default=1,
                        help="threads for torch and numpy's BLAS alike (default 1)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="best of this many (short, long) pairs")
    parser.add_argument("--quiet-machine", action="store_true",
                        help="do not label the timings as measured on a shared machine")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    from threadpoolctl import threadpool_limits

    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        with threadpool_limits(args.threads):
            _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args):
    if args.quick:
        size, short, long = (2000, 4, 3), 2, 4
        memory_rows, memory_chunks = [4000], [256]
    else:
        size, short, long = (100_000, 32, 16), 8, 40
        memory_rows, memory_chunks = [100_000, 400_000], [1024, 16384]
    timings, bounds = run_timings(*size, short, long, args.repeats)
    machine = _machine(shared=not args.quiet_machine)
    for row in timings:
        row.update({"thread count": args.threads, "machine": machine})
    memory = run_memory(size[1], size[2], memory_rows, memory_chunks, args.threads)
    n, d, K = size
    command = "python benchmarks/bench_bayesian_mixture.py" + " --quick" * args.quick
    text = [
        "# BayesianGaussianMixture benchmark",
        "",
        f"Generated by `{command}` (`--threads {args.threads}`): torch {torch.__version__}, "
        f"scikit-learn {sklearn.__version__}, numpy {np.__version__}, CPU only.",
        "",
        f"Workload: {n} x {d} rows from a {K}-component mixture, `n_components={K}`, "
        "both libraries starting from scikit-learn's initial state (its k-means, "
        "`max_iter=0`) through `warm_start`, `tol=0`. Time per marginal iteration = "
        f"(time of {long} iterations - time of {short}) / {long - short}, best of "
        f"{args.repeats}; ratio = scikit-learn's time / ours (same dtype).",
        "",
    ]
    if not args.quiet_machine:
        text += ["**Measured on a shared, busy machine (other jobs running on its "
                 "cores): the timings are indicative only; rerun on a quiet machine "
                 "for final numbers.**", ""]
    text += [_table(timings), "", f"## Lower bounds after {long} iterations", "",
             _table(bounds), ""]
    if memory:
        text += [
            "## Peak memory (fresh process per row; 'full', float32, "
            f"K={K}, {d} features, k-means init + 3 iterations)", "",
            "Peak resident memory above the resident memory with the data loaded "
            "(after a warm-up fit on 1000 rows, so that lazy imports and the "
            "allocator's start do not count): it follows `chunk_size`, not the "
            "number of rows. What grows with the rows is the k-means "
            "initialisation's one label and one distance per row (12 bytes per row "
            "in float32: 4.6 MiB at 400000 rows).", "",
            _table(memory), "",
        ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(text))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
