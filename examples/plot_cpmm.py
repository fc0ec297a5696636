"""
=================================================
Continuously parameterized mixtures on the digits
=================================================

A :class:`skdeepmix.CPMMEstimator` learns ``n_components`` trajectories of
mixture-of-factor-analyser components: a neural ODE moves the component parameters
along a pseudotime ``t`` in [0, 1], and each trajectory is one cluster. After ``fit``
the components at ``n_points_per_trajectory`` pseudotimes are extracted and the ODE
is dropped, so the fitted model is an ordinary (hierarchical) mixture.

Here: the 8x8 digits shipped with scikit-learn, the clustering accuracy beside
scikit-learn's ``GaussianMixture``, and the trajectories' means shown as image rows.
"""

# %%
# Fit
# ---
import matplotlib.pyplot as plt
import numpy as np
from sklearn.datasets import load_digits
from sklearn.mixture import GaussianMixture

from skdeepmix import CPMMEstimator
from skdeepmix.metrics import clustering_accuracy

X, y = load_digits(return_X_y=True)
cpmm = CPMMEstimator(n_components=10, n_points_per_trajectory=10, random_state=0).fit(X)
gmm = GaussianMixture(10, random_state=0).fit(X)
print(f"CPMM clustering accuracy:             {clustering_accuracy(y, cpmm.predict(X)):.3f}")
print(f"GaussianMixture(10) clustering accuracy: {clustering_accuracy(y, gmm.predict(X)):.3f}")
print("extracted means_:", cpmm.means_.shape, "(clusters, pseudotimes, features)")

# %%
# The trajectories
# ----------------
# Each row is one cluster; from left to right the means of its components at
# ``t = 0 ... 1``. Rows are sorted by the digit most of their samples show.
labels = cpmm.predict(X)
majority = [np.bincount(y[labels == c], minlength=10).argmax() if np.any(labels == c) else 10
            for c in range(10)]
fig, axes = plt.subplots(10, 1, figsize=(6, 7))
for row, c in enumerate(np.argsort(majority)):
    axes[row].imshow(np.concatenate([m.reshape(8, 8) for m in cpmm.means_[c]], axis=1),
                     cmap="gray_r")
    axes[row].axis("off")
fig.suptitle("each row is one trajectory (cluster), t = 0 ... 1")
plt.show()
