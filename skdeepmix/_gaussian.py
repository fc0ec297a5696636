"""Log-space Gaussian densities and Gaussian-mixture statistics, in torch.

All numerics of the package's Gaussian densities live here, in two sections:

* full / tied / diag / spherical Gaussians in scikit-learn's parametrisation
  (upper-triangular Cholesky factors of the precisions, ``precision = P Pᵀ``)
  and the chunked sufficient statistics of EM (accumulated *centred*, never as
  ``E[x²] − E[x]²`` around the origin, so that float32 cannot produce negative
  variances), used by ``GaussianMixture`` and the deep models;
* mixtures of factor analysers (MFA), ``Σ = A Aᵀ + diag(d)`` in the Woodbury
  form, used by CPMM.

Every function takes and returns tensors; shapes follow scikit-learn.
"""

from __future__ import annotations

import collections
import copy
import math

import torch

__all__ = [
    "LOG_2PI",
    "COVARIANCE_TYPES",
    "covariance_shape",
    "precision_cholesky_from_covariances",
    "precision_cholesky_from_precisions",
    "precisions_from_cholesky",
    "covariances_from_cholesky",
    "log_det_cholesky",
    "log_gaussian_prob",
    "normalize_log_prob",
    "sample_gaussian",
    "SufficientStatistics",
    "MixturePass",
    "EXPANSION_TOLERANCE",
    "blend_moments",
    "moments_from_parameters",
    "parameters_from_moments",
    "weighted_data_moments",
    "WEIGHT_PRIOR_TYPES",
    "weight_concentration_posterior",
    "expected_log_weights",
    "mixture_weights",
    "normal_wishart_posterior",
    "expected_log_gaussian_prob",
    "expected_log_gaussian_offsets",
    "log_wishart_norm",
    "log_dirichlet_norm",
    "variational_lower_bound",
    "mfa_log_prob",
    "mfa_log_prob_unchecked",
    "mfa_sample",
    "mfa_covariances",
]

# ============================================================================
# Gaussians in scikit-learn's parametrisation (full / tied / diag / spherical)
# ============================================================================
COVARIANCE_TYPES = ("full", "tied", "diag", "spherical")
LOG_2PI = math.log(2.0 * math.pi)
LOG2_E = 1.0 / math.log(2.0)

_ILL_DEFINED = (
    "Fitting the mixture model failed because some components have ill-defined "
    "empirical covariance (for instance caused by singleton or collapsed samples). "
    "Try to decrease the number of components, increase reg_covar, or scale the "
    "input data."
)


def covariance_shape(covariance_type, n_components, n_features):
    """Shape of ``covariances_``/``precisions_`` for a covariance type."""
    return {
        "full": (n_components, n_features, n_features),
        "tied": (n_features, n_features),
        "diag": (n_components, n_features),
        "spherical": (n_components,),
    }[covariance_type]


def _ill_defined_error(dtype):
    message = _ILL_DEFINED
    if dtype == torch.float32:
        message += " The accuracy can also be improved with dtype='float64'."
    return ValueError(message)


def precision_cholesky_from_covariances(covariances, covariance_type,
                                        return_covariances=False):
    """Upper-triangular Cholesky factors of the precisions from covariances.

    Parameters
    ----------
    covariances : Tensor
        ``(K, d, d)`` full, ``(d, d)`` tied, ``(K, d)`` diag, ``(K,)`` spherical.
    covariance_type : {'full', 'tied', 'diag', 'spherical'}
    return_covariances : bool, default=False
        Whether to return the covariances factorised too (see the Notes).

    Returns
    -------
    precisions_cholesky : Tensor of the same shape
        ``P`` with ``precision = P @ P.T`` (full/tied), or ``1 / sqrt(cov)``.
    covariances : Tensor of the same shape
        Only with ``return_covariances``: the inverse of ``P @ P.T``.

    Raises
    ------
    ValueError
        If a covariance is not positive definite, naming the remedies.

    Notes
    -----
    In float32 (or narrower) a 'full'/'tied' covariance whose smallest
    eigenvalue is below the rounding of its entries, about ``d eps`` times
    its largest variance (a component collapsed onto fewer rows than
    features, held at ``reg_covar``), may round to an indefinite matrix. Such
    a covariance gets the least ``eps 2^i max_j Sigma_jj`` (up to ``4 d eps
    max_j Sigma_jj``, the scale of that rounding) added to its diagonal that
    makes it positive definite, instead of failing; only one that is not
    positive definite even then raises. float64 never needs it.
    """
    if covariance_type in ("full", "tied"):
        cov_chol, info = torch.linalg.cholesky_ex(covariances)
        if bool((info != 0).any()) and torch.finfo(covariances.dtype).bits <= 32:
            covariances, cov_chol, info = _within_rounding(covariances, info)
        if bool((info != 0).any()):
            raise _ill_defined_error(covariances.dtype)
        eye = torch.eye(
            covariances.shape[-1], dtype=covariances.dtype, device=covariances.device
        ).expand_as(cov_chol)
        inverse = torch.linalg.solve_triangular(cov_chol, eye, upper=False)
        chol = inverse.transpose(-1, -2)
    else:
        if bool((covariances <= 0).any()):
            raise _ill_defined_error(covariances.dtype)
        chol = covariances.rsqrt()
    return (chol, covariances) if return_covariances else chol


def _within_rounding(covariances, info):
    """The covariances (..., d, d) whose Cholesky factorisation failed
    (``info`` nonzero) with ``eps 2^i max_j Sigma_jj`` added to their
    diagonal, the least ``2^i <= 4 d`` that lets it succeed (see
    :func:`precision_cholesky_from_covariances`).

    Returns
    -------
    covariances, cov_chol, info : Tensor
        As ``torch.linalg.cholesky_ex`` of the adjusted covariances.
    """
    d, eps = covariances.shape[-1], torch.finfo(covariances.dtype).eps
    eye = torch.eye(d, dtype=covariances.dtype, device=covariances.device)
    scale = eps * torch.diagonal(covariances, dim1=-2, dim2=-1).amax(-1)
    adjusted, cov_chol, factor = covariances, None, 1.0
    shift = torch.zeros_like(scale)
    while bool((info != 0).any()) and factor <= 4 * d:
        shift = torch.where(info != 0, factor * scale, shift)
        adjusted = covariances + shift[..., None, None] * eye
        cov_chol, info = torch.linalg.cholesky_ex(adjusted)
        factor *= 2.0
    return adjusted, cov_chol, info


def precision_cholesky_from_precisions(precisions, covariance_type):
    """Upper-triangular ``P`` with ``precision = P Pᵀ`` (or ``sqrt`` for diag)."""
    if covariance_type in ("full", "tied"):
        flipped = precisions.flip(-1, -2)
        return torch.linalg.cholesky(flipped).flip(-1, -2)
    return precisions.sqrt()


def precisions_from_cholesky(precisions_cholesky, covariance_type):
    """``P Pᵀ`` (full/tied) or ``P²`` (diag/spherical)."""
    if covariance_type in ("full", "tied"):
        return precisions_cholesky @ precisions_cholesky.transpose(-1, -2)
    return precisions_cholesky.square()


def covariances_from_cholesky(precisions_cholesky, covariance_type):
    """Covariances from precision Cholesky factors (inverse of ``P Pᵀ``)."""
    if covariance_type in ("full", "tied"):
        eye = torch.eye(
            precisions_cholesky.shape[-1],
            dtype=precisions_cholesky.dtype,
            device=precisions_cholesky.device,
        ).expand_as(precisions_cholesky)
        # precision = P P^T, so cov = P^-T P^-1 (P upper triangular)
        inverse = torch.linalg.solve_triangular(precisions_cholesky, eye, upper=True)
        return inverse.transpose(-1, -2) @ inverse
    return precisions_cholesky.square().reciprocal()


def log_det_cholesky(precisions_cholesky, covariance_type, n_features):
    """``log det P`` per component (a scalar for tied), ``= -½ log det Σ``."""
    if covariance_type == "full":
        return torch.diagonal(precisions_cholesky, dim1=-2, dim2=-1).log().sum(-1)
    if covariance_type == "tied":
        return torch.diagonal(precisions_cholesky).log().sum()
    if covariance_type == "diag":
        return precisions_cholesky.log().sum(-1)
    return n_features * precisions_cholesky.log()


def log_gaussian_prob(X, means, precisions_cholesky, covariance_type, center=None,
                      X_var=None):
    """Log-density of each sample under each Gaussian component.

    Parameters
    ----------
    X : Tensor of shape (n_samples, n_features)
    means : Tensor of shape (n_components, n_features)
    precisions_cholesky : Tensor
        As returned by :func:`precision_cholesky_from_covariances`:
        ``(K, d, d)`` full, ``(d, d)`` tied, ``(K, d)`` diag, ``(K,)`` spherical.
    covariance_type : {'full', 'tied', 'diag', 'spherical'}
    center : Tensor of shape (n_features,), optional
        A point subtracted from ``X`` and ``means`` first. The result is the
        same; it keeps the expanded squares of diag/spherical accurate in
        float32 when the data are far from the origin.
    X_var : Tensor of shape (n_samples, n_features), optional
        Per-sample variances: the result is then the *expected* log-density
        ``E[log N(x; mu_k, Sigma_k)]`` under ``x ~ N(X, diag(X_var))`` (e.g. a
        VAE posterior), which adds ``sum_d X_var_d (Sigma_k^-1)_dd / 2``.

    Returns
    -------
    log_prob : Tensor of shape (n_samples, n_components)

    Notes
    -----
    'full' and 'tied' use ``O(n_samples · n_components · n_features)`` memory:
    call this on row chunks.
    """
    n_samples, n_features = X.shape
    n_components = means.shape[0]
    if center is not None:
        X = X - center
        means = means - center
    log_det = log_det_cholesky(precisions_cholesky, covariance_type, n_features)
    if covariance_type == "full":
        projected = X @ precisions_cholesky.permute(1, 0, 2).reshape(n_features, -1)
        projected_means = torch.einsum("kd,kde->ke", means, precisions_cholesky)
        diff = projected.view(n_samples, n_components, n_features) - projected_means
        mahalanobis = _sum_of_squares(diff)
    elif covariance_type == "tied":
        diff = (X @ precisions_cholesky)[:, None, :] - (means @ precisions_cholesky)
        mahalanobis = _sum_of_squares(diff)
    elif covariance_type == "diag":
        precisions = precisions_cholesky.square()
        mahalanobis = (
            (means.square() * precisions).sum(1)
            - 2.0 * X @ (means * precisions).T
            + X.square() @ precisions.T
        )
    else:
        precisions = precisions_cholesky.square()
        mahalanobis = (
            means.square().sum(1) * precisions
            - 2.0 * (X @ means.T) * precisions
            + X.square().sum(1, keepdim=True) * precisions
        )
    mahalanobis = mahalanobis.clamp_min(0.0)
    if X_var is not None:
        mahalanobis = mahalanobis + X_var @ _precision_diagonals(
            precisions_cholesky, covariance_type, n_components, n_features
        ).T
    return -0.5 * (n_features * LOG_2PI + mahalanobis) + log_det


def _sum_of_squares(diff):
    """``(diff ** 2).sum(-1)``, squaring in place when no gradient is needed."""
    if torch.is_grad_enabled() and diff.requires_grad:
        return diff.square().sum(-1)
    return diff.mul_(diff).sum(-1)


def _precision_diagonals(precisions_cholesky, covariance_type, n_components, n_features):
    """Diagonals of the precision matrices, shape (n_components, n_features)."""
    if covariance_type == "full":
        return precisions_cholesky.square().sum(-1)
    if covariance_type == "tied":
        return precisions_cholesky.square().sum(-1).expand(n_components, n_features)
    if covariance_type == "diag":
        return precisions_cholesky.square()
    return precisions_cholesky.square()[:, None].expand(n_components, n_features)


def sample_gaussian(means, precisions_cholesky, covariance_type, labels, generator):
    """One draw from component ``labels[i]`` for every ``i``.

    Parameters
    ----------
    means : Tensor of shape (n_components, n_features)
    precisions_cholesky : Tensor
        As in :func:`log_gaussian_prob`.
    covariance_type : {'full', 'tied', 'diag', 'spherical'}
    labels : LongTensor of shape (n_samples,)
    generator : torch.Generator

    Returns
    -------
    X : Tensor of shape (n_samples, n_features)
    """
    noise = torch.randn(
        labels.shape[0], means.shape[1], generator=generator, device=means.device,
        dtype=means.dtype,
    )
    if covariance_type == "diag":
        return means[labels] + noise / precisions_cholesky[labels]
    if covariance_type == "spherical":
        return means[labels] + noise / precisions_cholesky[labels, None]
    # x - mu = P^-T z, since precision = P P^T with P upper triangular; one
    # triangular solve per component (no (n, d, d) gather)
    X = means[labels]
    for k in torch.unique(labels).tolist():
        rows = torch.nonzero(labels == k).flatten()
        factor = precisions_cholesky[k] if covariance_type == "full" else precisions_cholesky
        X[rows] += torch.linalg.solve_triangular(factor.T, noise[rows].T, upper=False).T
    return X


def normalize_log_prob(weighted_log_prob):
    """Log-normaliser and responsibilities of ``log p(x, k)`` with one ``exp``.

    Parameters
    ----------
    weighted_log_prob : Tensor of shape (n_samples, n_components)

    Returns
    -------
    log_prob_norm : Tensor of shape (n_samples,)
        ``logsumexp`` over the components.
    resp : Tensor of shape (n_samples, n_components)
        ``exp(weighted_log_prob - log_prob_norm)``.
    """
    peak = weighted_log_prob.amax(1, keepdim=True)
    peak = torch.where(torch.isfinite(peak), peak, torch.zeros_like(peak))
    resp = (weighted_log_prob - peak).exp_()
    total = resp.sum(1, keepdim=True)
    resp /= total
    return (total.log_() + peak).squeeze(1), resp


def _sum_dtype(tensor):
    """dtype of accumulated scalar sums: float64 where the device has it."""
    return torch.float32 if tensor.device.type == "mps" else torch.float64


class SufficientStatistics:
    """Chunk-wise accumulator of a mixture's (weighted) EM sufficient statistics.

    Sums are kept relative to reference points so that no large cancelling
    terms appear: first moments around ``center`` (a point near the data, e.g.
    the current mixture mean) and, for 'full', second moments around the
    per-component ``reference_means`` (the current means); :meth:`add` centres
    the 'diag'/'spherical' second moments on ``center`` (a caller that adds
    its own sums may centre component ``k``'s on ``center + reference[k]``).
    What cancellation remains is measured by :meth:`mixture_parameters`; when
    it lost too many digits (:func:`cancellation_limit`) the second moments of
    the components concerned are redone exactly centred on the new means
    (:meth:`add_exact`).
    :meth:`accumulate` runs both passes.

    Rows may carry weights (``sample_weight``: a row of weight 2 counts as
    two copies of it) and variances (``X_var``: the row is the Gaussian
    ``N(x, diag(X_var))``, e.g. a VAE posterior, whose second moments
    include ``X_var``).

    Parameters
    ----------
    covariance_type : {'full', 'tied', 'diag', 'spherical'}
    reference_means : Tensor of shape (n_components, n_features)
    center : Tensor of shape (n_features,)

    Attributes
    ----------
    weight_sum, log_prob_sum, resp_log_resp_sum : 0-d Tensor
        ``sum_i w_i``, ``sum_i w_i log p(x_i)`` and
        ``sum_i w_i sum_k r_ik log r_ik`` (float64 where the device has it).
    reference : Tensor of shape (n_components, n_features)
        Where each component's second moments are centred, relative to
        ``center`` ('full': ``reference_means - center``; otherwise zeros).
    exact : bool
        Whether an exactly centred pass redid second moments.
    recentred : Tensor of shape (n_components,) of bool
        The components whose second moments it redid (all for 'tied').
    """

    def __init__(self, covariance_type, reference_means, center):
        n_components, n_features = reference_means.shape
        zeros = reference_means.new_zeros
        self.covariance_type = covariance_type
        self.center = center
        self.reference = reference_means - center if covariance_type == "full" \
            else zeros(n_components, n_features)
        self.resp_sum = zeros(n_components)
        self.first = zeros(n_components, n_features)
        self.second = zeros(*_second_moment_shape(covariance_type, n_components, n_features))
        scalar = dict(dtype=_sum_dtype(center), device=center.device)
        self.weight_sum = torch.zeros((), **scalar)
        self.log_prob_sum = torch.zeros((), **scalar)
        self.resp_log_resp_sum = torch.zeros((), **scalar)
        self.exact = False
        self.recentred = torch.zeros(n_components, dtype=torch.bool, device=center.device)

    def add(self, X, resp, *, sample_weight=None, X_var=None, log_prob_norm=None,
            log_resp=None):
        """Add rows ``X`` (n, d) with responsibilities ``resp`` (n, K).

        Parameters
        ----------
        X : Tensor of shape (n, d)
        resp : Tensor of shape (n, K)
            Rows sum to one.
        sample_weight : Tensor of shape (n,), optional
        X_var : Tensor of shape (n, d), optional
            Per-row variances.
        log_prob_norm : Tensor of shape (n,), optional
            ``log p(x_i)``, summed (weighted) into ``log_prob_sum``.
        log_resp : Tensor of shape (n, K), optional
            ``log r_ik``, for ``resp_log_resp_sum`` (the entropy term of a
            variational bound).
        """
        Xc = X - self.center
        scalar = self.weight_sum.dtype
        if sample_weight is None:
            self.weight_sum += X.shape[0]
            if log_prob_norm is not None:
                self.log_prob_sum += log_prob_norm.sum().to(scalar)
        else:
            resp = resp * sample_weight[:, None]
            self.weight_sum += sample_weight.sum().to(scalar)
            if log_prob_norm is not None:
                self.log_prob_sum += (sample_weight @ log_prob_norm).to(scalar)
        if log_resp is not None:
            floor = torch.finfo(log_resp.dtype).min  # 0 * -inf must count as 0
            self.resp_log_resp_sum += (resp * log_resp.clamp_min(floor)).sum().to(scalar)
        self.resp_sum += resp.sum(0)
        self.first += resp.T @ Xc
        if self.covariance_type == "full":
            # one (d, n) @ (n, d) product per component: cache-friendly, no (K, n, d)
            for k in range(resp.shape[1]):
                centred = Xc - self.reference[k]
                self.second[k].addmm_((centred * resp[:, k : k + 1]).T, centred)
        elif self.covariance_type == "tied":
            self.second.addmm_((Xc * resp.sum(1, keepdim=True)).T, Xc)
        else:
            self.second += resp.T @ Xc.square()
        self._add_variances(resp, X_var)

    def add_exact(self, X, resp, means, *, sample_weight=None, X_var=None, components=None):
        """Add second moments of rows ``X`` exactly centred on ``means``
        (the arguments as in :meth:`add`), of the ``components`` (a list of
        indices; all by default)."""
        if sample_weight is not None:
            resp = resp * sample_weight[:, None]
        if components is None or self.covariance_type == "tied":
            components = range(resp.shape[1])
        for k in components:
            centred = X - means[k]
            weighted = centred * resp[:, k : k + 1]
            if self.covariance_type == "full":
                self.second[k].addmm_(weighted.T, centred)
            elif self.covariance_type == "tied":
                self.second.addmm_(weighted.T, centred)
            else:
                self.second[k] += (weighted * centred).sum(0)
        self._add_variances(resp, X_var)

    def _add_variances(self, resp, X_var):
        """Second moments of the rows' own Gaussians: ``diag(sum_i r_ik X_var_i)``."""
        if X_var is None:
            return
        if self.covariance_type == "full":
            torch.diagonal(self.second, dim1=1, dim2=2).add_(resp.T @ X_var)
        elif self.covariance_type == "tied":
            torch.diagonal(self.second).add_(resp.sum(1) @ X_var)
        else:
            self.second += resp.T @ X_var

    def reduce(self, partition, second_only=False):
        """Sum the statistics over the processes of a distributed fit
        (:class:`~skdeepmix._distributed.RowPartition`; no-op for one)."""
        if partition is None or not partition.active:
            return self
        if second_only:
            partition.sum(self.second)
        else:
            partition.sum(self.resp_sum, self.first, self.second, self.weight_sum,
                          self.log_prob_sum, self.resp_log_resp_sum)
        return self

    def accumulate(self, batches, reg_covar, partition=None):
        """Both passes over the rows: the statistics, then (only when the
        centred sums lost too many digits) exactly centred second moments.

        Parameters
        ----------
        batches : callable
            ``batches(exact)`` returns an iterable of dicts of keyword
            arguments: for :meth:`add` (``exact=False``: ``X``, ``resp`` and
            optionally ``sample_weight``, ``X_var``, ``log_prob_norm``,
            ``log_resp``), then for :meth:`add_exact` (``exact=True``: ``X``,
            ``resp``, optionally ``sample_weight``, ``X_var``).
        reg_covar : float
        partition : RowPartition, optional
            The statistics are summed over its processes.

        Returns
        -------
        nk, means, covariances : Tensor
            As :meth:`mixture_parameters`.
        """
        for batch in batches(False):
            self.add(**batch)

        def exact_pass(means, components):
            for batch in batches(True):
                self.add_exact(means=means, components=components, **batch)

        return self.finalize(reg_covar, partition, exact_pass)

    def finalize(self, reg_covar, partition, exact_pass, in_use=None, whitened=None):
        """The parameters once the first pass is added: sums over the
        processes, then, only when the centred sums lost too many digits
        (:func:`cancellation_limit`) or left a 'full'/'tied' covariance in use
        that is not positive definite (a near-singular one, e.g. of a
        component collapsing onto a few rows), ``exact_pass(means, components)``
        (which must :meth:`add_exact` every row around the new ``means``, for
        those components): only the components that need it are redone.

        Parameters
        ----------
        reg_covar : float
        partition : RowPartition or None
        exact_pass : callable
        in_use : callable, optional
            ``in_use(nk, means, covariances)``: the covariances the model
            will use (e.g. a posterior that adds a prior), whose positive
            definiteness is checked; by default ``covariances`` themselves.
        whitened : Tensor of shape (n_components,) of bool, optional
            Components whose second moments were summed from the differences
            to their means, whitened (the exact components of a
            :class:`MixturePass`). A second pass sums less precisely than
            that, so one of them that is not positive definite is not redone
            for it (:func:`precision_cholesky_from_covariances` decides).

        Returns
        -------
        nk, means, covariances : Tensor
            As :meth:`mixture_parameters`.
        """
        self.reduce(partition)
        nk, means, covariances, rounding = self.mixture_parameters(reg_covar)
        if self.exact:
            return nk, means, covariances
        used = covariances if in_use is None else in_use(nk, means, covariances)
        # rounding lost too much, or broke a near-singular covariance
        indefinite = ~_positive_definite(used, self.covariance_type)
        if whitened is not None:
            indefinite &= ~whitened
        redo = (self._loss_of_precision(rounding, used, nk, means, in_use)
                >= cancellation_limit(self.first.dtype)) | indefinite
        if self.covariance_type == "tied":
            redo = redo.any().expand_as(self.recentred)
        if bool(redo.any()):
            kept = self.second.clone()
            self.second.zero_()
            self.exact, self.recentred = True, redo  # also on a process without rows
            exact_pass(means, torch.nonzero(redo).flatten().tolist())
            self.reduce(partition, second_only=True)
            if self.covariance_type != "tied":  # the others' sums were fine
                self.second[~redo] = kept[~redo]
            nk, means, covariances, _ = self.mixture_parameters(reg_covar)
        return nk, means, covariances

    def mixture_parameters(self, reg_covar):
        """Component sizes, means and covariances, as scikit-learn computes them.

        Parameters
        ----------
        reg_covar : float

        Returns
        -------
        nk : Tensor of shape (K,)
            ``Σ_i w_i resp_ik + 10 eps`` (scikit-learn's convention).
        means : Tensor of shape (K, d)
        covariances : Tensor
            Shape given by :func:`covariance_shape`, ``reg_covar`` added.
        rounding : Tensor
            The raw second moments' diagonal (the variances' rounding error is
            about ``eps`` times it), shape (K, d), (d,) for 'tied', (K,) for
            'spherical'.
        """
        eps = torch.finfo(self.first.dtype).eps
        nk = self.resp_sum + 10 * eps
        means_c = self.first / nk[:, None]
        n_features = means_c.shape[1]
        exact = self.recentred
        if self.covariance_type == "full":
            raw = self.second / nk[:, None, None]
            delta = means_c - self.reference
            cov = torch.where(exact[:, None, None], raw,
                              raw - delta[:, :, None] * delta[:, None, :])
            raw_diag = torch.diagonal(raw, dim1=1, dim2=2)
        elif self.covariance_type == "tied":
            raw = self.second / nk.sum()
            cov = raw if self.exact else raw - (nk[:, None] * means_c).T @ means_c / nk.sum()
            raw_diag = torch.diagonal(raw)
        else:
            raw = self.second / nk[:, None]
            cov = torch.where(exact[:, None], raw, raw - (means_c - self.reference).square())
            raw_diag = raw.mean(1) if self.covariance_type == "spherical" else raw
        if self.covariance_type in ("full", "tied"):
            cov = cov + reg_covar * torch.eye(n_features, dtype=cov.dtype, device=cov.device)
        else:
            cov = cov + reg_covar
            if self.covariance_type == "spherical":
                cov = cov.mean(1)
        return nk, means_c + self.center, cov, raw_diag

    def _loss_of_precision(self, rounding, used, nk, means, in_use):
        """Largest ratio of the rounding scale of the data's variances to the
        variances in use (through ``in_use``, affine in the data's
        covariances, e.g. a posterior where the prior outweighs a near-empty
        component): rounding lost about ``log10`` of it in digits. One per
        component, shape (n_components,) (one for 'tied')."""
        kind, error = self.covariance_type, rounding
        if in_use is not None:
            as_covariance = torch.diag_embed(rounding) if kind in ("full", "tied") else rounding
            error = _variances(in_use(nk, means, as_covariance)
                               - in_use(nk, means, torch.zeros_like(as_covariance)), kind)
        kept = _variances(used, kind)
        loss = torch.where(kept > 0, error / kept, torch.inf)
        return loss.amax(-1) if loss.dim() > 1 or kind == "tied" else loss


#: quadratic feature columns of a MixturePass, by covariance type
_N_QUADRATIC = {"full": lambda d: d * (d + 1) // 2, "tied": lambda d: d,
                "diag": lambda d: d, "spherical": lambda d: 1}

#: rounding error (nats) of an expanded log-density above which a component
#: is computed from differences (see :class:`MixturePass`)
EXPANSION_TOLERANCE = 1e-2


class MixturePass:
    """One EM pass over row chunks: the E-step fused with the statistics.

    The log-densities of all the components come from one matrix product of
    per-row features of ``z = x - center`` with per-component coefficients,
    and the sufficient statistics from one product of the same features with
    the responsibilities:

    * 'full': features ``[z_i z_j (i <= j), 1, z]``, in which
      ``log N(x; mu_k, Lambda_k^-1) = -½ zᵀ Lambda_k z + zᵀ Lambda_k a_k
      - ½ a_kᵀ Lambda_k a_k + const`` (``a_k = mu_k - center``) is linear, and
      ``resp @ features`` holds the counts, first and (symmetric) second
      moments at once. The products are formed per shift ``s``,
      ``z_i z_(i+s mod d)``, in one broadcast operation;
    * 'diag': ``[z², 1, z]``; 'spherical': ``[|z|², 1, z]``;
    * 'tied': the whitened ``y = z P`` give ``y · b_k - ½|b_k|²``
      (``b_k = a_k P``; ``-½|y|²`` is common to all the components), and
      the second moments are ``sum_i w_i z_i z_iᵀ``.

    Responsibilities are kept as (n_components × rows), so that the maximum
    and the sum over the components reduce over the outer dimension.
    ``exp(x)`` is taken as ``exp2(x log2 e)`` (2-3 times faster on CPUs); it
    never sees numbers that would give denormals (several times slower):
    log-densities more than about 85 (float32) below a row's maximum are
    raised to that floor, a change below the float's resolution. Nothing is
    read back to the host per chunk.

    Precision. Expanded around ``center``, the log-density of component ``k``
    rounds to about ``eps (|a_k|ᵀ|Lambda_k||a_k| + d)`` nats, and its second
    moments cancel ``max_j (a_kj² + Sigma_k,jj) / Sigma_k,jj`` (the
    squared distance to the center in units of the component's width). The
    components for which the first exceeds :data:`EXPANSION_TOLERANCE` or the
    second ``1 / (2 sqrt(eps))`` (tight components far from the center: in
    float64 only degenerate ones, at ``reg_covar``) are computed from the
    differences ``x - mu_k`` instead: their log-densities, and their second
    moments centred on ``mu_k`` ('full', 'diag', 'spherical'). The others'
    second moments are centred on ``center``; :meth:`finalize` measures what
    that lost and, for the components that lost more than half the digits,
    redoes them exactly centred on the new means (a second pass). On the CPU,
    the 'full', 'diag' and 'spherical' components computed from differences
    are computed only on the rows they can reach, within the floor of a row's
    largest log-density (:meth:`_competitive_exact_log_prob`): such components
    are tight, so these are few rows.

    Parameters
    ----------
    covariance_type : {'full', 'tied', 'diag', 'spherical'}
    center : Tensor of shape (n_features,)
        A point near the data.
    n_components : int
    means : Tensor of shape (n_components, n_features), optional
        The model of the E-step; without it :meth:`add` takes the
        responsibilities.
    precisions_cholesky : Tensor, optional
        As in :func:`log_gaussian_prob`.
    log_offsets : Tensor of shape (n_components,), optional
        Added to the log-densities: ``log p(x, k) = log N(x; mu_k, ...) +
        log_offsets[k]`` (the log-weights, for instance).
    entropy : bool, default=False
        Whether to accumulate ``sum_i w_i sum_k r_ik log r_ik``.

    Attributes
    ----------
    exact_components : list of int
        The components computed from differences.
    stats : SufficientStatistics
        The sums, complete after :meth:`finalize`.
    """

    def __init__(self, covariance_type, center, n_components, *, means=None,
                 precisions_cholesky=None, log_offsets=None, entropy=False):
        d = center.shape[0]
        self.covariance_type = covariance_type
        self.entropy = entropy
        self.center, self.means, self.precisions_cholesky = center, means, precisions_cholesky
        self.log_offsets = log_offsets
        self._rows_only = False
        self.exact_components = [] if means is None else _imprecise_components(
            means - center, precisions_cholesky, covariance_type)
        self._exact = torch.tensor(self.exact_components, dtype=torch.long,
                                   device=center.device)
        self._groups, self._all_exact = [], None  # of exact components (set with the model)
        # feature columns: [quadratic (y for 'tied'), 1, z] (+ a copy of z for 'full')
        self._ones_column = _N_QUADRATIC[covariance_type](d)
        self._n_features = self._ones_column + 1 + d
        first = d if covariance_type == "tied" else 0  # the statistics skip y
        self._sum_columns = slice(first, self._n_features)
        self._empty_sums(n_components)
        if covariance_type == "full":
            self._pairs = _circulant_pairs(d, center.device)
        if means is not None:
            d_log = -0.5 * d * LOG_2PI + log_det_cholesky(precisions_cholesky, covariance_type, d)
            self._constants = d_log + log_offsets  # log p(x, k) at x = mu_k
            self._coefficients = self._log_prob_coefficients()
            if self.exact_components:
                # groups whose (rows, group, d) temporaries fit in about the
                # feature buffer of a chunk
                size = max(1, self.n_columns(covariance_type, d) // (3 * d))
                self._groups = [self._exact_group(slice(start, start + size))
                                for start in range(0, len(self.exact_components), size)]
                self._all_exact = self._exact_group(slice(None))
            self._rows_only = self._competitive_rows_setup()

    def _empty_sums(self, n_components):
        """Start the sums (and the scratch buffers) from zero."""
        center, d = self.center, self.center.shape[0]
        self.stats = SufficientStatistics(self.covariance_type,
                                          center.expand(n_components, d), center)
        if self.exact_components and self.covariance_type != "tied":
            exact = self._exact
            self.stats.reference[exact] = (self.means - center)[exact]
            # summed whitened: the rounding is relative to each direction's
            # variance, so that a near-singular covariance stays positive definite
            self._exact_second = self.stats.second[exact].clone()
        self._n_rows = 0
        self._buffers = {}
        self._sums = center.new_zeros(n_components, self._n_features - self._sum_columns.start)

    def replica(self):
        """A pass with the same model and empty sums, to add other rows on
        another thread; :meth:`merge` adds its sums back."""
        other = copy.copy(self)
        other._empty_sums(self._sums.shape[0])
        return other

    def merge(self, other):
        """Add the sums of ``other`` (a :meth:`replica` of this pass)."""
        self._sums += other._sums
        self._n_rows += other._n_rows
        for name in ("weight_sum", "log_prob_sum", "resp_log_resp_sum", "second"):
            getattr(self.stats, name).add_(getattr(other.stats, name))
        if self.exact_components and self.covariance_type != "tied":
            self._exact_second += other._exact_second

    @staticmethod
    def n_columns(covariance_type, n_features):
        """Values per row of the feature buffer (what a chunk's memory holds)."""
        d = n_features
        return _N_QUADRATIC[covariance_type](d) + 1 + d + (d if covariance_type == "full" else 0)

    # ------------------------------------------------------------ features
    def _features(self, X):
        """Features of the rows: (n, n_feature_columns) (see the class)."""
        n, d = X.shape
        buffer = self._buffers.get(n)
        if buffer is None:  # one for the chunk size, one for the last chunk
            extra = d if self.covariance_type == "full" else 0
            buffer = self._buffers[n] = self.center.new_empty(n, self._n_features + extra)
            buffer[:, self._ones_column] = 1.0
        z = buffer[:, self._ones_column + 1:self._n_features]
        torch.sub(X, self.center, out=z)
        kind = self.covariance_type
        if kind == "full":  # z_i z_(i+s mod d): column i of block s, read from [z, z]
            buffer[:, self._n_features:] = z
            n_full, half = d // 2 + d % 2, d // 2 if d % 2 == 0 else 0
            shifted = z.as_strided((n, n_full, d), (buffer.stride(0), 1, 1))
            torch.mul(z[:, None, :], shifted,
                      out=buffer[:, :n_full * d].unflatten(1, (n_full, d)))
            if half:
                torch.mul(z[:, :half], z[:, half:], out=buffer[:, n_full * d:n_full * d + half])
        elif kind == "diag":
            torch.square(z, out=buffer[:, :d])
        elif kind == "spherical":
            torch.sum(z.square(), 1, keepdim=True, out=buffer[:, :1])
        elif self.means is not None:  # tied: whitened rows y = z P
            torch.mm(z, self.precisions_cholesky, out=buffer[:, :d])
        return buffer[:, :self._n_features]

    def _exact_group(self, positions):
        """The exact components ``positions`` (a slice of them), with what
        :meth:`_whitened` needs of their parameters."""
        indices = self._exact[positions]
        P, kind = self.precisions_cholesky, self.covariance_type
        if kind == "tied":
            whitening = P
        elif kind == "full":
            whitening = P[indices]
        else:  # broadcast against (g, n, d)
            whitening = P[indices, None, :] if kind == "diag" else P[indices, None, None]
        offsets = (self.means[indices] - self.center)[:, None, :]
        return _ExactGroup(positions, indices, offsets, whitening, self._constants[indices, None])

    def _whitened(self, features, group):
        """Whitened differences ``(x - mu_k) P_k`` of the rows for the exact
        components of ``group`` (an ``_ExactGroup``), shape (len(group), n, d)."""
        centred = features[:, self._ones_column + 1:] - group.offsets  # (g, n, d)
        if self.covariance_type == "full":
            return torch.bmm(centred, group.whitening)
        if self.covariance_type == "tied":
            return centred @ group.whitening
        return centred.mul_(group.whitening)

    def _log_prob_coefficients(self):
        """(n_components, columns): log-densities = ``coefficients @ featuresᵀ``."""
        P, kind = self.precisions_cholesky, self.covariance_type
        a, const = self.means - self.center, self._constants
        if kind == "full":
            precision = P @ P.transpose(-1, -2)
            i, j = self._pairs
            quadratic = precision[:, i, j] * torch.where(i == j, -0.5, -1.0).to(P.dtype)
            linear = torch.einsum("kde,ke->kd", precision, a)
            const = const - 0.5 * torch.einsum("kd,kde->ke", a, P).square().sum(1)
            return torch.cat([quadratic, const[:, None], linear], 1)
        if kind == "tied":
            whitened = a @ P  # against the columns y
            return torch.cat([whitened, (const - 0.5 * whitened.square().sum(1))[:, None]], 1)
        precision = P.square()
        if kind == "spherical":
            precision = precision[:, None].expand_as(a)
        quadratic = -0.5 * (precision if kind == "diag" else precision[:, :1])
        const = const - 0.5 * (a.square() * precision).sum(1)
        return torch.cat([quadratic, const[:, None], a * precision], 1)

    def _exact_terms(self, features, group):
        """What the exact components ``group`` need of the rows: their
        whitened differences ('full', 'tied'), or the squares of them."""
        whitened = self._whitened(features, group)
        return whitened if self.covariance_type in ("full", "tied") else whitened.square_()

    def _exact_log_prob(self, features, log_prob):
        """Set the rows of ``log_prob`` (n_components, n) of the exact
        components from their whitened differences. Those :meth:`add` needs
        again for the second moments are kept, up to the size of the chunk's
        features (the others are recomputed)."""
        self._kept = []
        room = features.numel() if self.covariance_type != "tied" else 0
        for group in self._groups:
            terms = self._exact_terms(features, group)
            squares = terms.square() if self.covariance_type in ("full", "tied") else terms
            rows = group.constants - 0.5 * squares.sum(2)
            if self.covariance_type == "tied":  # the rows' common term is added back
                rows += 0.5 * features[:, :terms.shape[2]].square().sum(1)
            log_prob[group.indices] = rows
            keep = terms.numel() <= room
            room -= terms.numel() if keep else 0
            self._kept.append(terms if keep else None)

    def _competitive_rows_setup(self):
        """Whether the exact components are computed only on the rows where
        they can matter (:meth:`_competitive_exact_log_prob`): on the CPU, for
        'full', 'diag' and 'spherical' (elsewhere on every row, with no
        data-dependent shapes and no host reads). Prepares the bound of
        :meth:`_rounding_bound`."""
        if (not self.exact_components or self.covariance_type == "tied"
                or self.center.device.type != "cpu"):
            return False
        exact, d = self._exact, self.center.shape[0]
        a = (self.means - self.center)[exact]
        eps = torch.finfo(a.dtype).eps
        if self.covariance_type == "full":
            # The expanded log-density of a row is a dot product of its m
            # rounded features with coefficients from Lambda = P Pᵀ, a_k and
            # c_k, themselves rounded to a few d eps relative to
            # M = |P| |P|ᵀ >= |Lambda|: it rounds to at most t = 4 (m + 7) eps S,
            # S the size of its terms, S <= ½ |z|ᵀ M |z| + |z|ᵀ M |a| + ½ |a|ᵀ M |a|
            # + |c_k| <= ½ R |z|² + |M |a|| |z| + ½ |a|ᵀ M |a| + |c_k|, with R
            # the largest row sum of M (which bounds its largest eigenvalue).
            P = self.precisions_cholesky[exact].abs()
            M = P @ P.transpose(1, 2)
            Ma = torch.einsum("kde,ke->kd", M, a.abs())
            scale = 4.0 * (self._n_features + 7) * eps
            self._bound_terms = tuple(scale * term[:, None] for term in (
                0.5 * M.sum(2).amax(1), Ma.norm(dim=1),
                0.5 * (a.abs() * Ma).sum(1) + self._constants[exact].abs()))
            return True
        precision = self.precisions_cholesky[exact].square()
        if self.covariance_type == "spherical":
            precision = precision[:, None]
        # The expanded log-density e_k of a row is a dot product of 2d + 1
        # rounded features and coefficients: it rounds to at most
        # t = 4 (2d + 8) eps S, S = sum p² z² + sum p² a² + |c_k| the size of
        # its terms. With sum p² z² <= 2 sum p² (z - a)² + 2 sum p² a² and
        # sum p² (z - a)² = 2 (c_k - e_k) up to t: S <= 4 |c_k - e_k| + 4 t
        # + 3 sum p² a² + |c_k|, so t <= s (4 |c_k - e_k| + B_k) with
        # s = 4 (2d + 8) eps / (1 - 16 (2d + 8) eps).
        unit = 4.0 * (2 * d + 8) * eps
        scale = unit / (1.0 - 4.0 * unit)
        self._bound_terms = (4.0 * scale, scale * (3.0 * (a.square() * precision).sum(1)
                                                   + self._constants[exact].abs())[:, None])
        return True

    def _rounding_bound(self, features, expanded):
        """How far the expanded log-densities ``expanded`` (n_exact, n) of the
        exact components may be from their true values (the bounds derived in
        :meth:`_competitive_rows_setup`), same shape."""
        if self.covariance_type == "full":  # |z|²: the features z_i z_i, the first d
            half_norm, linear, constant = self._bound_terms
            squared = features[:, :self.center.shape[0]].sum(1)
            bound = torch.addcmul(constant, half_norm, squared)
            return bound.addcmul_(linear, squared.sqrt_())
        distance_scale, constant = self._bound_terms  # s (4 |c_k - e_k| + B_k)
        distance = (self._all_exact.constants - expanded).abs_()
        return distance.mul_(distance_scale).add_(constant)

    def _competitive_exact_log_prob(self, features, log_prob, floor):
        """The exact components' log-densities on the rows where they can
        come within ``floor`` of the row's largest; elsewhere the expanded ones.

        The largest true log-density of a row is at least ``L``, the largest
        of the other components' (precise to :data:`EXPANSION_TOLERANCE`) and
        of the exact ones' expanded values less their rounding bound
        (:meth:`_rounding_bound`). A row whose expanded log-density of exact
        component ``k`` plus that bound stays below ``L`` plus the floor
        gets the floor with either value: its exact value is not needed; nor
        are its second moments, weighted by the floor's responsibility
        (``2**-126`` relative in float32). Such a component (tight, far from
        the center) reaches few rows: only the rows that some exact component
        reaches are gathered, and all the exact components computed there
        from differences (a few operations per chunk, whatever their number:
        the threads of a pass share the interpreter).

        Parameters
        ----------
        features : Tensor of shape (n, n_feature_columns)
        log_prob : Tensor of shape (n_components, n)
            The expanded log-densities; the exact components' rows are set.
        floor : float
            The floor of :meth:`_responsibilities` (relative to a row's peak).
        """
        exact = self._exact
        expanded = log_prob[exact]
        bound = self._rounding_bound(features, expanded)
        log_prob[exact] = expanded - bound  # each at most its true value
        lowest_peak = log_prob.amax(0)
        log_prob[exact] = expanded
        reach = (expanded.add_(bound) >= lowest_peak.add_(floor - 1.0)).any(0)
        rows = torch.nonzero(reach).flatten()
        self._kept = (rows, [])
        if rows.numel() == 0:  # on the CPU: no host synchronisation
            return
        reached = features[rows]
        groups = self._groups
        if rows.numel() * len(self.exact_components) * self.center.shape[0] <= features.numel():
            groups = [self._all_exact]
        for group in groups:
            terms = self._exact_terms(reached, group)
            squares = terms.square() if self.covariance_type == "full" else terms
            log_prob[group.indices[:, None], rows] = group.constants - 0.5 * squares.sum(2)
            self._kept[1].append((group, terms))

    # ------------------------------------------------------------- E-step
    def _responsibilities(self, features, entropy=False):
        """``(resp, log p(x), sum_k r_k log r_k or None)`` of the rows of
        ``features``; resp of shape (n_components, n)."""
        d = self.center.shape[0]
        n_components = self._constants.shape[0]
        floor = math.log(torch.finfo(features.dtype).tiny) + math.log(n_components) + 1.0
        if self.covariance_type == "tied":
            log_prob = self._coefficients @ features[:, :d + 1].T
        else:
            log_prob = self._coefficients @ features.T
        if self._rows_only:
            self._competitive_exact_log_prob(features, log_prob, floor)
        else:
            self._exact_log_prob(features, log_prob)
        peak = log_prob.amax(0)
        shifted = log_prob.sub_(peak).clamp_(min=floor)
        # exp(x) as exp2(x log2 e): 2-3 times faster on CPUs, even with the product
        bits = torch.mul(shifted, LOG2_E) if entropy else shifted.mul_(LOG2_E)
        resp = bits.exp2_()
        total = resp.sum(0)
        resp.div_(total)
        log_total = total.log_()
        # sum_k r log r = sum_k r (shifted - log total) (xlogy is several times slower)
        row_entropy = (resp * shifted).sum(0).sub_(log_total) if entropy else None
        log_prob_norm = log_total.add_(peak)
        if self.covariance_type == "tied":  # the term common to all components
            log_prob_norm -= 0.5 * features[:, :d].square().sum(1)
        return resp, log_prob_norm, row_entropy

    def responsibilities(self, X):
        """Responsibilities of the rows ``X``, shape (n, n_components)."""
        resp = self._responsibilities(self._features(X))[0].T
        self._kept = None
        return resp

    # --------------------------------------------------------- statistics
    def add(self, X, resp=None, sample_weight=None):
        """Add rows ``X`` (n, d): the E-step (unless ``resp`` of shape
        (n, n_components) is given), then their statistics.

        Parameters
        ----------
        X : Tensor of shape (n, d)
        resp : Tensor of shape (n, n_components), optional
            Required when the pass has no model.
        sample_weight : Tensor of shape (n,), optional
        """
        stats, wide = self.stats, self.stats.weight_sum.dtype
        features = self._features(X)
        kept = None  # what the E-step kept of the exact components (given resp: nothing)
        if resp is None:
            resp, log_prob_norm, entropy = self._responsibilities(features, self.entropy)
            kept, self._kept = self._kept, None
            if self.entropy:
                stats.resp_log_resp_sum += entropy.sum(dtype=wide) \
                    if sample_weight is None else (sample_weight @ entropy).to(wide)
            stats.log_prob_sum += log_prob_norm.sum(dtype=wide) \
                if sample_weight is None else (sample_weight @ log_prob_norm).to(wide)
        else:
            resp = resp.T
        if sample_weight is None:
            self._n_rows += X.shape[0]
        else:
            resp = resp * sample_weight
            stats.weight_sum += sample_weight.sum(dtype=wide)
        kind = self.covariance_type
        if kind == "tied":
            z = features[:, self._ones_column + 1:]
            weighted = z if sample_weight is None else z * sample_weight[:, None]
            stats.second.addmm_(weighted.T, z)
        elif self._rows_only and kept is not None:
            # the rows the exact components can reach (whitened, or their squares)
            rows, groups = kept
            for group, terms in groups:
                weights = resp[group.indices[:, None], rows]
                second = self._exact_second[group.positions]
                if kind == "full":
                    second.baddbmm_((terms * weights[:, :, None]).transpose(1, 2), terms)
                else:
                    second += torch.bmm(weights[:, None, :], terms)[:, 0]
        else:  # second moments of the exact components around their means, whitened
            if kept is None:  # given responsibilities: recomputed per group
                kept = [None] * len(self._groups)
            for group, terms in zip(self._groups, kept):
                if terms is None:
                    terms = self._exact_terms(features, group)
                weighted, second = resp[group.indices], self._exact_second[group.positions]
                if kind == "full":
                    second.baddbmm_((terms * weighted[:, :, None]).transpose(1, 2), terms)
                else:  # the squares
                    second += torch.bmm(weighted[:, None, :], terms)[:, 0]
        self._sums.addmm_(resp, features[:, self._sum_columns])

    def _unwhitened(self, whitened_second):
        """Second moments of the exact components from their whitened sums,
        ``P^-T W P^-1`` ('full') or ``W / P²``, computed in float64 where the
        device has it."""
        wide = self.stats.weight_sum.dtype
        P = self.precisions_cholesky[self._exact].to(wide)
        W = whitened_second.to(wide)
        if self.covariance_type == "full":
            eye = torch.eye(P.shape[-1], dtype=wide, device=P.device).expand_as(P)
            inverse = torch.linalg.solve_triangular(P, eye, upper=True)  # P^-1
            second = inverse.transpose(1, 2) @ W @ inverse
        else:
            second = W / (P.square() if self.covariance_type == "diag" else P[:, None].square())
        return second.to(whitened_second.dtype)

    def finalize(self, reg_covar, partition=None, exact_rows=None, in_use=None):
        """The M-step's statistics, summed over the processes of ``partition``.

        Parameters
        ----------
        reg_covar : float
        partition : RowPartition, optional
        exact_rows : callable, optional
            ``exact_rows()`` iterates over ``(X, resp, sample_weight)`` again
            (``resp`` None: the E-step's), for the exactly centred second pass
            (:meth:`SufficientStatistics.finalize`); required unless the
            pass never needs it.
        in_use : callable, optional
            As in :meth:`SufficientStatistics.finalize`.

        Returns
        -------
        nk, means, covariances : Tensor
            As :meth:`SufficientStatistics.mixture_parameters`.
        """
        stats, sums = self.stats, self._sums
        stats.weight_sum += self._n_rows
        d, kind = self.center.shape[0], self.covariance_type
        ones = self._ones_column - self._sum_columns.start
        stats.resp_sum += sums[:, ones]
        stats.first += sums[:, ones + 1:]
        quadratic = sums[:, :ones]
        if kind == "full":
            i, j = self._pairs
            stats.second[:, i, j] = quadratic
            stats.second[:, j, i] = quadratic
        elif kind == "diag":
            stats.second += quadratic
        elif kind == "spherical":  # each feature: the mean of |z|² / d
            stats.second += quadratic / d
        if self.exact_components and kind != "tied":
            stats.second[self._exact] = self._unwhitened(self._exact_second)

        def exact_pass(means, components):
            for X, resp, sample_weight in exact_rows():
                resp = self.responsibilities(X) if resp is None else resp
                stats.add_exact(X, resp, means, sample_weight=sample_weight,
                                components=components)

        whitened = None
        if self.exact_components and kind != "tied":
            whitened = torch.zeros_like(stats.recentred)
            whitened[self._exact] = True
        return stats.finalize(reg_covar, partition, exact_pass, in_use, whitened)


#: exact components of a MixturePass computed together: their positions (a
#: slice of ``exact_components``), indices, ``means - center`` (g, 1, d),
#: whitening factors (broadcast against the (g, n, d) differences) and
#: log-densities at their means (g, 1)
_ExactGroup = collections.namedtuple("_ExactGroup",
                                     "positions indices offsets whitening constants")


def _circulant_pairs(n_features, device):
    """Index pairs ``(i, (i + s) mod d)`` of the 'full' features, in their order:
    every unordered pair once."""
    d = n_features
    n_full, half = d // 2 + d % 2, d // 2 if d % 2 == 0 else 0
    columns = torch.arange(d, device=device)
    i = torch.cat([columns.repeat(n_full), columns[:half]])
    shift = torch.cat([torch.arange(n_full, device=device).repeat_interleave(d),
                       torch.full((half,), half, device=device, dtype=torch.long)])
    return i, (i + shift) % d


def _imprecise_components(offsets, precisions_cholesky, covariance_type):
    """The components that :class:`MixturePass` computes from differences:
    those whose expanded log-density would round to more than
    :data:`EXPANSION_TOLERANCE` nats, ``eps (|a_k|ᵀ|Lambda_k||a_k| + d)``, or
    whose second moments around the center would cancel more than
    ``1 / (2 sqrt(eps))``, ``max_j (a_kj² + Sigma_kjj) / Sigma_kjj``."""
    eps = torch.finfo(offsets.dtype).eps
    a, d = offsets.abs(), offsets.shape[1]
    precision = precisions_from_cholesky(precisions_cholesky, covariance_type)
    variances = covariances_from_cholesky(precisions_cholesky, covariance_type)
    if covariance_type == "full":
        size = torch.einsum("kd,kde,ke->k", a, precision.abs(), a)
        variances = torch.diagonal(variances, dim1=1, dim2=2)
    elif covariance_type == "tied":
        size = torch.einsum("kd,de,ke->k", a, precision.abs(), a)
        variances = torch.diagonal(variances)
    else:
        if covariance_type == "spherical":
            precision, variances = precision[:, None], variances[:, None]
        size = (a.square() * precision).sum(1)
    cancellation = (a.square() / variances).amax(1) + 1.0
    imprecise = (eps * (size + d) > EXPANSION_TOLERANCE) | (
        cancellation > 0.5 * cancellation_limit(offsets.dtype))
    return torch.nonzero(imprecise).flatten().tolist()


def cancellation_limit(dtype):
    """The loss of precision (ratio of a raw second moment to the variance
    kept from it) above which second moments are redone exactly centred:
    half the digits, ``1 / sqrt(eps)``."""
    return 1.0 / math.sqrt(torch.finfo(dtype).eps)


def _variances(covariances, covariance_type):
    """The per-feature variances of covariances of any type."""
    if covariance_type in ("full", "tied"):
        return torch.diagonal(covariances, dim1=-2, dim2=-1)
    return covariances


def _positive_definite(covariances, covariance_type):
    """Per component, whether the Cholesky factorisation of a 'full'/'tied'
    covariance succeeds (True for 'diag'/'spherical', whose signs the loss
    check sees); shape (K,), () for 'tied'."""
    if covariance_type not in ("full", "tied"):
        return torch.ones(covariances.shape[0], dtype=torch.bool, device=covariances.device)
    return torch.linalg.cholesky_ex(covariances).info == 0


def _outer(delta):
    return delta[..., :, None] * delta[..., None, :]


def blend_moments(old, new, rho, covariance_type):
    """``(1 - rho) * old + rho * new`` of normalised mixture statistics.

    The statistics are dicts of ``weights`` (K,) (fractions of the data),
    ``means`` (K, d) and within-component ``covariances`` without
    regularisation (shape of :func:`covariance_shape`; 'tied' is the pooled
    within-component covariance). The mixture of the two sets of moments is
    formed centred (Chan et al.'s parallel update), never as ``E[x²] − E[x]²``.
    """
    a, b = 1.0 - rho, rho
    w1, w2 = a * old["weights"], b * new["weights"]
    weights = w1 + w2
    safe = weights.clamp_min(torch.finfo(weights.dtype).tiny)
    means = (w1[:, None] * old["means"] + w2[:, None] * new["means"]) / safe[:, None]
    d1, d2 = old["means"] - means, new["means"] - means
    c1, c2 = old["covariances"], new["covariances"]
    if covariance_type == "full":
        cov = (w1[:, None, None] * (c1 + _outer(d1)) + w2[:, None, None] * (c2 + _outer(d2)))
        cov = cov / safe[:, None, None]
    elif covariance_type == "diag":
        cov = (w1[:, None] * (c1 + d1.square()) + w2[:, None] * (c2 + d2.square())) / safe[:, None]
    elif covariance_type == "spherical":
        cov = (w1 * (c1 + d1.square().mean(1)) + w2 * (c2 + d2.square().mean(1))) / safe
    else:  # tied: pooled within-component covariance
        between = (w1[:, None, None] * _outer(d1) + w2[:, None, None] * _outer(d2)).sum(0)
        cov = (w1.sum() * c1 + w2.sum() * c2 + between) / safe.sum()
    return {"weights": weights, "means": means, "covariances": cov}


def moments_from_parameters(weights, means, covariances, covariance_type, reg_covar):
    """Normalised statistics (for :func:`blend_moments`) of fitted parameters."""
    if covariance_type in ("full", "tied"):
        eye = torch.eye(means.shape[1], dtype=means.dtype, device=means.device)
        cov = covariances - reg_covar * eye
    else:
        cov = (covariances - reg_covar).clamp_min(0.0)
    return {"weights": weights.clone(), "means": means.clone(), "covariances": cov}


def parameters_from_moments(moments, covariance_type, reg_covar):
    """``(weights, means, covariances)`` of the M-step from normalised statistics."""
    weights = moments["weights"] / moments["weights"].sum()
    cov = moments["covariances"]
    if covariance_type in ("full", "tied"):
        cov = cov + reg_covar * torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device)
    else:
        cov = cov + reg_covar
    return weights, moments["means"], cov


def _second_moment_shape(covariance_type, n_components, n_features):
    if covariance_type == "full":
        return (n_components, n_features, n_features)
    if covariance_type == "tied":
        return (n_features, n_features)
    return (n_components, n_features)


def weighted_data_moments(batches, covariance_type, partition=None):
    """Mean and unbiased covariance of (weighted) rows, in two exact passes.

    The defaults of a Bayesian mixture's data-dependent priors, as
    scikit-learn computes them (``X.mean(0)`` and ``np.cov(X.T)``, ddof=1),
    with ``sample_weight`` as frequencies (a weight of 2 counts the row
    twice, so the unbiased denominator is ``sum(w) - 1``) and per-row
    variances added (the covariance of the mixture of the rows' Gaussians).

    Parameters
    ----------
    batches : callable
        ``batches()`` returns an iterable of ``(X, sample_weight, X_var)``
        tensors of shapes (n, d), (n,) or None, (n, d) or None (at least
        one, possibly empty, batch); called twice.
    covariance_type : {'full', 'tied', 'diag', 'spherical'}
        'full'/'tied' return the (d, d) covariance, 'diag' the (d,)
        variances, 'spherical' their mean (a 0-d tensor).
    partition : RowPartition, optional
        Sums are taken over its processes.

    Returns
    -------
    mean : Tensor of shape (d,)
    covariance : Tensor
    weight_sum : float
        ``sum(w)`` (the number of rows without weights).
    """
    sums = None  # [sum w x, sum w], in float64 where the device has it (data far
    for X, weight, _ in batches():  # from the origin would lose the mean in float32)
        wide = X.to(_sum_dtype(X))
        w = wide.new_ones(X.shape[0]) if weight is None else weight.to(wide.dtype)
        part = torch.cat([w @ wide, w.sum().reshape(1)])
        sums = part if sums is None else sums + part
    if partition is not None:
        partition.sum(sums)
    weight_sum = float(sums[-1])
    mean = (sums[:-1] / weight_sum).to(X.dtype)
    second = variance = None
    for X, weight, X_var in batches():
        w = X.new_ones(X.shape[0]) if weight is None else weight
        centred = X - mean
        part = (centred * w[:, None]).T @ centred if covariance_type in ("full", "tied") \
            else w @ centred.square()
        second = part if second is None else second + part
        if X_var is not None:
            part = w @ X_var
            variance = part if variance is None else variance + part
    if partition is not None:
        partition.sum(second)
        if variance is not None:
            partition.sum(variance)
    second = second / max(weight_sum - 1.0, torch.finfo(second.dtype).tiny)
    if variance is not None:
        variance = variance / weight_sum
        if second.dim() == 2:
            second = second + torch.diag(variance)
        else:
            second = second + variance
    if covariance_type == "spherical":
        second = second.mean()
    return mean, second, weight_sum


# ============================================================================
# Variational Bayesian Gaussian mixtures: Dirichlet (or stick-breaking
# Dirichlet-process) weights and Normal-Wishart components, the model and
# coordinate-ascent updates of scikit-learn's BayesianGaussianMixture
# (Bishop 2006 §10.2; Blei & Jordan 2006). Shared by BayesianGaussianMixture
# and the DP prior of GMVAEDPGMM (skdeepmix.nn.dpgmm).
# ============================================================================
WEIGHT_PRIOR_TYPES = ("dirichlet_process", "dirichlet_distribution")


def weight_concentration_posterior(nk, weight_concentration_prior, prior_type):
    """Posterior concentration of the mixture weights.

    Parameters
    ----------
    nk : Tensor of shape (K,)
        Expected component counts.
    weight_concentration_prior : float
    prior_type : {'dirichlet_process', 'dirichlet_distribution'}

    Returns
    -------
    weight_concentration : Tensor
        Shape (2, K) for the Dirichlet process (the Beta parameters of the
        stick-breaking fractions), (K,) for the Dirichlet distribution.
    """
    if prior_type == "dirichlet_process":
        after = nk.flip(0).cumsum(0).flip(0)[1:]  # sum_{j > k} nk_j
        return torch.stack([1.0 + nk, weight_concentration_prior + torch.cat(
            [after, nk.new_zeros(1)])])
    return weight_concentration_prior + nk


def expected_log_weights(weight_concentration, prior_type):
    """``E_q[log pi_k]``, shape (K,)."""
    if prior_type == "dirichlet_process":
        a, b = weight_concentration
        digamma_sum = torch.digamma(a + b)
        log_rest = torch.digamma(b) - digamma_sum
        before = torch.cat([log_rest.new_zeros(1), log_rest.cumsum(0)[:-1]])
        return torch.digamma(a) - digamma_sum + before
    return torch.digamma(weight_concentration) - torch.digamma(weight_concentration.sum())


def mixture_weights(weight_concentration, prior_type):
    """Posterior-mean mixture weights (scikit-learn's ``weights_``), shape (K,)."""
    if prior_type == "dirichlet_process":
        a, b = weight_concentration
        total = a + b
        rest = torch.cat([a.new_ones(1), torch.cumprod(b / total, 0)[:-1]])
        weights = a / total * rest
        return weights / weights.sum()
    return weight_concentration / weight_concentration.sum()


def normal_wishart_posterior(nk, xk, sk, mean_prior, mean_precision_prior,
                             degrees_of_freedom_prior, covariance_prior, covariance_type):
    """Normal-Wishart posterior of the components from their statistics.

    Parameters
    ----------
    nk : Tensor of shape (K,)
    xk : Tensor of shape (K, d)
        Component means of the data.
    sk : Tensor
        Component covariances of the data (``reg_covar`` included), shape
        of :func:`covariance_shape`.
    mean_prior : Tensor of shape (d,)
    mean_precision_prior : float
    degrees_of_freedom_prior : float
    covariance_prior : Tensor of shape (d, d), (d,) or ()
    covariance_type : {'full', 'tied', 'diag', 'spherical'}

    Returns
    -------
    mean_precision : Tensor of shape (K,)
    means : Tensor of shape (K, d)
    degrees_of_freedom : Tensor of shape (K,), or () for 'tied'
    covariances : Tensor
        ``W_k^-1 / nu_k`` (scikit-learn's normalised convention), shape of
        :func:`covariance_shape`.
    """
    n_components = nk.shape[0]
    mean_precision = mean_precision_prior + nk
    means = (mean_precision_prior * mean_prior + nk[:, None] * xk) / mean_precision[:, None]
    diff = xk - mean_prior
    if covariance_type == "tied":
        dof = degrees_of_freedom_prior + nk.sum() / n_components
        spread = ((nk / mean_precision)[:, None] * diff).T @ diff
        cov = covariance_prior + sk * nk.sum() / n_components \
            + mean_precision_prior / n_components * spread
        return mean_precision, means, dof, cov / dof
    dof = degrees_of_freedom_prior + nk
    shrink = mean_precision_prior / mean_precision
    if covariance_type == "full":
        spread = (nk * shrink)[:, None, None] * (diff[:, :, None] * diff[:, None, :])
        cov = covariance_prior + nk[:, None, None] * sk + spread
        return mean_precision, means, dof, cov / dof[:, None, None]
    if covariance_type == "diag":
        cov = covariance_prior + nk[:, None] * (sk + shrink[:, None] * diff.square())
        return mean_precision, means, dof, cov / dof[:, None]
    cov = covariance_prior + nk * (sk + shrink * diff.square().mean(1))
    return mean_precision, means, dof, cov / dof


def _sum_over_dimensions(function, degrees_of_freedom, n_features):
    """``sum_{i<d} function((nu - i) / 2)`` per component."""
    steps = torch.arange(n_features, dtype=degrees_of_freedom.dtype,
                         device=degrees_of_freedom.device)
    return function(0.5 * (degrees_of_freedom[..., None] - steps)).sum(-1)


def expected_log_gaussian_prob(X, means, precisions_cholesky, degrees_of_freedom,
                               mean_precision, covariance_type, center=None, X_var=None):
    """``E_q[log N(x | mu_k, Lambda_k^-1)]`` under the Normal-Wishart posterior.

    Parameters
    ----------
    X : Tensor of shape (n_samples, n_features)
    means, precisions_cholesky, degrees_of_freedom, mean_precision : Tensor
        The posterior (see :func:`normal_wishart_posterior`; the precision
        Cholesky factors are those of its normalised covariances).
    covariance_type : {'full', 'tied', 'diag', 'spherical'}
    center, X_var : Tensor, optional
        As in :func:`log_gaussian_prob` (``X_var`` averages the result
        over ``N(x, diag(X_var))``).

    Returns
    -------
    log_prob : Tensor of shape (n_samples, n_components)
    """
    log_gauss = log_gaussian_prob(X, means, precisions_cholesky, covariance_type, center, X_var)
    return log_gauss + expected_log_gaussian_offsets(degrees_of_freedom, mean_precision,
                                                     X.shape[1])


def expected_log_gaussian_offsets(degrees_of_freedom, mean_precision, n_features):
    """``E_q[log N(x | mu_k, Lambda_k^-1)] - log N(x | m_k, (nu_k W_k)^-1)``.

    The part of :func:`expected_log_gaussian_prob` that does not depend on
    ``x``, shape (K,) (broadcast to (K,) for 'tied').
    """
    # the normalised precision nu W gives the Mahalanobis term; its log-det
    # counts d log(nu) that log|W| does not have
    log_lambda = n_features * math.log(2.0) + _sum_over_dimensions(
        torch.digamma, degrees_of_freedom, n_features
    )
    return (0.5 * (log_lambda - n_features / mean_precision)
            - 0.5 * n_features * degrees_of_freedom.log())


def log_wishart_norm(degrees_of_freedom, log_det_precisions_chol, n_features):
    """Log normaliser of the Wishart distributions (without the ``log pi`` term)."""
    return -(
        degrees_of_freedom * log_det_precisions_chol
        + degrees_of_freedom * n_features * 0.5 * math.log(2.0)
        + _sum_over_dimensions(torch.lgamma, degrees_of_freedom, n_features)
    )


def log_dirichlet_norm(concentration):
    """Log normaliser of a Dirichlet distribution."""
    return torch.lgamma(concentration.sum()) - torch.lgamma(concentration).sum()


def variational_lower_bound(resp_log_resp_sum, weight_concentration, prior_type,
                            degrees_of_freedom, mean_precision, precisions_cholesky,
                            covariance_type, n_features):
    """scikit-learn's variational lower bound (constant terms dropped).

    The component-sized terms are evaluated in float64 on the CPU, so that a
    float32 fit's bound is as smooth as a float64 one (its convergence test
    compares changes of about ``tol``).

    Parameters
    ----------
    resp_log_resp_sum : float or 0-d Tensor
        ``sum_i w_i sum_k r_ik log r_ik`` of the E-step.
    weight_concentration : Tensor of shape (2, K) or (K,)
    prior_type : {'dirichlet_process', 'dirichlet_distribution'}
    degrees_of_freedom, mean_precision, precisions_cholesky : Tensor
        The posterior after the M-step.
    covariance_type : {'full', 'tied', 'diag', 'spherical'}
    n_features : int

    Returns
    -------
    lower_bound : float
    """
    wide = lambda t: t.detach().to(device="cpu", dtype=torch.float64)  # noqa: E731
    dof, mean_precision = wide(degrees_of_freedom), wide(mean_precision)
    concentration = wide(weight_concentration)
    log_det = log_det_cholesky(wide(precisions_cholesky), covariance_type, n_features)
    log_det = log_det - 0.5 * n_features * dof.log()
    log_wishart = log_wishart_norm(dof, log_det, n_features)
    log_wishart = mean_precision.shape[0] * log_wishart if covariance_type == "tied" \
        else log_wishart.sum()
    if prior_type == "dirichlet_process":
        a, b = concentration
        log_norm_weight = -(torch.lgamma(a) + torch.lgamma(b) - torch.lgamma(a + b)).sum()
    else:
        log_norm_weight = log_dirichlet_norm(concentration)
    bound = (-float(resp_log_resp_sum) - log_wishart - log_norm_weight
             - 0.5 * n_features * mean_precision.log().sum())
    return float(bound)


# ============================================================================
# Mixture of factor analysers (Woodbury identity / matrix determinant lemma)
# ============================================================================
def _mfa_precompute(loadings, log_noise_var):
    """Quantities shared by all samples: D^-1 A, chol(I + A^T D^-1 A), log|Sigma|."""
    inv_d = torch.exp(-log_noise_var)  # (K, D)
    scaled = loadings * inv_d[..., None]  # (K, D, R) = D^-1 A
    rank = loadings.shape[-1]
    eye = torch.eye(rank, dtype=loadings.dtype, device=loadings.device)
    inner = eye + loadings.transpose(-1, -2) @ scaled  # (K, R, R)
    chol, info = torch.linalg.cholesky_ex(inner)
    if bool((info != 0).any()):
        raise ValueError(
            "The factor-analyser matrix I + A^T D^-1 A is not positive definite "
            "(numerical breakdown). Use dtype='float64', a larger minimum noise "
            "variance or smaller loadings."
        )
    log_det = 2.0 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
    log_det = log_det + log_noise_var.sum(-1)  # (K,)
    return inv_d, scaled, chol, log_det


def mfa_log_prob(X, means, loadings, log_noise_var):
    """Log-density of every sample under every factor-analyser component.

    Component ``k`` is ``N(x; mu_k, A_k A_k^T + diag(d_k))``. The Mahalanobis
    term uses the Woodbury identity and the log-determinant the matrix
    determinant lemma with a Cholesky factor of ``L_k = I + A_k^T D_k^-1 A_k``,
    so the cost is ``O(n K D R + K D R^2)`` and no ``D x D`` matrix and no
    ``(n, K, D)`` tensor is formed.

    Parameters
    ----------
    X : Tensor of shape (n_samples, n_features)
    means : Tensor of shape (n_components, n_features)
    loadings : Tensor of shape (n_components, n_features, rank)
        Factor loadings ``A_k``.
    log_noise_var : Tensor of shape (n_components, n_features)
        ``log d_k``, the log of the diagonal noise variances.

    Returns
    -------
    log_prob : Tensor of shape (n_samples, n_components)

    Examples
    --------
    >>> import torch
    >>> X = torch.zeros(2, 3)
    >>> mfa_log_prob(X, torch.zeros(1, 3), torch.zeros(1, 3, 1),
    ...              torch.zeros(1, 3)).shape
    torch.Size([2, 1])
    """
    n_features = X.shape[1]
    inv_d, scaled, chol, log_det = _mfa_precompute(loadings, log_noise_var)
    # r^T D^-1 r expanded: x^2 . d^-1 - 2 x . (mu d^-1) + mu^2 . d^-1
    quad = (
        (X * X) @ inv_d.T
        - 2.0 * X @ (means * inv_d).T
        + (means * means * inv_d).sum(-1)
    )  # (n, K)
    # b = A^T D^-1 r  (n, K, R)
    proj = torch.einsum("nd,kdr->nkr", X, scaled) - torch.einsum(
        "kd,kdr->kr", means, scaled
    )
    # b^T L^-1 b = |chol^-1 b|^2 (the R x R triangular inverse is formed once
    # per component; a batched solve per sample is much slower)
    eye = torch.eye(chol.shape[-1], dtype=chol.dtype, device=chol.device)
    chol_inv = torch.linalg.solve_triangular(chol, eye.expand_as(chol), upper=False)
    solved = torch.einsum("kij,nkj->nki", chol_inv, proj)
    maha = quad - (solved * solved).sum(-1)
    maha = maha.clamp_min(0.0)
    return -0.5 * (n_features * LOG_2PI + log_det + maha)


def mfa_covariances(loadings, log_noise_var):
    """Dense covariances ``A A^T + diag(d)`` (for tests and small problems only).

    Parameters
    ----------
    loadings : Tensor of shape (n_components, n_features, rank)
    log_noise_var : Tensor of shape (n_components, n_features)

    Returns
    -------
    covariances : Tensor of shape (n_components, n_features, n_features)
    """
    return loadings @ loadings.transpose(-1, -2) + torch.diag_embed(
        torch.exp(log_noise_var)
    )


def mfa_sample(means, loadings, log_noise_var, components, generator):
    """Draw one sample from each requested factor-analyser component.

    ``x = mu_k + A_k z + sqrt(d_k) * eps`` with ``z ~ N(0, I_R)``,
    ``eps ~ N(0, I_D)``.

    Parameters
    ----------
    means : Tensor of shape (n_components, n_features)
    loadings : Tensor of shape (n_components, n_features, rank)
    log_noise_var : Tensor of shape (n_components, n_features)
    components : LongTensor of shape (n_samples,)
        Component index of each sample.
    generator : torch.Generator

    Returns
    -------
    X : Tensor of shape (n_samples, n_features)
    """
    n = components.shape[0]
    n_features, rank = loadings.shape[1], loadings.shape[2]
    opts = dict(dtype=means.dtype, device=means.device, generator=generator)
    z = torch.randn(n, rank, **opts)
    eps = torch.randn(n, n_features, **opts)
    A = loadings[components]
    return (
        means[components]
        + (A @ z.unsqueeze(-1)).squeeze(-1)
        + torch.exp(0.5 * log_noise_var[components]) * eps
    )


# --- added for CPMMEstimator
def mfa_log_prob_unchecked(X, means, loadings, log_noise_var):
    """:func:`mfa_log_prob` for training loops: no host synchronisation.

    The same density, with two differences: the positive-definiteness of
    ``L_k = I + A_k^T D_k^-1 A_k`` is not checked (a numerical breakdown, e.g.
    after a diverging optimizer step, gives NaN, which the training loop's
    divergence check reports, instead of a host-synchronising test per
    call), and the sample-dependent projections come from one matrix product:
    with ``W_k = chol(L_k)^-1 A_k^T D_k^-1`` (``R x D``, formed once per
    component), ``[-2 mu_k D_k^-1 ; W_k] x`` for all ``k`` at once, so that
    no batched ``R x R`` solve per sample remains.

    Parameters
    ----------
    X : Tensor of shape (n_samples, n_features)
    means : Tensor of shape (n_components, n_features)
    loadings : Tensor of shape (n_components, n_features, rank)
    log_noise_var : Tensor of shape (n_components, n_features)

    Returns
    -------
    log_prob : Tensor of shape (n_samples, n_components)
    """
    K, D, R = loadings.shape
    inv_d = torch.exp(-log_noise_var)  # (K, D)
    scaled = loadings * inv_d[..., None]  # (K, D, R) = D^-1 A
    eye = torch.eye(R, dtype=loadings.dtype, device=loadings.device)
    chol, _ = torch.linalg.cholesky_ex(eye + loadings.transpose(-1, -2) @ scaled)
    log_det = 2.0 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
    log_det = log_det + log_noise_var.sum(-1)  # (K,)
    # chol^-1 (R x R, diagonal >= 1) then one batched product: faster than a
    # batched triangular solve with D right-hand sides, forward and backward
    inv_chol = torch.linalg.solve_triangular(chol, eye.expand(K, R, R), upper=False)
    W = inv_chol @ scaled.transpose(-1, -2)  # (K, R, D)
    mean_scaled = means * inv_d
    projected = X @ torch.cat([-2.0 * mean_scaled, W.reshape(K * R, D)]).T  # (n, K + K R)
    solved = projected[:, K:].reshape(-1, K, R) - (W @ means[..., None]).squeeze(-1)
    quad = (X * X) @ inv_d.T + projected[:, :K] + (means * mean_scaled).sum(-1)  # (n, K)
    maha = (quad - solved.square().sum(-1)).clamp_min(0.0)
    return -0.5 * (D * LOG_2PI + log_det + maha)
