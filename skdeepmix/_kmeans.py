"""k-means++ seeding and Lloyd's k-means in torch, chunked over rows.

Used to initialise the mixtures on the same device as the data, seeded by a
:class:`torch.Generator`. Memory is bounded by the chunk size (plus one float
and one label per sample). Distances are computed on data shifted by its mean,
so that ``|x|² - 2 x·c + |c|²`` does not cancel catastrophically in float32
for data far from the origin.
"""

from __future__ import annotations

import math

import torch

from ._torch_utils import iter_row_chunks

__all__ = ["kmeans_plusplus", "kmeans", "assign_labels"]


def _squared_distances(X, centers, center_sq_norms):
    """(n, k) squared Euclidean distances, clamped at 0."""
    d2 = X.square().sum(1, keepdim=True) - 2.0 * X @ centers.T + center_sq_norms
    return d2.clamp_min_(0.0)


def _sample_proportional(weights_cumsum, n_draws, generator):
    """Indices drawn with probability proportional to the weights."""
    total = weights_cumsum[-1]
    u = torch.rand(
        n_draws, generator=generator, device=weights_cumsum.device, dtype=weights_cumsum.dtype
    )
    index = torch.searchsorted(weights_cumsum, u * total, right=True)
    return index.clamp_(max=weights_cumsum.numel() - 1)


def _data_mean(X, chunk_size):
    total = torch.zeros(X.shape[1], dtype=X.dtype, device=X.device)
    for rows in iter_row_chunks(X.shape[0], chunk_size):
        total += X[rows].sum(0)
    return total / X.shape[0]


def kmeans_plusplus(X, n_clusters, generator, chunk_size=65536):
    """Greedy k-means++ seeding (Arthur & Vassilvitskii, with local trials).

    Parameters
    ----------
    X : Tensor of shape (n_samples, n_features)
    n_clusters : int
    generator : torch.Generator
    chunk_size : int, default=65536

    Returns
    -------
    centers : Tensor of shape (n_clusters, n_features)
    indices : LongTensor of shape (n_clusters,)
        Rows of ``X`` chosen as centers.
    """
    n_samples = X.shape[0]
    shift = _data_mean(X, chunk_size)
    n_trials = 2 + int(math.log(n_clusters))
    first = int(torch.randint(n_samples, (1,), generator=generator, device=X.device))
    indices = [first]
    closest = _min_sq_dist_to(X, X[first : first + 1], chunk_size, shift)
    for _ in range(1, n_clusters):
        cumsum = torch.cumsum(closest, 0)
        if float(cumsum[-1]) <= 0:  # fewer distinct points than clusters
            candidates = torch.randint(
                n_samples, (n_trials,), generator=generator, device=X.device
            )
        else:
            candidates = _sample_proportional(cumsum, n_trials, generator)
        potentials = torch.zeros(n_trials, dtype=X.dtype, device=X.device)
        cand = X[candidates]
        cand_shifted = cand - shift
        cand_sq = cand_shifted.square().sum(1)
        for rows in iter_row_chunks(n_samples, chunk_size):
            d2 = _squared_distances(X[rows] - shift, cand_shifted, cand_sq)
            potentials += torch.minimum(d2, closest[rows, None]).sum(0)
        best = int(torch.argmin(potentials))
        indices.append(int(candidates[best]))
        closest = torch.minimum(
            closest, _min_sq_dist_to(X, cand[best : best + 1], chunk_size, shift)
        )
    indices = torch.tensor(indices, device=X.device)
    return X[indices].clone(), indices


def _min_sq_dist_to(X, centers, chunk_size, shift):
    return assign_labels(X, centers, chunk_size, shift)[1]


def assign_labels(X, centers, chunk_size=65536, shift=None):
    """Nearest center of each row; returns ``(labels, squared distances)``.

    ``shift`` (default: the data mean) is subtracted from rows and centers.
    """
    if shift is None:
        shift = _data_mean(X, chunk_size)
    centers = centers - shift
    sq = centers.square().sum(1)
    labels = torch.empty(X.shape[0], dtype=torch.long, device=X.device)
    dist = torch.empty(X.shape[0], dtype=X.dtype, device=X.device)
    for rows in iter_row_chunks(X.shape[0], chunk_size):
        values, index = _squared_distances(X[rows] - shift, centers, sq).min(1)
        labels[rows], dist[rows] = index, values
    return labels, dist


def kmeans(X, n_clusters, generator, *, max_iter=300, tol=1e-4, chunk_size=65536):
    """Lloyd's k-means from a k-means++ seeding (one initialisation).

    Parameters
    ----------
    X : Tensor of shape (n_samples, n_features)
    n_clusters : int
    generator : torch.Generator
    max_iter : int, default=300
    tol : float, default=1e-4
        Relative tolerance: convergence when the squared shift of the centers
        is below ``tol`` times the mean feature variance (as scikit-learn).
    chunk_size : int, default=65536

    Returns
    -------
    centers : Tensor of shape (n_clusters, n_features)
    labels : LongTensor of shape (n_samples,)
    """
    n_samples, n_features = X.shape
    centers, _ = kmeans_plusplus(X, n_clusters, generator, chunk_size)
    mean = _data_mean(X, chunk_size)
    variance = torch.zeros((), dtype=X.dtype, device=X.device)
    for rows in iter_row_chunks(n_samples, chunk_size):
        variance += (X[rows] - mean).square().sum()
    threshold = tol * float(variance) / (n_samples * n_features)
    labels = None
    for _ in range(max_iter):
        new_labels, dist = assign_labels(X, centers, chunk_size, mean)
        sums = torch.zeros_like(centers)
        counts = torch.zeros(n_clusters, dtype=X.dtype, device=X.device)
        for rows in iter_row_chunks(n_samples, chunk_size):
            members = torch.nn.functional.one_hot(new_labels[rows], n_clusters).to(X.dtype)
            sums += members.T @ (X[rows] - mean)
            counts += members.sum(0)
        new_centers = torch.where(
            counts[:, None] > 0, sums / counts.clamp_min(1)[:, None] + mean, centers
        )
        empty = torch.nonzero(counts == 0).flatten()
        if empty.numel():  # relocate empty clusters to the farthest points
            far = torch.topk(dist, empty.numel()).indices
            new_centers[empty] = X[far]
        shift = float((new_centers - centers).square().sum())
        centers = new_centers
        same = labels is not None and bool(torch.equal(labels, new_labels))
        labels = new_labels
        if same or shift <= threshold:
            break
    labels, _ = assign_labels(X, centers, chunk_size, mean)
    return centers, labels
