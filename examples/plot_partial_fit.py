"""
==========================================================
Fitting in pieces: partial_fit, float32 and sample weights
==========================================================

Three ways to fit :class:`skdeepmix.GaussianMixture` when the data do not arrive,
or do not fit, all at once:

* ``partial_fit`` runs stepwise (online) EM, one mini-batch per call;
* ``dtype="float32"`` (or float32 input) halves the memory and is the fast path;
* ``sample_weight`` fits weighted rows, e.g. counts of repeated rows.
"""

# %%
# Stepwise EM on mini-batches
# ---------------------------
# Each call of ``partial_fit`` moves the parameters towards the statistics of its
# batch with a step that decays as ``(n_steps_ + learning_offset) ** -learning_decay``.
import matplotlib.pyplot as plt
import numpy as np
from sklearn.datasets import make_blobs

from skdeepmix import GaussianMixture

X, _ = make_blobs(n_samples=45_000, n_features=8, centers=10, cluster_std=1.5,
                  random_state=1)
X, X_test = X[:40_000], X[40_000:]

batch = GaussianMixture(10, random_state=0).fit(X)

# the first call initialises the model (k-means) on its batch of 500 rows
online = GaussianMixture(10, random_state=0)
rng = np.random.default_rng(0)
curve = []
for epoch in range(3):
    for rows in np.array_split(rng.permutation(len(X)), 80):
        online.partial_fit(X[rows])
        curve.append(online.score(X_test))
print(f"test log-likelihood: fit {batch.score(X_test):.4f}, "
      f"partial_fit after {online.n_steps_} batches {online.score(X_test):.4f}")

# %%
# float32
# -------
# With ``dtype=None`` (the default) float32 input gives a float32 model.
f32 = GaussianMixture(10, random_state=0).fit(X.astype(np.float32))
print("means_ dtype:", f32.means_.dtype, "- test log-likelihood", round(f32.score(X_test), 4))

# %%
# Sample weights as counts
# ------------------------
# Integer weights give the model of the repeated rows.
counts = rng.integers(0, 3, size=2000)
Xs = X[:2000]
weighted = GaussianMixture(10, random_state=0).fit(Xs, sample_weight=counts)
repeated = GaussianMixture(10, random_state=0).fit(np.repeat(Xs, counts, axis=0))
print("weighted vs repeated rows, mean log-likelihood:",
      round(weighted.score(X_test), 6), round(repeated.score(X_test), 6))

# %%
# The online learning curve
# -------------------------
fig, ax = plt.subplots(figsize=(6, 3.5))
ax.plot(np.arange(1, len(curve) + 1), curve, label="partial_fit")
ax.axhline(batch.score(X_test), color="k", ls="--", label="fit (full EM)")
ax.set_xscale("log")
ax.set_xlabel("mini-batches of 500 rows seen (3 passes over the data)")
ax.set_ylabel("test mean log-likelihood")
ax.legend()
fig.tight_layout()
plt.show()
