"""``alm-kit serve``: OpenAI-compatible chat completions with audio, on FastAPI and uvicorn.

    POST /v1/chat/completions   {"messages": [{"role": "user", "content": [
                                    {"type": "text", "text": "which clip is louder?"},
                                    {"type": "input_audio", "input_audio": {"data": "<base64>", "format": "wav"}},
                                    ...]}],
                                 "max_tokens": 128, "temperature": 0.7, "top_p": 0.9, "stop": ["\\n"],
                                 "stream": false}
    GET  /health, GET /v1/models, GET /docs (OpenAPI page), GET /openapi.json

The server is thin: pydantic models type-check the request (a 400 names the field), audio is
decoded with the length limit checked from the header, and the engine answers. Requests that
arrive close together are answered in one batch on the engine's worker thread (``max_batch``,
waiting at most ``batch_wait_ms`` for company); ``stream: true`` sends the text as server-sent
events while the decode loop produces it. Every error is an OpenAI-style body
``{"error": {"message", "type", "param", "code"}}``. Binds to 127.0.0.1 unless told otherwise.
Docs: docs/inference.md#server.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import queue
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from alm_kit.audio.io import AudioBlob, load_audio
from alm_kit.config.schema import GenerationConfig
from alm_kit.errors import AlmKitError
from alm_kit.inference.engine import Generation, InferenceEngine, Request

log = logging.getLogger("alm_kit.serve")


@dataclass
class ServerLimits:
    max_upload_bytes: int = 25 * 2**20
    max_audio_seconds: float = 120.0
    max_tokens: int = 2048
    max_batch: int = 8
    batch_wait_ms: float = 10.0
    #: seconds a client has to send its whole request body (then 408): a slow or stalled upload
    #: cannot hold a connection for ever
    body_timeout_s: float = 60.0
    #: open connections and requests in progress; beyond it uvicorn answers 503 at once
    max_connections: int = 64


# ---------------------------------------------------------------------- the request, type-checked
class _Part(BaseModel):
    # strict: "0.7" is not a number and 1 is not true; unknown keys of messages and parts are ignored
    model_config = ConfigDict(strict=True, extra="ignore")


class InputAudio(_Part):
    data: str = Field(description="the encoded file (wav, flac, ogg, ...), base64")
    format: str | None = Field(None, description="wav, flac, ...: informative, the data says what it is")


class ContentPart(_Part):
    type: Literal["text", "input_audio"]
    text: str = ""
    input_audio: InputAudio | None = None

    @model_validator(mode="after")
    def _payload(self) -> ContentPart:
        if self.type == "input_audio" and self.input_audio is None:
            raise ValueError("an 'input_audio' part needs an 'input_audio' field")
        return self


class Message(_Part):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: list[ContentPart] | None = Field(None, description="a string, or a list of text and input_audio parts")

    @field_validator("content", mode="before")
    @classmethod
    def _string_is_one_text_part(cls, value: Any) -> Any:
        return [{"type": "text", "text": value}] if isinstance(value, str) else value


class StreamOptions(_Part):
    include_usage: bool = False


#: OpenAI fields this server does not implement, accepted when they ask for nothing beyond the
#: default (clients and SDKs send some of them as a matter of course); other values are a 400
_NEUTRAL: dict[str, tuple] = {
    "frequency_penalty": (0,), "presence_penalty": (0,), "logprobs": (False,), "top_logprobs": (0,),
    "logit_bias": ({},), "tools": ([],), "tool_choice": ("none", "auto"), "parallel_tool_calls": (True, False),
    "response_format": ({"type": "text"},), "modalities": (["text"],),
}
#: OpenAI fields that only inform the provider: ignored
_IGNORED = ("metadata", "store", "service_tier", "prompt_cache_key", "safety_identifier")


class ChatCompletionRequest(BaseModel):
    """OpenAI's chat-completions request, the fields this server reads. An unknown field is a 400
    (a misspelt ``max_token`` would otherwise be ignored silently), as OpenAI answers it."""

    model_config = ConfigDict(strict=True, extra="forbid")

    model: str | None = Field(None, description="any name: this server has one model")
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="wins over max_tokens")
    temperature: float | None = Field(None, ge=0, description="0 or none: greedy; > 0: sampling")
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    stop: list[Annotated[str, Field(max_length=256)]] | None = Field(
        None, max_length=16, description="a string or a list of strings")
    seed: int | None = None
    n: Literal[1] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, description="ignored")
    repetition_penalty: float | None = Field(None, gt=0)
    enable_thinking: bool | None = Field(None, description="thinking decoders (Qwen3); ignored by models "
                                                           "without a thinking mode (prefix layout)")
    thinking_budget: int | None = Field(None, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _drop_neutral(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        return {k: v for k, v in data.items()
                if not (k in _IGNORED or k in _NEUTRAL and (v is None or v in _NEUTRAL[k]))}

    @field_validator("stop", mode="before")
    @classmethod
    def _one_stop(cls, value: Any) -> Any:
        value = [value] if isinstance(value, str) else value
        if value is not None and not (isinstance(value, list) and all(isinstance(s, str) for s in value)):
            raise ValueError("must be a string or a list of strings")
        return value


# ---------------------------------------------------------------------- errors
class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.param, self.code = status, param, code


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    kind = "server_error" if status >= 500 else "not_found_error" if status == 404 else "invalid_request_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                    close: bool = False) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status,
                        headers={"Connection": "close"} if close else None)


def _param(loc: tuple) -> str:
    """('body', 'messages', 0, 'content', 1) -> messages[0].content[1]"""
    out = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}" if out else str(part)
    return out


def _validation_error(exc: RequestValidationError) -> JSONResponse:
    error = exc.errors()[0]
    if error["type"] == "json_invalid":
        reason = error.get("ctx", {}).get("error", "")
        return _error_response(400, f"the request body is not valid JSON: {reason}", code="json_invalid")
    param = _param(tuple(error["loc"]))
    if not param:
        return _error_response(400, "the request body must be a JSON object (Content-Type: application/json)",
                               code=error["type"])
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        message = (f"not a field this server reads (it reads {', '.join(ChatCompletionRequest.model_fields)})"
                   if param not in _NEUTRAL else "not supported by this server beyond its default")
    more = f" (and {len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
    return _error_response(400, f"{param}: {message}{more}", param=param, code=error["type"])


# ---------------------------------------------------------------------- request -> engine
def _params(body: ChatCompletionRequest, engine: InferenceEngine, limits: ServerLimits) -> GenerationConfig:
    max_tokens = body.max_completion_tokens or body.max_tokens
    if max_tokens is not None and max_tokens > limits.max_tokens:
        name = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
        raise ApiError(400, f"{name} {max_tokens} is over this server's limit of {limits.max_tokens}", name)
    overrides: dict[str, Any] = {
        "max_new_tokens": min(max_tokens or engine.defaults.max_new_tokens, limits.max_tokens),
        "top_p": body.top_p, "top_k": body.top_k, "seed": body.seed, "stop": body.stop,
        "repetition_penalty": body.repetition_penalty, "thinking_budget": body.thinking_budget,
        "thinking": body.enable_thinking,
    }
    if body.temperature is not None:  # OpenAI semantics: temperature 0 is greedy; otherwise sample
        overrides.update(do_sample=body.temperature > 0, temperature=body.temperature or None)
    try:
        return engine.params(**overrides)
    except AlmKitError as exc:
        raise ApiError(400, str(exc)) from None


def _to_request(body: ChatCompletionRequest, limits: ServerLimits, request_id: str) -> Request:
    """The last user message: its text parts are the prompt, its audio parts the clips (decoded here)."""
    users = [i for i, m in enumerate(body.messages) if m.role == "user"]
    if not users:
        raise ApiError(400, "no message with role 'user'", "messages")
    index = users[-1]
    texts, clips = [], []
    for j, part in enumerate(body.messages[index].content or []):
        if part.type == "text":
            texts.append(part.text)
        else:
            clips.append(_decode_audio(part.input_audio, f"messages[{index}].content[{j}]", limits))
    if not clips:
        raise ApiError(400, f"messages[{index}]: the user message has no audio (an 'input_audio' part)",
                       f"messages[{index}].content")
    return Request(audio=clips, prompt="\n".join(texts).strip(), id=request_id)


def _decode_audio(part: InputAudio, where: str, limits: ServerLimits):
    param = f"{where}.input_audio.data"
    try:
        raw = base64.b64decode(part.data, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"{param}: not valid base64", param) from None
    try:
        return load_audio(AudioBlob(f"{where}.{part.format or 'audio'}", raw), max_seconds=limits.max_audio_seconds)
    except AlmKitError as exc:
        raise ApiError(400, f"{param}: {exc}", param) from None


# ---------------------------------------------------------------------- the engine's worker
@dataclass
class _Job:
    """One request on its way through the worker; events go back to the request's event loop."""

    request: Request
    params: GenerationConfig
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    done: bool = False

    def _send(self, event: tuple) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is closed: the server is stopping
            pass

    # TextStream, for stream: true
    def piece(self, part: str, text: str) -> None:
        self._send(("piece", part, text))

    def finished(self, result: Generation, internal: bool = False) -> None:
        if not self.done:
            self.done = True
            self._send(("done", result, internal))


class Batcher:
    """One worker thread that runs queued jobs in batches of equal generation settings."""

    def __init__(self, engine: InferenceEngine, limits: ServerLimits) -> None:
        self.engine, self.limits = engine, limits
        self.jobs: queue.Queue[_Job | None] = queue.Queue()
        self.batches = 0
        self.thread = threading.Thread(target=self._work, name="alm-kit-batcher", daemon=True)
        self.thread.start()

    def submit(self, request: Request, params: GenerationConfig, stream: bool) -> _Job:
        job = _Job(request, params, asyncio.get_running_loop())
        if stream:
            request.stream = job
        self.jobs.put(job)
        return job

    def stop(self) -> None:
        self.jobs.put(None)
        self.thread.join(timeout=10)

    def _collect(self, first: _Job) -> list[_Job]:
        jobs = [first]
        deadline = time.monotonic() + self.limits.batch_wait_ms / 1000
        while len(jobs) < self.limits.max_batch:
            try:
                job = self.jobs.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if job is None:
                self.jobs.put(None)
                break
            jobs.append(job)
        return jobs

    def _work(self) -> None:
        while True:
            first = self.jobs.get()
            if first is None:
                return
            groups: dict[str, list[_Job]] = {}
            for job in self._collect(first):  # one batch per distinct setting
                groups.setdefault(repr(job.params), []).append(job)
            for group in groups.values():
                internal = False
                try:
                    results = self.engine.generate_batch([j.request for j in group], group[0].params)
                except Exception as exc:  # never leave a client hanging; the details go to the log only
                    log.exception("generation failed")
                    internal = True
                    results = [Generation(id=j.request.id, error=f"internal error ({type(exc).__name__}); "
                                          f"the server log has the details") for j in group]
                self.batches += 1
                for job, result in zip(group, results):
                    job.finished(result, internal)


# ---------------------------------------------------------------------- the app
class _BodyLimits:
    """ASGI middleware: a request body over ``max_bytes`` is 413, one not received within
    ``timeout_s`` is 408; both before the app sees it. uvicorn has neither."""

    def __init__(self, app, limits: ServerLimits) -> None:
        self.app, self.limits = app, limits

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        limit = self.limits.max_upload_bytes
        declared = dict(scope["headers"]).get(b"content-length", b"")
        size = int(declared) if declared.isdigit() else 0
        chunks: list[bytes] = []

        async def read() -> None:
            nonlocal size
            received = 0
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise ConnectionResetError
                chunk = message.get("body", b"")
                received += len(chunk)
                size = max(size, received)
                if size <= limit:
                    chunks.append(chunk)
                if not message.get("more_body", False):
                    return

        try:  # an over-limit body is drained (not kept) so that the client reads the 413 instead of a reset
            await asyncio.wait_for(read(), self.limits.body_timeout_s)
        except asyncio.TimeoutError:
            if size <= limit:
                response = _error_response(408, f"the request body did not arrive within "
                                           f"{self.limits.body_timeout_s:g} s", code="timeout", close=True)
                return await response(scope, receive, send)
        except ConnectionResetError:
            return
        if size > limit:
            response = _error_response(413, f"request body is {size} bytes; the limit is {limit} bytes",
                                       code="request_too_large", close=True)
            return await response(scope, receive, send)
        replay = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replayed():
            return replay.pop() if replay else await receive()

        await self.app(scope, replayed, send)


def create_app(engine: InferenceEngine, limits: ServerLimits, model_name: str, batcher: Batcher) -> FastAPI:
    app = FastAPI(title="alm-kit", summary="OpenAI-compatible chat completions with audio input",
                  description="Audio goes in `input_audio` parts of the last user message. docs/inference.md")

    @app.exception_handler(ApiError)
    async def _api_error(_request, exc: ApiError) -> JSONResponse:
        return _error_response(exc.status, str(exc), exc.param, exc.code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request, exc: RequestValidationError) -> JSONResponse:
        return _validation_error(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException) -> JSONResponse:
        message = (f"no such endpoint: {request.method} {request.url.path}" if exc.status_code == 404
                   else str(exc.detail))
        return _error_response(exc.status_code, message, code="not_found" if exc.status_code == 404 else None)

    @app.exception_handler(Exception)
    async def _crash(_request, exc: Exception) -> JSONResponse:
        log.error("request failed", exc_info=exc)
        return _error_response(500, f"internal error ({type(exc).__name__}); the server log has the details")

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": model_name, "batches": batcher.batches}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "alm-kit"}]}

    async def chat_completions(body: ChatCompletionRequest):
        params = _params(body, engine, limits)
        request_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        request = await run_in_threadpool(_to_request, body, limits, request_id)
        job = batcher.submit(request, params, stream=body.stream)
        event = await job.events.get()
        if event[0] == "done":
            _raise_for(event)
        if not body.stream:
            return _completion(event[1], request_id, model_name)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(_sse(event, job, request_id, model_name, include_usage),
                                 media_type="text/event-stream")

    responses = {code: {"description": text} for code, text in (
        (400, "invalid request: the error's param names the field"), (408, "the body did not arrive in time"),
        (413, "body over the upload limit"), (500, "internal error"))}
    app.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"], responses=responses,
                      summary="chat completion (stream: true for server-sent events)")
    app.add_api_route("/chat/completions", chat_completions, methods=["POST"], include_in_schema=False)
    return app


def _raise_for(event: tuple) -> None:
    _, result, internal = event
    if result.error:
        raise ApiError(500 if internal else 400, result.error, code="internal_error" if internal else None)


def _finish_reason(result: Generation) -> str:
    return "length" if result.finish_reason == "length" else "stop"


def _usage(result: Generation) -> dict:
    completion = len(result.tokens)
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": completion,
            "total_tokens": result.prompt_tokens + completion}


def _completion(result: Generation, request_id: str, model_name: str) -> dict:
    message: dict[str, Any] = {"role": "assistant", "content": result.answer}
    if result.thought is not None:
        message["reasoning_content"] = result.thought
    return {"id": request_id, "object": "chat.completion", "created": int(time.time()), "model": model_name,
            "choices": [{"index": 0, "message": message, "finish_reason": _finish_reason(result)}],
            "usage": _usage(result)}


async def _sse(first: tuple, job: _Job, request_id: str, model_name: str, include_usage: bool) -> AsyncIterator[str]:
    """``chat.completion.chunk`` events: the role, then text pieces as they come (the thought as
    ``reasoning_content``), then the finish reason, the usage if asked, and ``[DONE]``."""
    created = int(time.time())

    def chunk(delta: dict | None, finish: str | None = None, usage: dict | None = None) -> str:
        body: dict[str, Any] = {"id": request_id, "object": "chat.completion.chunk", "created": created,
                                "model": model_name,
                                "choices": [] if delta is None else [{"index": 0, "delta": delta,
                                                                      "finish_reason": finish}]}
        if usage is not None:
            body["usage"] = usage
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    yield chunk({"role": "assistant", "content": ""})
    event = first
    while event[0] == "piece":
        _, part, text = event
        yield chunk({"reasoning_content" if part == "thought" else "content": text})
        event = await job.events.get()
    _, result, internal = event
    if result.error:  # the headers are sent: the error goes in the stream, as OpenAI does
        status = 500 if internal else 400
        yield f"data: {json.dumps(error_body(status, result.error))}\n\n"
        return
    yield chunk({}, _finish_reason(result))
    if include_usage:
        yield chunk(None, usage=_usage(result))
    yield "data: [DONE]\n\n"


class ALMServer:
    """The app on uvicorn, on a socket bound at construction (port 0 picks a free one)."""

    def __init__(self, engine: InferenceEngine, *, host: str = "127.0.0.1", port: int = 8000,
                 limits: ServerLimits | None = None, model_name: str = "alm-kit", verbose: bool = False) -> None:
        import uvicorn

        self.engine, self.limits, self.model_name = engine, limits or ServerLimits(), model_name
        self.batcher = Batcher(engine, self.limits)
        self.app = create_app(engine, self.limits, model_name, self.batcher)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.socket = socket.socket(family, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind((host, port))
        self.socket.listen(2048)  # connections wait in the backlog until uvicorn runs
        self.server_address = self.socket.getsockname()[:2]
        config = uvicorn.Config(_BodyLimits(self.app, self.limits), limit_concurrency=self.limits.max_connections,
                                timeout_keep_alive=5, log_level="info" if verbose else "warning",
                                access_log=verbose, lifespan="off")
        self.uvicorn = uvicorn.Server(config)

    @property
    def url(self) -> str:
        host, port = self.server_address
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def serve_forever(self) -> None:
        self.uvicorn.run(sockets=[self.socket])

    def shutdown(self) -> None:
        """Ask a running ``serve_forever`` (in another thread) to stop."""
        self.uvicorn.should_exit = True

    def server_close(self) -> None:
        self.batcher.stop()
        self.socket.close()
