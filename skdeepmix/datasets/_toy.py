"""The two synthetic 2-D data sets of the CPMM paper (Bender et al., 2023, Sec. 5.1)."""

from __future__ import annotations

from numbers import Integral, Real

import numpy as np
from sklearn.utils import check_random_state

__all__ = ["make_broken_rings", "make_spiral_arms"]


def _check_n_samples(n_samples):
    if not isinstance(n_samples, Integral) or n_samples < 2:
        raise ValueError(f"n_samples must be an int >= 2, got {n_samples!r}.")


def make_broken_rings(n_samples=1000, *, radius=1.0, radius_ratio=1.1, noise=0.015,
                      gap=np.pi / 3, shuffle=True, random_state=None):
    """Two concentric broken rings whose radii differ by 10 %.

    Each ring is a circle with one missing arc of angle ``gap`` (the inner
    ring's gap is centred at angle 0, the outer ring's at ``pi``), with the
    same radial Gaussian thickness ``noise``.

    Parameters
    ----------
    n_samples : int, default=1000
        Total number of points (split evenly between the rings).
    radius : float, default=1.0
        Radius of the inner ring.
    radius_ratio : float, default=1.1
        Outer radius / inner radius (paper: 10 % apart).
    noise : float, default=0.015
        Standard deviation of the radial noise (the rings' thickness).
    gap : float, default=pi/3
        Angle (radians) of the missing arc of each ring.
    shuffle : bool, default=True
    random_state : int, RandomState or None, default=None

    Returns
    -------
    X : ndarray of shape (n_samples, 2)
    y : ndarray of shape (n_samples,)
        Ring index (0 inner, 1 outer).

    Examples
    --------
    >>> X, y = make_broken_rings(200, random_state=0)
    >>> X.shape, sorted(set(y.tolist()))
    ((200, 2), [0, 1])
    """
    _check_n_samples(n_samples)
    if not (isinstance(gap, Real) and 0 <= gap < 2 * np.pi):
        raise ValueError(f"gap must be in [0, 2 pi), got {gap!r}.")
    if not (isinstance(noise, Real) and noise >= 0):
        raise ValueError(f"noise must be >= 0, got {noise!r}.")
    rng = check_random_state(random_state)
    sizes = (n_samples // 2, n_samples - n_samples // 2)
    parts, labels = [], []
    for ring, (size, r, centre) in enumerate(
        zip(sizes, (radius, radius * radius_ratio), (0.0, np.pi))
    ):
        theta = centre + gap / 2 + rng.uniform(0.0, 2 * np.pi - gap, size)
        rr = r + noise * rng.standard_normal(size)
        parts.append(np.c_[rr * np.cos(theta), rr * np.sin(theta)])
        labels.append(np.full(size, ring))
    X, y = np.concatenate(parts), np.concatenate(labels)
    if shuffle:
        order = rng.permutation(n_samples)
        X, y = X[order], y[order]
    return X, y.astype(np.int64)


def make_spiral_arms(n_samples=1000, *, n_arms=5, turns=0.75, noise=0.04,
                     outlier_fraction=0.05, shuffle=True, random_state=None):
    """A noisy multi-armed spiral with outliers between the arms.

    Arm ``k`` is ``r = s``, ``theta = 2 pi (turns * s + k / n_arms)`` for
    ``s`` uniform in ``[0.05, 1]`` (beginning near the origin and curving
    outward), with isotropic Gaussian noise ``noise``. A fraction
    ``outlier_fraction`` of the points are outliers drawn uniformly in the
    disc of radius 1.1 (labelled ``-1``), i.e. points without a clear arm.

    Parameters
    ----------
    n_samples : int, default=1000
    n_arms : int, default=5
    turns : float, default=0.75
        Revolutions of each arm from the centre to the rim.
    noise : float, default=0.04
    outlier_fraction : float in [0, 1), default=0.05
    shuffle : bool, default=True
    random_state : int, RandomState or None, default=None

    Returns
    -------
    X : ndarray of shape (n_samples, 2)
    y : ndarray of shape (n_samples,)
        Arm index, ``-1`` for outliers.

    Examples
    --------
    >>> X, y = make_spiral_arms(300, random_state=0)
    >>> X.shape, int(y.max())
    ((300, 2), 4)
    """
    _check_n_samples(n_samples)
    if not (isinstance(n_arms, Integral) and n_arms >= 1):
        raise ValueError(f"n_arms must be an int >= 1, got {n_arms!r}.")
    if not (isinstance(outlier_fraction, Real) and 0 <= outlier_fraction < 1):
        raise ValueError(f"outlier_fraction must be in [0, 1), got {outlier_fraction!r}.")
    if not (isinstance(noise, Real) and noise >= 0):
        raise ValueError(f"noise must be >= 0, got {noise!r}.")
    rng = check_random_state(random_state)
    n_out = int(round(outlier_fraction * n_samples))
    n_in = n_samples - n_out
    arm = rng.randint(0, n_arms, n_in)
    s = rng.uniform(0.05, 1.0, n_in)
    theta = 2 * np.pi * (turns * s + arm / n_arms)
    X_in = np.c_[s * np.cos(theta), s * np.sin(theta)] + noise * rng.standard_normal((n_in, 2))
    r_out = 1.1 * np.sqrt(rng.uniform(0, 1, n_out))
    a_out = rng.uniform(0, 2 * np.pi, n_out)
    X_out = np.c_[r_out * np.cos(a_out), r_out * np.sin(a_out)]
    X = np.concatenate([X_in, X_out])
    y = np.concatenate([arm, np.full(n_out, -1)])
    if shuffle:
        order = rng.permutation(n_samples)
        X, y = X[order], y[order]
    return X, y.astype(np.int64)
