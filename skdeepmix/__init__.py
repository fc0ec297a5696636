"""skdeepmix: scikit-learn compatible deep Gaussian-mixture estimators on PyTorch."""

from ._base import BaseDeepMixture, TrainingDivergedError

__version__ = "0.1.0.dev0"

__all__ = ["BaseDeepMixture", "TrainingDivergedError", "__version__"]
