"""A torch EM Gaussian mixture with exactly scikit-learn's API and results."""

from __future__ import annotations

from numbers import Integral, Real

import numpy as np
import torch
from sklearn.utils import check_array
from sklearn.utils._param_validation import Interval, StrOptions

from . import _gaussian as G
from ._base import BaseDeepMixture
from ._kmeans import kmeans, kmeans_plusplus
from ._torch_utils import iter_row_chunks, to_numpy, to_tensor

__all__ = ["GaussianMixture"]

_PARAMETER_NAMES = ("weights", "means", "covariances", "precisions_cholesky")


class GaussianMixture(BaseDeepMixture):
    """Gaussian mixture fitted by EM in torch: a drop-in for scikit-learn's.

    Same constructor parameters, defaults, fitted attributes and methods as
    :class:`sklearn.mixture.GaussianMixture` (and, with the same initial
    parameters in float64, the same results), plus ``device``, ``dtype`` and
    ``chunk_size``. The E-step and the sufficient statistics are accumulated
    over chunks of rows, so memory is bounded by ``chunk_size``, not by
    ``n_samples``; statistics are accumulated centred, so float32 is safe.

    Parameters
    ----------
    n_components : int, default=1
        The number of mixture components.
    covariance_type : {'full', 'tied', 'diag', 'spherical'}, default='full'
        The type of covariance parameters.
    tol : float, default=1e-3
        Convergence threshold on the change of the mean log-likelihood.
    reg_covar : float, default=1e-6
        Non-negative regularisation added to the diagonal of covariances.
    max_iter : int, default=100
        The number of EM iterations to perform.
    n_init : int, default=1
        The number of initialisations; the best result is kept.
    init_params : {'kmeans', 'k-means++', 'random', 'random_from_data'}, default='kmeans'
        How the responsibilities are initialised (k-means runs in torch on the
        same device).
    weights_init : array-like of shape (n_components,), default=None
    means_init : array-like of shape (n_components, n_features), default=None
    precisions_init : array-like, default=None
        Shape ``(n_components, n_features, n_features)`` for 'full',
        ``(n_features, n_features)`` for 'tied', ``(n_components, n_features)``
        for 'diag', ``(n_components,)`` for 'spherical'.
    random_state : int, RandomState instance or None, default=None
        Seeds a :class:`torch.Generator` used for initialisation and sampling.
    warm_start : bool, default=False
        Continue from the previous fit on the next call to ``fit``.
    verbose : int, default=0
        1 shows a progress bar; 2 also prints every ``verbose_interval`` iterations.
    verbose_interval : int, default=10
    device : {'auto', 'cpu', 'cuda', 'cuda:N'} or torch.device, default='auto'
        'auto' uses CUDA when available.
    dtype : {'float32', 'float64'} or None, default=None
        Precision of the computation and of the fitted attributes. ``None``
        uses the input's floating dtype (float32 stays float32, anything else
        becomes float64), as scikit-learn does.
    chunk_size : int, default=None
        Rows processed at once. ``None`` picks a size that keeps temporaries
        around 64 MiB.
    learning_offset : float, default=10.0
        ``t0`` of the step size of :meth:`partial_fit` (stepwise EM):
        ``rho_t = (learning_offset + t) ** -learning_decay`` at step ``t``.
    learning_decay : float, default=0.7
        ``kappa`` in (0.5, 1] for the convergence guarantees of stepwise EM
        (any value in (0, 1] is accepted).

    Notes
    -----
    Scaling up (see ``doc/scaling.md``):

    * ``fit`` streams a ``np.memmap`` (or another array-like with row slicing,
      e.g. h5py/zarr) chunk by chunk, validation included, and gives the same
      result as on the loaded array.
    * :meth:`partial_fit` is stepwise (online) EM (Cappé & Moulines, 2009;
      Liang & Klein, 2009): the first call initialises the model on its batch
      (``init_params``) and takes the batch's statistics; call ``t >= 1``
      blends the batch's normalised sufficient statistics ``s_batch`` into the
      running ones, ``s <- (1 - rho_t) s + rho_t s_batch`` (centred moments:
      component fractions, means, within-component covariances), then the
      M-step. ``n_steps_`` counts the calls.
    * Under torch.distributed (e.g. ``torchrun``) each process passes its own
      shard to ``fit``; the sufficient statistics and log-likelihoods are
      all-reduced and the initialisations draw global row indices, so every
      rank ends with the model of a single-process fit on all the shards.

    Attributes
    ----------
    weights_ : ndarray of shape (n_components,)
    means_ : ndarray of shape (n_components, n_features)
    covariances_ : ndarray
    precisions_ : ndarray
    precisions_cholesky_ : ndarray
    converged_ : bool
    n_iter_ : int
    lower_bound_ : float
        Mean log-likelihood of the best run (E-step of its last iteration);
        after :meth:`partial_fit`, that of the last batch.
    n_steps_ : int
        Number of :meth:`partial_fit` calls since the last initialisation.
    lower_bounds_ : list of float
    n_features_in_ : int
    feature_names_in_ : ndarray of shape (n_features_in_,)
        Only when ``X`` has string feature names.

    Examples
    --------
    >>> import numpy as np
    >>> from skdeepmix import GaussianMixture
    >>> X = np.array([[1, 2], [1, 4], [1, 0], [10, 2], [10, 4], [10, 0]])
    >>> gm = GaussianMixture(n_components=2, random_state=0).fit(X)
    >>> np.sort(gm.means_[:, 0])
    array([ 1., 10.])
    >>> gm.predict([[0, 0], [12, 3]]).tolist() in ([0, 1], [1, 0])
    True
    """

    _parameter_constraints: dict = {
        **BaseDeepMixture._parameter_constraints,
        "n_components": [Interval(Integral, 1, None, closed="left")],
        "covariance_type": [StrOptions(set(G.COVARIANCE_TYPES))],
        "reg_covar": [Interval(Real, 0.0, None, closed="left")],
        "init_params": [StrOptions({"kmeans", "k-means++", "random", "random_from_data"})],
        "weights_init": ["array-like", None],
        "means_init": ["array-like", None],
        "precisions_init": ["array-like", None],
        "learning_offset": [Interval(Real, 0.0, None, closed="left")],
        "learning_decay": [Interval(Real, 0.0, 1.0, closed="right")],
    }

    _supports_out_of_core = True
    _distributed_mode = "exact"
    _parallel_work = 2**20

    def __init__(
        self,
        n_components=1,
        *,
        covariance_type="full",
        tol=1e-3,
        reg_covar=1e-6,
        max_iter=100,
        n_init=1,
        init_params="kmeans",
        weights_init=None,
        means_init=None,
        precisions_init=None,
        random_state=None,
        warm_start=False,
        verbose=0,
        verbose_interval=10,
        device="auto",
        dtype=None,
        chunk_size=None,
        learning_offset=10.0,
        learning_decay=0.7,
    ):
        super().__init__(
            tol=tol,
            max_iter=max_iter,
            n_init=n_init,
            random_state=random_state,
            warm_start=warm_start,
            verbose=verbose,
            verbose_interval=verbose_interval,
            device=device,
            dtype=dtype,
            chunk_size=chunk_size,
        )
        self.n_components = n_components
        self.covariance_type = covariance_type
        self.reg_covar = reg_covar
        self.init_params = init_params
        self.weights_init = weights_init
        self.means_init = means_init
        self.precisions_init = precisions_init
        self.learning_offset = learning_offset
        self.learning_decay = learning_decay

    # ------------------------------------------------------------ validation
    def _check_parameters(self, X, ctx):
        n_features = X.shape[1]
        n_samples = ctx.partition.n_total
        if n_samples < self.n_components:
            raise ValueError(
                "Expected n_samples >= n_components but got n_components = "
                f"{self.n_components}, n_samples = {n_samples}"
            )
        self._weights_init = self._means_init = self._precisions_init = None
        if self.weights_init is not None:
            self._weights_init = _check_weights(self.weights_init, self.n_components)
        if self.means_init is not None:
            self._means_init = _check_means(self.means_init, self.n_components, n_features)
        if self.precisions_init is not None:
            self._precisions_init = _check_precisions(
                self.precisions_init, self.covariance_type, self.n_components, n_features
            )

    def _work_per_row(self):
        return self.n_components * (self.n_features_in_ + 2)

    # -------------------------------------------------------- initialisation
    def _initialize(self, X, ctx):
        n_samples = ctx.partition.n_total
        self._online_stats = None
        tensor = lambda a: to_tensor(a, X.device, X.dtype)  # noqa: E731
        if all(p is not None for p in (self._weights_init, self._means_init, self._precisions_init)):
            params = {}
        else:
            nk, means, covariances = self._parameters_from_responsibilities(
                X, self._initial_responsibilities(X, ctx), ctx.partition
            )
            params = {"weights": nk / n_samples, "means": means, "covariances": covariances}
        if self._weights_init is not None:
            params["weights"] = tensor(self._weights_init)
        if self._means_init is not None:
            params["means"] = tensor(self._means_init)
        if self._precisions_init is None:
            params["precisions_cholesky"] = G.precision_cholesky_from_covariances(
                params["covariances"], self.covariance_type
            )
        else:
            chol = G.precision_cholesky_from_precisions(
                tensor(self._precisions_init), self.covariance_type
            )
            params["precisions_cholesky"] = chol
            params["covariances"] = G.covariances_from_cholesky(chol, self.covariance_type)
        self._params = params

    def _initial_responsibilities(self, X, ctx):
        """A function ``rows -> resp`` (so that no (n, K) matrix is stored)."""
        partition, generator = ctx.partition, ctx.generator
        n_samples, K = partition.n_total, self.n_components
        chunk = self._rows_per_chunk()
        if self.init_params == "kmeans":
            _, labels = kmeans(X, K, generator, chunk_size=chunk, partition=partition)
            return lambda rows: _one_hot(labels[rows], K, X.dtype)
        if self.init_params == "random":
            seed = int(torch.randint(2**62, (1,), generator=generator, device=X.device))
            offset = partition.offset
            return lambda rows: _random_resp(seed, rows, offset, K, X.dtype, X.device)
        if self.init_params == "random_from_data":
            indices = torch.randperm(n_samples, generator=generator, device=X.device)[:K]
        else:  # k-means++
            _, indices = kmeans_plusplus(X, K, generator, chunk_size=chunk, partition=partition)
        local = indices - partition.offset  # global -> local row indices
        return lambda rows: _one_hot_at(local, rows, K, X.dtype, X.device)

    def _parameters_from_responsibilities(self, X, resp_of_rows, partition):
        if partition.active:  # the mean of the first 4096 rows of all the shards
            n_head = min(partition.n_total, 4096)
            local_head = max(0, min(X.shape[0], n_head - partition.offset))
            center = X[:local_head].sum(0) if local_head else X[:1].sum(0) * 0
            center = partition.sum(center) / n_head
        else:
            center = X[: min(X.shape[0], 4096)].mean(0)
        stats = G.SufficientStatistics(
            self.covariance_type,
            center.expand(self.n_components, -1),
            center,
        )
        chunks = list(iter_row_chunks(X.shape[0], self._rows_per_chunk()))
        for rows in chunks:
            stats.add(X[rows], resp_of_rows(rows))
        stats.reduce(partition)
        nk, means, covariances, loss = stats.mixture_parameters(self.reg_covar)
        if stats.needs_exact_pass(loss):
            stats.reset_second_moments()
            for rows in chunks:
                stats.add_exact(X[rows], resp_of_rows(rows), means)
            stats.reduce(partition, second_only=True)
            nk, means, covariances, _ = stats.mixture_parameters(self.reg_covar)
        return nk, means, covariances

    # ------------------------------------------------------------------- EM
    def _e_step_parameters(self, X, reg_covar, partition):
        """E-step over all (chunks of) rows and the M-step's parameters.

        Returns ``(mean_log_likelihood, nk, means, covariances, n_total)``; the
        statistics are summed over the processes of a distributed fit.
        """
        params = self._params
        center = params["weights"] @ params["means"]
        stats = G.SufficientStatistics(self.covariance_type, params["means"], center)
        chunks = list(iter_row_chunks(X.shape[0], self._rows_per_chunk()))
        for rows in chunks:
            chunk = X[rows]
            log_prob_norm, resp = G.normalize_log_prob(self._estimate_weighted_log_prob(chunk))
            stats.add(chunk, resp, log_prob_norm)
        stats.reduce(partition)
        mean_log_likelihood = stats.sum_log_prob / partition.n_total
        nk, means, covariances, loss = stats.mixture_parameters(reg_covar)
        if stats.needs_exact_pass(loss):
            stats.reset_second_moments()
            for rows in chunks:
                chunk = X[rows]
                _, resp = G.normalize_log_prob(self._estimate_weighted_log_prob(chunk))
                stats.add_exact(chunk, resp, means)
            stats.reduce(partition, second_only=True)
            nk, means, covariances, _ = stats.mixture_parameters(reg_covar)
        return mean_log_likelihood, nk, means, covariances, partition.n_total

    def _fit_iteration(self, X, ctx):
        """One E-step + M-step; returns the E-step's mean log-likelihood."""
        mean_log_likelihood, nk, means, covariances, _ = self._e_step_parameters(
            X, self.reg_covar, ctx.partition
        )
        self._params = self._parameters(nk / nk.sum(), means, covariances)
        return mean_log_likelihood

    def _parameters(self, weights, means, covariances):
        """The parameter dict, with the precision Cholesky factors computed."""
        return {
            "weights": weights,
            "means": means,
            "covariances": covariances,
            "precisions_cholesky": G.precision_cholesky_from_covariances(
                covariances, self.covariance_type
            ),
        }

    # ----------------------------------------------------- stepwise EM
    def _step_size(self, step):
        """``rho_t = (learning_offset + t) ** -learning_decay`` (``t >= 1``)."""
        return float((self.learning_offset + step) ** -self.learning_decay)

    def _partial_fit_step(self, X, ctx):
        """One stepwise-EM step on the batch ``X``; returns its mean log-likelihood."""
        params = self._params
        dtype, device = params["means"].dtype, params["means"].device
        mean_log_likelihood, nk, means, covariances, n_total = self._e_step_parameters(
            X, 0.0, ctx.partition
        )
        batch = {"weights": nk / n_total, "means": means, "covariances": covariances}
        running = getattr(self, "_online_stats", None)
        if running is not None:
            running = {k: v.to(device=device, dtype=dtype) for k, v in running.items()}
        elif hasattr(self, "converged_"):  # continue a model fitted by ``fit``
            running = G.moments_from_parameters(
                params["weights"], params["means"], params["covariances"],
                self.covariance_type, self.reg_covar,
            )
        if running is None:  # first step after the initialisation
            running = batch
        else:
            rho = self._step_size(max(self.n_steps_, 1))
            running = G.blend_moments(running, batch, rho, self.covariance_type)
        self._online_stats = running
        weights, means, covariances = G.parameters_from_moments(
            running, self.covariance_type, self.reg_covar
        )
        self._set_state(self._parameters(weights, means, covariances))
        return mean_log_likelihood

    def _estimate_weighted_log_prob(self, X):
        params = self._params
        center = params["weights"] @ params["means"]
        log_prob = G.log_gaussian_prob(
            X, params["means"], params["precisions_cholesky"], self.covariance_type, center
        )
        return log_prob + params["weights"].log()

    # ------------------------------------------------------- state handling
    def _get_state(self):
        return {name: value.clone() for name, value in self._params.items()}

    def _set_state(self, state):
        self._params = state
        for name in _PARAMETER_NAMES:
            setattr(self, name + "_", to_numpy(state[name]))
        self.precisions_ = to_numpy(
            G.precisions_from_cholesky(state["precisions_cholesky"], self.covariance_type)
        )
        self._params_sources = self._public_parameters()

    def _public_parameters(self):
        return tuple(getattr(self, name + "_") for name in _PARAMETER_NAMES)

    def _prepare_inference(self, device):
        """Tensors of the fitted attributes on ``device`` (rebuilt only when the
        attributes were replaced, or the device or dtype changed)."""
        dtype = self._torch_dtype()
        sources = self._public_parameters()
        cached = getattr(self, "_params", None)
        if (
            cached is not None
            and cached["means"].device == device
            and cached["means"].dtype == dtype
            and all(a is b for a, b in zip(getattr(self, "_params_sources", ()), sources))
        ):
            return
        self._params = {
            name: to_tensor(value, device, dtype)
            for name, value in zip(_PARAMETER_NAMES, sources)
        }
        self._params_sources = sources

    # ------------------------------------------------------------- sampling
    def _sample(self, n_samples, generator):
        params = self._params
        labels = torch.multinomial(params["weights"], n_samples, replacement=True,
                                   generator=generator).sort().values
        X = G.sample_gaussian(params["means"], params["precisions_cholesky"],
                              self.covariance_type, labels, generator)
        return X, labels

    def _n_parameters(self):
        n_features = self.means_.shape[1]
        K = self.n_components
        cov_params = {
            "full": K * n_features * (n_features + 1) / 2.0,
            "diag": K * n_features,
            "tied": n_features * (n_features + 1) / 2.0,
            "spherical": K,
        }[self.covariance_type]
        return int(cov_params + n_features * K + K - 1)


# ----------------------------------------------------------------- helpers
def _one_hot(labels, n_components, dtype):
    return torch.nn.functional.one_hot(labels, n_components).to(dtype)


_RANDOM_BLOCK = 4096


def _random_resp(seed, rows, offset, n_components, dtype, device):
    """Random responsibilities of rows ``rows`` (local) of a shard starting at
    global row ``offset``: drawn per fixed block of global rows, so that they
    depend neither on the chunking nor on the sharding."""
    start, stop = rows.start + offset, rows.stop + offset
    parts = []
    for block in range(start // _RANDOM_BLOCK, (stop - 1) // _RANDOM_BLOCK + 1):
        first = block * _RANDOM_BLOCK
        generator = torch.Generator(device=device)
        generator.manual_seed((seed + block) % 2**63)
        values = torch.rand(_RANDOM_BLOCK, n_components, generator=generator, device=device, dtype=dtype)
        parts.append(values[max(start, first) - first : min(stop, first + _RANDOM_BLOCK) - first])
    resp = torch.cat(parts)
    return resp / resp.sum(1, keepdim=True)


def _one_hot_at(indices, rows, n_components, dtype, device):
    """Responsibilities of rows ``rows``: 1 at (indices[k], k), 0 elsewhere."""
    resp = torch.zeros(rows.stop - rows.start, n_components, dtype=dtype, device=device)
    inside = (indices >= rows.start) & (indices < rows.stop)
    columns = torch.nonzero(inside).flatten()
    resp[indices[columns] - rows.start, columns] = 1.0
    return resp


def _check_shape(array, shape, name):
    if array.shape != tuple(shape):
        raise ValueError(
            f"The parameter '{name}' should have the shape of {tuple(shape)}, "
            f"but got {array.shape}"
        )


def _check_weights(weights, n_components):
    weights = check_array(weights, dtype=[np.float64, np.float32], ensure_2d=False)
    _check_shape(weights, (n_components,), "weights")
    if (weights < 0).any() or (weights > 1).any():
        raise ValueError(
            "The parameter 'weights' should be in the range [0, 1], but got max "
            f"value {weights.max():.5f}, min value {weights.min():.5f}"
        )
    atol = 1e-6 if weights.dtype == np.float32 else 1e-8
    if abs(1.0 - weights.sum()) > atol:
        raise ValueError(
            "The parameter 'weights' should be normalized, but got "
            f"sum(weights) = {weights.sum():.5f}"
        )
    return weights


def _check_means(means, n_components, n_features):
    means = check_array(means, dtype=[np.float64, np.float32], ensure_2d=False)
    _check_shape(means, (n_components, n_features), "means")
    return means


def _check_precisions(precisions, covariance_type, n_components, n_features):
    precisions = check_array(
        precisions,
        dtype=[np.float64, np.float32],
        ensure_2d=False,
        allow_nd=covariance_type == "full",
    )
    shape = G.covariance_shape(covariance_type, n_components, n_features)
    _check_shape(precisions, shape, f"{covariance_type} precision")
    if covariance_type in ("diag", "spherical"):
        if (precisions <= 0).any():
            raise ValueError(f"'{covariance_type} precision' should be positive")
        return precisions
    matrices = precisions if covariance_type == "full" else precisions[None]
    for matrix in matrices:
        symmetric = np.allclose(matrix, matrix.T)
        if not (symmetric and (np.linalg.eigvalsh(matrix) > 0).all()):
            raise ValueError(
                f"'{covariance_type} precision' should be symmetric, positive-definite"
            )
    return precisions
