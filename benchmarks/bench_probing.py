"""The eval stage's k-sparse probing (saectl/probing.py) against SAEBench's sparse probing on
the same latents (issue 22.5).

SAEBench (`sae_bench/evals/sparse_probing/`) does not install here, so the baseline is its
definition written plainly with scikit-learn, as a user without saectl would: per class a
one-vs-rest task (the same rows: saectl.probing.task_rows, SAEBench's prepare_probe_data), the
k latents whose class means differ most on the train texts (NumPy), and scikit-learn's
`LogisticRegression(C=1)` on standardised features (`StandardScaler`), max_iter 1000; the same
probes saectl fits: all activations, all latents, the SAE's and the model's top k, k random.

Data: synthetic pooled features of the eval stage's default size, 1,100 texts in 11 classes
(80% train), SAE latents at 8x SmolLM2's width (4,608; mostly zero, a few latents per class
shifted) and model activations (576). Reported: seconds for every task and k (k = 1 to 50),
each side's median of alternated runs, and how far the accuracies differ (mean and largest
absolute difference over the tasks and k). No goal was set: the row reports.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from benchmarks.common import Row, alternate

N_TEXTS, N_CLASSES, D_IN, D_SAE = 1100, 11, 576, 4608


def synthetic_split():
    from saectl.probing import Split

    rng = np.random.default_rng(0)
    labels = np.array([f"c{i % N_CLASSES}" for i in range(N_TEXTS)])
    cls = np.array([int(s[1:]) for s in labels])
    lat = rng.exponential(0.5, (N_TEXTS, D_SAE)) * (rng.random((N_TEXTS, D_SAE)) < 0.05)
    for c in range(N_CLASSES):  # a few latents per class fire more on its texts
        lat[np.ix_(cls == c, rng.choice(D_SAE, 8, replace=False))] += rng.exponential(
            1.0, ((cls == c).sum(), 8))
    acts = rng.normal(size=(N_TEXTS, D_IN)) + 0.3 * np.eye(N_CLASSES, D_IN)[cls]
    train = rng.random(N_TEXTS) < 0.8
    return Split(torch.from_numpy(lat).float(), torch.from_numpy(acts).float(), labels, train)


def sklearn_probing(split, ks, seed: int = 0) -> dict:
    """SAEBench's sparse probing by its definition (module docstring): {task: {probe: acc}}."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from saectl.probing import task_rows

    def acc(Xtr, ytr, Xte, yte):
        probe = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=1000))
        return float((probe.fit(Xtr, ytr).predict(Xte) == yte).mean())

    def top(X, y, k):
        diff = np.abs(X[y == 1].mean(0, dtype=np.float64) - X[y == 0].mean(0, dtype=np.float64))
        return np.argsort(-diff, kind="stable")[:k]

    L, A = split.latents.numpy(), split.acts.numpy()
    out = {}
    for cls, (tr, ytr), (te, yte), rng in task_rows(split, seed):
        r = {"model_full": acc(A[tr], ytr, A[te], yte), "sae_full": acc(L[tr], ytr, L[te], yte)}
        for k in ks:
            f = top(L[tr], ytr, k)
            r[f"sae_top_k/{k}"] = acc(L[tr][:, f], ytr, L[te][:, f], yte)
            dims = top(A[tr], ytr, k)
            r[f"model_top_k/{k}"] = acc(A[tr][:, dims], ytr, A[te][:, dims], yte)
            rand = rng.choice(L.shape[1], size=k, replace=False)
            r[f"random_k/{k}"] = acc(L[tr][:, rand], ytr, L[te][:, rand], yte)
        out[cls] = r
    return out


def run() -> list[Row]:
    from saectl.probing import K_VALUES, sparse_probing

    split = synthetic_split()
    got = {}

    def ours():
        got["saectl"] = sparse_probing(split, K_VALUES)

    def theirs():
        got["sklearn"] = sklearn_probing(split, K_VALUES)

    t0 = time.perf_counter()
    t = alternate({"saectl": ours, "sklearn": theirs}, reps=3, warmup=1)
    diffs = []
    for cls, r in got["saectl"]["tasks"].items():
        s = got["sklearn"][cls]
        diffs += [abs(r["model_full"] - s["model_full"]), abs(r["sae_full"] - s["sae_full"])]
        for key in ("sae_top_k", "model_top_k", "random_k"):
            diffs += [abs(v - s[f"{key}/{k}"]) for k, v in r[key].items()]
    n_probes = len(diffs)
    return [Row(f"k-sparse probing seconds, {N_CLASSES} tasks x k {list(K_VALUES)} "
                f"({N_TEXTS:,} texts, {D_SAE:,} latents)", t["saectl"], t["sklearn"], "s", "",
                note=f"saectl {t['saectl']:.1f}s against SAEBench's definition in scikit-learn "
                     f"{t['sklearn']:.1f}s ({t['sklearn'] / t['saectl']:.2f}x as long) for "
                     f"the same {n_probes} probes; accuracy difference mean "
                     f"{np.mean(diffs):.4f}, largest {np.max(diffs):.4f}; "
                     f"suite {time.perf_counter() - t0:.0f}s")]


if __name__ == "__main__":
    for r in run():
        print(r)
