"""Docstring text shared by the estimators (one definition of the shared parameters).

Every estimator documents the parameters it inherits from
:class:`~skdeepmix._base.BaseDeepMixture` with the same words. A class
docstring holds the placeholder ``{shared_parameters}`` (one line, indented
like the other parameters) and the :func:`fill_doc` decorator replaces it.
"""

from __future__ import annotations

import textwrap

__all__ = ["SHARED_PARAMETERS", "fill_doc"]

#: numpydoc entries of the parameters defined once in the base class
SHARED_PARAMETERS = """\
tol : float, default={tol}
    Convergence threshold. {tol_meaning}
max_iter : int, default={max_iter}
    Maximum number of {iteration} of the main training phase.
n_init : int, default=1
    Number of initialisations; the one with the best final objective is kept.
random_state : int, RandomState instance or None, default=None
    Seeds one :class:`torch.Generator` used for initialisation, training,
    sampling and any stochastic scoring. Same seed, same result; the global
    numpy and torch random generators are never touched.
warm_start : bool, default=False
    If True, ``fit`` continues from the fitted state of the previous call
    (``n_init`` is then ignored).
verbose : int, default=0
    0 is silent; 1 shows one progress bar per fit covering every phase
    (it ends at 100 %); 2 also prints the objective every
    ``verbose_interval`` iterations. With scikit-learn 1.9,
    ``set_callbacks(sklearn.callback.ProgressBar())`` works as well.
verbose_interval : int, default=10
    Iterations between two printed lines when ``verbose=2``.
device : {{'auto', 'cpu', 'cuda', 'cuda:N', 'mps'}} or torch.device, default='auto'
    Where the computation runs. ``'auto'`` uses CUDA when it is available,
    else the CPU. Inputs and outputs are numpy arrays wherever it runs, and a
    model fitted on a GPU pickles and loads on a CPU-only machine.
dtype : {{'float32', 'float64'}} or None, default=None
    Precision of the computation and of the fitted attributes. ``None`` uses
    the input's floating dtype, as scikit-learn does: float32 input stays
    float32, anything else becomes float64.
chunk_size : int or None, default=None
    Rows processed at once at inference (and in the E-steps of EM). ``None``
    picks the size that keeps the largest temporary near
    ``skdeepmix._torch_utils.MEMORY_BUDGET`` values (8 MiB in float64), so
    memory is bounded by the chunk, not by ``n_samples``."""


def fill_doc(tol=1e-3, max_iter=100, tol_meaning="", iteration="iterations"):
    """Class decorator: put :data:`SHARED_PARAMETERS` into the docstring.

    Parameters
    ----------
    tol, max_iter : the defaults to show.
    tol_meaning : str
        What ``tol`` is compared with, for this estimator.
    iteration : str
        What one iteration is (e.g. "EM iterations" or "epochs").
    """

    def decorate(cls):
        doc = cls.__doc__ or ""
        marker = "{shared_parameters}"
        for line in doc.splitlines():
            if line.strip() == marker:
                indent = line[: len(line) - len(line.lstrip())]
                text = SHARED_PARAMETERS.format(
                    tol=tol, max_iter=max_iter, tol_meaning=tol_meaning, iteration=iteration
                )
                text = textwrap.indent(text, indent)
                cls.__doc__ = doc.replace(line, text, 1)
                break
        else:
            raise ValueError(f"{cls.__name__}'s docstring has no {marker} line.")
        return cls

    return decorate
