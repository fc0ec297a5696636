"""The EM machinery shared by ``GaussianMixture`` and ``BayesianGaussianMixture``.

:class:`BaseEMMixture` is to the two estimators what scikit-learn's
``BaseMixture`` is to theirs: one implementation of everything but the
M-step and the objective.

* ``fit`` and ``fit_predict`` with ``sample_weight`` (frequencies: integer
  weights give the model of repeated rows, zero weights that of dropped rows;
  ``GaussianMixture.partial_fit`` takes them too);
* the initial responsibilities (``init_params``): k-means and k-means++ in
  torch (:mod:`skdeepmix._kmeans`, weighted), ``'random'`` and
  ``'random_from_data'``;
* the chunked E-step fused with its sufficient statistics
  (:class:`skdeepmix._gaussian.MixturePass`: matrix products of per-row
  features with per-component coefficients, weighted, accumulated centred,
  with an exactly centred second pass only when the first one lost too many
  digits, and no host read per chunk), so that memory is bounded by
  ``chunk_size``; ``history_`` records per iteration whether that second
  pass was needed (``exact_pass``) and how many components the pass computed
  from differences for precision (``exact_components``);
* the fitted state: tensors in ``_params`` mirrored by the public fitted
  attributes (``means_``, ...), which may be replaced by the user (a
  ``warm_start`` fit then continues from them);
* sampling and the number of free parameters of the point-estimate mixture.

The hooks each estimator defines: ``_m_step(stats)`` (the parameters from the
E-step statistics), ``_objective(stats)`` (evaluated after the M-step),
``_mixture_weights()`` and ``_log_prob_offsets()`` (``log p(x, k)`` minus the
Gaussian log-density of component ``k``); the class
attributes ``_state_names`` (the state tensors, each the fitted attribute of
the same name plus ``_``) and ``_objective_uses_entropy``.

Under ``torch.distributed`` (``_distributed_mode = 'exact'``) every sum is
all-reduced over ``ctx.partition`` and every random draw uses global row
indices, so each process ends with the model of a single-process fit on all
the shards.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass
from functools import partial
from numbers import Integral, Real

import numpy as np
import torch
from sklearn.utils._param_validation import Interval, StrOptions

from . import _gaussian as G
from ._base import BaseDeepMixture
from ._kmeans import kmeans, kmeans_plusplus
from ._torch_utils import (
    iter_row_chunks, row_threads, run_in_threads, thread_shares, to_numpy, to_tensor,
)

__all__ = [
    "BaseEMMixture",
    "MixtureStatistics",
    "INIT_PARAMS",
    "check_shape",
    "check_positive",
    "check_positive_definite",
]

INIT_PARAMS = ("kmeans", "k-means++", "random", "random_from_data")


@dataclass
class MixtureStatistics:
    """What one pass over the data gives the M-step and the objective.

    Attributes
    ----------
    nk : Tensor of shape (K,)
        Weighted component counts (plus scikit-learn's ``10 eps``).
    means : Tensor of shape (K, d)
    covariances : Tensor
        Component covariances of the data, ``reg_covar`` included.
    weight_sum : float
        Total weight of the rows (their number without ``sample_weight``).
    log_prob_sum : 0-d Tensor
        ``sum_i w_i log p(x_i)`` under the model of the E-step.
    resp_log_resp_sum : 0-d Tensor
        ``sum_i w_i sum_k r_ik log r_ik`` (only when the objective uses it).
    exact_pass : bool
        Whether the second moments needed the exactly centred second pass.
    exact_components : int
        Components whose log-densities and second moments the pass computed
        from differences (tight components far from the center).
    """

    nk: torch.Tensor
    means: torch.Tensor
    covariances: torch.Tensor
    weight_sum: float
    log_prob_sum: torch.Tensor
    resp_log_resp_sum: torch.Tensor
    exact_pass: bool = False
    exact_components: int = 0


class BaseEMMixture(BaseDeepMixture):
    """Base class of the EM mixtures (see the module docstring)."""

    _parameter_constraints: dict = {
        **BaseDeepMixture._parameter_constraints,
        "n_components": [Interval(Integral, 1, None, closed="left")],
        "covariance_type": [StrOptions(set(G.COVARIANCE_TYPES))],
        "reg_covar": [Interval(Real, 0.0, None, closed="left")],
        "init_params": [StrOptions(set(INIT_PARAMS))],
    }

    _supports_out_of_core = True
    _distributed_mode = "exact"
    _parallel_work = 2**20
    #: names of the state tensors; each is mirrored by the fitted attribute name + '_'
    _state_names: tuple = ()
    #: whether ``_objective`` needs ``sum w r log r`` (a variational bound does)
    _objective_uses_entropy = False

    # ------------------------------------------------------------ public API
    def fit(self, X, y=None, sample_weight=None):
        """Estimate the model parameters with EM.

        The model is fitted ``n_init`` times and the run with the largest
        objective is kept; each run iterates until the objective changes by
        less than ``tol`` or ``max_iter`` iterations are done (then a
        ``ConvergenceWarning`` is raised). With ``warm_start=True`` a second
        call continues from the fitted state.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Training data (a ``np.memmap`` is streamed chunk by chunk).
        y : Ignored
            Not used, present for API consistency.
        sample_weight : array-like of shape (n_samples,), default=None
            Non-negative weights of the rows, as frequencies: integer weights
            give the model fitted on the rows repeated that many times, and
            a zero weight that fitted without the row. ``None`` weighs every
            row 1.

        Returns
        -------
        self : object
            The fitted mixture.
        """
        self._fit(X, y, sample_weight)
        return self

    def fit_predict(self, X, y=None, sample_weight=None):
        """Estimate the model parameters and predict the labels of ``X``.

        Equivalent to ``fit(X, sample_weight=sample_weight).predict(X)``.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        y : Ignored
        sample_weight : array-like of shape (n_samples,), default=None
            As in :meth:`fit`.

        Returns
        -------
        labels : ndarray of shape (n_samples,)
            Component labels.
        """
        return self._fit(X, y, sample_weight)

    # ------------------------------------------------------ model hooks
    @abstractmethod
    def _m_step(self, stats):
        """Set ``self._params`` from the E-step's :class:`MixtureStatistics`."""

    @abstractmethod
    def _objective(self, stats):
        """The iteration's objective (after the M-step), as a float."""

    @abstractmethod
    def _mixture_weights(self):
        """The current mixture weights, a tensor of shape (n_components,)."""

    @abstractmethod
    def _log_prob_offsets(self):
        """``log p(x, k) - log N(x; means_k, covariances_k)``, shape (n_components,)
        (the log-weights, or their expectation and the Wishart terms)."""

    def _covariances_in_use(self, nk, means, covariances):
        """The covariances the M-step will give the model from the data's
        ``covariances`` (what must be positive definite; the data's own by
        default)."""
        return covariances

    # ------------------------------------------------------------ checks
    def _check_parameters(self, X, ctx):
        n_samples = self._n_weighted_rows(ctx)
        if n_samples < self.n_components:
            raise ValueError(
                "Expected n_samples >= n_components but got n_components = "
                f"{self.n_components}, n_samples = {n_samples}"
            )

    def _n_weighted_rows(self, ctx):
        """Rows of positive weight over all processes (a zero weight drops a row)."""
        if ctx.sample_weight is None:
            return ctx.partition.n_total
        return int(ctx.partition.sum_scalar(float((ctx.sample_weight > 0).sum())))

    def _work_per_row(self):
        """Temporaries per row: the EM pass's feature columns and log-densities
        (:class:`~skdeepmix._gaussian.MixturePass`), and for 'full'/'tied' the
        (n, K, d) whitened differences of :func:`~skdeepmix._gaussian.log_gaussian_prob`
        at inference; counted in 4-byte words, so that a chunk takes the same
        bytes (the same share of the CPU caches, where the pass is fastest)
        in float64 as in float32."""
        K, d = self.n_components, self.n_features_in_
        work = G.MixturePass.n_columns(self.covariance_type, d) + K
        if self.covariance_type in ("full", "tied"):
            work = max(work, K * d)
        return work * self._torch_dtype().itemsize // 4

    def _threads(self, n_rows, device):
        """Context for a call on ``n_rows`` rows: torch on one thread, and
        the chosen CPU threads (:meth:`_n_threads`) for the row chunks of the
        EM passes and of predictions (:class:`~skdeepmix._torch_utils.row_threads`)."""
        return row_threads(self._n_threads(n_rows) if device.type == "cpu" else None)

    def _row_chunks(self, n_rows, device):
        """Row slices of the E-step on ``device`` (one empty slice for an empty shard)."""
        return list(iter_row_chunks(n_rows, self._rows_per_chunk(device))) or [slice(0, 0)]

    # -------------------------------------------------------- initialisation
    def _initialize(self, X, ctx):
        """Initial responsibilities (``init_params``), then the M-step."""
        resp_of_rows = self._initial_responsibilities(X, ctx)
        center = _data_center(X, ctx.partition)
        self._m_step(self._statistics(
            X, ctx, G.MixturePass(self.covariance_type, center, self.n_components),
            self.reg_covar, resp_of_rows,
        ))

    def _initial_responsibilities(self, X, ctx):
        """A function ``rows -> resp`` (so that no (n, K) matrix is stored).

        With ``sample_weight``, k-means and k-means++ are weighted, and
        ``'random_from_data'`` draws its rows with probabilities proportional
        to the weights (without replacement); ``'random'`` draws
        responsibilities for every row, which the M-step then weighs.
        """
        partition, generator, weights = ctx.partition, ctx.generator, ctx.sample_weight
        K, dtype, device = self.n_components, X.dtype, X.device
        chunk = self._rows_per_chunk(device)
        if self.init_params == "kmeans":
            _, labels = kmeans(X, K, generator, chunk_size=chunk, partition=partition,
                               sample_weight=weights)
            return lambda rows: torch.nn.functional.one_hot(labels[rows], K).to(dtype)
        if self.init_params == "random":
            seed = _draw_seed(generator)
            return lambda rows: _random_resp(seed, rows, partition.offset, K, dtype, device)
        if self.init_params == "random_from_data":
            if weights is None:
                indices = torch.randperm(partition.n_total, generator=generator,
                                         device=device)[:K]
            else:  # weighted sampling without replacement (Efraimidis & Spirakis)
                uniform = _block_uniform(_draw_seed(generator), slice(0, X.shape[0]),
                                         partition.offset, 1, dtype, device)[:, 0]
                keys = torch.where(weights > 0, uniform.log() / weights, -torch.inf)
                indices = partition.topk(keys, K)
        else:  # k-means++
            _, indices = kmeans_plusplus(X, K, generator, chunk_size=chunk,
                                         partition=partition, sample_weight=weights)
        local = indices - partition.offset  # global -> local row indices
        return lambda rows: _one_hot_at(local, rows, K, dtype, device)

    # ------------------------------------------------------------------- EM
    def _fit_iteration(self, X, ctx):
        """One E-step and M-step; returns the objective (and which passes
        were needed: see :class:`MixtureStatistics`)."""
        stats = self._e_step(X, ctx, self.reg_covar)
        self._m_step(stats)
        return {"objective": self._objective(stats), "exact_pass": stats.exact_pass,
                "exact_components": stats.exact_components}

    def _e_step(self, X, ctx, reg_covar):
        """The statistics of all the rows under the current model."""
        params = self._params
        em_pass = G.MixturePass(
            self.covariance_type, _data_center(X, ctx.partition), self.n_components,
            means=params["means"], precisions_cholesky=params["precisions_cholesky"],
            log_offsets=self._log_prob_offsets(), entropy=self._objective_uses_entropy,
        )
        return self._statistics(X, ctx, em_pass, reg_covar)

    def _estimate_weighted_log_prob(self, X):
        params = self._params
        center = self._mixture_weights() @ params["means"]
        log_prob = G.log_gaussian_prob(X, params["means"], params["precisions_cholesky"],
                                       self.covariance_type, center)
        return log_prob + self._log_prob_offsets()

    def _statistics(self, X, ctx, em_pass, reg_covar, resp_of_rows=None):
        """Weighted sufficient statistics over chunks of rows, all processes
        summed: one :class:`~skdeepmix._gaussian.MixturePass` (its E-step, or
        the responsibilities ``resp_of_rows(rows)``), then an exactly
        centred second pass only when the first lost too many digits.
        Nothing is read back to the host per chunk."""
        weights = ctx.sample_weight

        def rows_of(chunks):
            for rows in chunks:
                yield (X[rows], None if resp_of_rows is None else resp_of_rows(rows),
                       None if weights is None else weights[rows])

        def add_rows(a_pass, chunks):
            for chunk, resp, chunk_weights in rows_of(chunks):
                a_pass.add(chunk, resp, chunk_weights)

        chunks = self._row_chunks(X.shape[0], X.device)
        shares = thread_shares(chunks, X)
        if len(shares) > 1:  # one pass per thread, then their sums added in order
            passes = [em_pass] + [em_pass.replica() for _ in shares[1:]]
            run_in_threads([partial(add_rows, a_pass, share)
                            for a_pass, share in zip(passes, shares)])
            for other in passes[1:]:
                em_pass.merge(other)
        else:
            add_rows(em_pass, chunks)

        def rows_again():
            return rows_of(chunks)

        nk, means, covariances = em_pass.finalize(reg_covar, ctx.partition, rows_again,
                                                  self._covariances_in_use)
        stats = em_pass.stats
        return MixtureStatistics(nk, means, covariances, float(stats.weight_sum),
                                 stats.log_prob_sum, stats.resp_log_resp_sum, stats.exact,
                                 len(em_pass.exact_components))

    # ------------------------------------------------------- state handling
    def _get_state(self):
        return {name: value.clone() for name, value in self._params.items()}

    def _set_state(self, state):
        self._params = state
        for name in self._state_names:
            setattr(self, name + "_", self._public_value(name, state[name]))
        self.precisions_ = to_numpy(
            G.precisions_from_cholesky(state["precisions_cholesky"], self.covariance_type)
        )
        self._params_sources = self._public_parameters()

    def _public_value(self, name, tensor):
        """The fitted attribute ``name + '_'`` of a state tensor."""
        return to_numpy(tensor)

    def _state_value(self, name, value, device, dtype):
        """The state tensor of a fitted attribute (inverse of :meth:`_public_value`)."""
        return to_tensor(value, device, dtype)

    def _public_parameters(self):
        return tuple(getattr(self, name + "_") for name in self._state_names)

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
            name: self._state_value(name, value, device, dtype)
            for name, value in zip(self._state_names, sources)
        }
        self._params_sources = sources

    # ------------------------------------------------------------- sampling
    def _sample(self, n_samples, generator):
        labels = torch.multinomial(self._mixture_weights(), n_samples, replacement=True,
                                   generator=generator).sort().values
        X = G.sample_gaussian(self._params["means"], self._params["precisions_cholesky"],
                              self.covariance_type, labels, generator)
        return X, labels

    def _n_parameters(self):
        """Free parameters of the (point-estimate) mixture, as scikit-learn counts them."""
        n_features = self.means_.shape[1]
        K = self.n_components
        cov_params = {
            "full": K * n_features * (n_features + 1) / 2.0,
            "diag": K * n_features,
            "tied": n_features * (n_features + 1) / 2.0,
            "spherical": K,
        }[self.covariance_type]
        return int(cov_params + n_features * K + K - 1)


# ------------------------------------------------- checks (scikit-learn's texts)
def check_shape(array, shape, name):
    """Raise scikit-learn's error when a user-given array has the wrong shape."""
    if np.shape(array) != tuple(shape):
        raise ValueError(
            f"The parameter '{name}' should have the shape of {tuple(shape)}, "
            f"but got {np.shape(array)}"
        )


def check_positive(values, covariance_type):
    """Raise scikit-learn's error unless every value is positive."""
    if (np.asarray(values) <= 0).any():
        raise ValueError(f"'{covariance_type} precision' should be positive")


def check_positive_definite(matrix, covariance_type):
    """Raise scikit-learn's error unless ``matrix`` is symmetric positive-definite."""
    matrix = np.asarray(matrix)
    if not (np.allclose(matrix, matrix.T) and (np.linalg.eigvalsh(matrix) > 0).all()):
        raise ValueError(
            f"'{covariance_type} precision' should be symmetric, positive-definite"
        )


# ----------------------------------------------------------------- helpers
def _data_center(X, partition):
    """Mean of at most 4096 rows spread evenly over the data (global rows 0, s,
    2s, ... of all the shards): a point near the data, the center of the EM
    passes. It is the same at every iteration, so that a converged fit's
    features and statistics are the same from one iteration to the next (a
    center that moved with the parameters would keep them moving at the
    rounding level)."""
    step = max(1, partition.n_total // 4096)
    first = -partition.offset % step  # local index of the first sampled global row
    rows = X[first::step] if first < X.shape[0] else X[:0]
    if not partition.active:
        return rows.mean(0)
    return partition.sum(rows.sum(0)) / -(-partition.n_total // step)


def _draw_seed(generator):
    return int(torch.randint(2**62, (1,), generator=generator, device=generator.device))


_RANDOM_BLOCK = 4096


def _block_uniform(seed, rows, offset, n_columns, dtype, device):
    """Uniform draws for rows ``rows`` (local) of a shard starting at global
    row ``offset``: drawn per fixed block of global rows, so that they depend
    neither on the chunking nor on the sharding."""
    start, stop = rows.start + offset, rows.stop + offset
    parts = [torch.empty(0, n_columns, dtype=dtype, device=device)]
    for block in range(start // _RANDOM_BLOCK, (stop - 1) // _RANDOM_BLOCK + 1):
        first = block * _RANDOM_BLOCK
        generator = torch.Generator(device=device)
        generator.manual_seed((seed + block) % 2**63)
        values = torch.rand(_RANDOM_BLOCK, n_columns, generator=generator, device=device,
                            dtype=dtype)
        parts.append(values[max(start, first) - first : min(stop, first + _RANDOM_BLOCK) - first])
    return torch.cat(parts)


def _random_resp(seed, rows, offset, n_components, dtype, device):
    """Random responsibilities of rows ``rows`` (see :func:`_block_uniform`)."""
    resp = _block_uniform(seed, rows, offset, n_components, dtype, device)
    return resp / resp.sum(1, keepdim=True)


def _one_hot_at(indices, rows, n_components, dtype, device):
    """Responsibilities of rows ``rows``: 1 at (indices[k], k), 0 elsewhere."""
    resp = torch.zeros(rows.stop - rows.start, n_components, dtype=dtype, device=device)
    inside = (indices >= rows.start) & (indices < rows.stop)
    columns = torch.nonzero(inside).flatten()
    resp[indices[columns] - rows.start, columns] = 1.0
    return resp
