"""Benchmark: one EM pass on 2 CPU threads, split into runs of chunks or on torch's pool.

Issue 12 asked why the same fit's time varied up to 2x from run to run on this
project's 2-core VM. This benchmark times the E-step + statistics pass of
``GaussianMixture`` (:class:`skdeepmix._gaussian.MixturePass` over the row chunks
a fit uses) three ways, in several fresh processes:

* ``1 thread``: all chunks one after the other, one torch thread;
* ``torch pool``: the same with 2 torch threads (every operation of a chunk
  split across the OpenMP pool; what the EM pass did before);
* ``split``: the chunks in two contiguous runs, one per thread, each with one
  torch thread, sums added in order (``skdeepmix._torch_utils.run_in_threads``;
  what a fit does now, with torch on one thread for the whole call).

Workload: ``make_blobs(100_000, 32, centers=16)``, K=16, float32, means at 16
data rows, unit variances, the chunk size a fit uses. Per process and mode: a
warm-up pass, then ``--repeats`` passes back to back (as a fit's iterations),
modes one after the other with a pause between them; the table gives, per mode,
the median over processes of the per-process medians, their range, and the
slowest single pass.

Run::

    python benchmarks/bench_pass_threads.py            # ~3 min
    python benchmarks/bench_pass_threads.py --quick    # seconds

Writes ``benchmarks/results/pass_threads.md`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
from _em_bench import machine, table  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "pass_threads.md"
MODES = ["1 thread", "torch pool", "split"]


def one_process(covariance_type, n_samples, repeats):
    """Per-mode pass times (ms) in this process."""
    import torch
    from sklearn.datasets import make_blobs

    from skdeepmix import GaussianMixture
    from skdeepmix import _gaussian as G
    from skdeepmix._torch_utils import run_in_threads

    K, d = 16, 32
    X = torch.tensor(make_blobs(n_samples, d, centers=K, random_state=0)[0], dtype=torch.float32)
    rows = GaussianMixture(K, covariance_type=covariance_type, dtype="float32")
    rows.n_features_in_ = d
    chunk = rows._rows_per_chunk(X.device)
    starts = list(range(0, n_samples, chunk))
    half = (len(starts) + 1) // 2
    center = X[:: max(1, n_samples // 4096)].mean(0)
    means = X[torch.randperm(n_samples, generator=torch.Generator().manual_seed(0))[:K]]
    P = {"full": torch.eye(d).expand(K, d, d).contiguous(), "tied": torch.eye(d),
         "diag": torch.ones(K, d), "spherical": torch.ones(K)}[covariance_type]
    log_weights = torch.full((K,), -float(np.log(K)))

    def run(part):
        em_pass = G.MixturePass(covariance_type, center, K, means=means,
                                precisions_cholesky=P, log_offsets=log_weights)
        for start in part:
            em_pass.add(X[start:start + chunk])
        return em_pass

    def split():
        first, second = run_in_threads([lambda: run(starts[:half]), lambda: run(starts[half:])])
        first.merge(second)

    # torch threads: 'split' runs as a fit does now, torch on one thread throughout
    modes = {"1 thread": (1, lambda: run(starts)), "torch pool": (2, lambda: run(starts)),
             "split": (1, split)}
    times = {mode: [] for mode in modes}
    for mode, (threads, function) in modes.items():  # back to back, as a fit's passes
        torch.set_num_threads(threads)
        time.sleep(0.2)  # the previous mode's pool threads stop spinning
        function()  # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            function()
            times[mode].append(1e3 * (time.perf_counter() - start))
    return {"chunk": chunk, "times": times}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke run (seconds)")
    parser.add_argument("--processes", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        kind, n, repeats = args.child
        print(json.dumps(one_process(kind, int(n), int(repeats))))
        return
    n_samples = 5_000 if args.quick else 100_000
    processes, repeats = (2, 2) if args.quick else (args.processes, args.repeats)
    rows = []
    for kind in ["full", "tied", "diag", "spherical"]:
        medians = {mode: [] for mode in MODES}
        slowest = {mode: 0.0 for mode in MODES}
        for _ in range(processes):
            out = subprocess.run([sys.executable, __file__, "--child", kind, str(n_samples),
                                  str(repeats)], check=True, capture_output=True, text=True)
            result = json.loads(out.stdout.strip().splitlines()[-1])
            for mode in MODES:
                medians[mode].append(float(np.median(result["times"][mode])))
                slowest[mode] = max(slowest[mode], max(result["times"][mode]))
        row = {"covariance": kind, "rows per chunk": result["chunk"]}
        for mode in MODES:
            values = medians[mode]
            row[f"{mode} ms: median (range over processes)"] = (
                f"{np.median(values):.1f} ({min(values):.1f}-{max(values):.1f})")
            row[f"{mode} slowest pass ms"] = f"{slowest[mode]:.1f}"
        print(row, flush=True)
        rows.append(row)
    text = [
        "# One EM pass on 2 CPU threads: split into runs of chunks, or on torch's pool",
        "",
        f"Generated by `python benchmarks/bench_pass_threads.py` on {machine(False)}.",
        "",
        f"Workload: `make_blobs({n_samples}, 32, centers=16)`, K=16, float32, the chunk size "
        "a fit uses; one E-step + statistics pass (`MixturePass`). "
        f"{processes} fresh processes; in each, per mode, a warm-up pass then {repeats} passes "
        "back to back (as a fit's iterations); "
        "per mode: the median over processes of the per-process medians, their range, "
        "and the slowest single pass. Modes: `1 thread`; `torch pool` = 2 torch threads "
        "(what the EM pass did before); `split` = two runs of chunks, one per thread, "
        "one torch thread each (what a fit does now).",
        "",
        table(rows),
        "",
    ]
    args.out.write_text("\n".join(text))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
