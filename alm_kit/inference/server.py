"""``alm-kit serve``: an HTTP server with an OpenAI-style chat completions endpoint.

    POST /v1/chat/completions   {"messages": [{"role": "user", "content": [
                                    {"type": "text", "text": "which clip is louder?"},
                                    {"type": "input_audio", "input_audio": {"data": "<base64>", "format": "wav"}},
                                    ...]}],
                                 "max_tokens": 128, "temperature": 0.7, "top_p": 0.9, "stop": ["\\n"]}
    GET  /health                {"status": "ok", ...}
    GET  /v1/models

Requests that arrive close together are answered in one batch (``max_batch``, waiting at
most ``batch_wait_ms`` for company). Uploads, audio duration and max_tokens are limited;
a request over a limit or malformed gets a 4xx JSON error saying which. Standard library
only (``http.server``); binds to 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import base64
import binascii
import json
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from alm_kit.audio.io import AudioBlob, check_waveform, load_audio
from alm_kit.config.schema import GenerationConfig
from alm_kit.errors import AlmKitError
from alm_kit.inference.engine import Generation, InferenceEngine, Request


@dataclass
class ServerLimits:
    max_upload_bytes: int = 25 * 2**20
    max_audio_seconds: float = 120.0
    max_tokens: int = 2048
    max_batch: int = 8
    batch_wait_ms: float = 10.0


class RequestError(Exception):
    def __init__(self, status: HTTPStatus, message: str, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.kind = status, kind


@dataclass
class _Job:
    request: Request
    params: GenerationConfig
    done: threading.Event = field(default_factory=threading.Event)
    result: Generation | None = None


class Batcher:
    """One worker thread that runs queued jobs in batches of equal generation settings."""

    def __init__(self, engine: InferenceEngine, limits: ServerLimits) -> None:
        self.engine, self.limits = engine, limits
        self.jobs: queue.Queue[_Job | None] = queue.Queue()
        self.batches = 0
        self.thread = threading.Thread(target=self._work, name="alm-kit-batcher", daemon=True)
        self.thread.start()

    def submit(self, request: Request, params: GenerationConfig) -> Generation:
        job = _Job(request, params)
        self.jobs.put(job)
        job.done.wait()
        return job.result  # type: ignore[return-value]

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
            jobs = self._collect(first)
            groups: dict[str, list[_Job]] = {}
            for job in jobs:  # one batch per distinct setting
                groups.setdefault(repr(job.params), []).append(job)
            for group in groups.values():
                params = group[0].params
                try:
                    results = self.engine.generate_batch([j.request for j in group], params)
                except Exception as exc:  # never leave a client hanging
                    results = [Generation(id=j.request.id, error=f"internal error: {exc}") for j in group]
                self.batches += 1
                for job, result in zip(group, results):
                    job.result = result
                    job.done.set()


def _messages_to_request(body: dict, limits: ServerLimits, request_id: str) -> Request:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError(HTTPStatus.BAD_REQUEST, "'messages' must be a non-empty list")
    users = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
    if not users:
        raise RequestError(HTTPStatus.BAD_REQUEST, "no message with role 'user'")
    content = users[-1].get("content")
    parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
    if not isinstance(parts, list):
        raise RequestError(HTTPStatus.BAD_REQUEST, "message content must be a string or a list of parts")
    texts, clips = [], []
    for i, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            texts.append(str(part.get("text", "")))
        elif kind == "input_audio":
            clips.append(_decode_audio(part.get("input_audio") or {}, f"content[{i}]", limits))
        else:
            raise RequestError(HTTPStatus.BAD_REQUEST,
                               f"content[{i}]: unsupported part type {kind!r} (allowed: text, input_audio)")
    if not clips:
        raise RequestError(HTTPStatus.BAD_REQUEST, "the user message has no audio (an 'input_audio' part)")
    return Request(audio=clips, prompt="\n".join(texts).strip(), id=request_id)


def _decode_audio(part: dict, where: str, limits: ServerLimits):
    data = part.get("data")
    if not isinstance(data, str):
        raise RequestError(HTTPStatus.BAD_REQUEST, f"{where}: input_audio.data must be a base64 string")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(HTTPStatus.BAD_REQUEST, f"{where}: input_audio.data is not valid base64") from None
    try:
        wave, rate = load_audio(AudioBlob(f"{where}.{part.get('format', 'audio')}", raw))
        wave = check_waveform(wave, where)
    except AlmKitError as exc:
        raise RequestError(HTTPStatus.BAD_REQUEST, f"{where}: {exc}") from None
    seconds = len(wave) / rate
    if seconds > limits.max_audio_seconds:
        raise RequestError(HTTPStatus.BAD_REQUEST, f"{where}: audio is {seconds:.1f} s long; this server accepts "
                           f"at most {limits.max_audio_seconds:g} s")
    return wave, rate


def _params(body: dict, engine: InferenceEngine, limits: ServerLimits) -> GenerationConfig:
    if body.get("n", 1) != 1:
        raise RequestError(HTTPStatus.BAD_REQUEST, "only n = 1 is supported")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
        raise RequestError(HTTPStatus.BAD_REQUEST, "max_tokens must be a positive integer")
    if max_tokens is not None and max_tokens > limits.max_tokens:
        raise RequestError(HTTPStatus.BAD_REQUEST, f"max_tokens {max_tokens} is over this server's limit of "
                           f"{limits.max_tokens}")
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop
    temperature = body.get("temperature")
    overrides: dict[str, Any] = {
        "max_new_tokens": min(max_tokens or engine.defaults.max_new_tokens, limits.max_tokens),
        "top_p": body.get("top_p"), "seed": body.get("seed"), "stop": stop,
        "repetition_penalty": body.get("repetition_penalty"), "thinking_budget": body.get("thinking_budget"),
        "thinking": body.get("enable_thinking"),
    }
    if temperature is not None:
        # OpenAI semantics: temperature 0 is greedy; otherwise sample
        overrides.update(do_sample=temperature > 0, temperature=temperature if temperature > 0 else None)
    try:
        return engine.params(**overrides)
    except AlmKitError as exc:
        raise RequestError(HTTPStatus.BAD_REQUEST, str(exc)) from None


class _Handler(BaseHTTPRequestHandler):
    server: ALMServer  # type: ignore[assignment]
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        if self.server.verbose:
            super().log_message(format, *args)

    def _send(self, status: HTTPStatus, payload: dict) -> None:
        body = json.dumps(payload, ensure_ascii=False).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _error(self, status: HTTPStatus, message: str, kind: str = "invalid_request_error") -> None:
        self._send(status, {"error": {"message": message, "type": kind, "code": int(status)}})

    def do_GET(self) -> None:  # noqa: N802
        if self.path == "/health":
            self._send(HTTPStatus.OK, {"status": "ok", "model": self.server.model_name,
                                       "batches": self.server.batcher.batches})
        elif self.path == "/v1/models":
            self._send(HTTPStatus.OK, {"object": "list", "data": [
                {"id": self.server.model_name, "object": "model", "owned_by": "alm-kit"}]})
        else:
            self._error(HTTPStatus.NOT_FOUND, f"no such endpoint: GET {self.path}", "not_found")

    def do_POST(self) -> None:  # noqa: N802
        if self.path not in ("/v1/chat/completions", "/chat/completions"):
            self._error(HTTPStatus.NOT_FOUND, f"no such endpoint: POST {self.path}", "not_found")
            return
        limits = self.server.limits
        try:
            length = int(self.headers.get("Content-Length", "-1"))
        except ValueError:
            length = -1
        if length < 0:
            self._error(HTTPStatus.LENGTH_REQUIRED, "a Content-Length header is required")
            return
        if length > limits.max_upload_bytes:
            self.close_connection = True
            self._error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"request body is {length} bytes; the limit is "
                        f"{limits.max_upload_bytes} bytes")
            return
        try:
            body = json.loads(self.rfile.read(length) or b"null")
            if not isinstance(body, dict):
                raise RequestError(HTTPStatus.BAD_REQUEST, "the request body must be a JSON object")
            request_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
            params = _params(body, self.server.engine, limits)
            request = _messages_to_request(body, limits, request_id)
        except json.JSONDecodeError as exc:
            self._error(HTTPStatus.BAD_REQUEST, f"the request body is not valid JSON: {exc}")
            return
        except RequestError as exc:
            self._error(exc.status, str(exc), exc.kind)
            return
        result = self.server.batcher.submit(request, params)
        if result.error:
            internal = result.error.startswith("internal error")
            self._error(HTTPStatus.INTERNAL_SERVER_ERROR if internal else HTTPStatus.BAD_REQUEST, result.error,
                        "server_error" if internal else "invalid_request_error")
            return
        message: dict[str, Any] = {"role": "assistant", "content": result.answer}
        if result.thought is not None:
            message["reasoning_content"] = result.thought
        self._send(HTTPStatus.OK, {
            "id": request_id, "object": "chat.completion", "created": int(time.time()),
            "model": self.server.model_name,
            "choices": [{"index": 0, "message": message,
                         "finish_reason": "length" if result.finish_reason == "length" else "stop"}],
            "usage": {"completion_tokens": len(result.tokens)},
        })


class ALMServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, engine: InferenceEngine, *, host: str = "127.0.0.1", port: int = 8000,
                 limits: ServerLimits | None = None, model_name: str = "alm-kit", verbose: bool = False) -> None:
        self.engine, self.limits = engine, limits or ServerLimits()
        self.model_name, self.verbose = model_name, verbose
        self.batcher = Batcher(engine, self.limits)
        super().__init__((host, port), _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def server_close(self) -> None:
        self.batcher.stop()
        super().server_close()
