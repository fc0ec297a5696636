"""Tests of GMVAEDPGMM and its latent prior.

Run: OMP_NUM_THREADS=1 pytest tests/test_gmvae_dpgmm.py
"""

import copy
import pickle
import warnings

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans
from sklearn.datasets import make_blobs
from sklearn.exceptions import NotFittedError
from sklearn.metrics import adjusted_rand_score
from sklearn.mixture import BayesianGaussianMixture
from sklearn.utils.estimator_checks import parametrize_with_checks

from skdeepmix import TrainingDivergedError
from skdeepmix.gmvae_dpgmm import GMVAEDPGMM
from skdeepmix.nn.dpgmm import DirichletProcessGMM
from skdeepmix.nn.gmvae import gumbel_softmax

torch.set_num_threads(1)

SMALL = dict(
    n_components=3,
    latent_dim=2,
    encoder_sizes=(8,),
    max_iter=3,
    pretrain_iter=1,
    batch_size=32,
    n_score_samples=4,
)


@parametrize_with_checks(
    [
        GMVAEDPGMM(**SMALL),
        GMVAEDPGMM(
            **SMALL,
            prior_update="alternating",
            alternate_every=1,
            covariance_type="full",
            gumbel="hard",
            z_given_y=True,
        ),
        GMVAEDPGMM(**SMALL, prior_update="none", gumbel="none"),
    ]
)
def test_sklearn_compatible(estimator, check):
    check(estimator)


# ------------------------------------------------------------------ DP-GMM
@pytest.mark.parametrize("covariance_type", ["diag", "full"])
def test_dpgmm_matches_sklearn(covariance_type):
    """Same priors, same k-means initial labels -> same variational posterior."""
    X, _ = make_blobs(300, n_features=3, centers=4, random_state=0)
    K = 8
    ref = BayesianGaussianMixture(
        n_components=K,
        covariance_type=covariance_type,
        weight_concentration_prior_type="dirichlet_process",
        max_iter=500,
        tol=1e-6,
        random_state=0,
    ).fit(X)
    # sklearn's init_params='kmeans' with a fresh RandomState(0)
    labels = KMeans(n_clusters=K, n_init=1, random_state=np.random.RandomState(0)).fit(X).labels_
    resp = torch.nn.functional.one_hot(torch.as_tensor(labels, dtype=torch.long), K).double()
    dp = DirichletProcessGMM(K, 3, covariance_type).double()
    Xt = torch.as_tensor(X)
    dp.fit(Xt, resp, max_iter=500, tol=1e-6)
    np.testing.assert_allclose(dp.weights().numpy(), ref.weights_, atol=1e-8)
    np.testing.assert_allclose(dp.means.numpy(), ref.means_, atol=1e-8)
    np.testing.assert_allclose(dp.covariances.numpy(), ref.covariances_, atol=1e-8)
    np.testing.assert_allclose(dp.degrees_of_freedom.numpy(), ref.degrees_of_freedom_, atol=1e-8)
    np.testing.assert_allclose(dp.mean_precision.numpy(), ref.mean_precision_, atol=1e-8)
    for mine, theirs in zip(dp.weight_concentration.numpy(), ref.weight_concentration_):
        np.testing.assert_allclose(mine, theirs, atol=1e-8)
    np.testing.assert_allclose(dp.lower_bound_value, ref.lower_bound_, rtol=1e-10)
    _, log_resp = dp.log_resp(Xt)
    np.testing.assert_allclose(log_resp.exp().numpy(), ref.predict_proba(X), atol=1e-8)
    # both keep 4 of 8 sticks
    assert int((dp.weights() > 0.01).sum()) == int((ref.weights_ > 0.01).sum()) == 4


def test_dpgmm_float32_and_uncertain_points():
    X, _ = make_blobs(200, n_features=2, centers=3, random_state=1)
    Xt = torch.as_tensor(X, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    dp = DirichletProcessGMM(6, 2, "full")
    dp.fit(Xt, generator=g)
    assert torch.isfinite(dp.covariances).all()
    # zero point variances == plain points; positive ones lower the expectation
    base = dp.expected_log_prob(Xt)
    same = dp.expected_log_prob(Xt, torch.zeros_like(Xt))
    lower = dp.expected_log_prob(Xt, torch.full_like(Xt, 0.5))
    torch.testing.assert_close(base, same)
    assert (lower < base).all()


def test_gumbel_softmax():
    g = torch.Generator().manual_seed(0)
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]])).expand(4000, 3)
    hard = gumbel_softmax(logits, 0.5, g, hard=True)
    assert torch.all((hard == 0) | (hard == 1))
    np.testing.assert_allclose(hard.mean(0).numpy(), [0.7, 0.2, 0.1], atol=0.03)
    soft = gumbel_softmax(logits, 1.0, g)
    torch.testing.assert_close(soft.sum(1), torch.ones(4000))
    # straight-through: gradient flows
    lg = logits.clone().requires_grad_(True)
    (gumbel_softmax(lg, 0.5, g, hard=True) * torch.arange(3.0)).sum().backward()
    assert lg.grad.abs().sum() > 0


# ------------------------------------------------------------------ estimator
def _blobs(seed=0, n=400):
    return make_blobs(
        n, n_features=8, centers=5, cluster_std=0.5, center_box=(-8, 8), random_state=seed
    )


TOY = dict(
    n_components=20,
    latent_dim=2,
    encoder_sizes=(32,),
    max_iter=15,
    pretrain_iter=20,
    batch_size=64,
    learning_rate=3e-3,
    tol=0.0,
)


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_joint_finds_the_number_of_clusters():
    """5 well separated clusters, truncation 20: the joint model keeps 5."""
    X, y = _blobs()
    found, aris = [], []
    for seed in range(3):
        est = GMVAEDPGMM(**TOY, random_state=seed).fit(X)
        found.append(est.n_components_)
        aris.append(adjusted_rand_score(y, est.predict(X)))
    assert found == [5, 5, 5], found
    assert min(aris) > 0.95, aris


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_api_and_determinism():
    X, y = _blobs(1, 300)
    labels = []
    history = []
    est = GMVAEDPGMM(
        **TOY, random_state=0, callback=lambda e: {"ari": adjusted_rand_score(y, e.predict(X))}
    )
    for _ in range(2):
        labels.append(est.fit_predict(X))
        history.append([h["objective"] for h in est.history_])
    np.testing.assert_array_equal(labels[0], labels[1])
    assert history[0] == history[1]
    np.testing.assert_array_equal(labels[0], est.predict(X))
    assert len(est.history_) == TOY["max_iter"]
    assert {"objective", "loss", "tau", "n_active", "ari"} <= set(est.history_[-1])
    assert est.history_[-1]["tau"] < est.history_[0]["tau"]
    proba = est.predict_proba(X)
    assert proba.shape == (300, 20)
    np.testing.assert_allclose(proba.sum(1), 1.0, rtol=1e-5)
    assert est.weights_.shape == (20,)
    np.testing.assert_allclose(est.weights_.sum(), 1.0, rtol=1e-5)
    assert est.n_components_ == len(est.active_components_)
    assert set(np.unique(est.predict(X))) <= set(est.active_components_)
    Z = est.transform(X)
    assert Z.shape == (300, 2)
    Xr = est.inverse_transform(Z)
    assert Xr.shape == X.shape
    # the auto-encoder reconstructs far better than the data mean
    assert np.mean((Xr - X) ** 2) < 0.5 * np.mean((X - X.mean(0)) ** 2)
    Xs, ys = est.sample(50)
    assert Xs.shape == (50, 8) and ys.shape == (50,)
    assert set(np.unique(ys)) <= set(est.active_components_)
    # importance-weighted estimate: finite, deterministic, tighter with more samples
    s1 = est.set_params(n_score_samples=1).score_samples(X)
    s64 = est.set_params(n_score_samples=64).score_samples(X)
    assert np.all(np.isfinite(s64))
    np.testing.assert_array_equal(s64, est.score_samples(X))
    assert s64.mean() > s1.mean()
    assert est.score(X) == pytest.approx(s64.mean(), rel=1e-6)
    # pickling (without the optimizer) and warm-started continuation
    clone = pickle.loads(pickle.dumps(est.set_params(callback=None)))
    np.testing.assert_array_equal(clone.predict(X), est.predict(X))
    clone.set_params(warm_start=True, max_iter=2).fit(X)
    assert len(clone.history_) == 2 and clone.n_epochs_ == TOY["max_iter"] + 2


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
@pytest.mark.parametrize(
    "params",
    [
        dict(prior_update="alternating", alternate_every=3),
        dict(prior_update="none", n_components=5),
        dict(covariance_type="full", gumbel="hard"),
        dict(gumbel="none", dtype="float64"),
        # the classic GMVAE (classifier q(y|x), q(z|x,y)) is known to merge
        # clusters (Dilokthanakul et al. 2016): only a weak bound here
        dict(z_given_y=True, gumbel="none", n_components=8, max_iter=30),
    ],
)
def test_modes_cluster_toy_data(params):
    X, y = _blobs(2, 300)
    est = GMVAEDPGMM(**{**TOY, **params}, random_state=0).fit(X)
    bound = 0.3 if params.get("z_given_y") else 0.8
    assert adjusted_rand_score(y, est.predict(X)) > bound
    assert np.all(np.isfinite(est.score_samples(X[:20])))


def test_bernoulli_likelihood_on_unit_data():
    rng = np.random.RandomState(0)
    X = (rng.rand(60, 12) > 0.5).astype(float)
    est = GMVAEDPGMM(**SMALL, random_state=0).fit(X)
    assert est.module_.likelihood == "bernoulli"
    out = est.inverse_transform(est.transform(X))
    assert out.min() >= 0 and out.max() <= 1


@pytest.mark.parametrize(
    "params, match",
    [
        (dict(prior_update="gradient"), "prior_update"),
        (dict(n_components=0), "n_components"),
        (dict(covariance_type="tied"), "covariance_type"),
        (dict(gumbel="sometimes"), "gumbel"),
        (dict(prior_learning_rate=1.5), "prior_learning_rate"),
        (dict(encoder_sizes=(8, 0)), "encoder_sizes"),
        (dict(decoder_sizes=("a",)), "decoder_sizes"),
        (dict(tau_start=0.3, tau_min=0.5), "tau_min"),
        (dict(likelihood="bernoulli"), "likelihood='bernoulli'"),
        (dict(n_components=50), "n_samples >= n_components"),
        (dict(weight_concentration_prior=-1.0), "weight_concentration_prior"),
    ],
)
def test_bad_parameters(params, match):
    X, _ = _blobs(0, 40)
    with pytest.raises(ValueError, match=match):
        GMVAEDPGMM(**{**SMALL, **params}).fit(X)


def test_errors_before_and_after_fit():
    X, _ = _blobs(0, 40)
    est = GMVAEDPGMM(**SMALL, random_state=0)
    for method in (est.predict, est.transform, est.score_samples):
        with pytest.raises(NotFittedError):
            method(X)
    with pytest.raises(NotFittedError):
        est.inverse_transform(np.zeros((2, 2)))
    est.fit(X)
    with pytest.raises(ValueError, match="latent_dim"):
        est.inverse_transform(np.zeros((2, 5)))
    with pytest.raises(ValueError, match="features"):
        est.predict(X[:, :3])


def test_set_output_pandas_in_a_pipeline():
    pd = pytest.importorskip("pandas")
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import MinMaxScaler

    X, _ = _blobs(0, 60)
    pipe = make_pipeline(MinMaxScaler(), GMVAEDPGMM(**SMALL, random_state=0))
    Z = pipe.set_output(transform="pandas").fit(X).transform(X)
    assert isinstance(Z, pd.DataFrame)
    assert list(Z.columns) == ["gmvaedpgmm0", "gmvaedpgmm1"]
    np.testing.assert_allclose(Z.to_numpy(), pipe[-1].transform(pipe[0].transform(X)))


def test_scores_share_their_noise_across_chunks_with_a_random_state_instance():
    """One draw of the importance samples per call, whatever the chunking
    (a RandomState gives new draws per call, never per chunk)."""
    X, _ = _blobs(0, 120)
    est = GMVAEDPGMM(**SMALL, random_state=np.random.RandomState(0)).fit(X)
    twin = copy.deepcopy(est)  # the same RandomState state: the same draws
    whole = est.score_samples(X)
    chunked = twin.set_params(chunk_size=7).score_samples(X)
    np.testing.assert_allclose(chunked, whole, rtol=1e-12)
    order = np.random.RandomState(1).permutation(len(X))
    twin = copy.deepcopy(est)
    np.testing.assert_allclose(est.score_samples(X[order]), twin.score_samples(X)[order],
                               rtol=1e-12)


@pytest.mark.parametrize("params, phase", [
    (dict(), "pre-training"),
    (dict(pretrain_iter=0), "during training"),
])
def test_divergence_names_the_phase_and_the_learning_rate(params, phase):
    X, _ = _blobs(0, 120)
    est = GMVAEDPGMM(**{**SMALL, **params}, learning_rate=1e6, random_state=0)
    with pytest.raises(TrainingDivergedError, match=f"{phase}.*learning_rate=1e\\+06"):
        est.fit(X)


@pytest.mark.parametrize("scale", [1e-20, 1e25])
def test_any_data_scale_trains_like_unit_scale(scale):
    """The Gaussian decoder models standardised data: scores shift by the
    log-Jacobian, clusters are the same."""
    X, y = _blobs(0, 200)
    unit = GMVAEDPGMM(**{**TOY, "max_iter": 3}, random_state=0).fit(X)
    scaled = GMVAEDPGMM(**{**TOY, "max_iter": 3}, random_state=0).fit(X * scale)
    assert adjusted_rand_score(unit.predict(X), scaled.predict(X * scale)) > 0.99
    np.testing.assert_allclose(scaled.score_samples(X * scale),
                               unit.score_samples(X) - X.shape[1] * np.log(scale), rtol=1e-3)


def test_default_fit_on_digits_converges_to_about_ten_clusters():
    """The defaults (truncation 30): no ConvergenceWarning, and a cluster count
    near the 10 classes (benchmarks/validate_gmvae_dpgmm.py has the 4 data sets x 3 seeds)."""
    from sklearn.datasets import load_digits
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.metrics import normalized_mutual_info_score

    X, y = load_digits(return_X_y=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        est = GMVAEDPGMM(random_state=0).fit(X / 16.0)
    assert est.converged_ and est.n_iter_ < est.max_iter
    assert 8 <= est.n_components_ <= 12, est.n_components_
    assert normalized_mutual_info_score(y, est.predict(X / 16.0)) > 0.65
