"""The requests of the OpenAI-compatible API, checked: sampling settings, stops, prompts.

Parsed by hand so that every refusal names the key and the allowed values, in OpenAI's error
shape; options this server does not implement are refused by name, never silently ignored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

from fedit.data.records import DataError
from fedit.inference import messages_to_record
from fedit.serve.models import Models
from fedit.serve.models import Request as Job

MAX_BODY = 8 * 1024 * 1024
MAX_N = 8
MAX_STOPS = 16
UNSUPPORTED = ("tools", "functions", "logit_bias", "response_format", "suffix", "best_of")


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param = status, message, kind, param

    def response(self) -> JSONResponse:
        error = {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.status,
        }
        return JSONResponse({"error": error}, status_code=self.status)


def _number(body: dict[str, Any], key: str, default: float, lo: float, hi: float) -> float:
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not lo <= value <= hi:
        raise ApiError(
            400, f"{key}: expected a number in [{lo:g}, {hi:g}], got {value!r}", param=key
        )
    return float(value)


def _integer(body: dict[str, Any], key: str, default: int | None, lo: int, hi: int) -> int | None:
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ApiError(400, f"{key}: expected an integer in [{lo}, {hi}], got {value!r}", param=key)
    return value


def _stops(body: dict[str, Any]) -> list[str] | None:
    value = body.get("stop")
    if value is None:
        return None
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(s, str) and s for s in items):
        raise ApiError(
            400,
            f"stop: expected a string or a list of non-empty strings, got {value!r}",
            param="stop",
        )
    if len(items) > MAX_STOPS:
        raise ApiError(400, f"stop: at most {MAX_STOPS} strings, got {len(items)}", param="stop")
    return list(items)


@dataclass
class Parsed:
    """A request, checked: the model, one prompt text per choice set, the settings."""

    model: str
    prompts: list[tuple[str, bool]]  # (text, add BOS)
    n: int
    stream: bool
    include_usage: bool
    job: Job  # the settings; prompt filled per choice


def parse(models: Models, default_model: str, body: dict[str, Any], chat: bool) -> Parsed:
    """A request body checked key by key; every refusal names the key and what is allowed."""
    for key in UNSUPPORTED:
        if body.get(key) not in (None, [], {}):
            raise ApiError(400, f"{key}: not supported by this server", param=key)
    if body.get("logprobs") not in (None, False, 0) or body.get("top_logprobs"):
        raise ApiError(400, "logprobs: not supported by this server", param="logprobs")
    if body.get("echo"):
        raise ApiError(400, "echo: not supported by this server", param="echo")
    for key in ("presence_penalty", "frequency_penalty"):
        if _number(body, key, 0.0, -2.0, 2.0) != 0.0:
            raise ApiError(400, f"{key}: only 0 is supported", param=key)
    model = body.get("model") or default_model
    if model not in models.sources:
        raise ApiError(
            404,
            f"model {model!r} is not served here; this server has {models.names}",
            "model_not_found",
            "model",
        )
    n = _integer(body, "n", 1, 1, MAX_N) or 1
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    max_tokens = _integer({"max_tokens": limit}, "max_tokens", None, 1, models.context)
    temperature = _number(body, "temperature", 0.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if top_p <= 0.0:
        raise ApiError(400, "top_p: must be above 0", param="top_p")
    seed = _integer(body, "seed", 0, -(2**63), 2**63 - 1) or 0
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, f"stream: expected true or false, got {stream!r}", param="stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, "stream_options: expected an object", param="stream_options")
    stops = _stops(body)
    if chat:
        try:
            record = messages_to_record(body.get("messages") or [])
        except (ValueError, DataError) as e:
            raise ApiError(400, str(e), param="messages") from None
        prompts = [models.chat_prompt(model, record)]
        if stops is None:  # the template's own turn markers end the answer
            stops = models.default_stops(model)
    else:
        prompt = body.get("prompt")
        texts = [prompt] if isinstance(prompt, str) else prompt
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
            raise ApiError(
                400,
                "prompt: expected a string or a non-empty list of strings "
                "(token ids are not accepted)",
                param="prompt",
            )
        prompts = [(t, True) for t in texts]
        stops = stops or []
    job = Job(model, "", max_tokens, temperature, top_p, seed, stops)
    return Parsed(model, prompts, n, stream, bool(options.get("include_usage")), job)


async def read_body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if not raw or len(raw) > MAX_BODY:
        raise ApiError(400, f"request body must be 1..{MAX_BODY} bytes of JSON")
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"request body is not JSON: {e}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object")
    return body
