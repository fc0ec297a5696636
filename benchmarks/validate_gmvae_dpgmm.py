"""Validation of GMVAEDPGMM's defaults: does the learned number of clusters track the data?

Every run fits ``GMVAEDPGMM(n_components=30, **config)`` (a truncation of 30;
everything else is the configuration's, the defaults for ``config={}``) on a
*fit* split and reports, on a *validation* split of the same training data
(never a test set):

* ``K``: the active clusters of the fitted prior (``n_components_``),
* ``NMI`` and ``CS`` (completeness) of the predicted clusters against the classes,
* whether the fit converged (a ``ConvergenceWarning`` is recorded).

Data sets (``--datasets``):

``digits``
    scikit-learn's 8x8 digits / 16 (10 classes): 1 257 rows to fit, 540 to validate.
``digits5``
    The digits of classes 0-4 only (5 classes): 630 rows to fit, 271 to validate.
``mnist``
    MNIST training digits (10 classes): ``--n-train`` rows to fit, 5 000 others
    of the training set to validate.
``mnist5``
    The MNIST training digits of classes 0-4 only (5 classes), same sizes: the
    cluster count should move with the data.

Baseline rows: ``PCA(50)`` + ``GaussianMixture(K_true, 'full')`` fitted on the
same fit split (told the number of classes).

Runs append JSON lines (``--jsonl``) so that a grid can be split over processes;
``--report`` writes the markdown table. Every run uses one torch thread::

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/validate_gmvae_dpgmm.py \\
        --datasets digits digits5 mnist mnist5 --seeds 0 1 2 --baseline
    python benchmarks/validate_gmvae_dpgmm.py --report
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sklearn.datasets import load_digits  # noqa: E402
from sklearn.decomposition import PCA  # noqa: E402
from sklearn.exceptions import ConvergenceWarning  # noqa: E402
from sklearn.metrics import completeness_score, normalized_mutual_info_score  # noqa: E402
from sklearn.mixture import GaussianMixture  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402

from skdeepmix import GMVAEDPGMM  # noqa: E402
from skdeepmix.datasets import load_mnist  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "mnist"
RESULTS = ROOT / "benchmarks" / "results"
N_VALIDATION = 5000


def load(name, n_train):
    """``(X_fit, y_fit, X_val, y_val, n_classes)``; fixed splits (seed 0)."""
    if name in ("digits", "digits5"):
        X, y = load_digits(return_X_y=True)
        if name == "digits5":
            X, y = X[y < 5], y[y < 5]
        X_fit, X_val, y_fit, y_val = train_test_split(
            X / 16.0, y, test_size=0.3, random_state=0, stratify=y)
        return X_fit, y_fit, X_val, y_val, len(np.unique(y))
    digits = list(range(5)) if name == "mnist5" else None
    X, y = load_mnist(DATA, n_samples=n_train + N_VALIDATION, digits=digits, random_state=0)
    order = np.random.RandomState(0).permutation(len(y))
    fit, val = order[:n_train], order[n_train:]
    return X[fit], y[fit], X[val], y[val], len(np.unique(y))


def scores(y, labels):
    return {
        "nmi": normalized_mutual_info_score(y, labels),
        "cs": completeness_score(y, labels),
        "used": int(np.unique(labels).size),
    }


def best_merge(est, X_fit):
    """Change of the prior's lower bound for the best merge of two active clusters.

    The fitted DP prior's responsibilities of the training codes ``q(z|x)``
    (its E-step), the closed-form update and scikit-learn's collapsed lower
    bound (:meth:`DirichletProcessGMM.lower_bound`); then the same with the
    responsibilities of cluster ``j`` given to cluster ``i``, for every pair
    of active clusters (a merge move). A negative best change means that the
    DP's own objective keeps every cluster it found: the count is not a local
    optimum that merging would leave.
    """
    prior = est.prior_
    X = torch.as_tensor(X_fit, dtype=prior.means.dtype)
    m, v, _ = est._encode(X, "the merge test")

    def bound(resp):
        merged_prior = copy.deepcopy(prior)
        merged_prior.update(m, resp, v)
        return float(merged_prior.lower_bound(resp.log()))  # it counts 0 log 0 as 0

    with torch.no_grad():
        resp = prior.log_resp(m, v)[1].exp()
        now = bound(resp)
        best = -np.inf
        for i, j in itertools.combinations(est.active_components_.tolist(), 2):
            merged = resp.clone()
            merged[:, i] += merged[:, j]
            merged[:, j] = 0.0
            best = max(best, bound(merged) - now)
    return best


def run(dataset, seed, config_name, config, data):
    X_fit, y_fit, X_val, y_val, n_classes = data
    record = {"dataset": dataset, "seed": seed, "config": config_name, "params": config,
              "n_fit": len(y_fit), "n_val": len(y_val), "n_classes": n_classes}
    start = time.perf_counter()
    if config_name.startswith("baseline"):
        Z_fit = PCA(50, random_state=seed).fit(X_fit)
        gmm = GaussianMixture(n_classes, covariance_type="full", random_state=seed)
        gmm.fit(Z_fit.transform(X_fit))
        labels = gmm.predict(Z_fit.transform(X_val))
        record.update(K=n_classes, converged=bool(gmm.converged_),
                      time_s=time.perf_counter() - start)
    else:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            est = GMVAEDPGMM(n_components=30, random_state=seed, device="cpu", **config)
            est.fit(X_fit)
        record["time_s"] = time.perf_counter() - start  # the fit only
        labels = est.predict(X_val)
        record.update(
            K=int(est.n_components_), converged=bool(est.converged_), n_iter=int(est.n_iter_),
            convergence_warning=any(issubclass(w.category, ConvergenceWarning)
                                    for w in caught),
            K_per_epoch=[int(h["n_active"]) for h in est.history_],
            objectives=[round(float(h["objective"]), 4) for h in est.history_],
            best_merge_gain=best_merge(est, X_fit),
        )
    record.update(scores(y_val, labels))
    return record


def report(jsonl, out):
    records = [json.loads(line) for line in open(jsonl)]
    lines = [
        "# GMVAEDPGMM defaults: found number of clusters across data sets",
        "",
        f"Generated by `benchmarks/validate_gmvae_dpgmm.py --report` from `{Path(jsonl).name}`.",
        "",
        "Every GMVAEDPGMM row is `GMVAEDPGMM(n_components=30, random_state=seed, **params)` "
        "(truncation 30; `{}` = the defaults) fitted on the fit split; NMI and CS "
        "(completeness) of the predicted clusters on the validation split of the same "
        "training data (never a test set). `K` = active clusters (`n_components_`), "
        "`used` = distinct predicted clusters on the validation rows, `warn` = a "
        "ConvergenceWarning was raised, `best merge` = the change of the DP prior's "
        "lower bound for the best merge of two active clusters on the fit split's codes "
        "(negative: its own objective keeps every cluster; see `best_merge`). "
        "`defaults` rows are the defaults of the final code; "
        "`tuned (exploration, ...)` rows are the runs made while choosing them (on the code "
        "of the commit named; the params are those given on top of that code's defaults); "
        "the baseline is `PCA(50)` + `GaussianMixture(K true, 'full')` on the same split, "
        "told the number of classes.",
        "",
        "Data: `digits` = `load_digits` / 16, 1 257 fit / 540 validation (stratified "
        "split, seed 0); `digits5` = the same for the classes 0-4 only (630 / 271); "
        "`mnist` = MNIST training digits, 10 000 fit (`--n-train`) / 5 000 validation "
        "(other training digits); `mnist5` = the same for the classes 0-4 only. "
        f"Machine: {platform.machine()} CPU, 1 torch thread per run (`OMP_NUM_THREADS=1`, "
        "`nice -n 10`), other jobs sharing the 2 cores: times are noisy.",
        "",
        "Commands (the seeds of a data set may run as separate processes appending to "
        "the same JSON-lines file):",
        "",
        "```",
        "OMP_NUM_THREADS=1 nice -n 10 python benchmarks/validate_gmvae_dpgmm.py \\",
        "    --datasets digits digits5 mnist mnist5 --seeds 0 1 2 --baseline \\",
        "    --configs '{\"defaults\": {}, \"tuned (exploration, code 479571c)\": "
        "{\"latent_dim\": 5}}'",
        "python benchmarks/validate_gmvae_dpgmm.py --report",
        "```",
        "",
        "| data (classes) | config | params | seed | K | used | NMI | CS | epochs | warn "
        "| best merge | time (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    order = {"defaults": 0}
    records.sort(key=lambda r: (r["dataset"], order.get(r["config"], 1), r["config"], r["seed"]))
    for r in records:
        params = json.dumps(r["params"]) if r["params"] else "{}"
        merge = f"{r['best_merge_gain']:+.1f}" if "best_merge_gain" in r else "—"
        lines.append(
            f"| {r['dataset']} ({r['n_classes']}) | {r['config']} | `{params}` | {r['seed']} | "
            f"{r['K']} | {r['used']} | {r['nmi']:.3f} | {r['cs']:.3f} | {r.get('n_iter', '—')} | "
            f"{'yes' if r.get('convergence_warning') else 'no'} | {merge} | {r['time_s']:.0f} |"
        )
    lines += ["", "Mean over seeds (K: mean (min–max)):", "",
              "| data | config | params | n | K | NMI | CS | warnings |",
              "|---|---|---|---|---|---|---|---|"]
    groups = {}
    for r in records:
        key = (r["dataset"], r["config"], json.dumps(r["params"]) if r["params"] else "{}")
        groups.setdefault(key, []).append(r)
    for (dataset, config, params), rs in groups.items():
        ks = [r["K"] for r in rs]
        lines.append(
            f"| {dataset} ({rs[0]['n_classes']}) | {config} | `{params}` | {len(rs)} | "
            f"{np.mean(ks):.1f} ({min(ks)}–{max(ks)}) | "
            f"{np.mean([r['nmi'] for r in rs]):.3f} ± {np.std([r['nmi'] for r in rs]):.3f} | "
            f"{np.mean([r['cs'] for r in rs]):.3f} ± {np.std([r['cs'] for r in rs]):.3f} | "
            f"{sum(bool(r.get('convergence_warning')) for r in rs)} |"
        )
    lines += ["", SUMMARY]
    Path(out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


#: what the table of the recorded run says (kept with the script that made it)
SUMMARY = """What the recorded run says (defaults and baseline rows rerun on code 479571c,
2026-12-01; a default fit takes 7-9 s on digits and 117-154 s on 10 000 MNIST
digits, one thread):

* The defaults find a cluster count near the number of classes, not near the
  truncation of 30, and it moves with the data on the digits: digits 9.0 (8-10)
  for 10 classes, digits 0-4 5.0 (4-6) for 5. On MNIST: 12.0 (11-13) for 10
  classes. The exact DP (`dp_sample_size=None`) keeps 29 of 30 on MNIST. Every
  default fit converged (no ConvergenceWarning).
* **MNIST 0-4 is over-counted**: 9.7 (8-11) clusters for 5 classes. The
  sub-styles of a digit (slanted and upright ones, ...) are clusters in the
  latent space at this granularity. Three checks say so:
  * The `best merge` column: for every MNIST and MNIST 0-4 fit, merging any two
    active clusters lowers the DP prior's own lower bound (by 6-53). The count
    is what the coarsened DP objective prefers for these codes, not a local
    optimum that merge moves would leave. (On digits 2 of 6 fits would accept a
    merge, +34 and +35.)
  * A coarser granularity does not reach 5 there without breaking MNIST:
    `dp_sample_size=500` gives 7 on MNIST 0-4 but 5 on MNIST (NMI 0.38) and 7 on
    digits; 700 gives 8 on MNIST 0-4 and 9 on MNIST (seed 0 grid below).
  * `beta=2` (a stronger pull of the codes towards the prior) and
    `weight_concentration_prior=1e-3` do not help either (7-8 on MNIST 0-4;
    `beta=2` leaves 4 clusters on digits).
* `latent_dim=5`, over 3 seeds, is the nearest alternative: higher NMI on MNIST
  (0.707 against 0.623) and MNIST 0-4 (0.802 against 0.777) but lower on digits
  (0.645 against 0.730, 6-7 clusters); 3 of its 12 fits did not converge within
  the 100 epochs. Mean NMI over the four data sets: 0.735 against the defaults'
  0.728. Not a clear win, so the defaults stay.
* NMI of the defaults against PCA(50)+GMM told the number of classes: equal on
  digits (0.730 vs 0.736) and digits 0-4 (0.782 vs 0.787), above on MNIST (0.623
  vs 0.611), below on MNIST 0-4 (0.777 vs 0.829), where the extra clusters cost
  completeness. The tuned full-covariance settings of `gmvae_dpgmm*.md` do better
  on MNIST with more data (NMI 0.89 on 60 000 digits) but are unstable on small
  data (1-6 clusters on digits), so they are not the defaults.
* The seed-0 grid of code 479571c ran as
  `--datasets digits digits5 mnist mnist5 --seeds 0 --configs '{"dp500":
  {"dp_sample_size": 500}, "dp700": {"dp_sample_size": 700}, "beta2": {"beta":
  2.0}, "alpha1e-3": {"weight_concentration_prior": 0.001}, "latent5":
  {"latent_dim": 5}}'` before the merge test existed (`best merge` = —); its
  rows were relabelled `tuned (exploration, code 479571c)` in the JSON-lines
  file, and its `latent_dim=5` seed-0 rows replaced by those of the 3-seed run.
  The `code b2719d3` rows are the older exploration that chose
  `dp_sample_size=1000`."""


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", nargs="+", default=["digits", "mnist", "mnist5"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--n-train", type=int, default=10000)
    parser.add_argument("--configs", default='{"defaults": {}}',
                        help="JSON object: name -> GMVAEDPGMM parameters")
    parser.add_argument("--baseline", action="store_true", help="also PCA(50)+GMM(K true)")
    parser.add_argument("--jsonl", default=str(RESULTS / "defaults_gmvae_dpgmm.jsonl"))
    parser.add_argument("--out", default=str(RESULTS / "defaults_gmvae_dpgmm.md"))
    parser.add_argument("--report", action="store_true", help="only write the table")
    args = parser.parse_args()
    if args.report:
        report(args.jsonl, args.out)
        return
    torch.set_num_threads(1)
    configs = json.loads(args.configs)
    if args.baseline:
        configs["baseline PCA(50)+GMM(K true)"] = {}
    for dataset in args.datasets:
        if dataset.startswith("mnist") and not DATA.exists():
            sys.exit(f"MNIST not found in {DATA}.")
        data = load(dataset, args.n_train)
        for seed in args.seeds:
            for name, config in configs.items():
                record = run(dataset, seed, name, config, data)
                with open(args.jsonl, "a") as fh:
                    fh.write(json.dumps(record) + "\n")
                print(f"{dataset:7s} seed={seed} {name:12s} K={record['K']:2d} "
                      f"NMI={record['nmi']:.3f} CS={record['cs']:.3f} "
                      f"warn={record.get('convergence_warning')} {record['time_s']:.0f}s",
                      flush=True)


if __name__ == "__main__":
    main()
