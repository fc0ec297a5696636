"""The base class shared by every estimator of the package.

:class:`BaseDeepMixture` owns everything that is not model specific, in the
spirit of ``sklearn.mixture._base.BaseMixture``:

* parameter validation (``_parameter_constraints``) and input validation
  (``validate_data``: ``n_features_in_``, ``feature_names_in_``, NaN/inf, shapes);
* device (``'auto'|'cpu'|'cuda'|'cuda:N'|torch.device``), dtype and the
  conversion numpy -> torch -> numpy;
* ``random_state`` -> a seeded :class:`torch.Generator` (never global RNGs);
* the generic training loop: ``n_init`` restarts keeping the best run,
  ``warm_start``, ``max_iter``/``tol`` convergence, ``ConvergenceWarning``,
  divergence detection, ``verbose`` progress bar, ``lower_bounds_``/``history_``;
* inference: ``predict``, ``predict_proba``, ``score_samples``, ``score``,
  ``fit_predict`` (with a final E-step so that it equals ``fit(X).predict(X)``),
  ``sample``, ``bic``/``aic``, all chunked over rows;
* pickling of fitted torch state on the CPU.

A subclass defines ``__init__`` (storing its arguments only) and the hooks:

``_check_parameters(X)``
    Model-specific checks that need the data (e.g. ``n_samples >= n_components``).
``_initialize(X, generator, y=None)``
    Initialise the model state from the data.
``_fit_iteration(X, generator, y=None)``
    One EM iteration or one epoch. Returns the objective (higher is better) as a
    float, or a dict of metrics holding the key ``'objective'``.
``_get_state()`` / ``_set_state(state)``
    Snapshot / restore the fitted state (for ``n_init``).
``_estimate_weighted_log_prob(X)``
    ``(n, n_components)`` tensor of ``log p(x, k)``; or override
    ``_estimate_log_prob_resp(X)`` directly.
``_sample(n_samples, generator)``
    Returns tensors ``(X, y)``.
``_n_parameters()``
    Number of free parameters, for ``bic``/``aic``.

Optional, for scaling up (see ``doc/scaling.md``):

``_partial_fit_step(X, generator, y=None)``
    One incremental update on the mini-batch ``X`` (one stepwise-EM step, or
    one optimizer step: :func:`skdeepmix._train.train_step` does it in one
    line) returning the objective like ``_fit_iteration``; it leaves the public
    fitted attributes up to date. Defining it makes ``partial_fit`` available:
    the first call validates the batch, runs ``_check_parameters`` and
    ``_initialize`` on it, later calls continue (``n_features_in_`` is then
    fixed) and ``n_steps_`` counts the calls.
``_supports_out_of_core`` (class attribute, default False)
    True when the hooks accept, in place of the data tensor, a
    :class:`~skdeepmix._torch_utils.RowSource` (``shape``, ``device``,
    ``dtype``, ``X[slice]``/``X[index_tensor]`` giving tensors) and touch the
    rows only chunk by chunk; ``fit`` then streams ``np.memmap`` and other
    array-likes with row slicing without loading them (validated in chunks).
``_distributed_mode`` (class attribute, default None)
    Behaviour when :mod:`torch.distributed` is initialised with several
    processes: ``'exact'`` (the hooks all-reduce their statistics through
    ``self._partition``, a :class:`~skdeepmix._distributed.RowPartition`),
    ``'gradients'`` (state broadcast from rank 0 after ``_initialize``,
    gradients averaged by ``train_epoch``/``train_step``, objective averaged)
    or None (each process fits its own model, with a warning).
"""

from __future__ import annotations

import copy
import math
import warnings
from abc import ABCMeta, abstractmethod
from numbers import Integral, Real

import numpy as np
import torch
from sklearn.base import BaseEstimator, DensityMixin, _fit_context
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils import check_array
from sklearn.utils._available_if import available_if
from sklearn.utils._param_validation import Interval
from sklearn.utils.validation import check_is_fitted, validate_data

from . import _distributed
from ._torch_utils import (
    RowSource,
    _PageReleaser,
    is_out_of_core,
    iter_row_chunks,
    make_generator,
    resolve_device,
    resolve_dtype,
    to_numpy,
    to_tensor,
)

__all__ = ["BaseDeepMixture", "TrainingDivergedError"]


class TrainingDivergedError(FloatingPointError, ValueError):
    """Raised when the training objective becomes NaN or infinite."""


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


class BaseDeepMixture(DensityMixin, BaseEstimator, metaclass=ABCMeta):
    """Base class of every skdeepmix estimator (see the module docstring)."""

    _parameter_constraints: dict = {
        "tol": [Interval(Real, 0.0, None, closed="left")],
        "max_iter": [Interval(Integral, 0, None, closed="left")],
        "n_init": [Interval(Integral, 1, None, closed="left")],
        "random_state": ["random_state"],
        "warm_start": ["boolean"],
        "verbose": ["verbose"],
        "device": "no_validation",  # checked by resolve_device
        "dtype": "no_validation",  # checked by resolve_dtype
    }

    #: whether ``fit`` uses ``y`` (supervised parts, e.g. a classifier layer)
    _fit_uses_y = False
    #: minimum number of samples ``fit`` accepts
    _min_fit_samples = 2
    #: whether the hooks accept a streamed RowSource for X (see module docstring)
    _supports_out_of_core = False
    #: None, 'exact' or 'gradients': behaviour under torch.distributed
    _distributed_mode = None

    # ------------------------------------------------------------------ hooks
    def _check_parameters(self, X):
        """Model-specific checks of the parameters against the data."""

    @abstractmethod
    def _initialize(self, X, generator, y=None):
        """Initialise the model state from the data tensor ``X``."""

    @abstractmethod
    def _fit_iteration(self, X, generator, y=None):
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

    def _finalize_fit(self, X, y=None):
        """Called once after the best run is restored (e.g. to cache things)."""

    def _partial_fit_step(self, X, generator, y=None):
        """One incremental update on the batch tensor ``X`` (optional hook).

        Returns the objective (higher is better) or a dict with ``'objective'``.
        Must leave the public fitted attributes up to date.
        """
        raise NotImplementedError(f"{type(self).__name__} does not support partial_fit.")

    # ---------------------------------------------------- device/dtype/input
    def _fit_device(self):
        return resolve_device(self.device)

    def _runtime_device(self):
        """Device used at inference: the requested one, or the CPU if it is gone."""
        return resolve_device(self.device, fallback_to_cpu=True)

    def _torch_dtype(self):
        """The dtype of the computation: fixed at fit (see :meth:`_fit_dtype`)."""
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

    def _validate_X(self, X, *, reset):
        """Validate ``X`` (2-D, finite, numeric) and check ``n_features_in_``."""
        return validate_data(
            self,
            X,
            dtype=[np.float64, np.float32],
            reset=reset,
            ensure_min_samples=self._min_fit_samples if reset else 1,
        )

    def _validate_fit_input(self, X, y):
        if self._fit_uses_y and y is not None:
            X, y = validate_data(
                self,
                X,
                y,
                dtype=[np.float64, np.float32],
                ensure_min_samples=self._min_fit_samples,
            )
            return X, y
        return self._validate_X(X, reset=True), None

    def _validate_X_streamed(self, X, *, reset):
        """Validate an out-of-core ``X`` chunk by chunk (never loading it whole).

        Same checks as :meth:`_validate_X` (2-D, numeric, finite, number of
        samples and features); returns ``X`` itself.
        """
        n_samples = int(X.shape[0])
        n_features = int(X.shape[1])
        min_samples = self._min_fit_samples if reset else 1
        if n_samples < min_samples:
            raise ValueError(
                f"Found array with {n_samples} sample(s) (shape={tuple(X.shape)}) while "
                f"a minimum of {min_samples} is required by {type(self).__name__}."
            )
        rows_per_chunk = max(1, 2**21 // max(n_features, 1))  # 16 MiB of float64
        release = _PageReleaser(X)
        for i, rows in enumerate(iter_row_chunks(n_samples, rows_per_chunk)):
            part = np.asarray(X[rows])
            if i == 0:
                validate_data(
                    self, part, dtype=[np.float64, np.float32], reset=reset,
                    ensure_min_samples=1,
                )
            else:
                check_array(
                    part, dtype=[np.float64, np.float32], ensure_min_samples=1,
                    estimator=self, input_name="X",
                )
            release(part)
        return X

    def _streams(self, X, y=None):
        """Whether ``X`` is streamed instead of loaded (see ``_supports_out_of_core``)."""
        return (
            self._supports_out_of_core
            and is_out_of_core(X)
            and not (self._fit_uses_y and y is not None)
        )

    def _validate_everywhere(self, validate):
        """Run ``validate()``; under torch.distributed, fail on every process
        when it fails on one (rather than leave the others waiting)."""
        if not _distributed.is_distributed() or self._distributed_mode is None:
            return validate(), None
        try:
            return validate(), None
        except (ValueError, TypeError) as exc:
            return (None, None), exc

    def _make_partition(self, n_local, n_features=None, error=None):
        """The :class:`~skdeepmix._distributed.RowPartition` of a fit."""
        if error is not None and not _distributed.is_distributed():
            raise error
        if _distributed.is_distributed() and self._distributed_mode is None:
            warnings.warn(
                f"{type(self).__name__} does not support distributed training yet: "
                "each process fits its own model on its own data. Wrap the call in "
                "skdeepmix._distributed.local_fit() to silence this warning.",
                UserWarning,
            )
            with _distributed.local_fit():
                return _distributed.RowPartition(n_local)
        return _distributed.RowPartition(n_local, n_features, error)

    def _to_tensor(self, X, device=None):
        if device is None:
            device = self._runtime_device()
        return to_tensor(X, device, self._torch_dtype())

    def _rows_per_chunk(self):
        """Rows processed at once at inference (bounds the memory use)."""
        chunk_size = getattr(self, "chunk_size", None)
        if chunk_size is not None:
            return int(chunk_size)
        work_per_row = max(int(self._work_per_row()), 1)
        return int(min(max(2**23 // work_per_row, 256), 2**16))

    def _work_per_row(self):
        """Number of temporary values one row needs at inference."""
        return 8 * self.n_features_in_

    def _map_chunks(self, fn, X, device):
        """Apply ``fn`` to row chunks of ``X`` (numpy, tensor or RowSource) and
        concatenate the results (a tensor or a tuple of tensors, one row per row).

        The outputs are written into tensors allocated once: many small
        per-chunk results kept alive between the chunks' large temporaries
        fragment the heap (about 1 GB of resident memory for 16M rows).
        """
        n_rows = X.shape[0]
        outputs, pending, as_tuple = None, [], False
        for rows in iter_row_chunks(n_rows, self._rows_per_chunk()):
            chunk = to_tensor(X[rows], device, self._torch_dtype())
            result = fn(chunk)
            as_tuple = isinstance(result, tuple)
            parts = result if as_tuple else (result,)
            if outputs is None and not pending:
                if all(p.dim() >= 1 and p.shape[0] == rows.stop - rows.start for p in parts):
                    outputs = tuple(p.new_empty((n_rows, *p.shape[1:])) for p in parts)
            if outputs is not None:
                for out, part in zip(outputs, parts):
                    out[rows] = part
            else:  # outputs not one row per row: concatenate
                pending.append(parts)
        if outputs is None:
            outputs = tuple(torch.cat(column) for column in zip(*pending))
        return outputs if as_tuple else outputs[0]

    def _prepare_inference(self, device):
        """Hook: put the fitted state on ``device`` (before inference, or before
        a ``warm_start`` fit continues from it)."""

    def _inference(self, fn, X):
        check_is_fitted(self)
        device = self._runtime_device()
        if self._streams(X):
            X = RowSource(self._validate_X_streamed(X, reset=False), device, self._torch_dtype())
        else:
            X = self._validate_X(X, reset=False)
        self._prepare_inference(device)
        with torch.no_grad():
            return self._map_chunks(fn, X, device)

    # ------------------------------------------------------------ training
    def fit(self, X, y=None):
        """Fit the model to ``X``.

        The model is trained ``n_init`` times (each run until the change of the
        objective is below ``tol`` or ``max_iter`` iterations) and the run with
        the highest objective is kept. With ``warm_start=True`` a second call
        continues from the fitted state.

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
        self.fit_predict(X, y)
        return self

    @_fit_context(prefer_skip_nested_validation=True)
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
        def validate():
            if self._streams(X, y):
                return self._validate_X_streamed(X, reset=True), None
            return self._validate_fit_input(X, y)

        (X, y), error = self._validate_everywhere(validate)
        if error is not None:
            X, y = np.zeros((0, 0)), None
        self._partition = self._make_partition(X.shape[0], X.shape[1], error)
        try:
            with _distributed.gradient_sync(self._distributed_mode == "gradients"):
                return self._fit_predict_validated(X, y)
        finally:
            del self._partition

    def _fit_predict_validated(self, X, y):
        continuing = self.warm_start and hasattr(self, "converged_")
        if not continuing:
            self._dtype = self._fit_dtype(X)
        self._check_parameters(X)
        device = self._fit_device()
        if self._streams(X, y):
            Xt = RowSource(X, device, self._torch_dtype())
        else:
            Xt = to_tensor(X, device, self._torch_dtype())
        yt = None if y is None else torch.as_tensor(np.array(y), device=device)
        generator = make_generator(self.random_state, device)

        do_init = not (self.warm_start and hasattr(self, "converged_"))
        n_init = self.n_init if do_init else 1
        if not do_init:
            self._prepare_inference(device)  # continue from the fitted state
        else:
            self.__dict__.pop("n_steps_", None)  # a new fit forgets partial_fit
        best = None
        for init in range(n_init):
            if do_init:
                self._initialize(Xt, generator, y=yt)
                self._broadcast_initial_state()
            start = -math.inf if do_init else self.lower_bound_
            run = self._run_iterations(Xt, yt, generator, start, init)
            if best is None or run["objective"] > best["objective"]:
                best = dict(run, state=self._get_state())

        if not best["converged"] and self.max_iter > 0:
            warnings.warn(
                f"{type(self).__name__}: the best of {n_init} initialisation(s) did "
                f"not converge within max_iter={self.max_iter} iterations (last "
                f"change of the objective above tol={self.tol}). Increase max_iter "
                "or tol, or check the data for degenerate features.",
                ConvergenceWarning,
            )
        self._set_state(best["state"])
        self.converged_ = best["converged"]
        self.n_iter_ = best["n_iter"]
        self.lower_bound_ = best["objective"]
        self.lower_bounds_ = [h["objective"] for h in best["history"]]
        self.history_ = best["history"]
        self._finalize_fit(Xt, yt)
        with torch.no_grad():
            return to_numpy(self._fit_labels(Xt))

    def _fit_labels(self, X):
        """Labels of the training rows (argmax per chunk: no (n, K) array)."""
        own = type(self)._estimate_log_prob_resp_chunked
        if own is not BaseDeepMixture._estimate_log_prob_resp_chunked:
            _, log_resp = self._estimate_log_prob_resp_chunked(X)
            return log_resp.argmax(dim=1)
        return self._map_chunks(
            lambda chunk: self._estimate_log_prob_resp(chunk)[1].argmax(dim=1), X, X.device
        )

    def _broadcast_initial_state(self):
        """'gradients' mode: every process starts from rank 0's initial state."""
        partition = getattr(self, "_partition", None)
        if self._distributed_mode == "gradients" and partition is not None and partition.active:
            self._set_state(_distributed.broadcast_object(self._get_state()))

    def _global_objective(self, objective):
        """'gradients' mode: the sample-weighted mean of the processes' objectives."""
        partition = getattr(self, "_partition", None)
        if self._distributed_mode != "gradients" or partition is None or not partition.active:
            return objective
        return partition.sum_scalar(objective * partition.n_local) / partition.n_total

    # ------------------------------------------------------ partial_fit
    def _has_partial_fit_step(self):
        return type(self)._partial_fit_step is not BaseDeepMixture._partial_fit_step

    @available_if(_has_partial_fit_step)
    @_fit_context(prefer_skip_nested_validation=True)
    def partial_fit(self, X, y=None):
        """Update the model with one mini-batch (incremental / online learning).

        The first call (on an unfitted estimator) validates the batch, fixes
        ``n_features_in_`` and initialises the model from the batch; every call
        then makes one update on the batch: a stepwise-EM step for EM
        estimators, one optimizer step for gradient-trained ones. A fitted
        estimator (after ``fit``) continues from its fitted state. Under
        torch.distributed each process passes its own batch and the update
        uses all of them.

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
        initialised = hasattr(self, "n_steps_") or hasattr(self, "lower_bound_")

        def validate():
            if not initialised:
                return self._validate_fit_input(X, y)
            if self._fit_uses_y and y is not None:
                return validate_data(self, X, y, dtype=[np.float64, np.float32], reset=False)
            return self._validate_X(X, reset=False), y

        (X, y), error = self._validate_everywhere(validate)
        if error is not None:
            X, y = np.zeros((0, 0)), None
        self._partition = self._make_partition(X.shape[0], X.shape[1], error)
        try:
            with _distributed.gradient_sync(self._distributed_mode == "gradients"):
                self._partial_fit_validated(X, y, initialised)
        finally:
            del self._partition
        return self

    def _partial_fit_validated(self, X, y, initialised):
        if not initialised:
            self._dtype = self._fit_dtype(X)
        device = self._fit_device()
        Xt = to_tensor(X, device, self._torch_dtype())
        yt = None if y is None else torch.as_tensor(np.array(y), device=device)
        generator = make_generator(self.random_state, device)
        steps = getattr(self, "n_steps_", 0)
        if steps:  # a different, reproducible stream of draws for each call
            generator.manual_seed((generator.initial_seed() + steps) % 2**63)
        if not initialised:
            self._check_parameters(X)
            self._initialize(Xt, generator, y=yt)
            self._broadcast_initial_state()
        else:
            self._prepare_inference(device)
        self.n_steps_ = steps
        metrics, objective = self._checked_objective(
            self._partial_fit_step(Xt, generator, y=yt), f"partial_fit step {steps + 1}"
        )
        self.n_steps_ = steps + 1
        self.lower_bound_ = objective

    def _checked_objective(self, metrics, where):
        """``(metrics dict, global objective)``; raises when training diverged."""
        if not isinstance(metrics, dict):
            metrics = {"objective": metrics}
        objective = self._global_objective(float(metrics["objective"]))
        if not math.isfinite(objective):
            raise TrainingDivergedError(
                f"{type(self).__name__} diverged at {where}: the objective is "
                f"{objective}. Try float64 (dtype='float64'), scaling the data, more "
                "regularisation or a smaller learning rate."
            )
        return metrics, objective

    def _run_iterations(self, X, y, generator, objective, init):
        history, converged, n_iter = [], False, 0
        progress = self._progress_bar(init)
        try:
            for n_iter in range(1, self.max_iter + 1):
                previous = objective
                metrics, objective = self._checked_objective(
                    self._fit_iteration(X, generator, y=y),
                    f"iteration {n_iter} of initialisation {init}",
                )
                history.append({"iteration": n_iter, **_as_floats(metrics)})
                change = objective - previous
                self._report_iteration(progress, n_iter, objective, change)
                if abs(change) < self.tol:
                    converged = True
                    break
        finally:
            if progress is not None:
                progress.close()
        return {
            "objective": objective,
            "converged": converged,
            "n_iter": n_iter,
            "history": history,
        }

    def _progress_bar(self, init):
        if not self.verbose or self.max_iter == 0 or not _distributed.is_main_process():
            return None
        from tqdm.auto import tqdm

        return tqdm(
            total=self.max_iter,
            desc=f"{type(self).__name__} init {init}",
            leave=self.verbose > 1,
        )

    def _report_iteration(self, progress, n_iter, objective, change):
        if progress is None:
            return
        progress.update(1)
        progress.set_postfix(objective=f"{objective:.5g}", change=f"{change:.3g}")
        interval = getattr(self, "verbose_interval", 10)
        if self.verbose > 1 and n_iter % interval == 0:
            progress.write(
                f"  Iteration {n_iter}\t objective {objective:.6g}\t change {change:.3g}"
            )

    def _estimate_log_prob_resp_chunked(self, X):
        """Chunked :meth:`_estimate_log_prob_resp` over a tensor already on device."""
        return self._map_chunks(self._estimate_log_prob_resp, X, X.device)

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
        _, log_resp = self._inference(self._estimate_log_prob_resp, X)
        return to_numpy(log_resp.argmax(dim=1))

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
        if not isinstance(n_samples, Integral) or n_samples < 1:
            raise ValueError(
                f"Invalid value for 'n_samples': {n_samples!r}. The sampling "
                "requires at least one sample."
            )
        device = self._runtime_device()
        self._prepare_inference(device)
        generator = make_generator(self.random_state, device)
        with torch.no_grad():
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
        return -2 * self.score(X) * n_samples + self._n_parameters() * math.log(
            n_samples
        )

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
