"""Explanations per minute on this CPU: llama.cpp's server (xllamacpp, the packaged SmolLM2
GGUF, 4 parallel slots; `LlamaCppClient`, the offline default explainer), against the in-process transformers client
(`HFClient`, the same model, batched), on the same features. One feature costs what interpret
asks of it: one explanation prompt and detection's prompts (10 contexts, 5 a prompt) for the
explanation and for its control.

Run alone: `python -m benchmarks.bench_explainers [N_FEATURES]`."""

from __future__ import annotations

import json
import random
import sys
import time

from benchmarks.common import Row

TEXT = ("the capital of France is Paris and the river Seine runs through the city while the "
        "Moon landing of 1969 was watched by millions and water boils at one hundred degrees "
        "cats sat on mats and dogs ran in the park near the old bakery on Main Street")
WORDS = TEXT.split()


def features(n: int, seed: int = 0):
    from saectl.explain import Example

    rng = random.Random(seed)
    out = []
    for f in range(n):
        hot = WORDS[(7 * f) % len(WORDS)]

        def ctx(on: bool, hot=hot):
            toks = [" " + rng.choice(WORDS) for _ in range(12)]
            acts = [0.0] * 12
            if on:
                toks[8], acts[8] = " " + hot, rng.uniform(2, 5)
            return Example(toks, acts)

        out.append(([ctx(True) for _ in range(8)], [ctx(True) for _ in range(5)],
                    [ctx(False) for _ in range(5)]))
    return out


def rate(client, feats) -> tuple[float, list[str]]:
    from saectl.explain import detection_score, explain

    t0 = time.perf_counter()
    texts = explain(client, [shown for shown, _, _ in feats])
    for i, (_, pos, neg) in enumerate(feats):
        detection_score(client, texts[i] or "x", pos, neg, seed=i,
                        control=texts[(i + 1) % len(texts)] or "y")
    return 60 * len(feats) / (time.perf_counter() - t0), texts


def measure(n: int = 8) -> dict:
    from saectl.explain import HFClient
    from saectl.llamacpp import LlamaCppClient, packaged_gguf

    feats = features(n)
    client = LlamaCppClient(packaged_gguf())  # the offline default, as interpret runs it
    t0 = time.perf_counter()
    client.complete([[{"role": "user", "content": "hi"}]], 1)  # starts the server
    start_llama = time.perf_counter() - t0
    llama, llama_texts = rate(client, feats)
    client.close()
    hf_client = HFClient(None)
    t0 = time.perf_counter()
    hf_client._load()
    start_hf = time.perf_counter() - t0
    hf, hf_texts = rate(hf_client, feats)
    return {"features": n, "llamacpp_per_min": llama, "transformers_per_min": hf,
            "llamacpp_start_s": start_llama, "transformers_load_s": start_hf,
            "llamacpp_examples": llama_texts[:3], "transformers_examples": hf_texts[:3]}


def run() -> list[Row]:
    try:
        import xllamacpp  # noqa: F401
    except ImportError:
        return []
    m = measure()
    return [Row("explanations/min: llama.cpp server vs in-process transformers (SmolLM2)",
                m["llamacpp_per_min"], m["transformers_per_min"], "features/min", "",
                note=f"{m['features']} features, 1 explanation + 4 detection prompts each")]


if __name__ == "__main__":
    print(json.dumps(measure(int(sys.argv[1]) if len(sys.argv) > 1 else 8), indent=1))
