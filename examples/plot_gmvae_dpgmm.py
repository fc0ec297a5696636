"""
===========================================================
GMVAEDPGMM on the digits: the number of clusters is learned
===========================================================

A Gaussian-mixture VAE with a Dirichlet-process prior,
:class:`skdeepmix.GMVAEDPGMM` (truncation 30, every other parameter at its default),
is fitted on scikit-learn's 8x8 digits, beside scikit-learn's
``GaussianMixture(n_components=10)`` on the raw pixels, which is *told* the number of
classes. The DP model is not: ``n_components_`` is the number of clusters it keeps.
A ``callback`` records the NMI after every epoch.
"""

# %%
# Fit both models
# ---------------
import matplotlib.pyplot as plt
import numpy as np
from sklearn.datasets import load_digits
from sklearn.metrics import normalized_mutual_info_score
from sklearn.mixture import GaussianMixture

from skdeepmix import GMVAEDPGMM
from skdeepmix.metrics import clustering_accuracy

X, y = load_digits(return_X_y=True)
X = X / 16.0  # pixels in [0, 1]: the Bernoulli decoder

gmm = GaussianMixture(10, covariance_type="diag", random_state=0).fit(X)
est = GMVAEDPGMM(
    n_components=30,  # the truncation: the model decides how many it uses
    random_state=0,
    callback=lambda e: {"nmi": normalized_mutual_info_score(y, e.predict(X))},
).fit(X)

for name, labels in (("GaussianMixture(10)", gmm.predict(X)), ("GMVAEDPGMM", est.predict(X))):
    print(f"{name:20s} NMI={normalized_mutual_info_score(y, labels):.3f} "
          f"accuracy={clustering_accuracy(y, labels):.3f} clusters={np.unique(labels).size}")
print(f"active clusters kept by the DP prior: {est.n_components_} of 30")

# %%
# Samples of every cluster, and the training curves
# -------------------------------------------------
# Rows: the active clusters, most populated first. Right: the NMI and the number of
# active clusters after every epoch (``history_``).
order = est.active_components_[np.argsort(-est.weights_[est.active_components_])]
Xs, ys = est.sample(400)
fig = plt.figure(figsize=(10, 1 + 0.8 * len(order)))
grid = fig.add_gridspec(len(order), 12)
for row, k in enumerate(order):
    for col, img in enumerate(Xs[ys == k][:8]):
        ax = fig.add_subplot(grid[row, col])
        ax.imshow(img.reshape(8, 8), cmap="gray_r")
        ax.axis("off")
ax = fig.add_subplot(grid[:, 9:])
epochs = [h["iteration"] for h in est.history_]
ax.plot(epochs, [h["nmi"] for h in est.history_], label="NMI")
ax.plot(epochs, [h["n_active"] / 30 for h in est.history_], label="active clusters / 30")
ax.set_xlabel("epoch")
ax.legend()
fig.suptitle(f"GMVAEDPGMM on digits: {est.n_components_} clusters")
plt.show()
