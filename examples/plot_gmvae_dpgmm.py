"""
GMVAEDPGMM on the digits data set: the number of clusters is learned
=====================================================================

A Gaussian-mixture VAE with a Dirichlet-process prior (truncation 30, every
other parameter at its default) is fitted on scikit-learn's 8x8 digits, side
by side with scikit-learn's ``GaussianMixture(n_components=10)`` on the raw
pixels (which is *told* the number of classes). The DP model is not told it:
``n_components_`` is the number of clusters it keeps. The figure shows samples
of each discovered cluster and the training curves. Runs in about a minute on
one CPU thread.
"""

import time

import matplotlib.pyplot as plt
import numpy as np
from sklearn.datasets import load_digits
from sklearn.metrics import normalized_mutual_info_score
from sklearn.mixture import GaussianMixture

from skdeepmix.gmvae_dpgmm import GMVAEDPGMM
from skdeepmix.metrics import clustering_accuracy

X, y = load_digits(return_X_y=True)
X = X / 16.0  # pixels in [0, 1] -> Bernoulli decoder

t0 = time.perf_counter()
gmm = GaussianMixture(10, covariance_type="diag", random_state=0).fit(X)
t_gmm = time.perf_counter() - t0
p_gmm = gmm.predict(X)

t0 = time.perf_counter()
est = GMVAEDPGMM(
    n_components=30,  # truncation: the model decides how many it uses
    random_state=0,
    callback=lambda e: {"nmi": normalized_mutual_info_score(y, e.predict(X))},
).fit(X)
t_dp = time.perf_counter() - t0
p_dp = est.predict(X)

for name, p, t in (("GaussianMixture(10)", p_gmm, t_gmm), ("GMVAEDPGMM (joint)", p_dp, t_dp)):
    print(
        f"{name:22s} NMI={normalized_mutual_info_score(y, p):.3f} "
        f"ACC={clustering_accuracy(y, p):.3f} clusters={np.unique(p).size} ({t:.1f}s)"
    )
print(f"active clusters found by the DP prior: {est.n_components_} of 30")

# samples of every active cluster (rows), most populated first
order = est.active_components_[np.argsort(-est.weights_[est.active_components_])]
Xs, ys = est.sample(400)
fig = plt.figure(figsize=(10, 1 + 0.8 * len(order)))
grid = fig.add_gridspec(len(order), 12)
for row, k in enumerate(order):
    imgs = Xs[ys == k][:8]
    for col, img in enumerate(imgs):
        ax = fig.add_subplot(grid[row, col])
        ax.imshow(img.reshape(8, 8), cmap="gray_r")
        ax.axis("off")
ax = fig.add_subplot(grid[:, 9:])
epochs = [h["iteration"] for h in est.history_]
ax.plot(epochs, [h["nmi"] for h in est.history_], label="NMI")
ax.plot(epochs, [h["n_active"] / 30 for h in est.history_], label="active clusters / 30")
ax.set_xlabel("epoch")
ax.legend()
fig.suptitle(f"GMVAEDPGMM on digits: {est.n_components_} clusters discovered")
plt.show()
