"""Truncated stick-breaking variational Dirichlet-process Gaussian mixture in torch.

The model and its coordinate-ascent updates are those of
``BayesianGaussianMixture(weight_concentration_prior_type='dirichlet_process')``
(scikit-learn's and :class:`skdeepmix.BayesianGaussianMixture`, Blei & Jordan
2006; Bishop 2006 §10.2), with *one* implementation of the numerics: the
functions of :mod:`skdeepmix._gaussian` (Normal-Wishart and stick-breaking
posteriors, expected log-densities, the lower bound, the centred sufficient
statistics, the natural-gradient blend) that ``BayesianGaussianMixture``
calls too. Beta posteriors over the stick-breaking fractions, Normal-Wishart
posteriors over the component means and precisions (``'full'`` or
``'diag'`` covariance), the same priors and default prior values, so that on
fixed data and the same initial responsibilities the fitted quantities agree
with scikit-learn's.

Two additions make it usable as the latent prior of a VAE:

* the data may be *uncertain*: each point is a Gaussian ``N(m_n, diag(s_n))``
  (a VAE posterior ``q(z|x)``); the expected log-likelihood and the sufficient
  statistics then contain the variance terms (``s_n = 0`` recovers the plain
  model);
* :meth:`DirichletProcessGMM.update` takes a step size ``rho``: the posterior
  natural parameters are linear in the sufficient statistics, so blending the
  old and new statistics with weight ``rho`` is a natural-gradient
  (stochastic variational inference) step; ``rho=1`` is the closed-form
  coordinate-ascent update.

Statistics are accumulated centred (weighted Chan merges), never as
``E[x^2] - E[x]^2``. Every method that sums over points takes an optional
``partition`` (:class:`skdeepmix._distributed.RowPartition`): under
``torch.distributed`` each process passes its own points and the sums are
all-reduced, so every process holds the same posterior.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .. import _gaussian as G
from .._kmeans import kmeans

__all__ = ["DirichletProcessGMM"]

_PRIOR_TYPE = "dirichlet_process"


class DirichletProcessGMM(nn.Module):
    """Variational truncated Dirichlet-process Gaussian mixture (torch buffers).

    Parameters
    ----------
    n_components : int
        Truncation level ``K`` of the stick-breaking construction.
    n_features : int
        Dimension of the data.
    covariance_type : {'full', 'diag'}, default='diag'
    weight_concentration_prior : float, optional
        Concentration ``alpha`` of the DP; ``None`` means ``1 / n_components``
        (scikit-learn's default).
    mean_precision_prior : float, default=1.0
    degrees_of_freedom_prior : float, optional
        ``None`` means ``n_features``.
    reg_covar : float, default=1e-6
        Added to the diagonal of the component scatter matrices.

    Attributes (buffers, after :meth:`set_priors` and an update)
    ----------
    weight_concentration : Tensor of shape (2, K)
        Beta posterior parameters of the stick-breaking fractions.
    mean_precision : Tensor of shape (K,)
    means : Tensor of shape (K, d)
    degrees_of_freedom : Tensor of shape (K,)
    covariances : Tensor of shape (K, d, d) or (K, d)
        ``W_k^{-1} / nu_k`` (the expected covariance, sklearn's convention).
    precisions_cholesky : Tensor of shape (K, d, d) or (K, d)
    stat_n, stat_mean, stat_scatter : Tensor
        The running centred sufficient statistics (counts, means, scatter
        without ``reg_covar``) behind the posterior.
    count_scale : float
        Multiplies the counts seen by the posterior (tempering; 1 = exact).

    Examples
    --------
    >>> import torch
    >>> g = torch.Generator().manual_seed(0)
    >>> X = torch.cat([torch.randn(50, 2, generator=g) - 5,
    ...                torch.randn(50, 2, generator=g) + 5]).double()
    >>> dp = DirichletProcessGMM(5, 2).double()
    >>> _ = dp.fit(X, generator=g)
    >>> int((dp.weights() > 0.05).sum())
    2
    """

    def __init__(
        self,
        n_components,
        n_features,
        covariance_type="diag",
        weight_concentration_prior=None,
        mean_precision_prior=1.0,
        degrees_of_freedom_prior=None,
        reg_covar=1e-6,
    ):
        super().__init__()
        if covariance_type not in ("full", "diag"):
            raise ValueError(
                f"covariance_type must be 'full' or 'diag', got {covariance_type!r}."
            )
        K, d = int(n_components), int(n_features)
        self.n_components, self.n_features = K, d
        self.covariance_type = covariance_type
        self.alpha = (
            1.0 / K if weight_concentration_prior is None else float(weight_concentration_prior)
        )
        self.beta0 = float(mean_precision_prior)
        self.nu0 = float(d if degrees_of_freedom_prior is None else degrees_of_freedom_prior)
        self.reg_covar = float(reg_covar)
        self.count_scale = 1.0
        cov_shape = G.covariance_shape(covariance_type, K, d)
        prior_shape = (d, d) if covariance_type == "full" else (d,)
        for name, shape in [
            ("mean_prior", (d,)), ("covariance_prior", prior_shape),
            ("weight_concentration", (2, K)), ("mean_precision", (K,)), ("means", (K, d)),
            ("degrees_of_freedom", (K,)), ("covariances", cov_shape),
            ("precisions_cholesky", cov_shape), ("stat_n", (K,)), ("stat_mean", (K, d)),
            ("stat_scatter", cov_shape),
        ]:
            self.register_buffer(name, torch.empty(shape))
        self.reset_parameters()

    def reset_parameters(self, generator=None):
        """Set every buffer to its initial value (unit covariances, zero
        statistics); nothing is random (``generator`` is accepted for
        :func:`skdeepmix._torch_utils.build_module`)."""
        d = self.n_features
        with torch.no_grad():
            for name in ("mean_prior", "means", "stat_n", "stat_mean", "stat_scatter"):
                getattr(self, name).zero_()
            for name in ("weight_concentration", "mean_precision"):
                getattr(self, name).fill_(1.0)
            self.degrees_of_freedom.fill_(float(d))
            unit = torch.eye(d) if self.covariance_type == "full" else torch.ones(d)
            self.covariance_prior.copy_(unit)
            self.covariances.copy_(unit.expand_as(self.covariances))
            self.precisions_cholesky.copy_(unit.expand_as(self.precisions_cholesky))

    # ------------------------------------------------------------ priors
    def set_priors(self, X, var=None, *, partition=None):
        """Set the data-dependent priors as scikit-learn does.

        ``mean_prior`` is the data mean and ``covariance_prior`` the unbiased
        (``ddof=1``) data covariance (``'full'``) or variance (``'diag'``). With
        per-point variances ``var`` their mean is added (the covariance of the
        mixture of the point Gaussians).
        """
        mean, covariance, _ = G.weighted_data_moments(
            lambda: [(X, None, var)], self.covariance_type, partition
        )
        self.mean_prior.copy_(mean)
        self.covariance_prior.copy_(covariance)

    # ------------------------------------------------------------ statistics
    def sufficient_statistics(self, X, resp, var=None, *, partition=None):
        """Centred sufficient statistics ``(nk, xk, sk)`` as in scikit-learn.

        Parameters
        ----------
        X : Tensor of shape (n, d)
        resp : Tensor of shape (n, K)
        var : Tensor of shape (n, d), optional
            Per-point variances (added to the scatter).
        partition : RowPartition, optional
            Sums over the processes of a distributed fit.

        Returns
        -------
        nk : (K,), xk : (K, d), sk : (K, d, d) or (K, d) (without ``reg_covar``)
        """
        stats = G.SufficientStatistics(self.covariance_type, self.means, self.mean_prior)
        return stats.accumulate(lambda exact: [dict(X=X, resp=resp, X_var=var)], 0.0, partition)

    @staticmethod
    def merge_statistics(a, b, weight_b):
        """Weighted Chan merge ``(1 - w) * a + w * b`` of centred statistics."""
        covariance_type = "full" if a[2].dim() == 3 else "diag"
        merged = G.blend_moments(
            {"weights": a[0], "means": a[1], "covariances": a[2]},
            {"weights": b[0], "means": b[1], "covariances": b[2]},
            weight_b, covariance_type,
        )
        return merged["weights"], merged["means"], merged["covariances"]

    # ------------------------------------------------------------ updates
    def update(self, X, resp, var=None, rho=1.0, *, partition=None):
        """Closed-form (``rho=1``) or natural-gradient (``rho<1``) M-step.

        Parameters
        ----------
        X : Tensor of shape (n, d)
            Point means (e.g. the VAE posterior means).
        resp : Tensor of shape (n, K)
            Responsibilities ``q(y = k | x_n)``.
        var : Tensor of shape (n, d), optional
            Point variances (e.g. the VAE posterior variances).
        rho : float in (0, 1], default=1.0
            Step size of the natural-gradient step.
        partition : RowPartition, optional
            Sums over the processes of a distributed fit.
        """
        stats = self.sufficient_statistics(X, resp, var, partition=partition)
        if rho < 1.0:
            stats = self.merge_statistics(
                (self.stat_n, self.stat_mean, self.stat_scatter), stats, rho
            )
        for buffer, value in zip((self.stat_n, self.stat_mean, self.stat_scatter), stats):
            buffer.copy_(value)
        self._posterior_from_statistics()

    def _posterior_from_statistics(self):
        nk = self.stat_n * self.count_scale
        if self.covariance_type == "full":
            eye = torch.eye(self.n_features, dtype=nk.dtype, device=nk.device)
            sk = self.stat_scatter + self.reg_covar * eye
        else:
            sk = self.stat_scatter + self.reg_covar
        self.weight_concentration.copy_(
            G.weight_concentration_posterior(nk, self.alpha, _PRIOR_TYPE)
        )
        mean_precision, means, dof, covariances = G.normal_wishart_posterior(
            nk, self.stat_mean, sk, self.mean_prior, self.beta0, self.nu0,
            self.covariance_prior, self.covariance_type,
        )
        for buffer, value in [
            (self.mean_precision, mean_precision), (self.means, means),
            (self.degrees_of_freedom, dof), (self.covariances, covariances),
            (self.precisions_cholesky,
             G.precision_cholesky_from_covariances(covariances, self.covariance_type)),
        ]:
            buffer.copy_(value)

    # ------------------------------------------------------------ E-step
    def log_weights(self):
        """``E_q[log pi_k]`` under the stick-breaking posterior, shape (K,)."""
        return G.expected_log_weights(self.weight_concentration, _PRIOR_TYPE)

    def weights(self):
        """Posterior mean mixture weights (``sklearn``'s ``weights_``), shape (K,)."""
        return G.mixture_weights(self.weight_concentration, _PRIOR_TYPE)

    def expected_log_prob(self, X, var=None):
        """``E_q[log N(x | mu_k, Lambda_k^{-1})]`` of shape (n, K).

        Identical to scikit-learn's ``_estimate_log_prob`` when ``var`` is None;
        with point variances ``var`` it is also averaged over ``N(x, diag(var))``.
        """
        return G.expected_log_gaussian_prob(
            X, self.means, self.precisions_cholesky, self.degrees_of_freedom,
            self.mean_precision, self.covariance_type, self.mean_prior, X_var=var,
        )

    def log_resp(self, X, var=None):
        """``(log_prob_norm, log_resp)``: the DP-GMM E-step, shapes (n,), (n, K)."""
        weighted = self.expected_log_prob(X, var) + self.log_weights()
        norm = torch.logsumexp(weighted, 1)
        return norm, weighted - norm[:, None]

    def point_log_prob(self, X):
        """``log p(x, k)`` under the point estimates (weights, means, covariances), (n, K).

        This is a proper mixture density (used for importance-weighted
        log-likelihoods), unlike the variational expectation.
        """
        log_gauss = G.log_gaussian_prob(X, self.means, self.precisions_cholesky,
                                        self.covariance_type, self.mean_prior)
        return log_gauss + torch.log(self.weights().clamp_min(1e-30))

    def lower_bound(self, log_resp, *, partition=None):
        """scikit-learn's variational lower bound (constants dropped), a 0-d tensor.

        ``log_resp`` are the log-responsibilities of the E-step (this
        process's points with a ``partition``).
        """
        floor = torch.finfo(log_resp.dtype).min  # 0 * -inf must count as 0
        entropy = (log_resp.exp() * log_resp.clamp_min(floor)).sum().reshape(1)
        if partition is not None:
            partition.sum(entropy)
        bound = G.variational_lower_bound(
            entropy[0], self.weight_concentration, _PRIOR_TYPE, self.degrees_of_freedom,
            self.mean_precision, self.precisions_cholesky, self.covariance_type,
            self.n_features,
        )
        return log_resp.new_tensor(bound)

    # ------------------------------------------------------------ full fit
    @torch.no_grad()
    def fit(self, X, resp=None, *, generator=None, var=None, max_iter=100, tol=1e-3,
            set_priors=True, partition=None):
        """Coordinate-ascent fit (scikit-learn's algorithm) on fixed data.

        Parameters
        ----------
        X : Tensor of shape (n, d)
        resp : Tensor of shape (n, K), optional
            Initial responsibilities; by default hard k-means labels
            (:func:`skdeepmix._kmeans.kmeans`, like sklearn's
            ``init_params='kmeans'``), which need ``generator``.
        generator : torch.Generator, optional
        var : Tensor of shape (n, d), optional
            Per-point variances.
        max_iter : int, default=100
        tol : float, default=1e-3
        set_priors : bool, default=True
            Recompute the data-dependent priors from ``X``.
        partition : RowPartition, optional
            This process's share of the points (distributed fit).

        Returns
        -------
        n_iter : int
            Iterations run; ``self.converged`` and ``self.lower_bound_value``
            are set.
        """
        if set_priors:
            self.set_priors(X, var, partition=partition)
        if resp is None:
            labels = kmeans(X, self.n_components, generator, partition=partition)[1]
            resp = torch.nn.functional.one_hot(labels, self.n_components).to(X.dtype)
        self.update(X, resp, var, partition=partition)
        lower = -math.inf
        self.converged = False
        n_iter = 0
        for n_iter in range(1, max_iter + 1):
            previous = lower
            _, log_resp = self.log_resp(X, var)
            self.update(X, log_resp.exp(), var, partition=partition)
            lower = float(self.lower_bound(log_resp, partition=partition))
            if abs(lower - previous) < tol:
                self.converged = True
                break
        self.lower_bound_value = lower
        return n_iter
