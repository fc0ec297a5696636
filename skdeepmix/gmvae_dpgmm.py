"""GMVAE with a Dirichlet-process Gaussian-mixture prior (``GMVAEDPGMM``)."""

from __future__ import annotations

import copy
import math
from numbers import Integral, Real

import numpy as np
import torch
from sklearn.base import ClassNamePrefixFeaturesOutMixin, TransformerMixin
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted

from . import _distributed
from ._base import BaseDeepMixture
from ._docstrings import fill_doc
from ._kmeans import kmeans
from ._torch_utils import build_module, make_generator, to_numpy
from ._train import TrainingDivergedError, make_optimizer, smoothed_converged, train_epoch
from .nn.dpgmm import DirichletProcessGMM
from .nn.gmvae import (
    GMVAE,
    GaussianMixturePrior,
    column_moments,
    importance_weighted_log_likelihood,
    init_mixture_prior,
    negative_elbo,
    pretrain_loss,
    sample,
)

__all__ = ["GMVAEDPGMM"]


@fill_doc(
    tol=1e-3,
    max_iter=100,
    tol_meaning="Training stops when the mean ELBO per sample of the last 3 epochs "
    "improved on that of the 3 epochs before by less than ``tol`` times its magnitude.",
    iteration="epochs",
)
class GMVAEDPGMM(ClassNamePrefixFeaturesOutMixin, TransformerMixin, BaseDeepMixture):
    """Gaussian-mixture VAE whose latent prior is a Dirichlet-process mixture.

    The latent prior ``p(z) = sum_k pi_k N(z | mu_k, Lambda_k^{-1})`` is a
    truncated stick-breaking Dirichlet-process Gaussian mixture with
    variational Beta / Normal-Wishart posteriors (the model of
    ``sklearn.mixture.BayesianGaussianMixture(weight_concentration_prior_type=
    'dirichlet_process')``, written in torch). The number of clusters that
    are used (``n_components_``) is learned; ``n_components`` is only the
    truncation level.

    Training: ``pretrain_iter`` epochs of auto-encoder pre-training, a DP-GMM
    fit on the codes (k-means initialisation), then at most ``max_iter``
    epochs of the GMVAE ELBO with the prior updated according to
    ``prior_update``:

    ``'joint'`` (default)
        After every epoch the DP mixture's variational parameters take a
        natural-gradient step of size ``prior_learning_rate`` (``1.0`` = the
        closed-form coordinate-ascent update) on the *same* ELBO, from the
        expected sufficient statistics of ``q(y|x) q(z|x)`` (means *and*
        variances). Networks and prior optimise one objective; cluster
        identities are kept; empty components die out.
    ``'alternating'``
        The report's scheme: every ``alternate_every`` epochs a DP-GMM is
        fitted from scratch (k-means initialisation) on the latent means and
        becomes the prior. The prior is held in buffers updated in place (the
        networks' parameters are never replaced, so the optimizer keeps
        them), and the prior weights are the DP's own ``E[log pi]``.
    ``'none'``
        A plain fixed-K GMVAE: learnable Gaussian prior components (trained by
        gradient with the networks) with uniform weights. With
        ``n_components=1`` this is a VAE (with a learned Gaussian prior).

    Parameters
    ----------
    n_components : int, default=30
        Truncation level of the DP: the most clusters it can use. The number
        it does use (``n_components_``) is learned; its granularity is set by
        ``dp_sample_size``.
    latent_dim : int, default=10
        Dimension of the latent space ``z``.
    prior_update : {'joint', 'alternating', 'none'}, default='joint'
        How the prior is trained (see above).
    covariance_type : {'diag', 'full'}, default='diag'
        Covariance of the DP components.
    weight_concentration_prior : float, default=None
        DP concentration ``alpha``; ``None`` means ``1 / n_components``.
        Smaller values favour fewer clusters (a weak effect next to
        ``dp_sample_size``).
    dp_sample_size : float or None, default=1000
        **The granularity of the clusters**: the number of samples the DP
        prior "sees". Its counts and scatters are scaled by
        ``min(1, dp_sample_size / n_samples)`` (a coarsened posterior,
        Miller & Dunson 2019). Real latent clusters are not Gaussian, and
        the exact DP (``None``) splits each one into more components the
        more samples there are (on 10 000 MNIST digits it keeps 29 of 30); a
        coarsened posterior keeps the Occam penalty of ``dp_sample_size``
        samples whatever ``n_samples`` is, so the number of clusters does
        not grow with the data. Smaller values give fewer, coarser clusters:
        on 10 000 MNIST digits (10 classes) 1000 finds 11-13 clusters,
        500 finds 5 and 2000 about 18; on the digits data set 1000 finds
        8-10 and 500 finds 7. On MNIST's classes 0-4 alone 1000 still
        finds 8-11: the sub-styles of a digit are clusters at that
        granularity (``benchmarks/results/defaults_gmvae_dpgmm.md``).
    encoder_sizes : tuple of int, default=(500, 500)
        Hidden layer sizes of the encoder MLP.
    decoder_sizes : tuple of int or None, default=None
        Hidden layer sizes of the decoder; ``None`` mirrors ``encoder_sizes``.
    likelihood : {'auto', 'bernoulli', 'gaussian'}, default='auto'
        ``p(x|z)``; ``'auto'`` picks Bernoulli when ``X`` lies in ``[0, 1]``.
        The Gaussian decoder models standardised data (the mean of every
        feature removed, divided by one overall scale), so the data's units
        do not matter.
    gumbel : {'soft', 'hard', 'none'}, default='soft'
        How the ELBO's expectation over ``y`` is estimated: a Gumbel-softmax
        sample, a straight-through hard one, or the exact sum over clusters.
    z_given_y : bool, default=False
        Classic GMVAE ``q(z|x,y)`` (``y`` as an input of the latent head) and
        ``q(y|x)`` a classifier head. The default uses ``q(z|x)`` and the prior
        posterior at ``q(z|x)`` (plus a learned residual) as ``q(y|x)``.
    tau_start, tau_min, tau_decay : float, default=1.0, 0.5, 0.0139
        Gumbel-softmax temperature ``max(tau_start * exp(-tau_decay * epoch), tau_min)``.
    pretrain_iter : int, default=10
        Epochs of auto-encoder pre-training before the prior is fitted.
    alternate_every : int, default=5
        Epochs between DP refits with ``prior_update='alternating'``.
    prior_learning_rate : float in (0, 1], default=1.0
        Natural-gradient step of the DP update with ``prior_update='joint'``.
    active_threshold : float, default=0.01
        A cluster is active when its weight exceeds this value.
    beta : float, default=1.0
        Weight of the KL terms of the ELBO.
    learning_rate : float, default=1e-3
        Learning rate of the networks' optimizer.
    max_grad_norm : float or None, default=None
        Clip the global gradient norm of the networks (None: no clipping).
    batch_size : int, default=128
    optimizer : {'adam', 'adamw', 'sgd', 'rmsprop'}, default='adam'
    n_score_samples : int, default=32
        Importance samples of :meth:`score_samples` (an *estimate* of ``log p(x)``).
    reg_covar : float, default=1e-6
        Added to the diagonal of the DP components' covariances.
    callback : callable, default=None
        ``callback(estimator) -> dict or None`` called after every epoch; the
        returned metrics (e.g. a test NMI) are stored in ``history_``.
    {shared_parameters}

    Attributes
    ----------
    module_ : skdeepmix.nn.gmvae.GMVAE
        The trained networks (its ``likelihood`` is the resolved one).
    prior_ : DirichletProcessGMM or GaussianMixturePrior
        The latent prior.
    optimizer_ : torch.optim.Optimizer
        The networks' optimizer, kept so that a ``warm_start`` fit continues
        with its state (not pickled: a fit after unpickling starts a new one).
    n_epochs_ : int
        ELBO epochs trained so far, warm-started fits included (the Gumbel
        temperature follows it).
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
    lower_bounds_ : list of float
        The objective of every epoch.
    lower_bound_ : float
        Mean ELBO per sample of the last epoch of the best run.
    converged_ : bool
    n_iter_ : int
    n_features_in_ : int
    feature_names_in_ : ndarray of shape (`n_features_in_`,)
        Only when ``X`` has string feature names.

    Examples
    --------
    >>> from sklearn.datasets import make_blobs
    >>> from skdeepmix import GMVAEDPGMM
    >>> X, _ = make_blobs(300, n_features=4, centers=3, random_state=0)
    >>> est = GMVAEDPGMM(n_components=8, latent_dim=2, encoder_sizes=(32,),
    ...                  max_iter=5, pretrain_iter=5, random_state=0).fit(X)
    >>> est.predict(X).shape, est.transform(X).shape
    ((300,), (300, 2))
    >>> est.get_feature_names_out().tolist()
    ['gmvaedpgmm0', 'gmvaedpgmm1']
    """

    _parameter_constraints: dict = {
        **BaseDeepMixture._parameter_constraints,
        "n_components": [Interval(Integral, 1, None, closed="left")],
        "latent_dim": [Interval(Integral, 1, None, closed="left")],
        "prior_update": [StrOptions({"joint", "alternating", "none"})],
        "covariance_type": [StrOptions({"diag", "full"})],
        "weight_concentration_prior": [None, Interval(Real, 0.0, None, closed="neither")],
        "dp_sample_size": [None, Interval(Real, 0.0, None, closed="neither")],
        "encoder_sizes": ["array-like"],
        "decoder_sizes": [None, "array-like"],
        "likelihood": [StrOptions({"auto", "bernoulli", "gaussian"})],
        "gumbel": [StrOptions({"soft", "hard", "none"})],
        "z_given_y": ["boolean"],
        "tau_start": [Interval(Real, 0.0, None, closed="neither")],
        "tau_min": [Interval(Real, 0.0, None, closed="neither")],
        "tau_decay": [Interval(Real, 0.0, None, closed="left")],
        "pretrain_iter": [Interval(Integral, 0, None, closed="left")],
        "alternate_every": [Interval(Integral, 1, None, closed="left")],
        "prior_learning_rate": [Interval(Real, 0.0, 1.0, closed="right")],
        "active_threshold": [Interval(Real, 0.0, 1.0, closed="left")],
        "beta": [Interval(Real, 0.0, None, closed="left")],
        "learning_rate": [Interval(Real, 0.0, None, closed="neither")],
        "max_grad_norm": [None, Interval(Real, 0.0, None, closed="neither")],
        "batch_size": [Interval(Integral, 1, None, closed="left")],
        "optimizer": [StrOptions({"adam", "adamw", "sgd", "rmsprop"})],
        "n_score_samples": [Interval(Integral, 1, None, closed="left")],
        "reg_covar": [Interval(Real, 0.0, None, closed="left")],
        "callback": [None, callable],
    }

    def __init__(
        self,
        n_components=30,
        *,
        latent_dim=10,
        prior_update="joint",
        covariance_type="diag",
        weight_concentration_prior=None,
        dp_sample_size=1000,
        encoder_sizes=(500, 500),
        decoder_sizes=None,
        likelihood="auto",
        gumbel="soft",
        z_given_y=False,
        tau_start=1.0,
        tau_min=0.5,
        tau_decay=0.0139,
        pretrain_iter=10,
        alternate_every=5,
        prior_learning_rate=1.0,
        active_threshold=0.01,
        beta=1.0,
        learning_rate=1e-3,
        max_grad_norm=None,
        batch_size=128,
        optimizer="adam",
        n_score_samples=32,
        reg_covar=1e-6,
        callback=None,
        tol=1e-3,
        max_iter=100,
        n_init=1,
        random_state=None,
        warm_start=False,
        verbose=0,
        verbose_interval=10,
        device="auto",
        dtype=None,
        chunk_size=None,
    ):
        super().__init__(
            tol=tol, max_iter=max_iter, n_init=n_init, random_state=random_state,
            warm_start=warm_start, verbose=verbose, verbose_interval=verbose_interval,
            device=device, dtype=dtype, chunk_size=chunk_size,
        )
        self.n_components = n_components
        self.latent_dim = latent_dim
        self.prior_update = prior_update
        self.covariance_type = covariance_type
        self.weight_concentration_prior = weight_concentration_prior
        self.dp_sample_size = dp_sample_size
        self.encoder_sizes = encoder_sizes
        self.decoder_sizes = decoder_sizes
        self.likelihood = likelihood
        self.gumbel = gumbel
        self.z_given_y = z_given_y
        self.tau_start = tau_start
        self.tau_min = tau_min
        self.tau_decay = tau_decay
        self.pretrain_iter = pretrain_iter
        self.alternate_every = alternate_every
        self.prior_learning_rate = prior_learning_rate
        self.active_threshold = active_threshold
        self.beta = beta
        self.learning_rate = learning_rate
        self.max_grad_norm = max_grad_norm
        self.batch_size = batch_size
        self.optimizer = optimizer
        self.n_score_samples = n_score_samples
        self.reg_covar = reg_covar
        self.callback = callback

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.transformer_tags.preserves_dtype = ["float64", "float32"]  # dtype=None
        return tags

    @property
    def _n_features_out(self):
        return self.latent_dim

    # ------------------------------------------------------------ checks
    def _layer_sizes(self):
        """Validated ``(encoder_sizes, decoder_sizes)``."""
        sizes = []
        for name in ("encoder_sizes", "decoder_sizes"):
            value = getattr(self, name)
            if value is None:  # the decoder mirrors the encoder
                sizes.append(tuple(reversed(sizes[0])))
                continue
            value = tuple(value)
            if not all(isinstance(s, Integral) and not isinstance(s, bool) and s >= 1
                       for s in value):
                raise ValueError(f"{name} must be a sequence of positive ints, got {value!r}.")
            sizes.append(tuple(int(s) for s in value))
        return tuple(sizes)

    @staticmethod
    def _in_unit_interval(X, partition):
        """Whether every process's ``X`` lies in [0, 1]."""
        inside = bool((X >= 0).all() and (X <= 1).all()) if X.shape[0] else True
        return partition.all_true(inside)

    def _check_parameters(self, X, ctx):
        n_samples = ctx.partition.n_total
        if n_samples < self.n_components:
            raise ValueError(
                f"Expected n_samples >= n_components but got n_components = "
                f"{self.n_components}, n_samples = {n_samples}."
            )
        self._layer_sizes()
        if self.tau_min > self.tau_start:
            raise ValueError(
                f"tau_min={self.tau_min} must not exceed tau_start={self.tau_start}."
            )
        if self.likelihood == "bernoulli" and not self._in_unit_interval(X, ctx.partition):
            raise ValueError(
                "likelihood='bernoulli' needs X in [0, 1]; scale the data or "
                "use likelihood='gaussian'."
            )

    # ------------------------------------------------------------ build
    def _build(self, X, ctx):
        """The networks (input scaling set from all processes' rows) and the prior."""
        likelihood = self.likelihood
        if likelihood == "auto":
            in_unit = self._in_unit_interval(X, ctx.partition)
            likelihood = "bernoulli" if in_unit else "gaussian"
        encoder_sizes, decoder_sizes = self._layer_sizes()
        K, d = self.n_components, self.latent_dim
        module = build_module(
            lambda: GMVAE(X.shape[1], d, K, encoder_sizes, decoder_sizes, likelihood,
                          self.z_given_y),
            ctx.generator, ctx.device, ctx.dtype,
        )
        if ctx.partition.active:  # with random_state=None the processes' draws differ
            module.load_state_dict(_distributed.broadcast_object(module.state_dict()))
        if likelihood == "gaussian":
            shift, spread = column_moments(X, ctx.partition)
            scale = spread.mean().sqrt()
            module.set_input_scaling(shift, torch.where(scale > 0, scale, torch.ones_like(scale)))
        if self.prior_update == "none":
            prior = build_module(lambda: GaussianMixturePrior(K, d), ctx.generator, ctx.device,
                                 ctx.dtype)
        else:
            prior = DirichletProcessGMM(
                K, d, self.covariance_type, self.weight_concentration_prior,
                reg_covar=self.reg_covar,
            ).to(device=ctx.device, dtype=ctx.dtype)
            if self.dp_sample_size is not None:
                prior.count_scale = min(1.0, float(self.dp_sample_size) / ctx.partition.n_total)
        return module, prior

    def _make_optimizer(self):
        params = list(self.module_.parameters()) + list(self.prior_.parameters())
        return make_optimizer(self.optimizer, params, self.learning_rate)

    def _optimizer(self):
        """The networks' optimizer (a new one after unpickling)."""
        if getattr(self, "optimizer_", None) is None:
            self.optimizer_ = self._make_optimizer()
        return self.optimizer_

    def _train_epoch(self, loss_fn, X, ctx, optimizer, phase):
        self.module_.train()
        return train_epoch(
            loss_fn, optimizer, X, ctx, batch_size=self.batch_size, phase=phase,
            max_grad_norm=self.max_grad_norm, owner=type(self).__name__,
        )

    def _initialize(self, X, ctx):
        self.module_, self.prior_ = self._build(X, ctx)
        self.n_epochs_ = 0
        # auto-encoder pre-training (VaDE's recipe)
        optimizer = self._make_optimizer()
        for _ in range(self.pretrain_iter):
            loss = self._train_epoch(lambda xb: pretrain_loss(self.module_, xb), X, ctx,
                                     optimizer, "pre-training")
            ctx.progress.step(phase="pre-training", loss=loss)
        self.optimizer_ = self._make_optimizer()
        if self.module_.likelihood == "gaussian":
            self.module_.eval()
            with torch.no_grad():
                residuals = self._map_chunks(self.module_.squared_residuals, X, X.device)
            total = ctx.partition.sum(residuals.sum(0))
            self.module_.fit_noise_scale(total / ctx.partition.n_total)
        m, _, _ = self._encode(X, "pre-training")
        # the auto-encoder trained the code means only: start q(z|x) narrow
        variance = 0.01 * column_moments(m, ctx.partition)[1]
        self.module_.set_code_variance(variance.clamp_min(torch.finfo(m.dtype).tiny))
        _, labels = kmeans(m, self.n_components, ctx.generator, partition=ctx.partition)
        if self.prior_update == "none":
            init_mixture_prior(self.prior_, m, variance.expand_as(m), labels, ctx.partition)
        else:
            resp = torch.nn.functional.one_hot(labels, self.n_components).to(m.dtype)
            self.prior_.fit(m, resp, partition=ctx.partition)
        self._check_prior("the prior's initialisation")
        self._update_attributes()

    def _encode(self, X, phase):
        """``(m, v, log q(y|x))`` of all rows (no gradient, chunked), checked finite."""
        self.module_.eval()
        with torch.no_grad():
            m, v, log_qy = self._map_chunks(lambda c: self.module_.infer(c, self.prior_),
                                            X, X.device)
        if not bool(torch.isfinite(m).all() & torch.isfinite(v).all()):
            self._diverged(f"{phase}: the latent codes became NaN or infinite")
        return m, v, log_qy

    def _diverged(self, what):
        raise TrainingDivergedError(
            f"{type(self).__name__} diverged during {what} "
            f"(learning_rate={self.learning_rate:g}). Use a smaller learning rate, "
            "max_grad_norm, scale the data, or dtype='float64'."
        )

    def _check_prior(self, phase):
        values = [self.prior_.weights(), self.prior_.means, self.prior_.covariances]
        if not all(bool(torch.isfinite(t).all()) for t in values):
            self._diverged(f"{phase}: the prior became NaN or infinite")

    def _tau(self):
        return max(self.tau_start * math.exp(-self.tau_decay * self.n_epochs_), self.tau_min)

    def _fit_iteration(self, X, ctx):
        tau = self._tau()
        loss = self._train_epoch(
            lambda xb: negative_elbo(self.module_, self.prior_, xb, ctx.generator, tau,
                                     self.gumbel, self.beta),
            X, ctx, self._optimizer(), "training",
        )
        self.n_epochs_ += 1
        self._update_prior(X, ctx)
        self._update_attributes()
        metrics = {"objective": -loss, "loss": loss, "tau": tau, "n_active": self.n_components_}
        if self.callback is not None:
            metrics.update(self.callback(self) or {})
        return metrics

    def _update_prior(self, X, ctx):
        if self.prior_update == "none":
            return
        refit = self.prior_update == "alternating"
        if refit and self.n_epochs_ % self.alternate_every:
            return
        m, v, log_qy = self._encode(X, "training")
        with torch.no_grad():
            if refit:
                _, labels = kmeans(m, self.n_components, ctx.generator, partition=ctx.partition)
                resp = torch.nn.functional.one_hot(labels, self.n_components).to(m.dtype)
                self.prior_.fit(m, resp, partition=ctx.partition)
                # the refit permutes the clusters: restart the residual head
                self.module_.y_head.weight.zero_()
                self.module_.y_head.bias.zero_()
            else:
                self.prior_.set_priors(m, v, partition=ctx.partition)
                self.prior_.update(m, log_qy.exp(), v, rho=float(self.prior_learning_rate),
                                   partition=ctx.partition)
        self._check_prior("the prior update")

    def _update_attributes(self):
        with torch.no_grad():
            self.weights_ = to_numpy(self.prior_.weights())
            self.means_ = to_numpy(self.prior_.means)
            self.covariances_ = to_numpy(self.prior_.covariances)
        self.active_components_ = np.flatnonzero(self.weights_ > self.active_threshold)
        self.n_components_ = int(self.active_components_.size)

    def _get_state(self):
        return copy.deepcopy({
            "module": self.module_.state_dict(),
            "prior": self.prior_.state_dict(),
            "optimizer": self._optimizer().state_dict(),
            "n_epochs": self.n_epochs_,
        })

    def _set_state(self, state):
        self.module_.load_state_dict(state["module"])
        self.prior_.load_state_dict(state["prior"])
        self._optimizer().load_state_dict(state["optimizer"])
        self.n_epochs_ = state["n_epochs"]
        self._update_attributes()

    def __getstate__(self):
        state = super().__getstate__()
        # the optimizer refers to the networks' parameters, which pickling copies
        state.pop("optimizer_", None)
        return state

    def _n_progress_steps(self):
        return self.pretrain_iter

    def _converged(self, objectives):
        return smoothed_converged(objectives, self.tol)

    def _finalize_fit(self, X, ctx):
        self.module_.eval()

    def _prepare_inference(self, device):
        self.module_.to(device)
        self.prior_.to(device)
        self.module_.eval()

    # ------------------------------------------------------------ inference
    def _work_per_row(self):
        width = max(self.n_features_in_, *sum(self._layer_sizes(), ()))
        return 4 * width * self.n_score_samples

    def _estimate_log_prob_resp(self, X, noise=None):
        """``(log p(x) estimate, log q(y|x))`` of a chunk; the estimate uses the
        standard-normal draws ``noise`` (shared by every chunk of a call) and
        is not computed (None) without them."""
        m, v, log_resp = self.module_.infer(X, self.prior_)
        if noise is None:
            return None, log_resp
        return importance_weighted_log_likelihood(
            self.module_, self.prior_, X, m, v, noise), log_resp

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
        return to_numpy(self._inference(lambda c: self._estimate_log_prob_resp(c)[1], X).exp())

    def score_samples(self, X):
        """Importance-weighted *estimate* of ``log p(x)`` for each sample.

        ``log 1/S sum_s p(x|z_s) p(z_s) / q(z_s|x)`` with ``S = n_score_samples``
        draws from the encoder's Gaussian and the prior mixture at its point
        estimates. It is a stochastic lower bound of ``log p(x)`` (in
        expectation) that tightens as ``S`` grows. The standard-normal draws
        are made once per call (from ``random_state``) and shared by all rows,
        so the value of a row depends neither on the other rows nor on the
        chunking. For the Bernoulli likelihood the value is that of the
        Bernoulli model of ``x`` in ``[0, 1]``.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)

        Returns
        -------
        log_prob : ndarray of shape (n_samples,)
        """
        check_is_fitted(self)
        device = self._runtime_device()
        # Drawn on the CPU, so that a model scores the same on every device.
        cpu = torch.device("cpu")
        noise = torch.randn(
            self.n_score_samples, self.latent_dim, dtype=self._torch_dtype(),
            generator=make_generator(self.random_state, cpu),
        ).to(device)
        return to_numpy(self._inference(lambda c: self._estimate_log_prob_resp(c, noise)[0], X))

    def transform(self, X):
        """Latent means ``E[z | x]``.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)

        Returns
        -------
        Z : ndarray of shape (n_samples, latent_dim)
        """
        return to_numpy(self._inference(lambda c: self.module_.infer(c, self.prior_)[0], X))

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
        with self._threads(Z.shape[0], device), torch.no_grad():
            self._prepare_inference(device)
            out = self._map_chunks(lambda z: self.module_.mean(self.module_.decode(z)), Z, device)
        return to_numpy(out)

    def _sample(self, n_samples, generator):
        return sample(self.module_, self.prior_, n_samples, generator, self.active_threshold)

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
        full = self.covariance_type == "full" and self.prior_update != "none"
        cov = d * (d + 1) // 2 if full else d
        return int(n + (K - 1) + K * (d + cov))
