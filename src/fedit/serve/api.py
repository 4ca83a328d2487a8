"""The OpenAI-compatible HTTP API and the web page, on FastAPI (served by uvicorn).

Routes: `POST /v1/chat/completions`, `POST /v1/completions` (both with `stream: true` as
server-sent events in the chunk format of OpenAI's clients), `GET /v1/models`, `GET /health`,
the web page at `/` (chat, arena and blind votes) and its data at `/fedit/models` and
`/fedit/questions`; the battle and vote routes of `serve/votes.py`.

Requests are checked in `serve/requests.py`. Generation runs in one worker thread, first come
first served: the base model and its active adapter are shared, so one generation at a time
is what keeps concurrent requests from seeing each other's adapter.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse

from fedit.data.records import Record
from fedit.inference import Answer
from fedit.serve.models import BASE, ContextError, Models
from fedit.serve.models import Request as Job
from fedit.serve.requests import ApiError, Parsed, parse, read_body
from fedit.serve.votes import VoteStore, add_routes

log = logging.getLogger("fedit.serve")
STATS = "fedit.stats"  # the request's token counts, for the access log


class Api:
    def __init__(self, models: Models, default_model: str | None = None) -> None:
        self.models = models
        self.default_model = default_model or next(n for n in models.names if n != BASE)
        self.created = int(time.time())
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedit-generate")
        self.questions: list[dict[str, Any]] | None = None
        self._questions_lock = threading.Lock()
        self.served = 0

    # --- parsing ---------------------------------------------------------------------------

    def parse(self, body: dict[str, Any], chat: bool) -> Parsed:
        return parse(self.models, self.default_model, body, chat)

    # --- generation ------------------------------------------------------------------------

    def jobs(self, p: Parsed) -> list[Job]:
        """One job per choice: prompt-major, then n samples with seeds seed, seed+1, ..."""
        out = []
        for text, bos in p.prompts:
            for k in range(p.n):
                job = Job(**{**p.job.__dict__, "prompt": text, "add_special_tokens": bos})
                job.seed = p.job.seed + k
                out.append(job)
        for job in out:  # a prompt too long for the context is refused before any work
            try:
                self.models.encode(job)
            except ContextError as e:
                raise ApiError(400, str(e), param="max_tokens") from None
        return out

    async def answer(self, job: Job) -> Answer:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.pool, self.models.run, job)

    def stream(
        self,
        jobs: list[Job],
        chunk: Callable[[int, str | None, str | None], dict],
        usage: Callable[[list[Answer]], dict] | None,
        stats: dict[str, Any],
    ) -> AsyncIterator[bytes]:
        """Server-sent events: text deltas of each choice in turn, then [DONE]."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[int, str | None, Answer | None]] = asyncio.Queue()
        gone = threading.Event()

        def work() -> None:
            for i, job in enumerate(jobs):
                if gone.is_set():
                    return

                def push(text: str, i: int = i) -> None:
                    loop.call_soon_threadsafe(queue.put_nowait, (i, text, None))

                try:
                    ans = self.models.run(job, push, gone.is_set)
                except Exception as e:  # reported in the stream; the server goes on
                    log.exception("generation failed")
                    loop.call_soon_threadsafe(
                        queue.put_nowait, (-1, f"{type(e).__name__}: {e}", None)
                    )
                    return
                loop.call_soon_threadsafe(queue.put_nowait, (i, None, ans))

        async def events() -> AsyncIterator[bytes]:
            future = loop.run_in_executor(self.pool, work)
            answers: list[Answer] = []
            try:
                for i in range(len(jobs)):
                    yield _sse(chunk(i, "", None))  # the role / first chunk of each choice
                while len(answers) < len(jobs):
                    i, text, ans = await queue.get()
                    if i < 0:
                        error = {"message": text, "type": "server_error", "code": 500}
                        yield _sse({"error": error})
                        break
                    if ans is None:
                        yield _sse(chunk(i, text, None))
                    else:
                        answers.append(ans)
                        yield _sse(chunk(i, None, ans.finish_reason))
                if usage is not None and len(answers) == len(jobs):
                    yield _sse(usage(answers))
                yield b"data: [DONE]\n\n"
            finally:
                gone.set()  # a client that left stops the generation at the next token
                stats.update(_counts(answers))
                del future  # runs on in the worker until that token; nothing to wait for

        return events()


def _sse(payload: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n".encode()


def _counts(answers: list[Answer]) -> dict[str, int]:
    prompt = sum(a.prompt_tokens for a in answers)
    completion = sum(a.completion_tokens for a in answers)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _static(name: str) -> str:
    return resources.files("fedit.serve").joinpath("static", name).read_text(encoding="utf-8")


def make_app(
    models: Models,
    cors: list[str] | None = None,
    default_model: str | None = None,
    votes: VoteStore | None = None,
) -> FastAPI:
    """The FastAPI app over `models` (with blind battles and votes into `votes`); run it with
    uvicorn."""
    api = Api(models, default_model)
    app = FastAPI(title="fedit", docs_url="/docs", redoc_url=None)
    app.state.api = api
    app.add_middleware(AccessLog)
    app.add_middleware(
        CORSMiddleware,
        allow_origins=cors if cors is not None else ["*"],
        allow_methods=["*"],
        allow_headers=["*"],
    )

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> JSONResponse:
        return e.response()

    @app.exception_handler(Exception)
    async def server_error(request: Request, e: Exception) -> JSONResponse:
        log.exception("request failed")
        return ApiError(500, f"{type(e).__name__}: {e}", "server_error").response()

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "models": models.names, "served": api.served}

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        data = [
            {
                "id": name,
                "object": "model",
                "created": api.created,
                "owned_by": "fedit",
                "root": models.base_name,
                "parent": None if name == BASE else models.base_name,
            }
            for name in models.names
        ]
        return {"object": "list", "data": data}

    @app.get("/v1/models/{name:path}")
    async def one_model(name: str) -> dict[str, Any]:
        if name not in models.sources:
            raise ApiError(404, f"model {name!r} is not served here", "model_not_found", "model")
        return {"id": name, "object": "model", "created": api.created, "owned_by": "fedit"}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        return await _complete(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await _complete(request, chat=False)

    async def _complete(request: Request, chat: bool) -> Any:
        p = api.parse(await read_body(request), chat)
        jobs = api.jobs(p)
        api.served += 1
        stats = request.scope.setdefault(STATS, {})
        stats["model"] = p.model
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        kind = "chat.completion" if chat else "text_completion"
        if p.stream:

            def chunk(i: int, text: str | None, finish: str | None) -> dict[str, Any]:
                if chat:
                    delta: dict[str, Any] = {}
                    if text == "":
                        delta = {"role": "assistant", "content": ""}
                    elif text is not None:
                        delta = {"content": text}
                    choice: dict[str, Any] = {
                        "index": i,
                        "delta": delta,
                        "logprobs": None,
                        "finish_reason": finish,
                    }
                else:
                    choice = {
                        "index": i,
                        "text": text or "",
                        "logprobs": None,
                        "finish_reason": finish,
                    }
                return {
                    "id": rid,
                    "object": f"{kind}.chunk" if chat else kind,
                    "created": created,
                    "model": p.model,
                    "choices": [choice],
                }

            def usage(answers: list[Answer]) -> dict[str, Any]:
                return {
                    "id": rid,
                    "object": f"{kind}.chunk" if chat else kind,
                    "created": created,
                    "model": p.model,
                    "choices": [],
                    "usage": _counts(answers),
                }

            events = api.stream(jobs, chunk, usage if p.include_usage else None, stats)
            return StreamingResponse(
                events,
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        answers = [await api.answer(job) for job in jobs]
        stats.update(_counts(answers))
        choices = []
        for i, a in enumerate(answers):
            if chat:
                choices.append(
                    {
                        "index": i,
                        "logprobs": None,
                        "finish_reason": a.finish_reason,
                        "message": {"role": "assistant", "content": a.text},
                    }
                )
            else:
                choices.append(
                    {"index": i, "text": a.text, "logprobs": None, "finish_reason": a.finish_reason}
                )
        return {
            "id": rid,
            "object": kind,
            "created": created,
            "model": p.model,
            "choices": choices,
            "usage": _counts(answers),
        }

    @app.get("/", response_class=HTMLResponse)
    async def page() -> str:
        return _static("index.html")

    @app.get("/static/{name}")
    async def static(name: str) -> Response:
        types = {".js": "text/javascript", ".css": "text/css"}
        ext = name[name.rfind(".") :] if "." in name else ""
        if ext not in types or "/" in name:
            raise ApiError(404, f"no file {name!r}", "not_found")
        try:
            return Response(_static(name), media_type=types[ext])
        except FileNotFoundError:
            raise ApiError(404, f"no file {name!r}", "not_found") from None

    @app.get("/fedit/models")
    async def model_details() -> dict[str, Any]:
        rows = []
        for name, s in models.sources.items():
            shape = models.chat_prompt(name, Record(instruction="{instruction}", response=""))[0]
            rows.append(
                {
                    "id": name,
                    "template": s.cfg.data.template,
                    "prompt_format": shape,
                    "adapter": str(s.adapter) if s.adapter else None,
                    "strategy": s.cfg.federation.strategy if s.adapter else None,
                    **s.info,
                }
            )
        return {"base_model": models.base_name, "default": api.default_model, "models": rows}

    if votes is not None:
        add_routes(app, api, votes)

    @app.get("/fedit/questions")
    async def questions() -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        items = await loop.run_in_executor(None, _held_out_questions, api)
        return {"questions": items}

    return app


def _held_out_questions(api: Api) -> list[dict[str, Any]]:
    """The default model's held-out test questions with their reference answers (read once)."""
    from fedit.errors import FeditError
    from fedit.evaluate.scoring import generation_subset, held_out

    with api._questions_lock:
        if api.questions is None:
            cfg = api.models.sources[api.default_model].cfg
            try:
                test = generation_subset(held_out(cfg), max(cfg.generate.per_category, 3), cfg.seed)
            except FeditError as e:
                raise ApiError(404, f"held-out questions unavailable: {e}", "not_found") from None
            api.questions = [_question(r) for r in test]
        return api.questions


def _question(r: Record) -> dict[str, Any]:
    return {
        "instruction": r.instruction,
        "context": r.context,
        "reference": r.response,
        "category": r.category,
    }


class AccessLog:
    """One log line per request once its last byte is sent (a stream: when it ends):
    method, path, status, latency, and for generations the model and token counts."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0, status = time.perf_counter(), [0]
        stats = scope.setdefault(STATS, {})

        async def sending(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                _log_line(scope, status[0], t0, stats)

        await self.app(scope, receive, sending)


def _log_line(scope: dict[str, Any], status: int, t0: float, stats: dict[str, Any]) -> None:
    seconds = time.perf_counter() - t0
    parts = [f"{scope['method']} {scope['path']} {status} {seconds * 1000:.0f} ms"]
    if "model" in stats:
        parts.append(f"model={stats['model']}")
    if "completion_tokens" in stats:
        rate = stats["completion_tokens"] / seconds if seconds > 0 else 0.0
        parts.append(
            f"prompt={stats['prompt_tokens']} completion={stats['completion_tokens']} "
            f"tokens ({rate:.1f} tok/s)"
        )
    log.info(" ".join(parts))
