"""A torch variational Bayesian Gaussian mixture with scikit-learn's API and results."""

from __future__ import annotations

from numbers import Real

import numpy as np
from sklearn.utils import check_array
from sklearn.utils._param_validation import Interval, StrOptions

from . import _gaussian as G
from ._docstrings import fill_doc
from ._em import BaseEMMixture, check_positive, check_positive_definite, check_shape
from ._torch_utils import RowSource, to_numpy, to_tensor

__all__ = ["BayesianGaussianMixture"]


@fill_doc(tol=1e-3, max_iter=100, iteration="EM iterations",
          tol_meaning="EM stops when the variational lower bound changes by less "
          "than ``tol``.")
class BayesianGaussianMixture(BaseEMMixture):
    """Variational Bayesian Gaussian mixture in torch: a drop-in for scikit-learn's.

    Same constructor parameters, defaults, fitted attributes and methods as
    :class:`sklearn.mixture.BayesianGaussianMixture`: a finite Dirichlet
    (``'dirichlet_distribution'``) or truncated stick-breaking Dirichlet-process
    (``'dirichlet_process'``) prior on the weights, Normal-Wishart priors on the
    components, fitted by coordinate ascent on the variational lower bound
    (with the same initial state in float64, the same results; scikit-learn's
    own tests pass against it). Plus ``device``, ``dtype``, ``chunk_size``
    and ``sample_weight`` in :meth:`fit`/:meth:`fit_predict`. The E-step and
    the statistics run over chunks of rows (memory bounded by
    ``chunk_size``), accumulated centred; ``np.memmap`` input is streamed and
    ``torch.distributed`` fits all-reduce the statistics (see
    :class:`~skdeepmix.GaussianMixture`). See ``doc/drop_in.md``.

    Parameters
    ----------
    n_components : int, default=1
        The number of mixture components (the truncation level of the
        Dirichlet process); the fit leaves superfluous components almost empty.
    covariance_type : {'full', 'tied', 'diag', 'spherical'}, default='full'
        The type of covariance parameters.
    reg_covar : float, default=1e-6
        Non-negative regularisation added to the diagonal of covariances.
    init_params : {'kmeans', 'k-means++', 'random', 'random_from_data'}, default='kmeans'
        How the responsibilities are initialised (k-means and k-means++ run in
        torch on the fit's device; with ``sample_weight`` as described in
        :class:`~skdeepmix.GaussianMixture`).
    weight_concentration_prior_type : {'dirichlet_process', 'dirichlet_distribution'}, \
default='dirichlet_process'
        The type of the prior on the weights.
    weight_concentration_prior : float or None, default=None
        The Dirichlet concentration of each component (``gamma``);
        ``None`` means ``1 / n_components``.
    mean_precision_prior : float or None, default=None
        The precision prior on the means (``beta``); ``None`` means 1.
    mean_prior : array-like of shape (n_features,), default=None
        The prior on the means (``mu_0``); ``None`` means the (weighted) mean
        of ``X``.
    degrees_of_freedom_prior : float or None, default=None
        The Wishart degrees of freedom (``nu_0``, above ``n_features - 1``);
        ``None`` means ``n_features``.
    covariance_prior : float or array-like, default=None
        The prior on the covariances (``W_0^-1``): shape (n_features,
        n_features) for 'full'/'tied', (n_features,) for 'diag', a float for
        'spherical'. ``None`` means the unbiased covariance of ``X``
        (``sample_weight`` counts as frequencies, so their sum must exceed 1).
    {shared_parameters}

    Attributes
    ----------
    weights_ : ndarray of shape (n_components,)
        Posterior-mean weights.
    means_ : ndarray of shape (n_components, n_features)
    covariances_ : ndarray
        ``W_k^-1 / nu_k``; shape (n_components, n_features, n_features) for
        'full', (n_features, n_features) 'tied', (n_components, n_features)
        'diag', (n_components,) 'spherical'.
    precisions_ : ndarray
        Inverses of ``covariances_``.
    precisions_cholesky_ : ndarray
        Upper-triangular Cholesky factors of ``precisions_`` (square roots
        for 'diag'/'spherical').
    converged_ : bool
    n_iter_ : int
    lower_bound_ : float
        Variational lower bound of the best run (scikit-learn's, constant
        terms dropped; not divided by the number of samples).
    lower_bounds_ : list of float
        The lower bound after each iteration of the best run.
    weight_concentration_prior_ : float
    weight_concentration_ : tuple of two ndarrays of shape (n_components,) or ndarray
        Beta parameters of the sticks ('dirichlet_process') or Dirichlet
        parameters ('dirichlet_distribution').
    mean_precision_prior_ : float
    mean_precision_ : ndarray of shape (n_components,)
    mean_prior_ : ndarray of shape (n_features,)
    degrees_of_freedom_prior_ : float
    degrees_of_freedom_ : ndarray of shape (n_components,)
        A 0-d array for 'tied' (one Wishart for all components).
    covariance_prior_ : float or ndarray
    n_features_in_ : int
    feature_names_in_ : ndarray of shape (`n_features_in_`,)
        Only when ``X`` has string feature names.

    Examples
    --------
    >>> import numpy as np
    >>> from skdeepmix import BayesianGaussianMixture
    >>> rng = np.random.RandomState(0)
    >>> X = np.vstack([rng.normal(0, 1, (100, 2)), rng.normal(8, 1, (100, 2))])
    >>> bgm = BayesianGaussianMixture(n_components=5, random_state=0).fit(X)
    >>> active = bgm.weights_ > 0.1  # the prior leaves 3 of the 5 components empty
    >>> np.sort(bgm.means_[active, 0]).round(1)
    array([0. , 7.8])
    """

    _parameter_constraints: dict = {
        **BaseEMMixture._parameter_constraints,
        "weight_concentration_prior_type": [StrOptions(set(G.WEIGHT_PRIOR_TYPES))],
        "weight_concentration_prior": [None, Interval(Real, 0.0, None, closed="neither")],
        "mean_precision_prior": [None, Interval(Real, 0.0, None, closed="neither")],
        "mean_prior": [None, "array-like"],
        "degrees_of_freedom_prior": [None, Interval(Real, 0.0, None, closed="neither")],
        "covariance_prior": [None, "array-like", Interval(Real, 0.0, None, closed="neither")],
    }

    _state_names = ("weight_concentration", "mean_precision", "means",
                    "degrees_of_freedom", "covariances", "precisions_cholesky")
    _objective_uses_entropy = True

    def __init__(
        self,
        *,
        n_components=1,
        covariance_type="full",
        tol=1e-3,
        reg_covar=1e-6,
        max_iter=100,
        n_init=1,
        init_params="kmeans",
        weight_concentration_prior_type="dirichlet_process",
        weight_concentration_prior=None,
        mean_precision_prior=None,
        mean_prior=None,
        degrees_of_freedom_prior=None,
        covariance_prior=None,
        random_state=None,
        warm_start=False,
        verbose=0,
        verbose_interval=10,
        device="auto",
        dtype=None,
        chunk_size=None,
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
        self.weight_concentration_prior_type = weight_concentration_prior_type
        self.weight_concentration_prior = weight_concentration_prior
        self.mean_precision_prior = mean_precision_prior
        self.mean_prior = mean_prior
        self.degrees_of_freedom_prior = degrees_of_freedom_prior
        self.covariance_prior = covariance_prior

    # ------------------------------------------------------------ priors
    def _check_parameters(self, X, ctx):
        """Check the priors and set the ``*_prior_`` attributes (every fit,
        from the data where they are None, as scikit-learn does)."""
        super()._check_parameters(X, ctx)
        n_features = X.shape[1]
        self.weight_concentration_prior_ = (
            1.0 / self.n_components if self.weight_concentration_prior is None
            else self.weight_concentration_prior
        )
        self.mean_precision_prior_ = (
            1.0 if self.mean_precision_prior is None else self.mean_precision_prior
        )
        if self.degrees_of_freedom_prior is None:
            self.degrees_of_freedom_prior_ = n_features
        elif self.degrees_of_freedom_prior > n_features - 1.0:
            self.degrees_of_freedom_prior_ = self.degrees_of_freedom_prior
        else:
            raise ValueError(
                "The parameter 'degrees_of_freedom_prior' should be greater than "
                f"{n_features - 1}, but got {self.degrees_of_freedom_prior:.3f}."
            )
        covariance_prior = self._checked_covariance_prior(n_features)
        mean_prior = None
        if self.mean_prior is not None:
            mean_prior = check_array(self.mean_prior, dtype=[np.float64, np.float32],
                                     ensure_2d=False)
            check_shape(mean_prior, (n_features,), "means")
        if mean_prior is None or covariance_prior is None:
            data_mean, data_covariance = self._data_moments(X, ctx, covariance_prior is None)
            mean_prior = data_mean if mean_prior is None else mean_prior
            covariance_prior = data_covariance if covariance_prior is None \
                else covariance_prior
        self.mean_prior_ = mean_prior
        self.covariance_prior_ = covariance_prior

    def _checked_covariance_prior(self, n_features):
        """The validated ``covariance_prior`` (None when it comes from the data)."""
        prior, covariance_type = self.covariance_prior, self.covariance_type
        if prior is None or covariance_type == "spherical":
            return prior
        prior = check_array(prior, dtype=[np.float64, np.float32], ensure_2d=False)
        if covariance_type == "diag":
            check_shape(prior, (n_features,), "diag covariance_prior")
            check_positive(prior, covariance_type)
        else:
            check_shape(prior, (n_features, n_features), f"{covariance_type} covariance_prior")
            check_positive_definite(prior, covariance_type)
        return prior

    def _data_moments(self, X, ctx, need_covariance):
        """(Weighted) mean and unbiased covariance of ``X``, over chunks."""
        weights = ctx.sample_weight
        source = RowSource(X, ctx.device, ctx.dtype) if self._streams(X) else X

        def batches():
            for rows in self._row_chunks(X.shape[0], X.device):
                yield ctx.tensor(source[rows]), None if weights is None else weights[rows], None

        mean, covariance, total = G.weighted_data_moments(batches, self.covariance_type,
                                                          ctx.partition)
        if need_covariance and total <= 1.0:
            raise ValueError(
                "The default covariance_prior is the unbiased covariance of X, which "
                "needs the sum of sample_weight (frequencies) above 1, but got "
                f"{total:.5g}. Scale sample_weight or set covariance_prior."
            )
        return to_numpy(mean), to_numpy(covariance)[()]  # a numpy scalar for 'spherical'

    def _prior_tensors(self, like):
        """``mean_prior_`` and ``covariance_prior_`` as tensors like ``like``."""
        tensor = lambda a: to_tensor(np.asarray(a), like.device, like.dtype)  # noqa: E731
        return tensor(self.mean_prior_), tensor(self.covariance_prior_)

    # ------------------------------------------------------------------- EM
    def _m_step(self, stats):
        """The variational posterior of the weights and the components."""
        nk = stats.nk
        concentration = G.weight_concentration_posterior(
            nk, self.weight_concentration_prior_, self.weight_concentration_prior_type
        )
        mean_precision, means, dof, covariances = self._component_posterior(
            nk, stats.means, stats.covariances)
        chol, covariances = G.precision_cholesky_from_covariances(
            covariances, self.covariance_type, return_covariances=True)
        self._params = {
            "weight_concentration": concentration,
            "mean_precision": mean_precision,
            "means": means,
            "degrees_of_freedom": dof,
            "covariances": covariances,
            "precisions_cholesky": chol,
        }

    def _component_posterior(self, nk, means, covariances):
        """The Normal-Wishart posterior of the components from the data's
        statistics (:func:`~skdeepmix._gaussian.normal_wishart_posterior`)."""
        mean_prior, covariance_prior = self._prior_tensors(nk)
        return G.normal_wishart_posterior(
            nk, means, covariances, mean_prior, self.mean_precision_prior_,
            self.degrees_of_freedom_prior_, covariance_prior, self.covariance_type,
        )

    def _covariances_in_use(self, nk, means, covariances):
        """The posterior's covariances: the data's plus the prior's (for a
        near-empty component, rounding of its data covariance is outweighed
        by the prior and needs no exact pass)."""
        return self._component_posterior(nk, means, covariances)[3]

    def _objective(self, stats):
        """The variational lower bound (E-step entropy, M-step posterior)."""
        params = self._params
        return G.variational_lower_bound(
            stats.resp_log_resp_sum, params["weight_concentration"],
            self.weight_concentration_prior_type, params["degrees_of_freedom"],
            params["mean_precision"], params["precisions_cholesky"],
            self.covariance_type, self.n_features_in_,
        )

    def _mixture_weights(self):
        return G.mixture_weights(self._params["weight_concentration"],
                                 self.weight_concentration_prior_type)

    def _log_prob_offsets(self):
        """``E[log pi_k]`` and the Normal-Wishart terms of ``E[log p(x | k)]``."""
        params = self._params
        return G.expected_log_gaussian_offsets(
            params["degrees_of_freedom"], params["mean_precision"], self.n_features_in_
        ) + G.expected_log_weights(params["weight_concentration"],
                                   self.weight_concentration_prior_type)

    # ------------------------------------------------------- state handling
    def _set_state(self, state):
        super()._set_state(state)
        self.weights_ = to_numpy(self._mixture_weights())

    def _dirichlet_process(self):
        return self.weight_concentration_prior_type == "dirichlet_process"

    def _public_value(self, name, tensor):
        if name == "weight_concentration" and self._dirichlet_process():
            return tuple(to_numpy(row) for row in tensor)  # scikit-learn's (a, b)
        return to_numpy(tensor)

    def _state_value(self, name, value, device, dtype):
        if name == "weight_concentration" and self._dirichlet_process():
            value = np.stack([np.asarray(row) for row in value])
        return to_tensor(value, device, dtype)
