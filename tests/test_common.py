"""The shared contract of every public estimator (run: python -m pytest tests/test_common.py).

Each estimator is fitted small (a few iterations on a few hundred rows), so
the checks are about the contract, not about model quality: determinism,
pickling, dtypes, chunk/batch invariance, no mutation of the input, sampling,
warm starts, no global state touched, errors, and ``torch.distributed``
training with two gloo processes.
"""

from __future__ import annotations

import copy
import pickle
import warnings

import numpy as np
import pytest
import torch
from sklearn.datasets import make_blobs
from sklearn.exceptions import ConvergenceWarning, NotFittedError

import skdeepmix
from skdeepmix import TrainingDivergedError

from _gloo import run_on_ranks

N_FEATURES = 4

#: every public estimator, fitted small (the contract, not the quality)
SMALL = {
    "GaussianMixture": dict(n_components=2),
    "BayesianGaussianMixture": dict(n_components=3),
    "DeepGMMEstimator": dict(n_components=(2, 2), max_iter=5),
    "CPMMEstimator": dict(
        n_components=2, n_points_per_trajectory=3, rank=1, hidden_size=8, max_iter=2,
        batch_size=64,
    ),
    "DCGMMEstimator": dict(n_components=4, max_iter=2, batch_size=32),
    "GMVAEDPGMM": dict(
        n_components=3, latent_dim=2, encoder_sizes=(8,), pretrain_iter=1, max_iter=2,
        batch_size=64, n_score_samples=4,
    ),
}
#: the estimators trained by gradient steps (they have a learning rate)
GRADIENT_TRAINED = {
    "DeepGMMEstimator": dict(algorithm="adam"),
    "CPMMEstimator": {},
    "DCGMMEstimator": {},
    "GMVAEDPGMM": {},
}
#: EM estimators: a distributed fit equals the single-process fit
EXACT_DISTRIBUTED = ("GaussianMixture", "BayesianGaussianMixture")


def _estimator(name, **params):
    cls = getattr(skdeepmix, name)
    return cls(**{**SMALL[name], "random_state": 0, "device": "cpu", **params})


def _data(n=240, dtype=np.float64, seed=0):
    X, _ = make_blobs(n, n_features=N_FEATURES, centers=3, random_state=seed)
    return X.astype(dtype)


@pytest.fixture(scope="module")
def X():
    return _data()


@pytest.fixture(scope="module", params=sorted(SMALL))
def fitted(request, X):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return request.param, _estimator(request.param).fit(X)


def _quiet_fit(estimator, X):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return estimator.fit(X)


def test_every_public_estimator_is_covered():
    public = {
        name for name in skdeepmix.__all__
        if isinstance(getattr(skdeepmix, name), type)
        and issubclass(getattr(skdeepmix, name), skdeepmix.BaseDeepMixture)
        and not name.startswith("Base")
    }
    assert public == set(SMALL)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_shared_parameters_have_one_meaning(name):
    params = getattr(skdeepmix, name)().get_params()
    shared = {
        "tol", "max_iter", "n_init", "random_state", "warm_start", "verbose",
        "verbose_interval", "device", "dtype", "chunk_size",
    }
    assert shared <= set(params)
    assert params["dtype"] is None and params["device"] == "auto"
    assert params["chunk_size"] is None and params["n_init"] == 1


def test_determinism(fitted, X):
    name, model = fitted
    again = _quiet_fit(_estimator(name), X)
    np.testing.assert_array_equal(model.score_samples(X), again.score_samples(X))
    np.testing.assert_array_equal(model.predict(X), again.predict(X))
    np.testing.assert_array_equal(model.sample(5)[0], again.sample(5)[0])


def test_pickle_round_trip(fitted, X):
    _, model = fitted
    restored = pickle.loads(pickle.dumps(model))
    np.testing.assert_array_equal(restored.score_samples(X), model.score_samples(X))
    np.testing.assert_array_equal(restored.predict(X), model.predict(X))


@pytest.mark.parametrize("name", sorted(SMALL))
def test_dtype_follows_the_input(name):
    X32 = _data(dtype=np.float32)
    model = _quiet_fit(_estimator(name), X32)
    assert model.score_samples(X32).dtype == np.float32
    assert model.sample(3)[0].dtype == np.float32
    X64 = _data()
    model = _quiet_fit(_estimator(name), X64)
    assert model.score_samples(X64).dtype == np.float64
    forced = _quiet_fit(_estimator(name, dtype="float32"), X64)
    assert forced.score_samples(X64).dtype == np.float32


def test_scores_do_not_depend_on_chunks_or_other_rows(fitted, X):
    _, model = fitted
    whole = model.score_samples(X)
    parts = np.concatenate([model.score_samples(X[:7]), model.score_samples(X[7:])])
    np.testing.assert_allclose(parts, whole, rtol=1e-10, atol=1e-10)
    small_chunks = copy.deepcopy(model).set_params(chunk_size=5)
    np.testing.assert_allclose(small_chunks.score_samples(X), whole, rtol=1e-10, atol=1e-10)
    order = np.random.RandomState(0).permutation(len(X))
    np.testing.assert_allclose(model.score_samples(X[order]), whole[order], rtol=1e-10,
                               atol=1e-10)
    np.testing.assert_array_equal(model.predict(X[order]), model.predict(X)[order])


@pytest.mark.parametrize("name", sorted(SMALL))
def test_fit_does_not_modify_X(name):
    X = _data()
    before = X.copy()
    _quiet_fit(_estimator(name), X)
    np.testing.assert_array_equal(X, before)


def test_sample_shapes(fitted):
    _, model = fitted
    X_new, labels = model.sample(7)
    assert X_new.shape == (7, N_FEATURES) and labels.shape == (7,)
    assert np.all(np.isfinite(X_new))
    with pytest.raises(ValueError, match="n_samples"):
        model.sample(0)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_warm_start_continues(name):
    X = _data()
    model = _quiet_fit(_estimator(name, warm_start=True, max_iter=2, n_init=2), X)

    def no_new_initialisation(*args, **kwargs):
        raise AssertionError("a warm-started fit must continue, not initialise again")

    model._initialize = no_new_initialisation
    _quiet_fit(model, X)
    assert model.n_iter_ >= 1 and len(model.history_) >= 1
    assert np.isfinite(model.score(X))


@pytest.mark.parametrize("name", sorted(SMALL))
def test_fit_touches_no_global_state(name):
    X = _data()
    torch_state = torch.random.get_rng_state().clone()
    np_state = np.random.get_state()[1].copy()
    threads = torch.get_num_threads()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    model = _quiet_fit(_estimator(name), X)
    model.score_samples(X)
    model.sample(3)
    assert torch.equal(torch_state, torch.random.get_rng_state())
    np.testing.assert_array_equal(np_state, np.random.get_state()[1])
    assert torch.get_num_threads() == threads
    if cuda_states:
        for a, b in zip(cuda_states, torch.cuda.get_rng_state_all()):
            assert torch.equal(a, b)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_not_fitted_and_bad_input(name):
    model = _estimator(name)
    with pytest.raises(NotFittedError):
        model.score_samples(_data())
    with pytest.raises(ValueError, match="NaN|infinity"):
        model.fit(np.full((50, N_FEATURES), np.nan))
    with pytest.raises(ValueError):
        model.fit(np.ones(5))  # 1-D
    fitted_model = _quiet_fit(_estimator(name), _data())
    with pytest.raises(ValueError, match="features"):
        fitted_model.score_samples(np.ones((3, N_FEATURES + 1)))


#: default fits on load_digits of the estimators without such a test in their
#: own file (test_cpmm.py, test_dcgmm.py and test_gmvae_dpgmm.py have theirs)
DEFAULT_DIGITS_FITS = ["GaussianMixture", "BayesianGaussianMixture", "DeepGMMEstimator"]


@pytest.mark.parametrize("name", DEFAULT_DIGITS_FITS)
def test_default_fit_on_digits_converges(name):
    from sklearn.datasets import load_digits

    X = load_digits().data  # as a user passes it: integers 0..16
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        model = getattr(skdeepmix, name)(random_state=0).fit(X)
    assert model.converged_ and np.isfinite(model.score(X))


@pytest.mark.parametrize("name", sorted(GRADIENT_TRAINED))
def test_a_huge_learning_rate_is_reported(name):
    model = _estimator(name, learning_rate=1e6, max_iter=3, **GRADIENT_TRAINED[name])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        with pytest.raises(TrainingDivergedError, match="learning_rate"):
            model.fit(_data())


@pytest.mark.parametrize("name", sorted(SMALL))
def test_huge_inputs_give_a_clear_error_or_a_finite_model(name):
    X = _data() * 1e25
    try:
        model = _quiet_fit(_estimator(name), X)
    except (ValueError, TrainingDivergedError):
        return  # a clear error (a raw torch RuntimeError would fail the test)
    assert np.all(np.isfinite(model.score_samples(X)))


# ------------------------------------------------------------ distributed
def _fit_every_estimator_on_a_shard(rank):
    """Scores of every estimator fitted on this rank's shard (unequal shards)."""
    results = {}
    X = _data(n=300)
    shard = X[:130] if rank == 0 else X[130:]
    for name in sorted(SMALL):
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                model = _estimator(name).fit(shard)
            messages = [str(w.message) for w in caught
                        if not issubclass(w.category, ConvergenceWarning)]
            results[name] = {"scores": model.score_samples(X), "warnings": messages}
        except Exception as exc:  # reported by the test
            results[name] = f"{type(exc).__name__}: {exc}"
    return results


@pytest.fixture(scope="module")
def distributed_results():
    return run_on_ranks(_fit_every_estimator_on_a_shard)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_distributed_training_gives_one_model(distributed_results, name):
    first, second = (r[name] for r in distributed_results)
    assert not isinstance(first, str), first
    assert not isinstance(second, str), second
    assert first["warnings"] == [], first["warnings"]  # no "fits locally" warning
    np.testing.assert_array_equal(first["scores"], second["scores"])
    if name in EXACT_DISTRIBUTED:
        single = _quiet_fit(_estimator(name), _data(n=300))
        np.testing.assert_allclose(first["scores"], single.score_samples(_data(n=300)),
                                   rtol=1e-7)
