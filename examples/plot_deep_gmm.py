"""Deep GMM versus a GMM on the scikit-learn digits.

A deep Gaussian mixture (van den Oord & Schrauwen 2014) with layers of
``(3, 8)`` nodes is a GMM with 24 tied components (one per path through the
layers) but only about as many free parameters as a 14-component GMM. We fit
it by hard EM on the 8x8 digits that ship with scikit-learn, beside
scikit-learn's ``GaussianMixture`` with as many parameters, compare held-out
log-likelihoods, turn the deep model into its equivalent shallow
``GaussianMixture`` and draw samples.

Runs in well under a minute on one CPU thread.
"""

import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from sklearn.datasets import load_digits
from sklearn.mixture import GaussianMixture as SkGaussianMixture
from sklearn.model_selection import train_test_split

from skdeepmix.deep_gmm import DeepGMMEstimator

X, _ = load_digits(return_X_y=True)
X = X / 16.0 + np.random.RandomState(0).uniform(0, 1 / 16.0, X.shape)  # dequantised
X_train, X_test = train_test_split(X, test_size=0.3, random_state=0)

start = time.perf_counter()
deep = DeepGMMEstimator(n_components=(3, 8), reg_covar=1e-3, max_iter=30, random_state=0)
deep.fit(X_train)
deep_time = time.perf_counter() - start
n_params = deep._n_parameters()

d = X.shape[1]
K = max(1, round((n_params + 1) / (d + d * (d + 1) / 2 + 1)))
start = time.perf_counter()
gmm = SkGaussianMixture(K, reg_covar=1e-3, random_state=0).fit(X_train)
gmm_time = time.perf_counter() - start

print(f"Deep GMM (3, 8): {deep.n_paths_} paths, {n_params} parameters, "
      f"test log-lik {deep.score(X_test):.2f} ({deep_time:.1f} s)")
print(f"sklearn GMM K={K}: {K} components, {gmm._n_parameters()} parameters, "
      f"test log-lik {gmm.score(X_test):.2f} ({gmm_time:.1f} s)")

shallow = deep.to_gaussian_mixture()  # a fitted skdeepmix GaussianMixture
print("equivalent shallow GMM:", shallow.n_components, "components; same density:",
      np.allclose(shallow.score_samples(X_test), deep.score_samples(X_test)))

samples, paths = deep.sample(24)
fig, axes = plt.subplots(3, 8, figsize=(8, 3.3))
for ax, image, path in zip(axes.ravel(), samples, deep.path_nodes(paths)):
    ax.imshow(image.reshape(8, 8), cmap="gray_r", vmin=0, vmax=1)
    ax.set_title(",".join(str(int(n)) for n in path), fontsize=8)
    ax.axis("off")
fig.suptitle("Deep GMM samples (title: node of each layer on the path)")
fig.tight_layout()
fig.savefig("deep_gmm_digits_samples.png", dpi=80)
