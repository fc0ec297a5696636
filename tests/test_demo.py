"""The demo runs, defines its columns and keeps densities apart from other scores."""

import numpy as np

from skdeepmix import demo


def test_demo_prints_both_tables_and_defines_every_column(capsys):
    rows = demo.run(only="GaussianMixture(10, diag)", seed=0, threads=1)
    out = capsys.readouterr().out
    assert [row["model"] for row in rows] == ["sklearn GaussianMixture(10, diag)",
                                              "skdeepmix GaussianMixture(10, diag)"]
    assert "Densities of the test images" in out and "Clusters against the digit labels" in out
    for column in ("fit s", "iter", "conv", "test nats", "clusters", "ARI", "NMI", "acc"):
        assert f"  {column} " in out.split("Columns")[1], column
    for row in rows:
        assert np.isfinite(row["test_loglik"]) and 0.0 <= row["accuracy"] <= 1.0
    # the drop-in reaches scikit-learn's likelihood on the same data
    assert abs(rows[0]["test_loglik"] - rows[1]["test_loglik"]) < 2.0


def test_demo_numbers_do_not_depend_on_the_run(capsys):
    first = demo.run(only="skdeepmix GaussianMixture(10, diag)", seed=1)
    second = demo.run(only="skdeepmix GaussianMixture(10, diag)", seed=1)
    assert first[0]["test_loglik"] == second[0]["test_loglik"]
    assert first[0]["ari"] == second[0]["ari"]


def test_density_table_lists_only_normalised_densities():
    names = {name for name, _ in demo.DENSITY_MODELS}
    assert not any("DCGMM" in name or "GMVAE" in name for name in names)
