"""The base class shared by every estimator of the package.

:class:`BaseDeepMixture` owns everything that is not model specific, in the
spirit of ``sklearn.mixture._base.BaseMixture``:

* the shared parameters (``tol``, ``max_iter``, ``n_init``, ``random_state``,
  ``warm_start``, ``verbose``, ``verbose_interval``, ``device``, ``dtype``,
  ``chunk_size``), defined and validated once, with one meaning each;
* input validation (``validate_data``: ``n_features_in_``,
  ``feature_names_in_``, NaN/inf, shapes; image-shaped arrays for the image
  estimators; ``np.memmap`` streaming), ``sample_weight`` checks;
* device, dtype (``dtype=None`` follows the input) and the conversion
  numpy -> torch -> numpy; torch's CPU thread count, set for the duration of
  a call only;
* the generic training loop: ``n_init`` restarts keeping the best run,
  ``warm_start``, ``max_iter``/``tol`` convergence, ``ConvergenceWarning``
  (scikit-learn's text), divergence detection, one progress bar per fit,
  ``lower_bounds_``/``history_``;
* inference (``predict``, ``predict_proba``, ``score_samples``, ``score``,
  ``fit_predict`` with a final E-step, ``sample``, ``bic``/``aic``), chunked
  over rows into preallocated outputs;
* scikit-learn's experimental callbacks (``set_callbacks``, ``sklearn.callback``
  in scikit-learn 1.9; absent otherwise): a ``"fit"`` task, an ``"init"`` task
  per initialisation when ``n_init > 1`` and a leaf ``"iteration"`` per
  iteration/epoch (its end hook may ask for ``fitted_estimator``, an independent
  copy ready to score, and may stop the run by returning True), plus a leaf per
  epoch of an auxiliary phase reported through ``ctx.progress.step(phase=...)``;
* pickling of fitted torch state on the CPU;
* ``torch.distributed``: every process passes its own shard of the rows to
  ``fit``; the hooks reduce through ``ctx.partition``.

A subclass defines ``__init__`` (calling ``super().__init__`` with the shared
parameters and storing its own) and the hooks, which receive an explicit
:class:`FitContext` ``ctx`` (device, dtype, generator, partition, ``y``,
``sample_weight``, progress bar) instead of reading fit state from ``self``:

``_check_parameters(X, ctx)``
    Model-specific checks that need the data.
``_initialize(X, ctx)``
    Initialise the model state from the data tensor (or RowSource) ``X``.
``_fit_iteration(X, ctx)``
    One EM iteration or one epoch. Returns the objective (higher is better)
    as a float, or a dict of metrics holding the key ``'objective'``.
``_get_state()`` / ``_set_state(state)``
    Snapshot / restore the fitted state (for ``n_init``).
``_estimate_weighted_log_prob(X)`` or ``_estimate_log_prob_resp(X)``
    Inference on a tensor chunk.
``_sample(n_samples, generator)``
    Returns tensors ``(X, labels)``.
``_n_parameters()``
    Number of free parameters, for ``bic``/``aic``.

Optional: ``_finalize_fit(X, ctx)`` (after the best run is restored),
``_prepare_inference(device)`` (put the fitted state on a device),
``_partial_fit_step(X, ctx)`` (makes ``partial_fit`` available),
``_n_progress_steps()`` (progress-bar steps before the main loop, e.g.
pre-training epochs), ``_converged(objectives)`` (the convergence test) and
``_work_per_row()`` (temporary values per row, for the chunk size).

Class attributes: ``_fit_uses_y``, ``_min_fit_samples``,
``_supports_out_of_core`` (the hooks accept a streamed
:class:`~skdeepmix._torch_utils.RowSource`), ``_accepts_images`` (``X`` may
be ``(n, H, W[, C])``; ``image_shape_`` is recorded), ``_distributed_mode``
(``'exact'``: the hooks all-reduce statistics through ``ctx.partition``;
``'gradients'``: the state is broadcast from rank 0 after ``_initialize`` and
:mod:`~skdeepmix._train` averages gradients), ``_parallel_work`` (rows times
features below which one CPU thread is used; see :meth:`_n_threads`).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import warnings
from abc import ABCMeta, abstractmethod
from dataclasses import dataclass
from functools import partial
from numbers import Integral, Real
from typing import Any, Optional

import numpy as np
import sklearn
import torch
from sklearn.base import BaseEstimator, DensityMixin, _fit_context
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils import check_array
from sklearn.utils._available_if import available_if
from sklearn.utils._param_validation import Interval
from sklearn.utils.validation import (
    _check_sample_weight,
    check_consistent_length,
    check_is_fitted,
    column_or_1d,
    validate_data,
)

from . import _distributed
from ._torch_utils import (
    RowSource,
    _PageReleaser,
    chunk_rows,
    idle_cpus,
    is_out_of_core,
    iter_row_chunks,
    limit_threads,
    make_generator,
    resolve_device,
    resolve_dtype,
    run_in_threads,
    thread_shares,
    to_numpy,
    to_tensor,
)
from ._train import Progress, TrainingDivergedError

__all__ = ["BaseDeepMixture", "FitContext", "TrainingDivergedError", "CONVERGENCE_MESSAGE"]

# scikit-learn's callbacks (``sklearn.callback``, experimental since 1.9) are
# used only when the module has the shape written against; otherwise the
# estimators have no callback support and ``set_callbacks`` says why.
try:
    from sklearn.callback import CallbackContext as _CallbackContext
    from sklearn.callback import CallbackSupportMixin as _CallbackSupportMixin
    from sklearn.callback import with_callbacks as _with_callbacks

    _HAS_CALLBACKS = hasattr(_CallbackSupportMixin, "_init_callback_context") and all(
        hasattr(_CallbackContext, name)
        for name in ("subcontext", "call_on_fit_task_begin", "call_on_fit_task_end")
    )
except ImportError:
    _HAS_CALLBACKS = False

if not _HAS_CALLBACKS:

    class _CallbackSupportMixin:
        def set_callbacks(self, *callbacks):
            """Unavailable: needs scikit-learn's ``sklearn.callback`` (1.9)."""
            raise NotImplementedError(
                f"{type(self).__name__}.set_callbacks needs scikit-learn's experimental "
                f"sklearn.callback API as in scikit-learn 1.9; scikit-learn "
                f"{sklearn.__version__} does not provide it. Use verbose=1 for a "
                "progress bar."
            )

    def _with_callbacks(method):
        return method

#: scikit-learn's warning text (users filter warnings by it)
CONVERGENCE_MESSAGE = (
    "Best performing initialization did not converge. Try different init "
    "parameters, or increase max_iter, tol, or check for degenerate data."
)


@dataclass
class FitContext:
    """What the hooks of one ``fit`` (or ``partial_fit``) call need, explicitly.

    Attributes
    ----------
    device : torch.device
    dtype : torch.dtype
    generator : torch.Generator
        The one generator of the call (seeded by ``random_state``).
    partition : skdeepmix._distributed.RowPartition
        This process's share of the rows (all of them without torch.distributed).
    y : Tensor of shape (n_samples,) or None
        Targets, for estimators with a supervised part.
    sample_weight : Tensor of shape (n_samples,) or None
        Validated weights (None means all ones).
    progress : skdeepmix._train.Progress
        The fit's one progress bar (a no-op when ``verbose=0``).
    classes : ndarray or None
        The sorted unique labels of ``y`` (``y`` holds their indices).
    """

    device: torch.device
    dtype: torch.dtype
    generator: torch.Generator
    partition: Any
    y: Optional[torch.Tensor] = None
    sample_weight: Optional[torch.Tensor] = None
    progress: Any = None
    classes: Any = None

    def tensor(self, array):
        """``array`` as a tensor on the fit's device and dtype."""
        return to_tensor(array, self.device, self.dtype)


def _move_to_cpu(value):
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, torch.nn.Module):
        return copy.deepcopy(value).cpu()
    if isinstance(value, torch.device):
        return value
    if isinstance(value, dict):
        return {k: _move_to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_move_to_cpu(v) for v in value)
    return value


class _FitTasks:
    """The task tree of one ``fit`` for scikit-learn's callbacks.

    The root task ``"fit"`` has one ``"init"`` subtask per initialisation when
    ``n_init > 1``; below it (or directly below the root) each iteration/epoch
    of the main loop is a leaf ``"iteration"``, and each epoch of an auxiliary
    phase (pre-training, curriculum, ...) a leaf named after the phase. Does
    nothing when no callback is set (or ``sklearn.callback`` is unavailable).
    """

    def __init__(self, estimator, X, y, sample_weight, n_init, per_init):
        self.estimator, self.root = estimator, None
        if not _HAS_CALLBACKS or not (
            hasattr(estimator, "_skl_callbacks") or hasattr(estimator, "_parent_callback_ctx")
        ):
            return
        metadata = None if sample_weight is None else {"sample_weight": sample_weight}
        self.hooks = {"X": X, "y": y, "metadata": metadata}
        self.n_init, self.per_init = n_init, per_init
        self.root = self.parent = estimator._init_callback_context(
            task_name="fit", max_subtasks=n_init if n_init > 1 else per_init
        )
        self.n_children = 0
        self.root.call_on_fit_task_begin(estimator=estimator, **self.hooks)

    def begin_init(self):
        if self.root is not None and self.n_init > 1:
            self.parent = self.root.subcontext(task_name="init", max_subtasks=self.per_init)
            self.n_children = 0
            self.parent.call_on_fit_task_begin(estimator=self.estimator, **self.hooks)

    def end_init(self):
        if self.root is not None and self.parent is not self.root:
            self.parent.call_on_fit_task_end(estimator=self.estimator, **self.hooks)

    def _leaf(self, name):
        self.n_children += 1
        return self.parent.subcontext(task_name=name)

    def phase_step(self, phase):
        """One epoch of an auxiliary phase, reported once it is done."""
        if self.root is not None and self.n_children < self.per_init:
            leaf = self._leaf(phase)
            leaf.call_on_fit_task_begin(estimator=self.estimator)
            leaf.call_on_fit_task_end(estimator=self.estimator)

    def begin_iteration(self):
        if self.root is not None:
            self.leaf = self._leaf("iteration")
            self.leaf.call_on_fit_task_begin(estimator=self.estimator, **self.hooks)

    def end_iteration(self, fitted_attributes):
        """Whether a callback asks to stop the iterations of this run."""
        if self.root is None:
            return False
        return self.leaf.call_on_fit_task_end(
            estimator=self.estimator, reconstruction_attributes=fitted_attributes, **self.hooks
        )

    def end(self):
        if self.root is not None:
            self.root.call_on_fit_task_end(
                estimator=self.estimator, reconstruction_attributes={}, **self.hooks
            )


#: attributes of the callback machinery, not copied into mid-fit snapshots
_CALLBACK_ATTRIBUTES = (
    "_skl_callbacks", "_callback_fit_ctx", "_skl_callbacks_to_teardown", "_parent_callback_ctx",
)


class BaseDeepMixture(_CallbackSupportMixin, DensityMixin, BaseEstimator, metaclass=ABCMeta):
    """Base class of every skdeepmix estimator (see the module docstring)."""

    _parameter_constraints: dict = {
        "tol": [Interval(Real, 0.0, None, closed="left")],
        "max_iter": [Interval(Integral, 0, None, closed="left")],
        "n_init": [Interval(Integral, 1, None, closed="left")],
        "random_state": ["random_state"],
        "warm_start": ["boolean"],
        "verbose": ["verbose"],
        "verbose_interval": [Interval(Integral, 1, None, closed="left")],
        "device": "no_validation",  # checked by resolve_device
        "dtype": "no_validation",  # checked by resolve_dtype
        "chunk_size": [Interval(Integral, 1, None, closed="left"), None],
    }

    #: whether ``fit`` uses ``y`` (supervised parts, e.g. a classifier layer)
    _fit_uses_y = False
    #: minimum number of samples ``fit`` accepts
    _min_fit_samples = 2
    #: whether the hooks accept a streamed RowSource for X
    _supports_out_of_core = False
    #: whether X may be image-shaped (n, H, W[, C])
    _accepts_images = False
    #: 'exact' (statistics all-reduced) or 'gradients' (DDP) under torch.distributed
    _distributed_mode = "gradients"
    #: rows x features of the training data below which one CPU thread is used
    _parallel_work = 2**22

    def __init__(
        self,
        *,
        tol,
        max_iter,
        n_init=1,
        random_state=None,
        warm_start=False,
        verbose=0,
        verbose_interval=10,
        device="auto",
        dtype=None,
        chunk_size=None,
    ):
        self.tol = tol
        self.max_iter = max_iter
        self.n_init = n_init
        self.random_state = random_state
        self.warm_start = warm_start
        self.verbose = verbose
        self.verbose_interval = verbose_interval
        self.device = device
        self.dtype = dtype
        self.chunk_size = chunk_size

    # ------------------------------------------------------------------ hooks
    def _check_parameters(self, X, ctx):
        """Model-specific checks of the parameters against the data."""

    @abstractmethod
    def _initialize(self, X, ctx):
        """Initialise the model state from the data tensor ``X``."""

    @abstractmethod
    def _fit_iteration(self, X, ctx):
        """Run one iteration/epoch and return the objective (higher is better)."""

    @abstractmethod
    def _get_state(self):
        """Return a snapshot of the fitted state."""

    @abstractmethod
    def _set_state(self, state):
        """Restore a snapshot returned by :meth:`_get_state`."""

    def _estimate_weighted_log_prob(self, X):
        """``log p(x, k)`` of shape (n_samples, n_components) for a tensor ``X``."""
        raise NotImplementedError(
            f"{type(self).__name__} must define _estimate_weighted_log_prob or "
            "_estimate_log_prob_resp."
        )

    def _estimate_log_prob_resp(self, X):
        """``(log p(x), log p(k | x))`` for a tensor chunk ``X``.

        Returns
        -------
        log_prob_norm : tensor of shape (n_samples,)
        log_resp : tensor of shape (n_samples, n_components)
        """
        weighted = self._estimate_weighted_log_prob(X)
        log_prob_norm = torch.logsumexp(weighted, dim=1)
        return log_prob_norm, weighted - log_prob_norm[:, None]

    @abstractmethod
    def _sample(self, n_samples, generator):
        """Draw ``n_samples`` from the fitted model: tensors ``(X, labels)``."""

    @abstractmethod
    def _n_parameters(self):
        """Number of free parameters of the fitted model (for ``bic``/``aic``)."""

    def _finalize_fit(self, X, ctx):
        """Called once after the best run is restored (e.g. to cache things)."""

    def _prepare_inference(self, device):
        """Put the fitted state on ``device`` (before inference, or before a
        ``warm_start`` fit continues from it)."""

    def _partial_fit_step(self, X, ctx):
        """One incremental update on the batch tensor ``X`` (optional hook).

        Returns the objective (higher is better) or a dict with ``'objective'``.
        Must leave the public fitted attributes up to date.
        """
        raise NotImplementedError(f"{type(self).__name__} does not support partial_fit.")

    def _n_progress_steps(self):
        """Progress-bar steps of one initialisation before the main loop."""
        return 0

    def _converged(self, objectives):
        """Whether the run has converged, given the objectives so far.

        Default (EM): the last change of the objective is below ``tol``.
        """
        return len(objectives) >= 2 and abs(objectives[-1] - objectives[-2]) < self.tol

    def _work_per_row(self):
        """Number of temporary values one row needs at inference."""
        return 8 * self.n_features_in_

    # ---------------------------------------------------- device/dtype/input
    def _fit_device(self):
        return resolve_device(self.device)

    def _runtime_device(self):
        """Device used at inference: the requested one, or the CPU if it is gone."""
        return resolve_device(self.device, fallback_to_cpu=True)

    def _torch_dtype(self):
        """The dtype of the computation, fixed at fit (see :meth:`_fit_dtype`)."""
        dtype = getattr(self, "_dtype", None)
        if dtype is not None:
            return dtype
        return torch.float64 if self.dtype is None else resolve_dtype(self.dtype)

    def _fit_dtype(self, X):
        """``dtype``, or with ``dtype=None`` the input's floating dtype: float32
        stays float32, anything else (float64, ints, ...) becomes float64."""
        if self.dtype is not None:
            return resolve_dtype(self.dtype)
        dtype = getattr(X, "dtype", None)
        return torch.float32 if dtype in (np.float32, torch.float32) else torch.float64

    def _rows_per_chunk(self, device):
        """Rows processed at once on ``device`` (bounds the memory of the temporaries)."""
        return chunk_rows(self._work_per_row(), self.chunk_size, device=device)

    def _n_threads(self, n_rows):
        """CPU threads for work on ``n_rows`` rows.

        Small work (below ``_parallel_work`` rows times features) uses one
        thread: it pays more for the thread pool's synchronisation than it
        gains. Larger work uses the CPUs that are idle right now, at most
        torch's own thread count (which honours ``OMP_NUM_THREADS``,
        ``torch.set_num_threads`` and the limits joblib gives its workers):
        on a shared CPU, threads that wait for a descheduled sibling make a
        fit several times slower than one thread.
        """
        n_features = getattr(self, "n_features_in_", 1)
        if n_rows * n_features < self._parallel_work:
            return 1
        available = torch.get_num_threads()
        return 1 if available <= 1 else min(available, idle_cpus())

    def _threads(self, n_rows, device):
        """Context manager limiting torch's CPU threads for this call."""
        return limit_threads(self._n_threads(n_rows) if device.type == "cpu" else None)

    def _validate_X(self, X, *, reset):
        """Validate ``X`` (2-D, finite, numeric) and check ``n_features_in_``.

        Estimators that accept images take ``(n, H, W)`` / ``(n, H, W, C)``
        arrays as well (flattened in C order, channels last).
        """
        image = None
        if self._accepts_images and not hasattr(X, "iloc") and getattr(X, "ndim", 2) in (3, 4):
            X = np.asarray(X)
            image = X.shape[1:] + ((1,) if X.ndim == 3 else ())
            X = X.reshape(X.shape[0], -1)
        X = validate_data(
            self,
            X,
            dtype=[np.float64, np.float32],
            reset=reset,
            ensure_min_samples=self._min_fit_samples if reset else 1,
        )
        if self._accepts_images:
            self._check_image_shape(image, X.shape[1], reset)
        return X

    def _check_image_shape(self, image, n_features, reset):
        """Record (``reset``) or check ``image_shape_`` (H, W, C)."""
        declared = getattr(self, "image_shape", None)
        if declared is not None:
            declared = tuple(int(s) for s in declared)
            if len(declared) == 2:
                declared = declared + (1,)
            if len(declared) != 3 or min(declared) < 1 or math.prod(declared) != n_features:
                raise ValueError(
                    f"image_shape={self.image_shape!r} must be (H, W) or (H, W, C) "
                    f"positive ints holding the {n_features} features of X."
                )
        if reset:
            shape = image if image is not None else declared
            if image is not None and declared is not None and image != declared:
                raise ValueError(
                    f"X holds images of shape {image} but image_shape={self.image_shape!r}."
                )
            self.image_shape_ = None if shape is None else tuple(int(s) for s in shape)
        elif image is not None and getattr(self, "image_shape_", None) not in (None, image):
            raise ValueError(
                f"X has images of shape {image} but {type(self).__name__} was fitted "
                f"on images of shape {self.image_shape_}."
            )

    def _validate_fit_input(self, X, y):
        X = self._validate_X(X, reset=True)
        if self._fit_uses_y and y is not None:
            y = column_or_1d(check_array(y, ensure_2d=False, dtype=None), warn=True)
            check_consistent_length(X, y)
            return X, y
        return X, None

    def _validate_X_streamed(self, X, *, reset):
        """Validate an out-of-core ``X`` chunk by chunk (never loading it whole)."""
        n_samples, n_features = int(X.shape[0]), int(X.shape[1])
        min_samples = self._min_fit_samples if reset else 1
        if n_samples < min_samples:
            raise ValueError(
                f"Found array with {n_samples} sample(s) (shape={tuple(X.shape)}) while "
                f"a minimum of {min_samples} is required by {type(self).__name__}."
            )
        release = _PageReleaser(X)
        for i, rows in enumerate(iter_row_chunks(n_samples, chunk_rows(n_features, budget=2**21))):
            part = np.asarray(X[rows])
            if i == 0:
                validate_data(self, part, dtype=[np.float64, np.float32], reset=reset,
                              ensure_min_samples=1)
            else:
                check_array(part, dtype=[np.float64, np.float32], ensure_min_samples=1,
                            estimator=self, input_name="X")
            release(part)
        return X

    def _streams(self, X, y=None):
        """Whether ``X`` is streamed instead of loaded (see ``_supports_out_of_core``)."""
        return (
            self._supports_out_of_core
            and is_out_of_core(X)
            and not (self._fit_uses_y and y is not None)
        )

    def _map_chunks(self, fn, X, device):
        """Apply ``fn`` to row chunks of ``X`` (numpy, tensor or RowSource) and
        concatenate the results (a tensor or a tuple of tensors, one row per row).

        The outputs are written into tensors allocated once: many small
        per-chunk results kept alive between the chunks' large temporaries
        fragment the heap. Inside a :class:`~skdeepmix._torch_utils.row_threads`
        block of several threads, the chunks after the first are split into
        contiguous runs, one per thread, each writing its own rows.
        """
        n_rows = X.shape[0]
        chunks = list(iter_row_chunks(n_rows, self._rows_per_chunk(device)))
        outputs, pending, as_tuple = None, [], False

        def parts_of(rows):
            result = fn(to_tensor(X[rows], device, self._torch_dtype()))
            as_tuple = isinstance(result, tuple)
            return (result if as_tuple else (result,)), as_tuple

        def write(share):
            for rows in share:
                for out, part in zip(outputs, parts_of(rows)[0]):
                    out[rows] = part

        for i, rows in enumerate(chunks):
            parts, as_tuple = parts_of(rows)
            if outputs is None and not pending:
                if all(p.dim() >= 1 and p.shape[0] == rows.stop - rows.start for p in parts):
                    outputs = tuple(p.new_empty((n_rows, *p.shape[1:])) for p in parts)
            if outputs is not None:
                for out, part in zip(outputs, parts):
                    out[rows] = part
                shares = thread_shares(chunks[i + 1:], X)
                if len(shares) > 1:
                    run_in_threads([partial(write, share) for share in shares])
                    break
            else:  # outputs not one row per row: concatenate
                pending.append(parts)
        if outputs is None:
            outputs = tuple(torch.cat(column) for column in zip(*pending))
        return outputs if as_tuple else outputs[0]

    def _inference(self, fn, X):
        """Validate ``X`` and map ``fn`` over its row chunks, without gradients."""
        check_is_fitted(self)
        device = self._runtime_device()
        if self._streams(X):
            X = RowSource(self._validate_X_streamed(X, reset=False), device, self._torch_dtype())
        else:
            X = self._validate_X(X, reset=False)
        with self._threads(X.shape[0], device), torch.no_grad():
            self._prepare_inference(device)
            return self._map_chunks(fn, X, device)

    def _check_sample_weight(self, sample_weight, X):
        """Validated weights (ndarray of shape (n_samples,)) or None."""
        if sample_weight is None:
            return None
        if X.shape[0] == 0:  # an empty shard of a distributed fit
            return np.zeros(0)
        return _check_sample_weight(
            sample_weight, np.empty((X.shape[0], 0)), dtype=np.float64,
            ensure_non_negative=True,
        )

    # ------------------------------------------------------------ training
    def fit(self, X, y=None):
        """Fit the model to ``X``.

        The model is trained ``n_init`` times (each run until it converges or
        reaches ``max_iter``) and the run with the highest objective is kept.
        With ``warm_start=True`` a second call continues from the fitted state.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Training data.
        y : Ignored or array-like of shape (n_samples,)
            Only used by estimators with a supervised part.

        Returns
        -------
        self : object
            The fitted estimator.
        """
        self._fit(X, y)
        return self

    def fit_predict(self, X, y=None):
        """Fit the model and predict labels for ``X``.

        Equivalent to ``fit(X).predict(X)``: a final E-step with the kept
        parameters gives the labels.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        y : Ignored or array-like of shape (n_samples,)

        Returns
        -------
        labels : ndarray of shape (n_samples,)
        """
        return self._fit(X, y)

    @_fit_context(prefer_skip_nested_validation=True)
    @_with_callbacks
    def _fit(self, X, y=None, sample_weight=None):
        """Validate, fit, and return the labels of the training rows."""
        y_given = y

        def validate():
            if self._streams(X, y):
                return self._validate_X_streamed(X, reset=True), None
            return self._validate_fit_input(X, y)

        (X, y), error = self._validate_everywhere(validate)
        if error is None:
            (sample_weight, _), error = self._validate_everywhere(
                lambda: (self._check_sample_weight(sample_weight, X), None)
            )
        if error is not None:
            X, y, sample_weight = np.zeros((0, 0)), None, None
        partition = _distributed.RowPartition(X.shape[0], X.shape[1], error)
        continuing = self.warm_start and hasattr(self, "converged_")
        if continuing:
            self._check_warm_start()
        if not continuing or getattr(self, "_dtype", None) is None:
            self._dtype = self._fit_dtype(X)
        device = self._fit_device()
        with self._threads(partition.n_total, device), _distributed.gradient_sync(
            self._distributed_mode == "gradients"
        ):
            ctx = self._make_context(X, y, sample_weight, partition, device)
            return self._fit_validated(X, ctx, continuing, y_given, sample_weight)

    def _check_warm_start(self):
        """Raise ``ValueError`` when the fitted state cannot be continued.
        A hook: by default every fitted state can be, so it does nothing."""
        return None

    def _validate_everywhere(self, validate):
        """Run ``validate()``; under torch.distributed, fail on every process
        when it fails on one (rather than leave the others waiting)."""
        if not _distributed.is_distributed():
            return validate(), None
        try:
            return validate(), None
        except (ValueError, TypeError) as exc:
            return (None, None), exc

    def _make_context(self, X, y, sample_weight, partition, device, generator=None):
        classes = None
        yt = None
        if y is not None:
            # the classes of all the shards: a shard may lack some
            classes = np.unique(np.concatenate(
                [np.asarray(c) for c in _distributed.all_gather_object(np.unique(y))]
            )) if partition.active else np.unique(y)
            yt = torch.as_tensor(np.searchsorted(classes, y), device=device)
        weights = None
        if sample_weight is not None:
            weights = to_tensor(sample_weight, device, self._torch_dtype())
        if generator is None:
            generator = make_generator(self.random_state, device)
        if partition.active:  # one stream of draws on every process (random_state=None too)
            generator.manual_seed(_distributed.broadcast_object(generator.initial_seed()))
        return FitContext(
            device=device,
            dtype=self._torch_dtype(),
            generator=generator,
            partition=partition,
            y=yt,
            sample_weight=weights,
            classes=classes,
        )

    def _fit_validated(self, X, ctx, continuing, y=None, sample_weight=None):
        self._check_parameters(X, ctx)
        if self._streams(X):
            Xt = RowSource(X, ctx.device, ctx.dtype)
        else:
            Xt = to_tensor(X, ctx.device, ctx.dtype)
        n_init = 1 if continuing else self.n_init
        per_init = self._n_progress_steps() + self.max_iter
        tasks = _FitTasks(self, X, y, sample_weight, n_init, per_init)
        best = None
        with Progress(self, n_init * per_init, tasks) as progress:
            ctx.progress = progress
            if continuing:
                self._prepare_inference(ctx.device)
            else:
                self.__dict__.pop("n_steps_", None)  # a new fit forgets partial_fit
            for init in range(n_init):
                progress.set_description(
                    f"{type(self).__name__}" + (f" init {init + 1}/{n_init}" if n_init > 1 else "")
                )
                tasks.begin_init()
                if not continuing:
                    self._initialize(Xt, ctx)
                    self._broadcast_initial_state(ctx)
                start = [] if not continuing else [self.lower_bound_]
                run = self._run_iterations(Xt, ctx, start, init)
                tasks.end_init()
                if best is None or run["objective"] > best["objective"]:
                    best = dict(run, state=self._get_state())
            progress.finish()

        if not best["converged"] and not best["stopped"] and self.max_iter > 0:
            warnings.warn(CONVERGENCE_MESSAGE, ConvergenceWarning)
        self._set_state(best["state"])
        self.converged_ = best["converged"]
        self.n_iter_ = best["n_iter"]
        self.lower_bound_ = best["objective"]
        self.lower_bounds_ = [h["objective"] for h in best["history"]]
        self.history_ = best["history"]
        self._finalize_fit(Xt, ctx)
        tasks.end()
        with torch.no_grad():
            return self._decode_labels(to_numpy(self._fit_labels(Xt)))

    def _fitted_snapshot(self, X, ctx, n_iter, objective):
        """Attributes of an independent copy of the estimator, ready for
        inference at this point of the fit (for callbacks that ask for a
        ``fitted_estimator``; only computed then). The fit's generator and
        state are left untouched."""
        state = {k: v for k, v in vars(self).items() if k not in _CALLBACK_ATTRIBUTES}
        snapshot = copy.copy(self)
        snapshot.__dict__.update(copy.deepcopy(state))
        snapshot._set_state(snapshot._get_state())  # the public attributes, as after a fit
        snapshot.n_iter_, snapshot.lower_bound_, snapshot.converged_ = n_iter, objective, False
        generator = torch.Generator(device=ctx.generator.device)
        generator.set_state(ctx.generator.get_state())
        snapshot._finalize_fit(X, dataclasses.replace(
            ctx, generator=generator, progress=Progress(snapshot, 0)))
        return {k: v for k, v in vars(snapshot).items() if k not in _CALLBACK_ATTRIBUTES}

    def _decode_labels(self, labels):
        """Labels as returned to the user (class labels after a supervised fit)."""
        return labels

    def _fit_labels(self, X):
        """Labels of the training rows (argmax per chunk: no (n, K) array)."""
        self._prepare_inference(X.device)
        return self._map_chunks(
            lambda chunk: self._estimate_log_prob_resp(chunk)[1].argmax(dim=1), X, X.device
        )

    def _broadcast_initial_state(self, ctx):
        """'gradients' mode: every process starts from rank 0's initial state."""
        if self._distributed_mode == "gradients" and ctx.partition.active:
            self._set_state(_distributed.broadcast_object(self._get_state()))

    def _global_objective(self, objective, ctx):
        """'gradients' mode: the sample-weighted mean of the processes' objectives."""
        partition = ctx.partition
        if self._distributed_mode != "gradients" or not partition.active:
            return objective
        return partition.sum_scalar(objective * partition.n_local) / partition.n_total

    def _checked_objective(self, metrics, where, ctx):
        """``(metrics dict, global objective)``; raises when training diverged."""
        if not isinstance(metrics, dict):
            metrics = {"objective": metrics}
        objective = self._global_objective(float(metrics["objective"]), ctx)
        if not math.isfinite(objective):
            raise TrainingDivergedError(
                f"{type(self).__name__} diverged at {where}: the objective is "
                f"{objective}. Try float64 (dtype='float64'), scaling the data, more "
                "regularisation or a smaller learning rate."
            )
        return metrics, objective

    def _run_iterations(self, X, ctx, objectives, init):
        history, converged, stopped, n_iter = [], False, False, 0
        objective = objectives[-1] if objectives else -math.inf
        objectives = list(objectives)
        tasks = ctx.progress.tasks
        for n_iter in range(1, self.max_iter + 1):
            tasks.begin_iteration()
            metrics, objective = self._checked_objective(
                self._fit_iteration(X, ctx), f"iteration {n_iter} of initialisation {init}", ctx
            )
            objectives.append(objective)
            history.append({"iteration": n_iter, **_as_floats(metrics)})
            ctx.progress.step(objective=objective)
            change = objectives[-1] - objectives[-2] if len(objectives) > 1 else math.nan
            ctx.progress.report(n_iter, objective, change)
            converged = self._converged(objectives)
            stopped = tasks.end_iteration(
                lambda n=n_iter, o=objective: self._fitted_snapshot(X, ctx, n, o)
            )
            if converged or stopped:
                break
        ctx.progress.skip(self.max_iter - n_iter)
        return {"objective": objective, "converged": converged, "stopped": stopped,
                "n_iter": n_iter, "history": history}

    # ------------------------------------------------------ partial_fit
    def _has_partial_fit_step(self):
        return type(self)._partial_fit_step is not BaseDeepMixture._partial_fit_step

    @available_if(_has_partial_fit_step)
    def partial_fit(self, X, y=None):
        """Update the model with one mini-batch (incremental / online learning).

        The first call (on an unfitted estimator) validates the batch, fixes
        ``n_features_in_`` and initialises the model from the batch; every call
        then makes one update on the batch. A fitted estimator (after ``fit``)
        continues from its fitted state. Under torch.distributed each process
        passes its own batch and the update uses all of them.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            A mini-batch.
        y : Ignored or array-like of shape (n_samples,)

        Returns
        -------
        self : object
            With ``n_steps_`` (number of updates made) incremented.
        """
        self._partial_fit(X, y)
        return self

    @_fit_context(prefer_skip_nested_validation=True)
    @_with_callbacks
    def _partial_fit(self, X, y=None, sample_weight=None):
        initialised = hasattr(self, "n_steps_") or hasattr(self, "lower_bound_")
        y_given = y

        def validate():
            if not initialised:
                return self._validate_fit_input(X, y)
            return self._validate_X(X, reset=False), y

        (X, y), error = self._validate_everywhere(validate)
        if error is None:
            (sample_weight, _), error = self._validate_everywhere(
                lambda: (self._check_sample_weight(sample_weight, X), None)
            )
        if error is not None:
            X, y, sample_weight = np.zeros((0, 0)), None, None
        partition = _distributed.RowPartition(X.shape[0], X.shape[1], error)
        if not initialised:
            self._dtype = self._fit_dtype(X)
        device = self._fit_device()
        steps = getattr(self, "n_steps_", 0)
        generator = make_generator(self.random_state, device)
        if steps:  # a different, reproducible stream of draws for each call
            generator.manual_seed((generator.initial_seed() + steps) % 2**63)
        with self._threads(partition.n_total, device), _distributed.gradient_sync(
            self._distributed_mode == "gradients"
        ):
            ctx = self._make_context(X, y, sample_weight, partition, device, generator)
            tasks = _FitTasks(self, X, y_given, sample_weight, n_init=1, per_init=0)
            ctx.progress = Progress(self, 0, tasks)
            Xt = ctx.tensor(X)
            if not initialised:
                self._check_parameters(X, ctx)
                self._initialize(Xt, ctx)
                self._broadcast_initial_state(ctx)
            else:
                self._prepare_inference(device)
            self.n_steps_ = steps
            _, objective = self._checked_objective(
                self._partial_fit_step(Xt, ctx), f"partial_fit step {steps + 1}", ctx
            )
        self.n_steps_ = steps + 1
        self.lower_bound_ = objective
        tasks.end()

    # ------------------------------------------------------------ inference
    def score_samples(self, X):
        """Log-likelihood of each sample under the model.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)

        Returns
        -------
        log_prob : ndarray of shape (n_samples,)
        """
        log_prob, _ = self._inference(self._estimate_log_prob_resp, X)
        return to_numpy(log_prob)

    def score(self, X, y=None):
        """Mean log-likelihood of ``X`` (higher is better).

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        y : Ignored

        Returns
        -------
        log_likelihood : float
        """
        return float(np.mean(self.score_samples(X)))

    def predict_proba(self, X):
        """Posterior probability of each component given each sample.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)

        Returns
        -------
        proba : ndarray of shape (n_samples, n_components)
        """
        _, log_resp = self._inference(self._estimate_log_prob_resp, X)
        return to_numpy(log_resp.exp())

    def predict(self, X):
        """Most probable component of each sample.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)

        Returns
        -------
        labels : ndarray of shape (n_samples,)
        """
        labels = self._inference(lambda c: self._estimate_log_prob_resp(c)[1].argmax(dim=1), X)
        return self._decode_labels(to_numpy(labels))

    def sample(self, n_samples=1):
        """Generate random samples from the fitted model.

        Seeded by ``random_state`` (an int gives the same samples each call,
        as in scikit-learn).

        Parameters
        ----------
        n_samples : int, default=1

        Returns
        -------
        X : ndarray of shape (n_samples, n_features)
        y : ndarray of shape (n_samples,)
            Component (or cluster) label of each sample.
        """
        check_is_fitted(self)
        if isinstance(n_samples, bool) or not isinstance(n_samples, Integral) or n_samples < 1:
            raise ValueError(
                f"Invalid value for 'n_samples': {n_samples!r}. The sampling "
                "requires at least one sample."
            )
        device = self._runtime_device()
        generator = make_generator(self.random_state, device)
        with self._threads(int(n_samples), device), torch.no_grad():
            self._prepare_inference(device)
            X, y = self._sample(int(n_samples), generator)
        return to_numpy(X), to_numpy(y).astype(np.int64)

    def bic(self, X):
        """Bayesian information criterion on ``X`` (lower is better).

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)

        Returns
        -------
        bic : float
        """
        n_samples = np.shape(X)[0]
        return -2 * self.score(X) * n_samples + self._n_parameters() * math.log(n_samples)

    def aic(self, X):
        """Akaike information criterion on ``X`` (lower is better).

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)

        Returns
        -------
        aic : float
        """
        return -2 * self.score(X) * np.shape(X)[0] + 2 * self._n_parameters()

    # ------------------------------------------------------------ pickling
    def __getstate__(self):
        state = super().__getstate__()
        return {key: _move_to_cpu(value) for key, value in state.items()}


def _as_floats(metrics):
    return {
        key: float(value) if isinstance(value, (int, float, torch.Tensor)) else value
        for key, value in metrics.items()
    }
