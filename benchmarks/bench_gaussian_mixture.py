"""Benchmark: skdeepmix.GaussianMixture beside scikit-learn's, per EM iteration.

Workload (issue 12): ``make_blobs(100_000, 32, centers=16)``, ``n_components=16``,
every covariance type; scikit-learn in float64 (its default), ours in float32
and float64. Both libraries start from the *same* initial parameters
(``weights_init``, ``means_init``, ``precisions_init``), for several inits:

* ``identity``: uniform weights, 16 distinct data rows as means, identity
  precisions;
* ``kmeans``: our k-means initialisation (``init_params='kmeans'``,
  ``max_iter=0``: its weights, means and precisions), given to both;
* ``random``: the same with ``init_params='random'``;
* ``kmeans, far``: the data moved far from the origin (``X + 1e4``), k-means.

Measured:

* time per **marginal** iteration: ``(time of 40 iterations - time of 8) / 32``
  (``tol=0``), so that validation, conversion and the final E-step do not
  count; best of ``--repeats`` interleaved runs (all three runs of a row one
  after another, so that other load hurts them alike); ratio = scikit-learn's
  time / ours;
* our achieved GFLOP/s and GB/s (cost model: ``_em_bench.iteration_cost``)
  beside the machine's float32/float64 GEMM rate and copy bandwidth, measured
  in the same run with the same threads;
* the lower bounds after 40 iterations, their relative differences, and how
  many of our iterations needed the exactly centred second pass, and how many
  components the passes computed from differences (``history_``);
* the peak memory of a 2M x 64, K=32, 'diag' fit (fresh process).

Threads: ``--threads`` (default 1) for torch and numpy's BLAS alike. On a
shared machine use one thread (and ``--clock cpu``: process CPU time, less
disturbed by other jobs); the tables say how they were measured.

Run::

    python benchmarks/bench_gaussian_mixture.py --threads 2 --quiet-machine  # ~15 min
    python benchmarks/bench_gaussian_mixture.py --clock cpu      # shared machine, 1 thread
    python benchmarks/bench_gaussian_mixture.py --quick --out /tmp/g.md  # seconds

Writes ``benchmarks/results/gaussian_mixture.md`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import sklearn
import torch
from sklearn.datasets import make_blobs
from sklearn.mixture import GaussianMixture as SklearnGaussianMixture

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]  # this checkout's skdeepmix
from _em_bench import (  # noqa: E402
    fit_seconds, iteration_cost, machine, measure_peaks, relative, table,
)

from skdeepmix import GaussianMixture  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "gaussian_mixture.md"
COVARIANCE_TYPES = ["full", "tied", "diag", "spherical"]
#: (init, data) rows of the tables
CONFIGS = [("identity", "near"), ("kmeans", "near"), ("random", "near"), ("kmeans", "far")]
FAR = 1e4


def initial_parameters(X, n_components, covariance_type, init):
    """``weights_init``, ``means_init``, ``precisions_init`` for both libraries."""
    n_features = X.shape[1]
    if init == "identity":
        rows = np.random.RandomState(0).choice(len(X), n_components, replace=False)
        precisions = {
            "full": np.tile(np.eye(n_features), (n_components, 1, 1)),
            "tied": np.eye(n_features),
            "diag": np.ones((n_components, n_features)),
            "spherical": np.ones(n_components),
        }[covariance_type]
        return dict(weights_init=np.full(n_components, 1.0 / n_components),
                    means_init=X[rows], precisions_init=precisions)
    start = GaussianMixture(n_components, covariance_type=covariance_type, init_params=init,
                            max_iter=0, random_state=0, device="cpu").fit(X)
    return dict(weights_init=start.weights_, means_init=start.means_,
                precisions_init=start.precisions_)


def run_timings(n_samples, n_features, n_components, short, long, repeats, clock, peaks):
    X_near, _ = make_blobs(n_samples, n_features, centers=n_components, random_state=0)
    timings, bounds = [], []
    for init, where in CONFIGS:
        X64 = X_near + FAR if where == "far" else X_near
        data = {"sklearn": X64, "float32": X64.astype(np.float32), "float64": X64}
        for covariance_type in COVARIANCE_TYPES:
            common = dict(n_components=n_components, covariance_type=covariance_type, tol=0.0,
                          **initial_parameters(X64, n_components, covariance_type, init))
            makers = {
                "sklearn": lambda n: SklearnGaussianMixture(**common, max_iter=n),
                "float32": lambda n: GaussianMixture(**common, max_iter=n, dtype="float32",
                                                     device="cpu"),
                "float64": lambda n: GaussianMixture(**common, max_iter=n, device="cpu"),
            }
            best, models = {name: np.inf for name in makers}, {}
            for _ in range(repeats):
                for name, make in makers.items():  # interleaved
                    t_short, _ = fit_seconds(lambda: make(short), data[name], clock)
                    t_long, models[name] = fit_seconds(lambda: make(long), data[name], clock)
                    best[name] = min(best[name], (t_long - t_short) / (long - short))
            row = {"init": init, "data": where, "covariance": covariance_type,
                   "scikit-learn float64 ms": 1e3 * best["sklearn"]}
            for dtype in ("float32", "float64"):
                flops, nbytes = iteration_cost(covariance_type, n_samples, n_features,
                                               n_components, np.dtype(dtype).itemsize)
                row[f"ours {dtype} ms"] = 1e3 * best[dtype]
                row[f"speed-up {dtype}"] = best["sklearn"] / best[dtype]
                rate = flops / best[dtype] / 1e9
                row[f"{dtype} GFLOP/s (% of GEMM peak)"] = (
                    f"{rate:.3g} ({100 * rate / peaks[f'{dtype} GEMM GFLOP/s']:.0f} %)")
                row[f"{dtype} GB/s"] = nbytes / best[dtype] / 1e9
            timings.append(row)
            reference = float(models["sklearn"].lower_bound_)
            bound = {"init": init, "data": where, "covariance": covariance_type,
                     "scikit-learn": reference}
            for dtype in ("float32", "float64"):
                model = models[dtype]
                bound[dtype] = model.lower_bound_
                bound[f"{dtype} relative difference"] = relative(model.lower_bound_, reference)
                bound[f"{dtype} exact passes"] = int(sum(h["exact_pass"] for h in model.history_))
            for dtype in ("float32", "float64"):
                bound[f"{dtype} exact components"] = int(
                    sum(h["exact_components"] for h in models[dtype].history_))
            bounds.append(bound)
            print(row, bound, sep="\n", flush=True)
    return timings, bounds


_MEMORY_SCRIPT = r"""
import sys, time, warnings
import numpy as np, torch
torch.set_num_threads(int(sys.argv[2]))
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
warnings.simplefilter("ignore")
GaussianMixture(K, covariance_type="diag", max_iter=1, device="cpu").fit(X[:1000])  # warm-up
with open("/proc/self/clear_refs", "w") as f:  # reset the peak (VmHWM) to now
    f.write("5")
base = status("VmRSS")
start = time.perf_counter()
gm = GaussianMixture(K, covariance_type="diag", max_iter=5, tol=0, random_state=0,
                     device="cpu").fit(X)
elapsed = time.perf_counter() - start
print(X.nbytes / 2**20, base, status("VmHWM"), elapsed)
"""


def run_memory(n_samples, threads):
    """Peak RSS of a fit in a fresh process, above the RSS with the data loaded."""
    if not Path("/proc/self/clear_refs").exists():
        return None
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(threads))
    out = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, str(n_samples), str(threads)],
                         check=True, capture_output=True, text=True, env=env).stdout.split()
    data_mib, base_mib, peak_mib, seconds = map(float, out)
    return {"rows": n_samples, "data MiB": data_mib, "peak above data MiB": peak_mib - base_mib,
            "fit s (k-means init + 5 EM iterations)": seconds}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (seconds)")
    parser.add_argument("--threads", type=int, default=1,
                        help="threads for torch and numpy's BLAS alike (default 1)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="best of this many interleaved (short, long) pairs")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="wall-clock time, or process CPU time (one thread only)")
    parser.add_argument("--quiet-machine", action="store_true",
                        help="do not label the timings as measured on a shared machine")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory section")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.clock == "cpu" and args.threads != 1:
        parser.error("--clock cpu measures one thread only (CPU time adds up the threads)")
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
        size, short, long, args.repeats, memory_rows = (2000, 4, 3), 2, 4, 1, 20_000
    else:
        size, short, long, memory_rows = (100_000, 32, 16), 8, 40, 2_000_000
    peaks = (measure_peaks(size=512, copy_values=2**22, clock=args.clock) if args.quick
             else measure_peaks(clock=args.clock))
    print(peaks, flush=True)
    timings, bounds = run_timings(*size, short, long, args.repeats, args.clock, peaks)
    memory = None if args.no_memory else run_memory(memory_rows, args.threads)
    n, d, K = size
    command = "python benchmarks/bench_gaussian_mixture.py" + " --quick" * args.quick
    clock = ("process CPU time (one thread)" if args.clock == "cpu" else "wall-clock time")
    text = [
        "# GaussianMixture benchmark",
        "",
        f"Generated by `{command} --threads {args.threads} --clock {args.clock}` on "
        f"{machine(shared=not args.quiet_machine)}: torch {torch.__version__} "
        f"({args.threads} thread{'s' * (args.threads > 1)}), scikit-learn "
        f"{sklearn.__version__} (numpy's BLAS limited to the same threads), numpy "
        f"{np.__version__}, CPU.",
        "",
        f"Workload: `make_blobs({n}, {d}, centers={K})`, `n_components={K}`, both "
        "libraries starting from the same `weights_init`, `means_init`, "
        "`precisions_init`: `identity` (uniform weights, distinct data rows as means, "
        "identity precisions), `kmeans` / `random` (our `init_params='kmeans'` / "
        "`'random'` initialisation with `max_iter=0`, given to both); data `far` = "
        f"`X + {FAR:g}`. Time per marginal iteration = (time of {long} iterations - "
        f"time of {short}) / {long - short}, `tol=0`, {clock}, best of {args.repeats} "
        "interleaved runs; speed-up = scikit-learn's (float64) time / ours.",
        "",
    ]
    if not args.quiet_machine:
        text += ["**Measured on a shared, busy machine (other jobs running on its "
                 "cores): the timings are indicative only; rerun on a quiet machine "
                 "(`--threads 2 --quiet-machine`) for final numbers.**", ""]
    text += [
        "Machine peaks measured in the same run, same threads and clock: "
        + ", ".join(f"{key} {value:.3g}" for key, value in peaks.items()) + ".",
        "",
        "GFLOP/s and GB/s: our fused pass's matrix-product flops and a lower bound "
        "of its memory traffic (data read once, features written once and read "
        "twice, K x n log-densities touched 8 times; `benchmarks/_em_bench.py`), "
        "per marginal iteration.",
        "",
        table(timings),
        "",
        f"## Lower bounds after {long} iterations",
        "",
        "Mean log-likelihood per sample (`lower_bound_`) of the same run; relative "
        "difference to scikit-learn's; iterations (of the long run) that needed the "
        "exactly centred second pass, and the components the passes computed from "
        "differences (summed over the iterations; tight components far from the "
        "center, e.g. collapsed ones at `reg_covar`).",
        "",
        table(bounds),
        "",
    ]
    if memory:
        text += ["## Memory: 'diag', K=32, 64 features, float32, fresh process", "",
                 "Peak resident memory above the resident memory with the data loaded "
                 "(after a warm-up fit on 1000 rows).", "", table([memory]), ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(text))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
