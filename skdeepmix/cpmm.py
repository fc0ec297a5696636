"""``CPMMEstimator``: continuously parameterized mixtures (Bender et al., ICML 2023)."""

from __future__ import annotations

import copy
import math
from numbers import Integral, Real

import numpy as np
import torch
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted

from ._base import BaseDeepMixture
from ._distributed import RowPartition, broadcast_object
from ._docstrings import fill_doc
from ._gaussian import mfa_sample
from ._kmeans import kmeans
from ._torch_utils import build_module, chunk_rows, to_numpy
from ._train import make_optimizer, smoothed_converged, train_epoch, train_step
from .nn.cpmm import (
    ADAPTIVE_METHODS,
    FIXED_STEP_METHODS,
    CPMMNet,
    dequantize,
    logit_inverse,
    logit_transform,
    mixture_log_prob,
)
from .nn.flows import CNF

__all__ = ["CPMMEstimator"]


def auto_rank(n_features):
    """The factor rank of ``rank='auto'``: ``round(sqrt(n_features))``, at least 1.

    A component's covariance gets more directions when the data has more
    features, though fewer than the features themselves.
    """
    return max(1, min(n_features, round(math.sqrt(n_features))))


@fill_doc(
    tol=1e-3,
    max_iter=200,
    tol_meaning=(
        "Training stops when the mean training log-likelihood, averaged over "
        "3 epochs, improves by less than ``tol`` times its magnitude on the 3 "
        "epochs before (``skdeepmix._train.smoothed_converged``)."
    ),
    iteration="epochs on the input space (after the curriculum)",
)
class CPMMEstimator(BaseDeepMixture):
    """Continuously parameterized (hierarchical) mixture of factor analysers.

    A neural ODE (``torchdiffeq``) evolves the parameters of a mixture of
    factor analysers (MFA) along a pseudotime ``t in [0, 1]``. Each of the
    ``n_components`` learnable initial states spans one trajectory, i.e. one
    cluster, whose components are the MFA parameters read off the trajectory
    at ``n_points_per_trajectory`` pseudotimes::

        p(x) = sum_c eta_c sum_j pi_c(t_j) N(x; mu_c(t_j), A_c(t_j) A_c(t_j)^T + D_c(t_j))

    Training maximises the likelihood with mini-batch gradients (pseudotimes
    drawn uniformly per step, or fixed). With ``curriculum='flow'`` a
    continuous normalizing flow teacher is first trained to map the data to
    ``N(0, I)``; the model is then trained for ``space_iter`` epochs on each
    intermediate space ``u_v(x)``, ``v = 1 -> 0`` (``n_spaces`` of them),
    before the ``max_iter`` epochs on the input space. With
    ``curriculum=None`` the trajectories start at k-means centroids.

    After ``fit`` the components are extracted at evenly spaced pseudotimes
    and cached; the ODE and the teacher are dropped (unless ``keep_ode`` /
    ``keep_teacher``), so ``score_samples``, ``predict`` and ``sample`` need
    no ODE solve. ``predict`` returns the cluster (trajectory) ``c``.

    The model is trained on internally standardised data
    ``z = (T(x) - shift_) / scale_`` (``T``: the preprocessing; per-feature
    mean and scale, so that the optimizer's steps are in units of each
    feature's spread); the fitted parameters and the densities are in the
    input space (or in the logit space for ``preprocessing='logit'``; the
    densities then include the log-Jacobian, so they are densities of ``X``
    itself).

    Parameters
    ----------
    n_components : int, default=10
        ``C``, number of trajectories (clusters).
    n_points_per_trajectory : int, default=25
        ``G``, pseudotimes (components) per trajectory during training and at
        extraction (paper: 25).
    rank : int or 'auto', default='auto'
        ``R``, rank of the factor loadings (at most ``n_features``). ``'auto'``:
        ``round(sqrt(n_features))``, so 8 for ``load_digits`` and 28 for MNIST
        (chosen on validation splits: ``benchmarks/results/defaults_cpmm_rank.md``).
    augment_factor : float, default=2.0
        Size of the augmented state ``alpha`` relative to the unaugmented
        state (paper: 2-4; for images: extra channels per state channel).
    hidden_size : int, default=32
        Width of the ODE function (MLP units, or CNN channels; the cost of the
        CNN grows with its square).
    ode_depth : int, default=3
        Number of layers of the ODE function.
    activation : {'sin', 'tanh'}, default='sin'
    image_shape : tuple of int, optional
        ``(H, W)`` or ``(H, W, C)`` of flat inputs of shape ``(n, H*W*C)``
        (pixels in row-major order, channels last). Not needed for
        image-shaped inputs ``(n, H, W)`` / ``(n, H, W, C)``. Images use the
        CNN ODE function (3x3 convolutions over the state's channels).
    shared_ode : bool, default=True
        One ODE for all trajectories, or one per trajectory.
    learn_component_weights : bool, default=False
        Put ``log pi`` in the state; else ``pi_c(t_j) = 1/G``.
    min_variance : float, default=1e-4
        Floor of the factor analysers' noise variances ``d``, relative to the
        mean variance of the (preprocessed) training features: every
        ``d_j >= min_variance * mean_k Var(x_k)`` in the input (or logit)
        space. Applied as the paper's soft clip (``log d = m +
        softplus(raw - m)``; the paper clips at ``log d >= -6`` in its logit
        space). Like ``reg_covar``, it keeps components from collapsing onto
        (nearly) constant pixels; chosen by validation (doc/user_guide/cpmm.md).
    pseudotimes : {'uniform', 'fixed'}, default='uniform'
        Pseudotimes per training step: ``G`` sorted uniform draws, or the
        evenly spaced extraction times.
    ode_method : str, default='rk4'
        ``torchdiffeq`` solver.
    ode_step_size : float, default=0.5
        Step of the fixed-step solvers (the default RK4 takes two steps from
        ``t = 0`` to ``1``: 8 evaluations of the ODE function and one more
        for the cubic interpolation).
    ode_interpolation : {'cubic', 'linear'}, default='cubic'
        States between the steps of a fixed-step solver: cubic Hermite with
        the ODE's slopes (smooth trajectories) or linear (torchdiffeq's
        ``interp`` option; the same values, computed in one batch).
    rtol, atol : float, default=1e-3, 1e-4
        Tolerances of the adaptive solvers.
    adjoint : bool, default=False
        Backpropagate with the adjoint method.
    gradient_checkpointing : bool, default=False
        Recompute the ODE function in the backward pass (saves memory).
    curriculum : {'flow'} or None, default=None
        ``'flow'``: the paper's curriculum through the spaces of a flow
        teacher; ``None``: direct training from a k-means start (the default:
        better and faster in our CPU-scale measurements, see doc/user_guide/cpmm.md).
    n_spaces : int, default=51
        Spaces of the curriculum, latent and input space included.
    space_iter : int, default=1
        Epochs per curriculum space (paper: 1 on the full 60k MNIST).
    curriculum_init : {'random', 'kmeans', 'kmeans_input'}, default='random'
        Start of the curriculum: random start states spread over the latent
        normal (paper: random), k-means in the teacher's latent space, or
        k-means on the input space with the start states set to the clusters'
        means and variances in the latent space (``'kmeans_input'``).
    restart_optimizer : bool, default=True
        Start every curriculum space, and the epochs on the input space, with
        a fresh optimizer state (Adam's moment estimates of the earlier spaces
        shrink the steps on the later ones).
    init_iter : int, default=0
        With ``curriculum=None``: optimizer steps fitting each trajectory's
        means through its cluster's k-means sub-centroids (ordered along the
        cluster's principal axis) before the likelihood training; 0 starts
        from the k-means centroids only.
    teacher_init : {'gaussian', 'random'}, default='gaussian'
        ``'gaussian'``: the teacher's dynamics get a fixed linear term set to
        the maximum-likelihood Gaussian (``W = -1/2 log Sigma``, ZCA
        whitening; exact trace), the MLP starting at zero output;
        ``'random'``: MLP dynamics only, default initialisation.
    teacher_hidden_size : int, default=64
    teacher_depth : int, default=3
    teacher_iter : int, default=30
        Training epochs of the flow teacher.
    teacher_learning_rate : float, default=3e-3
    teacher_ode_step_size : float, default=0.25
        RK4 step of the teacher.
    entropy_reg : float, default=0.0
        Weight of the entropy of the batch-mean cluster responsibilities
        (maximised; discourages collapsed trajectories).
    preprocessing : {'logit'} or None, default=None
        ``'logit'``: ``X`` in ``[0, 1]`` (e.g. pixels / 255) is mapped by
        ``logit(alpha + (1 - 2 alpha) x)``, alpha = 1e-6; the log-Jacobian is
        included in every density.
    dequantize : bool, default=True
        With ``preprocessing='logit'``, train on ``(255 x + u) / 256``,
        ``u ~ U[0, 1)`` (fresh each epoch). Pass dequantised data to
        ``score_samples`` for bits/dim.
    augment_noise : float, default=0.01
        Std of Gaussian noise added to training batches (standardised units).
    optimizer : {'adam', 'adamw', 'sgd', 'rmsprop'}, default='adam'
        Optimizer of every phase (teacher, pre-fit, curriculum, epochs).
    learning_rate : float, default=3e-3
    batch_size : int, default=256
    max_grad_norm : float or None, default=10.0
        Clip the global gradient norm in every phase (teacher included).
    {shared_parameters}
    keep_ode : bool, default=False
        Keep the trained ODE module as ``module_``.
    keep_teacher : bool, default=False
        Keep the flow teacher as ``teacher_``.

    Attributes
    ----------
    weights_ : ndarray of shape (n_components, n_points_per_trajectory)
        ``eta_c pi_c(t_j)`` (sums to one).
    cluster_weights_ : ndarray of shape (n_components,)
    means_ : ndarray of shape (n_components, n_points_per_trajectory, n_features)
    factor_loadings_ : ndarray of shape (n_components, n_points_per_trajectory, n_features, R)
        ``R`` is ``rank_``.
    rank_ : int
        The rank used (``rank``, or the one ``'auto'`` chose).
    noise_variance_ : ndarray of shape (n_components, n_points_per_trajectory, n_features)
    pseudotimes_ : ndarray of shape (n_points_per_trajectory,)
    shift_ : ndarray of shape (n_features,)
        Per-feature mean of the (preprocessed) training data.
    scale_ : ndarray of shape (n_features,)
        Per-feature scale of the internal standardisation:
        ``sqrt(Var(x_j) + 1e-4 * mean_k Var(x_k))`` (constant features keep a
        small positive scale).
    image_shape_ : tuple (H, W, C) or None
        Image layout of the features (from ``image_shape`` or the input).
    history_ : list of dict
        Per epoch on the input space: ``objective`` (mean training
        log-likelihood of ``X``) and ``loss`` (the minimised loss).
    curriculum_history_ : list of dict
        Per curriculum space: ``v`` and the mean log-likelihood in that space.
    teacher_history_ : list of dict
        Per teacher epoch: the mean log-likelihood of the training data.
    module_ : CPMMNet
        Only with ``keep_ode=True`` or ``warm_start=True``.
    teacher_ : CNF
        Only with ``keep_teacher=True`` and ``curriculum='flow'``.
    converged_, n_iter_, lower_bound_, lower_bounds_, n_features_in_

    Notes
    -----
    Under torch.distributed each process passes its shard to ``fit``: the
    standardisation, the k-means start and the teacher's Gaussian are
    computed from all the shards, and the gradients of every phase are
    averaged, so every process holds the same model. A ``warm_start`` fit
    continues with a fresh optimizer state (it is not pickled).

    Examples
    --------
    >>> from sklearn.datasets import load_digits
    >>> from skdeepmix import CPMMEstimator
    >>> X = load_digits().data[:200]
    >>> est = CPMMEstimator(n_components=3, n_points_per_trajectory=4, rank=2,
    ...                     max_iter=2, random_state=0)
    >>> est.fit(X).means_.shape
    (3, 4, 64)
    >>> est.predict(X[:5]).shape
    (5,)
    """

    _accepts_images = True

    _parameter_constraints: dict = {
        **BaseDeepMixture._parameter_constraints,
        "n_components": [Interval(Integral, 1, None, closed="left")],
        "n_points_per_trajectory": [Interval(Integral, 1, None, closed="left")],
        "rank": [Interval(Integral, 1, None, closed="left"), StrOptions({"auto"})],
        "augment_factor": [Interval(Real, 0, None, closed="left")],
        "hidden_size": [Interval(Integral, 1, None, closed="left")],
        "ode_depth": [Interval(Integral, 2, None, closed="left")],
        "activation": [StrOptions({"sin", "tanh"})],
        "image_shape": [tuple, list, None],
        "shared_ode": ["boolean"],
        "learn_component_weights": ["boolean"],
        "min_variance": [Interval(Real, 0, None, closed="neither")],
        "pseudotimes": [StrOptions({"uniform", "fixed"})],
        "ode_method": [StrOptions(set(FIXED_STEP_METHODS) | set(ADAPTIVE_METHODS))],
        "ode_step_size": [Interval(Real, 0, 1, closed="right")],
        "ode_interpolation": [StrOptions({"cubic", "linear"})],
        "rtol": [Interval(Real, 0, None, closed="neither")],
        "atol": [Interval(Real, 0, None, closed="neither")],
        "adjoint": ["boolean"],
        "gradient_checkpointing": ["boolean"],
        "curriculum": [StrOptions({"flow"}), None],
        "n_spaces": [Interval(Integral, 2, None, closed="left")],
        "space_iter": [Interval(Integral, 1, None, closed="left")],
        "curriculum_init": [StrOptions({"random", "kmeans", "kmeans_input"})],
        "restart_optimizer": ["boolean"],
        "init_iter": [Interval(Integral, 0, None, closed="left")],
        "teacher_init": [StrOptions({"gaussian", "random"})],
        "teacher_hidden_size": [Interval(Integral, 1, None, closed="left")],
        "teacher_depth": [Interval(Integral, 2, None, closed="left")],
        "teacher_iter": [Interval(Integral, 0, None, closed="left")],
        "teacher_learning_rate": [Interval(Real, 0, None, closed="neither")],
        "teacher_ode_step_size": [Interval(Real, 0, 1, closed="right")],
        "entropy_reg": [Interval(Real, 0, None, closed="left")],
        "preprocessing": [StrOptions({"logit"}), None],
        "dequantize": ["boolean"],
        "augment_noise": [Interval(Real, 0, None, closed="left")],
        "optimizer": [StrOptions({"adam", "adamw", "sgd", "rmsprop"})],
        "learning_rate": [Interval(Real, 0, None, closed="neither")],
        "batch_size": [Interval(Integral, 1, None, closed="left")],
        "max_grad_norm": [Interval(Real, 0, None, closed="neither"), None],
        "keep_ode": ["boolean"],
        "keep_teacher": ["boolean"],
    }

    def __init__(
        self,
        n_components=10,
        n_points_per_trajectory=25,
        rank="auto",
        *,
        augment_factor=2.0, hidden_size=32, ode_depth=3, activation="sin", image_shape=None,
        shared_ode=True, learn_component_weights=False, min_variance=1e-4,
        pseudotimes="uniform", ode_method="rk4", ode_step_size=0.5, ode_interpolation="cubic",
        rtol=1e-3, atol=1e-4, adjoint=False, gradient_checkpointing=False,
        curriculum=None, n_spaces=51, space_iter=1, curriculum_init="random",
        restart_optimizer=True, init_iter=0,
        teacher_init="gaussian", teacher_hidden_size=64, teacher_depth=3, teacher_iter=30,
        teacher_learning_rate=3e-3, teacher_ode_step_size=0.25,
        entropy_reg=0.0, preprocessing=None, dequantize=True, augment_noise=0.01,
        optimizer="adam", learning_rate=3e-3, batch_size=256, max_grad_norm=10.0,
        tol=1e-3, max_iter=200, n_init=1, random_state=None, warm_start=False, verbose=0,
        verbose_interval=10, device="auto", dtype=None, chunk_size=None,
        keep_ode=False, keep_teacher=False,
    ):
        super().__init__(
            tol=tol, max_iter=max_iter, n_init=n_init, random_state=random_state,
            warm_start=warm_start, verbose=verbose, verbose_interval=verbose_interval,
            device=device, dtype=dtype, chunk_size=chunk_size,
        )
        self.n_components = n_components
        self.n_points_per_trajectory = n_points_per_trajectory
        self.rank = rank
        self.augment_factor = augment_factor
        self.hidden_size = hidden_size
        self.ode_depth = ode_depth
        self.activation = activation
        self.image_shape = image_shape
        self.shared_ode = shared_ode
        self.learn_component_weights = learn_component_weights
        self.min_variance = min_variance
        self.pseudotimes = pseudotimes
        self.ode_method = ode_method
        self.ode_step_size = ode_step_size
        self.ode_interpolation = ode_interpolation
        self.rtol = rtol
        self.atol = atol
        self.adjoint = adjoint
        self.gradient_checkpointing = gradient_checkpointing
        self.curriculum = curriculum
        self.n_spaces = n_spaces
        self.space_iter = space_iter
        self.curriculum_init = curriculum_init
        self.restart_optimizer = restart_optimizer
        self.init_iter = init_iter
        self.teacher_init = teacher_init
        self.teacher_hidden_size = teacher_hidden_size
        self.teacher_depth = teacher_depth
        self.teacher_iter = teacher_iter
        self.teacher_learning_rate = teacher_learning_rate
        self.teacher_ode_step_size = teacher_ode_step_size
        self.entropy_reg = entropy_reg
        self.preprocessing = preprocessing
        self.dequantize = dequantize
        self.augment_noise = augment_noise
        self.optimizer = optimizer
        self.learning_rate = learning_rate
        self.batch_size = batch_size
        self.max_grad_norm = max_grad_norm
        self.keep_ode = keep_ode
        self.keep_teacher = keep_teacher

    # ------------------------------------------------------------ validation
    def _validate_X(self, X, *, reset):
        X = super()._validate_X(X, reset=reset)
        if self.preprocessing == "logit" and X.size and (X.min() < 0 or X.max() > 1):
            raise ValueError(
                "preprocessing='logit' needs X in [0, 1] (e.g. pixel values / 255); "
                f"got values in [{X.min():.4g}, {X.max():.4g}]."
            )
        return X

    def _check_parameters(self, X, ctx):
        if ctx.partition.n_total < self.n_components:
            raise ValueError(
                f"n_samples={ctx.partition.n_total} should be >= "
                f"n_components={self.n_components}."
            )
        n_features = X.shape[1]
        if self.rank == "auto":
            self.rank_ = auto_rank(n_features)
        elif self.rank > n_features:
            raise ValueError(f"rank={self.rank} should be <= n_features={n_features}.")
        else:
            self.rank_ = self.rank

    # ------------------------------------------------------------ data
    def _preprocess(self, X):
        """``(Y, log|dY/dX|)`` of the preprocessing (identity or logit)."""
        if self.preprocessing != "logit":
            return X, X.new_zeros(X.shape[0])
        return logit_transform(X)

    def _training_data(self, X, ctx):
        """Standardised training rows (fresh dequantisation) and the mean
        log-Jacobian from them back to ``X`` (a float)."""
        if self.preprocessing == "logit" and self.dequantize:
            X = dequantize(X, ctx.generator)
        Y, log_jac = self._preprocess(X)
        Z, log_det = self.module_.standardize(Y)
        return Z, float(log_jac.mean()) + log_det if Y.shape[0] else log_det

    def _set_standardization(self, X, ctx):
        """Per-feature mean and global std of the preprocessed data, over all shards."""
        if self.preprocessing == "logit" and self.dequantize:
            X = dequantize(X, ctx.generator)
        self.module_.set_standardization(*_standardization(self._preprocess(X)[0],
                                                           ctx.partition))

    def _train_times(self, ctx):
        G = self.n_points_per_trajectory
        opts = dict(dtype=ctx.dtype, device=ctx.device)
        if self.pseudotimes == "fixed":
            return torch.linspace(0.0, 1.0, G, **opts)
        times, _ = torch.sort(torch.rand(G, generator=ctx.generator, **opts))
        return times + torch.arange(G, **opts) * 1e-6  # strictly increasing

    # ------------------------------------------------------------ building
    def _build_net(self, n_features, ctx, generator):
        return build_module(
            lambda: CPMMNet(
                n_features, self.n_components, self.rank_,
                augment_factor=self.augment_factor, hidden=self.hidden_size,
                depth=self.ode_depth, activation=self.activation,
                image_shape=self.image_shape_, shared_ode=self.shared_ode,
                weights_in_state=self.learn_component_weights,
                min_variance=self.min_variance, method=self.ode_method,
                step_size=self.ode_step_size, rtol=self.rtol, atol=self.atol,
                adjoint=self.adjoint, checkpoint=self.gradient_checkpointing,
                interp=self.ode_interpolation,
            ),
            generator, ctx.device, ctx.dtype,
        )

    def _new_optimizer(self, parameters, learning_rate=None):
        return make_optimizer(
            self.optimizer, list(parameters),
            self.learning_rate if learning_rate is None else learning_rate,
        )

    def _train(self, loss_fn, optimizer, Z, ctx, phase):
        with torch.enable_grad():
            return train_epoch(
                loss_fn, optimizer, Z, ctx, batch_size=self.batch_size, phase=phase,
                max_grad_norm=self.max_grad_norm, owner=type(self).__name__,
            )

    def _train_epoch(self, Z, ctx, phase):
        """One epoch of the CPMM on the standardised rows ``Z``: ``(mean
        log-likelihood of the rows, mean loss)``, read once per epoch."""
        module = self.module_
        module.train()
        sums, counts = [], []

        def loss_fn(batch):
            if self.augment_noise > 0:
                batch = batch + self.augment_noise * torch.randn(
                    batch.shape, dtype=batch.dtype, device=batch.device,
                    generator=ctx.generator,
                )
            log_prob, joint = module.log_prob(batch, self._train_times(ctx))
            sums.append(log_prob.detach().sum())
            counts.append(batch.shape[0])
            losses = -log_prob
            if self.entropy_reg > 0:
                resp = torch.softmax(joint, dim=1).mean(0)
                entropy = -(resp * torch.log(resp.clamp_min(1e-12))).sum()
                losses = losses - self.entropy_reg * entropy
            return losses

        if "_optimizer" not in self.__dict__:  # a warm start after unpickling
            self._optimizer = self._new_optimizer(module.parameters())
        loss = self._train(loss_fn, self._optimizer, Z, ctx, phase)
        loglik = float(torch.stack(sums).sum()) / max(sum(counts), 1) if sums else math.nan
        return loglik, loss

    # --------------------------------------------------------------- hooks
    def _n_progress_steps(self):
        if self.curriculum is None:
            return self.init_iter
        return self.teacher_iter + self.n_spaces * self.space_iter

    def _converged(self, objectives):
        return smoothed_converged(objectives, self.tol)

    def _initialize(self, X, ctx):
        shared = _shared_generator(ctx)
        self.module_ = self._build_net(X.shape[1], ctx, shared)
        self._set_standardization(X, ctx)
        self.curriculum_history_, self.teacher_history_ = [], []
        self.__dict__.pop("teacher_", None)
        Z, offset = self._training_data(X, ctx)
        if self.curriculum is None:
            labels = self._init_kmeans(Z * self.module_.scale, Z, ctx, shared)
            if self.init_iter:
                self._prefit_trajectories(Z, labels, ctx, shared)
        else:
            self._run_curriculum(Z, offset, ctx, shared)
        if self.curriculum is None or self.restart_optimizer:
            self._optimizer = self._new_optimizer(self.module_.parameters())

    def _init_kmeans(self, Z, stats_on, ctx, generator):
        """Start states at k-means clusters of ``Z`` (means, per-feature
        variances and proportions measured on ``stats_on``); returns the labels.

        In the input space ``Z`` is given in the data's own geometry (not
        standardised per feature, which would give nearly constant pixels
        the weight of the informative ones)."""
        C, partition = self.n_components, ctx.partition
        chunk = chunk_rows(C + Z.shape[1], self.chunk_size, device=Z.device)
        _, labels = kmeans(Z, C, generator, chunk_size=chunk, partition=partition)
        counts, means, var = _cluster_moments(stats_on, labels, C, partition)
        log_var = torch.maximum(torch.log(var), self.module_.log_floor)
        self.module_.init_state(means, log_var, loadings_scale=0.1, generator=generator)
        with torch.no_grad():
            self.module_.cluster_logits.copy_(torch.log(counts.clamp_min(1.0) / counts.sum()))
        return labels

    def _prefit_trajectories(self, Z, labels, ctx, generator):
        """Regress each trajectory onto its cluster's ordered k-means
        sub-centroids (``init_iter`` steps; see ``init_iter``)."""
        G = self.n_points_per_trajectory
        targets = _trajectory_targets(Z, labels, self.n_components, G, generator,
                                      chunk_rows(G + Z.shape[1], self.chunk_size,
                                                 device=Z.device))
        times = torch.linspace(0.0, 1.0, G, dtype=ctx.dtype, device=ctx.device)
        module = self.module_

        def loss_fn(target):  # one loss per trajectory
            _, means, _, log_noise = module.components(times)
            return (((means - target[:, :, 0]) ** 2).mean((1, 2))
                    + 0.1 * ((log_noise - target[:, :, 1]) ** 2).mean((1, 2)))

        optimizer = self._new_optimizer(module.parameters())
        for _ in range(self.init_iter):
            with torch.enable_grad():
                loss = train_step(loss_fn, optimizer, targets, ctx, phase="trajectory pre-fit",
                                  max_grad_norm=self.max_grad_norm, owner=type(self).__name__)
            ctx.progress.step(phase="pre-fit", loss=loss)

    def _run_curriculum(self, Z, offset, ctx, generator):
        """Train the flow teacher, start the CPMM in its latent space and
        train it on the spaces ``u_v``, ``v = 1 -> 0``."""
        teacher = self._train_teacher(Z, offset, ctx, generator)
        vs = torch.linspace(0.0, 1.0, self.n_spaces, dtype=Z.dtype, device=Z.device)
        spaces = teacher.transform(Z, vs)  # (V, n, D), spaces[0] == Z
        if self.keep_teacher:
            self.teacher_ = teacher
        if self.curriculum_init == "kmeans":
            self._init_kmeans(spaces[-1], spaces[-1], ctx, generator)
        elif self.curriculum_init == "kmeans_input":
            self._init_kmeans(spaces[0] * self.module_.scale, spaces[-1], ctx, generator)
        else:
            self.module_.init_random(generator)
        optimizer = None
        for i in range(self.n_spaces - 1, -1, -1):
            if self.restart_optimizer or optimizer is None:
                self._optimizer = optimizer = self._new_optimizer(self.module_.parameters())
            v = float(vs[i])
            for _ in range(self.space_iter):
                loglik, loss = self._train_epoch(spaces[i], ctx, f"curriculum (space v={v:.3g})")
                ctx.progress.step(phase="curriculum", v=v, loss=loss)
            self.curriculum_history_.append({"v": v, "log_likelihood": loglik})

    def _train_teacher(self, Z, offset, ctx, generator):
        teacher = build_module(
            lambda: CNF(Z.shape[1], hidden=self.teacher_hidden_size, depth=self.teacher_depth,
                        activation="tanh", linear=self.teacher_init == "gaussian",
                        step_size=self.teacher_ode_step_size),
            generator, ctx.device, ctx.dtype,
        )
        if self.teacher_init == "gaussian":
            # the linear part is the closed-form (shrunk) Gaussian MLE and stays
            # fixed: trained on mini-batches its D x D matrix overfits at once
            teacher.init_gaussian(*_moments(Z, ctx.partition))
            teacher.dynamics.linear.requires_grad_(False)
        optimizer = self._new_optimizer(
            [p for p in teacher.parameters() if p.requires_grad], self.teacher_learning_rate
        )
        for epoch in range(self.teacher_iter):
            loss = self._train(lambda batch: -teacher.log_prob(batch, ctx.generator),
                               optimizer, Z, ctx, "teacher training")
            self.teacher_history_.append({"epoch": epoch + 1, "log_likelihood": offset - loss})
            ctx.progress.step(phase="teacher", loss=loss)
        teacher.eval()
        return teacher

    def _fit_iteration(self, X, ctx):
        Z, offset = self._training_data(X, ctx)
        loglik, loss = self._train_epoch(Z, ctx, "training")
        return {"objective": loglik + offset, "loss": loss}

    def _get_state(self):
        return {
            "module": copy.deepcopy(self.module_.state_dict()),
            "curriculum_history": list(self.curriculum_history_),
            "teacher_history": list(self.teacher_history_),
            "teacher": self.__dict__.get("teacher_"),
        }

    def _set_state(self, state):
        self.module_.load_state_dict(state["module"])
        self.curriculum_history_ = state["curriculum_history"]
        self.teacher_history_ = state["teacher_history"]
        if state["teacher"] is not None:
            self.teacher_ = state["teacher"]

    def _finalize_fit(self, X, ctx):
        module = self.module_.eval()
        times = torch.linspace(0.0, 1.0, self.n_points_per_trajectory, dtype=ctx.dtype,
                               device=ctx.device)
        with torch.no_grad():
            log_w, means, loadings, log_noise = module.components(times)
        s, shift = module.scale.detach().clone(), module.shift.detach().clone()
        # cached in the standardised space (better conditioned numerics);
        # the public attributes are in the input (or logit) space
        self._components = {"log_weights": log_w, "means": means, "loadings": loadings,
                            "log_noise_var": log_noise, "shift": shift, "scale": s}
        self.shift_, self.scale_ = to_numpy(shift), to_numpy(s)
        self.pseudotimes_ = to_numpy(times)
        self.weights_ = to_numpy(log_w.exp())
        self.cluster_weights_ = self.weights_.sum(1)
        self.means_ = to_numpy(means * s + shift)
        self.factor_loadings_ = to_numpy(loadings * s[:, None])
        self.noise_variance_ = to_numpy(torch.exp(log_noise + 2.0 * torch.log(s)))
        self.__dict__.pop("_optimizer", None)
        if not (self.keep_ode or self.warm_start):
            del self.module_
        if not self.keep_teacher:
            self.__dict__.pop("teacher_", None)

    def _check_warm_start(self):
        if not hasattr(self, "module_"):
            raise ValueError(
                "warm_start=True continues the trained ODE, which this model did not "
                "keep: it was fitted with warm_start=False and keep_ode=False. Fit it "
                "with warm_start=True (or keep_ode=True) first, or set warm_start=False "
                "to fit from scratch.")

    def _prepare_inference(self, device):
        dtype = self._torch_dtype()
        self._components = {k: v.to(device=device, dtype=dtype)
                            for k, v in self._components.items()}
        if "module_" in self.__dict__:
            self.module_.to(device)

    def _estimate_log_prob_resp(self, X):
        Y, log_jac = self._preprocess(X)
        c = self._components
        log_prob, joint = mixture_log_prob(
            (Y - c["shift"]) / c["scale"], c["log_weights"], c["means"], c["loadings"],
            c["log_noise_var"],
        )
        log_resp = joint - log_prob[:, None]
        return log_prob + log_jac - torch.log(c["scale"]).sum(), log_resp

    def _work_per_row(self):
        K = self.n_components * self.n_points_per_trajectory
        return K * (self.rank_ + 4) + 4 * self.n_features_in_

    def _sample(self, n_samples, generator):
        c = self._components
        C, G = c["log_weights"].shape
        flat = torch.multinomial(
            c["log_weights"].exp().reshape(-1), n_samples, replacement=True, generator=generator
        )
        D = c["means"].shape[-1]
        Z = mfa_sample(c["means"].reshape(C * G, D), c["loadings"].reshape(C * G, D, -1),
                       c["log_noise_var"].reshape(C * G, D), flat, generator)
        return self._postprocess(Z * c["scale"] + c["shift"]), flat // G

    def _postprocess(self, Y):
        return logit_inverse(Y) if self.preprocessing == "logit" else Y

    def _n_parameters(self):
        C, G = self.n_components, self.n_points_per_trajectory
        D, R = self.n_features_in_, self.rank_
        n = C * G * D * (R + 2) + (C - 1)
        if self.learn_component_weights:
            n += C * (G - 1)
        return n

    # ------------------------------------------------------------ extras
    def score_samples_ode(self, X, pseudotimes=None):
        """Log-density of ``X`` computed by solving the ODE (needs ``keep_ode=True``).

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        pseudotimes : array-like of shape (T,), optional
            Increasing pseudotimes in ``[0, 1]``; default ``pseudotimes_``.

        Returns
        -------
        log_prob : ndarray of shape (n_samples,)
        """
        check_is_fitted(self)
        if "module_" not in self.__dict__:
            raise ValueError(
                "The ODE was dropped after fit; refit with keep_ode=True to evaluate "
                "the model through the ODE."
            )
        times = self.pseudotimes_ if pseudotimes is None else np.asarray(pseudotimes)
        module = self.module_.eval()

        def log_prob(chunk):
            Y, log_jac = self._preprocess(chunk)
            Z, log_det = module.standardize(Y)
            t = torch.as_tensor(times, dtype=chunk.dtype, device=chunk.device)
            return module.log_prob(Z, t)[0] + log_jac + log_det

        return to_numpy(self._inference(log_prob, X))

    def trajectory_means(self):
        """Means of the extracted components in the input space.

        Returns
        -------
        means : ndarray of shape (n_components, n_points_per_trajectory, n_features)
            ``means_`` mapped back through the preprocessing (e.g. sigmoid
            for ``preprocessing='logit'``), ready to be shown as image rows.
        """
        check_is_fitted(self)
        return to_numpy(self._postprocess(torch.as_tensor(self.means_)))


# ---------------------------------------------------------------- data statistics
def _shared_generator(ctx):
    """A generator in the same state on every process, for the draws that
    must agree (weights, k-means, start states); ``ctx.generator`` draws the
    per-shard randomness (batches, noise, dequantisation)."""
    seed = int(torch.randint(2**62, (1,), generator=ctx.generator, device=ctx.device))
    return torch.Generator(device=ctx.device).manual_seed(broadcast_object(seed))


def _standardization(Y, partition, relative_floor=1e-4):
    """Per-feature mean (D,), scale (D,) and the mean variance of the rows of
    all shards.

    ``scale_j = sqrt(var_j + relative_floor * mean(var))``: every feature gets
    unit variance (the optimizer's steps are then in units of each feature's
    spread), except (nearly) constant features, which keep a small scale
    instead of a division by zero. In float64: squares of huge inputs stay finite.
    """
    Y = Y.double()
    n = partition.n_total
    shift = partition.sum(Y.sum(0)) / n
    var = partition.sum((Y - shift).square().sum(0)) / n
    mean_var = torch.where(var.mean() > 0, var.mean(), 1.0)  # 1: every feature constant
    return shift, (var + relative_floor * mean_var).sqrt(), mean_var


def _moments(Z, partition):
    """Mean (D,) and maximum-likelihood covariance (D, D) of the rows of all shards."""
    Zd = Z.double()
    mean = partition.sum(Zd.sum(0)) / partition.n_total
    centred = Zd - mean
    return mean, partition.sum(centred.T @ centred) / partition.n_total


def _cluster_moments(Z, labels, n_clusters, partition):
    """Counts (C,), means (C, D) and per-feature variances (C, D) of the
    labelled rows of all shards (centred second pass; empty or single-row
    clusters get the global mean and unit variance)."""
    members = torch.nn.functional.one_hot(labels, n_clusters).to(Z.dtype)  # (n, C)
    counts, sums = members.sum(0), members.T @ Z
    partition.sum(counts, sums)
    global_mean = partition.sum(Z.sum(0)) / partition.n_total
    means = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1.0)[:, None], global_mean)
    sq = partition.sum(members.T @ (Z - means[labels]).square())
    var = torch.where(counts[:, None] > 1, sq / counts.clamp_min(1.0)[:, None],
                      torch.ones_like(sq))
    return counts, means, var


def _trajectory_targets(Z, labels, n_clusters, G, generator, chunk):
    """Ordered sub-centroids of each cluster, resampled to ``G`` pseudotimes.

    Within cluster ``c`` the rows (of all shards) are split into ``k =
    min(G, n_c)`` sub-clusters by k-means; the sub-centroids are ordered along
    the cluster's first principal axis (power iteration) and linearly
    interpolated onto ``G`` evenly spaced points, with the sub-clusters' log
    variances. Returns a tensor of shape (C, G, 2, D): means, log variances.
    """
    D = Z.shape[1]
    targets = torch.zeros(n_clusters, G, 2, D, dtype=Z.dtype, device=Z.device)
    for c in range(n_clusters):
        rows = Z[labels == c]
        part = RowPartition(rows.shape[0])  # this cluster's rows over the shards
        if part.n_total == 0:
            continue
        k = min(G, part.n_total)
        _, sub = kmeans(rows, k, generator, chunk_size=chunk, partition=part)
        counts, centres, var = _cluster_moments(rows, sub, k, part)
        centred = rows - part.sum(rows.sum(0)) / part.n_total
        axis = torch.randn(D, 1, generator=generator, dtype=Z.dtype, device=Z.device)
        for _ in range(20):  # power iteration on the cluster's covariance
            axis = part.sum(centred.T @ (centred @ axis))
            axis = axis / axis.norm().clamp_min(1e-30)
        order = torch.argsort((centres @ axis).squeeze(1))
        path = torch.stack([centres[order], torch.log(var[order].clamp_min(1e-3))], dim=1)
        position = torch.linspace(0.0, k - 1.0, G, dtype=Z.dtype, device=Z.device)
        low = position.floor().long().clamp(max=max(k - 2, 0))
        frac = (position - low).clamp(0.0, 1.0)[:, None, None]
        high = (low + 1).clamp(max=k - 1)
        targets[c] = path[low] * (1 - frac) + path[high] * frac
    return targets
