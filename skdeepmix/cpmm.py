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
from ._gaussian import mfa_sample
from ._torch_utils import to_numpy
from ._train import iter_minibatches
from .nn.cpmm import ADAPTIVE_METHODS, FIXED_STEP_METHODS, CPMMNet, mixture_log_prob
from .nn.flows import CNF

__all__ = ["CPMMEstimator"]

_LOGIT_ALPHA = 1e-6


def _seed_from(generator):
    return int(torch.randint(2**31 - 1, (1,), generator=generator, device=generator.device))


class CPMMEstimator(BaseDeepMixture):
    """Continuously parameterized (hierarchical) mixture of factor analysers.

    A neural ODE (``torchdiffeq``) evolves the parameters of a mixture of
    factor analysers (MFA) along a pseudotime ``t in [0, 1]``. Each of the
    ``n_clusters`` learnable initial states spans one trajectory, i.e. one
    cluster, whose components are the MFA parameters read off the trajectory
    at ``n_components_per_cluster`` pseudotimes::

        p(x) = sum_c eta_c sum_j pi_c(t_j) N(x; mu_c(t_j), A_c(t_j) A_c(t_j)^T + D_c(t_j))

    Training maximises the likelihood with Adam on mini-batches (pseudotimes
    drawn uniformly per step, or fixed). With ``curriculum='flow'`` a
    continuous normalizing flow teacher is first trained to map the data to
    ``N(0, I)``; the model is then trained for one epoch on each intermediate
    space ``u_v(x)``, ``v = 1 -> 0`` (``n_spaces`` of them), before the
    ``max_iter`` fine-tuning epochs on the input space. With
    ``curriculum=None`` the trajectories start at k-means centroids.

    After ``fit`` the components are extracted at evenly spaced pseudotimes
    and cached; the ODE and the teacher are dropped (unless ``keep_ode`` /
    ``keep_teacher``), so ``score_samples``, ``predict`` and ``sample`` need
    no ODE solve. ``predict`` returns the cluster (trajectory) ``c``.

    The model is trained on internally standardised data (per-feature mean,
    one global scale); the fitted parameters and densities are in the input
    space (or in the logit space for ``preprocessing='logit'``, the densities
    then include the log-Jacobian, so they are densities of ``X`` itself).

    Parameters
    ----------
    n_clusters : int, default=10
        ``C``, number of trajectories (clusters).
    n_components_per_cluster : int, default=25
        ``G``, pseudotimes per trajectory during training and at extraction.
    rank : int, default=4
        ``R``, rank of the factor loadings.
    augment_factor : float, default=2.0
        Size of the augmented state ``alpha`` relative to the unaugmented
        state (paper: 2-4; for images: extra channels per state channel).
    hidden_size : int, default=128
        Width of the ODE function (MLP units, or CNN channels).
    ode_depth : int, default=3
        Number of layers of the ODE function.
    activation : {'sin', 'tanh'}, default='sin'
    image_shape : tuple of int or None, default=None
        ``(H, W)`` or ``(channels, H, W)`` of the (flattened, channel-first)
        rows of ``X``: use the CNN ODE function over image-shaped state.
    shared_ode : bool, default=True
        One ODE for all trajectories, or one per trajectory.
    learn_component_weights : bool, default=False
        Put ``log pi`` in the state; else ``pi_c(t_j) = 1/G``.
    min_log_noise : float, default=-6.0
        Soft lower clip of ``log d`` (standardised units).
    pseudotimes : {'uniform', 'fixed'}, default='uniform'
        Pseudotimes per training step: ``G`` sorted uniform draws, or the
        evenly spaced extraction times.
    ode_method : str, default='rk4'
        ``torchdiffeq`` solver.
    ode_step_size : float, default=0.25
        Step of the fixed-step solvers.
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
        better and faster in our CPU-scale measurements, see doc/cpmm.md).
    n_spaces : int, default=51
        Spaces of the curriculum, latent and input space included.
    space_epochs : int, default=1
        Epochs per curriculum space (paper: 1 on the full 60k MNIST). More
        steps per space were not better on our 4k-image MNIST validation runs
        (2 epochs per space made the curriculum degenerate, see doc/cpmm.md).
    curriculum_init : {'random', 'kmeans', 'kmeans_input'}, default='random'
        Start of the curriculum: random start states spread over the latent
        normal (paper: random), k-means in the teacher's latent space, or
        k-means on the input space with the start states set to the clusters'
        means and variances in the latent space (``'kmeans_input'``).
    restart_optimizer : bool, default=True
        Start every curriculum space, and the fine-tuning, with a fresh Adam
        state. Carried over, the second-moment estimates of the earlier spaces
        (large gradients right after each change of space; Adam's
        ``beta2 = 0.999`` averages over ~1000 steps) shrink the steps on the
        later spaces, and the short stages cannot follow the spaces.
    init_trajectory_steps : int, default=0
        With ``curriculum=None``: Adam steps fitting each trajectory's means
        through its cluster's k-means sub-centroids (ordered along the
        cluster's principal axis) before the likelihood training; 0 starts
        from the k-means centroids only (experimental: on the digits data it
        made the fit worse, see doc/cpmm.md).
    teacher_init : {'gaussian', 'random'}, default='gaussian'
        ``'gaussian'``: the teacher's dynamics get a linear term initialised at
        the maximum-likelihood Gaussian (``W = -1/2 log Sigma``, ZCA
        whitening; exact trace), the MLP starting at zero output, so that the
        teacher is a good flow before training and its latent space is
        (close to) ``N(0, I)``; ``'random'``: MLP dynamics only, default
        initialisation.
    teacher_hidden_size : int, default=64
    teacher_depth : int, default=3
    teacher_max_iter : int, default=30
        Training epochs of the flow teacher.
    teacher_learning_rate : float, default=3e-3
    teacher_step_size : float, default=0.25
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
    learning_rate : float, default=3e-3
    batch_size : int, default=256
    max_grad_norm : float or None, default=10.0
    max_iter : int, default=40
        Epochs on the input space (after the curriculum).
    tol : float, default=1e-3
        Stop when the epoch's mean log-likelihood changes less than this.
    n_init : int, default=1
    random_state : int, RandomState or None, default=None
    warm_start : bool, default=False
        Continue training from the fitted state (keeps the ODE).
    verbose : int, default=0
    device : str or torch.device, default='auto'
    dtype : {'float32', 'float64'} or None, default=None
        Precision of the computation and of the fitted attributes. ``None``
        uses the input's floating dtype (float32 stays float32, anything else
        becomes float64), as scikit-learn does.
    keep_ode : bool, default=False
        Keep the trained ODE module as ``module_``.
    keep_teacher : bool, default=False
        Keep the flow teacher as ``teacher_``.
    n_threads : 'auto', int or None, default='auto'
        CPU threads used by torch during ``fit`` (restored afterwards; the
        setting is process-wide). ``'auto'``: one thread for the MLP ODE
        (its many tiny operations run several times slower with more threads
        on a busy machine), torch's default for the CNN; ``None``: torch's
        current setting.

    Attributes
    ----------
    weights_ : ndarray of shape (n_clusters, n_components_per_cluster)
        ``eta_c pi_c(t_j)`` (sums to one).
    cluster_weights_ : ndarray of shape (n_clusters,)
    means_ : ndarray of shape (n_clusters, n_components_per_cluster, n_features)
    factor_loadings_ : ndarray of shape (n_clusters, n_components_per_cluster, n_features, rank)
    noise_variance_ : ndarray of shape (n_clusters, n_components_per_cluster, n_features)
    pseudotimes_ : ndarray of shape (n_components_per_cluster,)
    history_ : list of dict
        Per fine-tuning epoch: ``objective`` (mean training log-likelihood of
        ``X``), ``loss``, ``entropy``.
    curriculum_history_ : list of dict
        Per curriculum space: ``v`` and the mean log-likelihood in that space.
    teacher_history_ : list of dict
        Per teacher epoch: mean log-likelihood (standardised space).
    module_ : CPMMNet
        Only with ``keep_ode=True`` or ``warm_start=True``.
    teacher_ : CNF
        Only with ``keep_teacher=True`` and ``curriculum='flow'``.
    converged_, n_iter_, lower_bound_, lower_bounds_, n_features_in_

    Examples
    --------
    >>> from sklearn.datasets import load_digits
    >>> from skdeepmix.cpmm import CPMMEstimator
    >>> X = load_digits().data[:200]
    >>> est = CPMMEstimator(n_clusters=3, n_components_per_cluster=4, rank=2,
    ...                     curriculum=None, max_iter=2, random_state=0)
    >>> est.fit(X).means_.shape
    (3, 4, 64)
    >>> est.predict(X[:5]).shape
    (5,)
    """

    _INIT_SPREAD = 0.7
    _INIT_ALPHA = 0.0

    _parameter_constraints: dict = {
        **BaseDeepMixture._parameter_constraints,
        "n_clusters": [Interval(Integral, 1, None, closed="left")],
        "n_components_per_cluster": [Interval(Integral, 1, None, closed="left")],
        "rank": [Interval(Integral, 1, None, closed="left")],
        "augment_factor": [Interval(Real, 0, None, closed="left")],
        "hidden_size": [Interval(Integral, 1, None, closed="left")],
        "ode_depth": [Interval(Integral, 2, None, closed="left")],
        "activation": [StrOptions({"sin", "tanh"})],
        "image_shape": [tuple, list, None],
        "shared_ode": ["boolean"],
        "learn_component_weights": ["boolean"],
        "min_log_noise": [Interval(Real, None, None, closed="neither")],
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
        "space_epochs": [Interval(Integral, 1, None, closed="left")],
        "curriculum_init": [StrOptions({"random", "kmeans", "kmeans_input"})],
        "restart_optimizer": ["boolean"],
        "init_trajectory_steps": [Interval(Integral, 0, None, closed="left")],
        "teacher_init": [StrOptions({"gaussian", "random"})],
        "teacher_hidden_size": [Interval(Integral, 1, None, closed="left")],
        "teacher_depth": [Interval(Integral, 2, None, closed="left")],
        "teacher_max_iter": [Interval(Integral, 0, None, closed="left")],
        "teacher_learning_rate": [Interval(Real, 0, None, closed="neither")],
        "teacher_step_size": [Interval(Real, 0, 1, closed="right")],
        "entropy_reg": [Interval(Real, 0, None, closed="left")],
        "preprocessing": [StrOptions({"logit"}), None],
        "dequantize": ["boolean"],
        "augment_noise": [Interval(Real, 0, None, closed="left")],
        "learning_rate": [Interval(Real, 0, None, closed="neither")],
        "batch_size": [Interval(Integral, 1, None, closed="left")],
        "max_grad_norm": [Interval(Real, 0, None, closed="neither"), None],
        "keep_ode": ["boolean"],
        "keep_teacher": ["boolean"],
        "n_threads": [StrOptions({"auto"}), Interval(Integral, 1, None, closed="left"), None],
    }

    def __init__(
        self,
        n_clusters=10,
        n_components_per_cluster=25,
        rank=4,
        *,
        augment_factor=2.0,
        hidden_size=128,
        ode_depth=3,
        activation="sin",
        image_shape=None,
        shared_ode=True,
        learn_component_weights=False,
        min_log_noise=-6.0,
        pseudotimes="uniform",
        ode_method="rk4",
        ode_step_size=0.25,
        ode_interpolation="cubic",
        rtol=1e-3,
        atol=1e-4,
        adjoint=False,
        gradient_checkpointing=False,
        curriculum=None,
        n_spaces=51,
        space_epochs=1,
        curriculum_init="random",
        restart_optimizer=True,
        init_trajectory_steps=0,
        teacher_init="gaussian",
        teacher_hidden_size=64,
        teacher_depth=3,
        teacher_max_iter=30,
        teacher_learning_rate=3e-3,
        teacher_step_size=0.25,
        entropy_reg=0.0,
        preprocessing=None,
        dequantize=True,
        augment_noise=0.01,
        learning_rate=3e-3,
        batch_size=256,
        max_grad_norm=10.0,
        max_iter=40,
        tol=1e-3,
        n_init=1,
        random_state=None,
        warm_start=False,
        verbose=0,
        device="auto",
        dtype=None,
        keep_ode=False,
        keep_teacher=False,
        n_threads="auto",
    ):
        self.n_clusters = n_clusters
        self.n_components_per_cluster = n_components_per_cluster
        self.rank = rank
        self.augment_factor = augment_factor
        self.hidden_size = hidden_size
        self.ode_depth = ode_depth
        self.activation = activation
        self.image_shape = image_shape
        self.shared_ode = shared_ode
        self.learn_component_weights = learn_component_weights
        self.min_log_noise = min_log_noise
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
        self.space_epochs = space_epochs
        self.curriculum_init = curriculum_init
        self.restart_optimizer = restart_optimizer
        self.init_trajectory_steps = init_trajectory_steps
        self.teacher_init = teacher_init
        self.teacher_hidden_size = teacher_hidden_size
        self.teacher_depth = teacher_depth
        self.teacher_max_iter = teacher_max_iter
        self.teacher_learning_rate = teacher_learning_rate
        self.teacher_step_size = teacher_step_size
        self.entropy_reg = entropy_reg
        self.preprocessing = preprocessing
        self.dequantize = dequantize
        self.augment_noise = augment_noise
        self.learning_rate = learning_rate
        self.batch_size = batch_size
        self.max_grad_norm = max_grad_norm
        self.max_iter = max_iter
        self.tol = tol
        self.n_init = n_init
        self.random_state = random_state
        self.warm_start = warm_start
        self.verbose = verbose
        self.device = device
        self.dtype = dtype
        self.keep_ode = keep_ode
        self.keep_teacher = keep_teacher
        self.n_threads = n_threads

    # ------------------------------------------------------------ training
    def fit_predict(self, X, y=None):
        """Fit the model and return the cluster of each sample of ``X``.

        Equivalent to ``fit(X).predict(X)``.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        y : Ignored

        Returns
        -------
        labels : ndarray of shape (n_samples,)
        """
        threads = self.n_threads
        if threads == "auto":
            threads = 1 if self.image_shape is None else None
        if not (isinstance(threads, Integral) and not isinstance(threads, bool)
                and threads >= 1) or self._fit_device().type != "cpu":
            return super().fit_predict(X, y)
        previous = torch.get_num_threads()
        torch.set_num_threads(int(threads))
        try:
            return super().fit_predict(X, y)
        finally:
            torch.set_num_threads(previous)

    # ------------------------------------------------------------ validation
    def _validate_X(self, X, *, reset):
        X = super()._validate_X(X, reset=reset)
        if self.preprocessing == "logit" and X.size and (X.min() < 0 or X.max() > 1):
            raise ValueError(
                "preprocessing='logit' needs X in [0, 1] (e.g. pixel values / 255); "
                f"got values in [{X.min():.4g}, {X.max():.4g}]."
            )
        return X

    def _check_parameters(self, X):
        n_samples, n_features = X.shape
        if n_samples < self.n_clusters:
            raise ValueError(
                f"n_samples={n_samples} should be >= n_clusters={self.n_clusters}."
            )
        if self.image_shape is not None:
            shape = tuple(self.image_shape)
            if len(shape) not in (2, 3) or not all(
                isinstance(s, Integral) and s > 0 for s in shape
            ):
                raise ValueError(
                    f"image_shape must be (H, W) or (channels, H, W) of positive ints, "
                    f"got {self.image_shape!r}."
                )
            if int(np.prod(shape)) != n_features:
                raise ValueError(
                    f"image_shape={shape} holds {int(np.prod(shape))} values but X has "
                    f"{n_features} features."
                )
        if self.rank > n_features:
            raise ValueError(f"rank={self.rank} should be <= n_features={n_features}.")

    # ----------------------------------------------------------- transforms
    def _preprocess(self, X):
        """``(Y, log|dY/dX|)`` of the preprocessing (identity or logit)."""
        if self.preprocessing != "logit":
            return X, X.new_zeros(X.shape[0])
        a = _LOGIT_ALPHA
        s = a + (1 - 2 * a) * X
        Y = torch.log(s) - torch.log1p(-s)
        log_jac = (math.log(1 - 2 * a) - torch.log(s) - torch.log1p(-s)).sum(1)
        return Y, log_jac

    def _postprocess(self, Y):
        if self.preprocessing != "logit":
            return Y
        a = _LOGIT_ALPHA
        return ((torch.sigmoid(Y) - a) / (1 - 2 * a)).clamp(0.0, 1.0)

    def _training_data(self, X, generator):
        """Standardised training data and the mean log-Jacobian back to ``X``."""
        if self.preprocessing == "logit" and self.dequantize:
            noise = torch.rand(X.shape, dtype=X.dtype, device=X.device, generator=generator)
            X = (255.0 * X + noise) / 256.0
        Y, log_jac = self._preprocess(X)
        Z = (Y - self._shift) / self._scale
        offset = float(log_jac.mean()) - X.shape[1] * math.log(self._scale)
        return Z, offset

    # ------------------------------------------------------------ building
    def _build_module(self, n_features, generator):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_seed_from(generator))
            module = CPMMNet(
                n_features,
                self.n_clusters,
                self.rank,
                augment_factor=self.augment_factor,
                hidden=self.hidden_size,
                depth=self.ode_depth,
                activation=self.activation,
                image_shape=None if self.image_shape is None else tuple(self.image_shape),
                shared_ode=self.shared_ode,
                weights_in_state=self.learn_component_weights,
                min_log_noise=self.min_log_noise,
                method=self.ode_method,
                step_size=self.ode_step_size,
                rtol=self.rtol,
                atol=self.atol,
                adjoint=self.adjoint,
                checkpoint=self.gradient_checkpointing,
                interp=self.ode_interpolation,
            )
        return module.to(device=generator.device, dtype=self._torch_dtype())

    def _build_teacher(self, n_features, generator):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_seed_from(generator))
            teacher = CNF(
                n_features,
                hidden=self.teacher_hidden_size,
                depth=self.teacher_depth,
                activation="tanh",
                linear=self.teacher_init == "gaussian",
                method="rk4",
                step_size=self.teacher_step_size,
            )
        return teacher.to(device=generator.device, dtype=self._torch_dtype())

    def _train_times(self, generator):
        G = self.n_components_per_cluster
        device = generator.device
        dtype = self._torch_dtype()
        if self.pseudotimes == "fixed":
            return torch.linspace(0.0, 1.0, G, dtype=dtype, device=device)
        times = torch.rand(G, dtype=dtype, device=device, generator=generator)
        times, _ = torch.sort(times)
        # strictly increasing (odeint requirement)
        return times + torch.arange(G, dtype=dtype, device=device) * 1e-6

    # --------------------------------------------------------------- hooks
    def _initialize(self, X, generator, y=None):
        n_samples, n_features = X.shape
        Y, _ = self._preprocess(X)
        self._shift = Y.mean(0)
        self._scale = float(Y.std(0).pow(2).mean().sqrt().clamp_min(1e-12))
        self.module_ = self._build_module(n_features, generator)
        self._reset_optimizer()
        self.curriculum_history_ = []
        self.teacher_history_ = []
        if self.curriculum is None:
            self._init_kmeans(X, generator)
            return
        # curriculum: teacher flow, then one epoch per space v = 1 -> 0
        Z, _ = self._training_data(X, generator)
        teacher = self._train_teacher(Z, generator)
        vs = torch.linspace(0.0, 1.0, self.n_spaces, dtype=Z.dtype, device=Z.device)
        spaces = teacher.transform(Z, vs)  # (V, n, D), spaces[0] == Z
        if self.keep_teacher:
            self.teacher_ = teacher
        C, D = self.n_clusters, n_features
        # random start states spread over the (ideally) standard normal latent
        # space, components narrower than the data: the mixture starts away from
        # the symmetric all-components-equal saddle point
        if self.curriculum_init == "kmeans":
            # k-means in the teacher's latent space u_1
            self._init_kmeans_on(spaces[-1], generator)
        elif self.curriculum_init == "kmeans_input":
            # k-means on the input space; the start states are the clusters'
            # means and variances in the latent space
            self._init_kmeans_on(spaces[0], generator, stats_on=spaces[-1])
        else:
            spread = self._INIT_SPREAD
            means = spread * torch.randn(C, D, dtype=Z.dtype, device=Z.device,
                                         generator=generator)
            log_noise = torch.full((C, D), math.log(1.0 - spread**2), dtype=Z.dtype,
                                   device=Z.device)
            self.module_.init_state(means, log_noise, loadings_scale=0.1,
                                    alpha_scale=self._INIT_ALPHA, generator=generator)
        progress = None
        if self.verbose:
            from tqdm.auto import tqdm

            progress = tqdm(total=self.n_spaces, desc="CPMM curriculum", leave=self.verbose > 1)
        try:
            for i in range(self.n_spaces - 1, -1, -1):
                if self.restart_optimizer:
                    self._reset_optimizer()
                for _ in range(self.space_epochs):
                    stats = self._train_epoch(spaces[i], generator)
                v = float(vs[i])
                self.curriculum_history_.append({"v": v, "log_likelihood": stats["loglik"]})
                if not math.isfinite(stats["loglik"]):
                    from ._base import TrainingDivergedError

                    raise TrainingDivergedError(
                        f"CPMMEstimator diverged in the curriculum at space v={v:.3f}. Try "
                        "a smaller learning_rate, dtype='float64' or more n_spaces."
                    )
                if progress is not None:
                    progress.update(1)
                    progress.set_postfix(v=f"{v:.2f}", loglik=f"{stats['loglik']:.4g}")
        finally:
            if progress is not None:
                progress.close()
        if self.restart_optimizer:
            self._reset_optimizer()

    def _reset_optimizer(self):
        """A fresh Adam (new moment estimates): at the start and for a new curriculum stage."""
        self.optimizer_ = torch.optim.Adam(self.module_.parameters(), lr=self.learning_rate)

    def _init_kmeans(self, X, generator):
        Z, _ = self._training_data(X, generator)
        self._init_kmeans_on(Z, generator)

    def _init_kmeans_on(self, Z, generator, stats_on=None):
        from sklearn.cluster import KMeans

        Zn = to_numpy(Z).astype(np.float64)
        km = KMeans(self.n_clusters, n_init=3, random_state=_seed_from(generator)).fit(Zn)
        labels = km.labels_
        C, D = self.n_clusters, Z.shape[1]
        if stats_on is not None:
            Zn = to_numpy(stats_on).astype(np.float64)
            km.cluster_centers_ = np.stack([
                Zn[labels == c].mean(0) if np.any(labels == c) else Zn.mean(0)
                for c in range(C)])
        log_noise = np.zeros((C, D))
        counts = np.bincount(labels, minlength=C).astype(float)
        for c in range(C):
            members = Zn[labels == c]
            var = members.var(0) if len(members) > 1 else np.ones(D)
            log_noise[c] = np.log(np.maximum(var, 1e-3))
        to = dict(dtype=Z.dtype, device=Z.device)
        self.module_.init_state(
            torch.as_tensor(km.cluster_centers_, **to),
            torch.as_tensor(log_noise, **to),
            loadings_scale=0.1,
            generator=generator,
        )
        with torch.no_grad():
            props = torch.as_tensor(np.maximum(counts, 1.0) / counts.sum(), **to)
            self.module_.cluster_logits.copy_(torch.log(props))
        if self.init_trajectory_steps > 0:
            self._prefit_trajectories(Zn, labels, generator)

    def _prefit_trajectories(self, Zn, labels, generator):
        """Regress each trajectory's means onto ordered k-means sub-centroids.

        Within cluster ``c`` the members are split into ``G`` sub-clusters
        (k-means); the sub-centroids are ordered along the cluster's first
        principal axis and the ODE (start state and dynamics) is fitted by
        least squares so that ``mu_c(t_j)`` passes through them (and
        ``log d_c(t_j)`` matches their log variances). This starts the
        trajectories spread along their clusters instead of at the
        all-components-equal saddle point of the likelihood.
        """
        from sklearn.cluster import KMeans

        C, G, D = self.n_clusters, self.n_components_per_cluster, Zn.shape[1]
        seed = _seed_from(generator)
        targets = np.zeros((C, G, D))
        target_logvar = np.zeros((C, G, D))
        for c in range(C):
            members = Zn[labels == c]
            k = max(1, min(G, len(members)))
            if k > 1:
                km = KMeans(k, n_init=1, random_state=seed).fit(members)
                centres, sub = km.cluster_centers_, km.labels_
            else:
                centres, sub = members.mean(0, keepdims=True), np.zeros(len(members), int)
            axis = np.linalg.svd(members - members.mean(0), full_matrices=False)[2][0]
            order = np.argsort(centres @ axis)
            centres = centres[order]
            var = np.stack([
                members[sub == j].var(0) if np.sum(sub == j) > 1 else members.var(0)
                for j in order
            ])
            # resample the k ordered centres onto the G pseudotimes
            grid = np.linspace(0, 1, k)
            for d in range(D):
                targets[c, :, d] = np.interp(np.linspace(0, 1, G), grid, centres[:, d])
                target_logvar[c, :, d] = np.interp(
                    np.linspace(0, 1, G), grid, np.log(np.maximum(var[:, d], 1e-3))
                )
        to = dict(dtype=self.module_.initial_state.dtype, device=self.module_.initial_state.device)
        targets = torch.as_tensor(targets, **to)
        target_logvar = torch.as_tensor(target_logvar, **to)
        times = torch.linspace(0.0, 1.0, G, **to)
        optimizer = torch.optim.Adam(self.module_.parameters(), lr=1e-2)
        for _ in range(self.init_trajectory_steps):
            optimizer.zero_grad(set_to_none=True)
            _, means, _, log_noise = self.module_.components(times)
            loss = ((means - targets) ** 2).mean() + 0.1 * ((log_noise - target_logvar) ** 2).mean()
            loss.backward()
            optimizer.step()

    def _train_teacher(self, Z, generator):
        teacher = self._build_teacher(Z.shape[1], generator)
        params = list(teacher.parameters())
        if self.teacher_init == "gaussian":
            # the linear part is the closed-form (shrunk) Gaussian MLE and stays
            # fixed: trained on mini-batches its D x D matrix overfits at once
            teacher.init_gaussian(Z)
            teacher.dynamics.linear.requires_grad_(False)
            params = [p for p in params if p.requires_grad]
        optimizer = torch.optim.Adam(params, lr=self.teacher_learning_rate)
        progress = None
        if self.verbose and self.teacher_max_iter:
            from tqdm.auto import tqdm

            progress = tqdm(total=self.teacher_max_iter, desc="CPMM flow teacher",
                            leave=self.verbose > 1)
        try:
            for epoch in range(self.teacher_max_iter):
                total, count = 0.0, 0
                for batch in iter_minibatches(Z.shape[0], self.batch_size, generator):
                    optimizer.zero_grad(set_to_none=True)
                    loss = -teacher.log_prob(Z[batch], generator).mean()
                    if not torch.isfinite(loss):
                        from ._base import TrainingDivergedError

                        raise TrainingDivergedError(
                            "The CPMM flow teacher diverged; try a smaller "
                            "teacher_learning_rate or teacher_step_size."
                        )
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(params, 10.0)
                    optimizer.step()
                    total += float(loss.detach()) * batch.numel()
                    count += batch.numel()
                self.teacher_history_.append({"epoch": epoch + 1, "log_likelihood": -total / count})
                if progress is not None:
                    progress.update(1)
                    progress.set_postfix(loglik=f"{-total / count:.4g}")
        finally:
            if progress is not None:
                progress.close()
        teacher.eval()
        return teacher

    def _train_epoch(self, Z, generator):
        module, optimizer = self.module_, self.optimizer_
        module.train()
        params = list(module.parameters())
        tot_ll, tot_loss, tot_ent, count = 0.0, 0.0, 0.0, 0
        for batch in iter_minibatches(Z.shape[0], self.batch_size, generator):
            xb = Z[batch]
            if self.augment_noise > 0:
                xb = xb + self.augment_noise * torch.randn(
                    xb.shape, dtype=xb.dtype, device=xb.device, generator=generator
                )
            optimizer.zero_grad(set_to_none=True)
            log_prob, joint = module.log_prob(xb, self._train_times(generator))
            mean_ll = log_prob.mean()
            loss = -mean_ll
            resp = torch.softmax(joint, dim=1).mean(0)
            entropy = -(resp * torch.log(resp.clamp_min(1e-12))).sum()
            if self.entropy_reg > 0:
                loss = loss - self.entropy_reg * entropy
            value = float(loss.detach())
            if not math.isfinite(value):
                return {"loglik": math.nan, "loss": math.nan, "entropy": math.nan}
            loss.backward()
            if self.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
            optimizer.step()
            n = batch.numel()
            tot_ll += float(mean_ll.detach()) * n
            tot_loss += value * n
            tot_ent += float(entropy.detach()) * n
            count += n
        return {"loglik": tot_ll / count, "loss": tot_loss / count, "entropy": tot_ent / count}

    def _fit_iteration(self, X, generator, y=None):
        Z, offset = self._training_data(X, generator)
        stats = self._train_epoch(Z, generator)
        return {
            "objective": stats["loglik"] + offset,
            "loss": stats["loss"],
            "entropy": stats["entropy"],
        }

    def _get_state(self):
        return {
            "module": copy.deepcopy(self.module_.state_dict()),
            "optimizer": copy.deepcopy(self.optimizer_.state_dict()),
            "shift": self._shift.clone(),
            "scale": self._scale,
            "curriculum_history": list(self.curriculum_history_),
            "teacher_history": list(self.teacher_history_),
            "teacher": getattr(self, "teacher_", None),
        }

    def _set_state(self, state):
        self.module_.load_state_dict(state["module"])
        self.optimizer_.load_state_dict(state["optimizer"])
        self._shift = state["shift"]
        self._scale = state["scale"]
        self.curriculum_history_ = state["curriculum_history"]
        self.teacher_history_ = state["teacher_history"]
        if state["teacher"] is not None:
            self.teacher_ = state["teacher"]

    def _finalize_fit(self, X, y=None):
        G = self.n_components_per_cluster
        module = self.module_
        module.eval()
        times = torch.linspace(0.0, 1.0, G, dtype=self._torch_dtype(), device=X.device)
        with torch.no_grad():
            log_w, means, loadings, log_noise = module.components(times)
        s = self._scale
        # cached in the standardised space (better conditioned numerics);
        # the public attributes are in the input (or logit) space
        self._components = {
            "log_weights": log_w.detach(),
            "means": means.detach(),
            "loadings": loadings.detach(),
            "log_noise_var": log_noise.detach(),
        }
        self.pseudotimes_ = to_numpy(times)
        self.weights_ = to_numpy(log_w.exp())
        self.cluster_weights_ = self.weights_.sum(1)
        self.means_ = to_numpy(means * s + self._shift)
        self.factor_loadings_ = to_numpy(loadings * s)
        self.noise_variance_ = to_numpy(torch.exp(log_noise + 2.0 * math.log(s)))
        if not (self.keep_ode or self.warm_start):
            del self.module_
            del self.optimizer_
        if not self.keep_teacher and hasattr(self, "teacher_"):
            del self.teacher_

    def _prepare_inference(self, device):
        self._components = {
            k: v.to(device=device, dtype=self._torch_dtype()) for k, v in self._components.items()
        }
        self._shift = self._shift.to(device=device, dtype=self._torch_dtype())
        if hasattr(self, "module_"):
            self.module_.to(device)
            # move the optimizer state with the module (warm_start)
            for state in self.optimizer_.state.values():
                for key, value in state.items():
                    if isinstance(value, torch.Tensor) and value.dim() > 0:
                        state[key] = value.to(device)

    def _estimate_log_prob_resp(self, X):
        Y, log_jac = self._preprocess(X)
        Z = (Y - self._shift) / self._scale
        c = self._components
        log_prob, joint = mixture_log_prob(
            Z, c["log_weights"], c["means"], c["loadings"], c["log_noise_var"]
        )
        log_jac = log_jac - X.shape[1] * math.log(self._scale)
        return log_prob + log_jac, joint - log_prob[:, None]

    def _work_per_row(self):
        K = self.n_clusters * self.n_components_per_cluster
        return K * (self.rank + 4) + 4 * self.n_features_in_

    def _sample(self, n_samples, generator):
        c = self._components
        C, G = c["log_weights"].shape
        flat = torch.multinomial(
            c["log_weights"].exp().reshape(-1), n_samples, replacement=True, generator=generator
        )
        D = c["means"].shape[-1]
        Z = mfa_sample(
            c["means"].reshape(C * G, D),
            c["loadings"].reshape(C * G, D, -1),
            c["log_noise_var"].reshape(C * G, D),
            flat,
            generator,
        )
        return self._postprocess(Z * self._scale + self._shift), flat // G

    def _n_parameters(self):
        C, G = self.n_clusters, self.n_components_per_cluster
        D, R = self.n_features_in_, self.rank
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
        if not hasattr(self, "module_"):
            raise ValueError(
                "The ODE was dropped after fit; refit with keep_ode=True to evaluate "
                "the model through the ODE."
            )
        X = self._validate_X(X, reset=False)
        device = self._runtime_device()
        self._prepare_inference(device)
        times = self.pseudotimes_ if pseudotimes is None else np.asarray(pseudotimes)
        times = torch.as_tensor(times, dtype=self._torch_dtype(), device=device)
        Xt = self._to_tensor(X, device)
        self.module_.eval()
        with torch.no_grad():
            Y, log_jac = self._preprocess(Xt)
            Z = (Y - self._shift) / self._scale
            log_prob, _ = self.module_.log_prob(Z, times)
        return to_numpy(log_prob + log_jac - Xt.shape[1] * math.log(self._scale))

    def trajectory_means(self):
        """Means of the extracted components in the input space.

        Returns
        -------
        means : ndarray of shape (n_clusters, n_components_per_cluster, n_features)
            ``means_`` mapped back through the preprocessing (e.g. sigmoid
            for ``preprocessing='logit'``), ready to be shown as image rows.
        """
        check_is_fitted(self)
        return to_numpy(self._postprocess(torch.as_tensor(self.means_)))
