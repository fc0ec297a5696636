"""The main demo: skdeepmix estimators beside scikit-learn's mixtures.

Runs on the digits data that ships with scikit-learn (1797 images of 8×8
pixels, 64 features), split into stratified train and test halves::

    python -m skdeepmix.demo                  # every estimator, 1 thread
    python -m skdeepmix.demo --only Gaussian  # rows whose name contains the text
    python -m skdeepmix.demo --threads 2

It prints two tables:

1. **Densities** (comparable): the mean log-likelihood of the test images
   under every model that defines a normalised density of the pixels. The
   pixels are dequantised once, ``x = (v + u) / 17`` with ``v`` in 0..16 and
   ``u ~ U[0, 1)`` drawn with the demo's seed, so that every density is a
   proper density on ``[0, 1)^64`` and none can grow without bound on a
   constant pixel.
2. **Clusters** against the digit labels, for every model that predicts a
   cluster (the deep models with their default parameters).

Every column is defined under the tables. The thread count is fixed inside
the demo (torch and the BLAS behind NumPy), so its numbers are the same on
every run with the same ``--threads`` and versions; only the times vary.
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score
from sklearn.mixture import BayesianGaussianMixture as SklearnBayesianGaussianMixture
from sklearn.mixture import GaussianMixture as SklearnGaussianMixture
from sklearn.model_selection import train_test_split
from threadpoolctl import threadpool_limits

from skdeepmix import (
    BayesianGaussianMixture,
    CPMMEstimator,
    DCGMMEstimator,
    DeepGMMEstimator,
    GaussianMixture,
    GMVAEDPGMM,
)
from skdeepmix.metrics import clustering_accuracy

#: rows of the density table: (name, factory(seed))
DENSITY_MODELS = [
    ("sklearn GaussianMixture(10, full)",
     lambda s: SklearnGaussianMixture(10, random_state=s)),
    ("skdeepmix GaussianMixture(10, full)",
     lambda s: GaussianMixture(10, random_state=s)),
    ("skdeepmix GaussianMixture(10, full), float32",
     lambda s: GaussianMixture(10, random_state=s, dtype="float32")),
    ("sklearn GaussianMixture(10, diag)",
     lambda s: SklearnGaussianMixture(10, covariance_type="diag", random_state=s)),
    ("skdeepmix GaussianMixture(10, diag)",
     lambda s: GaussianMixture(10, covariance_type="diag", random_state=s)),
    ("sklearn BayesianGaussianMixture(10, full)",
     lambda s: SklearnBayesianGaussianMixture(n_components=10, random_state=s)),
    ("skdeepmix BayesianGaussianMixture(10, full)",
     lambda s: BayesianGaussianMixture(n_components=10, random_state=s)),
    ("CPMMEstimator() defaults",
     lambda s: CPMMEstimator(random_state=s)),
    ("DeepGMMEstimator() defaults",
     lambda s: DeepGMMEstimator(random_state=s)),
]

#: extra rows of the cluster table (models whose score is not a pixel density)
CLUSTER_ONLY_MODELS = [
    ("DCGMMEstimator(image_shape=(8, 8)) defaults",
     lambda s: DCGMMEstimator(image_shape=(8, 8), random_state=s)),
    ("GMVAEDPGMM() defaults",
     lambda s: GMVAEDPGMM(random_state=s)),
]

COLUMNS = """\
Columns
  fit s      wall-clock seconds of `fit` on the training half (varies between runs)
  iter       iterations (EM) or epochs (gradient training) that `fit` ran
  conv       `converged_`: the fit met its `tol` before `max_iter`
  test nats  mean log p(x) of the test images in nats per image (higher is better),
             for the dequantised pixels x = (v + u) / 17 in [0, 1)^64; the rows of
             the density table are all normalised densities on that same space, so
             they compare directly (a difference of 1 nat = e times more likely)
  clusters   distinct clusters `predict` uses on the test half
  ARI        adjusted Rand index of the test clusters against the digit labels
             (1 = the same partition, about 0 = chance)
  NMI        normalised mutual information of clusters and labels (0 to 1)
  acc        the best one-to-one matching of clusters to digits (Hungarian
             algorithm), the fraction of test images it labels correctly; with
             more clusters than digits the unmatched clusters count as errors
The models in the cluster table only have their own scores, which are not
densities of the pixels: DCGMM's `score` is its top layer's log-likelihood (the
paper's outlier score), GMVAEDPGMM's an importance-weighted lower bound under
its decoder's likelihood."""


def load_data(seed=0):
    """Dequantised digits split in stratified halves.

    Returns
    -------
    X_train, X_test : ndarray of shape (n, 64), float64 in [0, 1)
    y_train, y_test : ndarray of shape (n,)
    """
    X, y = load_digits(return_X_y=True)
    rng = np.random.default_rng(seed)
    X = (X + rng.random(X.shape)) / 17.0
    return train_test_split(X, y, test_size=0.5, random_state=seed, stratify=y)


def evaluate(name, factory, data, seed):
    """Fit one model and measure it; returns a dict of the table's columns."""
    X_train, X_test, _, y_test = data
    model = factory(seed)
    start = time.perf_counter()
    with warnings.catch_warnings():  # reported in the 'conv' column instead
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(X_train)
    elapsed = time.perf_counter() - start
    labels = model.predict(X_test)
    return {
        "model": name,
        "fit_seconds": elapsed,
        "n_iter": int(np.max(getattr(model, "n_iter_", 0))),
        "converged": bool(getattr(model, "converged_", True)),
        "test_loglik": float(model.score(X_test)),
        "n_clusters": len(np.unique(labels)),
        "ari": adjusted_rand_score(y_test, labels),
        "nmi": normalized_mutual_info_score(y_test, labels),
        "accuracy": clustering_accuracy(y_test, labels),
    }


def _print_row(row, density):
    conv = "yes" if row["converged"] else "no"
    start = f"{row['model']:46s} {row['fit_seconds']:6.2f} {row['n_iter']:5d} {conv:>4s}"
    if density:
        print(f"{start} {row['test_loglik']:9.2f}")
    else:
        print(f"{start} {row['n_clusters']:8d} {row['ari']:6.3f} {row['nmi']:6.3f} "
              f"{row['accuracy']:6.3f}")


def _header(density):
    head = f"{'model':46s} {'fit s':>6s} {'iter':>5s} {'conv':>4s}"
    head += f" {'test nats':>9s}" if density else f" {'clusters':>8s} {'ARI':>6s} {'NMI':>6s} {'acc':>6s}"
    print(head)
    print("-" * len(head))


def run(only=None, seed=0, threads=1):
    """Fit the demo's models and print the two tables; returns the rows.

    Parameters
    ----------
    only : str, optional
        Run only the models whose name contains this text (case-insensitive).
    seed : int
        Seed of the split, the dequantisation noise and every model.
    threads : int
        CPU threads of torch and of NumPy's BLAS during the demo.

    Returns
    -------
    rows : list of dict
        One dict per model with the columns of the tables.
    """
    data = load_data(seed)
    selected = [(name, factory) for name, factory in DENSITY_MODELS + CLUSTER_ONLY_MODELS
                if not only or only.lower() in name.lower()]
    print(f"digits (scikit-learn): {len(data[0])} train / {len(data[1])} test images, "
          f"64 pixels, dequantised; seed {seed}; {threads} CPU thread(s); "
          f"torch {torch.__version__}\n")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    rows = []
    try:
        with threadpool_limits(limits=threads):
            for name, factory in selected:
                rows.append(evaluate(name, factory, data, seed))
                print(f"  fitted {name}", flush=True)
    finally:
        torch.set_num_threads(previous)
    density_names = {name for name, _ in DENSITY_MODELS}
    print("\nDensities of the test images (comparable across rows)")
    _header(density=True)
    for row in rows:
        if row["model"] in density_names:
            _print_row(row, density=True)
    print("\nClusters against the digit labels (test half)")
    _header(density=False)
    for row in rows:
        _print_row(row, density=False)
    print("\n" + COLUMNS)
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="run only models whose name contains this text")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads of torch and BLAS (default 1: reproducible numbers)")
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error("--threads must be at least 1")
    run(only=args.only, seed=args.seed, threads=args.threads)


if __name__ == "__main__":
    main()
