"""GMVAE with a Dirichlet-process Gaussian-mixture prior (``GMVAEDPGMM``)."""

from __future__ import annotations

import copy
import math
from numbers import Integral, Real

import numpy as np
import torch
from sklearn.base import TransformerMixin
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted

from ._base import BaseDeepMixture
from ._torch_utils import make_generator, to_numpy
from ._train import make_optimizer, train_epoch
from .nn.dpgmm import DirichletProcessGMM, kmeans_plusplus_labels
from .nn.gmvae import (
    GMVAE,
    GaussianMixturePrior,
    importance_weighted_log_likelihood,
    negative_elbo,
    pretrain_loss,
)

__all__ = ["GMVAEDPGMM"]


class GMVAEDPGMM(TransformerMixin, BaseDeepMixture):
    """Gaussian-mixture VAE whose latent prior is a Dirichlet-process mixture.

    The latent prior ``p(z) = sum_k pi_k N(z | mu_k, Lambda_k^{-1})`` is a
    truncated stick-breaking Dirichlet-process Gaussian mixture with
    variational Beta / Normal-Wishart posteriors (the model of
    ``sklearn.mixture.BayesianGaussianMixture(weight_concentration_prior_type=
    'dirichlet_process')``, written in torch). The number of clusters that
    are used (``n_components_``) is learned; ``n_components`` is only the
    truncation level.

    Training: an auto-encoder pre-training (``pretrain_epochs``), a DP-GMM
    fit on the codes, then ``max_iter`` epochs of the GMVAE ELBO with the prior
    updated according to ``prior_update``:

    ``'joint'`` (default)
        After every epoch the DP mixture's variational parameters take a
        natural-gradient step of size ``prior_step_size`` (``1.0`` = the
        closed-form coordinate-ascent update) on the *same* ELBO, from the
        expected sufficient statistics of ``q(y|x) q(z|x)`` (means *and*
        variances). Networks and prior optimise one objective; cluster
        identities are kept; empty components die out.
    ``'alternating'``
        The report's scheme: every ``alternate_every`` epochs a DP-GMM is
        fitted from scratch (k-means initialisation) on the latent means and
        becomes the prior. Fixed bugs of a public version: the prior is held in
        buffers updated in place (networks' parameters are never replaced, so
        the optimizer keeps them), and the prior weights are the DP's own
        ``E[log pi]`` (no hard-coded ``log(0.1)``).
    ``'none'``
        A plain fixed-K GMVAE: learnable Gaussian prior components (trained by
        gradient with the networks) with uniform weights. With
        ``n_components=1`` this is a VAE (with a learned Gaussian prior).

    Parameters
    ----------
    n_components : int, default=20
        Truncation level of the DP (maximum number of clusters).
    latent_dim : int, default=10
        Dimension of the latent space ``z``.
    prior_update : {'joint', 'alternating', 'none'}, default='joint'
    covariance_type : {'diag', 'full'}, default='diag'
        Covariance of the DP components.
    weight_concentration_prior : float, default=None
        DP concentration ``alpha``; ``None`` means ``1 / n_components``.
        Smaller values favour fewer clusters.
    encoder_sizes : tuple of int, default=(500, 500)
        Hidden layer sizes of the encoder MLP.
    decoder_sizes : tuple of int or None, default=None
        Hidden layer sizes of the decoder; ``None`` mirrors ``encoder_sizes``.
    likelihood : {'auto', 'bernoulli', 'gaussian'}, default='auto'
        ``p(x|z)``; ``'auto'`` picks Bernoulli when ``X`` lies in ``[0, 1]``.
    gumbel : {'soft', 'hard', 'none'}, default='soft'
        How the ELBO's expectation over ``y`` is estimated: a Gumbel-softmax
        sample, a straight-through hard one, or the exact sum over clusters.
    z_given_y : bool, default=False
        Classic GMVAE ``q(z|x,y)`` (``y`` as an input of the latent head) and
        ``q(y|x)`` a classifier head. The default uses ``q(z|x)`` and the prior
        posterior at ``q(z|x)`` (plus a learned residual) as ``q(y|x)``.
    tau_start, tau_min, tau_decay : float, default=1.0, 0.5, 0.0139
        Gumbel-softmax temperature ``max(tau_start * exp(-tau_decay * epoch), tau_min)``.
    pretrain_epochs : int, default=10
        Epochs of auto-encoder pre-training before the prior is fitted.
    alternate_every : int, default=5
        Epochs between DP refits with ``prior_update='alternating'``.
    prior_step_size : float, default=1.0
        Natural-gradient step of the DP update with ``prior_update='joint'``.
    dp_sample_size : float or None, default=None
        Effective sample size of the DP posterior ("coarsening", Miller &
        Dunson 2019): the counts and scatters that update the DP are scaled
        by ``min(1, dp_sample_size / n_samples)``. ``None`` is the exact
        posterior. Real latent clusters are not Gaussian, and with many
        samples the exact DP splits each one into several components; a
        coarsened posterior keeps the Occam penalty of a small sample, so
        it finds fewer, larger clusters. Smaller values give fewer clusters.
    active_threshold : float, default=0.01
        A cluster is active when its weight exceeds this value.
    beta : float, default=1.0
        Weight of the KL terms of the ELBO.
    learning_rate : float, default=1e-3
    batch_size : int, default=128
    optimizer : {'adam', 'adamw', 'sgd', 'rmsprop'}, default='adam'
    n_score_samples : int, default=32
        Importance samples of :meth:`score_samples` (an *estimate* of ``log p(x)``).
    reg_covar : float, default=1e-6
    callback : callable, default=None
        ``callback(estimator) -> dict or None`` called after every epoch; the
        returned metrics (e.g. a test NMI) are stored in ``history_``.
    max_iter : int, default=50
        Training epochs (after pre-training).
    tol : float, default=1e-4
        Stop when the per-sample ELBO changes by less than this between epochs.
    n_init : int, default=1
    random_state : int, RandomState instance or None, default=None
    warm_start : bool, default=False
    verbose : int, default=0
        Progress bar when > 0.
    device : str or torch.device, default='auto'
    dtype : {'float32', 'float64'} or None, default=None
        Precision of the computation and of the fitted attributes. ``None``
        uses the input's floating dtype (float32 stays float32, anything else
        becomes float64), as scikit-learn does.

    Attributes
    ----------
    module_ : GMVAE
        The trained networks.
    prior_ : DirichletProcessGMM or GaussianMixturePrior
        The latent prior.
    weights_ : ndarray of shape (n_components,)
        Posterior mean mixture weights.
    means_ : ndarray of shape (n_components, latent_dim)
        Latent component means.
    covariances_ : ndarray of shape (n_components, latent_dim[, latent_dim])
        Latent component covariances.
    n_components_ : int
        Number of active clusters (weight > ``active_threshold``).
    active_components_ : ndarray of int
        Indices of the active clusters.
    history_ : list of dict
        Per epoch: ``objective`` (mean ELBO per sample), ``loss``, ``tau``,
        ``n_active`` and the callback's metrics.
    n_features_in_ : int
    converged_ : bool
    n_iter_ : int
    lower_bound_ : float

    Examples
    --------
    >>> from sklearn.datasets import make_blobs
    >>> from skdeepmix.gmvae_dpgmm import GMVAEDPGMM
    >>> X, _ = make_blobs(300, n_features=4, centers=3, random_state=0)
    >>> est = GMVAEDPGMM(n_components=8, latent_dim=2, encoder_sizes=(32,),
    ...                  max_iter=5, pretrain_epochs=5, random_state=0).fit(X)
    >>> est.predict(X).shape, est.transform(X).shape
    ((300,), (300, 2))
    """

    _parameter_constraints: dict = {
        **BaseDeepMixture._parameter_constraints,
        "n_components": [Interval(Integral, 1, None, closed="left")],
        "latent_dim": [Interval(Integral, 1, None, closed="left")],
        "prior_update": [StrOptions({"joint", "alternating", "none"})],
        "covariance_type": [StrOptions({"diag", "full"})],
        "weight_concentration_prior": [None, Interval(Real, 0.0, None, closed="neither")],
        "encoder_sizes": ["array-like"],
        "decoder_sizes": [None, "array-like"],
        "likelihood": [StrOptions({"auto", "bernoulli", "gaussian"})],
        "gumbel": [StrOptions({"soft", "hard", "none"})],
        "z_given_y": ["boolean"],
        "tau_start": [Interval(Real, 0.0, None, closed="neither")],
        "tau_min": [Interval(Real, 0.0, None, closed="neither")],
        "tau_decay": [Interval(Real, 0.0, None, closed="left")],
        "pretrain_epochs": [Interval(Integral, 0, None, closed="left")],
        "alternate_every": [Interval(Integral, 1, None, closed="left")],
        "prior_step_size": [Interval(Real, 0.0, 1.0, closed="right")],
        "active_threshold": [Interval(Real, 0.0, 1.0, closed="left")],
        "beta": [Interval(Real, 0.0, None, closed="left")],
        "learning_rate": [Interval(Real, 0.0, None, closed="neither")],
        "batch_size": [Interval(Integral, 1, None, closed="left")],
        "optimizer": [StrOptions({"adam", "adamw", "sgd", "rmsprop"})],
        "n_score_samples": [Interval(Integral, 1, None, closed="left")],
        "reg_covar": [Interval(Real, 0.0, None, closed="left")],
        "callback": [None, callable],
        "dp_sample_size": [None, Interval(Real, 0.0, None, closed="neither")],
    }

    def __init__(
        self,
        n_components=20,
        *,
        latent_dim=10,
        prior_update="joint",
        covariance_type="diag",
        weight_concentration_prior=None,
        encoder_sizes=(500, 500),
        decoder_sizes=None,
        likelihood="auto",
        gumbel="soft",
        z_given_y=False,
        tau_start=1.0,
        tau_min=0.5,
        tau_decay=0.0139,
        pretrain_epochs=10,
        alternate_every=5,
        prior_step_size=1.0,
        active_threshold=0.01,
        beta=1.0,
        learning_rate=1e-3,
        batch_size=128,
        optimizer="adam",
        n_score_samples=32,
        reg_covar=1e-6,
        callback=None,
        dp_sample_size=None,
        max_iter=50,
        tol=1e-4,
        n_init=1,
        random_state=None,
        warm_start=False,
        verbose=0,
        device="auto",
        dtype=None,
    ):
        self.n_components = n_components
        self.latent_dim = latent_dim
        self.prior_update = prior_update
        self.covariance_type = covariance_type
        self.weight_concentration_prior = weight_concentration_prior
        self.encoder_sizes = encoder_sizes
        self.decoder_sizes = decoder_sizes
        self.likelihood = likelihood
        self.gumbel = gumbel
        self.z_given_y = z_given_y
        self.tau_start = tau_start
        self.tau_min = tau_min
        self.tau_decay = tau_decay
        self.pretrain_epochs = pretrain_epochs
        self.alternate_every = alternate_every
        self.prior_step_size = prior_step_size
        self.active_threshold = active_threshold
        self.beta = beta
        self.learning_rate = learning_rate
        self.batch_size = batch_size
        self.optimizer = optimizer
        self.n_score_samples = n_score_samples
        self.reg_covar = reg_covar
        self.callback = callback
        self.dp_sample_size = dp_sample_size
        self.max_iter = max_iter
        self.tol = tol
        self.n_init = n_init
        self.random_state = random_state
        self.warm_start = warm_start
        self.verbose = verbose
        self.device = device
        self.dtype = dtype

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        # outputs follow the estimator's ``dtype``, not the input's
        tags.transformer_tags.preserves_dtype = []
        return tags

    # ------------------------------------------------------------ checks
    @staticmethod
    def _check_sizes(name, sizes):
        sizes = tuple(sizes)
        if not all(isinstance(s, Integral) and s >= 1 for s in sizes):
            raise ValueError(f"{name} must be a sequence of positive ints, got {sizes!r}.")
        return tuple(int(s) for s in sizes)

    def _check_parameters(self, X):
        n_samples = X.shape[0]
        if n_samples < self.n_components:
            raise ValueError(
                f"Expected n_samples >= n_components but got n_components = "
                f"{self.n_components}, n_samples = {n_samples}."
            )
        self._encoder_sizes = self._check_sizes("encoder_sizes", self.encoder_sizes)
        self._decoder_sizes = (
            tuple(reversed(self._encoder_sizes))
            if self.decoder_sizes is None
            else self._check_sizes("decoder_sizes", self.decoder_sizes)
        )
        if self.tau_min > self.tau_start:
            raise ValueError(
                f"tau_min={self.tau_min} must not exceed tau_start={self.tau_start}."
            )
        if self.likelihood == "auto":
            in_unit = bool(np.all(X >= 0) and np.all(X <= 1))
            self._likelihood = "bernoulli" if in_unit else "gaussian"
        else:
            if self.likelihood == "bernoulli" and not (np.all(X >= 0) and np.all(X <= 1)):
                raise ValueError(
                    "likelihood='bernoulli' needs X in [0, 1]; scale the data or "
                    "use likelihood='gaussian'."
                )
            self._likelihood = self.likelihood

    # ------------------------------------------------------------ build
    def _build(self, n_features, n_samples, generator):
        seed = int(torch.randint(2**31 - 1, (1,), generator=generator, device=generator.device))
        devices = [generator.device] if generator.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            module = GMVAE(
                n_features,
                self.latent_dim,
                self.n_components,
                self._encoder_sizes,
                self._decoder_sizes,
                self._likelihood,
                self.z_given_y,
            )
        if self.prior_update == "none":
            prior = GaussianMixturePrior(self.n_components, self.latent_dim)
        else:
            prior = DirichletProcessGMM(
                self.n_components,
                self.latent_dim,
                self.covariance_type,
                self.weight_concentration_prior,
                reg_covar=self.reg_covar,
            )
        if self.prior_update != "none" and self.dp_sample_size is not None:
            prior.count_scale = min(1.0, float(self.dp_sample_size) / n_samples)
        dtype, device = self._torch_dtype(), generator.device
        return module.to(device=device, dtype=dtype), prior.to(device=device, dtype=dtype)

    def _initialize(self, X, generator, y=None):
        self.module_, self.prior_ = self._build(X.shape[1], X.shape[0], generator)
        self.optimizer_ = self._make_optimizer()
        self._epoch = 0
        # auto-encoder pre-training (VaDE's recipe)
        self.module_.train()
        for _ in range(self.pretrain_epochs):
            train_epoch(
                lambda xb: pretrain_loss(self.module_, xb).mean(),
                self.optimizer_,
                X,
                self.batch_size,
                generator,
            )
        self.optimizer_ = self._make_optimizer()
        m, v, _ = self._encode_all(X)
        K = self.n_components
        with torch.no_grad():
            if self.prior_update == "none":
                labels = kmeans_plusplus_labels(m, K, generator)
                onehot = torch.nn.functional.one_hot(labels, K).to(m.dtype)
                counts = onehot.sum(0).clamp_min(1.0)
                means = onehot.T @ m / counts[:, None]
                var = onehot.T @ (m - means[labels]) ** 2 / counts[:, None]
                fallback = m.var(0, unbiased=False) if m.shape[0] > 1 else torch.ones_like(m[0])
                var = torch.where(onehot.sum(0)[:, None] > 1, var, fallback)
                self.prior_.means.copy_(means)
                self.prior_.log_vars.copy_(torch.log(var + v.mean(0) + 1e-4))
            else:
                self.prior_.fit(m, generator=generator)
        self._update_attributes()

    def _encode_all(self, X):
        """``(m, v, log q(y|x))`` of all rows (no gradient, chunked)."""
        was_training = self.module_.training
        self.module_.eval()
        with torch.no_grad():
            parts = [
                self.module_.infer(X[i : i + 4096], self.prior_)
                for i in range(0, X.shape[0], 4096)
            ]
        self.module_.train(was_training)
        return tuple(torch.cat(p) for p in zip(*parts))

    def _make_optimizer(self):
        params = list(self.module_.parameters()) + list(self.prior_.parameters())
        return make_optimizer(self.optimizer, params, self.learning_rate)

    def __getstate__(self):
        state = super().__getstate__()
        # the optimizer holds references to the (device) parameters; it is
        # rebuilt by a warm-started fit after unpickling
        state.pop("optimizer_", None)
        return state

    def _tau(self):
        return max(self.tau_start * math.exp(-self.tau_decay * self._epoch), self.tau_min)

    def _fit_iteration(self, X, generator, y=None):
        tau = self._tau()
        if getattr(self, "optimizer_", None) is None:
            self.optimizer_ = self._make_optimizer()
        self.module_.train()
        mean_loss = train_epoch(
            lambda xb: negative_elbo(
                self.module_, self.prior_, xb, generator, tau, self.gumbel, self.beta
            ).mean(),
            self.optimizer_,
            X,
            self.batch_size,
            generator,
        )
        self._epoch += 1
        if math.isfinite(mean_loss):
            self._update_prior(X, generator)
        self._update_attributes()
        metrics = {
            "objective": -mean_loss,
            "loss": mean_loss,
            "tau": tau,
            "n_active": self.n_components_,
        }
        if self.callback is not None:
            extra = self.callback(self)
            if extra:
                metrics.update(extra)
            self.module_.train()
        return metrics

    def _update_prior(self, X, generator):
        if self.prior_update == "none":
            return
        with torch.no_grad():
            if self.prior_update == "joint":
                m, v, log_qy = self._encode_all(X)
                self.prior_.set_priors(m, v)
                self.prior_.update(m, log_qy.exp(), v, rho=float(self.prior_step_size))
            elif self._epoch % self.alternate_every == 0:
                m, _, _ = self._encode_all(X)
                self.prior_.fit(m, generator=generator)
                # the refit permutes the clusters: restart the residual head
                self.module_.y_head.weight.zero_()
                self.module_.y_head.bias.zero_()

    def _update_attributes(self):
        with torch.no_grad():
            weights = self.prior_.weights()
            self.weights_ = to_numpy(weights)
            self.means_ = to_numpy(self.prior_.means)
            self.covariances_ = to_numpy(self.prior_.covariances)
        active = np.flatnonzero(self.weights_ > self.active_threshold)
        self.active_components_ = active
        self.n_components_ = int(active.size)

    def _get_state(self):
        return {
            "module": copy.deepcopy(self.module_.state_dict()),
            "prior": copy.deepcopy(self.prior_.state_dict()),
            "optimizer": copy.deepcopy(self.optimizer_.state_dict()) if getattr(self, "optimizer_", None) else None,
            "epoch": self._epoch,
        }

    def _set_state(self, state):
        self.module_.load_state_dict(state["module"])
        self.prior_.load_state_dict(state["prior"])
        if state["optimizer"] is not None:
            if getattr(self, "optimizer_", None) is None:
                self.optimizer_ = self._make_optimizer()
            self.optimizer_.load_state_dict(state["optimizer"])
        self._epoch = state["epoch"]
        self._update_attributes()

    def _finalize_fit(self, X, y=None):
        self.module_.eval()

    def _prepare_inference(self, device):
        self.module_.to(device)
        self.prior_.to(device)
        self.module_.eval()

    # ------------------------------------------------------------ inference
    def _log_resp(self, X):
        return self.module_.infer(X, self.prior_)[2]

    def _estimate_log_prob_resp(self, X):
        eps = self._score_noise(X.device)
        log_prob = importance_weighted_log_likelihood(self.module_, self.prior_, X, eps)
        return log_prob, self._log_resp(X)

    def _estimate_log_prob_resp_chunked(self, X):
        # fit_predict only needs the responsibilities: skip the costly
        # importance-weighted likelihood (the first output is unused there).
        self.module_.eval()
        log_resp = self._map_chunks(self._log_resp, X, X.device)
        return log_resp.new_zeros(log_resp.shape[0]), log_resp

    def _score_noise(self, device):
        generator = make_generator(self.random_state, device)
        return torch.randn(
            self.n_score_samples, self.latent_dim, generator=generator, device=device
        ).to(self._torch_dtype())

    def _work_per_row(self):
        width = max([self.n_features_in_, *self._encoder_sizes, *self._decoder_sizes])
        return 4 * width * self.n_score_samples

    def predict_proba(self, X):
        """Cluster posterior ``q(y|x)`` of each sample.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)

        Returns
        -------
        proba : ndarray of shape (n_samples, n_components)
            Columns follow the truncation level; inactive clusters get ~0.
        """
        return to_numpy(self._inference(self._log_resp, X).exp())

    def predict(self, X):
        """Most probable cluster of each sample.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)

        Returns
        -------
        labels : ndarray of shape (n_samples,)
        """
        return to_numpy(self._inference(self._log_resp, X).argmax(1))

    def score_samples(self, X):
        """Importance-weighted *estimate* of ``log p(x)`` for each sample.

        ``log 1/S sum_s p(x|z_s) p(z_s) / q(z_s|x)`` with ``S = n_score_samples``
        draws from the encoder's Gaussian and the prior mixture at its point
        estimates. It is a stochastic lower bound of ``log p(x)`` (in
        expectation) that tightens as ``S`` grows; the draws are seeded by
        ``random_state`` and shared by all rows, so the value of a row does not
        depend on the other rows. For the Bernoulli likelihood the value is
        that of the Bernoulli model of ``x`` in ``[0, 1]``.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)

        Returns
        -------
        log_prob : ndarray of shape (n_samples,)
        """
        return super().score_samples(X)

    def transform(self, X):
        """Latent means ``E[z | x]``.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)

        Returns
        -------
        Z : ndarray of shape (n_samples, latent_dim)
        """
        return to_numpy(self._inference(lambda x: self.module_.infer(x, self.prior_)[0], X))

    def inverse_transform(self, Z):
        """Decode latent codes: the mean of ``p(x|z)``.

        Parameters
        ----------
        Z : array-like of shape (n_samples, latent_dim)

        Returns
        -------
        X : ndarray of shape (n_samples, n_features)
        """
        check_is_fitted(self)
        Z = np.asarray(Z, dtype=np.float64)
        if Z.ndim != 2 or Z.shape[1] != self.latent_dim:
            raise ValueError(
                f"Z must have shape (n_samples, {self.latent_dim}) (latent_dim), got {Z.shape}."
            )
        if not np.all(np.isfinite(Z)):
            raise ValueError("Z contains NaN or infinity.")
        device = self._runtime_device()
        self._prepare_inference(device)
        with torch.no_grad():
            out = self._map_chunks(lambda z: self.module_.mean(self.module_.decode(z)), Z, device)
        return to_numpy(out)

    def _sample(self, n_samples, generator):
        device = generator.device
        weights = self.prior_.weights().to(device)
        active = weights > self.active_threshold
        if bool(active.any()):
            weights = torch.where(active, weights, torch.zeros_like(weights))
        y = torch.multinomial(weights, n_samples, replacement=True, generator=generator)
        eps = torch.randn(n_samples, self.latent_dim, generator=generator, device=device)
        eps = eps.to(self._torch_dtype())
        cov = self.prior_.covariances
        if cov.dim() == 3:
            chol = torch.linalg.cholesky(cov)
            z = self.prior_.means[y] + (chol[y] @ eps[:, :, None])[:, :, 0]
        else:
            z = self.prior_.means[y] + cov[y].sqrt() * eps
        return self.module_.mean(self.module_.decode(z)), y

    def sample(self, n_samples=1):
        """Generate samples: ``y ~ pi``, ``z ~ p(z|y)``, ``x`` = decoder mean.

        Clusters are drawn among the active ones (weight above
        ``active_threshold``) with renormalised weights, so that the truncated
        tail of the stick-breaking prior does not produce off-data samples.

        Parameters
        ----------
        n_samples : int, default=1

        Returns
        -------
        X : ndarray of shape (n_samples, n_features)
            Means of ``p(x|z)`` (noise-free decoder outputs).
        y : ndarray of shape (n_samples,)
            Cluster of each sample.
        """
        return super().sample(n_samples)

    def _n_parameters(self):
        n = sum(p.numel() for p in self.module_.parameters())
        K, d = self.n_components, self.latent_dim
        cov = d * (d + 1) // 2 if self.covariance_type == "full" and self.prior_update != "none" else d
        return int(n + (K - 1) + K * (d + cov))
