"""Natural-language explanations of SAE features, and their detection scores.

Follows EleutherAI's delphi (Paulo et al. 2024, "Automatically Interpreting Millions of
Features in Large Language Models"): the explainer is shown activating contexts with the
activating tokens between `<<` and `>>` (delphi `explainers/explainer.py:_highlight`, relative
threshold 0.3 of the context's maximum) and answers with a last line `[EXPLANATION]: ...`
(`explainers/default/prompts.py`). Detection (`scorers/classifier/detection.py` and
`prompts/detection_prompt.py`) shows the explanation and a shuffled mix of held-out activating
and non-activating contexts, without markers, a few per prompt, and asks for a Python list of
0/1; the score is balanced accuracy. As delphi's `random_explanation_loader`, a control scores
another feature's explanation on the same contexts, so a score can be read against chance
*for this scorer model*. The prompt wording and few-shot examples here are our own.
`classify` is the part detection shares with fuzzing (`saectl/fuzzing.py`).

Clients share one method, `complete(batch, max_tokens) -> list[str]` (greedy, so a re-run gives
the same answers): `HFClient` runs a local Hugging Face instruct model, `OpenAIClient` any
OpenAI-compatible endpoint (vLLM, llama.cpp, `transformers serve`, a hosted API; in
`saectl/endpoint.py`, with the rules for the user's key).
`ResponseCache` keeps answers in one JSON file, so a re-run asks nothing; the interpret stage
keeps them in the store apart from any artifact (`saectl/explanations_cache.py`), so another
explainer or scorer never re-runs the scan and the same question is never asked twice.
"""

from __future__ import annotations

import random
import re
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from .endpoint import ExplainerError, OpenAIClient, redact  # noqa: F401 (explain.OpenAIClient)
from .errors import ConfigError

# The answer caches live beside; explain.ResponseCache and explain.cached_complete stay valid.
from .explanations_cache import ResponseCache, cached_complete

EXPLANATION_MAX_TOKENS = 64
DETECTION_MAX_TOKENS = 32
EXAMPLES_PER_PROMPT = 5  # delphi's n_examples_shown: more per prompt leaks and confuses the format


@dataclass
class Example:
    """One context window and the feature's activation at each of its tokens."""

    tokens: list[str]
    """Decoded token strings; joined they give the context's text."""
    acts: list[float]
    """The feature's activation at each token (same length as `tokens`)."""

    def __post_init__(self):
        if len(self.tokens) != len(self.acts):
            raise ValueError(f"Example has {len(self.tokens)} tokens but {len(self.acts)} "
                             "activations; give one activation per token")

    @property
    def text(self) -> str:
        # One context per line in the prompts, so newlines inside it are shown escaped.
        return "".join(self.tokens).replace("\n", "\\n")


def active(ex: Example, threshold: float = 0.3) -> list[bool]:
    """Which tokens activate: those above `threshold` times the context's maximum (delphi's
    relative threshold), so weak contexts are marked as clearly as strong ones."""
    top = max(ex.acts, default=0.0)
    return [top > 0 and act > threshold * top for act in ex.acts]


def mark(tokens: Sequence[str], on: Sequence[bool]) -> str:
    """The tokens joined, each run of `on` tokens as `<<run>>`, newlines shown escaped."""
    out, inside = [], False
    for tok, o in zip(tokens, on):
        if o != inside:
            out.append("<<" if o else ">>")
            inside = o
        out.append(tok)
    if inside:
        out.append(">>")
    return "".join(out).replace("\n", "\\n")


def format_example(ex: Example, threshold: float = 0.3) -> str:
    """The context's text with each run of activating tokens (`active`) as `<<run>>`."""
    return mark(ex.tokens, active(ex, threshold))


EXPLAIN_SYSTEM = """You study patterns in text. You will see text examples where a hidden \
feature of a language model is active on the tokens between << and >>.
- Describe in one short sentence what the marked tokens, and the text around them, have in common.
- Be specific: name the kind of word, topic or context. Do not mention the << >> markers.
- Do not list several alternatives.
- End your answer with one line: [EXPLANATION]: <your sentence>"""

# Few-shot pairs teach the answer format; small models copy it far more reliably than they
# follow instructions (delphi keeps three; two keep the prompt short for CPU models).
_EXPLAIN_SHOTS = [
    (("Example 1: she walked to the <<bakery>> on Main Street\n"
      "Example 2: bread from the <<bakery>> was still warm\n"
      "Example 3: the old <<mill>> ground flour for the town"),
     "[EXPLANATION]: Places where bread or flour is made."),
    (("Example 1: it was much tall<<er>> than the house\n"
      "Example 2: the river is wid<<er>> here\n"
      "Example 3: a small<<er>> box fits inside"),
     "[EXPLANATION]: The \"er\" ending of comparative adjectives."),
]


def explanation_prompt(examples: Sequence[Example], threshold: float = 0.3) -> list[dict]:
    """Chat messages asking for a one-sentence explanation of the marked examples (top and
    quantile examples, in the order given)."""
    body = "\n".join(f"Example {i}: {format_example(ex, threshold)}"
                     for i, ex in enumerate(examples, 1))
    messages = [{"role": "system", "content": EXPLAIN_SYSTEM}]
    for user, answer in _EXPLAIN_SHOTS:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    return messages + [{"role": "user", "content": body}]


_MARKER = re.compile(r"\[?\s*explanation\s*\]?\s*[:\-]\s*", re.IGNORECASE)
_PREAMBLE = re.compile(r"^(sure|okay|ok|certainly|here('s| is| are)|of course)\b", re.IGNORECASE)


def parse_explanation(text: str) -> str:
    """The explanation in an answer: the text after the last `[EXPLANATION]:` (or
    `Explanation:`), else the first line that is not a preamble; cut to its first sentence,
    quotes and markdown removed. "" when the answer holds nothing usable."""
    found = list(_MARKER.finditer(text))
    if found:
        text = text[found[-1].end():]
        lines = [ln for ln in text.splitlines() if ln.strip()]
    else:
        lines = [ln for ln in text.splitlines() if ln.strip() and not _PREAMBLE.match(ln.strip())
                 and not ln.strip().endswith(":")]
    if not lines:
        return ""
    line = lines[0].replace("<<", "").replace(">>", "")
    line = re.sub(r"[*_`#]+", "", line).strip().lstrip("-•> ").strip().strip("\"'").strip()
    # First sentence only: a stop, a space and a capital (keeps "3.5", "e.g. Paris").
    return re.split(r"(?<=[.!?])(?<!e\.g\.)(?<!i\.e\.)(?<!vs\.)\s+(?=[A-Z])", line,
                    maxsplit=1)[0].strip()[:300]


DETECT_SYSTEM = """You are a careful linguistics researcher. You will be given a description \
of a feature of text, such as "male pronouns" or "text about cooking", and several numbered \
text examples. Decide for each example whether the feature is present in it.
Answer with a Python list with one entry per example, in order: 1 if the example has the \
feature, 0 if it does not. Answer with the list only."""

_DETECT_SHOTS = [
    (("Feature explanation: Words for family members.\n\nText examples:\n\n"
      "Example 1: my brother and I went fishing\n"
      "Example 2: the stock market fell on Monday\n"
      "Example 3: she called her grandmother every week\n"),
     "[1, 0, 1]"),
    (("Feature explanation: The word \"of\" before a capitalised name.\n\nText examples:\n\n"
      "Example 1: we walked along the beach\n"
      "Example 2: the University of Oxford admitted him\n"
      "Example 3: a cup of tea\n"),
     "[0, 1, 0]"),
]


def detection_prompt(explanation: str, contexts: Sequence[Example | str]) -> list[dict]:
    """Chat messages asking which of `contexts` (shown as plain text, no markers, numbered
    from 1) have the feature described by `explanation`."""
    body = "\n".join(f"Example {i}: {c.text if isinstance(c, Example) else c}"
                     for i, c in enumerate(contexts, 1))
    messages = [{"role": "system", "content": DETECT_SYSTEM}]
    for user, answer in _DETECT_SHOTS:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    return messages + [{"role": "user", "content":
                        f"Feature explanation: {explanation}\n\nText examples:\n\n{body}\n"}]


_VOTE = {"1": True, "0": False, "true": True, "false": False, "yes": True, "no": False}
_PER_EXAMPLE = re.compile(r"example\s*(\d+)\s*[:=\-]\s*(1|0|yes|no|true|false)\b", re.IGNORECASE)


def _labels_or_indices(items: list[str], n: int) -> list[bool] | None:
    # n items all 0/1 are labels in order; otherwise the numbers name the activating examples
    # (1-based, as the prompt numbers them). A longer run of 0/1 is a small model carrying
    # the pattern on past the last example: its first n are the answers. Anything else is
    # not an answer we can trust.
    if len(items) >= n and all(x.lower() in _VOTE for x in items):
        return [_VOTE[x.lower()] for x in items[:n]]
    if items and all(x.isdigit() and 1 <= int(x) <= n for x in items):
        chosen = {int(x) for x in items}
        return [i in chosen for i in range(1, n + 1)]
    return None


def _parse_detection(text: str, n: int) -> list[bool] | None:
    per = _PER_EXAMPLE.findall(text)
    if per and all(1 <= int(i) <= n for i, _ in per):
        votes = {int(i): _VOTE[v.lower()] for i, v in per}
        return [votes.get(i, False) for i in range(1, n + 1)]
    bracket = re.search(r"\[([^\[\]]*)(\]|$)", text)  # "[1, 0, 1" cut off by max_tokens
    if bracket:
        if not bracket.group(1).strip():  # "[]": the numbers of the activating examples, none
            return [False] * n
        items = re.findall(r"\d+|true|false|yes|no", bracket.group(1), re.IGNORECASE)
        return _labels_or_indices(items, n)
    if re.match(r"\W*(none|no examples?|not? (one|any))\b", text, re.IGNORECASE):
        return [False] * n
    return _labels_or_indices(re.findall(r"\d+", text), n)


def parse_detection(text: str, n: int) -> list[bool]:
    """Which of `n` examples the scorer says have the feature. Reads a list of 0/1 (`[1,0,1]`,
    `1, 0, 1`), numbers of the activating examples (`[1, 3]`, "1 and 3 activate"), or lines
    `Example 2: yes`. An answer that cannot be read counts as all False, never a crash."""
    return _parse_detection(text, n) or [False] * n


def balanced_accuracy(pred: Sequence[bool], truth: Sequence[bool]) -> float:
    """Mean of the recall on positives and on negatives (one class alone: its recall)."""
    recalls = []
    for cls in (True, False):
        idx = [i for i, t in enumerate(truth) if t == cls]
        if idx:
            recalls.append(sum(pred[i] == cls for i in idx) / len(idx))
    return sum(recalls) / len(recalls) if recalls else float("nan")


class Client(Protocol):
    identity: dict
    """What decides the answers (endpoint and model, or the model's content hash): the cache key."""

    def complete(self, batch: list[list[dict]], max_tokens: int) -> list[str]: ...


def detection_score(client: Client, explanation: str, positives: Sequence[Example],
                    negatives: Sequence[Example], seed: int = 0, control: str | None = None,
                    cache: ResponseCache | None = None,
                    per_prompt: int = EXAMPLES_PER_PROMPT) -> dict:
    """Detection score of `explanation` on held-out activating (`positives`) and
    non-activating (`negatives`) contexts, shuffled by `seed` and shown `per_prompt` at a time;
    with `control` (e.g. another feature's explanation) the same contexts are scored with it
    too. Both go out as one batch. Returns balanced_accuracy, control_balanced_accuracy (None
    without a control), n (contexts) and invalid_answers (prompts whose answer was unreadable)."""
    items = [(ex, True) for ex in positives] + [(ex, False) for ex in negatives]
    random.Random(seed).shuffle(items)
    chunks = [items[i:i + per_prompt] for i in range(0, len(items), per_prompt)]
    return classify(client, cache, detection_prompt, explanation, control, chunks, per_prompt)


def classify(client: Client, cache: ResponseCache | None, prompt, explanation: str,
             control: str | None, chunks: list[list[tuple[object, bool]]],
             per_prompt: int) -> dict:
    """A classifying scorer's figures (detection's and fuzzing's): each chunk of (shown,
    truth) pairs is one prompt `prompt(explanation, shown)`, for the explanation and the
    control, all sent as one batch; each answer is a list of 0/1 votes, scored against the
    truths by balanced accuracy."""
    explanations = [explanation] + ([control] if control is not None else [])
    batch = [prompt(e, [shown for shown, _ in chunk]) for e in explanations for chunk in chunks]
    # "[1, 0, ...]" is ~3 tokens an example: a longer answer is a model rambling, so cut it.
    answers = cached_complete(client, cache, batch, min(DETECTION_MAX_TOKENS, 3 * per_prompt + 6))
    truth = [t for chunk in chunks for _, t in chunk]
    scores, invalid = [], 0
    for k in range(len(explanations)):
        pred: list[bool] = []
        for chunk, answer in zip(chunks, answers[k * len(chunks):(k + 1) * len(chunks)]):
            votes = _parse_detection(answer, len(chunk))
            invalid += votes is None
            pred += votes or [False] * len(chunk)
        scores.append(balanced_accuracy(pred, truth))
    return {"balanced_accuracy": scores[0],
            "control_balanced_accuracy": scores[1] if control is not None else None,
            "n": len(truth), "invalid_answers": invalid}


def explain(client: Client, features: Sequence[Sequence[Example]],
            cache: ResponseCache | None = None, threshold: float = 0.3) -> list[str]:
    """One explanation per feature ("" where the answer held none), asked as one batch."""
    batch = [explanation_prompt(examples, threshold) for examples in features]
    return [parse_explanation(a) for a in cached_complete(client, cache, batch,
                                                          EXPLANATION_MAX_TOKENS)]


class HFClient:
    """A local Hugging Face instruct model through transformers and its chat template; greedy,
    batched with left padding. The model loads on first use, so answers found in the cache
    cost no load."""

    def __init__(self, model: str | None = None, device: str = "cpu", batch_size: int = 8):
        # Imported here: saectl.models pulls in torch, which an endpoint-only run never needs.
        from .models import model_identity, resolve_model  # torch: deferred to the local client

        self.spec = resolve_model(model)
        self.device, self.batch_size = device, batch_size
        self.identity = {"client": "hf", **model_identity(self.spec)}
        self._model = self._tok = None

    def _load(self):
        from .models import load_model, load_tokenizer  # torch, transformers: deferred

        if self._model is None:
            self._tok = load_tokenizer(self.spec)
            self._tok.padding_side = "left"  # generation continues from the right end
            if self._tok.pad_token is None:
                self._tok.pad_token = self._tok.eos_token
            self._model = load_model(self.spec, self.device)
        return self._model, self._tok

    def _render(self, tok, messages: list[dict]) -> str:
        if tok.chat_template is None:  # a base model: a plain transcript it can continue
            return "".join(f"{m['role'].capitalize()}: {m['content']}\n\n"
                           for m in messages) + "Assistant:"
        try:
            return tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception:  # templates that refuse a system turn (Gemma): fold it into the user's
            if messages[0]["role"] != "system" or len(messages) < 2:
                raise
            first = {"role": messages[1]["role"],
                     "content": messages[0]["content"] + "\n\n" + messages[1]["content"]}
            return tok.apply_chat_template([first, *messages[2:]], add_generation_prompt=True,
                                           tokenize=False)

    def complete(self, batch: list[list[dict]], max_tokens: int) -> list[str]:
        import torch  # deferred: only the local client needs it

        model, tok = self._load()
        texts = [self._render(tok, m) for m in batch]
        # Similar lengths share a sub-batch, so little compute goes to padding.
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        answers = [""] * len(texts)
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            enc = tok([texts[i] for i in idx], return_tensors="pt", padding=True,
                      add_special_tokens=False).to(model.device)
            with torch.inference_mode():
                out = model.generate(**enc, max_new_tokens=max_tokens, do_sample=False,
                                     temperature=None, top_p=None, top_k=None,
                                     pad_token_id=tok.pad_token_id)
            for i, row in zip(idx, out[:, enc["input_ids"].shape[1]:]):
                answers[i] = tok.decode(row, skip_special_tokens=True).strip()
        return answers


def make_client(explainer: str | None, explainer_model: str | None = None) -> Client:
    """`--explainer`/`--explainer-model` → a client: nothing → the packaged SmolLM2, through
    llama.cpp's server where xllamacpp is installed (faster here), else transformers (or the HF
    model named by --explainer-model); an http(s) URL → OpenAIClient, which needs
    --explainer-model; anything else → a Hugging Face model id or folder."""
    if explainer is None:
        if explainer_model is None:  # the packaged SmolLM2: through llama.cpp where it can
            from .llamacpp import default_client

            fast = default_client()
            if fast is not None:
                return fast
        return HFClient(explainer_model)
    if re.match(r"^https?://", explainer, re.IGNORECASE):
        if not urllib.parse.urlsplit(explainer).hostname:
            raise ConfigError(f"--explainer {redact(explainer)!r} is not a valid URL; "
                              "pass e.g. http://127.0.0.1:8000/v1")
        if not explainer_model:
            raise ConfigError(f"--explainer {redact(explainer)} needs --explainer-model NAME, "
                              "the model name the endpoint serves")
        return OpenAIClient(explainer, explainer_model)
    if explainer_model and explainer_model != explainer:
        raise ConfigError("--explainer-model names the model of an endpoint URL; with a local "
                          f"model give only --explainer {explainer}")
    return HFClient(explainer)
