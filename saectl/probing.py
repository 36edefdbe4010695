"""k-sparse probing, as SAEBench defines it (`sae_bench/evals/sparse_probing/`, after Gurnee et
al., "Finding Neurons in a Haystack", 2023).

Each text is one vector: its SAE latents (or model activations) averaged over its tokens, BOS
left out. For every class, a one-vs-rest task: the class's texts against as many texts drawn
evenly from the other classes (SAEBench's `prepare_probe_data`), in train and in test. On the
train texts the k latents whose class means differ most, |mean₊ − mean₋|, are chosen
(`get_top_k_mean_diff_mask`), a logistic regression is fitted on those k, and its accuracy on
the held-out test texts is the score. Beside it, as SAEBench reports them: the same probe on
all the model's activations and on all latents, the model's own top-k dimensions, and, as a
control, k latents drawn at random (a probe on random latents should sit near chance, 0.5).

The logistic regression is SAEBench's (scikit-learn's `LogisticRegression(C=1)`: the summed
log-loss plus ½‖w‖², intercept unpenalised), fitted here in torch with L-BFGS on features
standardised by their train mean and deviation. scikit-learn is only an optional dependency of
saectl, and torch is already loaded; standardising keeps L-BFGS well conditioned where mean
activations span several orders of magnitude (massive activations), and it makes the penalty
the same for every latent whatever its scale. tests/test_eval.py checks it against
scikit-learn on the same standardised features.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from saectl.threads import one_thread

K_VALUES = (1, 2, 5, 10, 20, 50)
C = 1.0  # inverse regularisation strength, scikit-learn's default, as SAEBench uses it
MAX_ITER = 100


@dataclass(frozen=True)
class Split:
    """Pooled features of every text and, per class, which texts are train and which test."""

    latents: torch.Tensor
    """[n_texts, d_sae] mean SAE latents."""
    acts: torch.Tensor
    """[n_texts, d] mean model activations."""
    labels: np.ndarray
    """[n_texts] class names."""
    train: np.ndarray
    """[n_texts] bool: in the probes' train set."""


def mean_pool(values: torch.Tensor, text_index: torch.Tensor, n_texts: int) -> torch.Tensor:
    """[n_texts, d]: the mean of the rows of `values` [T, d] that belong to each text."""
    out = torch.zeros(n_texts, values.shape[1], dtype=torch.float64, device=values.device)
    out.index_add_(0, text_index.to(values.device), values.double())
    counts = torch.bincount(text_index, minlength=n_texts).clamp_min(1).to(out)
    return (out / counts[:, None]).float()


def top_k_mean_diff(X: torch.Tensor, y: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k columns of X with the largest |mean over y=1 − mean over y=0|."""
    diff = (X[y == 1].double().mean(0) - X[y == 0].double().mean(0)).abs()
    return torch.argsort(diff, descending=True, stable=True)[:k]


def fit_logistic(X: torch.Tensor, y: torch.Tensor, c: float = C, max_iter: int = MAX_ITER):
    """A predictor X → {0, 1}: L2 logistic regression (module docstring) on standardised X."""
    X = X.double().cpu()
    mu, sd = X.mean(0), X.std(0, unbiased=False)
    sd = torch.where(sd > 1e-12, sd, torch.ones_like(sd))
    Z = (X - mu) / sd
    t = y.double().cpu()
    w = torch.zeros(X.shape[1] + 1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], lr=1, max_iter=max_iter, tolerance_grad=1e-9,
                            tolerance_change=1e-9, history_size=20,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        logits = Z @ w[:-1] + w[-1]
        loss = c * torch.nn.functional.binary_cross_entropy_with_logits(
            logits, t, reduction="sum") + 0.5 * w[:-1].square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    w = w.detach()

    def predict(Xt: torch.Tensor) -> torch.Tensor:
        return ((((Xt.double().cpu() - mu) / sd) @ w[:-1] + w[-1]) > 0).long()
    return predict


def accuracy(Xtr, ytr, Xte, yte) -> float:
    """Test accuracy of a probe fitted on (Xtr, ytr)."""
    return float((fit_logistic(Xtr, ytr)(Xte) == yte.cpu()).double().mean())


def one_vs_rest(labels: np.ndarray, cls: str, rng: np.random.Generator) -> tuple[np.ndarray,
                                                                                  np.ndarray]:
    """(rows, 0/1 targets): every text of `cls` and as many others, drawn evenly from the other
    classes (⌈n₊ / classes⌉ each, then trimmed to n₊), shuffled: SAEBench's prepare_probe_data."""
    pos = np.flatnonzero(labels == cls)
    others = [c for c in sorted(set(labels.tolist())) if c != cls]
    per = math.ceil(len(pos) / len(others))
    neg = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:per] for c in others])
    neg = rng.permutation(neg)[: len(pos)]
    rows = np.concatenate([pos, neg])
    target = np.concatenate([np.ones(len(pos), np.int64), np.zeros(len(neg), np.int64)])
    order = rng.permutation(len(rows))
    return rows[order], target[order]


def task_rows(split: Split, seed: int = 0):
    """Each class's one-vs-rest task in class order, as (class, (train rows, targets), (test
    rows, targets), rng): rows index the split's texts, targets are 0/1 (numpy), and rng, seeded
    by `seed` and the task's number, has drawn the rows and goes on to draw the random latents."""
    for t, cls in enumerate(sorted(set(split.labels.tolist()))):
        rng = np.random.default_rng([seed, t])
        parts = []
        for where in (split.train, ~split.train):
            idx = np.flatnonzero(where)
            rows, target = one_vs_rest(split.labels[idx], cls, rng)
            parts.append((idx[rows], target))
        yield cls, parts[0], parts[1], rng


def sparse_probing(split: Split, ks=K_VALUES, seed: int = 0) -> dict:
    """Test accuracy per task and, averaged over the tasks, per k (module docstring). Keys
    of the per-k figures are strings, as they read back from a manifest. The fits run on one
    torch thread: L-BFGS on these sizes is many small kernels, measured 13 s on one thread
    against 113 s on two under load (README, baselines)."""
    with one_thread():
        return _sparse_probing(split, ks, seed)


def _sparse_probing(split: Split, ks, seed: int) -> dict:
    d_sae = split.latents.shape[1]
    ks = [k for k in ks if k <= d_sae]
    tasks = {}
    for cls, (tr, ytr), (te, yte), rng in task_rows(split, seed):
        ytr, yte = torch.from_numpy(ytr), torch.from_numpy(yte)
        Ltr, Lte, Atr, Ate = (split.latents[tr], split.latents[te], split.acts[tr],
                              split.acts[te])
        r = {"n_train": len(tr), "n_test": len(te),
             "model_full": accuracy(Atr, ytr, Ate, yte),
             "sae_full": accuracy(Ltr, ytr, Lte, yte),
             "sae_top_k": {}, "model_top_k": {}, "random_k": {}, "latents": {}}
        for k in ks:
            top = top_k_mean_diff(Ltr, ytr, k)
            r["latents"][str(k)] = top.tolist()
            r["sae_top_k"][str(k)] = accuracy(Ltr[:, top], ytr, Lte[:, top], yte)
            if k <= Atr.shape[1]:
                dims = top_k_mean_diff(Atr, ytr, k)
                r["model_top_k"][str(k)] = accuracy(Atr[:, dims], ytr, Ate[:, dims], yte)
            rand = torch.from_numpy(rng.choice(d_sae, size=k, replace=False))
            r["random_k"][str(k)] = accuracy(Ltr[:, rand], ytr, Lte[:, rand], yte)
        tasks[cls] = r
    mean = {key: float(np.mean([r[key] for r in tasks.values()]))
            for key in ("model_full", "sae_full")}
    for key in ("sae_top_k", "model_top_k", "random_k"):
        mean[key] = {str(k): float(np.mean([r[key][str(k)] for r in tasks.values()
                                            if str(k) in r[key]]))
                     for k in ks if any(str(k) in r[key] for r in tasks.values())}
    return {"k": ks, **mean, "tasks": tasks}
