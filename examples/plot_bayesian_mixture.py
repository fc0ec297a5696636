"""
==================================================
A variational mixture: the prior prunes components
==================================================

A variational Gaussian mixture with a Dirichlet-process prior on the weights,
:class:`skdeepmix.BayesianGaussianMixture`, is given more components than the data
need. The components without data get weights near zero, so the number of
components in use is learned. The same fit with scikit-learn's class gives the same
weights up to the random start.
"""

# %%
# Fit with too many components
# ----------------------------
import matplotlib.pyplot as plt
import numpy as np
from sklearn.datasets import make_blobs
from sklearn.mixture import BayesianGaussianMixture as SklearnBGM

from skdeepmix import BayesianGaussianMixture

X, y = make_blobs(n_samples=1500, centers=3, cluster_std=[0.5, 1.0, 0.7], random_state=3)

params = dict(
    n_components=10,
    weight_concentration_prior_type="dirichlet_process",
    weight_concentration_prior=0.01,
    max_iter=500,
    random_state=0,
)
ours = BayesianGaussianMixture(**params).fit(X)
theirs = SklearnBGM(**params).fit(X)

print("weights, ours:        ", np.round(np.sort(ours.weights_)[::-1], 3))
print("weights, scikit-learn:", np.round(np.sort(theirs.weights_)[::-1], 3))
print("components with weight > 1 %:", int(np.sum(ours.weights_ > 0.01)))

# %%
# The weights and the clusters
# ----------------------------
fig, axes = plt.subplots(1, 2, figsize=(10, 4))
order = np.argsort(-ours.weights_)
axes[0].bar(np.arange(10), ours.weights_[order])
axes[0].set_xlabel("component (sorted by weight)")
axes[0].set_ylabel("weight")
axes[0].set_title("weights_ after the fit")
axes[1].scatter(X[:, 0], X[:, 1], c=ours.predict(X), s=4, cmap="tab10")
axes[1].set_title("predicted clusters")
fig.tight_layout()
plt.show()
