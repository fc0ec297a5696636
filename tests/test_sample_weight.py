"""``sample_weight`` in GaussianMixture and BayesianGaussianMixture.

Weights are frequencies: integer weights must give the model fitted on the
rows repeated that many times, zero weights the model fitted without the
rows. The equivalences are exact with the same explicit initial state (random
initialisations draw differently from weighted and repeated rows).
"""

import warnings

import numpy as np
import pytest
from sklearn.datasets import make_blobs
from sklearn.exceptions import ConvergenceWarning

from skdeepmix import BayesianGaussianMixture, GaussianMixture

from _gloo import run_on_ranks

COVARIANCE_TYPES = ["full", "tied", "diag", "spherical"]
PRIOR_TYPES = ["dirichlet_process", "dirichlet_distribution"]
GM_FITTED = ["weights_", "means_", "covariances_", "precisions_", "precisions_cholesky_"]
BGM_STATE = ["weight_concentration_", "mean_precision_", "means_", "degrees_of_freedom_",
             "covariances_", "precisions_cholesky_"]
BGM_FITTED = BGM_STATE + ["weights_", "precisions_", "mean_prior_", "covariance_prior_"]


def _data(n=150, seed=0):
    X, _ = make_blobs(n_samples=n, n_features=3, centers=3, cluster_std=[1.0, 1.5, 0.7],
                      random_state=seed)
    weights = np.random.RandomState(seed).randint(0, 4, size=n)  # zeros included
    return X, weights


def _rel_error(actual, expected):
    if isinstance(expected, tuple):
        actual, expected = np.stack(actual), np.stack(expected)
    actual, expected = np.asarray(actual, dtype=float), np.asarray(expected, dtype=float)
    return np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)), 1e-300)


def _assert_same_model(a, b, names, rtol=1e-6):
    for name in names:
        error = _rel_error(getattr(a, name), getattr(b, name))
        assert error <= rtol, f"{name}: relative error {error:.3g}"
    assert _rel_error(a.lower_bounds_, b.lower_bounds_) <= rtol
    assert a.n_iter_ == b.n_iter_


def _quiet(fit, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return fit(*args, **kwargs)


def _gm_init(covariance_type, n_components=3, n_features=3, seed=1):
    rng = np.random.RandomState(seed)
    _, _, centers = make_blobs(n_samples=3, n_features=3, centers=3, random_state=0,
                               return_centers=True)  # those of _data()
    means = centers + rng.normal(0, 1, size=(n_components, n_features))
    precisions = {
        "full": np.stack([np.eye(n_features) * rng.uniform(0.3, 1.0)
                          for _ in range(n_components)]),
        "tied": np.eye(n_features) * 0.5,
        "diag": rng.uniform(0.3, 1.0, size=(n_components, n_features)),
        "spherical": rng.uniform(0.3, 1.0, size=n_components),
    }[covariance_type]
    return dict(weights_init=np.full(n_components, 1.0 / n_components), means_init=means,
                precisions_init=precisions)


def _gm(covariance_type, **extra):
    return GaussianMixture(3, covariance_type=covariance_type, tol=0.0, max_iter=25,
                           **_gm_init(covariance_type), **extra)


def _bgm(covariance_type, prior_type, X, **extra):
    """A BayesianGaussianMixture that starts from a fixed state (warm start)."""
    start = BayesianGaussianMixture(n_components=3, covariance_type=covariance_type,
                                    weight_concentration_prior_type=prior_type,
                                    max_iter=0, random_state=0).fit(X)
    model = BayesianGaussianMixture(n_components=3, covariance_type=covariance_type,
                                    weight_concentration_prior_type=prior_type, tol=0.0,
                                    max_iter=25, warm_start=True, **extra)
    for name in BGM_STATE:
        setattr(model, name, getattr(start, name))
    model.converged_, model.lower_bound_ = False, -np.inf
    return model


# ----------------------------------------------------------- equivalences
@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_gaussian_mixture_integer_weights_are_repeated_rows(covariance_type):
    X, w = _data()
    weighted = _quiet(_gm(covariance_type).fit, X, sample_weight=w)
    repeated = _quiet(_gm(covariance_type).fit, np.repeat(X, w, axis=0))
    _assert_same_model(weighted, repeated, GM_FITTED)
    np.testing.assert_allclose(weighted.score_samples(X), repeated.score_samples(X), rtol=1e-6)


@pytest.mark.parametrize("prior_type", PRIOR_TYPES)
@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_bayesian_mixture_integer_weights_are_repeated_rows(covariance_type, prior_type):
    X, w = _data()
    weighted = _quiet(_bgm(covariance_type, prior_type, X).fit, X, sample_weight=w)
    repeated = _quiet(_bgm(covariance_type, prior_type, X).fit, np.repeat(X, w, axis=0))
    _assert_same_model(weighted, repeated, BGM_FITTED)
    assert _rel_error(weighted.lower_bound_, repeated.lower_bound_) <= 1e-6


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_zero_weights_are_dropped_rows(covariance_type):
    X, w = _data()
    kept = w > 0
    ones = kept.astype(float)
    for make, names in [
        (lambda: _gm(covariance_type), GM_FITTED),
        (lambda: _bgm(covariance_type, "dirichlet_process", X), BGM_FITTED),
    ]:
        weighted = _quiet(make().fit, X, sample_weight=ones)
        dropped = _quiet(make().fit, X[kept])
        _assert_same_model(weighted, dropped, names)


def test_partial_fit_and_fit_predict_take_weights():
    X, w = _data()
    half = len(X) // 2
    weighted, repeated = _gm("diag"), _gm("diag")
    for rows in (slice(0, half), slice(half, None)):
        weighted.partial_fit(X[rows], sample_weight=w[rows])
        repeated.partial_fit(np.repeat(X[rows], w[rows], axis=0))
    for name in GM_FITTED:
        assert _rel_error(getattr(weighted, name), getattr(repeated, name)) <= 1e-6, name
    for model in (GaussianMixture(3, random_state=0),
                  BayesianGaussianMixture(n_components=3, random_state=0)):
        labels = model.fit_predict(X, sample_weight=w)
        np.testing.assert_array_equal(labels, model.predict(X))


def test_weighted_kmeans_initialisation_ignores_zero_weight_rows():
    X, _ = make_blobs(n_samples=300, n_features=2, centers=[[0, 0], [6, 0], [0, 6]],
                      cluster_std=0.5, random_state=0)
    outliers = np.full((30, 2), 100.0) + np.random.RandomState(0).normal(size=(30, 2))
    Xo = np.vstack([X, outliers])
    w = np.r_[np.ones(len(X)), np.zeros(len(outliers))]
    for init_params in ["kmeans", "k-means++", "random_from_data"]:
        for cls in (GaussianMixture, BayesianGaussianMixture):
            model = cls(n_components=3, init_params=init_params, random_state=0,
                        max_iter=0).fit(Xo, sample_weight=w)
            assert np.abs(model.means_).max() < 10, (cls.__name__, init_params)


def test_memmap_with_weights_equals_in_memory(tmp_path):
    X, w = _data()
    np.save(tmp_path / "X.npy", X)
    mapped = np.load(tmp_path / "X.npy", mmap_mode="r")
    for make in (lambda: GaussianMixture(3, random_state=0, tol=1e-8),
                 lambda: BayesianGaussianMixture(n_components=3, random_state=0, tol=1e-8)):
        memory = make().fit(X, sample_weight=w)
        streamed = make().fit(mapped, sample_weight=w)
        assert _rel_error(streamed.means_, memory.means_) <= 1e-10


# ------------------------------------------------------------- bad weights
BAD_WEIGHTS = [
    (-np.ones(150), "Negative values in data passed to `sample_weight`"),
    (np.r_[np.nan, np.ones(149)], "Input sample_weight contains NaN"),
    (np.ones(149), r"sample_weight.shape == \(149,\), expected \(150,\)"),
    (np.ones((150, 2)), "Sample weights must be 1D array or scalar"),
    (np.zeros(150), "Sample weights must contain at least one non-zero number"),
    (np.r_[np.ones(2), np.zeros(148)], "Expected n_samples >= n_components"),
]


@pytest.mark.parametrize("weights, message", BAD_WEIGHTS)
@pytest.mark.parametrize("cls", [GaussianMixture, BayesianGaussianMixture])
def test_bad_weights_raise_clear_errors(cls, weights, message):
    X, _ = _data()
    with pytest.raises(ValueError, match=message):
        cls(n_components=3).fit(X, sample_weight=weights)
    with pytest.raises(ValueError, match=message):
        cls(n_components=3).fit_predict(X, sample_weight=weights)
    if cls is GaussianMixture:
        with pytest.raises(ValueError, match=message):
            cls(n_components=3).partial_fit(X, sample_weight=weights)


def test_bayesian_default_covariance_prior_needs_total_weight_above_one():
    X, _ = _data()
    small = np.full(len(X), 0.005)
    with pytest.raises(ValueError, match="sum of sample_weight .* above 1"):
        BayesianGaussianMixture(n_components=2).fit(X, sample_weight=small)
    model = BayesianGaussianMixture(n_components=2, covariance_prior=np.eye(3))
    assert np.isfinite(_quiet(model.fit, X, sample_weight=small).lower_bound_)


# ------------------------------------------------------------- distributed
INITS = ["kmeans", "k-means++", "random_from_data"]


def _distributed_fits(X, w, split=None):
    """The weighted fits of the 2-process test, on all rows or on a shard."""
    rows = slice(None) if split is None else split
    results = {}
    for init_params in INITS:
        for cls in (GaussianMixture, BayesianGaussianMixture):
            model = cls(n_components=3, covariance_type="diag", init_params=init_params,
                        random_state=3, chunk_size=40, device="cpu", max_iter=30, tol=1e-8)
            _quiet(model.fit, X[rows], sample_weight=w[rows])
            results[cls.__name__, init_params] = {
                "means_": model.means_, "weights_": model.weights_,
                "lower_bound_": model.lower_bound_, "n_iter_": model.n_iter_,
            }
    return results


def _weighted_fits_on_a_shard(rank):
    X, w = _data(n=240, seed=1)
    split = slice(0, 100) if rank == 0 else slice(100, None)  # unequal shards
    return _distributed_fits(X, w, split)


def test_distributed_weighted_fits_equal_the_single_process_fit():
    ranks = run_on_ranks(_weighted_fits_on_a_shard)
    single = _distributed_fits(*_data(n=240, seed=1))
    for key, expected in single.items():
        for rank, results in enumerate(ranks):
            got = results[key]
            assert got["n_iter_"] == expected["n_iter_"], (key, rank)
            for name in ("means_", "weights_", "lower_bound_"):
                error = _rel_error(got[name], expected[name])
                assert error <= 1e-7, f"{key} rank {rank} {name}: {error:.3g}"
        np.testing.assert_array_equal(ranks[0][key]["means_"], ranks[1][key]["means_"])
