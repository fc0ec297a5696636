"""
===============================================
CPMM with the flow curriculum: two broken rings
===============================================

The CPMM paper trains its trajectories through a *curriculum*: a continuous
normalizing flow (the teacher) maps the data to a Gaussian, and the mixture is
trained on a sequence of spaces from that easy latent space back to the input
space (``curriculum='flow'``). Here on the paper's toy data, two broken rings,
with two trajectories of 25 components each.
"""

# %%
# Fit with the curriculum
# -----------------------
# Trajectories that curve around a ring need more ODE solver steps than the
# default two (``ode_step_size=0.1``); ``entropy_reg`` keeps both trajectories in use.
import matplotlib.pyplot as plt

from skdeepmix import CPMMEstimator
from skdeepmix.datasets import make_broken_rings

X, y = make_broken_rings(1000, random_state=0)
rings = CPMMEstimator(
    n_components=2, n_points_per_trajectory=25, rank=1, curriculum="flow", n_spaces=21,
    teacher_iter=20, hidden_size=64, ode_step_size=0.1, batch_size=128, entropy_reg=0.1,
    random_state=0,
).fit(X)
print(f"mean log-likelihood on the training data: {rings.score(X):.3f}")
first, last = rings.curriculum_history_[0], rings.curriculum_history_[-1]
print(f"curriculum: log-likelihood {first['log_likelihood']:.3f} on the first space "
      f"(v={first['v']:.2f}), {last['log_likelihood']:.3f} on the last (v={last['v']:.2f})")

# %%
# Samples and the trajectories' means
# -----------------------------------
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
plt.show()
