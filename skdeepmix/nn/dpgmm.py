"""Truncated stick-breaking variational Dirichlet-process Gaussian mixture in torch.

The model and its coordinate-ascent updates are those of
``sklearn.mixture.BayesianGaussianMixture(weight_concentration_prior_type=
'dirichlet_process')`` (Blei & Jordan 2006; Bishop 2006 §10.2): Beta posteriors
over the stick-breaking fractions, Normal-Wishart posteriors over the component
means and precisions (``'full'`` or ``'diag'`` covariance), the same priors and
default prior values, so that on fixed data and the same initial
responsibilities the fitted quantities agree with scikit-learn's.

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
``E[x^2] - E[x]^2``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["DirichletProcessGMM", "kmeans_plusplus_labels"]

_EPS = 10 * torch.finfo(torch.float64).eps  # sklearn's nk regulariser is 10 * eps(float64)


def kmeans_plusplus_labels(X, n_clusters, generator, n_iter=20):
    """k-means++ seeding plus Lloyd iterations, in torch with a generator.

    Parameters
    ----------
    X : Tensor of shape (n_samples, n_features)
    n_clusters : int
    generator : torch.Generator
    n_iter : int, default=20

    Returns
    -------
    labels : LongTensor of shape (n_samples,)
    """
    n = X.shape[0]
    first = int(torch.randint(n, (1,), generator=generator, device=generator.device))
    centers = [X[first]]
    dist = ((X - centers[0]) ** 2).sum(1)
    for _ in range(1, n_clusters):
        total = dist.sum()
        if total <= 0:
            idx = int(torch.randint(n, (1,), generator=generator, device=generator.device))
        else:
            probs = (dist / total).to(generator.device)
            idx = int(torch.multinomial(probs, 1, generator=generator))
        centers.append(X[idx])
        dist = torch.minimum(dist, ((X - X[idx]) ** 2).sum(1))
    centers = torch.stack(centers)
    labels = torch.cdist(X, centers).argmin(1)
    for _ in range(n_iter):
        onehot = torch.nn.functional.one_hot(labels, n_clusters).to(X.dtype)
        counts = onehot.sum(0)
        sums = onehot.T @ X
        keep = counts > 0
        centers = torch.where(keep[:, None], sums / counts.clamp_min(1)[:, None], centers)
        new_labels = torch.cdist(X, centers).argmin(1)
        if torch.equal(new_labels, labels):
            break
        labels = new_labels
    return labels


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
        #: multiplies the counts seen by the posterior (tempering; 1 = exact)
        self.count_scale = 1.0
        cov_shape = (K, d, d) if covariance_type == "full" else (K, d)
        prior_shape = (d, d) if covariance_type == "full" else (d,)
        self.register_buffer("mean_prior", torch.zeros(d))
        self.register_buffer("covariance_prior", torch.ones(prior_shape))
        self.register_buffer("weight_concentration", torch.ones(2, K))
        self.register_buffer("mean_precision", torch.ones(K))
        self.register_buffer("means", torch.zeros(K, d))
        self.register_buffer("degrees_of_freedom", torch.full((K,), float(d)))
        self.register_buffer("covariances", torch.ones(cov_shape))
        self.register_buffer("precisions_cholesky", torch.ones(cov_shape))
        # running centred sufficient statistics (for natural-gradient steps)
        self.register_buffer("stat_n", torch.zeros(K))
        self.register_buffer("stat_mean", torch.zeros(K, d))
        self.register_buffer("stat_scatter", torch.zeros(cov_shape))
        if covariance_type == "full":
            self.covariances.copy_(torch.eye(d).expand(K, d, d))
            self.precisions_cholesky.copy_(torch.eye(d).expand(K, d, d))
            self.covariance_prior.copy_(torch.eye(d))

    # ------------------------------------------------------------ priors
    def set_priors(self, X, var=None):
        """Set the data-dependent priors as scikit-learn does.

        ``mean_prior`` is the data mean and ``covariance_prior`` the unbiased
        (``ddof=1``) data covariance (``'full'``) or variance (``'diag'``). With per-point
        variances ``var`` their mean is added (the covariance of the mixture of
        the point Gaussians).
        """
        mean = X.mean(0)
        centred = X - mean
        if self.covariance_type == "full":
            # sklearn: np.atleast_2d(np.cov(X.T)) (unbiased, ddof=1)
            cov = centred.T @ centred / max(X.shape[0] - 1, 1)
            if var is not None:
                cov = cov + torch.diag(var.mean(0))
        else:
            cov = (centred**2).sum(0) / max(X.shape[0] - 1, 1)
            if var is not None:
                cov = cov + var.mean(0)
        self.mean_prior.copy_(mean)
        self.covariance_prior.copy_(cov)

    # ------------------------------------------------------------ statistics
    def sufficient_statistics(self, X, resp, var=None):
        """Centred sufficient statistics ``(nk, xk, sk)`` as in scikit-learn.

        Parameters
        ----------
        X : Tensor of shape (n, d)
        resp : Tensor of shape (n, K)
        var : Tensor of shape (n, d), optional
            Per-point variances (added to the scatter).

        Returns
        -------
        nk : (K,), xk : (K, d), sk : (K, d, d) or (K, d) (without ``reg_covar``)
        """
        nk = resp.sum(0) + _EPS
        xk = resp.T @ X / nk[:, None]
        if self.covariance_type == "full":
            sk = torch.empty(self.n_components, self.n_features, self.n_features,
                             dtype=X.dtype, device=X.device)
            for k in range(self.n_components):
                diff = X - xk[k]
                sk[k] = (resp[:, k, None] * diff).T @ diff / nk[k]
                if var is not None:
                    sk[k] += torch.diag(resp[:, k] @ var / nk[k])
        else:
            sk = torch.empty_like(xk)
            for k in range(self.n_components):
                sk[k] = resp[:, k] @ (X - xk[k]) ** 2 / nk[k]
            if var is not None:
                sk = sk + resp.T @ var / nk[:, None]
        return nk, xk, sk

    @staticmethod
    def merge_statistics(a, b, weight_b):
        """Weighted Chan merge ``(1 - w) * a + w * b`` of centred statistics."""
        na, ma, sa = a
        nb, mb, sb = b
        wa, wb = (1.0 - weight_b) * na, weight_b * nb
        n = wa + wb
        mean = (wa[:, None] * ma + wb[:, None] * mb) / n[:, None]
        delta = ma - mb
        coef = wa * wb / n
        if sa.dim() == 3:
            cross = coef[:, None, None] * delta[:, :, None] * delta[:, None, :]
            scatter = (wa[:, None, None] * sa + wb[:, None, None] * sb + cross) / n[:, None, None]
        else:
            scatter = (wa[:, None] * sa + wb[:, None] * sb + coef[:, None] * delta**2) / n[:, None]
        return n, mean, scatter

    # ------------------------------------------------------------ updates
    def update(self, X, resp, var=None, rho=1.0):
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
        """
        stats = self.sufficient_statistics(X, resp, var)
        if rho < 1.0:
            stats = self.merge_statistics(
                (self.stat_n, self.stat_mean, self.stat_scatter), stats, rho
            )
        self._set_statistics(*stats)
        self._posterior_from_statistics()

    def _set_statistics(self, nk, xk, sk):
        self.stat_n.copy_(nk)
        self.stat_mean.copy_(xk)
        self.stat_scatter.copy_(sk)

    def _posterior_from_statistics(self):
        nk, xk = self.stat_n * self.count_scale, self.stat_mean
        sk = self.stat_scatter
        if self.covariance_type == "full":
            eye = torch.eye(self.n_features, dtype=sk.dtype, device=sk.device)
            sk = sk + self.reg_covar * eye
        else:
            sk = sk + self.reg_covar
        # weights (Beta posteriors of the sticks)
        tail = torch.flip(torch.cumsum(torch.flip(nk, [0]), 0), [0])
        tail = torch.cat([tail[1:], tail.new_zeros(1)])
        self.weight_concentration[0].copy_(1.0 + nk)
        self.weight_concentration[1].copy_(self.alpha + tail)
        # means
        self.mean_precision.copy_(self.beta0 + nk)
        self.means.copy_(
            (self.beta0 * self.mean_prior + nk[:, None] * xk) / self.mean_precision[:, None]
        )
        # precisions (Wishart)
        self.degrees_of_freedom.copy_(self.nu0 + nk)
        diff = xk - self.mean_prior
        shrink = nk * self.beta0 / self.mean_precision
        if self.covariance_type == "full":
            cov = (
                self.covariance_prior
                + nk[:, None, None] * sk
                + shrink[:, None, None] * diff[:, :, None] * diff[:, None, :]
            )
            cov = cov / self.degrees_of_freedom[:, None, None]
            self.covariances.copy_(cov)
            chol, info = torch.linalg.cholesky_ex(cov)
            if bool((info > 0).any()):
                raise ValueError(
                    "DP-GMM: a component covariance is not positive definite; "
                    "increase reg_covar or use covariance_type='diag'."
                )
            eye = torch.eye(self.n_features, dtype=cov.dtype, device=cov.device)
            prec_chol = torch.linalg.solve_triangular(chol, eye.expand_as(chol), upper=False)
            self.precisions_cholesky.copy_(prec_chol.transpose(-1, -2))
        else:
            cov = (self.covariance_prior + nk[:, None] * (sk + (self.beta0 / self.mean_precision)[:, None] * diff**2))
            cov = cov / self.degrees_of_freedom[:, None]
            self.covariances.copy_(cov)
            self.precisions_cholesky.copy_(cov.rsqrt())

    # ------------------------------------------------------------ E-step
    def log_weights(self):
        """``E_q[log pi_k]`` under the stick-breaking posterior, shape (K,)."""
        a, b = self.weight_concentration
        dsum = torch.digamma(a + b)
        log_v = torch.digamma(a) - dsum
        log_1mv = torch.digamma(b) - dsum
        return log_v + torch.cat([log_1mv.new_zeros(1), torch.cumsum(log_1mv, 0)[:-1]])

    def weights(self):
        """Posterior mean mixture weights (``sklearn``'s ``weights_``), shape (K,)."""
        a, b = self.weight_concentration
        v = a / (a + b)
        rest = torch.cat([v.new_ones(1), torch.cumprod(1 - v, 0)[:-1]])
        w = v * rest
        return w / w.sum()

    def _log_det_prec_chol(self):
        if self.covariance_type == "full":
            return torch.log(torch.diagonal(self.precisions_cholesky, dim1=-2, dim2=-1)).sum(-1)
        return torch.log(self.precisions_cholesky).sum(-1)

    def _mahalanobis(self, X, var=None):
        """``(x - m_k)^T P_k (x - m_k)`` (+ ``tr(P_k S_x)``) with ``P_k = covariances_k^{-1}``."""
        n, K = X.shape[0], self.n_components
        out = X.new_empty(n, K)
        for k in range(K):
            if self.covariance_type == "full":
                L = self.precisions_cholesky[k]
                y = (X - self.means[k]) @ L
                out[:, k] = (y**2).sum(1)
                if var is not None:
                    out[:, k] += var @ (L**2).sum(1)
            else:
                p = self.precisions_cholesky[k] ** 2
                out[:, k] = ((X - self.means[k]) ** 2) @ p
                if var is not None:
                    out[:, k] += var @ p
        return out

    def expected_log_prob(self, X, var=None):
        """``E_q[log N(x | mu_k, Lambda_k^{-1})]`` of shape (n, K).

        Identical to scikit-learn's ``_estimate_log_prob`` when ``var`` is None;
        with point variances ``var`` it is also averaged over ``N(x, diag(var))``.
        """
        d = self.n_features
        nu = self.degrees_of_freedom
        maha = self._mahalanobis(X, var)
        # covariances = W^{-1}/nu, so maha = nu (x-m)^T W (x-m); removing
        # 0.5 d log(nu) from the log-determinant turns log|P| into log|W|.
        log_gauss = (
            -0.5 * (d * math.log(2 * math.pi) + maha)
            + self._log_det_prec_chol()
            - 0.5 * d * torch.log(nu)
        )
        ar = torch.arange(d, dtype=nu.dtype, device=nu.device)
        log_lambda = d * math.log(2.0) + torch.digamma(0.5 * (nu[None, :] - ar[:, None])).sum(0)
        return log_gauss + 0.5 * (log_lambda - d / self.mean_precision)

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
        d = self.n_features
        maha = self._mahalanobis(X)
        log_det = self._log_det_prec_chol()
        log_gauss = -0.5 * (d * math.log(2 * math.pi) + maha) + log_det
        return log_gauss + torch.log(self.weights().clamp_min(1e-30))

    def lower_bound(self, log_resp):
        """scikit-learn's variational lower bound (constants dropped)."""
        d = self.n_features
        nu = self.degrees_of_freedom
        log_det = self._log_det_prec_chol() - 0.5 * d * torch.log(nu)
        ar = torch.arange(d, dtype=nu.dtype, device=nu.device)
        log_wishart = -(
            nu * log_det
            + nu * d * 0.5 * math.log(2.0)
            + torch.lgamma(0.5 * (nu[None, :] - ar[:, None])).sum(0)
        ).sum()
        a, b = self.weight_concentration
        betaln = torch.lgamma(a) + torch.lgamma(b) - torch.lgamma(a + b)
        log_norm_weight = -betaln.sum()
        resp = log_resp.exp()
        entropy = -(resp * log_resp).sum()
        return entropy - log_wishart - log_norm_weight - 0.5 * d * torch.log(self.mean_precision).sum()

    # ------------------------------------------------------------ full fit
    @torch.no_grad()
    def fit(self, X, resp=None, *, generator=None, var=None, max_iter=100, tol=1e-3,
            set_priors=True):
        """Coordinate-ascent fit (scikit-learn's algorithm) on fixed data.

        Parameters
        ----------
        X : Tensor of shape (n, d)
        resp : Tensor of shape (n, K), optional
            Initial responsibilities; by default hard k-means++/Lloyd labels
            (like sklearn's ``init_params='kmeans'``), which need ``generator``.
        generator : torch.Generator, optional
        var : Tensor of shape (n, d), optional
            Per-point variances.
        max_iter : int, default=100
        tol : float, default=1e-3
        set_priors : bool, default=True
            Recompute the data-dependent priors from ``X``.

        Returns
        -------
        n_iter : int
            Iterations run; ``self.converged`` and ``self.lower_bound_value``
            are set.
        """
        if set_priors:
            self.set_priors(X, var)
        if resp is None:
            labels = kmeans_plusplus_labels(X, self.n_components, generator)
            resp = torch.nn.functional.one_hot(labels, self.n_components).to(X.dtype)
        self.update(X, resp, var)
        lower = -math.inf
        self.converged = False
        n_iter = 0
        for n_iter in range(1, max_iter + 1):
            previous = lower
            _, log_resp = self.log_resp(X, var)
            self.update(X, log_resp.exp(), var)
            lower = float(self.lower_bound(log_resp))
            if abs(lower - previous) < tol:
                self.converged = True
                break
        self.lower_bound_value = lower
        return n_iter
