"""skdeepmix.GaussianMixture against scikit-learn's GaussianMixture."""

import pickle
import warnings

import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.datasets import make_blobs
from sklearn.exceptions import ConvergenceWarning, NotFittedError
from sklearn.metrics import adjusted_rand_score
from sklearn.mixture import GaussianMixture as SklearnGaussianMixture
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.estimator_checks import parametrize_with_checks

from skdeepmix import GaussianMixture
from skdeepmix._kmeans import kmeans

from _scripts import run_quick

COVARIANCE_TYPES = ["full", "tied", "diag", "spherical"]


def _expected_failed_checks(estimator):
    if estimator.n_components == 1:
        return {}
    return {
        "check_sample_weight_equivalence_on_dense_data": (
            "with several components the k-means initialisation draws from the "
            "weighted rows and from the (shuffled) repeated rows differ, so EM may "
            "reach another local optimum; with one component, or with the same "
            "explicit init (tests/test_sample_weight.py), the fits are equal"
        )
    }


@parametrize_with_checks(
    [
        GaussianMixture(),
        GaussianMixture(n_components=2, covariance_type="diag", dtype="float32"),
    ],
    expected_failed_checks=_expected_failed_checks,
)
def test_sklearn_compatible(estimator, check):
    # Every check runs. scikit-learn itself skips check_array_api_input unless
    # the SCIPY_ARRAY_API environment variable is set before scipy is imported;
    # our estimators take numpy (or torch) input and do not dispatch on the
    # array API, so that skip is expected.
    check(estimator)


@pytest.fixture(scope="module")
def blobs():
    X, y = make_blobs(
        n_samples=1500, n_features=4, centers=3, cluster_std=[1.0, 1.5, 0.6], random_state=0
    )
    return X, y


def _initial_parameters(X, covariance_type, n_components, seed=0):
    rng = np.random.RandomState(seed)
    n_features = X.shape[1]
    means = X[rng.choice(len(X), n_components, replace=False)]
    weights = rng.dirichlet(np.ones(n_components) * 5)
    if covariance_type == "full":
        A = rng.normal(size=(n_components, n_features, n_features))
        precisions = A @ A.transpose(0, 2, 1) / n_features + np.eye(n_features)
    elif covariance_type == "tied":
        A = rng.normal(size=(n_features, n_features))
        precisions = A @ A.T / n_features + np.eye(n_features)
    elif covariance_type == "diag":
        precisions = rng.uniform(0.5, 2.0, size=(n_components, n_features))
    else:
        precisions = rng.uniform(0.5, 2.0, size=n_components)
    return dict(weights_init=weights, means_init=means, precisions_init=precisions)


def _assert_rel_close(actual, expected, rtol, name):
    actual, expected = np.asarray(actual, dtype=float), np.asarray(expected, dtype=float)
    scale = max(np.max(np.abs(expected)), 1e-300)
    error = np.max(np.abs(actual - expected)) / scale
    assert error <= rtol, f"{name}: relative error {error:.3g} > {rtol}"


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_matches_sklearn_with_same_initial_parameters(blobs, covariance_type):
    X, _ = blobs
    kwargs = dict(
        n_components=3,
        covariance_type=covariance_type,
        tol=1e-6,
        max_iter=60,
        **_initial_parameters(X, covariance_type, 3),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        ref = SklearnGaussianMixture(**kwargs).fit(X)
        ours = GaussianMixture(**kwargs, dtype="float64").fit(X)
    for name in ["weights_", "means_", "covariances_", "precisions_", "precisions_cholesky_"]:
        _assert_rel_close(getattr(ours, name), getattr(ref, name), 1e-6, name)
    assert ours.n_iter_ == ref.n_iter_
    assert ours.converged_ == ref.converged_
    _assert_rel_close(ours.lower_bound_, ref.lower_bound_, 1e-6, "lower_bound_")
    _assert_rel_close(ours.lower_bounds_, ref.lower_bounds_, 1e-6, "lower_bounds_")
    _assert_rel_close(ours.score_samples(X), ref.score_samples(X), 1e-6, "score_samples")
    _assert_rel_close(ours.predict_proba(X), ref.predict_proba(X), 1e-6, "predict_proba")
    np.testing.assert_array_equal(ours.predict(X), ref.predict(X))
    _assert_rel_close(ours.bic(X), ref.bic(X), 1e-6, "bic")
    _assert_rel_close(ours.aic(X), ref.aic(X), 1e-6, "aic")
    assert ours._n_parameters() == ref._n_parameters()


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_float32_matches_sklearn_with_same_initial_parameters(blobs, covariance_type):
    X, _ = blobs
    kwargs = dict(n_components=3, covariance_type=covariance_type, tol=0.0, max_iter=30,
                  **_initial_parameters(X, covariance_type, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        ref = SklearnGaussianMixture(**kwargs).fit(X)
        ours = GaussianMixture(**kwargs).fit(X.astype(np.float32))
    for name in ["weights_", "means_", "covariances_", "precisions_", "precisions_cholesky_"]:
        assert getattr(ours, name).dtype == np.float32, name
        _assert_rel_close(getattr(ours, name), getattr(ref, name), 1e-4, name)
    _assert_rel_close(ours.lower_bounds_, ref.lower_bounds_, 1e-4, "lower_bounds_")
    X32 = X.astype(np.float32)
    assert ours.score_samples(X32).dtype == np.float32
    _assert_rel_close(ours.score_samples(X32), ref.score_samples(X), 1e-4, "score_samples")


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_precisions_init_sets_the_cholesky_factors(blobs, covariance_type):
    """scikit-learn's test_gaussian_mixture_precisions_init through the public
    API: with max_iter=0 the fitted state is the given one (scikit-learn itself
    raises an AttributeError here: it sets no covariances_ when all three
    initial parameters are given)."""
    X, _ = blobs
    init = _initial_parameters(X, covariance_type, 3)
    model = GaussianMixture(3, covariance_type=covariance_type, max_iter=0, **init).fit(X)
    np.testing.assert_allclose(model.precisions_, init["precisions_init"], rtol=1e-12)
    np.testing.assert_allclose(model.means_, init["means_init"], rtol=1e-15)
    chol = model.precisions_cholesky_
    if covariance_type in ("full", "tied"):
        np.testing.assert_array_equal(chol, np.triu(chol))  # upper triangular
    covariances = model.covariances_
    if covariance_type in ("full", "tied"):
        np.testing.assert_allclose(covariances @ model.precisions_,
                                   np.broadcast_to(np.eye(4), covariances.shape), atol=1e-10)
    else:
        np.testing.assert_allclose(covariances * model.precisions_, 1.0, rtol=1e-12)


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_kmeans_initialisation_reaches_sklearn_likelihood(blobs, covariance_type):
    X, _ = blobs
    kwargs = dict(n_components=3, covariance_type=covariance_type, random_state=0)
    ref = SklearnGaussianMixture(**kwargs).fit(X)
    ours = GaussianMixture(**kwargs).fit(X)
    assert abs(ours.score(X) - ref.score(X)) <= 1e-3 * abs(ref.score(X))


@pytest.mark.parametrize("init_params", ["kmeans", "k-means++", "random", "random_from_data"])
def test_every_initialisation_is_seeded_and_sound(blobs, init_params):
    X, y = blobs
    make = lambda: GaussianMixture(  # noqa: E731
        n_components=3, init_params=init_params, random_state=3, max_iter=300
    )
    a, b = make().fit(X), make().fit(X)
    np.testing.assert_array_equal(a.means_, b.means_)
    assert a.converged_
    ref = SklearnGaussianMixture(n_components=3, random_state=0).fit(X)
    # every initialisation finds the three blobs on this easy problem
    assert adjusted_rand_score(y, a.predict(X)) > 0.9
    assert a.score(X) > ref.score(X) - 0.05


def test_fit_predict_equals_fit_then_predict(blobs):
    X, _ = blobs
    for max_iter in (1, 3, 100):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            labels = GaussianMixture(3, max_iter=max_iter, random_state=1).fit_predict(X)
            model = GaussianMixture(3, max_iter=max_iter, random_state=1).fit(X)
        np.testing.assert_array_equal(labels, model.predict(X))


def test_chunking_does_not_change_the_result(blobs):
    X, _ = blobs
    kwargs = dict(n_components=3, covariance_type="full", random_state=0, tol=1e-8)
    whole = GaussianMixture(**kwargs).fit(X)
    chunked = GaussianMixture(**kwargs, chunk_size=97).fit(X)
    _assert_rel_close(chunked.means_, whole.means_, 1e-9, "means_")
    _assert_rel_close(chunked.covariances_, whole.covariances_, 1e-9, "covariances_")
    _assert_rel_close(chunked.score_samples(X), whole.score_samples(X), 1e-9, "score_samples")


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_float32_is_safe_far_from_the_origin(covariance_type):
    # tiny variances around a huge offset: E[x^2] - E[x]^2 would be all rounding
    X, _ = make_blobs(n_samples=3000, n_features=3, centers=2, cluster_std=0.01, random_state=0)
    X = X + 1e4
    kwargs = dict(n_components=2, covariance_type=covariance_type, random_state=0, reg_covar=1e-9)
    f64 = GaussianMixture(**kwargs).fit(X)
    f32 = GaussianMixture(**kwargs, dtype="float32").fit(X.astype(np.float32))
    assert f32.covariances_.dtype == np.float32
    variances = {
        "full": lambda c: np.diagonal(c, axis1=1, axis2=2),
        "tied": np.diag,
        "diag": lambda c: c,
        "spherical": lambda c: c,
    }[covariance_type]
    assert np.all(variances(f32.covariances_) > 0)
    order32, order64 = np.argsort(f32.means_[:, 0]), np.argsort(f64.means_[:, 0])
    cov32, cov64 = f32.covariances_, f64.covariances_
    if covariance_type != "tied":
        cov32, cov64 = cov32[order32], cov64[order64]
    np.testing.assert_allclose(variances(cov32), variances(cov64), rtol=0.05)


def test_float32_matches_float64(blobs):
    X, _ = blobs
    f64 = GaussianMixture(3, random_state=0).fit(X)
    f32 = GaussianMixture(3, random_state=0, dtype="float32").fit(X)
    assert abs(f32.score(X) - f64.score(X)) < 1e-4 * abs(f64.score(X))
    assert f32.score_samples(X).dtype == np.float32


def test_works_in_pipeline_gridsearch_clone_and_pickle(blobs):
    X, y = blobs
    pipe = make_pipeline(StandardScaler(), GaussianMixture(3, random_state=0)).fit(X)
    assert adjusted_rand_score(y, pipe.predict(X)) > 0.9
    search = GridSearchCV(
        GaussianMixture(random_state=0),
        {"n_components": [1, 3], "covariance_type": ["full", "diag"]},
        cv=3,
    ).fit(X)
    assert search.best_params_["n_components"] == 3
    model = GaussianMixture(3, random_state=0).fit(X)
    cloned = clone(model)
    assert not hasattr(cloned, "means_") and cloned.get_params() == model.get_params()
    restored = pickle.loads(pickle.dumps(model))
    np.testing.assert_array_equal(restored.score_samples(X), model.score_samples(X))
    state = model.__getstate__()
    assert all(t.device.type == "cpu" for t in state["_params"].values())


def test_sample(blobs):
    X, _ = blobs
    for covariance_type in COVARIANCE_TYPES:
        model = GaussianMixture(3, covariance_type=covariance_type, random_state=0).fit(X)
        samples, labels = model.sample(20000)
        assert samples.shape == (20000, 4) and labels.shape == (20000,)
        assert np.all(np.diff(labels) >= 0)
        np.testing.assert_array_equal(model.sample(50)[0], model.sample(50)[0])
        for k in range(3):
            chosen = samples[labels == k]
            assert abs(len(chosen) / 20000 - model.weights_[k]) < 0.02
            np.testing.assert_allclose(chosen.mean(0), model.means_[k], atol=0.1)
        if covariance_type == "full":
            np.testing.assert_allclose(
                np.cov(samples[labels == 0].T), model.covariances_[0], atol=0.15
            )
    with pytest.raises(ValueError, match="n_samples"):
        model.sample(0)


def test_warm_start_continues(blobs):
    X, _ = blobs
    model = GaussianMixture(3, warm_start=True, max_iter=1, random_state=0, tol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(X)
        first = model.lower_bound_
        for _ in range(5):
            model.fit(X)
    assert model.lower_bound_ >= first
    cold = GaussianMixture(3, max_iter=6, random_state=0, tol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        cold.fit(X)
    _assert_rel_close(model.means_, cold.means_, 1e-8, "means_")


def test_convergence_warning_and_n_init(blobs):
    X, _ = blobs
    with pytest.warns(ConvergenceWarning, match="did not converge"):
        GaussianMixture(3, max_iter=1, random_state=0).fit(X)
    best = GaussianMixture(3, n_init=4, init_params="random", random_state=0).fit(X)
    single = [
        GaussianMixture(3, init_params="random", random_state=s).fit(X).lower_bound_
        for s in range(3)
    ]
    assert best.lower_bound_ >= min(single) - 1e-9


def test_dataframe_feature_names(blobs):
    pd = pytest.importorskip("pandas")
    X, _ = blobs
    frame = pd.DataFrame(X, columns=["a", "b", "c", "d"])
    model = GaussianMixture(2, random_state=0).fit(frame)
    np.testing.assert_array_equal(model.feature_names_in_, ["a", "b", "c", "d"])
    assert model.predict(frame).shape == (len(X),)


def test_verbose_shows_progress(blobs, capsys):
    X, _ = blobs
    GaussianMixture(3, verbose=2, verbose_interval=1, random_state=0).fit(X)
    captured = capsys.readouterr()
    assert "Iteration 1" in captured.out + captured.err


def test_torch_kmeans_matches_sklearn_inertia(blobs):
    from sklearn.cluster import KMeans

    X, _ = blobs
    generator = torch.Generator().manual_seed(0)
    centers, labels = kmeans(torch.as_tensor(X), 3, generator)
    inertia = float(((torch.as_tensor(X) - centers[labels]) ** 2).sum())
    ref = KMeans(3, n_init=1, random_state=0).fit(X)
    assert inertia <= ref.inertia_ * 1.001


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "X, message",
    [
        (np.array([[0.0, np.nan], [1.0, 2.0], [3.0, 4.0]]), "NaN"),
        (np.array([[0.0, np.inf], [1.0, 2.0], [3.0, 4.0]]), "infinity"),
        (np.arange(10.0), "Expected 2D array"),
        (np.zeros((4, 2, 2)), "dim 3"),
        (np.random.RandomState(0).normal(size=(2, 2)), "n_samples >= n_components"),
    ],
)
def test_bad_training_data(X, message):
    with pytest.raises(ValueError, match=message):
        GaussianMixture(n_components=3).fit(X)


@pytest.mark.parametrize(
    "params, message",
    [
        ({"reg_covar": -1.0}, "reg_covar"),
        ({"covariance_type": "banana"}, "covariance_type"),
        ({"n_components": 0}, "n_components"),
        ({"init_params": "nope"}, "init_params"),
        ({"dtype": "int8"}, "dtype"),
        ({"device": "tpu"}, "device"),
        ({"means_init": np.zeros((3, 5))}, "'means' should have the shape"),
        ({"precisions_init": np.ones((2, 4))}, "precision' should have the shape"),
        ({"precisions_init": -np.ones((2, 4, 4))}, "positive-definite"),
        ({"weights_init": np.array([0.7, 0.7])}, "normalized"),
    ],
)
def test_bad_parameters(blobs, params, message):
    X, _ = blobs
    with pytest.raises(ValueError, match=message):
        GaussianMixture(**{"n_components": 2, **params}).fit(X)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_without_gpu(blobs):
    X, _ = blobs
    with pytest.raises(ValueError, match="CUDA"):
        GaussianMixture(2, device="cuda").fit(X)


def test_not_fitted_and_wrong_n_features(blobs):
    X, _ = blobs
    with pytest.raises(NotFittedError):
        GaussianMixture().predict(X)
    model = GaussianMixture(2, random_state=0).fit(X)
    with pytest.raises(ValueError, match="features"):
        model.predict(X[:, :3])


def test_collapsed_component_error_names_the_remedy():
    X = np.vstack([np.zeros((50, 2)), np.ones((50, 2))])
    with pytest.raises(ValueError, match="reg_covar"):
        GaussianMixture(2, reg_covar=0.0, random_state=0).fit(X)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_fit_matches_cpu(blobs):
    X, _ = blobs
    cpu = GaussianMixture(3, random_state=0, device="cpu").fit(X)
    gpu = GaussianMixture(3, random_state=0, device="cuda").fit(X)
    assert abs(gpu.score(X) - cpu.score(X)) < 1e-6 * abs(cpu.score(X))


def test_benchmark_quick_run(tmp_path):
    """benchmarks/bench_gaussian_mixture.py --quick runs and writes its tables."""
    text = run_quick("bench_gaussian_mixture", tmp_path, "--no-memory")
    assert "shared, busy machine" in text and "float32 GEMM GFLOP/s" in text
    assert "## Lower bounds after 4 iterations" in text
    rows = [line.split(" | ") for line in text.splitlines()
            if line.startswith("| kmeans | far | full")]
    assert len(rows) == 2  # timings and lower bounds
    assert float(rows[1][8]) < 1e-9  # float64 lower bound, relative to scikit-learn's


def test_pass_threads_benchmark_quick_run(tmp_path):
    """benchmarks/bench_pass_threads.py --quick times the three modes and writes its table."""
    text = run_quick("bench_pass_threads", tmp_path)
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert len(rows) == 5 and all(kind in "".join(rows) for kind in ("full", "diag"))
    assert "split ms: median (range over processes)" in rows[0]
