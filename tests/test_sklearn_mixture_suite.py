"""scikit-learn's own tests of ``sklearn.mixture``, run against skdeepmix.

The *installed* scikit-learn ships its tests
(``sklearn/mixture/tests/test_gaussian_mixture.py``,
``test_bayesian_mixture.py``, ``test_mixture.py``). This module reads each
file, swaps its import of ``GaussianMixture`` / ``BayesianGaussianMixture``
from ``sklearn.mixture`` for ours, executes it in a fresh module namespace
(scikit-learn's own modules are left untouched) and exposes its test
functions here, so that they run inside ``python -m pytest`` with their own
parametrisations and marks:

* ``test_gm__<name>``: from ``test_gaussian_mixture.py``;
* ``test_bgm__<name>``: from ``test_bayesian_mixture.py``;
* ``test_mixture__<name>``: from ``test_mixture.py``.

scikit-learn's fixtures are provided here: ``global_dtype`` is always float32
*and* float64 (scikit-learn skips float32 unless ``SKLEARN_RUN_FLOAT32_TESTS=1``;
our float32 path must pass them), ``global_random_seed`` follows
``SKLEARN_TESTS_GLOBAL_RANDOM_SEED`` as in scikit-learn (default 42).

Every test that is not run is listed in :data:`EXCLUDED` with its reason;
every other name replaced in a file's namespace is in :data:`REPLACED`.
When the installed wheel lacks the test files, the module is skipped.
"""

from __future__ import annotations

import ast
import os
import types
from pathlib import Path

import numpy as np
import pytest
import sklearn
import torch

from skdeepmix._kmeans import kmeans
from skdeepmix._torch_utils import make_generator, resolve_device

TESTS_DIR = Path(sklearn.__file__).parent / "mixture" / "tests"
#: file -> prefix of the exposed test names
FILES = {
    "test_gaussian_mixture.py": "test_gm__",
    "test_bayesian_mixture.py": "test_bgm__",
    "test_mixture.py": "test_mixture__",
}
#: the classes swapped for ours
SWAPPED = {"GaussianMixture", "BayesianGaussianMixture"}
#: other names of a file's namespace replaced, with the reason
REPLACED = {
    "test_gaussian_mixture.py": {
        "KMeans": (
            "test_gaussian_mixture_precisions_init_diag computes its reference "
            "precisions from KMeans(random_state=0) labels, assuming they are the "
            "labels of the estimator's own k-means initialisation (cluster order "
            "included). Ours initialises with skdeepmix._kmeans seeded by a "
            "torch.Generator, so the reference uses that k-means (same seed rule, "
            "on the device the estimator's device='auto' picks: CUDA's random "
            "streams differ from the CPU's)."
        ),
    },
}

_PRIVATE = "tests scikit-learn's private helper {} (not part of the estimator's API)"
_ARRAY_API = (
    "tests scikit-learn's array-API dispatch (sklearn.config_context("
    "array_api_dispatch=True)), not the estimator: {}. Our estimators compute in "
    "torch on `device` whatever the input's array namespace, accept numpy or torch "
    "input and return numpy (doc/drop_in.md). Skipped by scikit-learn itself unless "
    "SCIPY_ARRAY_API=1 and array-api-compat are set up."
)

#: tests not run, with the reason (scikit-learn's private helpers; see above)
EXCLUDED = {
    "test_gaussian_mixture.py": {
        "test_suffstat_sk_full": _PRIVATE.format("_estimate_gaussian_covariances_full"),
        "test_suffstat_sk_tied": _PRIVATE.format("_estimate_gaussian_covariances_tied"),
        "test_suffstat_sk_diag": _PRIVATE.format("_estimate_gaussian_covariances_diag"),
        "test_gaussian_suffstat_sk_spherical": _PRIVATE.format(
            "_estimate_gaussian_covariances_spherical"
        ),
        "test_compute_log_det_cholesky": _PRIVATE.format("_compute_log_det_cholesky"),
        "test_gaussian_mixture_log_probabilities": _PRIVATE.format(
            "_estimate_log_gaussian_prob"
        ),
        "test_gaussian_mixture_precisions_init": _PRIVATE.format(
            "_estimate_gaussian_parameters/_compute_precision_cholesky and the private "
            "methods GaussianMixture._set_parameters and ._initialize(X, resp); the "
            "same property through the public API (max_iter=0 with precisions_init) "
            "is tests/test_gaussian_mixture.py::test_precisions_init_sets_the_cholesky_factors"
        ),
        "test_gaussian_mixture_all_init_does_not_estimate_gaussian_parameters": (
            _PRIVATE.format(
                "_estimate_gaussian_parameters (it monkeypatches the module function "
                "and counts its calls, which our estimator never makes)"
            )
        ),
        "test_gaussian_mixture_array_api_compliance": _ARRAY_API.format(
            "it asserts that the fitted attributes live in the input's namespace"
        ),
        "test_gaussian_mixture_raises_where_array_api_not_implemented": _ARRAY_API.format(
            "it asserts the NotImplementedError that scikit-learn raises for the "
            "k-means initialisations under dispatch (ours run k-means in torch)"
        ),
    },
    "test_bayesian_mixture.py": {
        "test_log_dirichlet_norm": _PRIVATE.format("_log_dirichlet_norm"),
        "test_log_wishart_norm": _PRIVATE.format("_log_wishart_norm"),
        "test_compare_covar_type": _PRIVATE.format(
            "through the private methods BayesianGaussianMixture._check_parameters(X) "
            "and ._initialize_parameters(X, random_state); the same check through "
            "the public API (max_iter=0) is "
            "tests/test_bayesian_mixture.py::test_compare_covariance_types_after_init"
        ),
    },
    "test_mixture.py": {},
}


class _EstimatorKMeans:
    """``sklearn.cluster.KMeans``'s interface over the k-means our mixtures
    initialise with (:func:`skdeepmix._kmeans.kmeans`, seeded like them)."""

    def __init__(self, n_clusters=8, *, n_init=1, random_state=None):
        self.n_clusters, self.n_init, self.random_state = n_clusters, n_init, random_state

    def fit(self, X):
        device = resolve_device("auto")
        generator = make_generator(self.random_state, device)
        _, labels = kmeans(torch.as_tensor(np.asarray(X), device=device), self.n_clusters,
                           generator)
        self.labels_ = labels.cpu().numpy()
        return self


_REPLACEMENTS = {"KMeans": _EstimatorKMeans}


def _load(filename):
    """Test functions of one of scikit-learn's files, with our classes swapped in."""
    path = TESTS_DIR / filename
    tree = ast.parse(path.read_text(), filename=str(path))
    swapped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "sklearn.mixture":
            names = {alias.name for alias in node.names}
            if names <= SWAPPED:
                node.module = "skdeepmix"
                swapped |= names
    if not swapped:
        raise AssertionError(f"{filename} no longer imports the estimators from sklearn.mixture")
    excluded = EXCLUDED[filename]
    defined = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
    missing = set(excluded) - defined
    if missing:
        raise AssertionError(f"excluded tests missing from {filename}: {sorted(missing)}")
    tree.body = [n for n in tree.body
                 if not (isinstance(n, ast.FunctionDef) and n.name in excluded)]
    module = types.ModuleType(f"skdeepmix_sklearn_suite_{path.stem}")
    module.__file__ = str(path)
    exec(compile(tree, str(path), "exec"), module.__dict__)
    for name in REPLACED.get(filename, {}):
        assert hasattr(module, name), f"{filename} no longer uses {name}"
        setattr(module, name, _REPLACEMENTS[name])
    for name in swapped:  # the swap really happened
        assert getattr(module, name).__module__.startswith("skdeepmix."), name
    return {name: value for name, value in vars(module).items()
            if name.startswith("test_") and callable(value)}


if not all((TESTS_DIR / name).is_file() for name in FILES):
    pytest.skip(
        f"the installed scikit-learn ({sklearn.__version__}) ships no tests in "
        f"{TESTS_DIR}; install a wheel with sklearn/mixture/tests to run them",
        allow_module_level=True,
    )

for _filename, _prefix in FILES.items():
    for _name, _test in _load(_filename).items():
        globals()[_prefix + _name[len("test_"):]] = _test


# ------------------------------------------------ scikit-learn's fixtures
@pytest.fixture(params=[np.float32, np.float64], ids=["float32", "float64"])
def global_dtype(request):
    """Both dtypes, always (scikit-learn runs float32 only on request)."""
    return request.param


def _global_random_seeds():
    """scikit-learn's rule: SKLEARN_TESTS_GLOBAL_RANDOM_SEED, default 42."""
    value = os.environ.get("SKLEARN_TESTS_GLOBAL_RANDOM_SEED")
    if value is None:
        return [42]
    if value == "all":
        return list(range(100))
    if "-" in value:
        start, stop = value.split("-")
        return list(range(int(start), int(stop) + 1))
    return [int(value)]


@pytest.fixture(params=_global_random_seeds())
def global_random_seed(request):
    return request.param


def test_every_test_of_the_files_is_run_or_excluded_with_a_reason():
    run = {name for name in globals() if name.startswith(tuple(FILES.values()))}
    for filename, prefix in FILES.items():
        tree = ast.parse((TESTS_DIR / filename).read_text())
        tests = {n.name for n in tree.body
                 if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")}
        for name in tests:
            exposed = prefix + name[len("test_"):]
            assert (exposed in run) != (name in EXCLUDED[filename]), name
            assert name not in EXCLUDED[filename] or EXCLUDED[filename][name]
