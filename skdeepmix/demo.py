"""The main demo: skdeepmix estimators beside scikit-learn's GaussianMixture.

Runs on the digits data that ships with scikit-learn (1797 images of 8×8
pixels, 64 features), split into train and test halves::

    python -m skdeepmix.demo            # every estimator
    python -m skdeepmix.demo --only GaussianMixture

For each model it prints the fit time, the mean test log-likelihood
(``score``; for models of different input spaces it is marked), and how well
its clusters match the digit labels (adjusted Rand index, NMI, Hungarian
accuracy).
"""

from __future__ import annotations

import argparse
import importlib
import time
import warnings

import numpy as np
from sklearn.datasets import load_digits
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score
from sklearn.mixture import GaussianMixture as SklearnGaussianMixture
from sklearn.model_selection import train_test_split

from skdeepmix.metrics import clustering_accuracy


def _candidates(seed):
    """(name, factory, note) for every model in the demo.

    Pixels of the digits are constant (always 0) in places, so the covariances
    get ``reg_covar=1e-2`` (pixel scale [0, 1]) to keep the test likelihoods
    about the model and not about degenerate pixels.
    """
    from skdeepmix import GaussianMixture

    models = [
        ("sklearn GaussianMixture (diag, 10)", lambda: SklearnGaussianMixture(
            10, covariance_type="diag", reg_covar=1e-2, random_state=seed), "baseline"),
        ("skdeepmix GaussianMixture (diag, 10)", lambda: GaussianMixture(
            10, covariance_type="diag", reg_covar=1e-2, random_state=seed), "float64"),
        ("skdeepmix GaussianMixture (diag, 10, f32)", lambda: GaussianMixture(
            10, covariance_type="diag", reg_covar=1e-2, random_state=seed,
            dtype="float32"), "float32"),
        ("sklearn GaussianMixture (full, 10)", lambda: SklearnGaussianMixture(
            10, covariance_type="full", reg_covar=1e-2, random_state=seed), "baseline"),
        ("skdeepmix GaussianMixture (full, 10)", lambda: GaussianMixture(
            10, covariance_type="full", reg_covar=1e-2, random_state=seed), "float64"),
    ]
    for name, module, class_name, params in _DEEP_MODELS:
        try:
            estimator = getattr(importlib.import_module(module), class_name)
        except (ImportError, AttributeError):  # not part of this version
            continue
        models.append(
            (name, lambda e=estimator, p=params: e(**p, random_state=seed), "deep")
        )
    return models


#: (row name, module, class name, parameters) of the deep models in the demo
_DEEP_MODELS = [
    ("CPMMEstimator (10 trajectories × 25)", "skdeepmix.cpmm", "CPMMEstimator",
     {"n_components": 10}),
    ("DeepGMMEstimator (layers 3×8 = 24 paths)", "skdeepmix.deep_gmm",
     "DeepGMMEstimator", {"n_components": (3, 8), "reg_covar": 1e-2}),
    ("DCGMMEstimator F(3,1)-G(25)-F-G(25) [top-G ll]", "skdeepmix.dcgmm", "DCGMMEstimator",
     {"layers": "F(3,1)-G(25)-F-G(25)", "image_shape": (8, 8), "max_iter": 30}),
    ("GMVAEDPGMM (truncation 20) [IW estimate]", "skdeepmix.gmvae_dpgmm", "GMVAEDPGMM",
     {"n_components": 20, "encoder_sizes": (256, 256), "batch_size": 64,
      "pretrain_iter": 20, "max_iter": 40, "tol": 0.0}),
]


def run(only=None, seed=0):
    """Fit every model of the demo and print a table; returns the rows."""
    X, y = load_digits(return_X_y=True)
    X = X / 16.0  # pixels in [0, 1]
    X_train, X_test, y_train, y_test = train_test_split(
        X, y, test_size=0.5, random_state=seed, stratify=y
    )
    print(f"digits: {X_train.shape[0]} train / {X_test.shape[0]} test samples, "
          f"{X.shape[1]} features\n")
    header = f"{'model':46s} {'fit s':>7s} {'test loglik':>12s} {'ARI':>6s} {'NMI':>6s} {'acc':>6s} {'conv':>5s}"
    print(header)
    print("-" * len(header))
    rows = []
    for name, factory, note in _candidates(seed):
        if only and only.lower() not in name.lower():
            continue
        model = factory()
        start = time.perf_counter()
        with warnings.catch_warnings():  # shown as the 'conv' column instead
            warnings.simplefilter("ignore", ConvergenceWarning)
            model.fit(X_train)
        elapsed = time.perf_counter() - start
        labels = model.predict(X_test)
        row = {
            "model": name,
            "fit_seconds": elapsed,
            "test_loglik": float(model.score(X_test)),
            "ari": adjusted_rand_score(y_test, labels),
            "nmi": normalized_mutual_info_score(y_test, labels),
            "accuracy": clustering_accuracy(y_test, labels),
            "converged": bool(getattr(model, "converged_", True)),
        }
        rows.append(row)
        print(f"{name:46s} {elapsed:7.2f} {row['test_loglik']:12.2f} {row['ari']:6.3f} "
              f"{row['nmi']:6.3f} {row['accuracy']:6.3f} {'yes' if row['converged'] else 'no':>5s}")
    print("\ntest loglik: mean log-likelihood in nats per image of pixels scaled to [0, 1]."
          "\nconv: converged within max_iter (gradient-trained models often stop at max_iter)."
          "\n[IW estimate]: importance-weighted estimate (a lower bound) of log p(x) under a"
          "\nBernoulli pixel likelihood: not comparable with the Gaussian densities."
          "\n[top-G ll]: DCGMM's score is its top layer's log-likelihood (the paper's"
          "\noutlier score), not a density of the pixels. See doc/ for each model.")
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="run only models whose name contains this text")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    np.set_printoptions(precision=4, suppress=True)
    run(only=args.only, seed=args.seed)


if __name__ == "__main__":
    main()
