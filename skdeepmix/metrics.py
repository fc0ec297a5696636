"""Metrics used by the papers: Hungarian clustering accuracy, bits/dim, outlier AUC."""

from __future__ import annotations

import math

import numpy as np
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import roc_auc_score
from sklearn.utils.validation import check_consistent_length, column_or_1d

__all__ = ["clustering_accuracy", "bits_per_dim", "outlier_auc"]


def clustering_accuracy(labels_true, labels_pred):
    """Accuracy of a clustering under the best one-to-one cluster-to-class map.

    The map is found by the Hungarian algorithm on the contingency table
    (clusters without a class count as errors), as in the clustering papers.

    Parameters
    ----------
    labels_true : array-like of shape (n_samples,)
    labels_pred : array-like of shape (n_samples,)

    Returns
    -------
    accuracy : float in [0, 1]

    Examples
    --------
    >>> clustering_accuracy([0, 0, 1, 1], [1, 1, 0, 0])
    1.0
    """
    labels_true = column_or_1d(labels_true)
    labels_pred = column_or_1d(labels_pred)
    check_consistent_length(labels_true, labels_pred)
    if labels_true.size == 0:
        raise ValueError("clustering_accuracy needs at least one sample.")
    classes, true_idx = np.unique(labels_true, return_inverse=True)
    clusters, pred_idx = np.unique(labels_pred, return_inverse=True)
    table = np.zeros((clusters.size, classes.size), dtype=np.int64)
    np.add.at(table, (pred_idx, true_idx), 1)
    rows, cols = linear_sum_assignment(table, maximize=True)
    return float(table[rows, cols].sum() / labels_true.size)


def bits_per_dim(log_likelihood, n_features, *, scale=256.0):
    """Bits per dimension of images from a log-density of dequantised data.

    With pixels dequantised to ``[0, 1]`` as ``(255 x + u) / scale`` and a
    log-density ``log p`` in that space, the discrete log-likelihood in bits
    per dimension is ``-(log p / D - log scale) / log 2`` (the FFJORD
    convention used by the CPMM paper).

    Parameters
    ----------
    log_likelihood : float or array-like of shape (n_samples,)
        Log-density (nats) of each sample in the ``[0, 1]`` space.
    n_features : int
        Number of dimensions ``D``.
    scale : float, default=256.0

    Returns
    -------
    bpd : float
        Mean bits per dimension (lower is better).
    """
    mean_ll = float(np.mean(log_likelihood))
    return -(mean_ll / n_features - math.log(scale)) / math.log(2.0)


def outlier_auc(scores_inliers, scores_outliers):
    """ROC AUC of separating inliers from outliers by a score (higher = inlier).

    Parameters
    ----------
    scores_inliers : array-like of shape (n_inliers,)
        E.g. ``score_samples`` of inlier test samples.
    scores_outliers : array-like of shape (n_outliers,)

    Returns
    -------
    auc : float in [0, 1]
    """
    scores_inliers = column_or_1d(scores_inliers)
    scores_outliers = column_or_1d(scores_outliers)
    y = np.r_[np.ones(scores_inliers.size), np.zeros(scores_outliers.size)]
    return float(roc_auc_score(y, np.r_[scores_inliers, scores_outliers]))
