"""Fuzzing: does an explanation say *which tokens* a feature fires on? After EleutherAI's
delphi (`scorers/classifier/fuzz.py`, `sample.py`, `prompts/fuzz_prompt.py`).

The scorer sees the explanation and held-out activating contexts whose tokens are marked
between `<<` and `>>`: in some, the activating tokens (above 0.3 of the context's maximum, as
the explainer was shown them); in others, tokens where the feature does not fire. For each it
answers 1 (the marks fit the explanation) or 0, and the score is balanced accuracy, beside the
same control as detection (another feature's explanation on the same contexts).

Where delphi's default marks random tokens of *non-activating* contexts (which a scorer can
reject by the context alone, as in detection), every context here activates: each held-out
context is shown twice, once marked correctly and once mis-marked (delphi's `fuzz_type="active"`),
never twice in one prompt. A mis-marking is the correct marking shifted to a random place where
no token activates, so it has the same number of marks in the same runs and only their place
tells it apart; where no such place exists, as many tokens below the threshold are marked at
random (delphi's `sample.py`), and a context with none is shown only correctly marked.
The prompt wording and few-shot examples are our own.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from .explain import (
    EXAMPLES_PER_PROMPT,
    Client,
    Example,
    ResponseCache,
    active,
    classify,
    mark,
)

FUZZ_SYSTEM = """You are a careful linguistics researcher. You will be given a description \
of a feature of text, such as "male pronouns" or "text about cooking", and several numbered \
text examples in which some tokens are marked between << and >>. In some examples the marks \
are on the tokens the description fits; in others they were put on the wrong tokens.
Answer with a Python list with one entry per example, in order: 1 if every marked token fits \
the description, 0 if the marks are misplaced. Answer with the list only."""

_FUZZ_SHOTS = [
    (("Feature explanation: Words for family members.\n\nText examples:\n\n"
      "Example 1: my<< brother>> and I went fishing\n"
      "Example 2: she called her grandmother<< every>> week\n"
      "Example 3: we met my<< aunt>> at the station\n"),
     "[1, 0, 1]"),
    (("Feature explanation: The word \"of\" before a capitalised name.\n\nText examples:\n\n"
      "Example 1: the Bank of<< England>> raised rates\n"
      "Example 2: the University<< of>> Oxford admitted him\n"
      "Example 3: a<< cup>> of tea\n"),
     "[0, 1, 0]"),
]


def fuzz_prompt(explanation: str, marked: Sequence[str]) -> list[dict]:
    """Chat messages asking which of the `marked` texts (numbered from 1) have their marks on
    the tokens that `explanation` describes."""
    body = "\n".join(f"Example {i}: {text}" for i, text in enumerate(marked, 1))
    messages = [{"role": "system", "content": FUZZ_SYSTEM}]
    for user, answer in _FUZZ_SHOTS:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    return messages + [{"role": "user", "content":
                        f"Feature explanation: {explanation}\n\nText examples:\n\n{body}\n"}]


def mismark(ex: Example, rng: random.Random, threshold: float = 0.3) -> str | None:
    """`ex` with its marks misplaced: the correct marking shifted to a random place where it
    covers no activating token, else as many tokens below the threshold at random; None when
    every token activates (nothing to mis-mark)."""
    on = active(ex, threshold)
    hot = [i for i, o in enumerate(on) if o]
    cold = [i for i, o in enumerate(on) if not o]
    if not hot or not cold:
        return None
    shifts = [s for s in range(-hot[0], len(on) - hot[-1]) if s and not any(on[i + s] for i in hot)]
    if shifts:
        s = rng.choice(shifts)
        chosen = {i + s for i in hot}
    else:
        chosen = set(rng.sample(cold, min(len(hot), len(cold))))
    return mark(ex.tokens, [i in chosen for i in range(len(on))])


def first_fit(items: list[tuple[int, str, bool]], per_prompt: int) -> list[list[tuple[str, bool]]]:
    """(context number, shown text, truth) items into prompts of `per_prompt`, in order, each
    into the first prompt that does not yet show its context: the two markings of one context
    never meet in a prompt, where comparing them would give the answer away."""
    prompts: list[list[tuple[int, str, bool]]] = []
    for item in items:
        for p in prompts:
            if len(p) < per_prompt and all(c != item[0] for c, _, _ in p):
                p.append(item)
                break
        else:
            prompts.append([item])
    return [[(text, truth) for _, text, truth in p] for p in prompts]


def fuzz_score(client: Client, explanation: str, positives: Sequence[Example], seed: int = 0,
               control: str | None = None, cache: ResponseCache | None = None,
               per_prompt: int = EXAMPLES_PER_PROMPT, threshold: float = 0.3) -> dict:
    """Fuzzing score of `explanation` on held-out activating contexts (`positives`), each shown
    marked correctly and mis-marked (`mismark`), shuffled by `seed`, `per_prompt` to a prompt;
    with `control`, the same prompts are asked with it too, all as one batch. Returns
    detection_score's figures: balanced_accuracy, control_balanced_accuracy, n (marked texts
    shown) and invalid_answers."""
    rng = random.Random(seed)
    items = []
    for c, ex in enumerate(positives):
        on = active(ex, threshold)
        if not any(on):  # nothing to mark (a context cut away from its activation)
            continue
        items.append((c, mark(ex.tokens, on), True))
        wrong = mismark(ex, rng, threshold)
        if wrong is not None:
            items.append((c, wrong, False))
    rng.shuffle(items)
    return classify(client, cache, fuzz_prompt, explanation, control,
                    first_fit(items, per_prompt), per_prompt)
