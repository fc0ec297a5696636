"""The fused EM pass (skdeepmix._gaussian.MixturePass) against direct float64 sums."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from skdeepmix import _gaussian as G

from _gloo import run_on_ranks

COVARIANCE_TYPES = ["full", "tied", "diag", "spherical"]
N, D, K = 3000, 5, 4


def _data(shift=0.0, spread=1.0, seed=0, error=0.3):
    """Rows from K Gaussians with per-feature scales, and a model near them
    (means off by about ``error``)."""
    generator = torch.Generator().manual_seed(seed)
    options = dict(generator=generator, dtype=torch.float64)
    centers = 4.0 * torch.randn(K, D, **options)
    labels = torch.randint(K, (N,), generator=generator)
    scales = 0.2 + torch.rand(K, D, **options)
    X = centers[labels] + spread * scales[labels] * torch.randn(N, D, **options) + shift
    means = centers + shift + error * torch.randn(K, D, **options)
    weights = torch.rand(K, **options) + 0.5
    sample_weight = 2.0 * torch.rand(N, **options)
    return X, means, weights / weights.sum(), sample_weight


def _covariances(covariance_type, variance):
    eye = torch.eye(D, dtype=torch.float64)
    return {"full": variance * eye.expand(K, D, D), "tied": variance * eye,
            "diag": torch.full((K, D), variance, dtype=torch.float64),
            "spherical": torch.full((K,), variance, dtype=torch.float64)}[covariance_type]


def _reference(X, means, precisions_cholesky, covariance_type, log_weights, sample_weight):
    """nk, means, covariances, sum w log p(x), sum w r log r: direct float64 sums."""
    if covariance_type in ("full", "tied"):  # whitened differences
        log_prob = G.log_gaussian_prob(X, means, precisions_cholesky, covariance_type)
    else:  # differences (log_gaussian_prob expands the squares)
        precision = precisions_cholesky.square()
        if covariance_type == "spherical":
            precision = precision[:, None].expand(K, D)
        log_prob = (-0.5 * ((X[:, None, :] - means).square() * precision).sum(-1)
                    + 0.5 * precision.log().sum(1) - 0.5 * D * G.LOG_2PI)
    log_prob = log_prob + log_weights
    norm = torch.logsumexp(log_prob, 1)
    resp = (log_prob - norm[:, None]).exp()
    weighted = resp * sample_weight[:, None]
    nk = weighted.sum(0) + 10 * torch.finfo(torch.float64).eps
    new_means = weighted.T @ X / nk[:, None]
    scatter = torch.stack([((X - new_means[k]) * weighted[:, k:k + 1]).T @ (X - new_means[k])
                           for k in range(K)])
    covariances = {
        "full": scatter / nk[:, None, None],
        "tied": scatter.sum(0) / nk.sum(),
        "diag": torch.diagonal(scatter, dim1=1, dim2=2) / nk[:, None],
        "spherical": torch.diagonal(scatter, dim1=1, dim2=2).mean(1) / nk,
    }[covariance_type]
    entropy = (sample_weight[:, None] * torch.special.xlogy(resp, resp)).sum()
    return nk, new_means, covariances, sample_weight @ norm, entropy


def _run_pass(X, means, precisions_cholesky, covariance_type, log_weights, sample_weight,
              dtype, chunk=700):
    cast = lambda t: t.to(dtype)  # noqa: E731
    X, sample_weight = cast(X), cast(sample_weight)
    em_pass = G.MixturePass(covariance_type, cast(log_weights.exp() @ means), K,
                            means=cast(means), precisions_cholesky=cast(precisions_cholesky),
                            log_offsets=cast(log_weights), entropy=True)

    def rows():
        for start in range(0, N, chunk):
            yield X[start:start + chunk], None, sample_weight[start:start + chunk]

    for chunk_X, _, chunk_weights in rows():
        em_pass.add(chunk_X, None, chunk_weights)
    nk, new_means, covariances = em_pass.finalize(0.0, None, rows)
    stats = em_pass.stats
    return em_pass, (nk, new_means, covariances, stats.log_prob_sum, stats.resp_log_resp_sum)


def _assert_matches(result, reference, rtol):
    names = ["nk", "means", "covariances", "log-likelihood"]
    for name, got, want in zip(names, result, reference):
        got = got.double()
        error = float((got - want).abs().max() / want.abs().max())
        assert error < rtol, (name, error)
    if len(result) > 4:  # the entropy (near 0 for separated clusters)
        assert abs(float(result[4]) - float(reference[4])) < rtol * N


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_pass_matches_direct_sums(covariance_type, dtype):
    X, means, weights, sample_weight = _data()
    chol = G.precision_cholesky_from_covariances(_covariances(covariance_type, 0.8),
                                                 covariance_type)
    reference = _reference(X, means, chol, covariance_type, weights.log(), sample_weight)
    em_pass, result = _run_pass(X, means, chol, covariance_type, weights.log(), sample_weight,
                                dtype)
    assert em_pass.exact_components == []  # the expansion is precise enough here
    assert result[2].dtype == dtype
    _assert_matches(result, reference, 1e-10 if dtype == torch.float64 else 2e-4)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_tight_components_far_from_the_center_are_computed_exactly(covariance_type, dtype):
    # expanded around the center, component k would lose ~eps |a_k|^2 / var
    # nats and its second moments would cancel |a_k|^2 / var: in float32 the
    # tight ones, in float64 those collapsed to about reg_covar
    # (float32 cannot hold means near 1e4 to a fraction of a 0.01 spread)
    spread, shift = (1e-2, 0.0) if dtype == torch.float32 else (1e-4, 1e4)
    X, means, weights, sample_weight = _data(shift=shift, spread=spread, error=spread / 10)
    variance = spread**2
    covariances = _covariances(covariance_type, 1.0)
    tight = [1, 3]
    if covariance_type == "tied":
        covariances, tight = covariances * variance, list(range(K))
    else:
        covariances[tight] *= variance
    chol = G.precision_cholesky_from_covariances(covariances, covariance_type)
    cast = lambda t: t.to(dtype).double()  # noqa: E731  (what the pass sees)
    reference = _reference(cast(X), cast(means), cast(chol), covariance_type,
                           cast(weights).log(), cast(sample_weight))
    em_pass, result = _run_pass(X, means, chol, covariance_type, weights.log(), sample_weight,
                                dtype)
    assert em_pass.exact_components == tight
    # the others' sums around the center cancel (their rows are tight too): a
    # second pass redoes only them ('tied': its one covariance)
    assert em_pass.stats.recentred.tolist() == [
        covariance_type == "tied" or k not in tight for k in range(K)]
    assert result[2].dtype == dtype
    # float32: the tight components' whitened sums keep ~2e-5 (a second pass
    # redoes only the components that lost more, here the others)
    _assert_matches(result, reference, 1e-10 if dtype == torch.float64 else 5e-5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("covariance_type", ["full", "diag", "spherical"])
def test_exact_components_on_the_rows_they_can_reach_equal_every_row(
        monkeypatch, covariance_type, dtype):
    # on the CPU a tight, far component is computed from differences only on
    # the rows where its log-density can come within the floor of the row's
    # largest: the same pass as computing it on every row
    spread, shift = (1e-2, 0.0) if dtype == torch.float32 else (1e-4, 1e4)
    X, means, weights, sample_weight = _data(shift=shift, spread=spread, error=spread / 10)
    covariances = _covariances(covariance_type, 1.0)
    covariances[[1, 3]] *= spread**2
    chol = G.precision_cholesky_from_covariances(covariances, covariance_type)
    computed = []
    competitive = G.MixturePass._competitive_exact_log_prob

    def counting(self, features, log_prob, floor):
        competitive(self, features, log_prob, floor)
        computed.append(self._kept[0].numel())  # the rows gathered

    monkeypatch.setattr(G.MixturePass, "_competitive_exact_log_prob", counting)
    em_pass, some_rows = _run_pass(X, means, chol, covariance_type, weights.log(),
                                   sample_weight, dtype)
    assert em_pass._rows_only and em_pass.exact_components == [1, 3]
    # the E-step (the first len(chunks) calls) computed each of the two about
    # on its own cluster's rows (N / K), not on all N
    first_pass = computed[:len(range(0, N, 700))]
    assert 0 < sum(first_pass) <= 1.2 * 2 * N / K
    monkeypatch.setattr(G.MixturePass, "_competitive_rows_setup", lambda self: False)
    _, every_row = _run_pass(X, means, chol, covariance_type, weights.log(), sample_weight,
                             dtype)
    rtol = 1e-12 if dtype == torch.float64 else 1e-6  # relative to each tensor's largest
    for got, want in zip(some_rows, every_row):
        torch.testing.assert_close(got, want, rtol=0.0, atol=rtol * float(want.abs().max()))


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_exact_second_pass_when_the_centred_sums_lose_too_much(covariance_type):
    # a model of unit variances (the E-step expansion is fine) of tight clusters:
    # second moments around the mixture mean cancel to a few digits in float32
    X, means, weights, sample_weight = _data(spread=1e-3)
    chol = G.precision_cholesky_from_covariances(_covariances(covariance_type, 1.0),
                                                 covariance_type)
    reference = _reference(X.to(torch.float32).double(), means, chol, covariance_type,
                           weights.log(), sample_weight)
    em_pass, result = _run_pass(X, means, chol, covariance_type, weights.log(), sample_weight,
                                torch.float32)
    assert em_pass.exact_components == [] and em_pass.stats.exact
    _assert_matches(result[:3], reference[:3], 1e-4)
    variances = result[2].diagonal(dim1=-2, dim2=-1) if covariance_type in ("full", "tied") \
        else result[2]
    assert (variances > 0).all()


@pytest.mark.parametrize("n_features", range(1, 8))
def test_circulant_pairs_cover_each_pair_once(n_features):
    i, j = G._circulant_pairs(n_features, torch.device("cpu"))
    pairs = sorted(tuple(sorted(p)) for p in zip(i.tolist(), j.tolist()))
    assert pairs == list(itertools.combinations_with_replacement(range(n_features), 2))


def test_given_responsibilities_give_the_mixture_moments():
    X, _, _, sample_weight = _data()
    resp = torch.softmax(torch.randn(N, K, generator=torch.Generator().manual_seed(3),
                                     dtype=torch.float64), 1)
    em_pass = G.MixturePass("full", X[:100].mean(0), K)
    em_pass.add(X, resp, sample_weight)
    nk, means, covariances = em_pass.finalize(0.0)
    weighted = resp * sample_weight[:, None]
    want_nk = weighted.sum(0)
    want_means = weighted.T @ X / want_nk[:, None]
    centred = X[:, None, :] - want_means
    want = torch.einsum("nk,nkd,nke->kde", weighted, centred, centred) / want_nk[:, None, None]
    torch.testing.assert_close(nk, want_nk, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(means, want_means, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(covariances, want, rtol=1e-9, atol=1e-9)
    assert math.isclose(float(em_pass.stats.weight_sum), float(sample_weight.sum()))


def _tight_pass_on_a_shard(rank):
    """The float64 tight-components pass on half of the rows (rank's half)."""
    from skdeepmix._distributed import RowPartition

    X, means, weights, sample_weight = _data(shift=1e4, spread=1e-4, error=1e-5)
    covariances = _covariances("full", 1.0)
    covariances[[1, 3]] *= 1e-8
    chol = G.precision_cholesky_from_covariances(covariances, "full")
    half = slice(0, N // 2) if rank == 0 else slice(N // 2, N)
    X, sample_weight = X[half], sample_weight[half]
    partition = RowPartition(X.shape[0], X.shape[1])
    em_pass = G.MixturePass("full", weights @ means, K, means=means,
                            precisions_cholesky=chol, log_offsets=weights.log())

    def rows():
        yield X, None, sample_weight

    em_pass.add(X, None, sample_weight)
    result = em_pass.finalize(0.0, partition, rows)
    return [t.clone() for t in result], em_pass.stats.recentred.tolist()


def test_partial_second_pass_is_exact_across_processes():
    """Two processes redo the same components' second moments and keep the
    others' (already summed) ones: the same result as one process."""
    ranks = run_on_ranks(_tight_pass_on_a_shard)
    X, means, weights, sample_weight = _data(shift=1e4, spread=1e-4, error=1e-5)
    covariances = _covariances("full", 1.0)
    covariances[[1, 3]] *= 1e-8
    chol = G.precision_cholesky_from_covariances(covariances, "full")
    em_pass, single = _run_pass(X, means, chol, "full", weights.log(), sample_weight,
                                torch.float64)
    assert ranks[0][1] == ranks[1][1] == em_pass.stats.recentred.tolist() == [
        True, False, True, False]
    for rank in ranks:
        for got, want in zip(rank[0], single[:3]):
            assert float((got - want).abs().max() / want.abs().max()) < 1e-10


@pytest.mark.parametrize("estimator", ["GaussianMixture", "BayesianGaussianMixture"])
@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_pass_split_among_threads_equals_one_thread(monkeypatch, estimator, covariance_type):
    """With several CPU threads, the chunks of an EM pass (and of k-means
    and predictions) are summed on separate threads (each on its own, added
    in order): the same fit and the same predictions."""
    import warnings

    import numpy as np
    from sklearn.exceptions import ConvergenceWarning

    import skdeepmix
    from skdeepmix import _base, _em
    from skdeepmix._torch_utils import run_in_threads

    X, _, _, sample_weight = _data()
    X, sample_weight = X.numpy(), sample_weight.numpy()
    calls = []

    def counted(tasks):
        calls.append(len(tasks))
        return run_in_threads(tasks)

    monkeypatch.setattr(_em, "run_in_threads", counted)

    def fit(threads):
        # threads split CPU work only: on the CPU whatever the machine has
        model = getattr(skdeepmix, estimator)(n_components=K, covariance_type=covariance_type, chunk_size=400, device="cpu",
                                              random_state=0, max_iter=5, tol=0)
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            with monkeypatch.context() as patch:
                patch.setattr(type(model), "_parallel_work", 0)  # small data, threads anyway
                patch.setattr(_base, "idle_cpus", lambda: threads)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", ConvergenceWarning)  # 5 iterations
                    model.fit(X, sample_weight=sample_weight)
                scores = model.score_samples(X), model.predict_proba(X)
            assert torch.get_num_threads() == threads
        finally:
            torch.set_num_threads(before)
        return model, scores

    (one, one_scores), used_alone = fit(1), list(calls)
    (two, two_scores), used_split = fit(2), list(calls)
    assert used_alone == [] and used_split and set(used_split) == {2}
    for a, b in zip(one_scores, two_scores):  # predictions split among threads too
        np.testing.assert_allclose(b, a, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(two.lower_bound_, one.lower_bound_, rtol=1e-12)
    for name in ("weights_", "means_", "covariances_"):
        np.testing.assert_allclose(getattr(two, name), getattr(one, name), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_replicas_merge_to_the_whole_pass(covariance_type):
    """Rows added to replicas (exact components included) and merged give
    the sums of one pass over all the rows."""
    X, means, weights, sample_weight = _data(shift=1e4, spread=1e-4, error=1e-5)
    covariances = _covariances(covariance_type, 1.0)
    if covariance_type == "tied":
        covariances = covariances * 1e-8
    else:
        covariances[[1, 3]] *= 1e-8
    chol = G.precision_cholesky_from_covariances(covariances, covariance_type)
    center, log_weights = weights @ means, weights.log()

    def new_pass():
        return G.MixturePass(covariance_type, center, K, means=means, precisions_cholesky=chol,
                             log_offsets=log_weights, entropy=True)

    def rows():
        for start in range(0, N, 700):
            yield X[start:start + 700], None, sample_weight[start:start + 700]

    whole, parts = new_pass(), new_pass()
    assert whole.exact_components
    replica = parts.replica()
    for i, (chunk, _, chunk_weights) in enumerate(rows()):
        whole.add(chunk, None, chunk_weights)
        (parts if i % 2 else replica).add(chunk, None, chunk_weights)
    parts.merge(replica)
    # the same sums in another order: equal to rounding, relative to each result
    for a, b in zip(whole.finalize(0.0, None, rows), parts.finalize(0.0, None, rows)):
        assert (a - b).abs().max() <= 1e-9 * a.abs().max()
    for name in ("log_prob_sum", "resp_log_resp_sum", "weight_sum"):
        torch.testing.assert_close(getattr(whole.stats, name), getattr(parts.stats, name),
                                   rtol=1e-12, atol=0)


def _rotated(eigenvalues, seed=0):
    """A symmetric matrix with these eigenvalues, in random axes (float64)."""
    d = len(eigenvalues)
    generator = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=generator, dtype=torch.float64))
    return Q @ torch.diag(torch.tensor(eigenvalues, dtype=torch.float64)) @ Q.T


def test_float32_covariance_below_its_rounding_is_factorised_within_it():
    # a component collapsed onto fewer rows than features, held at a variance
    # below the rounding of its float32 entries: it rounds to an indefinite
    # matrix, which gets a shift of that rounding's scale, not an error
    d = 32
    eps = torch.finfo(torch.float32).eps
    covariances = torch.stack([_rotated([1.0] * 24 + [1e-9] * 8, seed) for seed in range(20)])
    rounded = covariances.to(torch.float32)
    failed = torch.linalg.cholesky_ex(rounded)[1] != 0
    assert failed.any()  # the premise: some do not factorise as they are
    chol, used = G.precision_cholesky_from_covariances(rounded, "full", return_covariances=True)
    assert torch.isfinite(chol).all()
    shift = (used - rounded).double()
    assert (shift[~failed] == 0).all()  # the others are untouched
    assert (shift.diagonal(dim1=1, dim2=2) <= 4 * d * eps).all()
    assert (shift - torch.diag_embed(shift.diagonal(dim1=1, dim2=2))).abs().max() == 0
    assert (shift.diagonal(dim1=1, dim2=2)[failed] > 0).all()
    assert (chol.diagonal(dim1=1, dim2=2) > 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_an_indefinite_covariance_still_raises(dtype):
    covariances = _rotated([1.0] * 7 + [-1e-3]).to(dtype)[None]
    with pytest.raises(ValueError, match="ill-defined empirical covariance"):
        G.precision_cholesky_from_covariances(covariances, "full")


def test_a_whitened_component_is_not_redone_for_an_indefinite_covariance():
    # the second pass sums less precisely than whitened differences: a
    # covariance of such a component that is not positive definite is left
    # to the factorisation; the others are redone exactly centred
    X = torch.randn(50, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    X[:, 2] = X[:, 0]  # singular covariances
    resp = torch.full((50, 2), 0.5, dtype=torch.float64)
    center = X.mean(0)
    requested = []
    for whitened in (None, torch.tensor([True, False])):
        stats = G.SufficientStatistics("full", center.expand(2, 3), center)
        stats.add(X, resp)

        def exact_pass(means, components, stats=stats):
            requested.append(components)
            stats.add_exact(X, resp, means, components=components)

        # a negative reg_covar makes both (singular) covariances indefinite
        stats.finalize(-1e-3, None, exact_pass, whitened=whitened)
    assert requested == [[0, 1], [1]]
