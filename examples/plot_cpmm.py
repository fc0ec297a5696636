"""
=====================================================
Continuously parameterized mixtures (CPMMEstimator)
=====================================================

A CPMM learns ``C`` trajectories of mixture-of-factor-analyser components:
a neural ODE moves the component parameters along a pseudotime, and each
trajectory is one cluster. After ``fit`` the components are extracted and the
ODE is dropped, so the fitted model is an ordinary (hierarchical) mixture.

1. The 8x8 digits shipped with scikit-learn: clustering accuracy and the
   trajectories' means shown as image rows (compare with sklearn's
   ``GaussianMixture``).
2. The paper's broken rings, trained with the flow curriculum: samples and
   the extracted components.

Runs in about a minute on one CPU thread.
"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.mixture import GaussianMixture  # noqa: E402

from skdeepmix.cpmm import CPMMEstimator  # noqa: E402
from skdeepmix.datasets._toy import make_broken_rings  # noqa: E402
from skdeepmix.metrics import clustering_accuracy  # noqa: E402

torch.set_num_threads(1)  # a script's choice: the package itself never sets threads
out = Path(__file__).resolve().parents[1] / "doc" / "images"
out.mkdir(parents=True, exist_ok=True)

# --- 1. digits -------------------------------------------------------------
X, y = load_digits(return_X_y=True)
cpmm = CPMMEstimator(n_components=10, n_points_per_trajectory=10, random_state=0).fit(X)
gmm = GaussianMixture(10, random_state=0).fit(X)
print(f"CPMM clustering accuracy        {clustering_accuracy(y, cpmm.predict(X)):.3f}")
print(f"GaussianMixture(10) accuracy    {clustering_accuracy(y, gmm.predict(X)):.3f}")
print("extracted components:", cpmm.means_.shape, "(clusters, pseudotimes, features)")

labels = cpmm.predict(X)
order = np.argsort([np.bincount(y[labels == c], minlength=10).argmax()
                    if np.any(labels == c) else 10 for c in range(10)])
fig, axes = plt.subplots(10, 1, figsize=(6, 7))
for row, c in enumerate(order):
    axes[row].imshow(np.concatenate([m.reshape(8, 8) for m in cpmm.means_[c]], axis=1),
                     cmap="gray_r")
    axes[row].axis("off")
fig.suptitle("digits: each row is one trajectory (cluster), t = 0 ... 1")
fig.savefig(out / "cpmm_example_digits.png", dpi=100, bbox_inches="tight")

# --- 2. broken rings with the curriculum ----------------------------------
X, y = make_broken_rings(1000, random_state=0)
# trajectories that curve around a ring need more solver steps than the default two
rings = CPMMEstimator(n_components=2, n_points_per_trajectory=25, rank=1, curriculum="flow",
                      n_spaces=21, teacher_iter=20, hidden_size=64, ode_step_size=0.1,
                      batch_size=128, entropy_reg=0.1, random_state=0).fit(X)
S, labels = rings.sample(1000)
fig, axes = plt.subplots(1, 2, figsize=(9, 4.5))
axes[0].scatter(X[:, 0], X[:, 1], c=y, s=3, cmap="tab10")
axes[0].set_title("broken rings")
axes[1].scatter(S[:, 0], S[:, 1], c=labels, s=3, cmap="Set1")
for c in range(2):
    axes[1].plot(rings.means_[c, :, 0], rings.means_[c, :, 1], "k.-", lw=0.8, ms=3)
axes[1].set_title("CPMM samples and trajectory means")
for ax in axes:
    ax.set_aspect("equal")
fig.savefig(out / "cpmm_example_rings.png", dpi=100, bbox_inches="tight")
print(f"rings: train log-likelihood {rings.score(X):.3f}; figures in {out}")
