"""Tests of DeepGMMEstimator and its torch model (skdeepmix.nn.deep_gmm)."""

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal
from sklearn.exceptions import ConvergenceWarning, NotFittedError
from sklearn.mixture import GaussianMixture as SkGaussianMixture
from sklearn.utils.estimator_checks import parametrize_with_checks

from skdeepmix.datasets._bsds300 import make_bsds300_patches
from skdeepmix.deep_gmm import DeepGMMEstimator
from skdeepmix.nn.deep_gmm import (
    DeepGMM,
    NodeObjective,
    accumulate_hard_statistics,
    accumulate_soft_statistics,
    empty_statistics,
    fold_upper_layers,
    lbfgs_maximize,
    m_step_layers,
    m_step_objective,
    prior_scatter,
)

pytestmark = pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")

DATA = Path(__file__).parents[1].parent / "shared" / "data"
BSDS = DATA / "bsds300" / "images"


def _blobs(n=300, seed=0):
    rng = np.random.RandomState(seed)
    return np.concatenate(
        [
            rng.randn(n, 2),
            0.5 * rng.randn(n, 2) + [5, 0],
            rng.randn(n, 2) @ np.array([[2.0, 1.0], [0.0, 0.3]]) + [0, 6],
        ]
    )


def _random_model(sizes, d, seed=0):
    gen = torch.Generator().manual_seed(seed)
    model = DeepGMM(sizes, d)
    with torch.no_grad():
        for j, n in enumerate(sizes):
            eye = torch.eye(d, dtype=torch.float64)
            model.inv_weight[j].copy_(eye + 0.3 * torch.randn(n, d, d, generator=gen,
                                                              dtype=torch.float64))
            model.inv_bias[j].copy_(0.5 * torch.randn(n, d, generator=gen, dtype=torch.float64))
        model.path_logits.copy_(torch.randn(sizes, generator=gen, dtype=torch.float64))
    model.requires_grad_(False)
    return model


def _sklearn_gmm(weights, means, covariances):
    gmm = SkGaussianMixture(len(weights), covariance_type="full")
    gmm.weights_, gmm.means_, gmm.covariances_ = weights, means, covariances
    gmm.precisions_cholesky_ = np.linalg.cholesky(np.linalg.inv(covariances))
    return gmm


# ------------------------------------------------------------ the model
def test_path_log_prob_matches_scipy_and_chunking():
    model = _random_model((2, 3, 2), 3)
    X = torch.randn(40, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    weights, means, factors = model.shallow_parameters()
    ref = np.stack(
        [
            multivariate_normal(means[p].numpy(), (factors[p] @ factors[p].T).numpy()).logpdf(
                X.numpy()
            )
            for p in range(model.n_paths)
        ],
        1,
    )
    np.testing.assert_allclose(model.path_log_prob(X).numpy(), ref, rtol=1e-10, atol=1e-10)
    # tiny budget: chunked over paths, same result
    np.testing.assert_allclose(model.path_log_prob(X, budget=5).numpy(), ref, rtol=1e-10,
                               atol=1e-10)
    assert torch.isclose(weights.sum(), torch.tensor(1.0, dtype=torch.float64))


def test_coordinate_ascent_improves_and_finds_best_path():
    model = _random_model((3, 2, 4), 2)
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(200, 2, generator=gen, dtype=torch.float64)
    start = model.unflatten_index(torch.randint(model.n_paths, (200,), generator=gen))
    paths, scores = model.coordinate_ascent(X, start, 3)
    np.testing.assert_allclose(scores.numpy(), model.path_score(X, paths).numpy(), rtol=1e-12)
    assert bool((scores >= model.path_score(X, start) - 1e-12).all())
    best = model.log_joint(X).max(1).values
    assert bool((scores <= best + 1e-12).all())
    assert float((scores >= best - 1e-9).double().mean()) > 0.5  # mostly the optimum


def test_sampling_matches_shallow_moments():
    model = _random_model((2, 2), 2)
    X, labels = model.sample(40000, torch.Generator().manual_seed(0))
    weights, means, factors = model.shallow_parameters()
    mean = (weights[:, None] * means).sum(0)
    np.testing.assert_allclose(X.mean(0).numpy(), mean.numpy(), atol=0.05)
    freq = torch.bincount(labels, minlength=4).double() / 40000
    np.testing.assert_allclose(freq.numpy(), weights.numpy(), atol=0.01)


# ------------------------------------------------------------ M-step
def _random_objective(B=2, U=3, d=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    R = torch.eye(d, dtype=torch.float64) + 0.3 * torch.randn(U, d, d, generator=gen,
                                                              dtype=torch.float64)
    r = torch.randn(U, d, generator=gen, dtype=torch.float64)
    Z = torch.randn(B, U, 20, d + 1, generator=gen, dtype=torch.float64)
    Z[..., -1] = 1.0
    gamma = Z.transpose(-1, -2) @ Z
    X = torch.cat([torch.eye(d, dtype=torch.float64).expand(B, d, d)
                   + 0.2 * torch.randn(B, d, d, generator=gen, dtype=torch.float64),
                   torch.randn(B, d, 1, generator=gen, dtype=torch.float64)], -1)
    return NodeObjective.from_statistics(gamma, R, r), X, Z, R, r


def test_m_step_gradient_gradcheck():
    obj, X, *_ = _random_objective()
    args = (obj.counts, obj.omega, obj.gamma, obj.linear, obj.const)
    X = X.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: m_step_objective(x, *args), (X,))
    # and the analytic gradient equals autograd of a direct implementation
    d = X.shape[1]
    direct = (
        obj.counts * torch.linalg.slogdet(X[:, :, :d]).logabsdet
        - 0.5 * torch.einsum("bij,uik,bkl,bulj->b", X, obj.omega, X, obj.gamma)
        - (obj.linear * X).sum((1, 2))
        - 0.5 * obj.const
    )
    (grad,) = torch.autograd.grad(direct.sum(), X)
    analytic = obj.gradient(X.detach(), obj.hessian_apply(X.detach()))
    np.testing.assert_allclose(analytic.numpy(), grad.numpy(), rtol=1e-10, atol=1e-10)


def test_m_step_objective_is_the_folded_log_likelihood():
    obj, X, Z, R, r = _random_objective()
    d = X.shape[1]
    # sum_n log|det Q| - 1/2 |R_u (Q y + c) + r_u|^2 over the samples of (node, u)
    mapped = torch.einsum("bij,bunj->buni", X, Z)
    z = torch.einsum("uij,bunj->buni", R, mapped) + r[None, :, None]
    expected = obj.counts * torch.linalg.slogdet(X[:, :, :d]).logabsdet - 0.5 * z.square().sum(
        (1, 2, 3)
    )
    np.testing.assert_allclose(obj.value(X, obj.hessian_apply(X)).numpy(), expected.numpy(),
                               rtol=1e-12)


def test_hessian_apply_and_preconditioner():
    obj, X, *_ = _random_objective(B=3, U=4, d=3, seed=2)
    naive = torch.einsum("uab,mbc,mucd->mad", obj.omega, X, obj.gamma)
    np.testing.assert_allclose(obj.hessian_apply(X).numpy(), naive.numpy(), rtol=1e-12)
    # with one inner path the preconditioner inverts the per-sample Hessian exactly
    one, X1, *_ = _random_objective(B=2, U=1, d=3, seed=4)
    precondition = one.preconditioner()
    back = precondition(one.hessian_apply(X1) / one.counts[:, None, None])
    np.testing.assert_allclose(back.numpy(), X1.numpy(), rtol=1e-10)


def test_lbfgs_reaches_stationary_point_and_never_decreases():
    obj, X0, *_ = _random_objective(B=4, U=2, d=4, seed=3)
    f0 = obj.value(X0, obj.hessian_apply(X0))
    X, f, _ = lbfgs_maximize(obj, X0, max_iter=500, ftol=0.0, gtol=1e-8)
    assert bool((f >= f0).all())
    grad = obj.gradient(X, obj.hessian_apply(X)) / obj.counts[:, None, None]
    assert float(grad.abs().max()) < 1e-6


def test_one_layer_soft_m_step_is_the_gmm_m_step():
    model = _random_model((3,), 2)
    X = torch.as_tensor(_blobs(100), dtype=torch.float64)
    log_joint = model.log_joint(X)
    resp = (log_joint - log_joint.logsumexp(1, keepdim=True)).exp().numpy()
    centers = [X.mean(0)]
    stats = empty_statistics(model)
    accumulate_soft_statistics(model, X, centers, stats)
    reg = 1e-3
    m_step_layers(model, stats, centers, reg)
    A, b = model.generative_parameters(0)
    Xn = X.numpy()
    for k in range(3):
        nk = resp[:, k].sum()
        mean = resp[:, k] @ Xn / nk
        diff = Xn - mean
        cov = (resp[:, k, None] * diff).T @ diff / nk + reg * np.eye(2)
        np.testing.assert_allclose(b[k].numpy(), mean, rtol=1e-10)
        np.testing.assert_allclose((A[k] @ A[k].T).numpy(), cov, rtol=1e-10)


def test_one_layer_prior_is_the_conjugate_map_update():
    model = _random_model((3,), 2)
    X = torch.as_tensor(_blobs(100), dtype=torch.float64)
    log_joint = model.log_joint(X)
    resp = (log_joint - log_joint.logsumexp(1, keepdim=True)).exp().numpy()
    centers = [X.mean(0)]
    stats = empty_statistics(model)
    accumulate_soft_statistics(model, X, centers, stats)
    tau = 7.0
    m_step_layers(model, stats, centers, 0.0, prior_count=tau)
    A, b = model.generative_parameters(0)
    Xn = X.numpy()
    nk = resp.sum(0)
    means = resp.T @ Xn / nk[:, None]
    covs = []
    for k in range(3):
        diff = Xn - means[k]
        covs.append((resp[:, k, None] * diff).T @ diff / nk[k])
    pooled = sum(n * c for n, c in zip(nk, covs)) / nk.sum()
    corr = pooled / np.sqrt(np.outer(np.diag(pooled), np.diag(pooled)))
    for k in range(3):  # means kept; own variances, pooled correlations
        sd = np.sqrt(np.diag(covs[k]))
        np.testing.assert_allclose(b[k].numpy(), means[k], rtol=1e-10)
        expected = covs[k] + tau / nk[k] * np.outer(sd, sd) * corr
        np.testing.assert_allclose((A[k] @ A[k].T).numpy(), expected, rtol=1e-9, atol=1e-12)


def test_prior_scatter_is_the_data_space_scatter_of_every_path():
    model = _random_model((2, 3, 2), 3)
    gen = torch.Generator().manual_seed(0)
    B = torch.randn(12, 3, 3, generator=gen, dtype=torch.float64)
    psi = B @ B.transpose(-1, -2)  # one matrix per path, flat C order
    W0, W1 = model.inv_weight[0], model.inv_weight[1]
    P = prior_scatter(model, 2, psi)
    assert P.shape == (2, 1, 3, 3)
    for c in range(2):
        expected = sum(W1[b] @ W0[a] @ psi[a * 6 + b * 2 + c] @ W0[a].T @ W1[b].T
                       for a in range(2) for b in range(3))
        np.testing.assert_allclose(P[c, 0].numpy(), expected.numpy(), rtol=1e-12)
    np.testing.assert_allclose(prior_scatter(model, 0, psi).numpy(),
                               psi.reshape(2, 6, 3, 3).numpy())


def _m_step_after_gauge(model, G, h, X, paths, reg, prior_count):
    """Apply the gauge ``y_1 -> G y_1 + h`` between layers 0 and 1 (the same
    model in data space), run one M-step; the log joint of ``X`` before and after."""
    with torch.no_grad():
        W0, c0 = model.inv_weight[0].clone(), model.inv_bias[0].clone()
        W1, c1 = model.inv_weight[1].clone(), model.inv_bias[1].clone()
        G_inv = torch.linalg.inv(G)
        model.inv_weight[0].copy_(G @ W0)
        model.inv_bias[0].copy_(c0 @ G.T + h)
        model.inv_weight[1].copy_(W1 @ G_inv)
        model.inv_bias[1].copy_(c1 - (W1 @ G_inv @ h))
    before = model.log_joint(X)
    centers = model.statistics_centers()
    stats = empty_statistics(model)
    accumulate_hard_statistics(model, X, paths, centers, stats)
    m_step_layers(model, stats, centers, reg, max_iter=500, prior_count=prior_count)
    return before, model.log_joint(X)


@pytest.mark.parametrize("prior_count", [0.0, 5.0])
def test_m_step_is_the_same_in_every_gauge_between_layers(prior_count):
    # reg_covar and the prior are data-space terms: an M-step from two
    # parametrisations of one model (an invertible affine map between the
    # layers, undone by the next layer) gives the same model, so that the
    # layers maximise one objective and hard EM cannot cycle between them
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(400, 3, generator=gen, dtype=torch.float64) * torch.tensor([3.0, 1.0, 0.1])
    G = torch.tensor([[4.0, 1.0, 0.0], [0.0, 0.5, 0.2], [0.3, 0.0, 2.0]], dtype=torch.float64)
    h = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    eye, zero = torch.eye(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    first = _random_model((3, 2), 3)
    paths = first.unflatten_index(first.log_joint(X).argmax(1))
    before_a, after_a = _m_step_after_gauge(first, eye, zero, X, paths, 0.3, prior_count)
    before_b, after_b = _m_step_after_gauge(_random_model((3, 2), 3), G, h, X, paths, 0.3,
                                            prior_count)
    np.testing.assert_allclose(before_b.numpy(), before_a.numpy(), rtol=1e-10)
    assert (after_a.numpy().mean() > before_a.numpy().mean() - 1.0)
    np.testing.assert_allclose(after_b.numpy(), after_a.numpy(), rtol=1e-4, atol=1e-3)


def test_prior_keeps_a_deep_fit_on_few_samples_sane():
    rng = np.random.RandomState(0)
    X = rng.randn(120, 6) @ rng.randn(6, 6)  # 120 samples for 16 paths in 6-D
    plain = DeepGMMEstimator((2, 2, 4), prior_count=0.0, random_state=0,
                             max_iter=40).fit(X[:80])
    prior = DeepGMMEstimator((2, 2, 4), prior_count=8.0, random_state=0, max_iter=40).fit(X[:80])
    assert prior.score(X[80:]) > plain.score(X[80:]) + 1.0
    for A in prior.transforms_:  # no drift along the gauge between layers
        assert np.linalg.svd(A, compute_uv=False).max() < 1e3


def test_hard_m_step_gain_equals_log_likelihood_gain():
    model = _random_model((2, 3, 2), 3)
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(300, 3, generator=gen, dtype=torch.float64)
    paths = model.unflatten_index(model.log_joint(X).argmax(1))
    centers = [X.mean(0), torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)]
    stats = empty_statistics(model)
    accumulate_hard_statistics(model, X, paths, centers, stats)
    # the statistics of layer 0 are those of the raw (centred) data per (node, inner path)
    total = stats[0][..., -1, -1].sum()
    assert float(total) == 300
    before = float(model.path_score(X, paths).sum())
    gain = m_step_layers(model, stats, centers, 0.0, max_iter=100)
    after = float(model.path_score(X, paths).sum())
    assert gain > 0
    np.testing.assert_allclose(after - before, gain, rtol=1e-8)
    R, r = fold_upper_layers(model, 0)
    assert R.shape == (6, 3, 3) and r.shape == (6, 3)


# ------------------------------------------------------------ estimator
@pytest.mark.parametrize("K", [1, 3])
def test_one_layer_equals_gaussian_mixture(K):
    X = _blobs()
    est = DeepGMMEstimator((K,), algorithm="soft_em", prior_count=0.0, random_state=0,
                           max_iter=200,
                           tol=1e-6).fit(X)
    A, b = est.transforms_[0], est.biases_[0]
    gmm = _sklearn_gmm(est.path_weights_, b, A @ A.transpose(0, 2, 1))
    np.testing.assert_allclose(est.score_samples(X), gmm.score_samples(X), rtol=1e-10)
    np.testing.assert_allclose(est.predict_proba(X), gmm.predict_proba(X), atol=1e-10)
    # and soft EM with one layer fits like a GMM (same likelihood at convergence)
    ref = SkGaussianMixture(K, random_state=0, tol=1e-6, max_iter=500).fit(X)
    assert abs(est.score(X) - ref.score(X)) < 1e-3
    assert est._n_parameters() == K * (2 + 3) + K - 1  # as a full-covariance GMM


def test_score_samples_equals_equivalent_shallow_gmm():
    X = _blobs(150)
    est = DeepGMMEstimator((2, 3, 2), random_state=0, max_iter=10, dtype="float64").fit(X)
    gm = est.to_gaussian_mixture()
    assert gm.n_components == est.n_paths_ == 12
    Xtest = np.random.RandomState(1).randn(200, 2) * 4
    np.testing.assert_allclose(est.score_samples(Xtest), gm.score_samples(Xtest), rtol=1e-6)
    np.testing.assert_allclose(est.predict_proba(Xtest), gm.predict_proba(Xtest), atol=1e-6)
    sk = _sklearn_gmm(gm.weights_, gm.means_, gm.covariances_)
    np.testing.assert_allclose(est.score_samples(Xtest), sk.score_samples(Xtest), rtol=1e-6)
    np.testing.assert_allclose(est.path_weights_.ravel(), gm.weights_, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("path_search", ["heuristic", "exhaustive"])
def test_hard_em_objective_non_decreasing(path_search):
    X = _blobs(200)
    # without the prior (its target moves with the statistics): with it, the
    # log-likelihood can fall a little (seen for some seeds, and on CUDA's streams)
    est = DeepGMMEstimator(
        (3, 2, 2), path_search=path_search, prior_count=0.0, random_state=0, max_iter=15,
        tol=0.0,
    )
    with pytest.warns(Warning):
        est.fit(X)
    bounds = np.asarray(est.lower_bounds_)
    assert len(bounds) == 15
    assert np.all(np.diff(bounds) >= -1e-9 * np.abs(bounds[:-1]))
    assert bounds[-1] > bounds[0]
    if path_search == "heuristic":
        assert all(0 <= h["switch_rate"] <= 1 for h in est.history_)


def test_hard_em_objective_non_decreasing_on_integer_pixels():
    # raw load_digits: constant and integer-valued pixels, where reg_covar sets
    # the variance of many directions; with reg_covar added per layer (not in
    # data space) the layers pulled against each other and the objective fell
    # by up to 56 nats per iteration
    from sklearn.datasets import load_digits

    est = DeepGMMEstimator((2, 2, 4), prior_count=0.0, random_state=3, max_iter=30, tol=0.0)
    with pytest.warns(ConvergenceWarning):
        est.fit(load_digits().data[:600])
    bounds = np.asarray(est.lower_bounds_)
    assert np.all(np.diff(bounds) >= -1e-9 * np.abs(bounds[:-1]))


@pytest.mark.parametrize("init_params", ["kmeans", "kmeans_outer", "random"])
def test_init_params(init_params):
    X = _blobs(100)
    # without the prior (its target moves with the statistics), hard EM is monotone
    est = DeepGMMEstimator((2, 3), init_params=init_params, prior_count=0.0, random_state=0,
                           max_iter=10, tol=0.0).fit(X)
    bounds = np.asarray(est.lower_bounds_)
    assert np.all(np.diff(bounds) >= -1e-9 * np.abs(bounds[:-1]))
    assert est.score(X) > DeepGMMEstimator((1,), random_state=0).fit(X).score(X)


def test_soft_em_log_likelihood_non_decreasing():
    X = _blobs(150)
    est = DeepGMMEstimator((2, 2), algorithm="soft_em", prior_count=0.0, random_state=0,
                           max_iter=15, tol=0.0)
    with pytest.warns(Warning):
        est.fit(X)
    bounds = np.asarray(est.lower_bounds_)
    assert np.all(np.diff(bounds) >= -1e-8 * np.abs(bounds[:-1]))


def test_deep_beats_single_gaussian_and_heuristic_close_to_exhaustive():
    X = _blobs(200)
    one = DeepGMMEstimator((1,), random_state=0).fit(X).score(X)
    deep = DeepGMMEstimator((3, 2), random_state=0, max_iter=50).fit(X)
    heur = DeepGMMEstimator((3, 2), path_search="heuristic", random_state=0, max_iter=50).fit(X)
    assert deep.score(X) > one + 0.5
    assert abs(heur.score(X) - deep.score(X)) < 0.2


def test_adam_improves_log_likelihood():
    X = _blobs(100)
    est = DeepGMMEstimator((2, 2), algorithm="adam", learning_rate=1e-2, batch_size=64,
                           random_state=0, max_iter=15, tol=0.0).fit(X)
    assert est.lower_bounds_[-1] > est.lower_bounds_[0]
    assert np.isfinite(est.score(X))


def test_factorized_weights_and_path_nodes():
    X = _blobs(100)
    est = DeepGMMEstimator((3, 2), path_weights="factorized", random_state=0, max_iter=10).fit(X)
    w = est.path_weights_
    np.testing.assert_allclose(w, np.outer(w.sum(1), w.sum(0)), atol=1e-12)
    labels = est.predict(X)
    nodes = est.path_nodes(labels)
    assert nodes.shape == (300, 2)
    np.testing.assert_array_equal(nodes[:, 0] * 2 + nodes[:, 1], labels)
    with pytest.raises(ValueError, match="path indices"):
        est.path_nodes([6])


def test_seeded_reproducible_sampling_and_chunking():
    X = _blobs(100)
    a = DeepGMMEstimator((2, 2), random_state=3, max_iter=5).fit(X)
    b = DeepGMMEstimator((2, 2), random_state=3, max_iter=5, chunk_size=7).fit(X)
    # the chunks sum the statistics in another order: round-off, amplified by the
    # prior target's within-path scatters and the L-BFGS stopping tests
    np.testing.assert_allclose(a.score_samples(X), b.score_samples(X), rtol=1e-8)
    Xs, ys = a.sample(50)
    Xs2, _ = a.sample(50)
    np.testing.assert_array_equal(Xs, Xs2)
    assert Xs.shape == (50, 2) and ys.shape == (50,) and ys.max() < 4
    np.testing.assert_array_equal(a.fit_predict(X), a.predict(X))


def test_partial_fit_and_pickle():
    import pickle

    X = _blobs(100)
    est = DeepGMMEstimator((2, 2), learning_rate=1e-2, random_state=0)
    for _ in range(3):
        est.partial_fit(X[::2])
    assert est.n_steps_ == 3 and np.isfinite(est.score(X))
    clone = pickle.loads(pickle.dumps(est))
    np.testing.assert_allclose(clone.score_samples(X), est.score_samples(X))
    clone.partial_fit(X[1::2])
    assert clone.n_steps_ == 4
    one = DeepGMMEstimator(3, random_state=0, max_iter=5).fit(X)  # an int: one layer
    assert one.n_paths_ == 3


def test_float32_runs():
    X = _blobs(100).astype(np.float32)
    est = DeepGMMEstimator((2, 2), random_state=0, max_iter=5, dtype="float32").fit(X)
    assert est.score_samples(X).dtype == np.float32
    assert np.isfinite(est.score(X))


@pytest.mark.parametrize(
    "params, match",
    [
        ({"n_components": ()}, "n_components"),
        ({"n_components": (2, 0)}, "n_components"),
        ({"n_components": (2.5,)}, "n_components"),
        ({"n_components": "abc"}, "n_components"),
        ({"algorithm": "sgd"}, "algorithm"),
        ({"path_search": "greedy"}, "path_search"),
        ({"reg_covar": -1.0}, "reg_covar"),
        ({"m_step_iter": 0}, "m_step_iter"),
        ({"n_components": (50,)}, "n_samples"),
    ],
)
def test_bad_parameters_raise(params, match):
    with pytest.raises(ValueError, match=match):
        DeepGMMEstimator(**params).fit(_blobs(10))


def test_not_fitted_and_shallow_limit():
    est = DeepGMMEstimator()
    with pytest.raises(NotFittedError):
        est.score_samples(_blobs(5))
    est.fit(_blobs(20))
    with pytest.raises(ValueError, match="max_elements"):
        est.to_gaussian_mixture(max_elements=10)
    with pytest.raises(ValueError, match="features"):
        est.score_samples(np.zeros((3, 5)))


@parametrize_with_checks(
    [DeepGMMEstimator(n_components=(2, 2), max_iter=5, m_step_iter=10, random_state=0)]
)
def test_sklearn_compatible(estimator, check):
    check(estimator)


# ------------------------------------------------------------ BSDS300 patches
def test_bsds300_patches_synthetic(tmp_path):
    from PIL import Image

    rng = np.random.RandomState(0)
    Image.fromarray(np.full((20, 30), 100, dtype=np.uint8)).save(tmp_path / "flat.png")
    Image.fromarray(rng.randint(0, 256, (25, 20)).astype(np.uint8)).save(tmp_path / "noise.png")
    X = make_bsds300_patches(tmp_path, 500, random_state=0)
    assert X.shape == (500, 63) and X.dtype == np.float64
    np.testing.assert_array_equal(X, make_bsds300_patches(tmp_path, 500, random_state=0))
    flat = np.abs(X).max(1) < 1 / 256  # the constant image: only dequantisation noise
    assert 100 < flat.sum() < 400
    assert np.abs(X).max() < 1
    X4 = make_bsds300_patches(tmp_path, 10, patch_size=4, random_state=1)
    assert X4.shape == (10, 15)
    with pytest.raises(FileNotFoundError):
        make_bsds300_patches(tmp_path / "missing", 10)
    with pytest.raises(ValueError, match="patch_size"):
        make_bsds300_patches(tmp_path, 10, patch_size=40)


def test_bsds300_patches_real_data():
    if not (BSDS / "train").is_dir():
        pytest.skip(f"BSDS300 images not found at {BSDS}")
    X = make_bsds300_patches(BSDS / "train", 2000, random_state=0)
    assert X.shape == (2000, 63)
    assert np.isfinite(X).all() and np.abs(X).max() < 1
    # the dropped pixel is minus the sum of the others; patch variance is small
    assert 0.01 < X.std() < 0.3


def test_partial_fit_after_a_fit_with_an_empty_path():
    # Hard EM on 30 points leaves path (0, 0) without samples: its weight stays
    # zero with a finite logit, so that Adam's steps keep every parameter finite
    # (a -inf logit was reported as a divergence for 16 of 60 seeds). On the CPU:
    # CUDA's random stream gives another initialisation.
    X = np.random.RandomState(0).uniform(size=(30, 3))
    est = DeepGMMEstimator((2, 2), prior_count=8.0, m_step_iter=10, max_iter=5,
                           random_state=7, device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        est.fit(X)
    assert est.path_weights_.min() == 0.0
    before = est.score(X)
    for _ in range(3):
        est.partial_fit(X)
    assert all(torch.isfinite(p).all() for p in est.module_.parameters())
    assert np.isfinite(est.score(X)) and abs(est.score(X) - before) < 1.0
