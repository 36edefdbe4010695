"""Explaining and scoring a sample of features (the field's "auto-interpretability", after
EleutherAI's delphi): for each chosen feature, the explainer reads its top contexts and one per
quantile (`saectl.examples`) and writes an explanation; the scorers rate it, each beside a
control (another feature's explanation on the same contexts): detection (does the feature
fire in held-out activating, and not in non-activating, contexts) and, when asked, fuzzing
(are the marked tokens of held-out activating contexts the ones it fires on;
`saectl.fuzzing`). The prompts, clients and the response cache are `saectl.explain`'s; this
module chooses the features and runs the loop.
"""

from __future__ import annotations

import numpy as np

from saectl import faults
from saectl.console import info, progress
from saectl.examples import Kind, Windows, cut
from saectl.explain import ExplainerError, ResponseCache, detection_score, explain
from saectl.fuzzing import fuzz_score

EXPLAINER_TOP = 6  # top contexts shown to the explainer, beside one per quantile
BATCH = 16  # features per explanation batch (one progress step, one fault point)
SCORERS = ("detection", "fuzzing")
"""The scorers, in the order they run. Detection's figures keep their plain names in
`explanations.json` (balanced_accuracy, ...); fuzzing's carry the prefix `fuzz_`."""


def choose(fired: np.ndarray, windows: Windows, explain_max: int, seed: int) -> list[int]:
    """A seeded sample of at most `explain_max` live slots that have held-out examples."""
    live = [j for j in np.flatnonzero(fired > 0).tolist() if windows.has(j, Kind.POSITIVE)]
    if not live:
        return []
    rng = np.random.default_rng(seed)
    return sorted(rng.choice(live, min(len(live), explain_max), replace=False).tolist())


def explain_features(client, windows: Windows, chosen: list[int], strings, *,
                     prompt_window: int, seed: int, cache: ResponseCache,
                     scorers: tuple[str, ...] = ("detection",)
                     ) -> tuple[dict[int, dict], ExplainerError | None]:
    """{slot: {"explanation", and each scorer's figures}} for `chosen`, in batches; on the
    explainer's error, what was done so far and the error (returned, not raised, so the caller
    can still write what it has; a feature counts only once all its scorers answered)."""
    explained: dict[int, dict] = {}
    info(f"interpret: explaining {len(chosen)} features with {client_name(client)}")
    with progress("interpret explain", len(chosen), "features") as bar:
        for b in range(0, len(chosen), BATCH):
            part = chosen[b:b + BATCH]
            shown = [[cut(ex, prompt_window) for _, ex in
                      windows.examples(j, Kind.TOP, strings)[:EXPLAINER_TOP]]
                     + [cut(ex, prompt_window) for ex in windows.one_per_quantile(j, strings)]
                     for j in part]
            try:
                texts = explain(client, shown, cache)
                for i, (j, text) in enumerate(zip(part, texts)):
                    entry = {"explanation": text}
                    if text:
                        ctrl = control(texts, i) or control(
                            [e["explanation"] for e in explained.values()], -1)
                        pos = [cut(ex, prompt_window)
                               for _, ex in windows.examples(j, Kind.POSITIVE, strings)]
                        if "detection" in scorers:
                            neg = [cut(ex, prompt_window)
                                   for _, ex in windows.examples(j, Kind.NEGATIVE, strings)]
                            entry.update(detection_score(client, text, pos, neg, seed=seed + j,
                                                         control=ctrl, cache=cache))
                        if "fuzzing" in scorers:
                            fuzz = fuzz_score(client, text, pos, seed=seed + j, control=ctrl,
                                              cache=cache)
                            entry.update({f"fuzz_{k}": v for k, v in fuzz.items()})
                    explained[j] = entry
            except ExplainerError as e:
                return explained, e
            bar.advance(len(part))
            faults.point("interpret.explained")
    return explained, None


def control(texts: list[str], i: int) -> str | None:
    """Another feature's explanation: the next non-empty one after position i, wrapping."""
    n = len(texts)
    for step in range(1, n + 1):
        t = texts[(i + step) % n] if n else ""
        if t and (i < 0 or (i + step) % n != i):
            return t
    return None


def client_name(client) -> str:
    ident = client.identity
    return ident.get("endpoint", "") + (" " if "endpoint" in ident else "") + str(ident.get("model"))
