"""benchmarks/check_cuda.py, the GPU check, runs end to end in its CPU mode."""

from pathlib import Path

import pytest

from _scripts import load_benchmark


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_check_cuda_cpu_mode(tmp_path):
    check_cuda = load_benchmark("check_cuda")
    out = check_cuda.main(["--device", "cpu", "--tiny", "--out", str(tmp_path / "check.md")])
    text = Path(out).read_text()
    for name in ("GaussianMixture", "BayesianGaussianMixture", "CPMMEstimator",
                 "DCGMMEstimator", "DeepGMMEstimator", "GMVAEDPGMM"):
        assert name in text
    estimators = text.split("## Every estimator on the device")[1].split("## EM")[0]
    assert estimators.count("| ok | loads on CPU, same scores |") == 6
    assert "skdeepmix cpu float32" in text and "scikit-learn cpu float64" in text
