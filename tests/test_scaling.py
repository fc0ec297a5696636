"""Scaling up: out-of-core (memmap) fits, partial_fit, torch.distributed, joblib.

The distributed tests spawn 2 processes on the gloo backend (CPU, this machine)
once for the whole module and compare what every rank ends with against a
single-process fit on the concatenated shards.
"""

import pickle
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn
from sklearn.datasets import make_blobs
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import GridSearchCV

from skdeepmix import GaussianMixture
from skdeepmix._base import BaseDeepMixture
from skdeepmix._torch_utils import RowSource, is_out_of_core
from skdeepmix._train import make_optimizer, train_epoch, train_step

from _gloo import run_on_ranks

COVARIANCE_TYPES = ["full", "tied", "diag", "spherical"]
INITS = ["kmeans", "k-means++", "random_from_data"]


def _rel_error(actual, expected):
    actual, expected = np.asarray(actual, dtype=float), np.asarray(expected, dtype=float)
    return float(np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)), 1e-300))


def _distributed_data():
    X, _ = make_blobs(
        n_samples=900, n_features=3, centers=4, cluster_std=[1.0, 1.5, 0.6, 0.8], random_state=1
    )
    return X


def _gm_params(covariance_type, init_params):
    return dict(
        n_components=4,
        covariance_type=covariance_type,
        init_params=init_params,
        random_state=7,
        tol=1e-6,
        max_iter=40,
        chunk_size=128,  # several chunks per shard
        device="cpu",
    )


# ------------------------------------------------------- a tiny deep model
class _DiagGaussianModule(nn.Module):
    """A diagonal Gaussian mixture with free parameters (log-density per row)."""

    def __init__(self, means):
        super().__init__()
        K, d = means.shape
        self.means = nn.Parameter(means.clone())
        self.log_scales = nn.Parameter(torch.zeros(K, d, dtype=means.dtype))
        self.logits = nn.Parameter(torch.zeros(K, dtype=means.dtype))

    def weighted_log_prob(self, X):
        z = (X[:, None, :] - self.means) * torch.exp(-self.log_scales)
        log_norm = -self.log_scales.sum(1) - 0.5 * X.shape[1] * np.log(2 * np.pi)
        return -0.5 * z.square().sum(-1) + log_norm + torch.log_softmax(self.logits, 0)

    def forward(self, X):
        return torch.logsumexp(self.weighted_log_prob(X), 1)


class TinyGradientMixture(BaseDeepMixture):
    """A gradient-trained mixture: one epoch of Adam per iteration via train_epoch."""

    _distributed_mode = "gradients"

    def __init__(
        self, n_components=2, *, batch_size=64, learning_rate=0.05, max_iter=5, tol=0.0,
        n_init=1, random_state=None, warm_start=False, verbose=0, verbose_interval=10,
        device="cpu", dtype="float64", chunk_size=None,
    ):
        super().__init__(tol=tol, max_iter=max_iter, n_init=n_init, random_state=random_state,
                         warm_start=warm_start, verbose=verbose,
                         verbose_interval=verbose_interval, device=device, dtype=dtype,
                         chunk_size=chunk_size)
        self.n_components = n_components
        self.batch_size = batch_size
        self.learning_rate = learning_rate

    def _initialize(self, X, ctx):
        # data-dependent: differs between shards, so rank 0's must be broadcast
        index = torch.randperm(X.shape[0], generator=ctx.generator)[: self.n_components]
        self.module_ = _DiagGaussianModule(X[index])
        self._optimizer = make_optimizer("adam", self.module_.parameters(), self.learning_rate)

    def _loss(self, batch):
        return -self.module_(batch)

    def _fit_iteration(self, X, ctx):
        with torch.enable_grad():
            return -train_epoch(self._loss, self._optimizer, X, ctx, batch_size=self.batch_size)

    def _partial_fit_step(self, X, ctx):
        with torch.enable_grad():
            return -train_step(self._loss, self._optimizer, X, ctx)

    def _get_state(self):
        return {k: v.clone() for k, v in self.module_.state_dict().items()}

    def _set_state(self, state):
        self.module_.load_state_dict(state)
        self.means_ = self.module_.means.detach().numpy().copy()

    def _estimate_weighted_log_prob(self, X):
        return self.module_.weighted_log_prob(X)

    def _sample(self, n_samples, generator):
        module = self.module_
        labels = torch.multinomial(
            torch.softmax(module.logits, 0), n_samples, replacement=True, generator=generator
        )
        noise = torch.randn(n_samples, module.means.shape[1], generator=generator,
                            dtype=module.means.dtype)
        return module.means[labels] + noise * module.log_scales[labels].exp(), labels

    def _n_parameters(self):
        return sum(p.numel() for p in self.module_.parameters()) - 1


def _tiny_params(**extra):
    return {"n_components": 3, "random_state": 0, "learning_rate": 0.05, **extra}


# ------------------------------------------------------------ the spawn
def _fits_on_a_shard(rank):
    """What every distributed fit of this module gives on this rank."""
    results = {}
    X = _distributed_data()
    split = int(0.4 * len(X))  # unequal shards: 360 and 540 rows
    shard = X[:split] if rank == 0 else X[split:]
    warnings.simplefilter("ignore", ConvergenceWarning)
    for covariance_type in COVARIANCE_TYPES:
        for init_params in INITS:
            model = GaussianMixture(**_gm_params(covariance_type, init_params)).fit(shard)
            results[("gm", covariance_type, init_params)] = {
                name: getattr(model, name)
                for name in ["means_", "covariances_", "weights_", "lower_bound_", "n_iter_"]
            }
    # partial_fit on distributed mini-batches: one step uses both ranks' batches
    # (every rank must make the same number of calls)
    online = GaussianMixture(3, covariance_type="diag", random_state=0, device="cpu")
    for start in range(0, 300, 60):
        online.partial_fit(shard[start : start + 60])
    results["partial_fit"] = {"means_": online.means_, "n_steps_": online.n_steps_}
    # gradient training, equal shards, one full batch per epoch: equals one process
    Xg = _distributed_data()[:800]
    half = Xg[:400] if rank == 0 else Xg[400:]
    full = TinyGradientMixture(**_tiny_params(batch_size=400, max_iter=6)).fit(half)
    results["grad_full_batch"] = {k: v.numpy() for k, v in full.module_.state_dict().items()}
    results["grad_full_batch_lb"] = full.lower_bound_
    # unequal shards, mini-batches (different numbers of batches per rank)
    mini = TinyGradientMixture(**_tiny_params(batch_size=50, max_iter=3)).fit(shard)
    results["grad_minibatch"] = {k: v.numpy() for k, v in mini.module_.state_dict().items()}
    mini.partial_fit(shard[:40])
    results["grad_partial"] = {k: v.numpy() for k, v in mini.module_.state_dict().items()}
    # a deep estimator that trains through train_epoch
    try:
        from skdeepmix.deep_gmm import DeepGMMEstimator

        deep = DeepGMMEstimator(
            algorithm="adam", max_iter=2, batch_size=64, random_state=0, device="cpu"
        ).fit(shard[:300] if rank == 0 else shard[:250])
        states = [{k: v.numpy().copy() for k, v in deep.module_.state_dict().items()}]
        deep.partial_fit(shard[:40])
        states.append({k: v.numpy().copy() for k, v in deep.module_.state_dict().items()})
        results["deep_gmm"] = states
        # hard EM with the heuristic E-step (random restarts): exact statistics
        # (several iterations: one model on every rank; one iteration: the model
        # of one process on all the rows, up to the order of the sums)
        results["deep_gmm_em"] = [
            DeepGMMEstimator((3, 2, 2), path_search="heuristic", max_iter=max_iter,
                             random_state=0, device="cpu").fit(shard).score_samples(X)
            for max_iter in (4, 1)
        ]
    except Exception as exc:  # reported by the test that reads it
        results["deep_gmm"] = f"{type(exc).__name__}: {exc}"
    return results


@pytest.fixture(scope="module")
def distributed_results():
    return run_on_ranks(_fits_on_a_shard)


@pytest.mark.parametrize("init_params", INITS)
@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_distributed_gaussian_mixture_equals_single_process(
    distributed_results, covariance_type, init_params
):
    X = _distributed_data()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        ref = GaussianMixture(**_gm_params(covariance_type, init_params)).fit(X)
    for rank, results in enumerate(distributed_results):
        got = results[("gm", covariance_type, init_params)]
        assert got["n_iter_"] == ref.n_iter_, f"rank {rank}"
        for name in ["means_", "covariances_", "weights_", "lower_bound_"]:
            error = _rel_error(got[name], getattr(ref, name))
            assert error <= 1e-6, f"rank {rank} {name}: relative error {error:.3g}"
    # and all ranks hold the very same model
    first, second = (r[("gm", covariance_type, init_params)] for r in distributed_results)
    for name in ["means_", "covariances_", "weights_"]:
        np.testing.assert_array_equal(first[name], second[name])


def test_distributed_partial_fit_is_shared(distributed_results):
    first, second = (r["partial_fit"] for r in distributed_results)
    assert first["n_steps_"] == second["n_steps_"] > 1
    np.testing.assert_array_equal(first["means_"], second["means_"])


def test_distributed_gradient_training_identical_on_every_rank(distributed_results):
    for key in ["grad_full_batch", "grad_minibatch", "grad_partial"]:
        first, second = (r[key] for r in distributed_results)
        for name in first:
            np.testing.assert_array_equal(first[name], second[name], err_msg=f"{key} {name}")
    # averaged gradients of two equal shards, full batches == one process on all rows
    X = _distributed_data()[:800]
    ref = TinyGradientMixture(**_tiny_params(batch_size=800, max_iter=6))
    # the single process must start from rank 0's initialisation (drawn from its shard)
    ref_init = TinyGradientMixture(**_tiny_params(batch_size=800, max_iter=0))
    ref_init.fit(X[:400])
    state = ref_init._get_state()
    ref._initialize = lambda X_, ctx: (  # noqa: E731
        TinyGradientMixture._initialize(ref, X_, ctx),
        ref.module_.load_state_dict(state),
    )
    ref.fit(X)
    for name, value in ref.module_.state_dict().items():
        error = _rel_error(distributed_results[0]["grad_full_batch"][name], value.numpy())
        assert error <= 1e-8, f"{name}: relative error {error:.3g}"
    assert abs(distributed_results[0]["grad_full_batch_lb"] - ref.lower_bound_) <= 1e-8 * abs(
        ref.lower_bound_
    )


def test_distributed_deep_gmm_identical_on_every_rank(distributed_results):
    first, second = (r["deep_gmm"] for r in distributed_results)
    assert not isinstance(first, str), first
    for step, (a, b) in enumerate(zip(first, second)):
        assert a.keys() == b.keys() and len(a) > 0
        for name in a:
            np.testing.assert_array_equal(a[name], b[name], err_msg=f"step {step} {name}")


def test_distributed_deep_gmm_hard_em_equals_one_process(distributed_results):
    from skdeepmix.deep_gmm import DeepGMMEstimator

    first, second = (r.get("deep_gmm_em") for r in distributed_results)
    assert first is not None, distributed_results[0]["deep_gmm"]
    np.testing.assert_array_equal(first[0], second[0])
    np.testing.assert_array_equal(first[1], second[1])
    # after one iteration, the single-process fit on all the rows: the statistics
    # and the restarts of the heuristic E-step are global. (Later iterations
    # drift apart: rounding differences in the sums change where L-BFGS stops.)
    X = _distributed_data()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        single = DeepGMMEstimator((3, 2, 2), path_search="heuristic", max_iter=1,
                                  random_state=0, device="cpu").fit(X)
    np.testing.assert_allclose(first[1], single.score_samples(X), rtol=1e-6)


# -------------------------------------------------------------- out of core
@pytest.fixture(scope="module")
def blobs():
    X, y = make_blobs(
        n_samples=3000, n_features=4, centers=3, cluster_std=[1.0, 1.5, 0.6], random_state=0
    )
    return X, y


@pytest.mark.parametrize("covariance_type", COVARIANCE_TYPES)
def test_memmap_fit_equals_in_memory_fit(blobs, tmp_path, covariance_type):
    X, _ = blobs
    path = tmp_path / "X.dat"
    mm = np.memmap(path, dtype=np.float64, mode="w+", shape=X.shape)
    mm[:] = X
    mm.flush()
    del mm
    X_mm = np.memmap(path, dtype=np.float64, mode="r", shape=X.shape)
    assert is_out_of_core(X_mm) and not is_out_of_core(X)
    kwargs = dict(n_components=3, covariance_type=covariance_type, random_state=0, chunk_size=256)
    memory = GaussianMixture(**kwargs).fit(X)
    streamed = GaussianMixture(**kwargs).fit(X_mm)
    for name in ["means_", "covariances_", "weights_", "lower_bound_"]:
        np.testing.assert_array_equal(getattr(streamed, name), getattr(memory, name))
    assert streamed.n_iter_ == memory.n_iter_
    np.testing.assert_array_equal(streamed.predict(X_mm), memory.predict(X))
    np.testing.assert_array_equal(streamed.score_samples(X_mm), memory.score_samples(X))
    np.testing.assert_array_equal(
        GaussianMixture(**kwargs).fit_predict(X_mm), memory.predict(X)
    )


def test_memmap_validation_is_chunked_and_complete(tmp_path):
    X = np.random.RandomState(0).normal(size=(5000, 3))
    X[4321, 1] = np.nan  # far from the first chunk
    path = tmp_path / "bad.npy"
    np.save(path, X)
    X_mm = np.load(path, mmap_mode="r")
    with pytest.raises(ValueError, match="NaN"):
        GaussianMixture(2).fit(X_mm)
    # integer memmaps are converted chunk by chunk
    ints = np.lib.format.open_memmap(tmp_path / "ints.npy", mode="w+", dtype=np.int32,
                                     shape=(600, 2))
    ints[:] = np.random.RandomState(1).randint(0, 50, size=(600, 2))
    ints.flush()
    model = GaussianMixture(2, random_state=0).fit(np.load(tmp_path / "ints.npy", mmap_mode="r"))
    ref = GaussianMixture(2, random_state=0).fit(np.asarray(ints, dtype=np.float64))
    np.testing.assert_allclose(model.means_, ref.means_, rtol=1e-12)
    with pytest.raises(ValueError, match="features"):
        model.predict(np.load(path, mmap_mode="r")[:10])


class _RowSliceOnly:
    """An array-like with shape, dtype and row slicing only (like h5py/zarr)."""

    def __init__(self, array):
        self._array = array
        self.shape, self.dtype, self.ndim = array.shape, array.dtype, array.ndim
        self.reads = 0

    def __getitem__(self, index):
        self.reads += 1
        return self._array[index].copy()


def test_any_row_sliceable_array_like_is_streamed(blobs):
    X, _ = blobs
    source = _RowSliceOnly(X)
    assert is_out_of_core(source)
    kwargs = dict(n_components=3, init_params="k-means++", random_state=0, chunk_size=500)
    streamed = GaussianMixture(**kwargs).fit(source)
    assert source.reads > 10  # read in pieces
    memory = GaussianMixture(**kwargs).fit(X)
    np.testing.assert_array_equal(streamed.means_, memory.means_)
    rows = RowSource(source, torch.device("cpu"), torch.float64)
    np.testing.assert_array_equal(rows[torch.tensor([5, 1, 5])].numpy(), X[[5, 1, 5]])


# -------------------------------------------------------------- partial_fit
def test_partial_fit_reaches_batch_likelihood(blobs):
    X, _ = blobs
    batch = GaussianMixture(3, random_state=0).fit(X)
    rng = np.random.RandomState(0)
    for covariance_type in COVARIANCE_TYPES:
        online = GaussianMixture(3, covariance_type=covariance_type, random_state=0)
        ref = GaussianMixture(3, covariance_type=covariance_type, random_state=0).fit(X)
        for epoch in range(4):
            order = rng.permutation(len(X))
            for start in range(0, len(X), 100):
                online.partial_fit(X[order[start : start + 100]])
        assert online.n_steps_ == 4 * 30
        gap = abs(online.score(X) - ref.score(X)) / abs(ref.score(X))
        assert gap < 0.01, f"{covariance_type}: {online.score(X)} vs {ref.score(X)}"
    assert batch.score(X) > -np.inf


def test_partial_fit_api(blobs):
    X, _ = blobs
    model = GaussianMixture(3, random_state=0)
    assert hasattr(model, "partial_fit")
    model.partial_fit(X[:200])
    assert model.n_features_in_ == 4 and model.n_steps_ == 1
    first = model.means_.copy()
    model.partial_fit(X[200:400])
    assert model.n_steps_ == 2 and not np.array_equal(first, model.means_)
    with pytest.raises(ValueError, match="features"):
        model.partial_fit(X[:100, :3])
    # the step size is the documented schedule
    assert model._step_size(5) == pytest.approx((10.0 + 5) ** -0.7)
    # same seed, same batches -> same model
    again = GaussianMixture(3, random_state=0).partial_fit(X[:200]).partial_fit(X[200:400])
    np.testing.assert_array_equal(again.means_, model.means_)
    # partial_fit continues a fitted model; fit starts again
    fitted = GaussianMixture(3, random_state=0).fit(X)
    score = fitted.score(X)
    fitted.partial_fit(X[:500])
    assert fitted.n_steps_ == 1 and fitted.score(X) > score - 0.05
    fitted.fit(X)
    assert not hasattr(fitted, "n_steps_")
    # estimators without the hook do not expose partial_fit
    assert not hasattr(_NoPartialFit(), "partial_fit")
    # a pickled model keeps learning
    restored = pickle.loads(pickle.dumps(model))
    restored.partial_fit(X[400:600])
    model.partial_fit(X[400:600])
    np.testing.assert_array_equal(restored.means_, model.means_)


class _NoPartialFit(TinyGradientMixture):
    _partial_fit_step = BaseDeepMixture._partial_fit_step


def test_gradient_partial_fit_single_process(blobs):
    X, _ = blobs
    model = TinyGradientMixture(**_tiny_params())
    losses = []
    for epoch in range(3):
        for start in range(0, len(X), 300):
            model.partial_fit(X[start : start + 300])
            losses.append(model.lower_bound_)
    assert model.n_steps_ == 30
    assert losses[-1] > losses[0]


# ---------------------------------------------------------- joblib n_jobs
def test_grid_search_with_two_jobs(blobs):
    X, _ = blobs
    grid = {"n_components": [1, 3], "covariance_type": ["full", "diag"]}
    parallel = GridSearchCV(GaussianMixture(random_state=0), grid, cv=2, n_jobs=2).fit(X)
    serial = GridSearchCV(GaussianMixture(random_state=0), grid, cv=2, n_jobs=1).fit(X)
    assert parallel.best_params_ == serial.best_params_
    assert parallel.best_params_["n_components"] == 3
    np.testing.assert_allclose(
        parallel.cv_results_["mean_test_score"], serial.cv_results_["mean_test_score"],
        rtol=1e-10,
    )


def test_dask_ml_incremental(blobs):
    # optional: dask-ml is not installed on the development machine
    dask_ml_wrappers = pytest.importorskip("dask_ml.wrappers")
    da = pytest.importorskip("dask.array")
    X, _ = blobs
    model = dask_ml_wrappers.Incremental(GaussianMixture(3, random_state=0))
    model.fit(da.from_array(X, chunks=300))
    assert model.estimator_.n_steps_ == 10
