"""GPU check: every estimator on ``device='cuda'``, and EM timings against scikit-learn.

Part 1 fits every public estimator on the device (small settings, digits data)
and checks ``predict``, ``score_samples``, ``sample``, and that a pickle made
on the device loads and scores on a machine without a GPU (a subprocess with
``CUDA_VISIBLE_DEVICES=""``) with the same scores.

Part 2 times EM per marginal iteration ((time of ``n2`` iterations - time of
``n1``) / (n2 - n1), same initial parameters for every library) at
1M x 64, K=64 'diag' and 100k x 32, K=16 'full':

* ``skdeepmix.GaussianMixture`` / ``BayesianGaussianMixture`` on the device,
  float32 and float64;
* scikit-learn on the CPU (float64, its default);
* scikit-learn's array-API path on torch tensors on the device
  (``array_api_dispatch=True``; GaussianMixture only, 'random_from_data'
  style initial parameters given explicitly), float32.

It also counts host<->device synchronisations inside EM iterations with
``torch.cuda.set_sync_debug_mode('warn')`` (CUDA only).

Run on a GPU machine (finishes within about 5 minutes on one data-centre GPU)::

    python benchmarks/check_cuda.py                 # writes results/check_cuda.md
    python benchmarks/check_cuda.py --device cpu --tiny   # the test suite's smoke run

"""

from __future__ import annotations

import argparse
import os
import pickle
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"


# ---------------------------------------------------------------- part 1
def small_estimators(tiny):
    """(name, estimator) pairs with small settings (tiny: for the smoke test)."""
    import skdeepmix as sdm

    epochs = 1 if tiny else 5
    return [
        ("GaussianMixture", sdm.GaussianMixture(10, covariance_type="full", reg_covar=1e-2)),
        ("BayesianGaussianMixture", sdm.BayesianGaussianMixture(n_components=10,
                                                                covariance_type="diag")),
        ("DeepGMMEstimator", sdm.DeepGMMEstimator(n_components=(2, 2), max_iter=epochs,
                                                  reg_covar=1e-2)),
        ("CPMMEstimator", sdm.CPMMEstimator(n_components=3, n_points_per_trajectory=4, rank=2,
                                            max_iter=epochs)),
        ("DCGMMEstimator", sdm.DCGMMEstimator(n_components=9, max_iter=epochs)),
        ("GMVAEDPGMM", sdm.GMVAEDPGMM(n_components=10, latent_dim=4, encoder_sizes=(64,),
                                      pretrain_iter=1, max_iter=epochs)),
    ]


_LOAD_ON_CPU = """
import pickle, sys, numpy as np
model = pickle.load(open(sys.argv[1], "rb"))
X = np.load(sys.argv[2])
np.save(sys.argv[3], model.score_samples(X))
"""


def check_estimators(device, tiny):
    from sklearn.datasets import load_digits
    from sklearn.exceptions import ConvergenceWarning

    X, _ = load_digits(return_X_y=True)
    X = (X / 16.0).astype(np.float32)
    if tiny:
        X = X[:300]
    rows = []
    for name, estimator in small_estimators(tiny):
        estimator.set_params(device=device, random_state=0)
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            estimator.fit(X)
        fit_s = time.perf_counter() - start
        labels = estimator.predict(X)
        scores = estimator.score_samples(X)
        sample, _ = estimator.sample(4)
        ok = (labels.shape == (len(X),) and np.all(np.isfinite(scores))
              and sample.shape == (4, X.shape[1]))
        with tempfile.TemporaryDirectory() as tmp:
            paths = [os.path.join(tmp, f) for f in ("model.pkl", "X.npy", "scores.npy")]
            with open(paths[0], "wb") as f:
                pickle.dump(estimator, f)
            np.save(paths[1], X)
            env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
            done = subprocess.run([sys.executable, "-c", _LOAD_ON_CPU, *paths], env=env,
                                  capture_output=True, text=True)
            if done.returncode == 0:
                cpu_scores = np.load(paths[2])
                same = bool(np.allclose(cpu_scores, scores, rtol=1e-4, atol=1e-3))
                pickle_note = "loads on CPU, same scores" if same else "loads on CPU, scores DIFFER"
            else:
                same, pickle_note = False, "FAILED: " + done.stderr.strip().splitlines()[-1]
        rows.append((name, f"{fit_s:.2f}", "ok" if ok else "FAILED", pickle_note))
        if not (ok and same):
            raise SystemExit(f"{name} failed on {device}: {rows[-1]}")
    return rows


# ---------------------------------------------------------------- part 2
def _synchronize(device):
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed_fit(make, X, n_iter, device):
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model = make(n_iter)
        _synchronize(device)
        start = time.perf_counter()
        model.fit(X)
        _synchronize(device)
    return time.perf_counter() - start, model


def marginal(make, X, n1, n2, device):
    """Seconds per marginal iteration, ``(lower bound, iterations)`` of the
    longer fit, and for ours its precision work: components recomputed
    exactly per iteration and exactly centred passes (from ``history_``)."""
    if device != "cpu":  # a first fit pays for kernel loading and allocator growth
        _timed_fit(make, X, 1, device)
    t1, _ = _timed_fit(make, X, n1, device)
    t2, model = _timed_fit(make, X, n2, device)
    history = getattr(model, "history_", None)
    exact = "" if not history else (
        f"{np.mean([h['exact_components'] for h in history]):.2f} / "
        f"{sum(h['exact_pass'] for h in history):g}")
    return (t2 - t1) / (n2 - n1), (float(model.lower_bound_), n2), exact


def em_workloads(tiny):
    if tiny:
        return [("2k x 8, K=4", 2_000, 8, 4, "diag"), ("1k x 4, K=3", 1_000, 4, 3, "full")]
    return [("1M x 64, K=64", 1_000_000, 64, 64, "diag"),
            ("100k x 32, K=16", 100_000, 32, 16, "full")]


def workload_data(n, d, k, cov):
    """``make_blobs`` rows (float64) and the initial parameters every library
    starts from: uniform weights, ``k`` distinct rows as means, identity precisions."""
    from sklearn.datasets import make_blobs

    X, _ = make_blobs(n, d, centers=k, random_state=0)
    means = X[np.random.RandomState(0).choice(n, k, replace=False)]
    precisions = np.ones((k, d)) if cov == "diag" else np.stack([np.eye(d)] * k)
    return X, dict(weights_init=np.full(k, 1.0 / k), means_init=means,
                   precisions_init=precisions)


def time_em(device, tiny, report=lambda rows: None):
    """Rows ``(data, covariance, estimator, implementation, s/iteration,
    (lower bound, iterations), exact work)``; ``report(rows)`` after each."""
    import sklearn
    import torch
    from sklearn.mixture import BayesianGaussianMixture as SkBGM
    from sklearn.mixture import GaussianMixture as SkGM

    import skdeepmix as sdm

    n1, n2 = (2, 4) if tiny else (4, 20)
    sk_n1, sk_n2 = (1, 2) if tiny else (1, 3)  # scikit-learn on the CPU is slow at 1M rows
    rows = []

    def add(label, cov, estimator, impl, measured):
        rows.append((label, cov, estimator, impl, *measured))
        report(rows)

    for label, n, d, k, cov in em_workloads(tiny):
        X, init = workload_data(n, d, k, cov)
        for dtype in ("float32", "float64"):
            Xd = X.astype(dtype)

            def ours(it, dtype=dtype):
                return sdm.GaussianMixture(k, covariance_type=cov, max_iter=it, tol=0,
                                           device=device, **init)

            add(label, cov, "GaussianMixture", f"skdeepmix {device} {dtype}",
                marginal(ours, Xd, n1, n2, device))

            def ours_bgm(it, dtype=dtype):
                return sdm.BayesianGaussianMixture(
                    n_components=k, covariance_type=cov, max_iter=it, tol=0, device=device,
                    init_params="random_from_data", random_state=0)

            add(label, cov, "BayesianGaussianMixture", f"skdeepmix {device} {dtype}",
                marginal(ours_bgm, Xd, n1, n2, device))

        def sk(it):
            return SkGM(k, covariance_type=cov, max_iter=it, tol=0, **init)

        add(label, cov, "GaussianMixture", "scikit-learn cpu float64",
            marginal(sk, X, sk_n1, sk_n2, "cpu"))

        def sk_bgm(it):
            return SkBGM(n_components=k, covariance_type=cov, max_iter=it, tol=0,
                         init_params="random_from_data", random_state=0)

        add(label, cov, "BayesianGaussianMixture", "scikit-learn cpu float64",
            marginal(sk_bgm, X, sk_n1, sk_n2, "cpu"))

        Xt = torch.as_tensor(X, dtype=torch.float32, device=device)
        tinit = {key: torch.as_tensor(value, dtype=torch.float32, device=device)
                 for key, value in init.items()}

        def sk_api(it):
            # The array-API path refuses k-means; the explicit parameters override the init.
            return SkGM(k, covariance_type=cov, max_iter=it, tol=0,
                        init_params="random_from_data", **tinit)

        impl = f"scikit-learn array API torch {device} float32"
        try:
            with sklearn.config_context(array_api_dispatch=True):
                measured = marginal(sk_api, Xt, n1, n2, device)
        except Exception as exc:  # report, do not hide
            measured = float("nan"), (float("nan"), n2), ""
            impl += f" (FAILED: {type(exc).__name__}: {str(exc).splitlines()[0][:120]})"
            print(f"scikit-learn array API failed: {type(exc).__name__}: {exc}")
        add(label, cov, "GaussianMixture", impl, measured)
    return rows


def count_syncs(device):
    """Host<->device synchronisations per EM iteration (CUDA only)."""
    import torch

    import skdeepmix as sdm

    if not device.startswith("cuda"):
        return None
    X = np.random.RandomState(0).normal(size=(200_000, 16)).astype(np.float32)
    counts = {}
    for n_iter in (2, 6):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = sdm.GaussianMixture(8, covariance_type="diag", max_iter=n_iter, tol=0,
                                        device=device, chunk_size=20_000, random_state=0)
            torch.cuda.set_sync_debug_mode("warn")
            try:
                model.fit(X)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        counts[n_iter] = sum("synchroniz" in str(w.message).lower() for w in caught)
    return (counts[6] - counts[2]) / 4.0


def profile_pass(device, tiny):
    """Where the time of ours goes on the first EM workload (float32, same
    initial parameters): torch.profiler's operators by time on the device."""
    from torch.profiler import ProfilerActivity, profile

    import skdeepmix as sdm

    label, n, d, k, cov = em_workloads(tiny)[0]
    X, init = workload_data(n, d, k, cov)
    model = sdm.GaussianMixture(k, covariance_type=cov, max_iter=5, tol=0, device=device,
                                **init)
    X = X.astype(np.float32)
    cuda = device.startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(X)  # warm-up
        with profile(activities=activities) as prof:
            model.fit(X)
            _synchronize(device)
    sort_by = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort_by, row_limit=15, max_name_column_width=50)
    return [f"## Where the time goes: {label}, {cov}, float32, 5 iterations "
            f"(torch.profiler, sorted by {sort_by})", "", "```", table.strip(), "```"]


def write(path, device, estimator_rows, em_rows, syncs, tiny, profile_lines=()):
    import sklearn
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    lines = [
        f"# GPU check ({'tiny smoke run' if tiny else 'full'}) on device={device}",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, GPU: {gpu}; torch "
        f"{torch.__version__} ({torch.get_num_threads()} CPU threads), scikit-learn "
        f"{sklearn.__version__}.",
        f"Command: `python benchmarks/check_cuda.py --device {device}{' --tiny' if tiny else ''}`",
        "",
        "## Every estimator on the device",
        "",
        "| estimator | fit s | fit / predict / score_samples / sample | pickle -> CPU-only process |",
        "|---|---|---|---|",
    ]
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in estimator_rows]
    lines += [
        "",
        "## EM per marginal iteration (same initial parameters)",
        "",
        "The lower bound is the one after the longer fit's iterations (scikit-learn on the "
        "CPU runs fewer at the large sizes, so its bound is not comparable there). "
        "GaussianMixture rows start from the same parameters; BayesianGaussianMixture rows "
        "from each library's own `random_from_data` rows. In `--tiny` runs the marginal "
        "times are below the clock's noise (negative values happen). 'exact work' (ours): "
        "components recomputed exactly per iteration (float32 precision) / exactly "
        "centred passes in the fit.",
        "",
        "| data | covariance | estimator | implementation | s / iteration | ratio to scikit-learn "
        "CPU | lower bound | after iterations | exact work |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    base = {(r[0], r[2]): r[4] for r in em_rows if r[3].startswith("scikit-learn cpu")}
    for label, cov, est, impl, sec, (lb, n_iter), exact in em_rows:
        ratio = base.get((label, est), float("nan")) / sec if sec == sec and sec > 0 else float("nan")
        lines.append(f"| {label} | {cov} | {est} | {impl} | {sec:.4g} | {ratio:.3g} | {lb:.6g} "
                     f"| {n_iter} | {exact} |")
    if syncs is not None:
        lines += ["", f"Host<->device synchronisations per EM iteration: {syncs:g} "
                  "(counted with `torch.cuda.set_sync_debug_mode('warn')`)."]
    if profile_lines:
        lines += ["", *profile_lines]
    path.write_text("\n".join(lines) + "\n")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes (smoke test)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if "scipy" not in sys.modules:
        # scikit-learn's array-API path needs scipy's array-API mode, set before
        # scipy is first imported (in a process that already imported it, the
        # array-API rows report the failure).
        os.environ.setdefault("SCIPY_ARRAY_API", "1")
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("No CUDA device: run with --device cpu.")
    out = args.out or RESULTS / f"check_cuda{'_' + args.device if args.device != 'cuda' else ''}" \
        f"{'_tiny' if args.tiny else ''}.md"
    start = time.perf_counter()
    done = {"estimator_rows": [], "em_rows": [], "syncs": None}

    def report(**parts):  # the file is rewritten after every step: a run cut short keeps it
        done.update(parts)
        write(out, args.device, done["estimator_rows"], done["em_rows"], done["syncs"],
              args.tiny, done.get("profile_lines", ()))
        print(f"[{time.perf_counter() - start:6.1f} s] {', '.join(parts)} written", flush=True)

    report(estimator_rows=check_estimators(args.device, args.tiny))
    report(profile_lines=profile_pass(args.device, args.tiny))
    report(syncs=count_syncs(args.device))
    time_em(args.device, args.tiny, report=lambda rows: report(em_rows=rows))
    print(out.read_text())
    return out


if __name__ == "__main__":
    main()
