"""``DeepGMMEstimator``: van den Oord & Schrauwen's deep Gaussian mixture model."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Optional

import numpy as np
import torch
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted

from . import _gaussian as G
from ._base import BaseDeepMixture
from ._distributed import gradient_sync
from ._docstrings import fill_doc
from ._kmeans import assign_labels, kmeans
from ._torch_utils import MEMORY_BUDGET, build_module, chunk_rows, iter_row_chunks, to_numpy
from ._train import _check_training as check_training
from ._train import make_optimizer, smoothed_converged, train_epoch, train_step
from .nn.deep_gmm import (
    DeepGMM,
    accumulate_hard_statistics,
    accumulate_soft_statistics,
    cluster_gaussians,
    empty_statistics,
    init_from_clusters,
    m_step_layers,
)

__all__ = ["DeepGMMEstimator"]

#: global rows per block of the E-step's random restarts (see _restart_paths)
_RESTART_BLOCK = 4096


@dataclass
class _TrainingState:
    """What training carries from one iteration to the next, besides ``module_``.

    Attributes
    ----------
    paths : LongTensor of shape (n_local_rows,) or None
        Flat index of the best path found for every training row of this
        process by the last hard-EM E-step (the warm start of the
        coordinate-ascent heuristic; None when the search is exhaustive).
    optimizer : dict or None
        ``state_dict()`` of the Adam optimizer (``algorithm='adam'`` and
        ``partial_fit``).
    last_loss : float or None
        Mean loss of the last epoch (or ``partial_fit`` step): a loss far
        above it means that training diverged, which one epoch cannot see
        when it is a single batch.
    """

    paths: Optional[torch.Tensor] = None
    optimizer: Optional[dict] = None
    last_loss: Optional[float] = None


@fill_doc(
    tol=1e-3,
    max_iter=1000,
    tol_meaning=(
        "EM: the absolute change of the objective (mean per sample; the mean "
        "best-path log joint density for 'hard_em', the mean log-likelihood for "
        "'soft_em'); 'adam': the relative change of the epoch objective averaged "
        "over 3 epochs."
    ),
    iteration="EM iterations (epochs for algorithm='adam')",
)
class DeepGMMEstimator(BaseDeepMixture):
    """Deep Gaussian mixture model (van den Oord & Schrauwen, NIPS 2014).

    Layers of square affine maps ``y -> A y + b``; layer ``j`` holds
    ``n_components[j]`` nodes. Every *path* (one node per layer) is a
    Gaussian component ``N(beta_p, Omega_p Omega_p^T)`` with ``Omega_p`` the
    product of the maps on the path and ``beta_p`` the mapped biases, so the
    model is a GMM with ``prod(n_components)`` tied components whose parameter
    count grows like ``sum(n_components)``. With one layer it is an ordinary
    full-covariance GMM.

    Training follows the paper: hard EM where the E-step finds the best path
    of every sample (exhaustively when there are few paths, else by the
    coordinate-ascent heuristic: 1 pass from the previous path, 2 passes from
    a random path, keep the better), and the M-step updates the layers one at
    a time from the latent side to the data side, each node maximising the
    trace objective ``log|Q| - 1/2 sum_p pi_p Tr(Gamma_p Q^T Omega_p Q)`` by
    L-BFGS (nodes of a layer in one batch). A soft-EM variant (all
    responsibilities) and a mini-batch Adam trainer of the exact
    log-likelihood are also available.

    Parameters
    ----------
    n_components : int or tuple of int, default=(2, 2, 32)
        Nodes per layer, **from the data side**: ``n_components[0]`` is the
        layer next to the data (applied last when sampling),
        ``n_components[-1]`` the layer next to the latent ``z ~ N(0, I)``. An
        int ``K`` is one layer: a full-covariance GMM with ``K`` components.
        The model has ``prod(n_components)`` components (paths). The
        default, three layers and 128 paths, was chosen with ``prior_count``
        and ``m_step_iter`` on the validation splits of four tasks (digits,
        MNIST, MNIST-logit, BSDS300 patches) and three seeds
        (``benchmarks/results/defaults_deep_gmm_search_seed*.md``); the
        prior's target in
        ``benchmarks/results/defaults_deep_gmm_prior_targets.md``.
    algorithm : {'hard_em', 'soft_em', 'adam'}, default='hard_em'
        ``'hard_em'``: the paper's algorithm (best path per sample);
        ``'soft_em'``: EM with responsibilities over all paths (monotone in the
        log-likelihood); ``'adam'``: mini-batch gradient ascent of the exact
        log-likelihood (one iteration = one epoch).
    path_search : {'auto', 'heuristic', 'exhaustive'}, default='auto'
        E-step of ``'hard_em'``: the coordinate-ascent heuristic or the exact
        search over all paths. ``'auto'`` uses the exhaustive search when it
        costs no more than the heuristic's 3 passes.
    n_restart_passes : int, default=2
        Passes of the heuristic from a random path (after 1 pass from the
        previous path).
    path_weights : {'full', 'factorized'}, default='full'
        One weight per path, or a product of per-layer node weights.
    init_params : {'kmeans', 'kmeans_outer', 'random'}, default='kmeans'
        ``'kmeans'``: k-means clusters (means and covariances) for the
        latent-side layer ``n_components[-1]``, near-identity maps for the
        others (each path starts as a slightly perturbed copy of a k-means
        Gaussian). ``'kmeans_outer'``: k-means for the data-side layer, near
        identity maps in its whitened space for the inner layers.
        ``'random'``: like ``'kmeans'`` with random data points as centres.
    init_noise : float, default=0.1
        Size of the random perturbation of the near-identity maps (relative;
        biases in units of the data standard deviation).
    reg_covar : float, default=1e-6
        Added to the diagonal of every path's covariance in data space, a term
        of the M-step objective that every layer sees through its outer layers
        (with one layer this is exactly a GMM's ``reg_covar``).
    prior_count : float, default=6.0
        Weight, in samples, of a conjugate (Wishart) prior on the covariance
        of every path, a maximum a posteriori fit. Its target ``T`` keeps the
        path's own per-feature variances and takes the correlations of the
        pooled within-path covariance (estimated from all samples, as in
        regularised discriminant analysis): the M-step adds ``prior_count *
        T`` to each path's scatter (seen by every layer through its outer
        layers). With one layer, a component with ``n`` samples gets the
        covariance ``Sigma + (prior_count / n) T``: components with few
        samples (fewer than features, say) become well-conditioned, those
        with many barely move, and a component correlated like the pooled
        data is inflated nearly in proportion rather than in its
        low-variance directions. ``0`` is maximum likelihood, as in the
        paper; without the prior, paths with few samples overfit (on
        ``load_digits`` the held-out log-likelihood of a 64-path model falls
        from +65 to -4252 nats).
    m_step_iter : int, default=10
        L-BFGS iterations per layer and M-step (warm-started from the current
        maps). A partial M-step: ten iterations reach 97-99 % of a full
        M-step's gain, EM takes about as many iterations, and each costs
        half as much (``benchmarks/results/defaults_deep_gmm_search_msi_*.md``).
    learning_rate : float, default=1e-3
        Adam step size (``algorithm='adam'`` and :meth:`partial_fit`).
    batch_size : int, default=256
        Mini-batch size (``algorithm='adam'``).
    max_grad_norm : float or None, default=None
        Clip the global gradient norm of the Adam steps (None: no clipping).
    {shared_parameters}

    Attributes
    ----------
    module_ : skdeepmix.nn.deep_gmm.DeepGMM
        The fitted torch model.
    transforms_ : list of ndarray of shape (n_components[j], n_features, n_features)
        The maps ``A`` of every layer (data side first).
    biases_ : list of ndarray of shape (n_components[j], n_features)
        The biases ``b`` of every layer.
    path_weights_ : ndarray of shape n_components
        Path probabilities ``pi_p`` (they sum to 1).
    n_paths_ : int
        Number of paths = components of the equivalent GMM.
    converged_ : bool
    n_iter_ : int
    lower_bound_ : float
        Objective of the best run at its last iteration: mean best-path log
        joint density (``'hard_em'``) or mean log-likelihood, both of the
        model before that iteration's M-step.
    lower_bounds_ : list of float
    history_ : list of dict
        Per iteration: ``objective`` and, for the heuristic E-step,
        ``switch_rate`` (fraction of samples whose random restart found a
        better path).
    n_steps_ : int
        Number of :meth:`partial_fit` calls since the last initialisation.
    n_features_in_ : int
    feature_names_in_ : ndarray of shape (`n_features_in_`,)

    Notes
    -----
    ``predict`` returns the flat index (C order over ``n_components``) of
    each sample's most likely path and ``predict_proba`` the posterior over
    all paths; :meth:`path_nodes` turns flat indices into node indices. The
    exact density sums over all paths (``n * d^2 * (N_0 + N_0 N_1 + ...)``
    operations, shared partial inversions), chunked over samples and paths.

    What training carries between iterations besides ``module_`` (the
    heuristic's previous paths, Adam's state) is the private fitted attribute
    ``_training_state``; it is part of the snapshots of ``n_init`` and is
    what ``warm_start`` continues from.

    Under ``torch.distributed`` (e.g. ``torchrun``, each process passing its
    shard of the rows), EM is exact: the k-means initialisation, the path
    counts, the M-step statistics and the objective are summed over the
    processes, and the heuristic's random restarts are drawn per global row,
    so every process holds the same model. ``algorithm='adam'`` and
    :meth:`partial_fit` average the gradients over the processes (the
    semantics of ``DistributedDataParallel``).

    References
    ----------
    A. van den Oord and B. Schrauwen. Factoring Variations in Natural Images
    with Deep Gaussian Mixture Models. NIPS 2014.

    Examples
    --------
    >>> import numpy as np
    >>> from skdeepmix import DeepGMMEstimator
    >>> rng = np.random.RandomState(0)
    >>> X = np.concatenate([rng.randn(100, 2), rng.randn(100, 2) + 5])
    >>> dgmm = DeepGMMEstimator(n_components=(2, 2), random_state=0).fit(X)
    >>> dgmm.n_paths_
    4
    >>> dgmm.score_samples(X).shape
    (200,)
    >>> gm = dgmm.to_gaussian_mixture()  # the equivalent shallow GMM
    >>> bool(np.allclose(gm.score_samples(X), dgmm.score_samples(X)))
    True
    """

    _parameter_constraints: dict = {
        **BaseDeepMixture._parameter_constraints,
        "n_components": ["array-like", Interval(Integral, 1, None, closed="left")],
        "algorithm": [StrOptions({"hard_em", "soft_em", "adam"})],
        "path_search": [StrOptions({"auto", "heuristic", "exhaustive"})],
        "n_restart_passes": [Interval(Integral, 0, None, closed="left")],
        "path_weights": [StrOptions({"full", "factorized"})],
        "init_params": [StrOptions({"kmeans", "kmeans_outer", "random"})],
        "init_noise": [Interval(Real, 0.0, None, closed="left")],
        "reg_covar": [Interval(Real, 0.0, None, closed="left")],
        "prior_count": [Interval(Real, 0.0, None, closed="left")],
        "m_step_iter": [Interval(Integral, 1, None, closed="left")],
        "learning_rate": [Interval(Real, 0.0, None, closed="neither")],
        "batch_size": [Interval(Integral, 1, None, closed="left")],
        "max_grad_norm": [Interval(Real, 0.0, None, closed="neither"), None],
    }

    def __init__(
        self,
        n_components=(2, 2, 32),
        *,
        algorithm="hard_em",
        path_search="auto",
        n_restart_passes=2,
        path_weights="full",
        init_params="kmeans",
        init_noise=0.1,
        reg_covar=1e-6,
        prior_count=6.0,
        m_step_iter=10,
        learning_rate=1e-3,
        batch_size=256,
        max_grad_norm=None,
        tol=1e-3,
        max_iter=1000,
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
        self.algorithm = algorithm
        self.path_search = path_search
        self.n_restart_passes = n_restart_passes
        self.path_weights = path_weights
        self.init_params = init_params
        self.init_noise = init_noise
        self.reg_covar = reg_covar
        self.prior_count = prior_count
        self.m_step_iter = m_step_iter
        self.learning_rate = learning_rate
        self.batch_size = batch_size
        self.max_grad_norm = max_grad_norm

    @property
    def _distributed_mode(self):
        """EM all-reduces its statistics ('exact'); Adam averages gradients."""
        return "gradients" if self.algorithm == "adam" else "exact"

    # ------------------------------------------------------------ validation
    def _layer_sizes(self):
        sizes = self.n_components
        if isinstance(sizes, (Integral, np.integer)):
            sizes = (sizes,)
        try:
            sizes = tuple(sizes)
        except TypeError:
            sizes = None
        if (
            not sizes
            or not all(isinstance(n, (Integral, np.integer)) and not isinstance(n, bool)
                       for n in sizes)
            or min(sizes) < 1
        ):
            raise ValueError(
                "n_components must be a positive int or a non-empty sequence of positive "
                f"ints (nodes per layer, data side first), got {self.n_components!r}."
            )
        return tuple(int(n) for n in sizes)

    def _check_parameters(self, X, ctx):
        sizes = self._layer_sizes()
        init_size = sizes[0] if self.init_params == "kmeans_outer" else sizes[-1]
        if ctx.partition.n_total < init_size:
            raise ValueError(
                f"Expected n_samples >= the number of nodes of the initialised layer "
                f"({init_size}, init_params={self.init_params!r}) but got "
                f"n_samples = {ctx.partition.n_total}."
            )

    def _path_search(self):
        """'exhaustive' or 'heuristic' for the hard-EM E-step."""
        if self.path_search != "auto":
            return self.path_search
        sizes = self._layer_sizes()
        k = len(sizes)
        exhaustive = sum(math.prod(sizes[: j + 1]) for j in range(k))
        heuristic = (1 + self.n_restart_passes) * sum(sizes[j] * (k - j) for j in range(k))
        return "exhaustive" if exhaustive <= heuristic else "heuristic"

    def _work_per_row(self):
        """Values per row of the exact density: the partial inversions of every
        path prefix and the (row, path) table."""
        sizes, d = self._layer_sizes(), self.n_features_in_
        prefixes = sum(math.prod(sizes[: j + 1]) for j in range(len(sizes)))
        return math.prod(sizes) + d * prefixes + (d + 1) ** 2

    def _train_chunk_rows(self, device):
        """Rows per chunk of a training pass on ``device`` (the heuristic needs
        less than the exact density)."""
        if self.algorithm == "hard_em" and self._path_search() == "heuristic":
            d = self.n_features_in_
            return chunk_rows(3 * max(self._layer_sizes()) * d + (d + 1) ** 2, self.chunk_size,
                              device=device)
        return self._rows_per_chunk(device)

    # -------------------------------------------------------- initialisation
    def _initialize(self, X, ctx):
        sizes = self._layer_sizes()
        partition, generator = ctx.partition, ctx.generator
        layer = 0 if self.init_params == "kmeans_outer" else len(sizes) - 1
        K, d = sizes[layer], X.shape[1]
        chunk = chunk_rows(K + d, self.chunk_size, device=X.device)
        if self.init_params == "random":
            index = torch.randperm(partition.n_total, generator=generator,
                                   device=generator.device)[:K]
            centers = partition.rows(X, index.to(X.device))
            labels, _ = assign_labels(X, centers, chunk, shift=centers.mean(0))
        else:
            centers, labels = kmeans(X, K, generator, max_iter=100, chunk_size=chunk,
                                     partition=partition)
        A, b, mean, std = cluster_gaussians(X, labels, centers, self.reg_covar, chunk, partition)
        self.module_ = build_module(
            lambda: DeepGMM(sizes, d, path_weights=self.path_weights), generator,
            ctx.device, ctx.dtype,
        )
        init_from_clusters(self.module_, A, b, layer, mean, std, self.init_noise, generator)
        self.module_.requires_grad_(False)
        self._training_state = _TrainingState()

    # ------------------------------------------------------------ iterations
    def _fit_iteration(self, X, ctx):
        if self.algorithm == "adam":
            return self._adam_epoch(X, ctx)
        if self.algorithm == "soft_em":
            return self._soft_em_iteration(X, ctx)
        return self._hard_em_iteration(X, ctx)

    def _converged(self, objectives):
        if self.algorithm == "adam":
            return smoothed_converged(objectives, self.tol)
        return super()._converged(objectives)

    def _hard_em_iteration(self, X, ctx):
        """E-step (best path of every row), statistics, M-step.

        Returns the mean best-path log joint density of the model before the
        M-step (the hard-EM objective, summed over the processes). The
        statistics take a second pass over larger chunks than the E-step's
        (they need ``d + 1`` values per row, not one per path), so that their
        products per (node, inner path) are large.
        """
        module, state, partition = self.module_, self._training_state, ctx.partition
        heuristic = self._path_search() == "heuristic"
        n = X.shape[0]
        previous = state.paths
        if previous is not None and previous.shape[0] != n:
            previous = None  # warm start on other data: search afresh
        if heuristic:  # one seed, the same on every process
            seed = int(torch.randint(2**62, (1,), generator=ctx.generator,
                                     device=ctx.generator.device))
        best = torch.empty(n, dtype=torch.long, device=X.device)
        counts = torch.zeros(module.n_paths, dtype=torch.float64, device=X.device)
        sums = torch.zeros(2, dtype=torch.float64, device=X.device)  # objective, switches
        for rows in iter_row_chunks(n, self._train_chunk_rows(X.device)):
            if heuristic:
                start = _restart_paths(module, seed, partition.offset + rows.start,
                                       partition.offset + rows.stop, X.device)
                warm = None if previous is None else module.unflatten_index(
                    previous[rows].to(X.device))
                paths, score, switched = module.best_paths(X[rows], warm, start,
                                                           self.n_restart_passes)
                best[rows] = module.flat_index(paths)
                sums[1] += switched
            else:
                score, best[rows] = module.log_joint(X[rows], MEMORY_BUDGET).max(1)
            sums[0] += score.sum()
        counts += torch.bincount(best, minlength=module.n_paths)
        centers = module.statistics_centers()
        stats = empty_statistics(module)
        d = X.shape[1]
        for rows in iter_row_chunks(n, chunk_rows(4 * (d + 1), self.chunk_size, device=X.device)):
            paths = module.unflatten_index(best[rows])
            accumulate_hard_statistics(module, X[rows], paths, centers, stats)
        partition.sum(*stats, counts, sums)
        module.set_path_weights_from_counts(counts)
        m_step_layers(module, stats, centers, self.reg_covar, self.m_step_iter,
                      self.prior_count)
        state.paths = best if heuristic else None
        objective, switched = (sums / partition.n_total).tolist()
        return {"objective": objective, **({"switch_rate": switched} if heuristic else {})}

    def _soft_em_iteration(self, X, ctx):
        """E-step (responsibilities over all paths, statistics), then M-step;
        returns the mean log-likelihood of the model before the M-step."""
        module = self.module_
        centers = module.statistics_centers()
        stats = empty_statistics(module)
        resp_sum = torch.zeros(module.n_paths, dtype=torch.float64, device=X.device)
        total = torch.zeros(1, dtype=torch.float64, device=X.device)
        for rows in iter_row_chunks(X.shape[0], self._train_chunk_rows(X.device)):
            log_prob, rs = accumulate_soft_statistics(module, X[rows], centers, stats,
                                                      MEMORY_BUDGET)
            resp_sum += rs
            total += log_prob.sum()
        ctx.partition.sum(*stats, resp_sum, total)
        module.set_path_weights_from_counts(resp_sum)
        m_step_layers(module, stats, centers, self.reg_covar, self.m_step_iter,
                      self.prior_count)
        return float(total) / ctx.partition.n_total

    def _optimizer(self):
        """Adam on the module's parameters, with the state of the last step."""
        optimizer = make_optimizer("adam", self.module_.parameters(), self.learning_rate)
        if self._training_state.optimizer is not None:
            optimizer.load_state_dict(self._training_state.optimizer)
        return optimizer

    def _gradient_steps(self, run, phase):
        """Run ``run(loss_fn, optimizer)`` with gradients on; keep Adam's state.

        Raises :class:`~skdeepmix.TrainingDivergedError` when the loss blew up
        since the last call (the check of :mod:`~skdeepmix._train`, across
        epochs).
        """
        module, state = self.module_, self._training_state
        optimizer = self._optimizer()
        module.requires_grad_(True)
        try:
            with torch.enable_grad():
                loss = run(lambda batch: -module(batch), optimizer)
        finally:
            module.requires_grad_(False)
        previous = loss if state.last_loss is None else state.last_loss
        check_training(optimizer, loss, previous, phase, type(self).__name__)
        state.optimizer, state.last_loss = optimizer.state_dict(), loss
        return -loss

    def _adam_epoch(self, X, ctx):
        """One epoch of Adam on the exact log-likelihood (per-sample losses)."""
        return self._gradient_steps(lambda loss_fn, optimizer: train_epoch(
            loss_fn, optimizer, X, ctx, batch_size=self.batch_size, phase="training",
            max_grad_norm=self.max_grad_norm, owner=type(self).__name__,
        ), "training")

    def _partial_fit_step(self, X, ctx):
        """One Adam step on the exact log-likelihood of the batch ``X``.

        ``partial_fit`` always makes gradient steps (with ``learning_rate``),
        whatever ``algorithm``: the layer-wise M-step needs the statistics of
        the whole data set. Under torch.distributed the gradients are
        averaged over the processes. Returns the batch's mean log-likelihood
        before the step.
        """
        with gradient_sync(True):
            objective = self._gradient_steps(lambda loss_fn, optimizer: train_step(
                loss_fn, optimizer, X, ctx, max_grad_norm=self.max_grad_norm,
                owner=type(self).__name__,
            ), "partial_fit")
        self._update_attributes()
        return objective

    # ------------------------------------------------------- state handling
    def _get_state(self):
        state = self._training_state
        return {
            "module": copy.deepcopy(self.module_.state_dict()),
            "paths": None if state.paths is None else state.paths.clone(),
            "optimizer": copy.deepcopy(state.optimizer),
            "last_loss": state.last_loss,
        }

    def _set_state(self, state):
        self.module_.load_state_dict(state["module"])
        self._training_state = _TrainingState(
            paths=state["paths"], optimizer=copy.deepcopy(state["optimizer"]),
            last_loss=state["last_loss"],
        )
        self._update_attributes()

    def _update_attributes(self):
        module = self.module_
        with torch.no_grad():
            maps = [module.generative_parameters(j) for j in range(module.n_layers)]
            self.path_weights_ = to_numpy(module.log_path_weights().exp())
        self.transforms_ = [to_numpy(A) for A, _ in maps]
        self.biases_ = [to_numpy(b) for _, b in maps]
        self.n_paths_ = module.n_paths

    def _prepare_inference(self, device):
        if self.module_.inv_weight[0].device != device:
            self.module_.to(device)

    # ------------------------------------------------------------ inference
    def _estimate_weighted_log_prob(self, X):
        return self.module_.log_joint(X, MEMORY_BUDGET)

    def _sample(self, n_samples, generator):
        return self.module_.sample(n_samples, generator)

    def path_nodes(self, labels):
        """Node index in every layer of flat path indices (as from ``predict``).

        Parameters
        ----------
        labels : array-like of int of shape (n_samples,)

        Returns
        -------
        nodes : ndarray of shape (n_samples, n_layers)
        """
        check_is_fitted(self)
        labels = np.asarray(labels)
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError("labels must be a 1-D array of integer path indices.")
        if labels.size and (labels.min() < 0 or labels.max() >= self.n_paths_):
            raise ValueError(f"path indices must lie in [0, {self.n_paths_}).")
        return np.stack(np.unravel_index(labels, self._layer_sizes()), 1)

    def _n_parameters(self):
        """Free parameters: maps and biases, less the redundant ones, plus weights.

        Every node has ``d^2 + d`` numbers; the latent-side layer's maps are
        only defined up to a rotation (``d(d-1)/2`` per node) because ``z`` is
        isotropic, and every boundary between two layers carries an affine
        gauge (``d^2 + d``: ``A_j M``, ``M^-1 A_{j+1}``). With one layer this
        is exactly the count of a full-covariance GMM.
        """
        sizes = self._layer_sizes()
        d = self.n_features_in_
        count = sum(sizes) * (d * d + d) - (len(sizes) - 1) * (d * d + d)
        count -= sizes[-1] * d * (d - 1) // 2
        if self.path_weights == "full":
            count += math.prod(sizes) - 1
        else:
            count += sum(n - 1 for n in sizes)
        return int(count)

    # ------------------------------------------------------ shallow version
    def to_gaussian_mixture(self, max_elements=2**27):
        """The equivalent shallow model: a fitted full-covariance ``GaussianMixture``.

        One component per path (flat C order, as ``predict``), with weight
        ``pi_p``, mean ``beta_p`` and covariance ``Omega_p Omega_p^T``; its
        ``score_samples`` equals this model's.

        Parameters
        ----------
        max_elements : int, default=2**27
            Refuse (ValueError) when ``n_paths * n_features**2`` exceeds this.

        Returns
        -------
        gmm : skdeepmix.GaussianMixture
        """
        from .gaussian_mixture import GaussianMixture

        check_is_fitted(self)
        d = self.n_features_in_
        if self.n_paths_ * d * d > max_elements:
            raise ValueError(
                f"The equivalent GMM has {self.n_paths_} components of {d}x{d} "
                f"covariances ({self.n_paths_ * d * d} numbers > max_elements="
                f"{max_elements}); raise max_elements to build it anyway."
            )
        module = copy.deepcopy(self.module_).cpu().to(torch.float64)
        weights, means, factors = module.shallow_parameters()
        weights = weights.clamp_min(torch.finfo(torch.float64).tiny)
        covariances = factors @ factors.transpose(-1, -2)
        covariances = 0.5 * (covariances + covariances.transpose(-1, -2))
        chol = G.precision_cholesky_from_covariances(covariances, "full")
        gmm = GaussianMixture(
            n_components=self.n_paths_, covariance_type="full", reg_covar=self.reg_covar,
            tol=self.tol, max_iter=self.max_iter, random_state=self.random_state,
            device=self.device, dtype=self.dtype,
        )
        gmm.weights_ = to_numpy(weights / weights.sum())
        gmm.means_ = to_numpy(means)
        gmm.covariances_ = to_numpy(covariances)
        gmm.precisions_cholesky_ = to_numpy(chol)
        gmm.precisions_ = to_numpy(G.precisions_from_cholesky(chol, "full"))
        gmm.n_features_in_ = d
        if hasattr(self, "feature_names_in_"):
            gmm.feature_names_in_ = self.feature_names_in_
        gmm.converged_ = self.converged_
        gmm.n_iter_ = self.n_iter_
        gmm.lower_bound_ = self.lower_bound_
        gmm.lower_bounds_ = list(self.lower_bounds_)
        return gmm


def _restart_paths(module, seed, start, stop, device):
    """Random starting paths of the global rows ``[start, stop)``.

    Drawn from the path weights with one generator per block of
    ``_RESTART_BLOCK`` global rows (seeded by ``seed + block``), so that a
    row's draw depends neither on the chunking nor on the sharding of a
    distributed fit. Returns node indices of shape (stop - start, n_layers).
    """
    probs = module.log_path_weights().reshape(-1).exp()
    parts = []
    for block in range(start // _RESTART_BLOCK, (stop - 1) // _RESTART_BLOCK + 1):
        first = block * _RESTART_BLOCK
        generator = torch.Generator(device=device)
        generator.manual_seed((seed + block) % 2**63)
        flat = torch.multinomial(probs, _RESTART_BLOCK, replacement=True, generator=generator)
        parts.append(flat[max(start, first) - first : min(stop, first + _RESTART_BLOCK) - first])
    return module.unflatten_index(torch.cat(parts))
