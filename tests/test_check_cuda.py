"""benchmarks/check_cuda.py, the GPU check, runs end to end in its CPU mode."""

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "check_cuda.py"


def test_check_cuda_cpu_mode(tmp_path):
    # A fresh process, as a user runs it: scipy's array-API mode is set before import.
    out = tmp_path / "check.md"
    env = {key: value for key, value in os.environ.items() if key != "SCIPY_ARRAY_API"}
    done = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--tiny",
                           "--out", str(out)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    text = out.read_text()
    for name in ("GaussianMixture", "BayesianGaussianMixture", "CPMMEstimator",
                 "DCGMMEstimator", "DeepGMMEstimator", "GMVAEDPGMM"):
        assert name in text
    estimators = text.split("## Every estimator on the device")[1].split("## EM")[0]
    assert estimators.count("| ok | loads on CPU, same scores |") == 6
    assert "skdeepmix cpu float32" in text and "scikit-learn cpu float64" in text
    # scikit-learn's array-API path ran on torch tensors and reached our lower bound.
    em = text.split("## EM")[1]
    rows = [line.split(" | ") for line in em.splitlines() if line.startswith("| 1k x 4")]
    bounds = {row[3]: float(row[6]) for row in rows if row[2] == "GaussianMixture"}
    assert "FAILED" not in em
    api = bounds["scikit-learn array API torch cpu float32"]
    assert abs(api - bounds["skdeepmix cpu float32"]) <= 1e-3 * abs(api)
