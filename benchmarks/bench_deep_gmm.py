"""Benchmark: deep GMMs against full-covariance GMMs on BSDS300 patches.

The standard setup of the deep GMM paper (van den Oord & Schrauwen 2014, after
Uria et al. 2013): 8x8 grey patches, uniform dequantisation, /256, patch mean
removed, last pixel dropped (63 dimensions); training patches from the 200
train images, test patches from the 100 test images. Reported: average test
log-likelihood in nats (higher is better), effective parameter counts, fit
times (wall and CPU seconds of this process).

Run ``python benchmarks/bench_deep_gmm.py`` (``--quick`` for a smoke run).
Writes ``benchmarks/results/deep_gmm.md`` and the 2-D toy figure
``doc/images/deep_gmm_toy.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture as SkGaussianMixture

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from skdeepmix.datasets._bsds300 import make_bsds300_patches  # noqa: E402
from skdeepmix.deep_gmm import DeepGMMEstimator  # noqa: E402
from skdeepmix.gaussian_mixture import GaussianMixture  # noqa: E402

BSDS = ROOT.parent / "shared" / "data" / "bsds300" / "images"
RESULTS = ROOT / "benchmarks" / "results" / "deep_gmm.md"
FIGURE = ROOT / "doc" / "images" / "deep_gmm_toy.png"


def gmm_parameters(K, d):
    return K * (d + d * (d + 1) // 2) + K - 1


def raw_parameters(row, d=63):
    """Every number stored by the model (no gauge/rotation subtracted)."""
    if "raw_parameters" in row:
        return row["raw_parameters"]
    match = re.search(r"(?:layer_sizes|n_components)=\(([0-9, ]+)\)", row["model"])
    if not match:
        return row["parameters"]
    sizes = [int(n) for n in match.group(1).split(",") if n.strip()]
    return sum(sizes) * (d * d + d) + int(np.prod(sizes)) - 1


def timed_fit(model, X):
    wall, cpu = time.perf_counter(), time.process_time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(X)
    return time.perf_counter() - wall, time.process_time() - cpu


def run_bsds(args):
    rows = []
    Xtr = make_bsds300_patches(BSDS / "train", args.n_train, random_state=0)
    Xte = make_bsds300_patches(BSDS / "test", args.n_test, random_state=1)
    # held-out patches of the *train* images: separates overfitting from the shift
    # between the train and test images
    Xva = make_bsds300_patches(BSDS / "train", args.n_test, random_state=2)
    d = Xtr.shape[1]
    print(f"train {Xtr.shape}, test {Xte.shape}", flush=True)

    def record(name, kind, params, model, wall, cpu, n_iter, raw=None):
        raw = params if raw is None else raw
        row = {
            "model": name,
            "kind": kind,
            "parameters": int(params),
            "raw_parameters": int(raw),
            "train": float(model.score(Xtr)),
            "heldout": float(model.score(Xva)),
            "test": float(model.score(Xte)),
            "wall_s": wall,
            "cpu_s": cpu,
            "n_iter": int(n_iter),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.partial:
            Path(args.partial).write_text(json.dumps(rows, indent=1))

    for K in args.sklearn_k:
        model = SkGaussianMixture(K, covariance_type="full", random_state=0,
                                  max_iter=args.gmm_max_iter)
        wall, cpu = timed_fit(model, Xtr)
        record(f"sklearn GaussianMixture(K={K}, full)", "sklearn GMM",
               gmm_parameters(K, d), model, wall, cpu, model.n_iter_)
    for K in args.ours_k:
        model = GaussianMixture(K, covariance_type="full", random_state=0,
                                max_iter=args.gmm_max_iter, device="cpu", dtype=args.dtype)
        wall, cpu = timed_fit(model, Xtr)
        record(f"skdeepmix GaussianMixture(K={K}, full, {args.dtype})", "skdeepmix GMM",
               model._n_parameters(), model, wall, cpu, model.n_iter_)
    for sizes in args.deep:
        model = DeepGMMEstimator(sizes, random_state=0, max_iter=args.deep_max_iter,
                                 prior_count=args.prior_count, m_step_iter=args.m_step_iter,
                                 device="cpu", dtype=args.dtype)
        wall, cpu = timed_fit(model, Xtr)
        record(f"DeepGMMEstimator(n_components={sizes}) [{len(sizes)} layers, "
               f"{model.n_paths_} paths, {model._path_search()} E-step]",
               f"Deep GMM {len(sizes)} layers", model._n_parameters(), model, wall, cpu,
               model.n_iter_, raw=sum(sizes) * (d * d + d) + model.n_paths_ - 1)
    return rows


def run_ablation(args):
    """Variants of one deep GMM on the same split (E-step, algorithm, init)."""
    Xtr = make_bsds300_patches(BSDS / "train", args.n_train, random_state=0)
    Xte = make_bsds300_patches(BSDS / "test", args.n_test, random_state=1)
    sizes = args.ablation_sizes
    variants = [
        ("hard EM, exhaustive E-step (default here)", {"path_search": "exhaustive"}),
        ("hard EM, coordinate-ascent heuristic", {"path_search": "heuristic"}),
        ("hard EM, factorized path weights", {"path_weights": "factorized"}),
        ("hard EM, init 'kmeans_outer'", {"init_params": "kmeans_outer"}),
        ("soft EM", {"algorithm": "soft_em"}),
    ]
    lines = [
        "# Deep GMM ablation on BSDS300 patches",
        "",
        f"Produced by `python benchmarks/bench_deep_gmm.py {' '.join(sys.argv[1:])}`; "
        f"n_components={sizes}, {args.n_train} train / {args.n_test} test patches (same "
        f"seeds as deep_gmm.md), max_iter={args.deep_max_iter}, dtype={args.dtype}, "
        f"prior_count={args.prior_count:g} (0: the paper's maximum likelihood), one thread "
        "on a shared machine.",
        "",
        "| variant | train | **test** | fit CPU s | iterations | last switch rate |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, params in variants:
        model = DeepGMMEstimator(sizes, random_state=0, max_iter=args.deep_max_iter,
                                 prior_count=args.prior_count, m_step_iter=args.m_step_iter,
                                 device="cpu", dtype=args.dtype, **params)
        wall, cpu = timed_fit(model, Xtr)
        switch = model.history_[-1].get("switch_rate", float("nan"))
        row = (f"| {name} | {model.score(Xtr):.2f} | **{model.score(Xte):.2f}** | "
               f"{cpu:.1f} | {model.n_iter_} | {switch:.4f} |")
        print(row, flush=True)
        lines.append(row)
    path = RESULTS.with_name("deep_gmm_ablation_quick.md" if args.quick
                             else "deep_gmm_ablation.md")
    path.write_text("\n".join(lines) + "\n")
    print(f"wrote {path}", flush=True)


def toy_figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rng = np.random.RandomState(0)
    # a "pinwheel": rotated, stretched copies of one elongated blob (a product of
    # variations that a deep GMM can factor: 5 rotations x 2 scales)
    base = rng.randn(3000, 2) * [1.0, 0.15] + [2.0, 0.0]
    angles = rng.randint(5, size=3000) * 2 * np.pi / 5
    scales = np.where(rng.rand(3000) < 0.5, 1.0, 1.8)
    rot = np.stack([np.cos(angles), -np.sin(angles), np.sin(angles), np.cos(angles)], 1)
    X = np.einsum("nij,nj->ni", rot.reshape(-1, 2, 2), base) * scales[:, None]
    deep = DeepGMMEstimator((2, 5), random_state=0, max_iter=100, device="cpu").fit(X)
    deep_params = deep._n_parameters()
    K = max(1, (deep_params + 1) // 6)  # a GMM with as many parameters
    gmm = SkGaussianMixture(K, random_state=0).fit(X)
    grid = np.linspace(-5, 5, 200)
    xx, yy = np.meshgrid(grid, grid)
    G = np.c_[xx.ravel(), yy.ravel()]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.2))
    axes[0].scatter(X[:, 0], X[:, 1], s=1, alpha=0.4)
    axes[0].set_title("data (3000 points)")
    for ax, model, title in [
        (axes[1], gmm, f"GMM K={K} ({gmm_parameters(K, 2)} params)\n"
                       f"train log-lik {gmm.score(X):.3f}"),
        (axes[2], deep, f"Deep GMM (2, 5): 10 paths ({deep_params} params)\n"
                        f"train log-lik {deep.score(X):.3f}"),
    ]:
        Z = model.score_samples(G).reshape(xx.shape)
        ax.contourf(xx, yy, np.exp(Z), levels=30, cmap="viridis")
        S = model.sample(600)[0]
        ax.scatter(S[:, 0], S[:, 1], s=1, c="w", alpha=0.6)
        ax.set_title(title)
    for ax in axes:
        ax.set_xlim(-5, 5)
        ax.set_ylim(-5, 5)
        ax.set_aspect("equal")
    fig.suptitle("Density (colour) and 600 samples (white) on a 2-D pinwheel")
    fig.tight_layout()
    FIGURE.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(FIGURE, dpi=90)
    print(f"wrote {FIGURE}", flush=True)
    return {"deep": deep.score(X), "gmm": gmm.score(X), "K": K, "deep_params": deep_params}


def write_table(rows, args, toy):
    lines = [
        "# Deep GMM on BSDS300 patches",
        "",
        "Produced by `python benchmarks/bench_deep_gmm.py "
        + " ".join(sys.argv[1:]) + "` (real run, numbers not edited"
        + (f"; rows read back from the run's JSON {Path(args.table_from).name}"
           if args.table_from else "") + ").",
        "",
        f"- data: 8x8 grey patches, dequantised, /256, patch mean removed, last pixel "
        f"dropped (63 dims); {args.n_train} training patches from the 200 BSDS300 train "
        f"images (seed 0), {args.n_test} test patches from the 100 test images (seed 1), "
        f"{args.n_test} held-out patches from the train images (seed 2)",
        f"- GMMs: max_iter={args.gmm_max_iter}, tol=1e-3, k-means init, reg_covar=1e-6; "
        f"Deep GMMs: hard EM, max_iter={args.deep_max_iter}, tol=1e-3, "
        f"m_step_iter={args.m_step_iter}, "
        f"init 'kmeans', reg_covar=1e-6, prior_count={args.prior_count:g} (0 "
        f"is the paper's maximum likelihood; the default is "
        f"{DeepGMMEstimator().prior_count:g}), dtype={args.dtype}",
        f"- machine: {platform.processor() or platform.machine()}, torch threads "
        f"{torch.get_num_threads()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}; "
        "the machine was shared with other jobs, so wall times are inflated — the "
        "CPU seconds of this process are the better cost measure",
        "- parameters: effective free parameters (for a deep GMM: all maps and biases "
        "less the rotation of the latent-side maps and the affine gauge between layers, "
        "plus path weights; equals the GMM count for one layer)",
        "- raw numbers: every entry of every map, bias and path weight (what the model "
        "stores; for a GMM the same as its parameter count)",
        "",
        "| model | parameters | raw numbers | train log-lik (nats) | held-out train-image "
        "patches | **test log-lik (nats)** | fit wall s | fit CPU s | iterations |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['parameters']} | {raw_parameters(r)} | {r['train']:.2f} | "
            f"{r['heldout']:.2f} | "
            f"**{r['test']:.2f}** | "
            f"{r['wall_s']:.1f} | {r['cpu_s']:.1f} | {r['n_iter']} |"
        )
    sk = [r for r in rows if r["kind"] == "sklearn GMM"]
    deep = [r for r in rows if r["kind"].startswith("Deep")]
    if sk and deep:
        best_deep = max(deep, key=lambda r: r["test"])
        eligible = [r for r in sk if r["parameters"] >= best_deep["parameters"]]
        best_sk = max(sk, key=lambda r: r["test"])
        lines += ["", "## Summary", ""]
        lines.append(
            f"- best Deep GMM: {best_deep['model']}: test {best_deep['test']:.2f} nats with "
            f"{best_deep['parameters']} parameters"
        )
        lines.append(
            f"- best sklearn GMM: {best_sk['model']}: test {best_sk['test']:.2f} nats with "
            f"{best_sk['parameters']} parameters (difference deep - GMM: "
            f"{best_deep['test'] - best_sk['test']:+.2f} nats)"
        )
        if eligible:
            best_el = max(eligible, key=lambda r: r["test"])
            lines.append(
                f"- best sklearn GMM with at least as many parameters as that Deep GMM: "
                f"{best_el['model']}: {best_el['test']:.2f} nats (deep - GMM "
                f"{best_deep['test'] - best_el['test']:+.2f} nats)"
            )
        raw_eligible = [r for r in sk if r["parameters"] >= raw_parameters(best_deep)]
        if not raw_eligible:
            largest = max(sk, key=lambda r: r["parameters"])
            note = (
                f"- counted by raw numbers ({raw_parameters(best_deep)}), the best Deep GMM "
                "is larger than every GMM of the table; it beats "
                + ("all of them" if best_deep["test"] > best_sk["test"] else "not all of them")
            )
            if largest["test"] < best_sk["test"]:
                note += (f"; the GMMs already lose test log-likelihood from "
                         f"{best_sk['model']} to {largest['model']}")
            lines.append(note)
        lines.append(
            "- paper (500k training patches, full scale): GMM 153.7, Deep GMM 3 layers "
            "156.2 nats"
        )
    if toy:
        lines += [
            "",
            "## 2-D toy",
            "",
            f"![toy](../../doc/images/{FIGURE.name})",
            "",
            f"Pinwheel (3000 points): Deep GMM (2, 5) with {toy['deep_params']} parameters: "
            f"train log-lik {toy['deep']:.3f}; GMM K={toy['K']} (about as many parameters): "
            f"{toy['gmm']:.3f}.",
        ]
    # a smoke run never overwrites the real results
    path = RESULTS.with_name("deep_gmm_quick.md") if args.quick else RESULTS
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    print(f"wrote {path}", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small smoke run")
    parser.add_argument("--n-train", type=int, default=30000)
    parser.add_argument("--n-test", type=int, default=10000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--prior-count", type=float, default=0.0,
                        help="DeepGMMEstimator prior_count (default 0: the paper's maximum "
                             f"likelihood; the estimator's default is "
                             f"{DeepGMMEstimator().prior_count:g})")
    parser.add_argument("--m-step-iter", type=int, default=50,
                        help="DeepGMMEstimator m_step_iter (default 50, the setting of the "
                             "recorded runs; the estimator's default is "
                             f"{DeepGMMEstimator().m_step_iter})")
    parser.add_argument("--no-figure", action="store_true")
    parser.add_argument("--ablation", action="store_true",
                        help="compare E-step/algorithm/init variants of one deep GMM")
    parser.add_argument("--table-from", default=None,
                        help="rebuild the table from a JSON file of an earlier run")
    parser.add_argument("--partial", default=None,
                        help="write the rows to this JSON file after every model")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.sklearn_k = [5, 10, 20, 30]
    args.ours_k = [10]
    args.deep = [(2, 5), (2, 10), (2, 15), (2, 2, 5), (2, 2, 10), (2, 2, 15), (4, 2, 10)]
    args.gmm_max_iter, args.deep_max_iter = 100, 40
    args.ablation_sizes = (2, 2, 10)
    if args.quick:
        args.n_train, args.n_test = 3000, 2000
        args.sklearn_k, args.ours_k, args.deep = [3], [3], [(2, 2), (2, 2, 2)]
        args.ablation_sizes = (2, 2)
        args.gmm_max_iter, args.deep_max_iter = 20, 5
    if args.ablation:
        run_ablation(args)
        return
    toy = None if args.no_figure else toy_figure()
    if args.table_from:
        write_table(json.loads(Path(args.table_from).read_text()), args, toy)
        return
    if not (BSDS / "train").is_dir():
        print(f"BSDS300 images not found at {BSDS}; only the toy figure was made.")
        return
    rows = run_bsds(args)
    write_table(rows, args, toy)


if __name__ == "__main__":
    main()
