"""Order of the examples in the gallery: the drop-ins first, then the deep models."""

ORDER = [
    "plot_gaussian_mixture.py",
    "plot_bayesian_mixture.py",
    "plot_partial_fit.py",
    "distributed_fit.py",
    "plot_deep_gmm.py",
    "plot_cpmm.py",
    "plot_cpmm_curriculum.py",
    "plot_dcgmm.py",
    "plot_gmvae_dpgmm.py",
]


class ExampleOrder:
    """Sort key for sphinx-gallery's ``within_subsection_order``."""

    def __init__(self, src_dir):
        self.src_dir = src_dir

    def __call__(self, filename):
        return (ORDER.index(filename), filename) if filename in ORDER else (len(ORDER), filename)

    def __repr__(self):
        return f"<{type(self).__name__}>"
