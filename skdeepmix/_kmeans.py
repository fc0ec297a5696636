"""k-means++ seeding and Lloyd's k-means in torch, chunked over rows.

Used to initialise the mixtures on the same device as the data, seeded by a
:class:`torch.Generator`. ``X`` may be a tensor or any object with ``shape``,
``device``, ``dtype`` and row indexing that returns tensors (e.g. the streamed
:class:`~skdeepmix._torch_utils.RowSource`). With a ``partition``
(:class:`~skdeepmix._distributed.RowPartition`) each process holds a shard of
the rows and the result equals the single-process one on all the rows: the
random draws use global row indices from the shared generator, the owner of a
drawn row sends it to the others, and sums are all-reduced. Memory is
bounded by the chunk size (plus one float and one label per sample).
Distances are computed on data shifted by its mean, so that
``|x|² - 2 x·c + |c|²`` does not cancel catastrophically in float32 for data
far from the origin.

``sample_weight`` (frequencies, as in scikit-learn's ``KMeans``): k-means++
draws its first center with probability proportional to the weight and the
next candidates proportional to ``weight · D²``; Lloyd's centers are weighted
means. A row of weight 0 is never chosen; integer weights act as repeated
rows.
"""

from __future__ import annotations

import math
from functools import partial, reduce

import torch

from ._distributed import RowPartition, searchsorted_global
from ._torch_utils import iter_row_chunks, run_in_threads, thread_shares

__all__ = ["kmeans_plusplus", "kmeans", "assign_labels"]


def _sum_over_chunks(X, chunk_size, body):
    """``sum(body(rows) for rows in the row chunks of X)`` (a tensor or a
    tuple of tensors; ``body`` may also write its rows' results and return
    None). Inside a :class:`~skdeepmix._torch_utils.row_threads` block of
    several threads, the chunks are split into contiguous runs, one per
    thread, each summed on its own, the runs' sums added in order."""
    shares = thread_shares(list(iter_row_chunks(X.shape[0], chunk_size)), X)

    def run(share):
        total = None
        for rows in share:
            total = _added(total, body(rows))
        return total

    if len(shares) == 1:
        return run(shares[0])
    return reduce(_added, run_in_threads([partial(run, share) for share in shares]), None)


def _added(total, part):
    """``total + part`` for tensors or tuples of tensors, None counting as nothing."""
    if total is None or part is None:
        return part if total is None else total
    if isinstance(part, tuple):
        return tuple(a + b for a, b in zip(total, part))
    return total + part


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


def _data_mean(X, chunk_size, partition=None, sample_weight=None):
    partition = _single(X, partition)
    total = torch.zeros(X.shape[1], dtype=X.dtype, device=X.device)
    if sample_weight is None:
        body = lambda rows: X[rows].sum(0)  # noqa: E731
    else:
        body = lambda rows: sample_weight[rows] @ X[rows]  # noqa: E731
    if X.shape[0]:  # (an empty shard adds nothing)
        total += _sum_over_chunks(X, chunk_size, body)
    if sample_weight is None:
        return partition.sum(total) / partition.n_total
    weight = sample_weight.sum().reshape(1)
    partition.sum(total, weight)
    return total / weight


class _Single(RowPartition):
    """The trivial partition (all rows here), built without collectives."""

    def setup(self, n_local):
        self.n_local = self.n_total = int(n_local)
        self.sizes, self.offset, self.active = [self.n_local], 0, False
        return self


def _single(X, partition):
    return partition if partition is not None else RowPartition.__new__(_Single).setup(X.shape[0])


def kmeans_plusplus(X, n_clusters, generator, chunk_size=65536, *, partition=None,
                    sample_weight=None):
    """Greedy k-means++ seeding (Arthur & Vassilvitskii, with local trials).

    Parameters
    ----------
    X : Tensor of shape (n_samples, n_features)
    n_clusters : int
    generator : torch.Generator
    chunk_size : int, default=65536
    partition : RowPartition, optional
        This process's share of the rows (distributed fit).
    sample_weight : Tensor of shape (n_samples,), optional
        Non-negative weights of this process's rows (see the module docstring).

    Returns
    -------
    centers : Tensor of shape (n_clusters, n_features)
    indices : LongTensor of shape (n_clusters,)
        Rows of ``X`` chosen as centers (global indices with a partition).
    """
    partition = _single(X, partition)
    n_local, n_samples = X.shape[0], partition.n_total
    shift = _data_mean(X, chunk_size, partition)
    n_trials = 2 + int(math.log(n_clusters))
    if sample_weight is None:
        first = int(torch.randint(n_samples, (1,), generator=generator, device=X.device))
    else:
        first = int(_draw_proportional(sample_weight, 1, generator, partition)[0])
    indices = [first]
    closest = _min_sq_dist_to(X, partition.rows(X, [first]), chunk_size, shift)
    for _ in range(1, n_clusters):
        potential = closest if sample_weight is None else closest * sample_weight
        candidates = _draw_proportional(potential, n_trials, generator, partition)
        potentials = torch.zeros(n_trials, dtype=X.dtype, device=X.device)
        cand = partition.rows(X, candidates)
        cand_shifted = cand - shift
        cand_sq = cand_shifted.square().sum(1)

        def potential_of(rows):
            d2 = torch.minimum(_squared_distances(X[rows] - shift, cand_shifted, cand_sq),
                               closest[rows, None])
            return d2.sum(0) if sample_weight is None else sample_weight[rows] @ d2

        if n_local:
            potentials += _sum_over_chunks(X, chunk_size, potential_of)
        partition.sum(potentials)
        best = int(torch.argmin(potentials))
        indices.append(int(candidates[best]))
        closest = torch.minimum(
            closest, _min_sq_dist_to(X, cand[best : best + 1], chunk_size, shift)
        )
    indices = torch.tensor(indices, device=X.device)
    return partition.rows(X, indices).clone(), indices


def _draw_proportional(values, n_draws, generator, partition):
    """Global row indices drawn with probability proportional to ``values``
    (this process's rows); uniformly when they are all zero."""
    cumsum = torch.cumsum(values, 0)
    total = partition.sum_scalar(float(cumsum[-1]) if cumsum.numel() else 0.0)
    if total <= 0:  # fewer distinct (or weighted) points than clusters
        return torch.randint(partition.n_total, (n_draws,), generator=generator,
                             device=values.device)
    if partition.active:
        u = torch.rand(n_draws, generator=generator, device=values.device, dtype=values.dtype)
        return searchsorted_global(partition, cumsum, u.double() * total)
    return _sample_proportional(cumsum, n_draws, generator)


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

    def nearest(rows):
        values, index = _squared_distances(X[rows] - shift, centers, sq).min(1)
        labels[rows], dist[rows] = index, values

    _sum_over_chunks(X, chunk_size, nearest)
    return labels, dist


def kmeans(
    X, n_clusters, generator, *, max_iter=300, tol=1e-4, chunk_size=65536, partition=None,
    sample_weight=None,
):
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
    partition : RowPartition, optional
        This process's share of the rows (distributed fit).
    sample_weight : Tensor of shape (n_samples,), optional
        Non-negative weights of this process's rows (see the module docstring).

    Returns
    -------
    centers : Tensor of shape (n_clusters, n_features)
    labels : LongTensor of shape (n_samples,)
        Labels of this process's rows.
    """
    partition = _single(X, partition)
    n_samples, n_features = X.shape
    weight = sample_weight
    centers, _ = kmeans_plusplus(X, n_clusters, generator, chunk_size, partition=partition,
                                 sample_weight=weight)
    mean = _data_mean(X, chunk_size, partition, weight)
    variance = torch.zeros(2, dtype=X.dtype, device=X.device)  # [sum w |x - mean|², sum w]
    for rows in iter_row_chunks(n_samples, chunk_size):
        squares = (X[rows] - mean).square().sum(1)
        if weight is None:
            variance += torch.stack([squares.sum(), squares.new_tensor(float(squares.numel()))])
        else:
            variance += torch.stack([weight[rows] @ squares, weight[rows].sum()])
    partition.sum(variance)
    threshold = tol * float(variance[0]) / (float(variance[1]) * n_features)
    labels = None
    for _ in range(max_iter):
        new_labels, dist = assign_labels(X, centers, chunk_size, mean)
        sums = torch.zeros_like(centers)
        counts = torch.zeros(n_clusters, dtype=X.dtype, device=X.device)

        def sums_of(rows):
            members = torch.nn.functional.one_hot(new_labels[rows], n_clusters).to(X.dtype)
            if weight is not None:
                members *= weight[rows, None]
            return members.T @ (X[rows] - mean), members.sum(0)

        if n_samples:
            chunk_sums, chunk_counts = _sum_over_chunks(X, chunk_size, sums_of)
            sums += chunk_sums
            counts += chunk_counts
        partition.sum(sums, counts)
        safe = counts.clamp_min(torch.finfo(X.dtype).tiny)
        new_centers = torch.where(counts[:, None] > 0, sums / safe[:, None] + mean, centers)
        empty = torch.nonzero(counts == 0).flatten()
        if empty.numel():  # relocate empty clusters to the farthest (weighted) points
            if weight is not None:
                dist = torch.where(weight > 0, dist, -1.0)
            far = partition.topk(dist, empty.numel())
            new_centers[empty] = partition.rows(X, far)
        shift = float((new_centers - centers).square().sum())
        centers = new_centers
        same = partition.all_true(labels is not None and bool(torch.equal(labels, new_labels)))
        labels = new_labels
        if same or shift <= threshold:
            break
    labels, _ = assign_labels(X, centers, chunk_size, mean)
    return centers, labels
