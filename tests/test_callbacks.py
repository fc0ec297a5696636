"""One progress bar per fit (``verbose=1``) and scikit-learn's experimental
callbacks (``sklearn.callback``) on every public estimator."""

from __future__ import annotations

import contextlib
import io
import pickle
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.datasets import make_blobs

import skdeepmix
from skdeepmix import _base

from test_common import SMALL

callback = pytest.importorskip("sklearn.callback")
needs_callbacks = pytest.mark.skipif(
    not _base._HAS_CALLBACKS, reason="sklearn.callback lacks the API skdeepmix uses"
)


@pytest.fixture(scope="module")
def X():
    return make_blobs(120, n_features=4, centers=3, random_state=0)[0]


def _estimator(name, **params):
    cls = getattr(skdeepmix, name)
    return cls(**{**SMALL[name], "random_state": 0, "device": "cpu", **params})


def _fit(estimator, X, y=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning of the tiny fits
        return estimator.fit(X, y)


class Recorder:
    """A FitCallback recording its hooks (and scoring the mid-fit models)."""

    def __init__(self):
        self.events, self.scores = [], []

    def setup(self, estimator, context):
        self.events.append(("setup", context.task_name))

    def teardown(self, estimator, context):
        self.events.append(("teardown", context.task_name))

    def on_fit_task_begin(self, estimator, context, *, X=None):
        self.events.append(("begin", context.task_name))

    def on_fit_task_end(self, estimator, context, *, X=None, fitted_estimator=None):
        self.events.append(("end", context.task_name))
        if context.task_name == "iteration":
            self.scores.append(fitted_estimator.score(X))


class StopAfter(Recorder):
    """Asks the fit to stop after ``n`` iterations."""

    def __init__(self, n):
        super().__init__()
        self.n = n

    def on_fit_task_end(self, estimator, context, *, X=None, fitted_estimator=None):
        super().on_fit_task_end(estimator, context, X=X, fitted_estimator=fitted_estimator)
        return self.events.count(("end", "iteration")) >= self.n


@pytest.mark.parametrize("name", sorted(SMALL))
def test_one_progress_bar_per_fit_ending_at_100(name, X):
    # an auxiliary phase where the estimator has one, and a huge tol so that
    # the EM fits converge long before max_iter
    extra = {"GMVAEDPGMM": {"pretrain_iter": 2}}.get(name, {})
    if name in ("GaussianMixture", "BayesianGaussianMixture"):
        extra = {"tol": 1e3}
    estimator = _estimator(name, verbose=1, **extra)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        _fit(estimator, X)
    text = err.getvalue()
    # one bar: every refresh redraws the same line, closed by one newline
    assert text.count("\n") == 1
    states = [s for s in text.split("\r") if "%|" in s]
    assert states and all(s.startswith(name) for s in states)
    total = estimator.max_iter + estimator._n_progress_steps()
    assert states[-1].startswith(f"{name}: 100%")
    assert f" {total}/{total} " in states[-1]
    if name in ("GaussianMixture", "BayesianGaussianMixture"):
        assert estimator.converged_ and estimator.n_iter_ < estimator.max_iter


@needs_callbacks
@pytest.mark.parametrize("name", sorted(SMALL))
def test_fit_callback_receives_every_iteration(name, X):
    extra = {"GMVAEDPGMM": {"pretrain_iter": 2}}.get(name, {})
    recorder = Recorder()
    estimator = _estimator(name, **extra).set_callbacks(recorder)
    _fit(estimator, X)
    events = recorder.events
    assert events[:2] == [("setup", "fit"), ("begin", "fit")]
    assert events[-2:] == [("end", "fit"), ("teardown", "fit")]
    assert events.count(("begin", "iteration")) == estimator.n_iter_
    assert events.count(("end", "iteration")) == estimator.n_iter_
    assert events.count(("end", "pre-training")) == extra.get("pretrain_iter", 0)
    # the mid-fit models are independent, ready-to-score copies
    assert len(recorder.scores) == estimator.n_iter_
    assert np.all(np.isfinite(recorder.scores))
    # the callbacks change nothing in the fit, and leave no fit state behind
    reference = _fit(_estimator(name, **extra), X)
    np.testing.assert_allclose(estimator.score_samples(X), reference.score_samples(X))
    assert not hasattr(estimator, "_callback_fit_ctx")
    # not a parameter: clone and pickle keep working
    assert "callbacks" not in estimator.get_params()
    assert clone(estimator)._skl_callbacks == [recorder]
    pickle.loads(pickle.dumps(estimator))


@needs_callbacks
def test_callbacks_tasks_per_initialisation_and_partial_fit(X):
    recorder = Recorder()
    estimator = _estimator("GaussianMixture", n_init=3).set_callbacks(recorder)
    _fit(estimator, X)
    assert recorder.events.count(("begin", "init")) == 3
    assert recorder.events.count(("end", "init")) == 3

    recorder = Recorder()
    estimator = _estimator("DeepGMMEstimator").set_callbacks(recorder)
    estimator.partial_fit(X)
    assert recorder.events == [
        ("setup", "fit"), ("begin", "fit"), ("end", "fit"), ("teardown", "fit")
    ]


@needs_callbacks
def test_callback_can_stop_the_fit(X):
    stopper = StopAfter(2)
    estimator = _estimator("DeepGMMEstimator", max_iter=10, tol=0.0).set_callbacks(stopper)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a requested stop is not a convergence failure
        estimator.fit(X)
    assert estimator.n_iter_ == 2 and not estimator.converged_


@needs_callbacks
def test_scoring_monitor_logs_each_iteration(X):
    monitor = callback.ScoringMonitor(scoring=lambda est, X, y: {"loglik": est.score(X)})
    estimator = _estimator("GaussianMixture").set_callbacks(monitor)
    # ScoringMonitor scores only when y is given (ignored by the fit itself)
    _fit(estimator, X, np.zeros(len(X)))
    rows = monitor.get_logs().data
    iterations = [row for row in rows if row["task_name"] == "iteration"]
    assert len(iterations) == estimator.n_iter_
    assert iterations[-1]["loglik"] == pytest.approx(estimator.score(X))


@needs_callbacks
def test_progress_bar_callback_runs(X):
    pytest.importorskip("rich")
    estimator = _estimator("GMVAEDPGMM").set_callbacks(callback.ProgressBar())
    _fit(estimator, X)
    assert estimator.n_iter_ >= 1


def test_package_imports_without_sklearn_callback():
    # sklearn.callback is experimental: without it the package still imports
    # and set_callbacks says what is missing
    code = (
        "import sys; sys.modules['sklearn.callback'] = None\n"
        "import skdeepmix\n"
        "try:\n"
        "    skdeepmix.GaussianMixture().set_callbacks(object())\n"
        "except NotImplementedError as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=Path(__file__).parents[1], check=True).stdout
    assert "needs scikit-learn's experimental sklearn.callback API" in out
