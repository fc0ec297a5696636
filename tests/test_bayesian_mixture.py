"""skdeepmix.BayesianGaussianMixture against scikit-learn's, and its torch DP twin."""

import pickle
import warnings

import numpy as np
import pytest
import torch
from sklearn.datasets import make_blobs
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import adjusted_rand_score
from sklearn.mixture import BayesianGaussianMixture as SklearnBayesianGaussianMixture
from sklearn.utils.estimator_checks import parametrize_with_checks

from skdeepmix import BayesianGaussianMixture
from skdeepmix.nn.dpgmm import DirichletProcessGMM

from _scripts import run_quick

COVARIANCE_TYPES = ["full", "tied", "diag", "spherical"]
PRIOR_TYPES = ["dirichlet_process", "dirichlet_distribution"]
STATE = ["weight_concentration_", "mean_precision_", "means_", "degrees_of_freedom_",
         "covariances_", "precisions_cholesky_"]
FITTED = STATE + ["weights_", "precisions_"]
PRIORS = ["weight_concentration_prior_", "mean_precision_prior_", "mean_prior_",
          "degrees_of_freedom_prior_", "covariance_prior_"]


def _expected_failed_checks(estimator):
    if estimator.n_components == 1:
        return {}
    return {
        "check_sample_weight_equivalence_on_dense_data": (
            "with several components the k-means initialisation draws from the "
            "weighted rows and from the (shuffled) repeated rows differ, so the fit "
            "may reach another local optimum; with one component, or with the same "
            "initial state (tests/test_sample_weight.py), the fits are equal"
        )
    }


@parametrize_with_checks(
    [
        BayesianGaussianMixture(),
        BayesianGaussianMixture(n_components=2, covariance_type="diag", dtype="float32",
                                weight_concentration_prior_type="dirichlet_distribution"),
    ],
    expected_failed_checks=_expected_failed_checks,
)
def test_sklearn_compatible(estimator, check):
    check(estimator)


@pytest.fixture(scope="module")
def blobs():
    X, y = make_blobs(n_samples=600, n_features=3, centers=4, cluster_std=[1.0, 1.5, 0.6, 1.0],
                      random_state=0)
    return X, y


def _rel_error(actual, expected):
    if isinstance(expected, tuple):
        actual, expected = np.stack(actual), np.stack(expected)
    actual, expected = np.asarray(actual, dtype=float), np.asarray(expected, dtype=float)
    return np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)), 1e-300)


def _start_from(estimator, state):
    """Give ``estimator`` an initial state; its next ``fit`` (warm_start) continues
    from it (the public way to give two implementations the same start)."""
    for name in STATE:
        setattr(estimator, name, state[name])
    estimator.converged_, estimator.lower_bound_ = False, -np.inf
    return estimator


def _sklearn_initial_state(X, **params):
    """scikit-learn's own initial state (its k-means and first M-step)."""
    ref = SklearnBayesianGaussianMixture(**params, max_iter=0, random_state=0).fit(X)
    return {name: getattr(ref, name) for name in STATE}


def _fit_both(X, dtype="float64", max_iter=300, tol=1e-8, **params):
    state = _sklearn_initial_state(X, **params)
    kwargs = dict(params, max_iter=max_iter, tol=tol, warm_start=True)
    ref = _start_from(SklearnBayesianGaussianMixture(**kwargs), state)
    ours = _start_from(BayesianGaussianMixture(**kwargs, dtype=dtype), state)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        ref.fit(X)
        ours.fit(X.astype(dtype))
    return ours, ref


@pytest.mark.parametrize("prior_type", PRIOR_TYPES)
@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_matches_sklearn_from_the_same_initial_state(blobs, covariance_type, prior_type):
    X, _ = blobs
    ours, ref = _fit_both(X, n_components=6, covariance_type=covariance_type,
                          weight_concentration_prior_type=prior_type)
    for name in FITTED + PRIORS:
        error = _rel_error(getattr(ours, name), getattr(ref, name))
        assert error <= 1e-6, f"{name}: relative error {error:.3g}"
    assert ours.n_iter_ == ref.n_iter_ and ours.converged_ == ref.converged_
    assert _rel_error(ours.lower_bound_, ref.lower_bound_) <= 1e-6
    assert _rel_error(ours.lower_bounds_, np.ravel(ref.lower_bounds_)) <= 1e-6
    assert _rel_error(ours.predict_proba(X), ref.predict_proba(X)) <= 1e-6
    assert _rel_error(ours.score_samples(X), ref.score_samples(X)) <= 1e-6
    np.testing.assert_array_equal(ours.predict(X), ref.predict(X))


@pytest.mark.parametrize("prior_type", PRIOR_TYPES)
@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_float32_matches_sklearn_from_the_same_initial_state(blobs, covariance_type,
                                                             prior_type):
    X, _ = blobs
    ours, ref = _fit_both(X, dtype="float32", max_iter=30, tol=0.0, n_components=6,
                          covariance_type=covariance_type,
                          weight_concentration_prior_type=prior_type)
    for name in FITTED + ["mean_prior_", "covariance_prior_"]:
        value = getattr(ours, name)
        for part in value if isinstance(value, tuple) else [value]:
            assert np.asarray(part).dtype == np.float32, name
        error = _rel_error(value, getattr(ref, name))
        assert error <= 1e-4, f"{name}: relative error {error:.3g}"
    assert _rel_error(ours.lower_bounds_, np.ravel(ref.lower_bounds_)) <= 1e-5
    assert ours.score_samples(X.astype(np.float32)).dtype == np.float32


@pytest.mark.parametrize("prior_type", PRIOR_TYPES)
def test_compare_covariance_types_after_init(prior_type):
    """scikit-learn's test_compare_covar_type through the public API: after the
    initial M-step (max_iter=0), the tied, diag and spherical Wishart scales are
    the mean, the diagonal and the mean diagonal of the full ones."""
    rng = np.random.RandomState(0)
    X = rng.normal(size=(200, 2)) * 7 + rng.rand(2) * 7

    def initial(covariance_type):
        model = BayesianGaussianMixture(
            n_components=4, covariance_type=covariance_type, max_iter=0, random_state=0,
            weight_concentration_prior_type=prior_type,
        ).fit(X)
        dof = model.degrees_of_freedom_
        return model.covariances_ * (dof[:, None, None] if covariance_type == "full"
                                     else dof[:, None] if covariance_type == "diag" else dof)

    full = initial("full")
    np.testing.assert_allclose(initial("tied"), full.mean(0), rtol=1e-10)
    diag = np.array([np.diag(c) for c in full])
    np.testing.assert_allclose(initial("diag"), diag, rtol=1e-10)
    np.testing.assert_allclose(initial("spherical"), diag.mean(1), rtol=1e-10)


@pytest.mark.parametrize("covariance_type", ["full", "diag"])
def test_the_dp_prior_of_gmvae_is_the_same_model(blobs, covariance_type):
    """DirichletProcessGMM (GMVAEDPGMM's prior) and BayesianGaussianMixture share
    their numerics: from the same responsibilities they reach the same posterior."""
    X, _ = blobs
    model = BayesianGaussianMixture(n_components=6, covariance_type=covariance_type,
                                    max_iter=0, random_state=0).fit(X)
    resp = torch.as_tensor(model.predict_proba(X))
    dp = DirichletProcessGMM(6, X.shape[1], covariance_type).double()
    dp.fit(torch.as_tensor(X), resp, max_iter=200, tol=1e-8)
    ours = _start_from(
        BayesianGaussianMixture(n_components=6, covariance_type=covariance_type,
                                max_iter=1, warm_start=True),
        {name: getattr(model, name) for name in STATE},
    )
    # the DP fit's first update uses the given responsibilities: one E-step of ours
    _quiet(ours.set_params(max_iter=200, tol=1e-8).fit, X)
    np.testing.assert_allclose(dp.means.numpy(), ours.means_, rtol=1e-9)
    np.testing.assert_allclose(dp.covariances.numpy(), ours.covariances_, rtol=1e-9)
    np.testing.assert_allclose(dp.weights().numpy(), ours.weights_, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(dp.lower_bound_value, ours.lower_bound_, rtol=1e-10)
    _, log_resp = dp.log_resp(torch.as_tensor(X))
    np.testing.assert_allclose(log_resp.exp().numpy(), ours.predict_proba(X), atol=1e-9)


def _quiet(fit, X, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return fit(X, **kwargs)


def test_dp_prior_with_uncertain_points_reduces_to_points(blobs):
    X = torch.as_tensor(blobs[0])
    resp = torch.nn.functional.one_hot(torch.arange(len(X)) % 3, 3).double()
    plain = DirichletProcessGMM(3, 3, "full").double()
    plain.fit(X, resp, max_iter=5)
    zero = DirichletProcessGMM(3, 3, "full").double()
    zero.fit(X, resp, var=torch.zeros_like(X), max_iter=5)
    torch.testing.assert_close(plain.covariances, zero.covariances)
    wide = DirichletProcessGMM(3, 3, "full").double()
    wide.fit(X, resp, var=torch.full_like(X, 0.5), max_iter=1)
    assert (torch.diagonal(wide.covariance_prior) > torch.diagonal(plain.covariance_prior)).all()


@pytest.mark.parametrize("init_params", ["kmeans", "k-means++", "random", "random_from_data"])
def test_every_initialisation_is_seeded_and_as_good_as_sklearn(blobs, init_params):
    X, y = blobs
    kwargs = dict(n_components=8, init_params=init_params, random_state=1, max_iter=500)
    a, b = BayesianGaussianMixture(**kwargs).fit(X), BayesianGaussianMixture(**kwargs).fit(X)
    np.testing.assert_array_equal(a.means_, b.means_)
    assert a.converged_
    ref = SklearnBayesianGaussianMixture(**kwargs).fit(X)
    assert a.lower_bound_ >= ref.lower_bound_ - 5e-3 * abs(ref.lower_bound_)
    # random responsibilities start every component at the data mean: like
    # scikit-learn's, that run merges two of the four blobs
    found = 3 if init_params == "random" else 4
    assert (a.weights_ > 0.05).sum() == found  # the prior empties the superfluous ones
    assert adjusted_rand_score(y, a.predict(X)) > (0.65 if found == 3 else 0.9)


def test_chunks_memmap_and_pickle_do_not_change_the_result(blobs, tmp_path):
    X, _ = blobs
    kwargs = dict(n_components=5, covariance_type="full", random_state=0, tol=1e-8)
    whole = BayesianGaussianMixture(**kwargs).fit(X)
    chunked = BayesianGaussianMixture(**kwargs, chunk_size=37).fit(X)
    np.save(tmp_path / "X.npy", X)
    streamed = BayesianGaussianMixture(**kwargs).fit(np.load(tmp_path / "X.npy", mmap_mode="r"))
    for other in (chunked, streamed):
        assert _rel_error(other.means_, whole.means_) < 1e-9
        assert _rel_error(other.lower_bound_, whole.lower_bound_) < 1e-12
    restored = pickle.loads(pickle.dumps(whole))
    np.testing.assert_array_equal(restored.predict_proba(X), whole.predict_proba(X))


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_float32_fit_converges_like_float64(covariance_type):
    # the lower bound is a sum over the rows: tol=1e-3 is below float32's
    # resolution, so a float32 fit converges only at a fixed point of its
    # iterations (as scikit-learn's does); a center that moved with the
    # parameters kept them moving at the rounding level (100 iterations)
    X, _ = make_blobs(10_000, 16, centers=8, random_state=0)
    fits = {}
    for dtype in (np.float32, np.float64):
        with warnings.catch_warnings():
            warnings.simplefilter("error", ConvergenceWarning)
            fits[dtype] = BayesianGaussianMixture(
                n_components=8, covariance_type=covariance_type, random_state=0
            ).fit(X.astype(dtype))
    assert fits[np.float32].n_iter_ == fits[np.float64].n_iter_
    assert fits[np.float32].lower_bounds_[-1] == fits[np.float32].lower_bounds_[-2]


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_float32_is_safe_far_from_the_origin(covariance_type):
    X, _ = make_blobs(n_samples=2000, n_features=3, centers=2, cluster_std=0.01,
                      random_state=0)
    X = X + 1e4
    kwargs = dict(n_components=2, covariance_type=covariance_type, random_state=0,
                  reg_covar=1e-9)
    f64 = BayesianGaussianMixture(**kwargs).fit(X)
    f32 = BayesianGaussianMixture(**kwargs).fit(X.astype(np.float32))
    assert f32.covariances_.dtype == np.float32
    order32, order64 = np.argsort(f32.means_[:, 0]), np.argsort(f64.means_[:, 0])
    np.testing.assert_allclose(f32.means_[order32], f64.means_[order64], rtol=1e-6)
    cov32, cov64 = f32.covariances_, f64.covariances_
    if covariance_type != "tied":
        cov32, cov64 = cov32[order32], cov64[order64]
    assert np.all(np.isfinite(cov32))
    np.testing.assert_allclose(cov32, cov64, rtol=0.02, atol=1e-7)


def test_warm_start_and_n_init(blobs):
    X, _ = blobs
    model = BayesianGaussianMixture(n_components=4, warm_start=True, max_iter=1,
                                    random_state=0, tol=0)
    bounds = [_quiet(model.fit, X).lower_bound_ for _ in range(6)]
    assert np.all(np.diff(bounds) >= 0)
    cold = _quiet(BayesianGaussianMixture(n_components=4, max_iter=6, random_state=0,
                                          tol=0).fit, X)
    assert _rel_error(model.means_, cold.means_) < 1e-10
    best = BayesianGaussianMixture(n_components=4, n_init=3, init_params="random",
                                   random_state=0).fit(X)
    assert best.lower_bound_ >= max(
        BayesianGaussianMixture(n_components=4, init_params="random", random_state=0)
        .fit(X).lower_bound_ - 1e-9, -np.inf)


@pytest.mark.parametrize(
    "params, message",
    [
        ({"degrees_of_freedom_prior": 1.5}, "'degrees_of_freedom_prior' should be greater than 2"),
        ({"mean_prior": np.zeros(4)}, "'means' should have the shape of \\(3,\\)"),
        ({"covariance_prior": np.eye(2)}, "'full covariance_prior' should have the shape"),
        ({"covariance_prior": -np.eye(3)}, "'full precision' should be symmetric, positive"),
        ({"covariance_type": "diag", "covariance_prior": -np.ones(3)},
         "'diag precision' should be positive"),
        ({"weight_concentration_prior": 0.0}, "weight_concentration_prior"),
        ({"weight_concentration_prior_type": "gamma"}, "weight_concentration_prior_type"),
        ({"n_components": 700}, "Expected n_samples >= n_components"),
    ],
)
def test_bad_parameters(blobs, params, message):
    X, _ = blobs
    with pytest.raises(ValueError, match=message):
        BayesianGaussianMixture(**params).fit(X)


def test_given_priors_are_used(blobs):
    X, _ = blobs
    model = BayesianGaussianMixture(
        n_components=3, covariance_type="spherical", mean_prior=np.ones(3),
        covariance_prior=2.0, degrees_of_freedom_prior=5.0, mean_precision_prior=0.5,
        weight_concentration_prior=0.1, random_state=0,
    ).fit(X)
    assert model.covariance_prior_ == 2.0 and model.degrees_of_freedom_prior_ == 5.0
    np.testing.assert_array_equal(model.mean_prior_, np.ones(3))
    assert model.weight_concentration_prior_ == 0.1 and model.mean_precision_prior_ == 0.5


def test_benchmark_quick_run(tmp_path):
    """benchmarks/bench_bayesian_mixture.py --quick runs and writes its tables."""
    text = run_quick("bench_bayesian_mixture", tmp_path)
    assert "shared, busy machine" in text and "float64 GEMM GFLOP/s" in text
    assert "## Lower bounds after 4 iterations" in text and "## Peak memory" in text
    rows = [line.split(" | ") for line in text.splitlines()
            if line.startswith("| kmeans | near | full")]
    assert len(rows) == 2  # timings and lower bounds
    assert float(rows[1][8]) < 1e-9  # float64 lower bound, relative to scikit-learn's


def test_near_empty_components_need_no_exact_pass():
    """From scikit-learn's random initialisation, a few components end up
    with one or two rows. Their data covariances are rank-deficient, so in
    float32 their centred sums round to nothing that is positive definite.
    The posterior adds the covariance prior, which outweighs that rounding, so
    no exactly centred second pass is needed. The fit still matches float64."""
    X, _ = make_blobs(5000, 16, centers=8, random_state=0)
    state = ["weight_concentration_", "mean_precision_", "means_", "degrees_of_freedom_",
             "covariances_", "precisions_cholesky_"]
    start = SklearnBayesianGaussianMixture(n_components=8, init_params="random",
                                           max_iter=0, random_state=0).fit(X)

    def fit(dtype, data_covariances_in_use=False):
        model = BayesianGaussianMixture(n_components=8, tol=0.0, warm_start=True,
                                        max_iter=30, dtype=dtype, device="cpu")
        for name in state:
            setattr(model, name, np.asarray(getattr(start, name), dtype=dtype))
        model.converged_, model.lower_bound_ = False, -np.inf
        if data_covariances_in_use:  # the check a GaussianMixture makes
            model._covariances_in_use = lambda nk, means, covariances: covariances
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            return model.fit(X.astype(dtype))

    exact_passes = lambda model: sum(h["exact_pass"] for h in model.history_)  # noqa: E731
    assert exact_passes(fit("float32", data_covariances_in_use=True)) > 0  # the scenario
    float32, float64 = fit("float32"), fit("float64")
    assert exact_passes(float32) == 0
    assert abs(float32.lower_bound_ - float64.lower_bound_) < 1e-5 * abs(float64.lower_bound_)
    np.testing.assert_allclose(float32.weights_, float64.weights_, atol=1e-4)
