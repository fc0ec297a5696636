"""Deep Gaussian mixture model (van den Oord & Schrauwen, 2014) in torch.

A deep GMM has ``k`` layers; layer ``j`` holds ``N_j`` nodes, each an
invertible square map ``x -> A x + b``. A sample is drawn by picking a *path*
``p = (p_0, ..., p_{k-1})`` (one node per layer) with probability ``pi_p``,
drawing ``z ~ N(0, I)`` and applying the nodes from the innermost layer
(``k-1``, next to ``z``) to the outermost one (``0``, next to the data)::

    x = A_{0,p_0}( ... A_{k-1,p_{k-1}} z + b_{k-1,p_{k-1}} ... ) + b_{0,p_0}

Every path is one Gaussian component ``N(beta_p, Omega_p Omega_p^T)`` of an
equivalent shallow GMM with ``prod(N_j)`` components whose parameters are
tied (paper eqs. 1-3).

Conventions of this module
--------------------------
* Layers are indexed from the **data side**: layer 0 is applied last when
  sampling and first when evaluating the density (the paper's layer ``k``).
* Each node stores its *inverse* map ``y -> W y + c`` with ``W = A^-1`` and
  ``c = -A^-1 b`` (the paper's ``Q``): the density, the E-step and the M-step
  all run in the inverse direction, and the M-step objective is concave in
  ``(W, c)``.
* A path is a tuple of node indices, flattened in C order over ``layer_sizes``
  (``p_0`` varies slowest).

Contents: the :class:`DeepGMM` module (exact log-density over all paths with
shared partial inversions, chunked over samples and paths; coordinate-ascent
best-path search; sampling; the equivalent shallow mixture), the sufficient
statistics of the layer-wise M-step, the trace objective
:func:`m_step_objective` with its analytic gradient, and a batched L-BFGS
(:func:`lbfgs_maximize`) that optimises all nodes of a layer at once.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .._gaussian import LOG_2PI, SufficientStatistics
from .._torch_utils import MEMORY_BUDGET, iter_row_chunks

__all__ = [
    "DeepGMM",
    "cluster_gaussians",
    "init_from_clusters",
    "NodeObjective",
    "m_step_objective",
    "lbfgs_maximize",
    "fold_upper_layers",
    "empty_statistics",
    "accumulate_hard_statistics",
    "accumulate_soft_statistics",
    "m_step_layers",
    "prior_targets",
    "prior_scatter",
    "MStepError",
]



#: The logit of a path without samples: finite (a parameter must be), and so low
#: that its weight is exactly zero, in float32 too, also summed over the layers
#: of factorized weights.
EMPTY_LOGIT = -1e30


def _flat_strides(sizes):
    strides, acc = [], 1
    for size in reversed(sizes):
        strides.append(acc)
        acc *= size
    return list(reversed(strides))


class DeepGMM(nn.Module):
    """Deep Gaussian mixture: layers of square affine maps, one Gaussian per path.

    Parameters
    ----------
    layer_sizes : sequence of int
        Nodes per layer, from the data side (layer 0) to the latent side.
    n_features : int
        Dimension ``d`` of the data (every map is ``d x d``).
    path_weights : {'full', 'factorized'}, default='full'
        ``'full'``: one free weight per path (a table of shape ``layer_sizes``);
        ``'factorized'``: ``pi_p = prod_j pi_{j, p_j}`` (the paper's option).
    dtype : torch.dtype, default=torch.float64
    device : torch.device, optional

    Attributes
    ----------
    inv_weight : ParameterList of Tensors of shape (N_j, d, d)
        ``W = A^-1`` of every node.
    inv_bias : ParameterList of Tensors of shape (N_j, d)
        ``c = -A^-1 b`` of every node.
    path_logits : Parameter of shape ``layer_sizes`` ('full') or
        ParameterList of shape (N_j,) ('factorized')
        Unnormalised log path weights.
    """

    def __init__(self, layer_sizes, n_features, *, path_weights="full", dtype=torch.float64,
                 device=None):
        super().__init__()
        self.layer_sizes = tuple(int(n) for n in layer_sizes)
        self.n_features = int(n_features)
        self.path_weights = path_weights
        d = self.n_features
        kw = {"dtype": dtype, "device": device}
        self.inv_weight = nn.ParameterList(
            [nn.Parameter(torch.empty(n, d, d, **kw)) for n in self.layer_sizes]
        )
        self.inv_bias = nn.ParameterList(
            [nn.Parameter(torch.empty(n, d, **kw)) for n in self.layer_sizes]
        )
        if path_weights == "full":
            self.path_logits = nn.Parameter(torch.empty(self.layer_sizes, **kw))
        elif path_weights == "factorized":
            self.path_logits = nn.ParameterList(
                [nn.Parameter(torch.empty(n, **kw)) for n in self.layer_sizes]
            )
        else:
            raise ValueError(f"path_weights must be 'full' or 'factorized', got {path_weights!r}.")
        if self.inv_weight[0].device.type != "meta":
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, generator=None):
        """Identity maps, zero biases, uniform path weights (draws nothing;
        the data-driven start is :func:`init_from_clusters`)."""
        for W, c in zip(self.inv_weight, self.inv_bias):
            W.copy_(torch.eye(self.n_features, dtype=W.dtype, device=W.device).expand_as(W))
            c.zero_()
        logits = [self.path_logits] if self.path_weights == "full" else self.path_logits
        for table in logits:
            table.zero_()

    # ------------------------------------------------------------ structure
    @property
    def n_layers(self):
        return len(self.layer_sizes)

    @property
    def n_paths(self):
        return math.prod(self.layer_sizes)

    def log_path_weights(self):
        """Log path weights ``log pi_p``, a tensor of shape ``layer_sizes``."""
        if self.path_weights == "full":
            flat = torch.log_softmax(self.path_logits.reshape(-1), 0)
            return flat.reshape(self.layer_sizes)
        table = None
        for j, logits in enumerate(self.path_logits):
            shape = [1] * self.n_layers
            shape[j] = -1
            term = torch.log_softmax(logits, 0).reshape(shape)
            table = term if table is None else table + term
        return table.expand(self.layer_sizes)

    @torch.no_grad()
    def set_log_path_weights(self, log_weights):
        """Set the path weights from a table of log weights (shape ``layer_sizes``)
        ('full'), or from a list of per-layer log weights ('factorized')."""
        if self.path_weights == "full":
            self.path_logits.copy_(torch.as_tensor(log_weights).reshape(self.layer_sizes))
        else:
            for logits, value in zip(self.path_logits, log_weights):
                logits.copy_(value)

    @torch.no_grad()
    def set_path_weights_from_counts(self, counts):
        """Maximum-likelihood path weights from (soft or hard) path counts.

        A path without samples keeps the weight zero, with the finite logit
        :data:`EMPTY_LOGIT` rather than ``-inf``: gradient steps
        (``partial_fit``) then meet no infinite parameter and leave it in place
        (its gradient is zero), and hard EM never gives it a sample again.

        Parameters
        ----------
        counts : Tensor of shape (n_paths,)
            Number of samples (or summed responsibilities) of every path.
        """
        table = counts.reshape(self.layer_sizes).to(self.inv_weight[0].dtype)
        total = table.sum().clamp_min(torch.finfo(table.dtype).tiny)

        def log_share(sums):
            return (sums / total).log().clamp_min(EMPTY_LOGIT)

        if self.path_weights == "full":
            self.set_log_path_weights(log_share(table))
            return
        k = self.n_layers
        self.set_log_path_weights([
            log_share(table.sum(tuple(l for l in range(k) if l != j))) for j in range(k)
        ])

    @torch.no_grad()
    def mean(self):
        """Mean of the model, ``sum_p pi_p beta_p`` (shape (d,)); ``n_paths * d^2``
        operations, inner layers first."""
        means = self.inv_bias[0].new_zeros(1, self.n_features)
        for j in reversed(range(self.n_layers)):
            A, b = self.generative_parameters(j)
            means = (torch.einsum("nab,mb->nma", A, means) + b[:, None]).reshape(-1, b.shape[1])
        return self.log_path_weights().reshape(-1).exp() @ means

    def statistics_centers(self):
        """Reference points of the M-step statistics of every layer: the model
        mean for the data-side layer (the inner layers see roughly centred
        inputs and use 0)."""
        zero = self.inv_bias[0].new_zeros(self.n_features)
        return [self.mean()] + [zero] * (self.n_layers - 1)

    def node_logdet(self, j):
        """``log|det W|`` of the nodes of layer ``j`` (shape (N_j,))."""
        return torch.linalg.slogdet(self.inv_weight[j]).logabsdet

    def generative_parameters(self, j):
        """``(A, b)`` of layer ``j``: shapes (N_j, d, d) and (N_j, d)."""
        A = torch.linalg.inv(self.inv_weight[j])
        b = -(A @ self.inv_bias[j].unsqueeze(-1)).squeeze(-1)
        return A, b

    @torch.no_grad()
    def set_generative_parameters(self, j, A, b):
        """Set layer ``j`` from generative maps ``A`` (N_j, d, d) and biases ``b`` (N_j, d)."""
        W = torch.linalg.inv(A.to(self.inv_weight[j]))
        self.inv_weight[j].copy_(W)
        self.inv_bias[j].copy_(-(W @ b.to(W).unsqueeze(-1)).squeeze(-1))

    # ------------------------------------------------------ exact density
    def path_log_prob(self, X, budget=MEMORY_BUDGET):
        """``log N(x | beta_p, Omega_p Omega_p^T)`` for every sample and path.

        The inversion is shared between paths with the same outer nodes: layer
        0 is inverted once per node, layer 1 once per pair of nodes, and so on
        (``n * d^2 * (N_0 + N_0 N_1 + ... + prod N_j)`` operations). Paths are
        processed in chunks so that no temporary exceeds ``budget`` elements
        (beyond one row's partial inversions for a single node).

        Parameters
        ----------
        X : Tensor of shape (n_samples, d)
        budget : int
            Largest number of elements of a temporary tensor.

        Returns
        -------
        log_prob : Tensor of shape (n_samples, n_paths)
            Paths flattened in C order over ``layer_sizes``.
        """
        logdets = [self.node_logdet(j) for j in range(self.n_layers)]
        acc = X.new_zeros(1)
        return self._expand(X.unsqueeze(1), 0, acc, logdets, budget)

    def _expand(self, Y, j, acc, logdets, budget):
        n, m, d = Y.shape
        if j == self.n_layers:
            return -0.5 * (Y.square().sum(-1) + d * LOG_2PI) + acc
        W, c = self.inv_weight[j], self.inv_bias[j]
        N = W.shape[0]
        step = max(1, budget // max(n * N * d, 1))
        outputs = []
        for start in range(0, m, step):
            part = Y[:, start : start + step]
            ms = part.shape[1]
            new = torch.matmul(part.reshape(n * ms, d), W.reshape(N * d, d).T)
            new = new.reshape(n, ms, N, d) + c
            new_acc = (acc[start : start + step, None] + logdets[j]).reshape(-1)
            outputs.append(self._expand(new.reshape(n, ms * N, d), j + 1, new_acc, logdets, budget))
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, 1)

    def log_joint(self, X, budget=MEMORY_BUDGET):
        """``log pi_p + log N(x | p)``, shape (n_samples, n_paths)."""
        return self.path_log_prob(X, budget) + self.log_path_weights().reshape(-1)

    def forward(self, X):
        """Log-density ``log p(x)`` of each row of ``X`` (exact, all paths)."""
        return torch.logsumexp(self.log_joint(X), dim=1)

    # ------------------------------------------------ per-sample inversion
    def invert_through(self, Y, j, nodes):
        """Apply the inverse map of layer ``j`` with one node per sample.

        Parameters
        ----------
        Y : Tensor of shape (n, ..., d)
        j : int
        nodes : LongTensor of shape (n,)

        Returns
        -------
        Tensor of the shape of ``Y``
        """
        W, c = self.inv_weight[j], self.inv_bias[j]
        out = torch.empty_like(Y)
        for node in torch.unique(nodes).tolist():
            rows = torch.nonzero(nodes == node).flatten()
            out[rows] = torch.matmul(Y[rows], W[node].T) + c[node]
        return out

    def path_score(self, X, paths):
        """``log pi_p + log N(x | p)`` of one given path per sample (shape (n,))."""
        Y = X
        score = self.log_path_weights().reshape(-1)[self.flat_index(paths)]
        for j in range(self.n_layers):
            Y = self.invert_through(Y, j, paths[:, j])
            score = score + self.node_logdet(j)[paths[:, j]]
        return score - 0.5 * (Y.square().sum(-1) + self.n_features * LOG_2PI)

    def flat_index(self, paths):
        """Flat (C-order) index of paths given as (n, n_layers) node indices."""
        strides = torch.tensor(_flat_strides(self.layer_sizes), device=paths.device)
        return (paths * strides).sum(1)

    def unflatten_index(self, flat):
        """(n, n_layers) node indices of flat path indices."""
        cols = []
        for stride, size in zip(_flat_strides(self.layer_sizes), self.layer_sizes):
            cols.append(torch.div(flat, stride, rounding_mode="floor") % size)
        return torch.stack(cols, 1)

    def coordinate_ascent(self, X, paths, n_passes):
        """Best-path search by coordinate ascent over the layers (paper §3.1).

        One pass changes the node of each layer in turn (data side first),
        keeping the others fixed, to the node that maximises
        ``log pi_p + log N(x | p)``; ``sum_j N_j`` path evaluations per pass,
        with the partial inversion through the outer layers shared.

        Parameters
        ----------
        X : Tensor of shape (n, d)
        paths : LongTensor of shape (n, n_layers)
            Starting paths (not modified).
        n_passes : int

        Returns
        -------
        paths : LongTensor of shape (n, n_layers)
        scores : Tensor of shape (n,)
            Score of the returned paths (never below that of the start).
        """
        paths = paths.clone()
        k, d = self.n_layers, self.n_features
        logdets = [self.node_logdet(j) for j in range(k)]
        log_w = self.log_path_weights().reshape(-1)
        strides = _flat_strides(self.layer_sizes)
        rows = torch.arange(X.shape[0], device=X.device)
        scores = None
        for _ in range(n_passes):
            Y, acc = X, X.new_zeros(X.shape[0])
            for j in range(k):
                N = self.layer_sizes[j]
                cand = torch.matmul(Y, self.inv_weight[j].reshape(N * d, d).T)
                cand = cand.reshape(-1, N, d) + self.inv_bias[j]
                Z = cand
                inner = X.new_zeros(X.shape[0])
                for l in range(j + 1, k):
                    Z = self.invert_through(Z, l, paths[:, l])
                    inner = inner + logdets[l][paths[:, l]]
                base = self.flat_index(paths) - paths[:, j] * strides[j]
                index = base[:, None] + strides[j] * torch.arange(N, device=X.device)
                score = (
                    log_w[index]
                    - 0.5 * Z.square().sum(-1)
                    + logdets[j]
                    + (acc + inner)[:, None]
                )
                scores, best = score.max(1)
                paths[:, j] = best
                Y = cand[rows, best]
                acc = acc + logdets[j][best]
        return paths, scores - 0.5 * d * LOG_2PI

    def best_paths(self, X, previous, start, n_restart_passes=2):
        """The E-step heuristic of the paper (§3.1): the better of 1 pass from
        the previous paths and ``n_restart_passes`` passes from random ones.

        Parameters
        ----------
        X : Tensor of shape (n, d)
        previous : LongTensor of shape (n, n_layers) or None
            Each row's path of the last E-step (None: only the restart, with
            ``1 + n_restart_passes`` passes).
        start : LongTensor of shape (n, n_layers)
            Random starting paths.
        n_restart_passes : int, default=2

        Returns
        -------
        paths : LongTensor of shape (n, n_layers)
        scores : Tensor of shape (n,)
            ``log pi_p + log N(x | p)`` of the returned paths.
        switched : Tensor of shape ()
            Number of rows where the restart found a better path.
        """
        if previous is None:
            paths, scores = self.coordinate_ascent(X, start, 1 + n_restart_passes)
            return paths, scores, scores.new_zeros(())
        best, best_score = self.coordinate_ascent(X, previous, 1)
        if n_restart_passes == 0:
            return best, best_score, best_score.new_zeros(())
        other, other_score = self.coordinate_ascent(X, start, n_restart_passes)
        better = other_score > best_score
        paths = torch.where(better[:, None], other, best)
        return paths, torch.maximum(best_score, other_score), better.sum()

    # ------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample(self, n_samples, generator):
        """Draw samples; returns ``(X, flat path index)``, sorted by path."""
        log_w = self.log_path_weights().reshape(-1)
        flat = torch.multinomial(log_w.exp(), n_samples, replacement=True, generator=generator)
        flat = flat.sort().values
        paths = self.unflatten_index(flat)
        dtype, device = log_w.dtype, log_w.device
        Y = torch.randn(n_samples, self.n_features, generator=generator, dtype=dtype,
                        device=device)
        for j in reversed(range(self.n_layers)):
            A, b = self.generative_parameters(j)
            out = torch.empty_like(Y)
            for node in torch.unique(paths[:, j]).tolist():
                rows = torch.nonzero(paths[:, j] == node).flatten()
                out[rows] = Y[rows] @ A[node].T + b[node]
            Y = out
        return Y, flat

    # ---------------------------------------------------- shallow equivalent
    @torch.no_grad()
    def shallow_parameters(self):
        """Parameters of the equivalent shallow GMM (one component per path).

        Returns
        -------
        weights : Tensor of shape (n_paths,)
        means : Tensor of shape (n_paths, d)
            ``beta_p``.
        factors : Tensor of shape (n_paths, d, d)
            ``Omega_p`` (covariance ``Omega_p Omega_p^T``).
        """
        A_list, b_list = zip(*(self.generative_parameters(j) for j in range(self.n_layers)))
        # start from the innermost layer and apply the outer ones
        factor, mean = A_list[-1], b_list[-1]
        for j in reversed(range(self.n_layers - 1)):
            A, b = A_list[j], b_list[j]
            factor = torch.einsum("nab,mbc->nmac", A, factor).reshape(-1, *A.shape[1:])
            mean = (torch.einsum("nab,mb->nma", A, mean) + b[:, None]).reshape(-1, A.shape[1])
        weights = self.log_path_weights().reshape(-1).exp()
        return weights, mean, factor


# ============================================================================
# Initialisation from a clustering of the data
# ============================================================================
@torch.no_grad()
def cluster_gaussians(X, labels, reference_means, reg_covar, chunk_size, partition=None):
    """Mean and covariance factor of every cluster of a labelled data set.

    Statistics are accumulated centred (:class:`~skdeepmix._gaussian.SufficientStatistics`)
    and summed over the processes of a distributed fit. A cluster with at most
    ``d`` members gets the global covariance divided by its size added (an
    empty one: the global mean and covariance), so that every factor exists.

    Parameters
    ----------
    X : Tensor of shape (n_samples, d)
    labels : LongTensor of shape (n_samples,)
        Cluster of every row, in ``[0, K)``.
    reference_means : Tensor of shape (K, d)
        Points near the cluster means (e.g. the k-means centres).
    reg_covar : float
        Added to the diagonal of every covariance.
    chunk_size : int
        Rows per chunk.
    partition : RowPartition, optional
        This process's share of the rows (any object with ``sum(*tensors)``
        in place and ``n_total``).

    Returns
    -------
    A : Tensor of shape (K, d, d)
        Lower Cholesky factors of the covariances (``A A^T``).
    b : Tensor of shape (K, d)
        Means.
    mean : Tensor of shape (d,)
        Mean of all the rows.
    std : Tensor of shape (d,)
        Standard deviation of every feature over all the rows.
    """
    K, d = reference_means.shape
    stats = SufficientStatistics("full", reference_means, reference_means.mean(0))
    chunks = list(iter_row_chunks(X.shape[0], chunk_size))
    one_hot = lambda rows: nn.functional.one_hot(labels[rows], K).to(X.dtype)  # noqa: E731
    counts, means, covs = stats.accumulate(  # an exact second pass only where needed
        lambda exact: ({"X": X[rows], "resp": one_hot(rows)} for rows in chunks), 0.0,
        partition)
    weights = counts / counts.sum()
    mean = weights @ means
    delta = means - mean
    global_cov = torch.einsum("k,kab->ab", weights, covs + delta[:, :, None] * delta[:, None, :])
    members = counts.round()
    means = torch.where((members > 0)[:, None], means, mean)
    small = (members <= d)[:, None, None]
    covs = torch.where(small, covs + global_cov / members.clamp_min(1.0)[:, None, None], covs)
    covs = torch.where((members > 0)[:, None, None], covs, global_cov)
    eye = torch.eye(d, dtype=X.dtype, device=X.device)
    covs = 0.5 * (covs + covs.transpose(-1, -2)) + reg_covar * eye
    A, info = torch.linalg.cholesky_ex(covs)
    if bool((info > 0).any()):  # numerically singular: a relative jitter
        scale = torch.diagonal(covs, dim1=-2, dim2=-1).mean(-1).clamp_min(1e-12)
        A = torch.linalg.cholesky(covs + 1e-6 * scale[:, None, None] * eye)
    std = torch.diagonal(global_cov).clamp_min(0.0).sqrt().clamp_min(1e-12)
    return A, means, mean, std


@torch.no_grad()
def init_from_clusters(model, A, b, layer, mean, std, noise, generator):
    """Start ``model`` from cluster Gaussians ``N(b_m, A_m A_m^T)`` in one layer.

    Layer ``layer`` gets the maps ``(A, b)`` (it must have ``K`` nodes); every
    other node a near-identity map ``I + noise E / sqrt(d)`` with a bias of
    size ``noise`` (``E`` standard normal, from ``generator``, layers in
    order). When the clusters sit in the latent-side layer, the outer layers
    act in data units around the data ``mean`` (bias noise scaled by
    ``std``), so that every path starts as a slightly perturbed copy of a
    cluster Gaussian; when they sit in the data-side layer, the inner layers
    act in its whitened space. Path weights start uniform.
    """
    d, k = model.n_features, model.n_layers
    kw = {"dtype": A.dtype, "device": A.device}
    eye = torch.eye(d, **kw)
    model.reset_parameters()
    for j, N in enumerate(model.layer_sizes):
        if j == layer:
            model.set_generative_parameters(j, A, b)
            continue
        Aj = eye + noise * torch.randn(N, d, d, generator=generator, **kw) / math.sqrt(d)
        bj = noise * torch.randn(N, d, generator=generator, **kw)
        if layer == k - 1:
            bj = bj * std + mean - (Aj @ mean.unsqueeze(-1)).squeeze(-1)
        model.set_generative_parameters(j, Aj, bj)


# ============================================================================
# M-step: statistics, folded upper layers, the trace objective, batched L-BFGS
# ============================================================================
def fold_upper_layers(model, j):
    """Fold the layers between layer ``j`` and ``z`` into one affine map per path.

    For every combination ``u`` of nodes of layers ``j+1, ..., k-1`` (C order)
    the map ``y -> R_u y + r_u`` from the output of layer ``j`` to ``z``
    (the paper's ``R_p``, Fig. 3).

    Returns
    -------
    R : Tensor of shape (U, d, d)
    r : Tensor of shape (U, d)
    """
    d = model.n_features
    W0 = model.inv_weight[0]
    R = torch.eye(d, dtype=W0.dtype, device=W0.device)[None]
    r = W0.new_zeros(1, d)
    for l in reversed(range(j + 1, model.n_layers)):
        W, c = model.inv_weight[l], model.inv_bias[l]
        # new[a, u] = R[u] (W[a] y + c[a]) + r[u]: index a (layer l) slowest
        R_new = torch.einsum("uab,nbc->nuac", R, W).reshape(-1, d, d)
        r_new = (torch.einsum("uab,nb->nua", R, c) + r[None]).reshape(-1, d)
        R, r = R_new, r_new
    return R, r


def _hessian_apply(X, omega, gamma):
    """``H(X)_m = sum_u Omega_u X_m Gamma_mu``; X (B, d, d+1), omega (U, d, d),
    gamma (B, U, d+1, d+1) -> (B, d, d+1).

    Two large matrix products per node instead of ``2 U`` small ones:
    ``[Omega_1; ...; Omega_U] X`` (shape (U d, d+1)), regrouped side by side
    as ``[Omega_1 X, ..., Omega_U X]`` and multiplied by
    ``[Gamma_m1; ...; Gamma_mU]``.
    """
    B, d, d1 = X.shape
    U = omega.shape[0]
    OX = torch.matmul(omega.reshape(U * d, d), X)  # (B, U d, d+1)
    if U > 1:
        OX = OX.view(B, U, d, d1).transpose(1, 2).reshape(B, d, U * d1)
    return torch.matmul(OX, gamma.reshape(B, U * d1, d1))


class NodeObjective:
    """The M-step objective of the nodes of one layer (paper eq. 11, with biases).

    For node ``m`` with variables ``X = [Q, c]`` (``d x (d+1)``, the inverse
    map in homogeneous coordinates, ``Q = A^-1``)::

        f(X) = N_m log|det Q| - 1/2 sum_u Tr(Gamma_mu X^T Omega_u X)
               - <B_m, X> - 1/2 K_m

    where ``Gamma_mu = sum_n [y_n; 1][y_n; 1]^T`` over the samples of node
    ``m`` whose inner path is ``u``, ``Omega_u = R_u^T R_u``,
    ``B_m = sum_u R_u^T r_u s_mu^T`` (``s_mu`` the last column of
    ``Gamma_mu``) and ``K_m = sum_u N_mu |r_u|^2``. ``f`` is the part of the
    (hard or expected) complete-data log-likelihood that depends on node ``m``
    (up to the constant ``-N_m d/2 log 2 pi``); it is concave in ``X``. Its
    gradient is ``N_m [Q^-T, 0] - sum_u Omega_u X Gamma_mu - B_m`` (eq. 12).

    Parameters
    ----------
    counts : Tensor of shape (B,)
    omega : Tensor of shape (U, d, d)
    gamma : Tensor of shape (B, U, d+1, d+1)
    linear : Tensor of shape (B, d, d+1)
    const : Tensor of shape (B,)
    """

    def __init__(self, counts, omega, gamma, linear, const):
        self.counts = counts
        self.omega = omega
        self.gamma = gamma
        self.linear = linear
        self.const = const
        self.d = omega.shape[-1]

    @classmethod
    def from_statistics(cls, gamma, R, r):
        """Build from statistics ``gamma`` (B, U, d+1, d+1) and folded maps ``R, r``."""
        omega = R.transpose(-1, -2) @ R
        v = (R.transpose(-1, -2) @ r.unsqueeze(-1)).squeeze(-1)  # (U, d)
        s = gamma[..., :, -1]  # (B, U, d+1)
        counts_mu = gamma[..., -1, -1]  # (B, U)
        linear = torch.einsum("ua,mub->mab", v, s)
        const = counts_mu @ r.square().sum(-1)
        return cls(counts_mu.sum(1), omega, gamma, linear, const)

    def hessian_apply(self, X):
        return _hessian_apply(X, self.omega, self.gamma)

    def value(self, X, HX):
        """Objective for each node, given ``HX = hessian_apply(X)``."""
        d = self.d
        logdet = torch.linalg.slogdet(X[:, :, :d]).logabsdet
        quad = (X * HX).sum((-1, -2))
        lin = (self.linear * X).sum((-1, -2))
        return self.counts * logdet - 0.5 * quad - lin - 0.5 * self.const

    def gradient(self, X, HX):
        d = self.d
        grad = -HX - self.linear
        inv_t = torch.linalg.inv(X[:, :, :d]).transpose(-1, -2)
        grad[:, :, :d] += self.counts[:, None, None] * inv_t
        return grad

    def preconditioner(self):
        """``G -> Omega_m^-1 G Gamma_m^-1`` for every node ``m``: the inverse of a
        Kronecker approximation of the per-sample Hessian of the quadratic part.

        The quadratic part's Hessian is ``D -> sum_u Omega_u D Gamma_mu``; with
        ``Gamma_m = sum_u Gamma_mu / N_m`` and ``Omega_m = sum_u N_mu Omega_u / N_m``
        it is about ``N_m Omega_m D Gamma_m`` (exactly when the node has one inner
        path). Nodes without data get the identity.

        Returns
        -------
        apply : callable
            Maps a Tensor of shape (B, d, d+1) to one of the same shape.
        """
        counts_mu = self.gamma[..., -1, -1]  # (B, U)
        total = counts_mu.sum(1).clamp_min(torch.finfo(self.gamma.dtype).tiny)
        gamma_bar = self.gamma.sum(1) / total[:, None, None]
        omega_bar = torch.einsum("bu,uij->bij", counts_mu / total[:, None], self.omega)
        inverses = []
        for matrix in (omega_bar, gamma_bar):
            L, info = torch.linalg.cholesky_ex(matrix)
            eye = torch.eye(matrix.shape[-1], dtype=matrix.dtype, device=matrix.device)
            inverses.append(torch.cholesky_inverse(torch.where((info == 0)[:, None, None], L,
                                                               eye)))
        omega_inv, gamma_inv = inverses
        return lambda G: omega_inv @ G @ gamma_inv


class _TraceObjectiveFunction(torch.autograd.Function):
    """The node objective with its analytic gradient as the backward pass."""

    @staticmethod
    def forward(ctx, X, counts, omega, gamma, linear, const):
        obj = NodeObjective(counts, omega, gamma, linear, const)
        HX = obj.hessian_apply(X)
        ctx.save_for_backward(X, counts, omega, gamma, linear, const)
        return obj.value(X, HX)

    @staticmethod
    def backward(ctx, grad_output):
        X, counts, omega, gamma, linear, const = ctx.saved_tensors
        obj = NodeObjective(counts, omega, gamma, linear, const)
        grad = obj.gradient(X, obj.hessian_apply(X))
        return grad_output[:, None, None] * grad, None, None, None, None, None


def m_step_objective(X, counts, omega, gamma, linear, const):
    """The M-step trace objective of a batch of nodes, differentiable in ``X``.

    The backward pass uses the analytic gradient of :class:`NodeObjective`
    (so that ``torch.autograd.gradcheck`` checks it against finite differences).

    Parameters
    ----------
    X : Tensor of shape (B, d, d+1)
    counts, omega, gamma, linear, const
        See :class:`NodeObjective`.

    Returns
    -------
    values : Tensor of shape (B,)
    """
    return _TraceObjectiveFunction.apply(X, counts, omega, gamma, linear, const)


def _inner(a, b):
    return (a * b).sum((-1, -2))


def lbfgs_maximize(objective, X0, max_iter=50, history_size=10, ftol=1e-10, gtol=1e-8):
    """Maximise a batch of independent :class:`NodeObjective` s by L-BFGS.

    Each batch element (node) has its own curvature history, step size
    (backtracking Armijo line search) and stopping test, so that the nodes of
    one layer are optimised together but independently. The quadratic part is
    linear in ``X``, so one Hessian-vector product per iteration serves the
    whole line search. The objective never decreases (a step is only taken
    when it satisfies the Armijo condition).

    Parameters
    ----------
    objective : NodeObjective
    X0 : Tensor of shape (B, d, d+1)
        Starting point (``Q`` invertible).
    max_iter : int, default=50
    history_size : int, default=10
    ftol : float, default=1e-10
        Stop a node when the relative change of its objective is below.
    gtol : float, default=1e-8
        Stop a node when the largest gradient entry (per sample) is below.

    Returns
    -------
    X : Tensor of shape (B, d, d+1)
    values : Tensor of shape (B,)
    n_iter : int
    """
    scale = objective.counts.clamp_min(1e-12)[:, None, None]
    precondition = objective.preconditioner()
    X = X0.clone()
    HX = objective.hessian_apply(X)
    f = objective.value(X, HX)
    g = objective.gradient(X, HX) / scale  # ascent direction, per sample
    active = torch.isfinite(f) & (objective.counts > 0)
    S, Yh, rho = [], [], []
    n_iter = 0
    for n_iter in range(1, max_iter + 1):
        if not bool(active.any()):
            n_iter -= 1
            break
        # two-loop recursion (on the ascent problem: minimise -f), with the
        # preconditioner as the initial inverse Hessian
        q = -g
        alphas = []
        for s, y, p in zip(reversed(S), reversed(Yh), reversed(rho)):
            a = p * _inner(s, q)
            q = q - a[:, None, None] * y
            alphas.append(a)
        r = precondition(q)
        if S:
            sy = _inner(S[-1], Yh[-1])
            yPy = _inner(Yh[-1], precondition(Yh[-1]))
            r = torch.where((yPy > 0)[:, None, None],
                            (sy / yPy.clamp_min(1e-300))[:, None, None] * r, r)
        for s, y, p, a in zip(S, Yh, rho, reversed(alphas)):
            b = p * _inner(y, r)
            r = r + (a - b)[:, None, None] * s
        D = -r  # ascent direction
        slope = _inner(g, D) * scale[:, 0, 0]
        bad = ~(slope > 0)
        if bool(bad.any()):  # not an ascent direction: preconditioned steepest ascent
            D = torch.where(bad[:, None, None], precondition(g), D)
            slope = _inner(g, D) * scale[:, 0, 0]
        HD = objective.hessian_apply(D)
        t = torch.where(active, torch.ones_like(f), torch.zeros_like(f))
        accepted = ~active
        f_new = f.clone()
        for _ in range(40):
            Xt = X + t[:, None, None] * D
            ft = objective.value(Xt, HX + t[:, None, None] * HD)
            ok = torch.isfinite(ft) & (ft >= f + 1e-4 * t * slope)
            newly = ok & ~accepted
            f_new = torch.where(newly, ft, f_new)
            accepted = accepted | ok
            if bool(accepted.all()):
                break
            t = torch.where(accepted, t, 0.5 * t)
        t = torch.where(accepted, t, torch.zeros_like(t))
        failed = active & (t == 0)
        f_new = torch.where(t > 0, f_new, f)
        X_new = X + t[:, None, None] * D
        HX_new = HX + t[:, None, None] * HD
        g_new = objective.gradient(X_new, HX_new) / scale
        s_k, y_k = X_new - X, -(g_new - g)
        sy = _inner(s_k, y_k)
        if len(S) == history_size:
            S.pop(0), Yh.pop(0), rho.pop(0)
        good = sy > 1e-12 * _inner(s_k, s_k).sqrt() * _inner(y_k, y_k).sqrt()
        S.append(torch.where(good[:, None, None], s_k, torch.zeros_like(s_k)))
        Yh.append(torch.where(good[:, None, None], y_k, torch.zeros_like(y_k)))
        rho.append(torch.where(good, 1.0 / sy.where(good, torch.ones_like(sy)),
                               torch.zeros_like(sy)))
        change = (f_new - f).abs() / f.abs().clamp_min(1.0)
        active = active & ~failed & (change > ftol) & (g_new.abs().amax((-1, -2)) > gtol)
        X, HX, f, g = X_new, HX_new, f_new, g_new
    return X, f, n_iter


# ----------------------------------------------------------- statistics
def _homogeneous(Y, center):
    """``[y - center; 1]`` in float64, shape (n, d+1)."""
    Yc = (Y - center).to(torch.float64)
    return torch.cat([Yc, Yc.new_ones(Yc.shape[0], 1)], 1)


def _homogeneous_outer(Y, center):
    """(n, ..., (d+1)^2) outer products of ``[y - center; 1]`` in float64."""
    Yc = (Y - center).to(torch.float64)
    ones = Yc.new_ones(*Yc.shape[:-1], 1)
    Z = torch.cat([Yc, ones], -1)
    return (Z.unsqueeze(-1) * Z.unsqueeze(-2)).flatten(-2)


def empty_statistics(model):
    """Zero M-step statistics: one (N_j, U_j, d+1, d+1) float64 tensor per layer."""
    d1 = model.n_features + 1
    device = model.inv_weight[0].device
    stats = []
    for j in range(model.n_layers):
        U = math.prod(model.layer_sizes[j + 1 :])
        stats.append(torch.zeros(model.layer_sizes[j], U, d1, d1, dtype=torch.float64,
                                 device=device))
    return stats


@torch.no_grad()
def accumulate_hard_statistics(model, X, paths, centers, stats):
    """Add the hard-EM statistics of rows ``X`` with assigned ``paths``.

    ``stats[j][m, u]`` accumulates ``[y - mu_j; 1][y - mu_j; 1]^T`` over the
    samples whose node in layer ``j`` is ``m`` and whose nodes in the inner
    layers form the (C-order) combination ``u``, with ``y`` the sample
    inverted through its own nodes of layers ``0..j-1``.
    """
    k = model.n_layers
    Y = X
    for j in range(k):
        inner_sizes = model.layer_sizes[j + 1 :]
        U = math.prod(inner_sizes)
        key = paths[:, j] * U
        for stride, l in zip(_flat_strides(inner_sizes), range(j + 1, k)):
            key = key + paths[:, l] * stride
        Z = _homogeneous(Y, centers[j])
        order = torch.argsort(key)
        keys, counts = torch.unique_consecutive(key[order], return_counts=True)
        Z = Z[order]
        flat = stats[j].view(-1, Z.shape[1], Z.shape[1])
        start = 0
        for key_value, count in zip(keys.tolist(), counts.tolist()):
            part = Z[start : start + count]
            flat[key_value] += part.T @ part
            start += count
        if j + 1 < k:
            Y = model.invert_through(Y, j, paths[:, j])


@torch.no_grad()
def accumulate_soft_statistics(model, X, centers, stats, budget=MEMORY_BUDGET):
    """Add the soft-EM statistics of rows ``X`` (responsibilities over all paths).

    Returns
    -------
    log_prob : Tensor of shape (n,)
        ``log p(x)`` of the rows under the current model.
    resp_sum : Tensor of shape (n_paths,)
        Sum of the responsibilities of the rows.
    """
    k, d = model.n_layers, model.n_features
    log_joint = model.log_joint(X, budget)
    log_prob = torch.logsumexp(log_joint, 1)
    resp = (log_joint - log_prob[:, None]).exp().to(torch.float64)
    n = X.shape[0]
    Y = X.unsqueeze(1)  # (n, M_j, d): all partial inversions through layers < j
    for j in range(k):
        M = Y.shape[1]
        NU = resp.shape[1] // M
        R = resp.reshape(n, M, NU)
        flat = stats[j].view(NU, -1)
        step = max(1, budget // max(M * (d + 1) ** 2, 1))
        for start in range(0, n, step):
            O = _homogeneous_outer(Y[start : start + step], centers[j])  # (ns, M, (d+1)^2)
            flat += R[start : start + step].reshape(-1, NU).T @ O.reshape(-1, O.shape[-1])
        if j + 1 < k:
            N = model.layer_sizes[j]
            W, c = model.inv_weight[j], model.inv_bias[j]
            Y = (torch.matmul(Y, W.reshape(N * d, d).T).reshape(n, M, N, d) + c).reshape(
                n, M * N, d
            )
    return log_prob, resp.sum(0)


class MStepError(ValueError):
    """Raised when a node's M-step problem is degenerate."""


@torch.no_grad()
def m_step_layers(model, stats, centers, reg, max_iter=50, prior_count=0.0):
    """Update every layer from its statistics, from the latent side to the data side.

    Layer ``k-1`` (next to ``z``) has the closed-form Gaussian solution; the
    other layers are maximised by batched L-BFGS over their nodes with the
    inner layers folded (paper §3.2). Nodes without data are left unchanged.

    With ``prior_count > 0`` the update is a maximum a posteriori one under a
    Wishart prior on the data-space precision ``P_p`` of every path, centred
    on an empirical-Bayes target ``T_p`` (:func:`prior_targets`: the path's
    own per-feature variances, correlated as the pooled within-path
    covariance): each path's statistics receive ``prior_count * T_p`` as
    extra scatter (no extra counts), i.e. the objective gains
    ``-prior_count/2 Tr(P_p T_p)`` per path, with ``d + 1`` degrees of
    freedom (no pull on ``log|P_p|``). Every layer sees that scatter through
    its outer layers (:func:`prior_scatter`), so that all layers maximise one
    objective, invariant under the affine gauge between layers. (A prior in
    one layer's own coordinates, or pseudo-counts that weigh one layer's
    log-determinant and not the others', make the maps drift along that
    gauge.) For one layer (a GMM) a component with ``n_k`` samples gets the
    covariance ``Sigma_k + (prior_count / n_k) T_k``.

    Parameters
    ----------
    model : DeepGMM
    stats : list of Tensor
        From :func:`accumulate_hard_statistics` / :func:`accumulate_soft_statistics`.
    centers : list of Tensor of shape (d,)
    reg : float
        Added to the data-space covariance of every path (``reg * I``, as
        extra scatter ``reg n_p I``, seen by every layer like the prior's),
        as ``reg_covar`` in a GMM.
    max_iter : int
        L-BFGS iterations per layer.
    prior_count : float, default=0.0
        Weight, in samples, of the prior's scatter per path (the statistics
        are summed over the processes before this call, so the target is the
        same on every process).

    Returns
    -------
    gain : float
        Increase of the M-step objective (summed over nodes).
    """
    d = model.n_features
    gain = 0.0
    psi = data_space_scatter(stats[0], reg, prior_count)
    for j in reversed(range(model.n_layers)):
        gamma = stats[j].clone()
        gamma[..., :d, :d] += prior_scatter(model, j, psi)
        W = model.inv_weight[j].detach().to(torch.float64)
        c = model.inv_bias[j].detach().to(torch.float64)
        mu = centers[j].to(torch.float64)
        X0 = torch.cat([W, (c + W @ mu).unsqueeze(-1)], -1)
        R, r = fold_upper_layers(model, j)
        objective = NodeObjective.from_statistics(gamma, R.to(torch.float64),
                                                  r.to(torch.float64))
        used = objective.counts > 0
        if not bool(used.any()):
            continue
        f0 = objective.value(X0, objective.hessian_apply(X0))
        if j == model.n_layers - 1:
            X1 = _closed_form_gaussian(gamma[:, 0], X0)
        else:
            X1, _, _ = lbfgs_maximize(objective, X0, max_iter=max_iter)
        f1 = objective.value(X1, objective.hessian_apply(X1))
        keep = used & torch.isfinite(f1) & (f1 >= f0)
        if bool((used & ~torch.isfinite(f1)).any()):
            raise MStepError(
                "The M-step of the deep GMM failed (a node's input covariance is "
                "singular). Increase reg_covar, reduce the number of nodes, or scale "
                "the data."
            )
        X1 = torch.where(keep[:, None, None], X1, X0)
        gain += float((f1 - f0)[keep].sum())
        Q, c_centred = X1[:, :, :d], X1[:, :, d]
        model.inv_weight[j].copy_(Q.to(model.inv_weight[j].dtype))
        model.inv_bias[j].copy_((c_centred - Q @ mu).to(model.inv_bias[j].dtype))
    return gain


def data_space_scatter(gamma, reg, prior_count):
    """The extra scatter of every path in data space: ``reg n_p I + prior_count T_p``.

    Both terms are in the data's coordinates and reach every layer through its
    outer layers (:func:`prior_scatter`), so that all layers maximise one
    objective. (``reg`` added to each layer's own input covariance would be a
    different amount in data space for each layer, depending on the maps
    between them: the layers then pull against each other and hard EM can
    cycle, e.g. on the constant pixels of ``load_digits``.)

    Parameters
    ----------
    gamma : Tensor of shape (N_0, U_0, d+1, d+1)
        The data-side layer's statistics (see :func:`prior_targets`).
    reg : float
    prior_count : float

    Returns
    -------
    psi : Tensor of shape (n_paths, d, d)
    """
    d = gamma.shape[-1] - 1
    counts = gamma.reshape(-1, d + 1, d + 1)[:, d, d]
    eye = torch.eye(d, dtype=gamma.dtype, device=gamma.device)
    psi = (reg * counts)[:, None, None] * eye
    if prior_count > 0:
        psi = psi + prior_count * prior_targets(gamma)
    return psi


def prior_targets(gamma):
    """Prior targets: each path's own variances with the pooled correlations.

    With ``n_p`` samples, sum ``s_p`` and scatter ``S_p`` on path ``p``, the
    within-path scatter is ``C_p = S_p - s_p s_p^T / n_p``, the path's
    variances ``v_p = diag(C_p) / n_p`` and the pooled within-path covariance
    ``B = sum_p C_p / sum_p n_p``, with correlations
    ``R = diag(B)^-1/2 B diag(B)^-1/2``. The target of path ``p`` is

        ``T_p = diag(v_p)^1/2 R diag(v_p)^1/2``,

    the path's own per-feature variances (a path of flat patches keeps its
    small scale) correlated like the data within the paths. It is
    well-conditioned when ``R`` is (``sum_p n_p`` samples estimate it, not
    ``n_p``), and close to ``C_p / n_p`` itself when the path's correlations
    are the pooled ones, so a prior on such a path inflates its covariance
    nearly in proportion (second order in the log-likelihood) instead of
    lifting its low-variance directions, as the diagonal ``diag(v_p)`` does.
    It is the structured shrinkage target of regularised discriminant
    analysis (Friedman, 1989), with the scale of each path kept. A feature
    whose pooled variance is below round-off (``B_jj <= sqrt(eps)`` times its
    second moment, or ``eps`` times the largest ``B_ii``: a constant pixel)
    has no correlations in ``R`` (its row and column are those of ``I``).

    Parameters
    ----------
    gamma : Tensor of shape (N_0, U_0, d+1, d+1)
        The data-side layer's statistics: one homogeneous scatter
        ``[[S_p, s_p], [s_p^T, n_p]]`` per path (any common centring).

    Returns
    -------
    targets : Tensor of shape (n_paths, d, d)
        ``T_p`` in flat C order over the paths (zero for a path without
        samples).
    """
    d = gamma.shape[-1] - 1
    tiny = torch.finfo(gamma.dtype).tiny
    flat = gamma.reshape(-1, d + 1, d + 1)
    counts, sums = flat[:, d, d], flat[:, :d, d]
    n = counts.clamp_min(tiny)[:, None, None]
    within = flat[:, :d, :d] - sums.unsqueeze(-1) * sums.unsqueeze(-2) / n
    within = 0.5 * (within + within.transpose(-1, -2))
    pooled = within.sum(0)  # the 1 / sum_p n_p cancels in the correlations
    B, second = torch.diagonal(pooled), torch.diagonal(flat[:, :d, :d].sum(0))
    # a feature whose pooled variance is round-off (a constant pixel: the
    # difference of two equal sums) gets no correlations, only its variance
    eps = torch.finfo(gamma.dtype).eps
    reliable = (B > eps**0.5 * second) & (B > eps * B.max())
    scale = torch.where(reliable, B.clamp_min(tiny).rsqrt(), torch.zeros_like(B))
    R = scale[:, None] * pooled * scale[None, :]
    R.diagonal().fill_(1.0)
    v = (torch.diagonal(within, dim1=-2, dim2=-1) / n[..., 0]).clamp_min(0.0)
    sd = v.sqrt() * (counts > 0)[:, None]
    return sd.unsqueeze(-1) * R * sd.unsqueeze(-2)


def prior_scatter(model, j, psi):
    """Data-space scatter ``psi_p`` of every path, seen at the input of layer ``j``.

    Path ``p`` reaches layer ``j`` through the inverse maps ``W`` of its outer
    nodes, which turn ``psi_p`` into ``W_{j-1} ... W_0 psi_p W_0^T ...
    W_{j-1}^T``; summed over the outer nodes, this is what the (node, inner
    path) of layer ``j`` on that path receives.

    Parameters
    ----------
    model : DeepGMM
    j : int
    psi : Tensor of shape (n_paths, d, d)
        One matrix per path (flat C order).

    Returns
    -------
    scatter : Tensor of shape (N_j, U_j, d, d)
    """
    P = psi
    for l in range(j):
        W = model.inv_weight[l].to(psi.dtype)[:, None]
        P = (W @ P.reshape(W.shape[0], -1, *psi.shape[1:]) @ W.transpose(-1, -2)).sum(0)
    return P.reshape(model.layer_sizes[j], -1, *psi.shape[1:])


def _closed_form_gaussian(gamma, X0):
    """Maximiser of ``N log|det Q| - 1/2 Tr(Gamma X^T X)`` (a Gaussian fit)."""
    d = gamma.shape[-1] - 1
    counts = gamma[:, -1, -1]
    safe = counts.clamp_min(1e-300)
    mean = gamma[:, :d, d] / safe[:, None]
    cov = gamma[:, :d, :d] / safe[:, None, None] - mean.unsqueeze(-1) * mean.unsqueeze(-2)
    cov = 0.5 * (cov + cov.transpose(-1, -2))
    eye = torch.eye(d, dtype=gamma.dtype, device=gamma.device)
    cov = torch.where((counts > 0)[:, None, None], cov, eye)
    L, info = torch.linalg.cholesky_ex(cov)
    if bool((info > 0).any()):
        raise MStepError(
            "Fitting the deep GMM failed because some nodes have ill-defined "
            "empirical covariance (for instance caused by singleton or collapsed "
            "samples). Try to decrease the number of nodes, increase reg_covar, or "
            "scale the input data."
        )
    Q = torch.linalg.solve_triangular(L, eye.expand_as(L), upper=False)
    X1 = torch.cat([Q, -(Q @ mean.unsqueeze(-1))], -1)
    return torch.where((counts > 0)[:, None, None], X1, X0)
