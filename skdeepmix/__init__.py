"""skdeepmix: scikit-learn compatible deep Gaussian-mixture estimators on PyTorch."""

from ._base import BaseDeepMixture, TrainingDivergedError
from .bayesian_mixture import BayesianGaussianMixture
from .cpmm import CPMMEstimator
from .dcgmm import DCGMMEstimator
from .deep_gmm import DeepGMMEstimator
from .gaussian_mixture import GaussianMixture
from .gmvae_dpgmm import GMVAEDPGMM

__version__ = "0.1.0.dev0"

__all__ = [
    "GaussianMixture",
    "BayesianGaussianMixture",
    "CPMMEstimator",
    "DCGMMEstimator",
    "DeepGMMEstimator",
    "GMVAEDPGMM",
    "BaseDeepMixture",
    "TrainingDivergedError",
    "__version__",
]
