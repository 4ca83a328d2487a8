"""An OpenAI-compatible HTTP API over a base model and its tuned adapter.

`GET /v1/models`, `POST /v1/chat/completions` (non-streaming), `GET /health`. One model in
memory; requests are answered one at a time (a CPU or a single GPU gains nothing from more).
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from fedit.inference import Loaded, generate, messages_to_record, prompt_for

MAX_BODY = 8 * 1024 * 1024


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


def _number(body: dict[str, Any], key: str, default: float, lo: float, hi: float) -> float:
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not lo <= value <= hi:
        raise ApiError(400, f"{key}: expected a number in [{lo}, {hi}], got {value!r}")
    return float(value)


class Server:
    def __init__(self, loaded: Loaded, model_id: str, max_new_tokens: int) -> None:
        self.loaded = loaded
        self.model_id = model_id
        self.max_new_tokens = max_new_tokens
        self.lock = threading.Lock()
        self.created = int(time.time())
        self.requests = 0

    def models(self) -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {
                    "id": self.model_id,
                    "object": "model",
                    "created": self.created,
                    "owned_by": "fedit",
                    "root": self.loaded.cfg.model.name,
                }
            ],
        }

    def chat(self, body: dict[str, Any]) -> dict[str, Any]:
        if body.get("stream"):
            raise ApiError(400, "stream: streaming is not supported; send stream=false")
        model = body.get("model", self.model_id)
        if model not in (self.model_id, None):
            raise ApiError(
                404, f"model {model!r} is not served here; this server has {self.model_id!r}",
                "model_not_found",
            )  # fmt: skip
        if int(body.get("n", 1) or 1) != 1:
            raise ApiError(400, "n: only n=1 is supported")
        try:
            record = messages_to_record(body.get("messages") or [])
        except ValueError as e:
            raise ApiError(400, str(e)) from None
        limit = body.get("max_completion_tokens", body.get("max_tokens"))
        max_tokens = (
            self.max_new_tokens
            if limit is None
            else int(_number({"max_tokens": limit}, "max_tokens", 0, 1, 32768))
        )
        temperature = _number(body, "temperature", 0.0, 0.0, 2.0)
        top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
        seed = int(_number(body, "seed", 0, -(2**31), 2**31 - 1))
        cfg, tok = self.loaded.cfg, self.loaded.tokenizer
        prompt = prompt_for(record, cfg, tok)
        with self.lock:
            self.requests += 1
            (answer,) = generate(
                self.loaded.model,
                tok,
                [prompt],
                max_new_tokens=max_tokens,
                batch_size=1,
                max_prompt_tokens=max(cfg.data.cutoff_len, 4096),
                temperature=temperature,
                top_p=top_p,
                seed=seed,
                add_special_tokens=cfg.data.template != "chat",
            )
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex[:24]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model_id,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": answer["text"]},
                    "finish_reason": answer["finish_reason"],
                }
            ],
            "usage": {
                "prompt_tokens": answer["prompt_tokens"],
                "completion_tokens": answer["completion_tokens"],
                "total_tokens": answer["prompt_tokens"] + answer["completion_tokens"],
            },
        }


def _handler(server: Server, log: Any) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            if log:
                log(f"{self.address_string()} {format % args}")

        def _send(self, status: int, payload: dict[str, Any]) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, e: ApiError) -> None:
            error = {"message": e.message, "type": e.kind, "code": e.status}
            self._send(e.status, {"error": error})

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0].rstrip("/")
            if path in ("/v1/models", "/models"):
                self._send(200, server.models())
            elif path == "/health":
                self._send(200, {"status": "ok", "model": server.model_id})
            else:
                self._error(ApiError(404, f"no route GET {self.path}", "not_found"))

        def do_POST(self) -> None:
            path = self.path.split("?", 1)[0].rstrip("/")
            try:
                if path not in ("/v1/chat/completions", "/chat/completions"):
                    raise ApiError(404, f"no route POST {self.path}", "not_found")
                length = int(self.headers.get("Content-Length") or 0)
                if length <= 0 or length > MAX_BODY:
                    raise ApiError(400, f"request body must be 1..{MAX_BODY} bytes of JSON")
                try:
                    body = json.loads(self.rfile.read(length))
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    raise ApiError(400, f"request body is not JSON: {e}") from None
                if not isinstance(body, dict):
                    raise ApiError(400, "request body must be a JSON object")
                self._send(200, server.chat(body))
            except ApiError as e:
                self._error(e)
            except Exception as e:  # a bug must not kill the server; the client learns why
                self._error(ApiError(500, f"{type(e).__name__}: {e}", "server_error"))

    return Handler


def make_server(
    loaded: Loaded,
    host: str,
    port: int,
    model_id: str,
    max_new_tokens: int,
    log: Any = None,
) -> tuple[ThreadingHTTPServer, Server]:
    """A bound HTTP server (port 0 picks a free one); call serve_forever() to run it."""
    app = Server(loaded, model_id, max_new_tokens)
    httpd = ThreadingHTTPServer((host, port), _handler(app, log))
    httpd.daemon_threads = True
    return httpd, app
