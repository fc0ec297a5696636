"""skdeepmix.GaussianMixture as a drop-in for scikit-learn's.

Fits both on the same blobs with the same initial parameters, shows that the
results agree, then uses ours in a pipeline and a grid search, and draws the
density contours of a 2-D fit (saved to ``doc/images/gaussian_mixture_2d.png``
when matplotlib is installed).

Run: ``python examples/plot_gaussian_mixture.py``
"""

from pathlib import Path

import numpy as np
from sklearn.datasets import make_blobs
from sklearn.mixture import GaussianMixture as SklearnGaussianMixture
from sklearn.model_selection import GridSearchCV

from skdeepmix import GaussianMixture

X, y = make_blobs(n_samples=3000, centers=4, cluster_std=[0.6, 1.0, 1.5, 0.8], random_state=0)

init = dict(means_init=X[[0, 1, 2, 3]], weights_init=np.full(4, 0.25),
            precisions_init=np.stack([np.eye(2)] * 4))
ours = GaussianMixture(4, tol=1e-6, **init).fit(X)
theirs = SklearnGaussianMixture(4, tol=1e-6, **init).fit(X)
print("same initial parameters -> max |means difference| =",
      np.abs(ours.means_ - theirs.means_).max())
print("mean log-likelihood: ours %.6f, sklearn %.6f" % (ours.score(X), theirs.score(X)))

search = GridSearchCV(
    GaussianMixture(random_state=0),
    {"n_components": [2, 3, 4, 5], "covariance_type": ["full", "diag"]},
    cv=3,
).fit(X)
print("grid search picks", search.best_params_)

try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
except ImportError:
    raise SystemExit("matplotlib not installed: no figure")

xx, yy = np.meshgrid(np.linspace(X[:, 0].min() - 1, X[:, 0].max() + 1, 200),
                     np.linspace(X[:, 1].min() - 1, X[:, 1].max() + 1, 200))
grid = np.c_[xx.ravel(), yy.ravel()]
zz = ours.score_samples(grid).reshape(xx.shape)
fig, ax = plt.subplots(figsize=(5, 4))
ax.contour(xx, yy, zz, levels=np.linspace(zz.max() - 12, zz.max(), 12), cmap="viridis")
ax.scatter(X[:, 0], X[:, 1], s=2, c=ours.predict(X), cmap="tab10", alpha=0.5)
ax.set_title("skdeepmix.GaussianMixture: log-density and clusters")
out = Path(__file__).resolve().parents[1] / "doc" / "images" / "gaussian_mixture_2d.png"
out.parent.mkdir(parents=True, exist_ok=True)
fig.savefig(out, dpi=100, bbox_inches="tight")
print("wrote", out)
