"""
========================================
Deep convolutional GMM on the 8x8 digits
========================================

A two-level :class:`skdeepmix.DCGMMEstimator`, ``F(3,1)-G(25)-F-G(25)``: the lower
``G`` layer is a GMM of all 3x3 patches (shared over positions), the top ``G``
layer a GMM of the 6x6x25 map of patch posteriors. We

1. detect outliers (train on digits 1-9; the zeros are the outliers) with every
   ``G`` layer's log-likelihood, beside scikit-learn's ``GaussianMixture``;
2. train the classifier layer (``fit(X, y)``) and predict classes;
3. draw class-conditional samples with and without gradient sharpening;
4. in-paint the right half of test digits.
"""

# %%
# Outlier detection
# -----------------
import matplotlib.pyplot as plt
import numpy as np
from sklearn.datasets import load_digits
from sklearn.mixture import GaussianMixture
from sklearn.model_selection import train_test_split

from skdeepmix import DCGMMEstimator
from skdeepmix.metrics import outlier_auc

X, y = load_digits(return_X_y=True)
X = X / 16.0  # pixels in [0, 1]
X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.3, random_state=0)

inliers = y_train != 0
dcgmm = DCGMMEstimator("F(3,1)-G(25)-F-G(25)", image_shape=(8, 8), max_iter=30,
                       random_state=0).fit(X_train[inliers])
gmm = GaussianMixture(25, covariance_type="diag", random_state=0).fit(X_train[inliers])

ll_layers = dcgmm.score_samples_layers(X_test)  # (n, 2): one column per G layer
ll_gmm = gmm.score_samples(X_test)
is_in = y_test != 0
for g in range(ll_layers.shape[1]):
    auc = outlier_auc(ll_layers[is_in, g], ll_layers[~is_in, g])
    print(f"outlier AUC of the zeros, G layer {g + 1}: {auc:.3f}")
print(f"outlier AUC, scikit-learn GaussianMixture(25, 'diag'): "
      f"{outlier_auc(ll_gmm[is_in], ll_gmm[~is_in]):.3f}")

# %%
# Classification with the classifier layer
# -----------------------------------------
# ``fit(X, y)`` also trains a softmax layer on the activities of the top two ``G``
# layers; ``predict`` then returns classes.
clf = DCGMMEstimator("F(3,1)-G(25)-F-G(25)", image_shape=(8, 8), max_iter=30,
                     classifier_layers=(-2, -1), top_s=(3, 1), sharpening_iter=100,
                     random_state=0).fit(X_train, y_train)
print(f"test accuracy of the classifier layer: {np.mean(clf.predict(X_test) == y_test):.3f}")

# %%
# Class-conditional samples and in-painting
# -----------------------------------------
# Sharpening is gradient ascent on each folding layer's output towards the next
# ``G`` layer's likelihood; it removes blur. ``inpaint`` fills the pixels where the
# mask is True and keeps the others.
labels = np.repeat(np.arange(10), 6)
plain, _ = clf.sample(len(labels), y=labels, sharpening_iter=0)
sharp, _ = clf.sample(len(labels), y=labels)  # 100 sharpening iterations
print("lowest G layer log-likelihood of the samples: without sharpening "
      f"{clf.score_samples_layers(plain)[:, 0].mean():.2f}, "
      f"with sharpening {clf.score_samples_layers(sharp)[:, 0].mean():.2f}")

mask = np.zeros((10, 8, 8), dtype=bool)
mask[:, :, 4:] = True  # the right half is missing
mask = mask.reshape(10, -1)
filled = clf.inpaint(X_test[:10], mask)


def show(ax, images, title, n_cols):
    images = np.clip(images, 0, 1).reshape(-1, n_cols, 8, 8)
    ax.imshow(images.transpose(0, 2, 1, 3).reshape(images.shape[0] * 8, n_cols * 8),
              cmap="gray_r", vmin=0, vmax=1)
    ax.set_title(title, fontsize=9)
    ax.axis("off")


fig, axes = plt.subplots(1, 3, figsize=(11, 4))
show(axes[0], plain.reshape(10, 6, 64).transpose(1, 0, 2), "samples (column = class)", 10)
show(axes[1], sharp.reshape(10, 6, 64).transpose(1, 0, 2), "with sharpening", 10)
show(axes[2], np.concatenate([X_test[:10], np.where(mask, 0.5, X_test[:10]), filled]),
     "original / right half erased / in-painted", 10)
fig.tight_layout()
plt.show()
