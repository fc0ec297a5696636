"""Tests of the CPMM estimator, its MFA density, flow teacher and toy data sets."""

import pickle

import numpy as np
import pytest
import torch
from scipy.special import logsumexp
from scipy.stats import multivariate_normal
from sklearn.utils.estimator_checks import parametrize_with_checks

from skdeepmix._gaussian import (
    mfa_covariances,
    mfa_log_prob,
    mfa_log_prob_unchecked,
    mfa_sample,
)
from skdeepmix._torch_utils import build_module
from skdeepmix.cpmm import CPMMEstimator
from skdeepmix.datasets._toy import make_broken_rings, make_spiral_arms
from skdeepmix.nn.cpmm import CPMMNet, ODEFuncCNN
from skdeepmix.nn.flows import CNF

SMALL = dict(
    n_components=2,
    n_points_per_trajectory=3,
    rank=1,
    hidden_size=8,
    augment_factor=1.0,
    max_iter=2,
    batch_size=64,
    ode_step_size=0.5,
    random_state=0,
)


def _small(**kw):
    return CPMMEstimator(**{**SMALL, **kw})


# ----------------------------------------------------------------- MFA numerics
@pytest.mark.parametrize("rank", [1, 3])
def test_mfa_log_prob_matches_scipy(rank):
    g = torch.Generator().manual_seed(0)
    K, D, n = 3, 5, 7
    X = torch.randn(n, D, generator=g, dtype=torch.float64)
    means = torch.randn(K, D, generator=g, dtype=torch.float64)
    A = torch.randn(K, D, rank, generator=g, dtype=torch.float64)
    log_d = 0.5 * torch.randn(K, D, generator=g, dtype=torch.float64)
    got = mfa_log_prob(X, means, A, log_d).numpy()
    assert got.shape == (n, K)
    np.testing.assert_allclose(mfa_log_prob_unchecked(X, means, A, log_d).numpy(), got,
                               rtol=1e-12, atol=1e-10)
    for k in range(K):
        cov = A[k].numpy() @ A[k].numpy().T + np.diag(np.exp(log_d[k].numpy()))
        expected = multivariate_normal(means[k].numpy(), cov).logpdf(X.numpy())
        np.testing.assert_allclose(got[:, k], expected, rtol=1e-10, atol=1e-10)
    dense = mfa_covariances(A, log_d).numpy()
    np.testing.assert_allclose(dense[K - 1], cov)
    assert np.all(np.linalg.eigvalsh(dense) > 0)


def test_mfa_sample_covariance():
    g = torch.Generator().manual_seed(1)
    D, R = 3, 2
    means = torch.tensor([[1.0, -2.0, 0.5]], dtype=torch.float64)
    A = torch.randn(1, D, R, generator=g, dtype=torch.float64)
    log_d = torch.full((1, D), -1.0, dtype=torch.float64)
    comps = torch.zeros(40000, dtype=torch.long)
    S = mfa_sample(means, A, log_d, comps, g).numpy()
    np.testing.assert_allclose(S.mean(0), means[0].numpy(), atol=0.03)
    np.testing.assert_allclose(np.cov(S.T), mfa_covariances(A, log_d)[0].numpy(), atol=0.05)


# ------------------------------------------------------------------ estimator
@parametrize_with_checks([_small()])
def test_sklearn_compatible(estimator, check):
    check(estimator)


@pytest.fixture(scope="module")
def rings():
    X, y = make_broken_rings(300, random_state=0)
    return X, y


def test_extracted_mixture_equals_ode(rings):
    X, _ = rings
    est = _small(keep_ode=True, dtype="float64", max_iter=3, n_points_per_trajectory=5)
    est.fit(X)
    via_components = est.score_samples(X)
    via_ode = est.score_samples_ode(X)
    np.testing.assert_allclose(via_components, via_ode, rtol=1e-10, atol=1e-10)
    # other pseudotimes give another mixture (the ODE really is solved)
    other = est.score_samples_ode(X, pseudotimes=[0.0, 0.3, 0.7])
    assert not np.allclose(other, via_ode)
    # the ODE is dropped by default
    light = _small(dtype="float64", max_iter=3, n_points_per_trajectory=5).fit(X)
    assert not hasattr(light, "module_")
    np.testing.assert_allclose(light.score_samples(X), via_components)
    with pytest.raises(ValueError, match="keep_ode=True"):
        light.score_samples_ode(X)


def test_public_attributes_reproduce_density(rings):
    X, _ = rings
    est = _small(dtype="float64", max_iter=3).fit(X)
    C, G = est.weights_.shape
    assert est.means_.shape == (C, G, 2)
    assert est.factor_loadings_.shape == (C, G, 2, 1)
    assert est.noise_variance_.shape == (C, G, 2)
    np.testing.assert_allclose(est.weights_.sum(), 1.0)
    np.testing.assert_allclose(est.cluster_weights_, est.weights_.sum(1))
    log_comp = np.empty((len(X), C, G))
    for c in range(C):
        for j in range(G):
            A = est.factor_loadings_[c, j]
            cov = A @ A.T + np.diag(est.noise_variance_[c, j])
            log_comp[:, c, j] = np.log(est.weights_[c, j]) + multivariate_normal(
                est.means_[c, j], cov
            ).logpdf(X)
    np.testing.assert_allclose(est.score_samples(X), logsumexp(log_comp, (1, 2)), rtol=1e-8)
    joint = logsumexp(log_comp, 2)
    proba = np.exp(joint - logsumexp(joint, 1, keepdims=True))
    np.testing.assert_allclose(est.predict_proba(X), proba, atol=1e-8)
    np.testing.assert_array_equal(est.predict(X), proba.argmax(1))


def test_api_outputs(rings):
    X, _ = rings
    est = _small(n_components=3)
    labels = est.fit_predict(X)
    np.testing.assert_array_equal(labels, est.predict(X))
    assert est.predict_proba(X).shape == (len(X), 3)
    S, yS = est.sample(50)
    assert S.shape == (50, 2) and set(yS) <= {0, 1, 2}
    n_par = 3 * 3 * 2 * (1 + 2) + 2
    assert est._n_parameters() == n_par
    assert np.isfinite(est.bic(X)) and np.isfinite(est.aic(X))
    np.testing.assert_allclose(est.bic(X) - est.aic(X), n_par * (np.log(len(X)) - 2))
    assert len(est.history_) == est.n_iter_
    assert {"objective", "loss"} <= set(est.history_[0])
    restored = pickle.loads(pickle.dumps(est))
    np.testing.assert_allclose(restored.score_samples(X), est.score_samples(X))


def test_training_improves_likelihood():
    from sklearn.datasets import make_blobs

    X, _ = make_blobs(300, centers=[[-3, 0], [3, 0], [0, 4], [0, -4]], cluster_std=0.3,
                      random_state=0)
    kw = dict(tol=0, learning_rate=1e-2, hidden_size=32, n_points_per_trajectory=6,
              pseudotimes="fixed", batch_size=32)
    short = _small(max_iter=1, **kw).fit(X)
    long = _small(max_iter=15, **kw).fit(X)
    assert long.score(X) > short.score(X) + 0.3


def test_trajectory_prefit_spreads_components():
    from sklearn.datasets import make_blobs

    X, _ = make_blobs(300, centers=[[-3, 0], [3, 0], [0, 4], [0, -4]], cluster_std=0.3,
                      random_state=0)
    plain = _small(max_iter=1, n_points_per_trajectory=6).fit(X)
    prefit = _small(max_iter=1, n_points_per_trajectory=6, init_iter=60).fit(X)
    spread = lambda est: np.ptp(est.means_, axis=1).max()  # noqa: E731
    assert spread(prefit) > spread(plain) + 0.5


def test_seeded_determinism(rings):
    X, _ = rings
    a = _small(random_state=3).fit(X)
    b = _small(random_state=3).fit(X)
    c = _small(random_state=4).fit(X)
    np.testing.assert_array_equal(a.means_, b.means_)
    np.testing.assert_array_equal(a.sample(20)[0], b.sample(20)[0])
    assert not np.allclose(a.means_, c.means_)


def test_curriculum_tiny(rings):
    X, _ = rings
    est = _small(curriculum="flow", n_spaces=3, teacher_iter=2, teacher_hidden_size=8,
                 keep_teacher=True, max_iter=1)
    est.fit(X)
    assert [round(h["v"], 3) for h in est.curriculum_history_] == [1.0, 0.5, 0.0]
    assert len(est.teacher_history_) == 2
    assert isinstance(est.teacher_, CNF)
    assert np.all(np.isfinite(est.score_samples(X)))
    again = _small(curriculum="flow", n_spaces=3, teacher_iter=2, teacher_hidden_size=8,
                   max_iter=1).fit(X)
    assert not hasattr(again, "teacher_")
    np.testing.assert_array_equal(again.means_, est.means_)


def test_curriculum_kmeans_start(rings):
    X, _ = rings
    est = _small(curriculum="flow", curriculum_init="kmeans", n_spaces=2,
                 teacher_iter=1, teacher_hidden_size=8, max_iter=1)
    est.fit(X)
    assert len(est.curriculum_history_) == 2
    assert np.all(np.isfinite(est.score_samples(X)))


def test_curriculum_kmeans_input_start_and_restarts(rings, monkeypatch):
    X, _ = rings
    built = []
    original = CPMMEstimator._new_optimizer

    def counting(self, parameters, learning_rate=None):
        built.append(learning_rate)
        return original(self, parameters, learning_rate)

    monkeypatch.setattr(CPMMEstimator, "_new_optimizer", counting)
    kw = dict(curriculum="flow", curriculum_init="kmeans_input", n_spaces=3, teacher_iter=0,
              max_iter=1)
    est = _small(**kw).fit(X)
    assert len(est.curriculum_history_) == 3
    assert np.all(np.isfinite(est.score_samples(X)))
    # restart_optimizer: the teacher's, one per space and one for the input space
    assert len(built) == 1 + 3 + 1
    built.clear()
    _small(**kw, restart_optimizer=False).fit(X)
    assert len(built) == 1 + 1


def test_flow_teacher_gaussian_init_matches_scipy():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(4, 4, generator=g, dtype=torch.float64)
    X = torch.randn(300, 4, generator=g, dtype=torch.float64) @ A.T + 2.0
    flow = build_module(lambda: CNF(4, hidden=8, linear=True, step_size=0.05), g,
                        torch.device("cpu"), torch.float64)
    Xn = X.numpy()
    cov = np.cov(Xn.T, bias=True)
    flow.init_gaussian(X.mean(0), torch.as_tensor(cov), reg=1e-2)
    cov = cov + 1e-2 * np.diag(cov).mean() * np.eye(4)
    expected = multivariate_normal(Xn.mean(0), cov).logpdf(Xn[:10])
    # exact trace of the linear part, MLP output zero: no Hutchinson noise
    np.testing.assert_allclose(flow.log_prob(X[:10], g).detach().numpy(), expected,
                               rtol=1e-5, atol=1e-5)
    latent = flow.transform(X, torch.tensor([0.0, 1.0], dtype=torch.float64))[-1]
    np.testing.assert_allclose(latent.mean(0).numpy(), 0.0, atol=1e-6)


def test_flow_teacher_transform_and_training():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(256, 2, generator=g, dtype=torch.float64) * torch.tensor([2.0, 0.3],
                                                                             dtype=torch.float64)
    flow = build_module(lambda: CNF(2, hidden=16, step_size=0.25), g, torch.device("cpu"),
                        torch.float64)
    times = torch.linspace(0, 1, 4, dtype=torch.float64)
    spaces = flow.transform(X, times)
    assert spaces.shape == (4, 256, 2)
    torch.testing.assert_close(spaces[0], X)
    before = float(flow.log_prob(X, g).mean())
    opt = torch.optim.Adam(flow.parameters(), lr=1e-2)
    for _ in range(60):
        opt.zero_grad()
        loss = -flow.log_prob(X, g).mean()
        loss.backward()
        opt.step()
    after = float(flow.log_prob(X, g).mean())
    assert after > before + 0.2


def test_logit_images_cnn():
    rng = np.random.RandomState(0)
    X = rng.randint(0, 256, size=(120, 16)) / 255.0
    est = _small(image_shape=(4, 4), preprocessing="logit", max_iter=1, keep_ode=True,
                 dtype="float64", hidden_size=4)
    est.fit(X)
    a = 1e-6
    s = a + (1 - 2 * a) * X
    log_jac = (np.log(1 - 2 * a) - np.log(s) - np.log1p(-s)).sum(1)
    # score = mixture density in logit space + log-Jacobian
    Y = np.log(s) - np.log1p(-s)
    C, G = est.weights_.shape
    logits = []
    for c in range(C):
        for j in range(G):
            A = est.factor_loadings_[c, j]
            cov = A @ A.T + np.diag(est.noise_variance_[c, j])
            logits.append(np.log(est.weights_[c, j])
                          + multivariate_normal(est.means_[c, j], cov).logpdf(Y))
    expected = logsumexp(np.array(logits), 0) + log_jac
    np.testing.assert_allclose(est.score_samples(X), expected, rtol=1e-8)
    np.testing.assert_allclose(est.score_samples_ode(X), expected, rtol=1e-8)
    S, _ = est.sample(30)
    assert S.min() >= 0 and S.max() <= 1
    assert est.trajectory_means().shape == (C, G, 16)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        est.score_samples(X * 2)


def test_warm_start_continues(rings):
    X, _ = rings
    est = _small(warm_start=True, max_iter=2, tol=0)
    est.fit(X)
    assert hasattr(est, "module_")
    first = est.history_
    est.fit(X)
    assert est.n_iter_ == 2 and est.history_ != first


def test_warm_start_after_a_fit_that_dropped_the_ode_says_so(rings):
    X, _ = rings
    est = _small(max_iter=2, tol=0).fit(X)  # warm_start=False: module_ is dropped
    means = est.means_.copy()
    with pytest.raises(ValueError, match="keep_ode"):
        est.set_params(warm_start=True).fit(X)
    np.testing.assert_array_equal(est.means_, means)  # the fitted model is untouched
    est.set_params(warm_start=False, keep_ode=True).fit(X)
    est.set_params(warm_start=True).fit(X)  # a kept ODE can be continued
    assert np.isfinite(est.score(X))


@pytest.mark.parametrize(
    "params, X, match",
    [
        (dict(n_components=50), np.random.RandomState(0).rand(20, 2), "n_components"),
        (dict(image_shape=(3, 3)), np.random.RandomState(0).rand(20, 4), "image_shape"),
        (dict(image_shape=(2, -2)), np.random.RandomState(0).rand(20, 4), "image_shape"),
        (dict(min_variance=0.0), np.random.RandomState(0).rand(20, 4), "min_variance"),
        (dict(preprocessing="logit"), 3 * np.random.RandomState(0).rand(20, 4), r"\[0, 1\]"),
        (dict(rank=5), np.random.RandomState(0).rand(20, 4), "rank"),
        (dict(curriculum="spaces"), np.random.RandomState(0).rand(20, 4), "curriculum"),
        (dict(ode_method="rk5"), np.random.RandomState(0).rand(20, 4), "ode_method"),
        (dict(activation="relu"), np.random.RandomState(0).rand(20, 4), "activation"),
        (dict(n_spaces=1), np.random.RandomState(0).rand(20, 4), "n_spaces"),
        (dict(teacher_init="zero"), np.random.RandomState(0).rand(20, 4), "teacher_init"),
        (dict(curriculum_init="pca"), np.random.RandomState(0).rand(20, 4), "curriculum_init"),
    ],
)
def test_bad_parameters(params, X, match):
    with pytest.raises(ValueError, match=match):
        _small(**params).fit(X)


@pytest.mark.parametrize("n_features, rank", [(1, 1), (3, 2), (5, 2), (64, 8), (784, 28)])
def test_auto_rank(n_features, rank):
    from skdeepmix.cpmm import auto_rank

    assert auto_rank(n_features) == rank


def test_default_rank_fits_few_features():
    # the fixed default rank=8 refused data with fewer than 8 features
    X = np.random.RandomState(0).rand(40, 3)
    est = _small(rank="auto").fit(X)
    assert est.rank_ == 2 and est.factor_loadings_.shape[-1] == 2
    assert np.isfinite(est.score(X))
    assert _small(rank=3).fit(X).rank_ == 3


def test_not_fitted():
    from sklearn.exceptions import NotFittedError

    with pytest.raises(NotFittedError):
        _small().predict(np.zeros((2, 2)))


# ------------------------------------------------------------------ toy data
def test_toy_data_sets():
    X, y = make_broken_rings(400, random_state=0)
    X2, y2 = make_broken_rings(400, random_state=0)
    np.testing.assert_array_equal(X, X2)
    r = np.hypot(X[:, 0], X[:, 1])
    ratio = np.median(r[y == 1]) / np.median(r[y == 0])
    assert abs(ratio - 1.1) < 0.01
    angle = np.arctan2(X[:, 1], X[:, 0])
    assert not np.any((y == 0) & (np.abs(angle) < np.pi / 6 - 1e-9))  # the inner gap
    S, lab = make_spiral_arms(500, random_state=1)
    assert S.shape == (500, 2) and set(lab) == {-1, 0, 1, 2, 3, 4}
    assert (lab == -1).sum() == 25
    with pytest.raises(ValueError):
        make_spiral_arms(10, outlier_fraction=1.5)


@pytest.mark.parametrize("method", ["euler", "midpoint", "rk4"])
@pytest.mark.parametrize("interp", ["linear", "cubic"])
def test_trajectory_interpolation_matches_torchdiffeq(interp, method):
    from torchdiffeq import odeint

    g = torch.Generator().manual_seed(0)
    net = build_module(lambda: CPMMNet(3, 2, 1, hidden=8, step_size=0.25, interp=interp,
                                       method=method),
                       g, torch.device("cpu"), torch.float64)
    with torch.no_grad():
        net.initial_state.normal_(generator=g)
    times = torch.tensor([0.05, 0.3, 0.5, 0.77, 1.0], dtype=torch.float64)
    ours = net.trajectory(times)
    grid = torch.cat([times.new_zeros(1), times])
    ref = odeint(net.func, net.initial_state, grid, method=method,
                 options={"step_size": 0.25, "interp": interp})[1:].transpose(0, 1)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)
    # only the MFA columns
    torch.testing.assert_close(net.trajectory(times, 5), ref[..., :5], rtol=1e-10, atol=1e-10)


def test_cnn_state_layout_is_channels_last():
    """Block b, pixel (i, j), channel c of the state is CNN channel b*C + c at (i, j)."""
    H, W, C, n_blocks, n_extra = 2, 3, 2, 3, 4
    func = ODEFuncCNN((H, W, C), n_blocks, n_extra, hidden=4)
    blocks = torch.arange(n_blocks * H * W * C, dtype=torch.float64).reshape(n_blocks, H, W, C)
    extra = -1.0 - torch.arange(n_extra * H * W, dtype=torch.float64)
    h = torch.cat([blocks.reshape(-1), extra])[None]
    channels = func._to_channels(h)
    assert channels.shape == (1, n_blocks * C + n_extra, H, W)
    for b in range(n_blocks):
        for c in range(C):
            torch.testing.assert_close(channels[0, b * C + c], blocks[b, :, :, c])
    torch.testing.assert_close(channels[0, n_blocks * C:].reshape(-1), extra)
    torch.testing.assert_close(func._from_channels(channels), h)


def test_image_shaped_input_equals_flat_input_with_image_shape():
    rng = np.random.RandomState(0)
    images = rng.rand(60, 4, 3, 2)
    kw = dict(hidden_size=4, max_iter=1, dtype="float64")
    a = _small(**kw).fit(images)
    b = _small(image_shape=(4, 3, 2), **kw).fit(images.reshape(60, -1))
    assert a.image_shape_ == b.image_shape_ == (4, 3, 2)
    np.testing.assert_array_equal(a.means_, b.means_)
    np.testing.assert_allclose(a.score_samples(images), b.score_samples(images.reshape(60, -1)))
    assert a.means_.shape == (2, 3, 24)


def test_progress_steps_cover_every_phase(rings, monkeypatch):
    from skdeepmix._train import Progress

    X, _ = rings
    steps = []
    monkeypatch.setattr(Progress, "step", lambda self, n=1, **kw: steps.append(kw.get("phase")))
    est = _small(curriculum="flow", n_spaces=3, space_iter=2, teacher_iter=2,
                 teacher_hidden_size=8, max_iter=2, tol=0.0).fit(X)
    assert len(steps) == est._n_progress_steps() + est.max_iter
    assert steps.count("teacher") == 2 and steps.count("curriculum") == 6
    steps.clear()
    est = _small(init_iter=3, max_iter=2, tol=0.0).fit(X)
    assert steps.count("pre-fit") == 3 and len(steps) == 3 + 2


def test_standardisation_and_variance_floor():
    rng = np.random.RandomState(0)
    X = np.c_[rng.normal(5.0, 3.0, size=(200, 2)), np.zeros(200), rng.normal(0, 0.01, 200)]
    est = _small(min_variance=1e-3, max_iter=2, dtype="float64").fit(X)
    np.testing.assert_allclose(est.shift_, X.mean(0))
    var = X.var(0)
    np.testing.assert_allclose(est.scale_, np.sqrt(var + 1e-4 * var.mean()))
    # every noise variance is above the floor, relative to the mean variance
    assert np.all(est.noise_variance_ > 1e-3 * var.mean())
    # the constant feature: finite scores, its values are still in the model
    assert np.all(np.isfinite(est.score_samples(X)))
    assert np.all(np.abs(est.means_[:, :, 2]) < 1e-2)


@pytest.mark.slow
def test_default_fit_on_digits_converges():
    import warnings

    from sklearn.datasets import load_digits
    from sklearn.exceptions import ConvergenceWarning

    X = load_digits().data
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        est = CPMMEstimator(random_state=0).fit(X)
    assert est.converged_ and est.n_iter_ < est.max_iter
