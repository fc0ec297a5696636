"""Profile of CPMMEstimator's fit: samples per second per epoch and where the time goes.

Fits the estimator for a few epochs on ``load_digits`` and on 6 000 MNIST
training images (``../shared/data/mnist``) and measures

* the CPU time of each epoch on the input space (samples per CPU second:
  with one thread, the work done, less disturbed by other processes than the
  wall time on a shared machine),
* its split into the ODE solve (forward: ``CPMMNet.trajectory``), the MFA
  log-density (forward: ``mixture_log_prob``), the backward pass, gradient
  clipping, the optimizer step and the rest (batching, noise, bookkeeping),
  by timing wrappers around those functions (CPU: every call is synchronous),
* the top torch operators by self CPU time over one epoch (``torch.profiler``).

``--code DIR`` imports ``skdeepmix`` from another checkout (e.g. an exported
older commit, for a before/after comparison on the same machine); the
configuration profiled is this version's defaults, passed explicitly
(``PROFILED``), so both checkouts run the same model. Run with one thread
(``--threads 1``, the default) under ``nice``; timings on a shared machine are
noisy, shares (%) and back-to-back ratios less so. The results file was made by

    git archive ee596e5 | tar -x -C /tmp/before   # the port, before the speed-ups
    for round in 1 2; do
      nice -n 10 python benchmarks/profile_cpmm.py --code /tmp/before \
          --label "before (round $round)" --json runs.jsonl
      nice -n 10 python benchmarks/profile_cpmm.py --label "after (round $round)" \
          --json runs.jsonl
    done
    python benchmarks/profile_cpmm.py --summarize runs.jsonl \
        benchmarks/results/profile_cpmm.md
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

#: the defaults, with the image layout given for MNIST (what a new user runs)
DATASETS = {
    "digits": {},
    "mnist": {"image_shape": (28, 28)},
}
#: the defaults of this version, passed explicitly so that an older checkout
#: (``--code``) profiles the same configuration
PROFILED = {"rank": 8, "hidden_size": 32, "ode_step_size": 0.5, "min_variance": 1e-4,
            "batch_size": 256, "learning_rate": 3e-3}


def load(name, n_mnist):
    if name == "digits":
        from sklearn.datasets import load_digits

        return load_digits().data
    from skdeepmix.datasets import load_mnist

    X, _ = load_mnist(ROOT.parent / "shared" / "data" / "mnist", subset="train",
                      n_samples=n_mnist, random_state=0)
    rng = np.random.RandomState(0)  # dequantised pixels in [0, 1), float32
    return ((255.0 * X + rng.uniform(size=X.shape)) / 256.0).astype(np.float32)


class Timers:
    """Accumulated wall time of wrapped functions, by category."""

    def __init__(self):
        self.total = defaultdict(float)
        self.calls = defaultdict(int)
        self.depth = 0

    def wrap(self, owner, attribute, category):
        original = getattr(owner, attribute)
        timers = self

        def timed(*args, **kwargs):
            if timers.depth:  # nested in another timed call: counted there
                return original(*args, **kwargs)
            timers.depth += 1
            start = time.process_time()
            try:
                return original(*args, **kwargs)
            finally:
                timers.total[category] += time.process_time() - start
                timers.calls[category] += 1
                timers.depth -= 1

        setattr(owner, attribute, timed)


def instrument(timers):
    import torch

    import skdeepmix.cpmm as est_module
    import skdeepmix.nn.cpmm as nn_module

    timers.wrap(nn_module.CPMMNet, "trajectory", "ODE solve (forward)")
    timers.wrap(nn_module, "mixture_log_prob", "MFA log-density (forward)")
    timers.wrap(torch.Tensor, "backward", "backward")
    timers.wrap(torch.nn.utils, "clip_grad_norm_", "gradient clipping")
    for cls in (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD, torch.optim.RMSprop):
        timers.wrap(cls, "step", "optimizer step")
    epochs = []
    original = est_module.CPMMEstimator._fit_iteration

    def fit_iteration(self, X, ctx):
        before = dict(timers.total)
        start = time.process_time()
        result = original(self, X, ctx)
        epochs.append((time.process_time() - start,
                       {k: timers.total[k] - before.get(k, 0.0) for k in timers.total}))
        return result

    est_module.CPMMEstimator._fit_iteration = fit_iteration
    return epochs


def profile(name, X, epochs, params, top):
    import torch

    from skdeepmix import CPMMEstimator

    timers = Timers()
    per_epoch = instrument(timers)
    kw = {**DATASETS[name], **PROFILED, "random_state": 0, "max_iter": epochs, "tol": 0.0,
          **params}
    est = CPMMEstimator(**kw)
    start, start_cpu = time.perf_counter(), time.process_time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        est.fit(X)
    fit_time, fit_cpu = time.perf_counter() - start, time.process_time() - start_cpu
    warm = per_epoch[1:] if len(per_epoch) > 1 else per_epoch  # the first epoch warms up
    epoch_time = float(np.mean([t for t, _ in warm]))
    shares = defaultdict(float)
    for t, parts in warm:
        for key, value in parts.items():
            shares[key] += value / t / len(warm)
    shares["other (batching, noise, bookkeeping)"] = 1.0 - sum(shares.values())
    # one more epoch under torch.profiler: the operators
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    est2 = CPMMEstimator(**{**kw, "max_iter": 1})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            est2.fit(X)
    ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total_self = sum(e.self_cpu_time_total for e in ops) or 1.0
    return {
        "dataset": name,
        "n_samples": int(X.shape[0]),
        "n_features": int(X.shape[1]),
        "params": {k: v for k, v in kw.items() if k not in ("random_state",)},
        "epochs_timed": len(warm),
        "epoch_seconds": epoch_time,  # CPU seconds
        "samples_per_second": X.shape[0] / epoch_time,
        "fit_seconds": fit_time,
        "fit_cpu_seconds": fit_cpu,
        "shares": dict(shares),
        "top_ops": [(e.key, 100.0 * e.self_cpu_time_total / total_self, e.count)
                    for e in ops[:top]],
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def markdown(result, label):
    lines = [
        f"#### {label}: {result['dataset']} ({result['n_samples']} x {result['n_features']})",
        "",
        f"Parameters: `{json.dumps(result['params'])}`; torch {result['torch']}, "
        f"{result['threads']} thread(s), {platform.machine()}.",
        "",
        f"* epoch: {result['epoch_seconds']:.2f} CPU s, "
        f"**{result['samples_per_second']:.0f} samples per CPU second** (mean of "
        f"{result['epochs_timed']} epochs after the first; noisy: shared machine)",
        f"* whole fit of {result['params']['max_iter']} epochs incl. initialisation: "
        f"{result['fit_cpu_seconds']:.1f} CPU s, {result['fit_seconds']:.1f} s wall",
        "",
        "| part of an epoch | share |",
        "|---|---|",
    ]
    for key, value in sorted(result["shares"].items(), key=lambda kv: -kv[1]):
        lines.append(f"| {key} | {100 * value:.1f} % |")
    lines += ["", "| top operators (self CPU time, one epoch) | share | calls |", "|---|---|---|"]
    for key, share, count in result["top_ops"]:
        lines.append(f"| `{key}` | {share:.1f} % | {count} |")
    return "\n".join(lines) + "\n"


CHANGES = """\
## What changed between *before* (commit ee596e5, the port to the redesigned base) and *after*

The configuration is the same in both (this version's defaults: rank 8, 32 hidden
units or channels, two RK4 steps, batch 256). The hot spots removed:

1. **Redundant ODE evaluations.** The cubic interpolation between the solver's grid
   points needs the slope `f(t_n, y_n)` at every grid point; torchdiffeq's RK4 computes
   it as the first stage of each step but does not return it, so the slopes were
   evaluated again (a Python loop over the grid). `nn.cpmm.fixed_grid_solve` steps
   Euler, midpoint and RK4 itself (torchdiffeq's formulas, tested equal) and keeps the
   first stages: with two RK4 steps, 9 instead of 13 evaluations of the CNN/MLP per
   solve, and as many fewer in the backward pass.
2. **Interpolation by gathers over the whole state.** The pseudotimes' states were
   gathered from the grid (four `(T, C, S)` index operations, `index_put` in the
   backward pass) over the full state, two thirds of which is the augmentation that the
   mixture never reads. Now: two `(T x grid)` matrix products over the MFA columns only.
3. **Convolutions in channels-first memory.** The CNN's input is now channels-last
   (oneDNN's preferred layout on the CPU; 1.2-1.35x per convolution in a
   micro-benchmark).

Already in *before* (part of the port): the training MFA density
(`_gaussian.mfa_log_prob_unchecked`) has no host-synchronising positive-definiteness
check per batch and takes the sample-dependent projections from one matrix product
(micro-benchmark, n=256, K=250, D=784, rank 4, float32, forward+backward: 127 -> 100 ms).
No per-batch host synchronisation remains in the epoch (the loss and log-likelihood
are accumulated on the device and read once per epoch).

What remains (after, MNIST): the CNN's convolutions (forward and backward, ~40 % of
an epoch), the MFA's matrix products (~25 %), copies between the state and channel
layouts. The default configuration is the larger lever: with the previous defaults
(128 channels, rank 4, RK4 step 0.25: 21 CNN evaluations per solve) one forward and
backward pass of the ODE alone took ~6 s (wall, busy machine); with the current ones a
whole step, MFA included, takes ~0.25 CPU s (an epoch of 24 steps ~6 CPU s).
"""


def summarize(jsonl, output, command):
    """Write the before/after report from the raw results of several runs."""
    results = [json.loads(line) for line in Path(jsonl).read_text().splitlines() if line]
    lines = [
        "# CPMMEstimator: where a fit's time goes, before and after the speed-ups",
        "",
        f"Commands: {command}. One torch thread, `nice -n 10`, on a 2-core machine shared "
        "with other jobs (load 6-14): **absolute times are noisy**; CPU seconds (not wall) "
        "are measured, and the before/after runs alternate back to back, so the shares "
        "and the ratios are the numbers to read.",
        "",
        "| dataset | run | epoch (CPU s) | samples per CPU second | speed-up vs the "
        "preceding before run |",
        "|---|---|---|---|---|",
    ]
    last_before = {}
    for r in results:
        ratio = ""
        if r["label"].startswith("before"):
            last_before[r["dataset"]] = r
        elif r["dataset"] in last_before:
            before = last_before[r["dataset"]]
            ratio = f"{before['epoch_seconds'] / r['epoch_seconds']:.2f}x"
        lines.append(f"| {r['dataset']} ({r['n_samples']} x {r['n_features']}) | "
                     f"{r['label']} | {r['epoch_seconds']:.2f} | "
                     f"{r['samples_per_second']:.0f} | {ratio} |")
    lines += ["", CHANGES, "## Where the time goes (the last before and after runs)", ""]
    last = {}
    for r in results:
        last[(r["dataset"], r["label"].split()[0])] = r
    for (dataset, kind), r in sorted(last.items(), key=lambda kv: (kv[0][0], kv[0][1] != "before")):
        lines.append(markdown(r, r["label"]))
    Path(output).write_text("\n".join(lines) + "\n")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["digits", "mnist"],
                        choices=sorted(DATASETS))
    parser.add_argument("--code", help="import skdeepmix from this folder")
    parser.add_argument("--label", default="profile")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--n-mnist", type=int, default=6000)
    parser.add_argument("--epochs", type=int, default=None,
                        help="epochs per fit (default: 6 on digits, 3 on MNIST)")
    parser.add_argument("--params", default="{}",
                        help="JSON dict of estimator parameters (default: the defaults)")
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--output", help="append the markdown tables to this file")
    parser.add_argument("--json", help="append the raw results (one JSON line each)")
    parser.add_argument("--summarize", nargs=2, metavar=("JSONL", "OUTPUT"),
                        help="write the before/after report from the raw results")
    args = parser.parse_args(argv)
    if args.summarize:
        summarize(*args.summarize, command="see the docstring of `benchmarks/profile_cpmm.py`")
        return
    sys.path.insert(0, str(Path(args.code).resolve() if args.code else ROOT))
    import torch

    torch.set_num_threads(args.threads)
    params = json.loads(args.params)
    if "image_shape" in params:
        params["image_shape"] = tuple(params["image_shape"])
    for name in args.datasets:
        epochs = args.epochs or {"digits": 6, "mnist": 3}[name]
        result = profile(name, load(name, args.n_mnist), epochs, params, args.top)
        text = markdown(result, args.label)
        print(text, flush=True)
        if args.output:
            with open(args.output, "a") as handle:
                handle.write(text + "\n")
        if args.json:
            with open(args.json, "a") as handle:
                handle.write(json.dumps({"label": args.label, **result}) + "\n")


if __name__ == "__main__":
    main()
