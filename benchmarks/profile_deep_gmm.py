"""Profile of ``DeepGMMEstimator.fit``: throughput per EM iteration and where the time goes.

For each task (``load_digits``; BSDS300 8x8 patches) the script fits the
model with ``tol=0`` twice, with ``max_iter=0`` and ``max_iter=N``, and
reports the *marginal* time of one EM iteration, ``(t_N - t_0) / N`` (so
that the initialisation, the conversions and the final E-step do not count),
as samples per second. Times are CPU seconds of the one-thread process
(``time.process_time``), which a busy machine inflates less than wall time.
A third fit under :mod:`cProfile` splits the time of
the iterations into the E-step (best-path search or responsibilities), the
M-step statistics, the M-step L-BFGS (with the folding of the inner layers)
and the rest, and lists the functions with the most own time.

``--before REV`` measures the code of the git revision ``REV`` (exported to a
temporary folder) and the working tree *back to back in the same run*,
alternating ``--repeats`` times, and reports the speed-up of the median
iteration times. The machine is shared: absolute times are noisy, the shares
and the back-to-back ratio are the numbers to read.

Run::

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/profile_deep_gmm.py --before <rev>

Writes ``benchmarks/results/profile_deep_gmm.md`` (``--output`` to change).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import platform
import pstats
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"

#: function names (``pstats`` keys end with them) -> phase of the EM iteration
PHASES = {
    "E-step (path search / responsibilities)": (
        "log_joint", "best_paths", "coordinate_ascent", "_restart_paths",
    ),
    "M-step statistics": ("accumulate_hard_statistics", "accumulate_soft_statistics"),
    "M-step L-BFGS (and folding)": ("m_step_layers",),
}


def load_task(name, n_bsds):
    import numpy as np

    if name == "digits":
        from sklearn.datasets import load_digits

        X = load_digits().data
        return (X + np.random.RandomState(0).uniform(size=X.shape)) / 17.0
    from skdeepmix.datasets import make_bsds300_patches

    return make_bsds300_patches(DATA / "bsds300" / "images" / "train", n_bsds, random_state=0)


def fit(params, X, max_iter):
    from skdeepmix import DeepGMMEstimator

    model = DeepGMMEstimator(**params, max_iter=max_iter, tol=0.0, random_state=0,
                             device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        start = time.process_time()  # CPU time of this (one-thread) process
        model.fit(X)
        return time.process_time() - start, model


def measure(args):
    """One measurement with the code on sys.path; prints a JSON line."""
    sys.path.insert(0, args.code)
    import torch

    torch.set_num_threads(1)
    params = json.loads(args.params)
    params["n_components"] = tuple(params["n_components"]) if isinstance(
        params["n_components"], list) else params["n_components"]
    X = load_task(args.task, args.n_bsds)
    t0, _ = fit(params, X, 0)
    tn, model = fit(params, X, args.iterations)
    per_iter = max(tn - t0, 1e-9) / args.iterations
    profiler = cProfile.Profile()
    profiler.enable()
    tp, _ = fit(params, X, args.iterations)
    profiler.disable()
    stats = pstats.Stats(profiler)
    cumulative = {}
    own = []
    for (filename, line, function), (cc, nc, tt, ct, callers) in stats.stats.items():
        cumulative[function] = max(cumulative.get(function, 0.0), ct)
        own.append((tt, nc, f"{Path(filename).name}:{function}"))
    fit_total = cumulative.get("_run_iterations", tp)
    shares = {}
    for phase, functions in PHASES.items():
        shares[phase] = sum(cumulative.get(f, 0.0) for f in functions) / fit_total
    shares["other"] = max(0.0, 1.0 - sum(shares.values()))
    own.sort(reverse=True)
    print(json.dumps({
        "task": args.task, "n_samples": int(X.shape[0]), "n_features": int(X.shape[1]),
        "per_iter_s": per_iter, "samples_per_s": X.shape[0] / per_iter,
        "shares": shares, "n_paths": int(model.n_paths_),
        "top_own": [(f"{t / fit_total:.3f}", n, name) for t, n, name in own[:12]],
    }), flush=True)


def run_measurement(code_root, task, args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, __file__, "--measure", "--code", str(code_root), "--task", task,
               "--params", args.params,
               "--iterations", str(args.iterations), "--n-bsds", str(args.n_bsds)]
    out = subprocess.run(command, env=env, capture_output=True, text=True, check=True,
                         cwd=code_root)
    return json.loads(out.stdout.strip().splitlines()[-1])


def export_revision(rev, folder):
    archive = subprocess.run(["git", "archive", rev, "skdeepmix"], cwd=ROOT,
                             capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    return folder


def median(values):
    values = sorted(values)
    return values[len(values) // 2]


def table(results, label):
    lines = [f"### {label}", "",
             "| task | rows x dims | paths | median CPU s / iteration (noisy) | samples / s | "
             + " | ".join(f"{p} %" for p in [*PHASES, "other"]) + " |",
             "|---|---|---:|---:|---:|" + "---:|" * (len(PHASES) + 1)]
    for task, runs in results.items():
        r = runs[0]
        per_iter = median([x["per_iter_s"] for x in runs])
        shares = " | ".join(f"{100 * r['shares'][p]:.0f}" for p in [*PHASES, "other"])
        lines.append(f"| {task} | {r['n_samples']} x {r['n_features']} | {r['n_paths']} | "
                     f"{per_iter:.3f} | {r['n_samples'] / per_iter:.0f} | {shares} |")
    lines += ["", "Functions with the most own time (share of the iterations, calls):", ""]
    for task, runs in results.items():
        lines.append(f"- {task}: " + "; ".join(
            f"`{name}` {float(share) * 100:.0f} % ({calls})" for share, calls, name
            in runs[0]["top_own"][:8]))
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--code", default=str(ROOT), help=argparse.SUPPRESS)
    parser.add_argument("--task", default="digits")
    parser.add_argument("--params", default=json.dumps({"n_components": [4, 4]}),
                        help="JSON of DeepGMMEstimator parameters (default: the defaults)")
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--n-bsds", type=int, default=10000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--before", default=None, help="git revision to compare against")
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results"
                                                / "profile_deep_gmm.md"))
    args = parser.parse_args()
    if args.measure:
        measure(args)
        return
    tasks = ["digits"] + (["bsds300"] if (DATA / "bsds300").is_dir() else [])
    codes = {"after (working tree)": ROOT}
    with tempfile.TemporaryDirectory() as tmp:
        if args.before:
            codes = {f"before ({args.before})": export_revision(args.before, Path(tmp)),
                     **codes}
        results = {label: {task: [] for task in tasks} for label in codes}
        for _ in range(args.repeats):  # alternate: before, after, before, after, ...
            for task in tasks:
                for label, code in codes.items():
                    result = run_measurement(code, task, args)
                    results[label][task].append(result)
                    print(label, task, f"{result['per_iter_s']:.3f} s/iter", flush=True)
    lines = [
        "# Profile of DeepGMMEstimator.fit",
        "",
        f"Produced by `python benchmarks/profile_deep_gmm.py {' '.join(sys.argv[1:])}`; "
        f"parameters {args.params} (plus `tol=0`, `random_state=0`), "
        f"{args.iterations} EM iterations, digits = `load_digits` dequantised (1797 x 64), "
        f"bsds300 = {args.n_bsds} training patches; one torch thread; "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs shared with "
        "other jobs: absolute times are noisy; the time shares and the back-to-back "
        "ratios (median of the alternating runs) are the numbers to read.",
        "",
        "Time per iteration is marginal, in CPU seconds of the process: "
        "`(t(max_iter=N) - t(max_iter=0)) / N`. Shares are "
        "of the time in the EM iterations (`_run_iterations`), from cProfile (cumulative "
        "time of `log_joint`/`best_paths` for the E-step, `accumulate_*_statistics`, "
        "`m_step_layers`).",
        "",
    ]
    for label in codes:
        lines += table(results[label], label) + [""]
    if len(codes) == 2:
        (before, b), (after, a) = results.items()
        lines += ["### Speed-up (back to back, same run)", "",
                  "| task | before CPU s / iteration | after CPU s / iteration | speed-up |",
                  "|---|---:|---:|---:|"]
        for task in tasks:
            tb = median([x["per_iter_s"] for x in b[task]])
            ta = median([x["per_iter_s"] for x in a[task]])
            lines.append(f"| {task} | {tb:.3f} | {ta:.3f} | {tb / ta:.2f}x |")
    Path(args.output).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
