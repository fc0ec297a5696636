"""Threads: default fits with torch's default thread count against one thread.

Times the default ``fit`` of every estimator on ``load_digits`` (pixels / 16,
float64, as a user would pass them) in fresh processes, once with the
environment as it is (torch's default threads) and once with
``OMP_NUM_THREADS=1``, interleaved, ``--repeats`` times each (the median is
kept). Run it twice, on an idle machine and with one other process keeping a
core busy; each run appends its section to ``results/threads.md``::

    python benchmarks/bench_threads.py --label idle
    ../shared/tools/with_busy_core.sh python benchmarks/bench_threads.py --label "one core busy"

The target: default / one-thread <= 1.5 in every case.

``--data mnist`` fits on the 6 000 dequantised MNIST training images of
``validate_cpmm.py`` instead (float32; needs ``../shared/data/mnist``), e.g. the
default CPMM fit of issue 13::

    python benchmarks/bench_threads.py --data mnist --repeats 1 \
        --estimators 'CPMMEstimator(image_shape=(28, 28))'
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import subprocess
import sys
from datetime import date
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "threads.md"
ESTIMATORS = [
    "GaussianMixture(10)",
    "BayesianGaussianMixture(n_components=10)",
    "DeepGMMEstimator()",
    "CPMMEstimator()",
    "DCGMMEstimator()",
    "GMVAEDPGMM()",
]

_DATA = {
    "digits": "from sklearn.datasets import load_digits\nX = load_digits().data / 16.0",
    "mnist": "import sys\nsys.path.insert(0, {benchmarks!r})\n"
             "from validate_cpmm import load\nX = load('mnist')['train']",
}

_FIT = """
import time, warnings
import torch
import skdeepmix
{load}
estimator = eval("skdeepmix." + {spec!r})
estimator.set_params(random_state=0)
start = time.perf_counter()
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    estimator.fit(X)
print(time.perf_counter() - start, torch.get_num_threads())
"""


def fit_seconds(spec, one_thread, data="digits"):
    env = dict(os.environ)
    if one_thread:
        env["OMP_NUM_THREADS"] = "1"
    load = _DATA[data].format(benchmarks=str(Path(__file__).resolve().parent))
    out = subprocess.run([sys.executable, "-c", _FIT.format(spec=spec, load=load)], env=env,
                         capture_output=True, text=True, check=True)
    seconds, threads = out.stdout.split()
    return float(seconds), int(threads)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", default="idle", help="e.g. 'idle' or 'one core busy'")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--estimators", nargs="*", default=ESTIMATORS)
    parser.add_argument("--data", choices=sorted(_DATA), default="digits",
                        help="load_digits / 16, or 6 000 MNIST images as validate_cpmm.py")
    args = parser.parse_args(argv)
    rows = []
    for spec in args.estimators:
        default, single, threads = [], [], None
        for _ in range(args.repeats):
            seconds, threads = fit_seconds(spec, one_thread=False, data=args.data)
            default.append(seconds)
            single.append(fit_seconds(spec, one_thread=True, data=args.data)[0])
        d, s = statistics.median(default), statistics.median(single)
        rows.append((spec, threads, d, s, d / s))
        print(f"{spec:32s} default {d:7.2f} s   one thread {s:7.2f} s   ratio {d / s:.2f}",
              flush=True)
    header = not RESULTS.exists()
    with open(RESULTS, "a") as f:
        if header:
            f.write("# Default threads against one thread (default fits on load_digits)\n\n"
                    "Each fit runs in a fresh process; median of the repeats, interleaved. "
                    "'default' is the environment as it is (torch's default thread count "
                    "shown), 'one thread' sets `OMP_NUM_THREADS=1`. Target: ratio <= 1.5.\n")
        command = shlex.join(argv if argv is not None else sys.argv[1:])
        busy = " under `../shared/tools/with_busy_core.sh`" if "busy" in args.label else ""
        data = "" if args.data == "digits" else ", 6 000 MNIST images"
        f.write(f"\n## {args.label}{data} ({date.today()}, {platform.machine()}, {os.cpu_count()} "
                f"CPUs, {args.repeats} repeats)\n\nCommand: `python benchmarks/bench_threads.py "
                f"{command}`{busy}\n\n")
        f.write("| estimator (defaults) | torch threads | default s | one thread s | ratio |\n")
        f.write("|---|---|---|---|---|\n")
        for spec, threads, d, s, ratio in rows:
            f.write(f"| `{spec}` | {threads} | {d:.2f} | {s:.2f} | {ratio:.2f} |\n")


if __name__ == "__main__":
    main()
