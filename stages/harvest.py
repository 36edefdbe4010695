"""Harvest: run a language model over packed text and store its activations at hook points.

Writes `tokens` (n_seq × C, int32) and `acts/<hook>` (n_seq·C × d), 16-bit by default,
compressed and checksummed. Several hooks come from one forward pass, which stops after the
deepest hook. A background thread writes while the model computes.

Work is cut into *groups* of whole chunks, aligned from row 0, so the batches a sequence is
computed in never depend on sharding or on where a killed run stopped: a resumed or sharded
harvest is bit-identical to an uninterrupted one with the same --batch-size. Progress is one
set of done chunks per writer (`progress/<writer>.json`); a re-run skips groups already done.
"""

from __future__ import annotations

import contextlib
import math
import queue
import threading
import time
from dataclasses import dataclass, field

from saectl import arrays, data, faults, layout, store
from saectl.config import address_params, opt
from saectl.console import info, progress
from saectl.errors import ArtifactError, ConfigError, SaectlError
from saectl.stage import DeviceOptions, Plan, Stage

NAME = "harvest"
AUTOCAST = (None, "bfloat16")  # --autocast choices; None: the model's own float32


@dataclass(frozen=True)
class HarvestConfig(DeviceOptions):
    hooks: str | None = opt(None, "Hook points, comma-separated: resid_post.3,mlp_out.3 "
                                  "(sites resid_pre, resid_post, mlp_out, attn_out) or module paths")
    model: str | None = opt(None, "HF model id, local folder, or alias (pythia-70m, gpt2, "
                                  "smollm2-135m); default: the packaged SmolLM2-135M-Instruct")
    # Out of the address as written: the commit it resolves to is in the model's identity.
    revision: str | None = opt(None, "Hub model revision (branch, tag or commit) to pin; "
                                     "default: main, resolved to its commit", address=False)
    dataset: str | None = opt(None, "HF dataset id, local .txt/.jsonl/.parquet file or folder; "
                                    "default: the packaged English Wikipedia summaries")
    dataset_revision: str | None = opt(None, "Hub dataset revision to pin; default: main, "
                                             "resolved to its commit", address=False)
    text_column: str = opt("text", "Text field of .jsonl/.parquet/HF datasets")
    split: str = opt("train", "Split of a HF dataset")
    tokens: int = opt(100_000, "Tokens to harvest (rounded up to whole contexts)")
    context_size: int = opt(128, "Tokens per context; the first is BOS")
    dtype: str = opt("float16", "Storage dtype: float16, bfloat16 or float32")
    autocast: str | None = opt(None, "Run the forward pass under torch.autocast in this dtype: "
                                     "bfloat16 (faster on GPUs and on CPUs with AVX-512 bf16 or "
                                     "AMX; activations differ from float32's by ~0.5% "
                                     "per token, a few tokens by more)")
    batch_size: int = opt(8, "Contexts per forward pass", address=False)
    shard: str | None = opt(None, "I/N: this process fills shard I of N (e.g. a SLURM array "
                                  "task); the artifact completes when all have", address=False)

    def __post_init__(self):
        if not self.hooks or not self.hook_list:
            raise ConfigError("give --hooks, e.g. --hooks resid_post.3 (sites: resid_pre, "
                              "resid_post, mlp_out, attn_out)")
        for name, v in (("tokens", self.tokens), ("context_size", self.context_size),
                        ("batch_size", self.batch_size)):
            if v < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {v}")
        if self.context_size < 2:
            raise ConfigError("--context-size must be at least 2 (BOS and one token)")
        if self.dtype not in arrays.STORAGE_DTYPES:
            raise ConfigError(f"--dtype {self.dtype} is not one of "
                              f"{', '.join(arrays.STORAGE_DTYPES)}")
        if self.autocast not in AUTOCAST:
            raise ConfigError(f"--autocast {self.autocast} is not supported; use --autocast "
                              f"{' or '.join(a for a in AUTOCAST if a)}, or leave it out")
        self.shard_index()  # validates

    @property
    def hook_list(self) -> list[str]:
        """Normalised (resid_post.03 is resid_post.3), sorted: one spelling, one address."""
        return sorted(layout.normalize_hooks(self.hooks or ""))

    @property
    def n_seq(self) -> int:
        return math.ceil(self.tokens / self.context_size)

    def shard_index(self) -> tuple[int, int] | None:
        if self.shard is None:
            return None
        try:
            i, n = (int(p) for p in self.shard.split("/"))
        except ValueError:
            raise ConfigError(f"--shard {self.shard!r} must look like I/N, e.g. 0/4") from None
        if not (n >= 1 and 0 <= i < n):
            raise ConfigError(f"--shard {self.shard}: need 0 <= I < N")
        return i, n


def resolved_params(cfg: HarvestConfig, model_spec, data_spec) -> dict:
    """What the artifact's address is made of: the identities of model and data, not names."""
    from saectl import models  # deferred: pulls in torch

    params = address_params(cfg)
    params.update(model=models.model_identity(model_spec), dataset=data.dataset_identity(data_spec),
                  hooks=cfg.hook_list, n_seq=cfg.n_seq)
    del params["tokens"]  # n_seq × context_size is what is stored
    if params["autocast"] is None:  # absent, so addresses made before the option stay valid
        del params["autocast"]
    return params


@dataclass
class Context:
    """What plan resolved and prepare loaded, for build."""

    model_spec: object
    data_spec: data.DataSpec
    device: object = None
    model: object = None
    hooks: list = field(default_factory=list)
    dims: dict[str, int] = field(default_factory=dict)
    tokens: object = None


def plan(cfg: HarvestConfig) -> Plan:
    """The artifact, without loading the model (a hub model's revision is resolved to its
    commit here: one request, or the local cache offline)."""
    from saectl import models  # deferred: pulls in torch

    model_spec = models.pin_revision(models.resolve_model(cfg.model), cfg.revision)
    data_spec = data.pin_dataset(data.resolve_dataset(cfg.dataset, cfg.text_column, cfg.split),
                                 cfg.dataset_revision)
    params = resolved_params(cfg, model_spec, data_spec)
    art = store.artifact_for(store.store_root(cfg.store), NAME, params)
    shard = cfg.shard_index()
    origin = {"model": {"name": model_spec.name, "source": model_spec.source,
                        "gguf_file": model_spec.gguf_file, "local": model_spec.local,
                        **({"revision": model_spec.revision} if model_spec.revision else {})},
              "dataset": data_spec.name}
    return Plan(art, params, shard=None if shard is None else f"{shard[0]}-of-{shard[1]}",
                origin=origin, context=Context(model_spec, data_spec))


def prepare(cfg: HarvestConfig, plan: Plan) -> None:
    """Everything that can fail on bad input, before the artifact exists: the device, the hooks
    against the model's config (before its weights load), the model, the corpus."""
    from saectl import hooks as hookpoints, models  # deferred: pulls in torch

    ctx: Context = plan.context
    ctx.device = models.resolve_device(cfg.device)
    hookpoints.parse_hooks(models.skeleton(ctx.model_spec), cfg.hook_list)
    info(f"harvest: loading {ctx.model_spec.name} on {ctx.device}")
    tokenizer = models.load_tokenizer(ctx.model_spec)
    # `--device balanced` spreads the model over the GPUs; the inputs go to the first
    ctx.model = models.load_model(ctx.model_spec, device=cfg.device if cfg.device == models.SPREAD
                                  else ctx.device)
    ctx.hooks = hookpoints.parse_hooks(ctx.model, cfg.hook_list)
    ctx.dims = {h.name: hookpoints.hook_dim(ctx.model, h) for h in ctx.hooks}
    info(f"harvest: tokenizing {ctx.data_spec.name} into {cfg.n_seq:,} contexts of "
         f"{cfg.context_size}")
    ctx.tokens = data.pack_tokens(tokenizer, data.iter_texts(ctx.data_spec), cfg.context_size,
                                  cfg.n_seq)


def build(cfg: HarvestConfig, plan: Plan, writer: store.Writing) -> None:
    ctx: Context = plan.context
    art, shard = plan.art, cfg.shard_index()
    grid = make_layout(cfg, ctx.dims)
    with writer.exclusive():  # shards racing to create arrays: one creates, the others reopen
        group = _create_arrays(art, grid, ctx.dims, cfg)
    _harvest(art, group, grid, ctx.model, ctx.hooks, ctx.tokens, ctx.device, cfg, shard)
    with writer.exclusive():
        done = store.read_progress(art)
        if art.is_complete():
            return
        if len(done) < grid.n_chunks:
            info(f"harvest: shard {cfg.shard} finished; {grid.n_chunks - len(done)} of "
                 f"{grid.n_chunks} chunks wait for other shards")
            return
        writer.mark_complete(_summary(art, group, cfg, ctx.dims))
    info(f"harvest: wrote {art.ref}")


@dataclass(frozen=True)
class Grid:
    """Chunks of `seqs` sequences; forward groups of `group` chunks (B ≥ chunk) or sub-batches
    of `batch` sequences inside one chunk (B < chunk). All aligned from sequence 0."""

    n_seq: int
    seqs: int
    group: int
    batch: int

    @property
    def n_chunks(self) -> int:
        return math.ceil(self.n_seq / self.seqs)

    @property
    def n_groups(self) -> int:
        return math.ceil(self.n_chunks / self.group)

    def chunks_of(self, g: int) -> range:
        return range(g * self.group, min((g + 1) * self.group, self.n_chunks))

    def rows_of(self, g: int) -> tuple[int, int]:
        c = self.chunks_of(g)
        return c.start * self.seqs, min(c.stop * self.seqs, self.n_seq)

    def batches_of(self, g: int) -> list[tuple[int, int]]:
        lo, hi = self.rows_of(g)
        if self.group > 1:
            return [(lo, hi)]
        return [(s, min(s + self.batch, hi)) for s in range(lo, hi, self.batch)]


def make_layout(cfg: HarvestConfig, dims: dict[str, int]) -> Grid:
    """Chunk rows follow from the address (context size, widest hook, dtype); only the grouping
    follows from --batch-size."""
    itemsize = arrays.numpy_dtype(cfg.dtype).itemsize
    seqs = arrays.rows_per_chunk(cfg.context_size * max(dims.values()) * itemsize)
    return Grid(cfg.n_seq, seqs, max(1, cfg.batch_size // seqs), min(cfg.batch_size, seqs))


def _create_arrays(art, grid: Grid, dims: dict[str, int], cfg: HarvestConfig):
    group = art.group("r+")
    C = cfg.context_size
    arrays.create(group, layout.TOKENS, (cfg.n_seq, C), (grid.seqs, C), "int32")
    for hook, d in dims.items():
        arrays.create(group, layout.acts(hook), (cfg.n_seq * C, d), (grid.seqs * C, d), cfg.dtype,
                      attrs={"hook": hook, "d": d})
    return group


def _harvest(art, group, grid: Grid, model, hooks, tokens, device, cfg, shard) -> None:
    import torch  # deferred: heavy, and not needed to plan

    from saectl.hooks import run_with_hooks

    i, n = shard or (0, 1)
    mine = range(i * grid.n_groups // n, (i + 1) * grid.n_groups // n)
    done = store.read_progress(art)
    todo = [g for g in mine if not set(grid.chunks_of(g)) <= done]
    writer_id = f"shard-{i}-of-{n}" if shard else "main"
    my_done = {c for g in mine for c in grid.chunks_of(g)} & done
    C = cfg.context_size
    total = sum(grid.rows_of(g)[1] - grid.rows_of(g)[0] for g in mine) * C
    remaining = sum(grid.rows_of(g)[1] - grid.rows_of(g)[0] for g in todo) * C
    if remaining < total:
        info(f"harvest: resuming, {total - remaining:,} of {total:,} tokens already stored")

    writer = _Writer(art, group, cfg, writer_id, my_done)
    dev_type = torch.device(device).type

    def autocast():
        if cfg.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(dev_type, dtype=getattr(torch, cfg.autocast))

    t0 = time.perf_counter()
    with progress("harvest", total, "tokens", done=total - remaining) as bar:
        try:
            for g in todo:
                lo, hi = grid.rows_of(g)
                outs: dict[str, list] = {h.name: [] for h in hooks}
                for s, e in grid.batches_of(g):
                    ids = torch.from_numpy(tokens[s:e]).long().to(device)
                    with autocast():
                        acts = run_with_hooks(model, hooks, ids)
                    for h in hooks:
                        x = acts[h.name].reshape(-1, acts[h.name].shape[-1])
                        outs[h.name].append(_checked(x, h.name, cfg.dtype))
                    bar.advance((e - s) * C)
                writer.put(g, lo, hi, tokens[lo:hi], {k: torch.cat(v) for k, v in outs.items()},
                           set(grid.chunks_of(g)))
        finally:
            writer.close()
    dt = time.perf_counter() - t0
    if remaining:
        info(f"harvest: {remaining:,} tokens in {dt:.1f}s ({remaining / dt:,.0f} tokens/s)")


def _checked(x, hook: str, storage: str):
    """The storage-dtype tensor, refusing values it cannot hold (fp16 overflows to inf)."""
    import torch  # deferred: heavy, and not needed to plan

    y = x.to(torch.bfloat16 if storage == "bfloat16" else getattr(torch, storage))
    if not bool(torch.isfinite(y).all()):
        if bool(torch.isfinite(x).all()):
            big = float(x.abs().max())
            raise SaectlError(f"activations at {hook} reach {big:.3g}, beyond {storage}; "
                              "re-run with --dtype bfloat16 or --dtype float32")
        raise SaectlError(f"the model produced NaN or inf at {hook}; check the model weights "
                          "and --device")
    return y.cpu()


class _Writer:
    """Writes finished groups on a background thread (bounded queue, so memory stays flat);
    after a group's arrays are written, records its chunks as done. Errors reach the caller."""

    def __init__(self, art, group, cfg: HarvestConfig, writer_id: str, done: set[int]):
        self.art, self.group, self.cfg, self.writer_id, self.done = art, group, cfg, writer_id, done
        self.q: queue.Queue = queue.Queue(maxsize=2)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._loop, name="saectl-writer", daemon=True)
        self.thread.start()

    def put(self, *item) -> None:
        while True:
            if self.error:
                raise self.error
            try:
                self.q.put(item, timeout=0.5)
                return
            except queue.Full:
                continue

    def _loop(self) -> None:
        C = self.cfg.context_size
        while (item := self.q.get()) is not None:
            if self.error:
                continue
            g, lo, hi, toks, acts, chunks = item
            try:
                self.group[layout.TOKENS][lo:hi] = toks
                for hook, x in acts.items():
                    faults.point("harvest.mid_group")
                    self.group[layout.acts(hook)][lo * C:hi * C] = arrays.to_storage(x, self.cfg.dtype)
                self.done |= chunks
                store.record_progress(self.art, self.writer_id, self.done)
                faults.point("harvest.group_written")
            except BaseException as e:  # surfaced to the main thread on its next put/close
                self.error = e

    def close(self) -> None:
        self.q.put(None)
        self.thread.join()
        if self.error:
            err = self.error
            if isinstance(err, OSError):
                raise ArtifactError(f"writing {self.art.ref} failed ({err.strerror or err}); "
                                    "free space or fix permissions, then re-run to resume") from err
            raise err


def _summary(art, group, cfg: HarvestConfig, dims: dict[str, int]) -> dict:
    """Figures computed from what is on disk."""
    n_tokens = cfg.n_seq * cfg.context_size
    hooks = {}
    total_values = total_bytes = 0
    for hook, d in dims.items():
        path = art.path / layout.acts(hook)
        nbytes = sum(p.stat().st_size for p in path.rglob("c/**/*") if p.is_file())
        values = n_tokens * d
        hooks[hook] = {"d": d, "bytes": nbytes, "bytes_per_value": nbytes / values}
        total_values += values
        total_bytes += nbytes
    return {"n_seq": cfg.n_seq, "context_size": cfg.context_size, "n_tokens": n_tokens, "bos": True,
            "dtype": cfg.dtype, "hooks": hooks, "bytes_per_value": total_bytes / total_values}


STAGE = Stage(NAME, HarvestConfig, "Run a model over text and store activations at hook points.",
              plan, build, figures=("n_tokens", "bytes_per_value"), prepare=prepare)
