"""A torch EM Gaussian mixture with exactly scikit-learn's API and results."""

from __future__ import annotations

from numbers import Real

import numpy as np
from sklearn.utils import check_array
from sklearn.utils._param_validation import Interval

from . import _gaussian as G
from ._docstrings import fill_doc
from ._em import BaseEMMixture, check_positive, check_positive_definite, check_shape
from ._torch_utils import to_tensor

__all__ = ["GaussianMixture"]


@fill_doc(tol=1e-3, max_iter=100, iteration="EM iterations",
          tol_meaning="EM stops when the mean log-likelihood per sample changes "
          "by less than ``tol``.")
class GaussianMixture(BaseEMMixture):
    """Gaussian mixture fitted by EM in torch: a drop-in for scikit-learn's.

    Same constructor parameters, defaults, fitted attributes and methods as
    :class:`sklearn.mixture.GaussianMixture` (and, with the same initial
    parameters in float64, the same results; scikit-learn's own tests pass
    against it), plus ``device``, ``dtype``, ``chunk_size``, ``sample_weight``
    in :meth:`fit`/:meth:`fit_predict`/:meth:`partial_fit`, and
    :meth:`partial_fit`. The E-step and the sufficient statistics are
    accumulated over chunks of rows, so memory is bounded by ``chunk_size``,
    not by ``n_samples``; statistics are accumulated centred, so float32 is
    safe. See ``doc/drop_in.md`` for a side-by-side comparison.

    Parameters
    ----------
    n_components : int, default=1
        The number of mixture components.
    covariance_type : {'full', 'tied', 'diag', 'spherical'}, default='full'
        The type of covariance parameters.
    reg_covar : float, default=1e-6
        Non-negative regularisation added to the diagonal of covariances.
    init_params : {'kmeans', 'k-means++', 'random', 'random_from_data'}, default='kmeans'
        How the responsibilities are initialised (k-means and k-means++ run in
        torch on the fit's device). With ``sample_weight``, k-means and
        k-means++ are weighted, 'random_from_data' draws its rows with
        probabilities proportional to the weights and 'random' draws
        responsibilities for every row, which the M-step weighs.
    weights_init : array-like of shape (n_components,), default=None
        The initial weights (None: from the initial responsibilities).
    means_init : array-like of shape (n_components, n_features), default=None
        The initial means (None: from the initial responsibilities).
    precisions_init : array-like, default=None
        The initial precisions (inverse covariances); shape
        ``(n_components, n_features, n_features)`` for 'full',
        ``(n_features, n_features)`` for 'tied', ``(n_components, n_features)``
        for 'diag', ``(n_components,)`` for 'spherical'.
    {shared_parameters}
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
        (Weighted) mean log-likelihood of the best run (E-step of its last
        iteration); after :meth:`partial_fit`, that of the last batch.
    n_steps_ : int
        Number of :meth:`partial_fit` calls since the last initialisation.
    lower_bounds_ : list of float
    n_features_in_ : int
    feature_names_in_ : ndarray of shape (`n_features_in_`,)
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
        **BaseEMMixture._parameter_constraints,
        "weights_init": ["array-like", None],
        "means_init": ["array-like", None],
        "precisions_init": ["array-like", None],
        "learning_offset": [Interval(Real, 0.0, None, closed="left")],
        "learning_decay": [Interval(Real, 0.0, 1.0, closed="right")],
    }

    _state_names = ("weights", "means", "covariances", "precisions_cholesky")

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
        super()._check_parameters(X, ctx)
        self._initial_parameters(X.shape[1])

    def _initial_parameters(self, n_features):
        """The validated ``weights_init``, ``means_init`` and ``precisions_init``
        (None where not given)."""
        K = self.n_components
        return {
            "weights": None if self.weights_init is None
            else _check_weights(self.weights_init, K),
            "means": None if self.means_init is None
            else _check_means(self.means_init, K, n_features),
            "precisions": None if self.precisions_init is None
            else _check_precisions(self.precisions_init, self.covariance_type, K, n_features),
        }

    # -------------------------------------------------------- initialisation
    def _initialize(self, X, ctx):
        """Parameters from the initial responsibilities (unless all three
        ``*_init`` are given), then the given ones in their place."""
        self._online_stats = None
        init = self._initial_parameters(X.shape[1])
        params = {}
        if any(value is None for value in init.values()):
            super()._initialize(X, ctx)
            params = dict(self._params)
        tensor = lambda a: to_tensor(a, X.device, X.dtype)  # noqa: E731
        if init["weights"] is not None:
            params["weights"] = tensor(init["weights"])
        if init["means"] is not None:
            params["means"] = tensor(init["means"])
        if init["precisions"] is not None:
            chol = G.precision_cholesky_from_precisions(
                tensor(init["precisions"]), self.covariance_type
            )
            params["precisions_cholesky"] = chol
            params["covariances"] = G.covariances_from_cholesky(chol, self.covariance_type)
        self._params = params

    # ------------------------------------------------------------------- EM
    def _m_step(self, stats):
        self._params = self._parameters(stats.nk / stats.nk.sum(), stats.means,
                                        stats.covariances)

    def _objective(self, stats):
        """The (weighted) mean log-likelihood of the E-step."""
        return float(stats.log_prob_sum) / stats.weight_sum

    def _parameters(self, weights, means, covariances):
        """The parameter dict, with the precision Cholesky factors computed."""
        chol, covariances = G.precision_cholesky_from_covariances(
            covariances, self.covariance_type, return_covariances=True)
        return {"weights": weights, "means": means, "covariances": covariances,
                "precisions_cholesky": chol}

    def _mixture_weights(self):
        return self._params["weights"]

    # ----------------------------------------------------- stepwise EM
    def partial_fit(self, X, y=None, sample_weight=None):
        """Update the model with one mini-batch (stepwise EM).

        The first call (on an unfitted estimator) initialises the model on the
        batch; a fitted estimator continues from its fitted state. Under
        torch.distributed each process passes its own batch.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            A mini-batch.
        y : Ignored
        sample_weight : array-like of shape (n_samples,), default=None
            Weights of the batch's rows, as in :meth:`fit`.

        Returns
        -------
        self : object
            With ``n_steps_`` (number of updates made) incremented.
        """
        self._partial_fit(X, y, sample_weight)
        return self

    def _step_size(self, step):
        """``rho_t = (learning_offset + t) ** -learning_decay`` (``t >= 1``)."""
        return float((self.learning_offset + step) ** -self.learning_decay)

    def _partial_fit_step(self, X, ctx):
        """One stepwise-EM step on the batch ``X``; returns its mean log-likelihood."""
        params = self._params
        dtype, device = params["means"].dtype, params["means"].device
        stats = self._e_step(X, ctx, 0.0)
        batch = {"weights": stats.nk / stats.weight_sum, "means": stats.means,
                 "covariances": stats.covariances}
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
        return self._objective(stats)

    def _log_prob_offsets(self):
        return self._params["weights"].log()


# ----------------------------------------------------------------- helpers
def _check_weights(weights, n_components):
    weights = check_array(weights, dtype=[np.float64, np.float32], ensure_2d=False)
    check_shape(weights, (n_components,), "weights")
    if (weights < 0).any() or (weights > 1).any():
        # scikit-learn's text, word for word (its values are swapped: the
        # minimum is printed as "max value"); users and tests match it
        raise ValueError(
            "The parameter 'weights' should be in the range [0, 1], but got max "
            f"value {weights.min():.5f}, min value {weights.max():.5f}"
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
    check_shape(means, (n_components, n_features), "means")
    return means


def _check_precisions(precisions, covariance_type, n_components, n_features):
    precisions = check_array(
        precisions,
        dtype=[np.float64, np.float32],
        ensure_2d=False,
        allow_nd=covariance_type == "full",
    )
    shape = G.covariance_shape(covariance_type, n_components, n_features)
    check_shape(precisions, shape, f"{covariance_type} precision")
    if covariance_type in ("diag", "spherical"):
        check_positive(precisions, covariance_type)
    else:
        for matrix in precisions if covariance_type == "full" else precisions[None]:
            check_positive_definite(matrix, covariance_type)
    return precisions
