"""
===============================================
GaussianMixture as a drop-in for scikit-learn's
===============================================

:class:`skdeepmix.GaussianMixture` takes the parameters of
:class:`sklearn.mixture.GaussianMixture` and, started from the same initial
parameters, reaches the same fitted model. Here both are fitted on the same blobs,
then ours is used in a grid search, and the log-density of the fit is drawn.
"""

# %%
# Same start, same result
# -----------------------
# Given ``weights_init``, ``means_init`` and ``precisions_init``, both libraries run
# the same EM iterations in float64.
import matplotlib.pyplot as plt
import numpy as np
from sklearn.datasets import make_blobs
from sklearn.mixture import GaussianMixture as SklearnGaussianMixture
from sklearn.model_selection import GridSearchCV

from skdeepmix import GaussianMixture

X, y = make_blobs(
    n_samples=3000, centers=4, cluster_std=[0.6, 1.0, 1.5, 0.8], random_state=0
)

init = dict(
    means_init=X[[0, 1, 2, 3]],
    weights_init=np.full(4, 0.25),
    precisions_init=np.stack([np.eye(2)] * 4),
)
ours = GaussianMixture(4, tol=1e-6, **init).fit(X)
theirs = SklearnGaussianMixture(4, tol=1e-6, **init).fit(X)
print(f"max |difference of the means|: {np.abs(ours.means_ - theirs.means_).max():.2e}")
print(f"mean log-likelihood: ours {ours.score(X):.6f}, scikit-learn {theirs.score(X):.6f}")
print(f"EM iterations: ours {ours.n_iter_}, scikit-learn {theirs.n_iter_}")

# %%
# In a grid search
# ----------------
# ``score`` is the mean log-likelihood (higher is better), so
# :class:`~sklearn.model_selection.GridSearchCV` selects the model with the best
# held-out likelihood.
search = GridSearchCV(
    GaussianMixture(random_state=0),
    {"n_components": [2, 3, 4, 5], "covariance_type": ["full", "diag"]},
    cv=3,
).fit(X)
print("grid search picks", search.best_params_)

# %%
# The fitted density
# ------------------
xx, yy = np.meshgrid(
    np.linspace(X[:, 0].min() - 1, X[:, 0].max() + 1, 200),
    np.linspace(X[:, 1].min() - 1, X[:, 1].max() + 1, 200),
)
zz = ours.score_samples(np.c_[xx.ravel(), yy.ravel()]).reshape(xx.shape)
fig, ax = plt.subplots(figsize=(6, 4.5))
ax.contour(xx, yy, zz, levels=np.linspace(zz.max() - 12, zz.max(), 12), cmap="viridis")
ax.scatter(X[:, 0], X[:, 1], s=2, c=ours.predict(X), cmap="tab10", alpha=0.5)
ax.set_title("skdeepmix.GaussianMixture: log-density and clusters")
plt.show()
