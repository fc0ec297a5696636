"""Benchmark: skdeepmix.GaussianMixture beside scikit-learn's, side by side.

Same process, same data, same initial weights/means/precisions, a fixed number
of EM iterations (tol=0). For each size, covariance type and dtype it records
the time per EM iteration (best of ``--repeats`` interleaved runs, so that
other load on the machine hurts both alike), the final mean log-likelihood,
and the ratio sklearn-time / ours. scikit-learn always runs in float64 (its
default: float64 input); its array-API path on torch tensors
(``array_api_dispatch=True``, ``init_params='random_from_data'``) is timed too,
as it is what a user can already do without us. A CUDA column is added when a
GPU is present. A last section fits 2 million × 64 rows, K=32, 'diag', and
records the peak memory above the data itself.

Run::

    python benchmarks/bench_gaussian_mixture.py            # full run (~15 min)
    python benchmarks/bench_gaussian_mixture.py --quick    # smoke run

Writes ``benchmarks/results/gaussian_mixture.md``.
"""

from __future__ import annotations

import os

os.environ.setdefault("SCIPY_ARRAY_API", "1")  # must precede the scipy import

import argparse
import platform
import resource
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import sklearn
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture as SklearnGaussianMixture

from skdeepmix import GaussianMixture

RESULTS = Path(__file__).parent / "results" / "gaussian_mixture.md"
COVARIANCE_TYPES = ["full", "tied", "diag", "spherical"]


def make_data(n_samples, n_features, n_components, seed=0):
    """A Gaussian mixture with random means and covariances."""
    rng = np.random.RandomState(seed)
    centers = rng.normal(scale=4.0, size=(n_components, n_features))
    labels = rng.randint(n_components, size=n_samples)
    scales = rng.uniform(0.5, 1.5, size=(n_components, n_features))
    X = centers[labels] + rng.normal(size=(n_samples, n_features)) * scales[labels]
    return X


def initial_parameters(X, n_components, covariance_type, seed=0):
    """Initial parameters from a short sklearn fit on a subsample (shared by all)."""
    rng = np.random.RandomState(seed)
    sub = X[rng.choice(len(X), min(len(X), 20000), replace=False)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        init = SklearnGaussianMixture(
            n_components, covariance_type=covariance_type, max_iter=2, random_state=seed
        ).fit(sub)
    return dict(
        weights_init=init.weights_,
        means_init=init.means_,
        precisions_init=init.precisions_,
    )


def time_fit(make, X, n_iter):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model = make()
        start = time.perf_counter()
        model.fit(X)
        elapsed = time.perf_counter() - start
    assert model.n_iter_ == n_iter, model.n_iter_
    return elapsed / n_iter, float(model.lower_bound_)


def bench_array_api(X, n_components, covariance_type, n_iter):
    """scikit-learn's own array-API path on torch CPU tensors."""
    try:
        import array_api_compat  # noqa: F401
    except ImportError:
        return None
    X_torch = torch.as_tensor(X)
    with sklearn.config_context(array_api_dispatch=True), warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model = SklearnGaussianMixture(
            n_components, covariance_type=covariance_type, init_params="random_from_data",
            max_iter=n_iter + 1, tol=0, random_state=0,
        )
        start = time.perf_counter()
        model.fit(X_torch)
        elapsed = time.perf_counter() - start
    # the first iteration follows a cheap 'random_from_data' initialisation
    return elapsed / (n_iter + 1)


def run_sizes(sizes, n_iter, repeats, with_array_api):
    rows = []
    cuda = torch.cuda.is_available()
    for n_samples, n_features, n_components in sizes:
        X = make_data(n_samples, n_features, n_components)
        X32 = X.astype(np.float32)
        for covariance_type in COVARIANCE_TYPES:
            init = initial_parameters(X, n_components, covariance_type)
            common = dict(
                n_components=n_components, covariance_type=covariance_type,
                max_iter=n_iter, tol=0, **init,
            )
            runs = {
                "sklearn": lambda: (SklearnGaussianMixture(**common), X),
                "ours f64": lambda: (GaussianMixture(**common, device="cpu"), X),
                "ours f32": lambda: (
                    GaussianMixture(**common, device="cpu", dtype="float32"), X32
                ),
            }
            if cuda:
                runs["ours cuda f32"] = lambda: (
                    GaussianMixture(**common, device="cuda", dtype="float32"), X32
                )
            best = {name: (np.inf, None) for name in runs}
            for _ in range(repeats):
                for name, make in runs.items():
                    model, data = make()
                    t, ll = time_fit(lambda m=model: m, data, n_iter)
                    if t < best[name][0]:
                        best[name] = (t, ll)
            array_api = (
                bench_array_api(X, n_components, covariance_type, n_iter)
                if with_array_api else None
            )
            sk_time, sk_ll = best["sklearn"]
            row = {
                "size": f"{n_samples // 1000}k×{n_features}, K={n_components}",
                "covariance": covariance_type,
                "sklearn s/iter": sk_time,
                "sklearn loglik": sk_ll,
                "f64 s/iter": best["ours f64"][0],
                "f64 loglik": best["ours f64"][1],
                "f64 ratio": sk_time / best["ours f64"][0],
                "f32 s/iter": best["ours f32"][0],
                "f32 loglik": best["ours f32"][1],
                "f32 ratio": sk_time / best["ours f32"][0],
                "sklearn array-API (torch) s/iter": array_api,
            }
            if cuda:
                row["cuda f32 s/iter"] = best["ours cuda f32"][0]
                row["cuda f32 ratio"] = sk_time / best["ours cuda f32"][0]
            rows.append(row)
            print(" | ".join(f"{k}={_fmt(v)}" for k, v in row.items()), flush=True)
    return rows


_MEMORY_SCRIPT = r"""
import sys, time, warnings
import numpy as np, torch
from skdeepmix import GaussianMixture

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) / 1024  # MiB
n, d, K = int(sys.argv[1]), 64, 32
rng = np.random.RandomState(0)
X = np.empty((n, d), dtype=np.float32)
for start in range(0, n, 100_000):  # built in blocks: no large temporaries
    stop = min(start + 100_000, n)
    X[start:stop] = rng.standard_normal((stop - start, d))
    X[start:stop] += rng.randint(K, size=stop - start)[:, None]
with open("/proc/self/clear_refs", "w") as f:  # reset the peak (VmHWM) to now
    f.write("5")
base = status("VmRSS")
warnings.simplefilter("ignore")
start = time.perf_counter()
gm = GaussianMixture(K, covariance_type="diag", dtype="float32", max_iter=5, tol=0,
                     random_state=0, device="cpu").fit(X)
elapsed = time.perf_counter() - start
peak = status("VmHWM")
print(X.nbytes / 2**20, base, peak, elapsed, gm.n_iter_)
"""


def run_memory(n_samples):
    """Peak RSS of a fit in a fresh process, above the RSS with the data loaded
    (the kernel's high-water mark is reset once the data are built)."""
    out = subprocess.run(
        [sys.executable, "-c", _MEMORY_SCRIPT, str(n_samples)],
        check=True, capture_output=True, text=True,
    ).stdout.split()
    data_mib, base_mib, peak_mib, seconds, n_iter = map(float, out)
    return {
        "rows": n_samples, "data MiB": data_mib, "RSS with data loaded MiB": base_mib,
        "peak RSS during fit MiB": peak_mib, "peak above data MiB": peak_mib - base_mib,
        "fit s (k-means init + 5 EM iter)": seconds,
    }


def _fmt(value):
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _table(rows):
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(_fmt(row.get(k)) for k in keys) + " |" for row in rows]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small smoke run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--n-iter", type=int, default=10)
    parser.add_argument("--no-array-api", action="store_true")
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count(),
        help="threads for torch and for numpy's BLAS alike",
    )
    args = parser.parse_args(argv)
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(args.threads)
    threadpool_limits(args.threads)
    if args.quick:
        sizes, memory_rows, args.repeats, args.n_iter = [(5000, 8, 4)], 100_000, 1, 3
    else:
        sizes, memory_rows = [(100_000, 32, 16), (200_000, 16, 32)], 2_000_000
    rows = run_sizes(sizes, args.n_iter, args.repeats, not args.no_array_api)
    memory = run_memory(memory_rows)
    print(memory)
    header = (
        f"# GaussianMixture benchmark\n\n"
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch "
        f"{torch.__version__} ({torch.get_num_threads()} threads), scikit-learn "
        f"{sklearn.__version__}, numpy {np.__version__}"
        f"{', CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else ', no GPU'}."
        f"\nCommand: `python benchmarks/bench_gaussian_mixture.py"
        f"{' --quick' if args.quick else ''}`; {args.n_iter} EM iterations from the "
        f"same initial parameters, best of {args.repeats} interleaved runs.\n\n"
        "Columns: seconds per EM iteration; final mean log-likelihood (`lower_bound_`);"
        " ratio = sklearn (float64) time / ours. 'sklearn array-API (torch)' is"
        " scikit-learn on torch CPU tensors with `array_api_dispatch=True`"
        " (`init_params='random_from_data'`).\n\n"
    )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        header
        + _table(rows)
        + "\n\n## Memory: 'diag', K=32, 64 features, float32, fresh process\n\n"
        + _table([memory])
        + "\n"
    )
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
