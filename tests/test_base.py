"""The shared base class and the torch helpers."""

import math
import os
import pickle
import warnings

import numpy as np
import pytest
import torch
from sklearn.exceptions import ConvergenceWarning

from skdeepmix import TrainingDivergedError
from skdeepmix._base import BaseDeepMixture
from skdeepmix._torch_utils import make_generator, resolve_device, resolve_dtype


class ScriptedMixture(BaseDeepMixture):
    """A one-component 'model' whose objective follows a given script."""

    def __init__(self, objectives=(1.0, 2.0, 2.0), max_iter=10, tol=1e-3, n_init=1,
                 random_state=None, warm_start=False, verbose=0, verbose_interval=10,
                 device="cpu", dtype="float64", chunk_size=None):
        super().__init__(tol=tol, max_iter=max_iter, n_init=n_init, random_state=random_state,
                         warm_start=warm_start, verbose=verbose,
                         verbose_interval=verbose_interval, device=device, dtype=dtype,
                         chunk_size=chunk_size)
        self.objectives = objectives

    def _initialize(self, X, ctx):
        self.mean_ = X.mean(0)
        self._step = 0

    def _fit_iteration(self, X, ctx):
        value = self.objectives[min(self._step, len(self.objectives) - 1)]
        self._step += 1
        return {"objective": value, "extra": 2 * value}

    def _get_state(self):
        return {"mean": self.mean_.clone()}

    def _set_state(self, state):
        self.mean_ = state["mean"]

    def _estimate_weighted_log_prob(self, X):
        return -0.5 * ((X - self.mean_) ** 2).sum(1, keepdim=True)

    def _sample(self, n_samples, generator):
        noise = torch.randn(n_samples, self.mean_.numel(), generator=generator,
                            dtype=self.mean_.dtype)
        return self.mean_ + noise, torch.zeros(n_samples, dtype=torch.long)

    def _n_parameters(self):
        return self.mean_.numel()


X = np.random.RandomState(0).normal(size=(20, 3))


def test_loop_converges_and_records_history():
    model = ScriptedMixture().fit(X)
    assert model.converged_ and model.n_iter_ == 3
    assert model.lower_bounds_ == [1.0, 2.0, 2.0]
    assert model.history_[0] == {"iteration": 1, "objective": 1.0, "extra": 2.0}
    assert isinstance(model.mean_, torch.Tensor)


def test_divergence_is_reported():
    with pytest.raises(TrainingDivergedError, match="diverged at iteration 2"):
        ScriptedMixture(objectives=(1.0, math.nan)).fit(X)
    with pytest.raises(FloatingPointError):
        ScriptedMixture(objectives=(1.0, math.inf)).fit(X)


def test_convergence_warning():
    with pytest.warns(ConvergenceWarning, match="^Best performing initialization did not converge"):
        ScriptedMixture(objectives=(1.0, 2.0, 3.0, 4.0), max_iter=3).fit(X)


def test_inference_and_pickle_are_numpy_on_cpu():
    model = ScriptedMixture().fit(X)
    scores = model.score_samples(X)
    assert isinstance(scores, np.ndarray) and scores.shape == (20,)
    np.testing.assert_array_equal(model.predict(X), np.zeros(20))
    samples, labels = model.sample(5)
    assert samples.shape == (5, 3) and labels.dtype == np.int64
    seeded = ScriptedMixture(random_state=0).fit(X)
    np.testing.assert_array_equal(seeded.sample(4)[0], seeded.sample(4)[0])
    assert np.isfinite(seeded.bic(X)) and seeded.aic(X) < seeded.bic(X)
    restored = pickle.loads(pickle.dumps(model))
    assert restored.mean_.device.type == "cpu"
    np.testing.assert_array_equal(restored.score_samples(X), scores)


def test_resolve_device_and_dtype():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda")
    with pytest.raises(ValueError, match="Invalid device"):
        resolve_device("gpu-please")
    with pytest.raises(TypeError, match="device must be"):
        resolve_device(3)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            resolve_device("cuda:0")
        assert resolve_device("cuda", fallback_to_cpu=True) == torch.device("cpu")
    assert resolve_dtype("float32") is torch.float32
    assert resolve_dtype(np.float64) is torch.float64
    assert resolve_dtype(torch.float32) is torch.float32
    with pytest.raises(ValueError, match="dtype"):
        resolve_dtype("int64")


def test_chunks_are_larger_on_an_accelerator():
    from skdeepmix._torch_utils import ACCELERATOR_BUDGET, MEMORY_BUDGET, chunk_rows

    assert chunk_rows(100) == chunk_rows(100, device=torch.device("cpu")) == MEMORY_BUDGET // 100
    assert chunk_rows(100, device=torch.device("cuda")) == ACCELERATOR_BUDGET // 100
    assert chunk_rows(1, device=torch.device("cuda")) == 2**22  # bounded
    assert chunk_rows(100, 7, device=torch.device("cuda")) == 7  # the user's choice


def test_resolved_cuda_device_has_its_index(monkeypatch):
    # Tensors made on 'cuda' report 'cuda:N', and torch.device('cuda') != 'cuda:0':
    # an index-less device made cached parameters look stale on every call.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert resolve_device("cuda") == torch.device("cuda", 1)
    assert resolve_device("auto") == torch.device("cuda", 1)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    assert resolve_device(torch.device("cuda")) == torch.device("cuda", 1)


def test_generator_is_seeded_by_random_state():
    a = torch.rand(3, generator=make_generator(5, torch.device("cpu")))
    b = torch.rand(3, generator=make_generator(5, torch.device("cpu")))
    c = torch.rand(3, generator=make_generator(6, torch.device("cpu")))
    assert torch.equal(a, b) and not torch.equal(a, c)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the global torch RNG is not touched
        state = torch.random.get_rng_state()
        make_generator(None, torch.device("cpu"))
        assert torch.equal(state, torch.random.get_rng_state())


def test_idle_cpus_counts_other_processes_only(monkeypatch):
    """Competitors are the machine's running tasks minus this process's own
    running threads (e.g. a BLAS pool still spinning after a NumPy call)."""
    import os

    from skdeepmix import _torch_utils

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(_torch_utils, "_running_tasks", lambda: 3)
    monkeypatch.setattr(_torch_utils, "_own_running_threads", lambda: 3)
    assert _torch_utils.idle_cpus(interval=0.0) == 2  # all ours
    monkeypatch.setattr(_torch_utils, "_own_running_threads", lambda: 2)
    assert _torch_utils.idle_cpus(interval=0.0) == 1  # one other process
    monkeypatch.setattr(_torch_utils, "_running_tasks", lambda: 9)
    assert _torch_utils.idle_cpus(interval=0.0) == 1  # at least one


def test_idle_cpus_reads_this_machine():
    """The /proc readers work here (at least this thread runs)."""
    from skdeepmix import _torch_utils

    if not os.path.exists("/proc/stat"):
        pytest.skip("no /proc on this platform")
    assert _torch_utils._running_tasks() >= 1
    assert _torch_utils._own_running_threads() >= 1
    assert 1 <= _torch_utils.idle_cpus() <= len(os.sched_getaffinity(0))


def test_run_in_threads_runs_each_task_on_its_own_thread_and_restores_threads():
    import threading

    from skdeepmix._torch_utils import run_in_threads

    before = torch.get_num_threads()
    seen = []

    def task(i):
        seen.append(torch.get_num_threads())  # one torch thread in every task
        return i, threading.current_thread()

    results = run_in_threads([lambda i=i: task(i) for i in range(3)])
    assert [i for i, _ in results] == [0, 1, 2]  # in order
    assert len({thread.name for _, thread in results}) == 3
    assert results[0][1] is threading.current_thread()  # the caller runs the first
    assert seen == [1, 1, 1]
    assert torch.get_num_threads() == before

    def fails():
        raise RuntimeError("task failed")

    with pytest.raises(RuntimeError, match="task failed"):
        run_in_threads([lambda: 0, fails])
    assert torch.get_num_threads() == before


def test_run_in_threads_from_several_user_threads_restores_the_count():
    """Overlapping calls (e.g. joblib's threading backend): the thread count
    stays 1 until the last call ends, then is what it was."""
    import threading
    import time

    from skdeepmix._torch_utils import run_in_threads

    before = torch.get_num_threads()
    seen = {}

    def call(name, seconds):
        run_in_threads([lambda: time.sleep(seconds), lambda: time.sleep(seconds)])
        seen[name] = torch.get_num_threads()

    first = threading.Thread(target=call, args=("first", 0.1))
    second = threading.Thread(target=call, args=("second", 0.3))
    first.start()
    time.sleep(0.03)
    second.start()
    first.join()
    second.join()
    assert seen["first"] == 1  # the second call was still running
    assert torch.get_num_threads() == before
