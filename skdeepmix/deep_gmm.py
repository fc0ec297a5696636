"""``DeepGMMEstimator``: van den Oord & Schrauwen's deep Gaussian mixture model."""

from __future__ import annotations

import copy
import math
from numbers import Integral, Real

import numpy as np
import torch
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted

from ._base import BaseDeepMixture
from ._kmeans import assign_labels, kmeans
from ._torch_utils import iter_row_chunks, to_numpy
from ._train import make_optimizer, train_epoch, train_step
from .nn.deep_gmm import (
    DeepGMM,
    accumulate_hard_statistics,
    accumulate_soft_statistics,
    empty_statistics,
    m_step_layers,
)

__all__ = ["DeepGMMEstimator"]

# elements of the largest temporary tensor of a chunk (~32 MiB in float64)
_BUDGET = 2**22


class DeepGMMEstimator(BaseDeepMixture):
    """Deep Gaussian mixture model (van den Oord & Schrauwen, NIPS 2014).

    Layers of square affine maps ``y -> A y + b``; layer ``j`` holds
    ``layer_sizes[j]`` nodes. Every *path* (one node per layer) is a Gaussian
    component ``N(beta_p, Omega_p Omega_p^T)`` with ``Omega_p`` the product of
    the maps on the path and ``beta_p`` the mapped biases, so the model is a
    GMM with ``prod(layer_sizes)`` tied components whose parameter count grows
    like ``sum(layer_sizes)``. With one layer it is an ordinary full-covariance
    GMM.

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
    layer_sizes : tuple of int, default=(4, 4)
        Nodes per layer, **from the data side**: ``layer_sizes[0]`` is the
        layer next to the data (applied last when sampling), ``layer_sizes[-1]``
        the layer next to the latent ``z ~ N(0, I)``. The number of paths
        (components) is ``prod(layer_sizes)``.
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
        latent-side layer ``layer_sizes[-1]``, near-identity maps for the
        others (each path starts as a slightly perturbed copy of a k-means
        Gaussian). ``'kmeans_outer'``: k-means for the data-side layer, near
        identity maps in its whitened space for the inner layers.
        ``'random'``: like ``'kmeans'`` with random data points as centres and
        the global covariance.
    init_noise : float, default=0.1
        Size of the random perturbation of the near-identity maps (relative;
        biases in units of the data standard deviation).
    reg_covar : float, default=1e-6
        Added to the diagonal of every node's input covariance in the M-step
        (with one layer this is exactly a GMM's ``reg_covar``).
    m_step_iter : int, default=50
        L-BFGS iterations per layer and M-step.
    learning_rate : float, default=1e-3
        Adam step size (``algorithm='adam'``).
    batch_size : int, default=256
        Mini-batch size (``algorithm='adam'``).
    tol : float, default=1e-3
        Convergence threshold on the change of the objective (mean per sample).
    max_iter : int, default=100
        EM iterations (epochs for ``'adam'``).
    n_init : int, default=1
        Number of initialisations; the best objective is kept.
    random_state : int, RandomState instance or None, default=None
    warm_start : bool, default=False
    verbose : int, default=0
    verbose_interval : int, default=10
    device : {'auto', 'cpu', 'cuda', 'cuda:N'} or torch.device, default='auto'
    dtype : {'float32', 'float64'} or None, default=None
        Precision of the computation and of the fitted attributes. ``None``
        uses the input's floating dtype (float32 stays float32, anything else
        becomes float64), as scikit-learn does. The M-step statistics and
        L-BFGS always run in float64.
    chunk_size : int, default=None
        Rows processed at once (``None``: bounded temporaries).

    Attributes
    ----------
    module_ : skdeepmix.nn.deep_gmm.DeepGMM
        The fitted torch model.
    transforms_ : list of ndarray of shape (layer_sizes[j], n_features, n_features)
        The maps ``A`` of every layer (data side first).
    biases_ : list of ndarray of shape (layer_sizes[j], n_features)
        The biases ``b`` of every layer.
    path_weights_ : ndarray of shape layer_sizes
        Path probabilities ``pi_p`` (they sum to 1).
    n_paths_ : int
        Number of paths = components of the equivalent GMM.
    converged_ : bool
    n_iter_ : int
    lower_bound_ : float
        Objective of the best run at its last iteration: mean best-path log
        joint density (``'hard_em'``) or mean log-likelihood.
    lower_bounds_ : list of float
    history_ : list of dict
        Per iteration: ``objective`` and, for ``'hard_em'``, ``switch_rate``
        (fraction of samples whose random restart found a better path).
    n_features_in_ : int
    feature_names_in_ : ndarray of shape (n_features_in_,)

    Notes
    -----
    ``predict`` returns the flat index (C order over ``layer_sizes``) of each
    sample's most likely path and ``predict_proba`` the posterior over all
    paths; :meth:`path_nodes` turns flat indices into node indices. The exact
    density sums over all paths (``n * d^2 * (N_0 + N_0 N_1 + ...)``
    operations, shared partial inversions), chunked over samples and paths.

    References
    ----------
    A. van den Oord and B. Schrauwen. Factoring Variations in Natural Images
    with Deep Gaussian Mixture Models. NIPS 2014.

    Examples
    --------
    >>> import numpy as np
    >>> from skdeepmix.deep_gmm import DeepGMMEstimator
    >>> rng = np.random.RandomState(0)
    >>> X = np.concatenate([rng.randn(100, 2), rng.randn(100, 2) + 5])
    >>> dgmm = DeepGMMEstimator(layer_sizes=(2, 2), random_state=0).fit(X)
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
        "layer_sizes": ["array-like", Interval(Integral, 1, None, closed="left")],
        "algorithm": [StrOptions({"hard_em", "soft_em", "adam"})],
        "path_search": [StrOptions({"auto", "heuristic", "exhaustive"})],
        "n_restart_passes": [Interval(Integral, 0, None, closed="left")],
        "path_weights": [StrOptions({"full", "factorized"})],
        "init_params": [StrOptions({"kmeans", "kmeans_outer", "random"})],
        "init_noise": [Interval(Real, 0.0, None, closed="left")],
        "reg_covar": [Interval(Real, 0.0, None, closed="left")],
        "m_step_iter": [Interval(Integral, 1, None, closed="left")],
        "learning_rate": [Interval(Real, 0.0, None, closed="neither")],
        "batch_size": [Interval(Integral, 1, None, closed="left")],
        "verbose_interval": [Interval(Integral, 1, None, closed="left")],
        "chunk_size": [Interval(Integral, 1, None, closed="left"), None],
    }

    def __init__(
        self,
        layer_sizes=(4, 4),
        *,
        algorithm="hard_em",
        path_search="auto",
        n_restart_passes=2,
        path_weights="full",
        init_params="kmeans",
        init_noise=0.1,
        reg_covar=1e-6,
        m_step_iter=50,
        learning_rate=1e-3,
        batch_size=256,
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
        self.layer_sizes = layer_sizes
        self.algorithm = algorithm
        self.path_search = path_search
        self.n_restart_passes = n_restart_passes
        self.path_weights = path_weights
        self.init_params = init_params
        self.init_noise = init_noise
        self.reg_covar = reg_covar
        self.m_step_iter = m_step_iter
        self.learning_rate = learning_rate
        self.batch_size = batch_size
        self.tol = tol
        self.max_iter = max_iter
        self.n_init = n_init
        self.random_state = random_state
        self.warm_start = warm_start
        self.verbose = verbose
        self.verbose_interval = verbose_interval
        self.device = device
        self.dtype = dtype
        self.chunk_size = chunk_size

    # ------------------------------------------------------------ validation
    def _layer_sizes(self):
        sizes = self.layer_sizes
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
                "layer_sizes must be a non-empty sequence of positive integers (nodes "
                f"per layer, data side first), got {self.layer_sizes!r}."
            )
        return tuple(int(n) for n in sizes)

    def _check_parameters(self, X):
        sizes = self._layer_sizes()
        n_samples = X.shape[0]
        init_size = sizes[0] if self.init_params == "kmeans_outer" else sizes[-1]
        if n_samples < init_size:
            raise ValueError(
                f"Expected n_samples >= the number of nodes of the initialised layer "
                f"({init_size}, init_params={self.init_params!r}) but got "
                f"n_samples = {n_samples}."
            )

    def _hard_search(self):
        """'exhaustive' or 'heuristic' for the hard-EM E-step."""
        if self.path_search != "auto":
            return self.path_search
        sizes = self._layer_sizes()
        k = len(sizes)
        exhaustive = sum(math.prod(sizes[: j + 1]) for j in range(k))
        heuristic = (1 + self.n_restart_passes) * sum(
            sizes[j] * (k - j) for j in range(k)
        )
        return "exhaustive" if exhaustive <= heuristic else "heuristic"

    def _work_per_row(self):
        return math.prod(self._layer_sizes()) * 4 + 8 * self.n_features_in_

    def _chunk_rows(self, per_row):
        if self.chunk_size is not None:
            return int(self.chunk_size)
        return int(min(max(_BUDGET // max(per_row, 1), 64), 2**16))

    # -------------------------------------------------------- initialisation
    def _initialize(self, X, generator, y=None):
        sizes = self._layer_sizes()
        n_samples, d = X.shape
        module = DeepGMM(sizes, d, path_weights=self.path_weights, dtype=X.dtype,
                         device=X.device)
        std = X.std(0).clamp_min(1e-12) if n_samples > 1 else torch.ones_like(X[0])
        data_layer = 0 if self.init_params == "kmeans_outer" else len(sizes) - 1
        K = sizes[data_layer]
        # the data-driven layer: Gaussians of k-means clusters (or random points)
        if self.init_params == "random":
            idx = torch.randperm(n_samples, generator=generator, device=X.device)[:K]
            labels, _ = assign_labels(X, X[idx], chunk_size=self._chunk_rows(K + d))
        else:
            _, labels = kmeans(X, K, generator, max_iter=100,
                               chunk_size=self._chunk_rows(K + d))
        A, b = _cluster_gaussians(X, labels, K, self.reg_covar)
        mean = X.mean(0)
        # the other layers: near-identity perturbations
        noise = self.init_noise
        layers = []
        for j, N in enumerate(sizes):
            if j == data_layer:
                layers.append((A, b))
                continue
            eye = torch.eye(d, dtype=X.dtype, device=X.device)
            pert = torch.randn(N, d, d, generator=generator, device=X.device, dtype=X.dtype)
            Aj = eye + noise * pert / math.sqrt(d)
            bj = noise * torch.randn(N, d, generator=generator, device=X.device, dtype=X.dtype)
            if data_layer == len(sizes) - 1:
                # outer layers act in data units, around the data mean
                bj = bj * std + mean - (Aj @ mean.unsqueeze(-1)).squeeze(-1)
            layers.append((Aj, bj))
        for j, (Aj, bj) in enumerate(layers):
            module.set_generative_parameters(j, Aj, bj)
        self.module_ = module
        self._centers = [X.mean(0)] + [X.new_zeros(d)] * (len(sizes) - 1)
        self._paths = None
        self._optimizer = None
        if self.algorithm == "hard_em":
            self._paths, _, _ = self._hard_e_step(X, generator)

    # ------------------------------------------------------------------- EM
    def _fit_iteration(self, X, generator, y=None):
        if self.algorithm == "adam":
            return self._adam_epoch(X, generator)
        if self.algorithm == "soft_em":
            return self._soft_em_iteration(X)
        return self._hard_em_iteration(X, generator)

    def _hard_em_iteration(self, X, generator):
        """M-step from the current paths, then E-step; returns the hard objective."""
        module = self.module_
        if getattr(self, "_paths", None) is None or self._paths.shape[0] != X.shape[0]:
            self._paths, _, _ = self._hard_e_step(X, generator)
        paths = self._paths
        # path weights: the counts (MLE of the hard objective)
        flat = module.flat_index(paths)
        if self.path_weights == "full":
            counts = torch.bincount(flat, minlength=module.n_paths).to(X.dtype)
            module.set_log_path_weights((counts / counts.sum()).log())
        else:
            module.set_log_path_weights([
                (torch.bincount(paths[:, j], minlength=n).to(X.dtype) / X.shape[0]).log()
                for j, n in enumerate(module.layer_sizes)
            ])
        stats = empty_statistics(module)
        per_row = (module.n_features + 1) ** 2 + max(module.layer_sizes) * module.n_features
        for rows in iter_row_chunks(X.shape[0], self._chunk_rows(per_row)):
            accumulate_hard_statistics(module, X[rows], paths[rows], self._centers, stats)
        m_step_layers(module, stats, self._centers, self.reg_covar, self.m_step_iter)
        self._paths, objective, switch_rate = self._hard_e_step(X, generator, paths)
        return {"objective": objective, "switch_rate": switch_rate}

    @torch.no_grad()
    def _hard_e_step(self, X, generator, previous=None):
        """Best path of every row; returns ``(paths, mean score, switch rate)``."""
        module = self.module_
        n, k = X.shape[0], module.n_layers
        paths = torch.empty(n, k, dtype=torch.long, device=X.device)
        total, switched = 0.0, 0
        if self._hard_search() == "exhaustive":
            per_row = module.n_paths * 2 + module.n_features
            for rows in iter_row_chunks(n, self._chunk_rows(per_row)):
                values, flat = module.log_joint(X[rows], _BUDGET).max(1)
                paths[rows] = module.unflatten_index(flat)
                total += float(values.sum())
            return paths, total / n, 0.0
        per_row = max(module.layer_sizes) * module.n_features * 3
        log_w = module.log_path_weights().reshape(-1)
        for rows in iter_row_chunks(n, self._chunk_rows(per_row)):
            m = rows.stop - rows.start
            start = module.unflatten_index(
                torch.multinomial(log_w.exp(), m, replacement=True, generator=generator)
            )
            if previous is None:
                best, best_score = module.coordinate_ascent(X[rows], start,
                                                            1 + self.n_restart_passes)
            else:
                best, best_score = module.coordinate_ascent(X[rows], previous[rows], 1)
                if self.n_restart_passes > 0:
                    other, other_score = module.coordinate_ascent(
                        X[rows], start, self.n_restart_passes
                    )
                    better = other_score > best_score
                    switched += int(better.sum())
                    best = torch.where(better[:, None], other, best)
                    best_score = torch.maximum(best_score, other_score)
            paths[rows] = best
            total += float(best_score.sum())
        return paths, total / n, switched / n

    def _soft_em_iteration(self, X):
        """E-step (responsibilities over all paths) then M-step; returns the
        E-step's mean log-likelihood."""
        module = self.module_
        stats = empty_statistics(module)
        resp_sum = torch.zeros(module.n_paths, dtype=torch.float64, device=X.device)
        total = 0.0
        per_row = module.n_paths * (module.n_features + 3)
        for rows in iter_row_chunks(X.shape[0], self._chunk_rows(per_row)):
            log_prob, rs = accumulate_soft_statistics(module, X[rows], self._centers, stats,
                                                      _BUDGET)
            resp_sum += rs
            total += float(log_prob.sum())
        resp_sum = resp_sum.to(X.dtype).reshape(module.layer_sizes)
        if self.path_weights == "full":
            module.set_log_path_weights((resp_sum / resp_sum.sum()).log())
        else:
            k = module.n_layers
            module.set_log_path_weights([
                (resp_sum.sum(tuple(l for l in range(k) if l != j)) / X.shape[0]).log()
                for j in range(k)
            ])
        m_step_layers(module, stats, self._centers, self.reg_covar, self.m_step_iter)
        return total / X.shape[0]

    def _adam_epoch(self, X, generator):
        module = self.module_
        module.requires_grad_(True)
        if getattr(self, "_optimizer", None) is None:
            self._optimizer = make_optimizer("adam", module.parameters(), self.learning_rate)

        def loss_fn(batch):
            return -module(batch).mean()

        with torch.enable_grad():
            loss = train_epoch(loss_fn, self._optimizer, X, self.batch_size, generator)
        return -loss

    def _partial_fit_step(self, X, generator, y=None):
        """One Adam step on the exact log-likelihood of the batch ``X``.

        ``partial_fit`` always makes gradient steps (as ``algorithm='adam'``, with
        ``learning_rate``), whatever ``algorithm``: the layer-wise M-step needs
        the statistics of the whole data set. Returns the batch's mean
        log-likelihood before the step.
        """
        module = self.module_
        module.requires_grad_(True)
        if getattr(self, "_optimizer", None) is None:
            self._optimizer = make_optimizer("adam", module.parameters(), self.learning_rate)
        with torch.enable_grad():
            loss = train_step(lambda batch: -module(batch).mean(), self._optimizer, X)
        module.requires_grad_(False)
        self._update_attributes()
        return -loss

    # ------------------------------------------------------- state handling
    def _get_state(self):
        return copy.deepcopy(self.module_.state_dict())

    def _set_state(self, state):
        self.module_.load_state_dict(state)
        self._update_attributes()

    def _update_attributes(self):
        module = self.module_
        transforms, biases = [], []
        with torch.no_grad():
            for j in range(module.n_layers):
                A, b = module.generative_parameters(j)
                transforms.append(to_numpy(A))
                biases.append(to_numpy(b))
            self.path_weights_ = to_numpy(module.log_path_weights().exp())
        self.transforms_ = transforms
        self.biases_ = biases
        self.n_paths_ = module.n_paths

    def _finalize_fit(self, X, y=None):
        self._paths = None
        self._optimizer = None

    def __getstate__(self):
        state = super().__getstate__()
        state.pop("_optimizer", None)  # refers to the parameters; rebuilt when needed
        state.pop("_paths", None)
        return state
        self.module_.requires_grad_(False)

    def _prepare_inference(self, device):
        if self.module_.inv_weight[0].device != device:
            self.module_.to(device)

    # ------------------------------------------------------------ inference
    def _estimate_weighted_log_prob(self, X):
        return self.module_.log_joint(X.to(self.module_.inv_weight[0].dtype), _BUDGET)

    def _sample(self, n_samples, generator):
        X, labels = self.module_.sample(n_samples, generator)
        return X.to(self._torch_dtype()), labels

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
        n_nodes = sum(sizes)
        count = n_nodes * (d * d + d) - (len(sizes) - 1) * (d * d + d)
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
        gmm : skdeepmix.gaussian_mixture.GaussianMixture
        """
        from scipy import linalg

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
        weights = to_numpy(weights)
        weights = np.maximum(weights, np.finfo(np.float64).tiny)
        weights = weights / weights.sum()
        means = to_numpy(means)
        covariances = to_numpy(factors @ factors.transpose(-1, -2))
        covariances = 0.5 * (covariances + covariances.transpose(0, 2, 1))
        precisions_cholesky = np.empty_like(covariances)
        for k, cov in enumerate(covariances):
            cov_chol = linalg.cholesky(cov, lower=True)
            precisions_cholesky[k] = linalg.solve_triangular(
                cov_chol, np.eye(d), lower=True
            ).T
        gmm = GaussianMixture(
            n_components=self.n_paths_,
            covariance_type="full",
            reg_covar=self.reg_covar,
            tol=self.tol,
            max_iter=self.max_iter,
            random_state=self.random_state,
            device=self.device,
            dtype=self.dtype,
        )
        gmm.weights_ = weights
        gmm.means_ = means
        gmm.covariances_ = covariances
        gmm.precisions_cholesky_ = precisions_cholesky
        gmm.precisions_ = precisions_cholesky @ precisions_cholesky.transpose(0, 2, 1)
        gmm.n_features_in_ = d
        if hasattr(self, "feature_names_in_"):
            gmm.feature_names_in_ = self.feature_names_in_
        gmm.converged_ = self.converged_
        gmm.n_iter_ = self.n_iter_
        gmm.lower_bound_ = self.lower_bound_
        gmm.lower_bounds_ = list(self.lower_bounds_)
        return gmm


def _cluster_gaussians(X, labels, K, reg_covar):
    """Means and covariance Cholesky factors of labelled clusters.

    Empty or tiny clusters get the global covariance. Returns ``(A, b)`` with
    ``A A^T`` the covariance (+ ``reg_covar``) and ``b`` the mean.
    """
    n, d = X.shape
    eye = torch.eye(d, dtype=X.dtype, device=X.device)
    global_mean = X.mean(0)
    Xc = X - global_mean
    global_cov = Xc.T @ Xc / max(n - 1, 1)
    A = torch.empty(K, d, d, dtype=X.dtype, device=X.device)
    b = torch.empty(K, d, dtype=X.dtype, device=X.device)
    for k in range(K):
        members = X[labels == k]
        if members.shape[0] == 0:
            mean, cov = global_mean, global_cov
        else:
            mean = members.mean(0)
            diff = members - mean
            cov = diff.T @ diff / members.shape[0]
            if members.shape[0] <= d:
                cov = cov + global_cov * (1.0 / members.shape[0])
        cov = 0.5 * (cov + cov.T) + reg_covar * eye
        L, info = torch.linalg.cholesky_ex(cov)
        if int(info) > 0:
            scale = float(torch.diagonal(cov).mean().clamp_min(1e-12))
            L = torch.linalg.cholesky(cov + 1e-6 * scale * eye)
        A[k], b[k] = L, mean
    return A, b
