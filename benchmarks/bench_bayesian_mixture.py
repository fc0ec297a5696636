"""Benchmark: skdeepmix.BayesianGaussianMixture beside scikit-learn's.

Workload (issues 11 and 12): ``make_blobs(100_000, 32, centers=16)``,
``n_components=16``, 'full' and 'diag'; scikit-learn in float64 (its
default), ours in float32 and float64. Both libraries start from the *same*
initial state: scikit-learn's own initialisation (``init_params='kmeans'`` or
``'random'``, ``max_iter=0``), given to both through ``warm_start``; the
k-means one also on the data moved far from the origin (``X + 1e4``).

* Time per **marginal** iteration: ``(time of 40 iterations - time of 8) / 32``
  (``tol=0``), so that validation, the priors and the final E-step do not
  count; best of ``--repeats`` interleaved runs; speed-up = scikit-learn's
  time / ours.
* Our achieved GFLOP/s and GB/s (cost model: ``_em_bench.iteration_cost``)
  beside the machine's GEMM rates and copy bandwidth measured in the same run.
* The lower bounds after 40 iterations, their relative differences, and the
  iterations that needed the exactly centred second pass, and the components
  the passes computed from differences.
* Peak memory of a fit in a fresh process, above the resident memory with the
  data loaded (the kernel's high-water mark is reset once the data are
  loaded), for two chunk sizes and two numbers of rows: it follows the chunk
  size, not the number of rows.

Threads: ``--threads`` (default 1) for torch and for numpy's BLAS alike. On a
shared machine use one thread (and ``--clock cpu``); the tables say how they
were measured.

Run::

    python benchmarks/bench_bayesian_mixture.py --threads 2 --quiet-machine  # ~10 min
    python benchmarks/bench_bayesian_mixture.py --clock cpu     # shared machine, 1 thread
    python benchmarks/bench_bayesian_mixture.py --quick --out /tmp/b.md  # seconds

Writes ``benchmarks/results/bayesian_mixture.md`` (or ``--out``).
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
from sklearn.mixture import BayesianGaussianMixture as SklearnBayesianGaussianMixture

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]  # this checkout's skdeepmix
from _em_bench import (  # noqa: E402
    fit_seconds, iteration_cost, machine, measure_peaks, relative, table,
)

from skdeepmix import BayesianGaussianMixture  # noqa: E402
from skdeepmix._gaussian import MixturePass  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "bayesian_mixture.md"
STATE = ["weight_concentration_", "mean_precision_", "means_", "degrees_of_freedom_",
         "covariances_", "precisions_cholesky_"]
#: (init, data) rows of the tables
CONFIGS = [("kmeans", "near"), ("random", "near"), ("kmeans", "far")]
FAR = 1e4


def initial_state(X, n_components, covariance_type, init):
    """scikit-learn's initial state (its initialisation, then the first M-step)."""
    start = SklearnBayesianGaussianMixture(n_components=n_components,
                                           covariance_type=covariance_type,
                                           init_params=init, max_iter=0,
                                           random_state=0).fit(X)
    return {name: getattr(start, name) for name in STATE}


def _cast(value, dtype):
    if isinstance(value, tuple):
        return tuple(np.asarray(v, dtype=dtype) for v in value)
    return np.asarray(value, dtype=dtype)


def _warm(model, state, dtype):
    """``model`` set to continue from ``state`` (``warm_start``)."""
    for name, value in state.items():
        setattr(model, name, _cast(value, dtype))
    model.converged_, model.lower_bound_ = False, -np.inf
    return model


def run_timings(n_samples, n_features, n_components, short, long, repeats, clock, peaks):
    X_near, _ = make_blobs(n_samples, n_features, centers=n_components, random_state=0)
    timings, bounds = [], []
    for init, where in CONFIGS:
        X64 = X_near + FAR if where == "far" else X_near
        data = {"sklearn": X64, "float32": X64.astype(np.float32), "float64": X64}
        for covariance_type in ["full", "diag"]:
            state = initial_state(X64, n_components, covariance_type, init)
            common = dict(n_components=n_components, covariance_type=covariance_type,
                          tol=0.0, warm_start=True)
            makers = {
                "sklearn": lambda n: _warm(SklearnBayesianGaussianMixture(
                    **common, max_iter=n), state, np.float64),
                "float32": lambda n: _warm(BayesianGaussianMixture(
                    **common, max_iter=n, dtype="float32", device="cpu"), state, np.float32),
                "float64": lambda n: _warm(BayesianGaussianMixture(
                    **common, max_iter=n, device="cpu"), state, np.float64),
            }
            best, models = {name: np.inf for name in makers}, {}
            for _ in range(repeats):
                for name, make in makers.items():  # interleaved
                    t_short, _ = fit_seconds(lambda: make(short), data[name], clock)
                    t_long, models[name] = fit_seconds(lambda: make(long), data[name], clock)
                    assert models[name].n_iter_ == long, (name, models[name].n_iter_)
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
            reference = float(np.ravel(models["sklearn"].lower_bound_)[0])
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
                # the pass's feature buffer (float32), its largest temporary
                "chunk x pass columns x 4 bytes, MiB": chunk * 4 / 2**20 * (
                    MixturePass.n_columns("full", n_features)),
                "fit s (k-means + 3 iterations)": seconds,
            })
            print(out[-1], flush=True)
    return out


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
        size, short, long, args.repeats = (2000, 4, 3), 2, 4, 1
        memory_rows, memory_chunks = [4000], [256]
    else:
        size, short, long = (100_000, 32, 16), 8, 40
        memory_rows, memory_chunks = [100_000, 400_000], [1024, 16384]
    peaks = (measure_peaks(size=512, copy_values=2**22, clock=args.clock) if args.quick
             else measure_peaks(clock=args.clock))
    print(peaks, flush=True)
    timings, bounds = run_timings(*size, short, long, args.repeats, args.clock, peaks)
    memory = [] if args.no_memory else run_memory(size[1], size[2], memory_rows,
                                                  memory_chunks, args.threads)
    n, d, K = size
    command = "python benchmarks/bench_bayesian_mixture.py" + " --quick" * args.quick
    clock = ("process CPU time (one thread)" if args.clock == "cpu" else "wall-clock time")
    text = [
        "# BayesianGaussianMixture benchmark",
        "",
        f"Generated by `{command} --threads {args.threads} --clock {args.clock}` on "
        f"{machine(shared=not args.quiet_machine)}: torch {torch.__version__} "
        f"({args.threads} thread{'s' * (args.threads > 1)}), scikit-learn "
        f"{sklearn.__version__} (numpy's BLAS limited to the same threads), numpy "
        f"{np.__version__}, CPU.",
        "",
        f"Workload: `make_blobs({n}, {d}, centers={K})`, `n_components={K}`, both "
        "libraries starting from scikit-learn's initial state (its "
        "`init_params='kmeans'` / `'random'` initialisation, `max_iter=0`) through "
        f"`warm_start`, `tol=0`; data `far` = `X + {FAR:g}`. Time per marginal iteration "
        f"= (time of {long} iterations - time of {short}) / {long - short}, {clock}, "
        f"best of {args.repeats} interleaved runs; speed-up = scikit-learn's (float64) "
        "time / ours.",
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
        "of its memory traffic (`benchmarks/_em_bench.py`), per marginal iteration.",
        "",
        table(timings),
        "",
        f"## Lower bounds after {long} iterations",
        "",
        "`lower_bound_` of the same run; relative difference to scikit-learn's; "
        "iterations (of the long run) that needed the exactly centred second pass, "
        "and the components the passes computed from differences (summed over the "
        "iterations).",
        "",
        table(bounds),
        "",
    ]
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
            table(memory), "",
        ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(text))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
