"""`sftlab ui`: one local page to watch, inspect, compare and talk to runs (FastAPI + plain ES modules).

    /                       the single-page app (static files shipped in the package; no CDN)
    /api/runs               every run under the runs folder, with its state
    /api/run?run=R          one run: its row, config, summary, status, the tail of train.log
    /api/metrics?run=R      metrics.jsonl records (from a byte offset: ?after=N)
    /api/events?run=R...    server-sent events: new metric records and state changes while runs train
    /api/data?run=R         the data report, length histograms, sources, drop reasons
    /api/examples?run=R     training examples token by token, trained tokens marked (as `sftlab inspect`)
    /api/dropped?run=R      dropped rows with their file:line and reason
    /api/eval?run=R         the run's eval report (eval/eval_report.json)
    /api/serve/...?run=R    the run's model behind sftlab serve's OpenAI-compatible routes (chat, render)
    /api/config/draft       a YAML config from the New run form; /api/config/check checks one
    /api/train, /api/stop, /api/resume   start `sftlab train` as a child, SIGTERM it, resume it

Every error is a JSON {"error": message} shown in the page, never a stack trace. Bound to
127.0.0.1 by default; bound anywhere else, every request needs the token the command prints.

Security (see docs/ui.md#security): every request's Host must be a name the server answers to
(DNS rebinding); every POST must carry the per-server CSRF token the page embeds
(`<meta name="csrf-token">`, sent back as `X-CSRF-Token`), come from the server's own origin
(Origin, else Referer) and be `application/json`; query strings with NUL bytes or numbers out of
range are refused; bodies are capped in size and read time (sftlab.http_guard).
"""

from __future__ import annotations

import asyncio
import hmac
import html
import json
import logging
import secrets
import threading
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import parse_qs, unquote

import yaml
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from sftlab.errors import SftlabError
from sftlab.http_guard import MAX_JSON_DEPTH, MAX_REQUEST_MB, READ_TIMEOUT_S, SAFE_METHODS, Guard, GuardError, parse_json, read_body
from sftlab.ui.jobs import Jobs, check_name, check_yaml
from sftlab.ui.runs import UIError, eval_report, find_runs, histogram, read_metrics, resolve_run, run_row
from sftlab.train.status import run_state

log = logging.getLogger("sftlab.ui")
STATIC = Path(__file__).parent / "static"
TOKEN_COOKIE = "sftlab_ui_token"
EVENT_POLL_S = 1.0
EXAMPLES_MAX = 50
SOURCE_SCAN_ROWS = 200_000  # rows looked at when filtering examples by source
DRAFT_KEYS = ("model", "data", "eval_data", "template", "method", "learning_rate", "num_epochs", "max_steps",
              "batch_size", "max_length", "val_fraction", "save_steps", "eval_steps", "logging_steps", "seed")
CSRF_HEADER = "x-csrf-token"
# query parameters that are counts or offsets: 0 <= value <= QUERY_NUMBER_MAX, else a 400
NUMBER_PARAMS = ("after", "offset", "limit", "row", "min_len", "max_len")
QUERY_NUMBER_MAX = 2**53


def _error(exc: Exception) -> JSONResponse:
    status = exc.status if isinstance(exc, UIError) else 400
    return JSONResponse({"error": str(exc)}, status_code=status)


class _DataCache:
    """A run's prepared data and tokenizer, kept while its config.yaml is unchanged."""

    def __init__(self):
        self.entries: dict[Path, tuple] = {}
        self.lock = threading.Lock()

    def get(self, folder: Path):
        from sftlab.config import load_config
        from sftlab.data.prepare import prepare_data
        from sftlab.models.loading import load_tokenizer

        config_path = folder / "config.yaml"
        if not config_path.is_file():
            raise UIError(f"run '{folder.name}' has no config.yaml yet (training has not started)", 404)
        stamp = config_path.stat().st_mtime_ns
        with self.lock:
            entry = self.entries.get(folder)
            if entry is None or entry[0] != stamp:
                try:
                    config = load_config(config_path)
                    data = prepare_data(config, progress=False)  # a cache hit: the run's own store
                    source = folder / "final" if (folder / "final" / "tokenizer.json").is_file() else config.model
                    tokenizer = load_tokenizer(str(source))
                except SftlabError as exc:
                    raise UIError(f"run '{folder.name}': cannot open its data: {exc}") from None
                entry = (stamp, config, data, tokenizer)
                self.entries = {folder: entry}  # one run's data at a time
            return entry[1:]


class _Models:
    """The run the Chat page talks to, loaded once and served by sftlab serve's routes."""

    def __init__(self):
        self.current: tuple[Path, object, object] | None = None  # (folder, inference, app)
        self.lock = threading.Lock()

    def app_for(self, folder: Path):
        from sftlab.infer.engine import InferenceModel
        from sftlab.infer.server import create_app

        with self.lock:
            if self.current and self.current[0] == folder:
                return self.current[2]
            if not any((f / "sftlab.json").is_file() for f in (folder, folder / "final")):
                raise UIError(f"run '{folder.name}' has no final model yet: chat works once training finishes", 404)
            self.close()
            try:
                inference = InferenceModel.load(str(folder), None, max_batch_size=4, batch_window_ms=10)
            except (SftlabError, OSError, ValueError) as exc:
                raise UIError(f"run '{folder.name}': cannot load its model: {exc}") from None
            app = create_app(inference=inference, model_name=folder.name)
            self.current = (folder, inference, app)
            return app

    def close(self) -> None:
        if self.current:
            self.current[1].engine.close()
            self.current = None


class _ServeRun:
    """ASGI: /api/serve/<route>?run=R goes to sftlab serve's app for run R (streaming included)."""

    def __init__(self, ui: "_UI"):
        self.ui = ui

    async def __call__(self, scope, receive, send):
        query = parse_qs(scope.get("query_string", b"").decode())
        try:
            folder = self.ui.run((query.get("run") or [None])[0])
            app = await asyncio.to_thread(self.ui.models.app_for, folder)
        except UIError as exc:
            await _error(exc)(scope, receive, send)
            return
        await app(scope, receive, send)


class _UI:
    def __init__(self, root: Path, token: str | None, guard: Guard):
        self.root, self.token, self.guard = root, token, guard
        self.csrf = secrets.token_urlsafe(24)  # the page's own, embedded in it; a foreign page cannot read it
        self.data, self.models, self.jobs = _DataCache(), _Models(), Jobs(root)

    def run(self, name: str | None) -> Path:
        return resolve_run(self.root, name)


def _authorized(request: Request, token: str) -> bool:
    offered = (request.query_params.get("token") or request.cookies.get(TOKEN_COOKIE)
               or request.headers.get("authorization", "").removeprefix("Bearer ").strip())
    return bool(offered) and hmac.compare_digest(offered.encode(), token.encode())


def _query_error(request: Request) -> str | None:
    """Why a request's path or query string is refused (NUL bytes, numbers out of range), or None."""
    if "\x00" in unquote(request.url.path) or "\x00" in unquote(request.url.query):
        return "a NUL byte in the address"
    for name in NUMBER_PARAMS:
        for value in request.query_params.getlist(name):
            try:
                number = int(value)
            except ValueError:
                return f"?{name}={value[:40]}: expected a whole number"
            if not 0 <= number <= QUERY_NUMBER_MAX:
                return f"?{name}={value[:40]}: out of range (0..{QUERY_NUMBER_MAX})"
    return None


def create_ui_app(runs: str | Path = "runs", token: str | None = None, host: str = "127.0.0.1",
                  port: int | None = None, allowed_hosts=(), max_request_mb: float = MAX_REQUEST_MB) -> FastAPI:
    """The UI over the runs under `runs`; with `token`, every request must carry it. `host`, `port`
    and `allowed_hosts` are the names requests may address (the Host check against DNS rebinding)."""
    root = Path(runs).expanduser().resolve()
    ui = _UI(root, token, Guard.for_binding(host, port, allowed_hosts))
    ui.max_request_bytes = int(max_request_mb * 2**20)

    @asynccontextmanager
    async def lifespan(app_: FastAPI):
        yield
        ui.models.close()
        ui.jobs.close()

    app = FastAPI(title="sftlab ui", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.ui, app.state.guard, app.state.csrf_token = ui, ui.guard, ui.csrf

    @app.middleware("http")
    async def guard(request: Request, call_next):
        try:
            ui.guard.check(request.method, request.headers)
        except GuardError as exc:
            return JSONResponse({"error": exc.message}, status_code=exc.status)
        if token and not _authorized(request, token):
            return JSONResponse({"error": "this sftlab ui needs its token: open the address `sftlab ui` printed "
                                          "(…/?token=…)"}, status_code=401)
        if request.method not in SAFE_METHODS and not hmac.compare_digest(
                request.headers.get(CSRF_HEADER, "").encode(), ui.csrf.encode()):
            return JSONResponse({"error": "this request lacks the page's CSRF token (X-CSRF-Token): reload the "
                                          "sftlab ui page and try again"}, status_code=403)
        problem = _query_error(request)
        if problem:
            return JSONResponse({"error": problem}, status_code=400)
        try:
            response = await call_next(request)
        except Exception as exc:  # noqa: BLE001 - the page shows a message, the log keeps the trace
            log.exception("unexpected error on %s", request.url.path)
            return JSONResponse({"error": f"unexpected error: {type(exc).__name__}: {exc}"}, status_code=500)
        if token and request.query_params.get("token"):
            response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="strict")
        return response

    @app.exception_handler(UIError)
    async def ui_error(request: Request, exc: UIError):
        return _error(exc)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        message = f"no such page: {request.url.path}" if exc.status_code == 404 else str(exc.detail)
        return JSONResponse({"error": message}, status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def bad_parameter(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("query", "body"))
        return JSONResponse({"error": f"{where or 'the request'}: {first.get('msg', 'invalid')}"[:300]}, status_code=400)

    @app.exception_handler(GuardError)
    async def guard_error(request: Request, exc: GuardError):
        return JSONResponse({"error": exc.message}, status_code=exc.status)

    page = (STATIC / "index.html").read_text().replace(
        '<meta charset="utf-8">', f'<meta charset="utf-8">\n<meta name="csrf-token" content="{html.escape(ui.csrf)}">', 1)

    @app.get("/")
    def index():
        return HTMLResponse(page, headers={"Cache-Control": "no-store"})

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.mount("/api/serve", _ServeRun(ui))

    @app.get("/api/runs")
    def runs_list():
        ui.jobs.reap()
        return {"root": str(root), "runs": [run_row(root, f) for f in find_runs(root)]}

    @app.get("/api/run")
    def run_detail(run: str):
        folder = ui.run(run)
        ui.jobs.reap()
        log_path = folder / "train.log"
        tail = log_path.read_bytes()[-6000:].decode("utf-8", "replace") if log_path.is_file() else ""
        summary = folder / "train_summary.json"
        try:
            config_path = ui.jobs.config_of(folder)
        except UIError:
            config_path = None
        status = run_state(folder)
        return {"row": run_row(root, folder, status), "status": status,
                "config_path": str(config_path) if config_path else None,
                "config_text": config_path.read_text() if config_path else "",
                "summary": json.loads(summary.read_text()) if summary.is_file() else None, "log_tail": tail}

    @app.get("/api/metrics")
    def metrics(run: str, after: int = 0):
        records, offset = read_metrics(ui.run(run), max(0, after))
        return {"records": records, "next": offset}

    @app.get("/api/events")
    async def events(request: Request):
        names = request.query_params.getlist("run")
        folders = {name: ui.run(name) for name in names}
        if not folders:
            raise UIError("events: give one or more ?run=NAME")
        return StreamingResponse(_events(request, folders), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.get("/api/data")
    def data_page(run: str):
        folder = ui.run(run)
        config, data, _ = ui.data.get(folder)
        report = data.report
        store = data.store
        dropped_reasons: dict[str, int] = {}
        for source in report["sources"]:
            for reason, count in source["dropped_by_reason"].items():
                dropped_reasons[reason] = dropped_reasons.get(reason, 0) + count
        trained = store.trained_counts[data.train.rows] if len(data.train) else []
        return {"report": report, "sources": [s["path"] for s in report["sources"]],
                "dropped_reasons": dropped_reasons, "train_rows": len(data.train), "val_rows": len(data.val),
                "histograms": {"length": histogram(data.train.lengths), "trained": histogram(trained),
                               "val_length": histogram(data.val.lengths)},
                "template": config.template, "train_on": config.train_on, "max_length": config.max_length}

    @app.get("/api/examples")
    def examples(run: str, split: str = "train", source: str = "", min_len: int = 0, max_len: int = 0,
                 offset: int = 0, limit: int = 5, row: int | None = None):
        from sftlab.data.inspect import token_pieces

        folder = ui.run(run)
        _, data, tokenizer = ui.data.get(folder)
        if split not in ("train", "val"):
            raise UIError(f"split '{split}': expected train or val")
        view = data.train if split == "train" else data.val
        limit = max(1, min(limit, EXAMPLES_MAX))
        import numpy as np

        if row is not None:
            if not 0 <= row < len(view):
                raise UIError(f"row {row}: the {split} split has rows 0..{len(view) - 1}", 404)
            candidates = np.array([row])
        else:
            lengths = view.lengths
            keep = (lengths >= min_len) & ((lengths <= max_len) if max_len else True)
            candidates = np.flatnonzero(keep)
        chosen, matched, scanned = [], 0, 0
        for index in candidates:
            if source:
                scanned += 1
                if scanned > SOURCE_SCAN_ROWS:
                    break
                if not view.store.source(int(view.rows[index])).startswith(source):
                    continue
            if matched >= offset:
                chosen.append(int(index))
            matched += 1
            if len(chosen) >= limit:
                break
        out = []
        for index in chosen:
            example = view[index]
            out.append({"row": index, "source": example.source, "length": len(example),
                        "trained": int(example.trained_token_count), "truncated": bool(example.truncated),
                        "lost_end_token": bool(example.lost_end_token),
                        "tokens": [[piece, bool(trained)] for piece, trained in token_pieces(example, tokenizer)]})
        return {"examples": out, "total": int(len(candidates)) if not source else None, "offset": offset,
                "split": split}

    @app.get("/api/dropped")
    def dropped(run: str, reason: str = "", offset: int = 0, limit: int = 20):
        folder = ui.run(run)
        _, data, _ = ui.data.get(folder)
        rows, seen = [], 0
        for item in (data.store.dropped() if data.store else []):
            if reason and item.reason != reason:
                continue
            if seen >= offset and len(rows) < max(1, min(limit, 200)):
                rows.append({"source": item.source, "reason": item.reason, "detail": item.detail})
            seen += 1
        return {"rows": rows, "total": seen, "reason": reason or None}

    @app.get("/api/eval")
    def eval_page(run: str):
        return eval_report(ui.run(run))

    @app.post("/api/config/draft")
    async def config_draft(request: Request):
        body = await _json(request, ui)
        name = check_name(str(body.get("name", "")))
        draft = {"model": body.get("model") or "smollm2-135m-instruct"}
        for key in DRAFT_KEYS[1:]:
            value = body.get(key)
            if value in (None, ""):
                continue
            if key in ("data", "eval_data"):
                value = str(Path(str(value)).expanduser().resolve())
            draft[key] = value
        draft["output_dir"] = str(root / name)
        text = "# written by sftlab ui; edit freely: this file is what the run trains from\n" + \
            yaml.safe_dump(draft, sort_keys=False)
        # a bad field is named now, not when training starts (off the event loop: YAML is untrusted work)
        await asyncio.to_thread(check_yaml, text, root, f"{name}.yaml")
        return {"yaml": text, "path": str(root / f"{name}.yaml")}

    @app.post("/api/config/check")
    async def config_check(request: Request):
        body = await _json(request, ui)
        config = await asyncio.to_thread(check_yaml, str(body.get("yaml", "")), root,
                                         str(body.get("name") or "the config")[:200])
        return {"ok": True, "output_dir": config.output_dir, "model": config.model, "method": config.method}

    @app.post("/api/train")
    async def train_start(request: Request):
        body = await _json(request, ui)
        return await asyncio.to_thread(ui.jobs.start, str(body.get("name", "")), str(body.get("yaml", "")))

    @app.post("/api/stop")
    def train_stop(run: str):
        return ui.jobs.stop(ui.run(run))

    @app.post("/api/resume")
    def train_resume(run: str):
        return ui.jobs.resume(ui.run(run))

    return app


async def _json(request: Request, ui: _UI) -> dict:
    raw = await read_body(request, ui.max_request_bytes, READ_TIMEOUT_S)
    body = parse_json(raw or b"{}", MAX_JSON_DEPTH)
    if not isinstance(body, dict):
        raise UIError("the request body must be a JSON object")
    return body


async def _events(request: Request, folders: dict[str, Path]):
    """New metric records and state changes of the watched runs, until none of them is running.

    Each message is {"run", "records", "state"}; an `end` event closes the stream (the page
    stops listening instead of reconnecting forever to finished runs).
    """
    offsets = {name: 0 for name in folders}
    states: dict[str, str] = {}
    while True:
        running = False
        for name, folder in folders.items():
            records, offsets[name] = read_metrics(folder, offsets[name])
            state = run_state(folder)["state"]
            running |= state == "running"
            if records or states.get(name) != state:
                states[name] = state
                yield f"data: {json.dumps({'run': name, 'records': records, 'state': state})}\n\n"
        if not running:
            yield "event: end\ndata: {}\n\n"
            return
        if await request.is_disconnected():
            return
        await asyncio.sleep(EVENT_POLL_S)
