"""Defaults of ``DeepGMMEstimator`` against the best full GMM, chosen on validation.

Three density-estimation tasks (held-out log-likelihood in nats, higher is
better), each split into train / validation / test:

* ``bsds300``: 8x8 BSDS300 patches in the deep GMM paper's setup (dequantised,
  /256, patch mean removed, last pixel dropped: 63 dims). Train and
  validation patches come from the 200 train images (different seeds), test
  patches from the 100 test images.
* ``digits``: scikit-learn's ``load_digits`` (64 dims), dequantised as
  ``(v + u) / 17`` with ``u ~ U[0, 1)``; a seeded 60/20/20 split.
* ``mnist``: MNIST pixels dequantised as ``(v + u) / 256``, projected on the
  first 30 principal components of the training rows (a dense 30-dim task);
  train and validation rows from the 60k training set, test rows from the
  official 10k test set.
* ``mnist-logit``: the same MNIST rows through the logit transform
  ``logit(alpha + (1 - 2 alpha) x)``, alpha = 1e-6, before the projection.

Models:

* ``baseline``: scikit-learn's full-covariance ``GaussianMixture`` for
  ``K in (1, 2, 4, 8, 16, 32)`` (defaults otherwise); the ``K`` with the best
  validation log-likelihood is the baseline (the comparison of the paper).
* ``defaults``: ``DeepGMMEstimator(random_state=seed)``, nothing else set.
* ``tuned``: the best of a few deep GMMs on validation (labelled tuned).

The defaults were chosen on the validation splits only (``--search`` runs the
candidates); the test splits are used for the final report only.

Run (about an hour with one thread on a shared 2-core machine)::

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/validate_deep_gmm.py

``--quick`` is a small smoke run (its results file ends in ``_quick``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.decomposition import PCA
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture as SkGaussianMixture
from sklearn.model_selection import train_test_split

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from skdeepmix.datasets import load_mnist, make_bsds300_patches  # noqa: E402
from skdeepmix.deep_gmm import DeepGMMEstimator  # noqa: E402
from skdeepmix.nn.cpmm import logit_transform  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "benchmarks" / "results"
BASELINE_K = (1, 2, 4, 8, 16, 32)


# ------------------------------------------------------------------ data
def bsds300(n_train, n_val, n_test):
    images = DATA / "bsds300" / "images"
    return (
        make_bsds300_patches(images / "train", n_train, random_state=0),
        make_bsds300_patches(images / "train", n_val, random_state=2),
        make_bsds300_patches(images / "test", n_test, random_state=1),
    )


def digits():
    X = load_digits().data
    X = (X + np.random.RandomState(0).uniform(size=X.shape)) / 17.0
    X_train, X_rest = train_test_split(X, test_size=0.4, random_state=0)
    X_val, X_test = train_test_split(X_rest, test_size=0.5, random_state=1)
    return X_train, X_val, X_test


def mnist(n_train, n_val, n_test, n_dims=30, logit=False):
    folder = DATA / "mnist"
    rng = np.random.RandomState(0)
    X, _ = load_mnist(folder, subset="train", scale=False)
    X_test, _ = load_mnist(folder, subset="test", scale=False)
    order = rng.permutation(len(X))
    X_train, X_val = X[order[:n_train]], X[order[n_train : n_train + n_val]]
    X_test = X_test[rng.permutation(len(X_test))[:n_test]]
    dequantise = lambda A: (A + rng.uniform(size=A.shape)) / 256.0  # noqa: E731
    X_train, X_val, X_test = (dequantise(A) for A in (X_train, X_val, X_test))
    if logit:  # CPMM's logit transform (alpha = 1e-6); the task is the PCA space
        X_train, X_val, X_test = (logit_transform(torch.from_numpy(A))[0].numpy()
                                  for A in (X_train, X_val, X_test))
    pca = PCA(n_dims, random_state=0).fit(X_train)
    return tuple(pca.transform(A) for A in (X_train, X_val, X_test))


def load(name, quick):
    if name == "bsds300":
        return bsds300(*((3000, 2000, 2000) if quick else (30000, 10000, 10000)))
    if name in ("mnist", "mnist-logit"):
        return mnist(*((3000, 2000, 2000) if quick else (20000, 10000, 10000)),
                     logit=name == "mnist-logit")
    return digits()


def available(name):
    if name == "bsds300":
        return (DATA / "bsds300" / "images" / "train").is_dir()
    if name in ("mnist", "mnist-logit"):
        return (DATA / "mnist").is_dir()
    return True


# ---------------------------------------------------------------- models
def evaluate(model, splits):
    """Fit on the train split; validation and test log-likelihoods, fit seconds."""
    X_train, X_val, X_test = splits
    start = time.process_time()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        model.fit(X_train)
    return {
        "val": float(model.score(X_val)),
        "test": float(model.score(X_test)),
        "cpu_s": time.process_time() - start,
        "n_iter": int(getattr(model, "n_iter_", -1)),
        "converged": not any(issubclass(w.category, ConvergenceWarning) for w in caught),
    }


def baseline_rows(splits, seed):
    rows = []
    for K in BASELINE_K:
        model = SkGaussianMixture(K, covariance_type="full", random_state=seed)
        rows.append({"model": f"baseline: sklearn GaussianMixture(K={K}, full)", "K": K,
                     **evaluate(model, splits)})
    best = max(rows, key=lambda r: r["val"])
    for row in rows:
        row["kind"] = "baseline (chosen on validation)" if row is best else "baseline"
    return rows


def deep_row(kind, params, splits, seed):
    model = DeepGMMEstimator(**params, random_state=seed, device="cpu")
    label = ", ".join(f"{k}={v!r}" for k, v in params.items())
    return {"model": f"DeepGMMEstimator({label})", "kind": kind, **evaluate(model, splits)}


#: deep GMMs tried for the "tuned" rows (the one with the best validation score is kept)
TUNED = [
    {"n_components": (2, 2, 32), "prior_count": 4.0, "m_step_iter": 10},
    {"n_components": (2, 2, 32), "prior_count": 8.0, "m_step_iter": 10},
    {"n_components": (2, 2, 32), "prior_count": 16.0, "m_step_iter": 10},
]
#: candidate defaults compared by --search (validation only): the defaults
#: before 2026-12-01 and the two (2, 2, 32) models that beat them
SEARCH = [
    {"n_components": (2, 2, 16), "prior_count": 8.0, "m_step_iter": 50},
    {"n_components": (2, 2, 32), "prior_count": 6.0, "m_step_iter": 10},
    {"n_components": (2, 2, 32), "prior_count": 8.0, "m_step_iter": 10},
]
#: the defaults named in the reports: those the searches vary, and max_iter
SEARCHED = ("n_components", "prior_count", "m_step_iter", "max_iter")


def defaults_label():
    """``defaults (n_components=..., ...)``: which defaults a report's row ran."""
    params = DeepGMMEstimator().get_params()
    return "defaults (" + ", ".join(f"{k}={params[k]!r}" for k in SEARCHED) + ")"


def header(args, what):
    return [
        f"# DeepGMMEstimator {what}",
        "",
        f"Produced by `OMP_NUM_THREADS=1 nice -n 10 python benchmarks/validate_deep_gmm.py "
        f"{' '.join(sys.argv[1:])}` (real run, numbers not edited); torch threads "
        f"{torch.get_num_threads()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, "
        f"{platform.processor() or platform.machine()} with {os.cpu_count()} CPUs shared "
        "with other jobs (fit times are CPU seconds of this process, noisy).",
        "",
        "Data (see the module docstring): bsds300 = 8x8 BSDS300 patches, 63 dims, "
        f"{'3000/2000/2000' if args.quick else '30000/10000/10000'} train/validation/test "
        "(validation: other patches of the train images; test: the test images); digits = "
        "`load_digits` dequantised, 64 dims, 1078/359/360; mnist = MNIST dequantised, "
        f"PCA to 30 dims, {'3000/2000/2000' if args.quick else '20000/10000/10000'}. "
        "Scores: mean log-likelihood in nats (higher is better). Baseline: the best "
        "full-covariance scikit-learn GaussianMixture with K in "
        f"{BASELINE_K}, chosen on validation. Seed {args.seed}. The estimator's "
        f"{defaults_label()}.",
        "",
    ]


def run_report(args):
    rows = []
    for name in args.datasets:
        if not available(name):
            print(f"{name}: data not found under {DATA}; skipped", flush=True)
            continue
        splits = load(name, args.quick)
        found = baseline_rows(splits, args.seed)
        found.append(deep_row("defaults", {}, splits, args.seed))
        tuned = [deep_row("tuned candidate", p, splits, args.seed) for p in TUNED]
        max(tuned, key=lambda r: r["val"])["kind"] = "tuned (chosen on validation)"
        for row in found + tuned:
            row["dataset"] = name
            print(json.dumps(row), flush=True)
        rows += found + tuned
        write_report(args, rows)  # after every dataset: a stopped run keeps what it did


def write_report(args, rows):
    lines = header(args, "defaults against the best full GMM") + [
        "| dataset | model | kind | validation | test | converged | fit CPU s |",
        "|---|---|---|---:|---:|---|---:|",
    ]
    for r in rows:
        bold = "**" if r["kind"] in ("defaults", "baseline (chosen on validation)",
                                     "tuned (chosen on validation)") else ""
        lines.append(f"| {r['dataset']} | {r['model']} | {bold}{r['kind']}{bold} | "
                     f"{r['val']:.2f} | {r['test']:.2f} | {'yes' if r['converged'] else 'no'} "
                     f"| {r['cpu_s']:.1f} |")
    lines += ["", "## Summary (defaults minus the baseline chosen on validation)", "",
              "| dataset | defaults test | baseline test (K) | difference | defaults validation "
              "| baseline validation |", "|---|---:|---:|---:|---:|---:|"]
    for name in dict.fromkeys(r["dataset"] for r in rows):
        mine = [r for r in rows if r["dataset"] == name]
        default = next(r for r in mine if r["kind"] == "defaults")
        base = next(r for r in mine if r["kind"] == "baseline (chosen on validation)")
        lines.append(f"| {name} | {default['test']:.2f} | {base['test']:.2f} (K={base['K']}) | "
                     f"{default['test'] - base['test']:+.2f} | {default['val']:.2f} | "
                     f"{base['val']:.2f} |")
    write(args, "defaults_deep_gmm", lines)


def run_search(args):
    lines = header(args, "candidate defaults (validation only)") + [
        "| candidate | " + " | ".join(args.datasets) + " | mean gain over the baseline |",
        "|---|" + "---:|" * (len(args.datasets) + 1),
    ]
    splits = {name: load(name, args.quick) for name in args.datasets if available(name)}
    base = {name: max(r["val"] for r in baseline_rows(s, args.seed))
            for name, s in splits.items()}
    lines.insert(-2, "Baseline validation scores: " + ", ".join(
        f"{name} {value:.2f}" for name, value in base.items()) + "\n")
    candidates = SEARCH if args.candidates is None else [
        {k: tuple(v) if isinstance(v, list) else v for k, v in p.items()}
        for p in args.candidates]
    for params in candidates:
        scores = {}
        for name, s in splits.items():
            row = deep_row("search", params, s, args.seed)
            scores[name] = row["val"]
            print(json.dumps({"dataset": name, **row}), flush=True)
        gain = np.mean([scores[n] - base[n] for n in scores])
        label = ", ".join(f"{k}={v!r}" for k, v in params.items()) or defaults_label()
        lines.append(f"| {label} | " + " | ".join(f"{scores[n]:.2f}" for n in scores)
                     + f" | {gain:+.2f} |")
    stem = "defaults_deep_gmm_search" + ("" if args.candidates is None else f"_{args.name}")
    write(args, stem, lines)


def write(args, stem, lines):
    path = RESULTS / f"{stem}{'_quick' if args.quick else ''}.md"
    path.write_text("\n".join(lines) + "\n")
    print(f"wrote {path}", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small smoke run")
    parser.add_argument("--search", action="store_true",
                        help="compare the candidate defaults on the validation splits")
    parser.add_argument("--datasets", nargs="+",
                        default=["bsds300", "digits", "mnist", "mnist-logit"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--candidates", type=json.loads, default=None, metavar="JSON",
                        help="--search: a JSON list of parameter dicts to compare instead "
                             "of SEARCH (lists for tuples); writes "
                             "defaults_deep_gmm_search_<--name>.md")
    parser.add_argument("--name", default="candidates")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.search:
        run_search(args)
    else:
        run_report(args)


if __name__ == "__main__":
    main()
