"""`saectl serve`: a local Neuronpedia over one store, offline.

Pages: the store's artifacts; one artifact with its lineage (inputs and what uses it), summary,
params and report (a sweep's table, sortable, and plots); any interpret artifact's dashboard
(its `report/` folder, served file by file, so a 65k-latent report is never read whole);
activation testing and live steering of an SAE (`saectl.serve_work`, on a worker thread with
progress, so a model load never blocks the other pages).

Built on Starlette (routing, streamed file responses, a small ASGI core without a template
engine or a validation layer we would not use) served by uvicorn; see README, "serve".

Store rules: an artifact's pages read its manifest; its report files and its SAE only when it
is complete (`store.check_complete`, as every stage reads its inputs). Bad input in a URL or a
request (a ref, a feature, a model that cannot be loaded) is a page or JSON with one clear
message and one log line; no traceback ever reaches the browser.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
from pathlib import Path
from urllib.parse import quote

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse
from starlette.routing import Route

from saectl import layout, serve_pages, store
from saectl.endpoint import is_loopback
from saectl.errors import ArtifactError, ConfigError, NotFoundError, SaectlError
from saectl.serve_work import Jobs, Models, activations, steer

log = logging.getLogger("saectl.serve")
SAE_STAGES = ("train", "import-sae")
CSP = ("default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'unsafe-inline'; "
       "img-src 'self' data:")


class _BadInput(SaectlError):
    status = 404


def _page(html: str, status: int = 200) -> HTMLResponse:
    return HTMLResponse(html, status, headers={"Content-Security-Policy": CSP})


def _artifact(root: Path, stage: str, digest: str) -> store.Artifact:
    """The artifact a URL names, exactly (`stage/digest`, a digest prefix, or a named ref)."""
    try:
        return store.resolve(root, f"{stage}/{digest}" if digest else stage)
    except (NotFoundError, ArtifactError, ValueError) as e:
        raise _BadInput(str(e)) from None


def _summary_line(m: dict) -> str:
    s = m.get("summary") or {}
    keys = [k for k, v in s.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return ", ".join(f"{k} {s[k]:.4g}" if isinstance(s[k], float) else f"{k} {s[k]}"
                     for k in keys[:4])


def _state(a: store.Artifact) -> str:
    if a.is_complete():
        return "complete"
    return "writing" if store.is_locked(a) else "incomplete"


def _manifests(root: Path) -> list[tuple[store.Artifact, dict]]:
    out = []
    for a in store.list_artifacts(root):
        try:
            out.append((a, a.manifest()))
        except SaectlError:
            out.append((a, {}))
    return out


def _interprets_of(root: Path, sae_ref: str) -> list[store.Artifact]:
    """Complete interpret artifacts of an SAE, newest first."""
    found = [(m.get("completed", ""), a) for a, m in _manifests(root)
             if a.stage == "interpret" and (m.get("inputs") or {}).get("sae") == sae_ref
             and a.is_complete()]
    return [a for _, a in sorted(found, key=lambda t: t[0], reverse=True)]


def make_app(root: Path, device: str = "cpu") -> Starlette:
    root = Path(root)
    jobs, models = Jobs(), Models(root, device)

    async def index(request: Request):
        rows = [{"ref": a.ref, "stage": a.stage, "state": _state(a),
                 "created": str(m.get("created", "damaged" if not m else "")),
                 "figures": _summary_line(m)} for a, m in _manifests(root)]
        return _page(serve_pages.artifact_list(str(root), rows))

    async def artifact(request: Request):
        a = _artifact(root, request.path_params["stage"], request.path_params["digest"])
        m = a.manifest()
        state = _state(a)
        used_by = [b.ref for b, bm in _manifests(root)
                   if a.ref in (bm.get("inputs") or {}).values()]
        actions, files, table = [], [], None
        if state == "complete":
            rep = layout.report(a.path)
            files = sorted(p.name for p in rep.iterdir() if p.is_file()) if rep.is_dir() else []
            if layout.DASHBOARD in files:
                actions.append(("dashboard", f"/a/{quote(a.ref)}/report/{layout.DASHBOARD}"))
            if a.stage in SAE_STAGES:
                actions += [("activation test", f"/a/{quote(a.ref)}/test"),
                            ("steering", f"/a/{quote(a.ref)}/steer")]
                actions += [(f"dashboard of {i.ref[:20]}", (f"/a/{quote(i.ref)}/report/"
                             f"{layout.DASHBOARD}")) for i in _interprets_of(root, a.ref)[:3]]
            csvs = [f for f in files if f.endswith(".csv")]
            if csvs and (rep / csvs[0]).stat().st_size < 8 << 20:
                table = serve_pages.csv_table((rep / csvs[0]).read_text(errors="replace"))
        return _page(serve_pages.artifact(a.ref, m, state, used_by, actions, files, table))

    async def report_file(request: Request):
        a = _complete(request)
        base = layout.report(a.path).resolve()
        path = (base / request.path_params["path"]).resolve()
        if not path.is_relative_to(base) or not path.is_file():
            raise _BadInput(f"{a.ref} has no report file {request.path_params['path']!r}")
        return FileResponse(path)  # streamed in chunks, never read whole

    verified: set[str] = set()  # a complete artifact never changes: checked once a server

    def _complete(request: Request) -> store.Artifact:
        a = _artifact(root, request.path_params["stage"], request.path_params["digest"])
        if a.ref in verified and a.is_complete():
            return a
        try:
            store.check_complete(a)
        except ArtifactError as e:
            raise _BadInput(str(e)) from None
        verified.add(a.ref)
        return a

    def _sae(request: Request) -> store.Artifact:
        a = _complete(request)
        if a.stage not in SAE_STAGES:
            raise _BadInput(f"{a.ref} is a {a.stage} artifact; activation testing and steering "
                            "take an SAE (a train or import-sae artifact)")
        return a

    async def feature(request: Request):
        """/a/<sae>/feature/<f>: the feature in the newest dashboard of this SAE."""
        a = _sae(request)
        raw = request.path_params["f"]
        d_sae = int(json.loads((store.sae_dir(a) / "cfg.json").read_text()).get("d_sae", 0))
        if not raw.isdigit() or int(raw) >= d_sae:
            raise _BadInput(f"feature {raw!r} does not exist: {a.ref[:24]} has {d_sae} features "
                            f"(0-{d_sae - 1})")
        found = _interprets_of(root, a.ref)
        if not found:
            raise _BadInput(f"no complete interpret artifact of {a.ref[:24]}: run saectl "
                            f"interpret {a.ref[:24]}")
        return RedirectResponse(f"/a/{quote(found[0].ref)}/report/{layout.DASHBOARD}#f={raw}")

    async def test_page(request: Request):
        a = _sae(request)
        found = _interprets_of(root, a.ref)
        expl = _explanations(found[0]) if found else {}
        dash = f"/a/{quote(found[0].ref)}/report/{layout.DASHBOARD}" if found else None
        return _page(serve_pages.activation_test(a.ref, dash, expl))

    async def steer_page(request: Request):
        a = _sae(request)
        return _page(serve_pages.steering(a.ref, request.query_params.get("feature", "0:4"),
                                          bool(_interprets_of(root, a.ref))))

    async def api_activations(request: Request):
        body = await _json(request)
        ref, text, k = str(body.get("sae", "")), str(body.get("text", "")), body.get("k", 5)
        job = jobs.submit("activations", lambda progress: activations(
            models.get(ref, progress), text, int(k) if str(k).isdigit() else 5))
        return JSONResponse(job.as_dict())

    async def api_steer(request: Request):
        body = await _json(request)
        args = {k: body.get(k) for k in ("prompt", "features", "mode", "max_new_tokens",
                                         "units") if body.get(k) is not None}
        ref = str(body.get("sae", ""))

        def work(progress):
            n = args.get("max_new_tokens", 24)
            if not isinstance(n, int):
                raise ConfigError("max_new_tokens must be a whole number")
            return steer(models.get(ref, progress), root, str(args.get("prompt", "")),
                         str(args.get("features", "")), str(args.get("mode", "add")), n,
                         str(args.get("units", "raw")), progress)

        return JSONResponse(jobs.submit("steer", work).as_dict())

    async def api_job(request: Request):
        job = jobs.get(request.path_params["job"])
        if job is None:
            return JSONResponse({"state": "error", "error": "no such job (the server restarted?)"},
                                404)
        return JSONResponse(job.as_dict())

    async def failed(request: Request, exc: Exception):
        status = getattr(exc, "status", None) or getattr(exc, "status_code", 500)
        msg = str(getattr(exc, "detail", "") or exc) if isinstance(exc, SaectlError) or \
            status != 500 else f"internal error ({type(exc).__name__}: {exc})".splitlines()[0]
        (log.warning if status < 500 else log.error)("%s %s: %s", request.method,
                                                     request.url.path, msg)
        if request.url.path.startswith("/api/"):
            return JSONResponse({"state": "error", "error": msg}, status)
        return _page(serve_pages.error("not found" if status == 404 else "error", msg), status)

    routes = [Route("/", index), Route("/a/{stage}/{digest}", artifact),
              Route("/a/{stage}/{digest}/report/{path:path}", report_file),
              Route("/a/{stage}/{digest}/feature/{f}", feature),
              Route("/a/{stage}/{digest}/test", test_page),
              Route("/a/{stage}/{digest}/steer", steer_page),
              Route("/api/activations", api_activations, methods=["POST"]),
              Route("/api/steer", api_steer, methods=["POST"]),
              Route("/api/jobs/{job}", api_job)]
    app = Starlette(routes=routes, exception_handlers={Exception: failed, 404: failed,
                                                      405: failed, SaectlError: failed},
                    lifespan=_lifespan(jobs))
    app.state.jobs, app.state.models = jobs, models
    return app


def _lifespan(jobs: Jobs):
    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        jobs.shutdown()  # a job in flight is dropped with the server

    return lifespan


async def _json(request: Request) -> dict:
    try:
        body = json.loads(await request.body())
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise ConfigError("the request body must be a JSON object")
    return body


def _explanations(interp: store.Artifact) -> dict:
    path = interp.path / layout.EXPLANATIONS
    try:
        data = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        return {}
    return {k: v.get("explanation") for k, v in data.items()
            if isinstance(v, dict) and v.get("explanation")}


def bind(host: str, port: int, allow_remote: bool) -> socket.socket:
    """The listening socket, or the one-line error: a host that is not this machine without
    --allow-remote, a port in use."""
    if not is_loopback(host) and not allow_remote:
        raise ConfigError(f"refusing to listen on {host}: saectl serve has no login, and anyone "
                          "who reaches it can read the store and run models; bind 127.0.0.1 "
                          "(the default) or pass --allow-remote")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port} ({e.strerror or e}); another "
                          "program holds the port: pass --port with another number") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def serve(root: Path, host: str = "127.0.0.1", port: int = 8765, allow_remote: bool = False,
          device: str = "cpu") -> None:
    import uvicorn  # deferred: only this command needs the server

    root = Path(root)
    if not root.is_dir():
        raise NotFoundError(f"the store {root} does not exist; pass --store DIR (or set "
                            "SAECTL_STORE) to a store that saectl wrote")
    sock = bind(host, port, allow_remote)
    logging.basicConfig(level=logging.INFO, format="saectl serve: %(message)s")
    shown = f"[{host}]" if ":" in host else host
    log.info("serving %s on http://%s:%d/ (Ctrl-C to stop)", root, shown,
             sock.getsockname()[1])
    config = uvicorn.Config(make_app(root, device), log_level="warning", access_log=False,
                            lifespan="on")
    uvicorn.Server(config).run(sockets=[sock])
