"""Choose DCGMMEstimator's defaults by validation, then test them (issue 13).

Tasks: leave-one-class-out outlier detection. Task ``c``: fit on images of the
other classes, score images of all classes, AUC of class ``c`` as the outlier
class (higher score = inlier).

* MNIST (``skdeepmix.datasets.load_mnist``): per task, ``--n-fit`` training
  images of the 9 inlier classes; a *validation* split drawn from the MNIST
  training set too (``--n-val`` inliers, ``--n-val-out`` images of class ``c``);
  the *test* split is the MNIST test set (10k images), used only in the report.
* digits (``sklearn.datasets.load_digits``, 8x8): per task a 70/30 split of the
  1797 images; validation only (used for the selection).

Stages (results are cached in a JSON file, so a stage can be resumed):

``select``
    Grid over ``n_components`` x ``min_variance`` x ``learning_rate`` of the
    default architecture ``"F-G"`` (plus ``EXTRA``: a larger ``n_components``,
    and settings that are stable for any ``n_components``), scored by the
    validation AUC on the selection tasks (MNIST classes ``--select``, and all
    10 digits tasks); the chosen defaults maximise the mean of (mean MNIST
    validation AUC, mean digits validation AUC) among the settings with
    ``learning_rate / min_variance <= STABLE``. No test split is read.
``report``
    All 10 MNIST tasks on the test split: ``DCGMMEstimator()`` with the code's
    defaults (``--seeds`` seeds); DCGMM tuned per task (``TUNED``:
    ``n_components`` x ``min_variance`` at the default learning rate, chosen by
    the task's validation AUC); the flat diagonal
    ``sklearn.mixture.GaussianMixture`` with as many components as the default
    ``n_components``, ``reg_covar`` chosen per task on the validation split,
    (a) by validation AUC and (b) by held-out log-likelihood (what a user without
    outlier labels can do). Writes ``benchmarks/results/defaults_dcgmm.md``.

Usage::

    nice -n 10 python benchmarks/validate_dcgmm.py --stage select
    nice -n 10 python benchmarks/validate_dcgmm.py --stage report
"""

from __future__ import annotations

import argparse
import json
import platform
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture

from skdeepmix import DCGMMEstimator, TrainingDivergedError
from skdeepmix.datasets import load_mnist
from skdeepmix.metrics import outlier_auc

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "mnist"
RESULTS = ROOT / "benchmarks" / "results"

GRID = dict(n_components=(25, 49, 100), min_variance=(0.01, 0.02, 0.05, 0.1),
            learning_rate=(0.05, 0.1, 0.2))
#: beyond the grid: does a larger K keep helping? And settings that satisfy
#: the stability rule (see STABLE) at the smaller variance floors
EXTRA = [dict(n_components=196, min_variance=v, learning_rate=0.1) for v in (0.01, 0.02)] + [
    dict(n_components=k, min_variance=v, learning_rate=r) for k in (25, 49, 100)
    for v, r in ((0.01, 0.015), (0.02, 0.03), (0.05, 0.075))]
#: stability rule of the defaults: a plain gradient step on the means of a
#: component that wins every row (n_components=1, or a dominant component) has
#: curvature up to 1/min_variance, so it is stable only below
#: learning_rate / min_variance = 2; the defaults must keep a margin (<= 1.5),
#: else small n_components diverge (checked: K=1, 2 on digits at 0.1 / 0.02)
STABLE = 1.5
#: the per-task tuned rows: n_components x min_variance at the default learning rate
TUNED = dict(n_components=(25, 49, 100), min_variance=(0.01, 0.02, 0.05))
REG_COVARS = (1e-6, 1e-4, 1e-3, 1e-2, 0.05, 0.1)


def config_key(config):
    return ",".join(f"{k}={config[k]}" for k in sorted(config))


class Cache:
    """JSON results keyed by ``task|method|config|seed``."""

    def __init__(self, path):
        self.path = Path(path)
        self.data = json.loads(self.path.read_text()) if self.path.exists() else {}

    def get(self, *key, compute):
        name = "|".join(str(k) for k in key)
        if name not in self.data:
            self.data[name] = compute()
            self.path.write_text(json.dumps(self.data, indent=1, sort_keys=True))
        return self.data[name]


def mnist_task(images, labels, c, n_fit, n_val, n_val_out):
    """Fit and validation splits of MNIST task ``c`` (all from the training set)."""
    rng = np.random.RandomState(100 + c)
    inliers = rng.permutation(np.flatnonzero(labels != c))
    outliers = rng.permutation(np.flatnonzero(labels == c))[:n_val_out]
    fit = inliers[:n_fit]
    val = np.concatenate([inliers[n_fit:n_fit + n_val], outliers])
    return images[fit], images[val], labels[val] == c


def digits_task(c):
    X, y = load_digits(return_X_y=True)
    X = X / 16.0
    order = np.random.RandomState(200 + c).permutation(len(X))
    cut = int(0.7 * len(X))
    train, val = order[:cut], order[cut:]
    fit = train[y[train] != c]
    return X[fit], X[val], y[val] == c


def auc(scores, is_outlier):
    return float(outlier_auc(scores[~is_outlier], scores[is_outlier]))


def fit_dcgmm(X_fit, config, seed):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        start = time.perf_counter()
        est = DCGMMEstimator(random_state=seed, device="cpu", **config).fit(X_fit)
        elapsed = time.perf_counter() - start
    converged = not any(issubclass(w.category, ConvergenceWarning) for w in caught)
    return est, dict(time=elapsed, n_iter=est.n_iter_, converged=converged)


def dcgmm_val(X_fit, X_val, out_val, config, seed=0):
    try:
        est, info = fit_dcgmm(X_fit, config, seed)
    except TrainingDivergedError as exc:  # a setting of the grid that diverges
        return dict(val_auc=float("nan"), converged=False, error=str(exc))
    return dict(info, val_auc=auc(est.score_samples(X_val), out_val))


def select(args, cache):
    images, labels = load_mnist(args.data, subset="train")
    configs = [dict(n_components=k, min_variance=v, learning_rate=r)
               for k in GRID["n_components"] for v in GRID["min_variance"]
               for r in GRID["learning_rate"]] + EXTRA
    table = []
    for config in configs:
        mnist = []
        for c in args.select:
            X_fit, X_val, out_val = mnist_task(images, labels, c, args.n_fit, args.n_val,
                                               args.n_val_out)
            r = cache.get("mnist", c, "dcgmm", config_key(config), 0,
                          compute=lambda: dcgmm_val(X_fit, X_val, out_val, config))
            mnist.append(r)
        digits = []
        for c in range(10):
            X_fit, X_val, out_val = digits_task(c)
            r = cache.get("digits", c, "dcgmm", config_key(config), 0,
                          compute=lambda: dcgmm_val(X_fit, X_val, out_val, config))
            digits.append(r)
        m = float(np.mean([r["val_auc"] for r in mnist]))  # nan if one diverged
        d = float(np.mean([r["val_auc"] for r in digits]))
        table.append((config, m, d, (m + d) / 2 if m == m and d == d else -1.0,
                      all(r["converged"] for r in mnist + digits)))
        print(f"{config_key(config)}: MNIST val AUC {m:.4f}, digits val AUC {d:.4f}", flush=True)
    stable = [row for row in table if row[0]["learning_rate"] / row[0]["min_variance"] <= STABLE]
    best = max(stable, key=lambda row: row[3])
    print("chosen:", config_key(best[0]))
    return table, best


def baseline_val(X_fit, X_val, out_val, X_test, out_test, k, reg):
    start = time.perf_counter()
    gm = GaussianMixture(k, covariance_type="diag", reg_covar=reg, random_state=0,
                         max_iter=100).fit(X_fit)
    elapsed = time.perf_counter() - start
    inl = X_val[~out_val]
    return dict(val_auc=auc(gm.score_samples(X_val), out_val), val_ll=float(gm.score(inl)),
                test_auc=auc(gm.score_samples(X_test), out_test), time=elapsed,
                n_iter=int(gm.n_iter_))


def report(args, cache, table, best):
    images, labels = load_mnist(args.data, subset="train")
    X_test, y_test = load_mnist(args.data, subset="test")
    defaults = DCGMMEstimator().get_params()
    k_default = defaults["n_components"]
    tuned_configs = [dict(n_components=k, min_variance=v)
                     for k in TUNED["n_components"] for v in TUNED["min_variance"]]
    rows = []
    for c in range(10):
        out_test = y_test == c
        X_fit, X_val, out_val = mnist_task(images, labels, c, args.n_fit, args.n_val,
                                           args.n_val_out)

        def default_run(seed):
            est, info = fit_dcgmm(X_fit, {}, seed)
            return dict(info, test_auc=auc(est.score_samples(X_test), out_test),
                        val_auc=auc(est.score_samples(X_val), out_val))

        runs = [cache.get("mnist", c, "defaults", "", seed, compute=lambda: default_run(seed))
                for seed in range(args.seeds)]

        def tuned_run(config):
            est, info = fit_dcgmm(X_fit, config, 0)
            return dict(info, val_auc=auc(est.score_samples(X_val), out_val),
                        test_auc=auc(est.score_samples(X_test), out_test))

        tuned = [(config, cache.get("mnist", c, "tuned", config_key(config), 0,
                                    compute=lambda: tuned_run(config)))
                 for config in tuned_configs]
        tuned_config, tuned_result = max(tuned, key=lambda t: t[1]["val_auc"])
        base = {reg: cache.get("mnist", c, "gmm", f"k={k_default},reg={reg}", 0,
                               compute=lambda: baseline_val(X_fit, X_val, out_val, X_test,
                                                            out_test, k_default, reg))
                for reg in REG_COVARS}
        by_auc = max(base, key=lambda r: base[r]["val_auc"])
        by_ll = max(base, key=lambda r: base[r]["val_ll"])
        rows.append(dict(task=c, runs=runs, tuned=(tuned_config, tuned_result), base=base,
                         by_auc=(by_auc, base[by_auc]), by_ll=(by_ll, base[by_ll])))
        print(f"task {c}: defaults {np.mean([r['test_auc'] for r in runs]):.4f}, tuned "
              f"{tuned_result['test_auc']:.4f}, GMM(reg by val AUC {by_auc:g}) "
              f"{base[by_auc]['test_auc']:.4f}, GMM(reg by val LL {by_ll:g}) "
              f"{base[by_ll]['test_auc']:.4f}", flush=True)
    write_report(args, cache, table, best, rows, defaults)


def verdict(value, reference, tie=0.005):
    return ("above" if value > reference + tie else "below" if value < reference - tie
            else "level with (within 0.005)")


def write_report(args, cache, table, best, rows, defaults):
    def mean(values):
        return float(np.mean(values))

    default_mean = [mean([r["test_auc"] for r in row["runs"]]) for row in rows]
    # the baseline's analogue of defaults: one reg_covar for every task, chosen by
    # the mean validation AUC on the selection tasks (as DCGMM's defaults)
    fixed = max(REG_COVARS, key=lambda reg: mean([rows[c]["base"][reg]["val_auc"]
                                                  for c in args.select]))
    lines = [
        "# DCGMMEstimator defaults, chosen by validation (issue 13)",
        "",
        f"Written by `nice -n 10 python benchmarks/validate_dcgmm.py --stage report` "
        f"({platform.processor() or platform.machine()}, CPU, 1 torch thread, shared 2-core "
        f"machine: times are indicative only). Script: `benchmarks/validate_dcgmm.py`; "
        f"cached results: `benchmarks/results/defaults_dcgmm.json`.",
        "",
        "**Protocol.** Task `c` = leave-one-class-out outlier detection: fit on the 9 "
        f"other classes, AUC of class `c` among all test images. MNIST: {args.n_fit} "
        f"training images per task; validation split from the MNIST *training* set "
        f"({args.n_val} inliers + {args.n_val_out} images of class `c`); test = the 10k "
        "MNIST test images, read only in this report. digits (`load_digits`, 8x8): 70/30 "
        "split, validation only. FashionMNIST (the paper's second task) is not available "
        "on this machine (no data, no internet), so it is not reported.",
        "",
        f"**Selection** (no test data): architecture `\"F-G\"` (DCGMM-A, the paper's best "
        "MNIST outlier detector, and the only architecture valid for any input, images "
        "or not); grid n_components x min_variance x learning_rate "
        f"{GRID['n_components']} x {GRID['min_variance']} x {GRID['learning_rate']} and "
        f"n_components=196 at learning_rate 0.1, min_variance 0.01/0.02; other "
        "settings at their defaults (batch 100, max_iter 20 with convergence, annealing 0.5); "
        f"score = mean of (mean validation AUC on MNIST tasks {tuple(args.select)}, mean "
        "validation AUC on the 10 digits tasks). Chosen: "
        f"`{config_key(best[0])}`, the best of the settings that are stable for any "
        "n_components: `learning_rate / min_variance <= 1.5` (a plain gradient step on the "
        "means of a component that wins every row has curvature up to 1/min_variance and "
        "is stable only below 2; `learning_rate=0.1, min_variance=0.02` diverges on digits "
        "with n_components=1 or 2, and the training loop raises TrainingDivergedError). A "
        "diverged fit scores -1.",
        "",
        "| n_components | min_variance | learning_rate | stable for any K | MNIST val AUC | "
        "digits val AUC | score | all converged |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for config, m, d, score, conv in sorted(table, key=lambda t: -t[3]):
        ok = config["learning_rate"] / config["min_variance"] <= STABLE
        lines.append(f"| {config['n_components']} | {config['min_variance']} | "
                     f"{config['learning_rate']} | {'yes' if ok else 'no'} | {m:.4f} | {d:.4f} | "
                     f"{score:.4f} | {conv} |")
    lines += [
        "",
        "**Test** (all 10 MNIST tasks). *defaults*: `DCGMMEstimator()` exactly as shipped "
        f"(nothing given but `random_state`; mean over {args.seeds} seeds; defaults: "
        f"n_components={defaults['n_components']}, min_variance={defaults['min_variance']}, "
        f"learning_rate={defaults['learning_rate']}, max_iter={defaults['max_iter']}, "
        f"tol={defaults['tol']}). *tuned* (labelled): n_components x min_variance "
        f"{TUNED['n_components']} x {TUNED['min_variance']} chosen per task by its "
        "validation AUC. Baseline: sklearn `GaussianMixture("
        f"{defaults['n_components']}, covariance_type='diag')`, reg_covar from "
        f"{REG_COVARS} chosen per task on the validation split by validation AUC (needs "
        "labelled outliers, like the tuned row) or by held-out log-likelihood of the "
        "validation inliers (what a user without outlier labels can do); and, the "
        "baseline's analogue of defaults, one reg_covar for all tasks chosen by the mean "
        f"validation AUC on the selection tasks {tuple(args.select)}: {fixed:g}.",
        "",
        "| held-out class | DCGMM defaults (seed mean ± std) | DCGMM tuned (config) | "
        "GMM, reg_covar per task by val AUC | GMM, reg_covar per task by val log-lik | "
        f"GMM, reg_covar={fixed:g} for all | defaults epochs, converged | defaults fit (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row, dm in zip(rows, default_mean):
        runs = row["runs"]
        tc, tr = row["tuned"]
        (ra, ba), (rl, bl) = row["by_auc"], row["by_ll"]
        lines.append(
            f"| {row['task']} | {dm:.4f} ± {np.std([r['test_auc'] for r in runs]):.4f} | "
            f"{tr['test_auc']:.4f} (K={tc['n_components']}, mv={tc['min_variance']}) | "
            f"{ba['test_auc']:.4f} ({ra:g}) | {bl['test_auc']:.4f} ({rl:g}) | "
            f"{row['base'][fixed]['test_auc']:.4f} | {'/'.join(str(r['n_iter']) for r in runs)}, "
            f"{all(r['converged'] for r in runs)} | {mean([r['time'] for r in runs]):.1f} |")
    tuned_mean = mean([row["tuned"][1]["test_auc"] for row in rows])
    auc_mean = mean([row["by_auc"][1]["test_auc"] for row in rows])
    ll_mean = mean([row["by_ll"][1]["test_auc"] for row in rows])
    fixed_mean = mean([row["base"][fixed]["test_auc"] for row in rows])
    total_minutes = sum(v.get("time", 0.0) for v in cache.data.values()) / 60
    lines += [
        f"| **mean** | **{mean(default_mean):.4f}** | {tuned_mean:.4f} | {auc_mean:.4f} | "
        f"{ll_mean:.4f} | {fixed_mean:.4f} | | |",
        "",
        f"Paper task (MNIST 1-9 vs 0, the row of class 0): defaults {default_mean[0]:.4f} "
        "(paper: DCGMM-A 0.954 after 40-80 epochs on all 54k images).",
        "",
        "**Verdict** (mean test AUC over the 10 tasks): the defaults "
        f"({mean(default_mean):.4f}) are {verdict(mean(default_mean), ll_mean)} the flat "
        f"GMM whose reg_covar a user picks by held-out log-likelihood ({ll_mean:.4f}) and "
        f"{verdict(mean(default_mean), fixed_mean)} the flat GMM with one reg_covar for "
        f"all tasks chosen like DCGMM's defaults ({fixed_mean:.4f}), but "
        f"{verdict(mean(default_mean), auc_mean)} the flat GMM whose reg_covar is tuned "
        f"per task on that task's labelled validation outliers ({auc_mean:.4f}); DCGMM "
        f"tuned the same way per task reaches {tuned_mean:.4f}. DCGMM-A is a diagonal GMM: "
        "trained by SGD on the max-component likelihood it is a slightly worse density "
        "than EM gives, and what it adds is a variance floor that works without outlier "
        "labels. Held-out log-likelihood picks tiny reg_covar values, which make poor "
        "outlier detectors.",
        "",
        f"Compute: {total_minutes:.0f} min of fits in all (selection and report, "
        "one thread, shared machine).",
    ]
    out = Path("/tmp/defaults_dcgmm_smoke.md") if args.smoke else RESULTS / "defaults_dcgmm.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", choices=("select", "report"), required=True)
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--n-fit", type=int, default=10000)
    parser.add_argument("--n-val", type=int, default=2000)
    parser.add_argument("--n-val-out", type=int, default=1000)
    parser.add_argument("--select", type=int, nargs="+", default=[0, 4, 7],
                        help="MNIST classes held out for the selection")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--cache", default=str(RESULTS / "defaults_dcgmm.json"))
    parser.add_argument("--smoke", action="store_true",
                        help="tiny grid and sizes, results in /tmp (checks the script runs)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if not Path(args.data).exists():
        raise SystemExit(f"MNIST not found in {args.data}")
    if args.smoke:
        GRID.update(n_components=(4,), min_variance=(0.05,), learning_rate=(0.05,))
        args.n_fit, args.n_val, args.n_val_out, args.select, args.seeds = 300, 100, 50, [0], 1
        args.cache = "/tmp/defaults_dcgmm_smoke.json"
        Path(args.cache).unlink(missing_ok=True)
    cache = Cache(args.cache)
    table, best = select(args, cache)
    if args.stage == "report":
        report(args, cache, table, best)


if __name__ == "__main__":
    main()
