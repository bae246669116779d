"""alm-kit serve: real HTTP clients (urllib, raw sockets, the official ``openai`` package) against a
server on a free loopback port, with a tiny random model built in code."""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import soundfile as sf

from alm_kit.config.loader import recipe_from_dict
from alm_kit.inference.engine import InferenceEngine, Request
from alm_kit.inference.server import ALMServer, ServerLimits
from alm_kit.model import build_model
from tests.conftest import tiny_recipe_dict, write_tone

LIMITS = ServerLimits(max_upload_bytes=200_000, max_audio_seconds=3.0, max_tokens=16, max_batch=4,
                      batch_wait_ms=300, body_timeout_s=2.0)


def _start(engine: InferenceEngine, limits: ServerLimits):
    srv = ALMServer(engine, host="127.0.0.1", port=0, limits=limits, model_name="tiny")
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    _wait_for(lambda: srv.uvicorn.started)
    return srv, thread


def _wait_for(condition, tries: int = 600) -> None:
    for _ in range(tries):
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError("the server did not get there")


def _stop(srv: ALMServer, thread: threading.Thread) -> None:
    srv.shutdown()
    thread.join(timeout=30)
    srv.server_close()


@pytest.fixture(scope="module")
def engine():
    recipe = recipe_from_dict(tiny_recipe_dict())
    return InferenceEngine(build_model(recipe.model).eval(), recipe.generation)


@pytest.fixture(scope="module")
def server(engine):
    srv, thread = _start(engine, LIMITS)
    yield srv
    _stop(srv, thread)


@pytest.fixture(scope="module")
def client(server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clips")
    paths = {name: write_tone(folder / f"{name}.wav", freq, seconds)
             for name, freq, seconds in (("a", 440.0, 1.0), ("b", 1200.0, 1.5), ("long", 300.0, 4.0))}
    return {name: base64.b64encode(open(p, "rb").read()).decode() for name, p in paths.items()} | {"paths": paths}


def _post(server, body, path="/v1/chat/completions", raw: bytes | None = None):
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(server.url + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _content(text, *audios):
    return [{"type": "text", "text": text}] + [
        {"type": "input_audio", "input_audio": {"data": a, "format": "wav"}} for a in audios]


def _chat(text, *audios, **extra):
    return {"model": "tiny", "messages": [{"role": "user", "content": _content(text, *audios)}], **extra}


def _silent_flac(seconds: float, rate: int = 1000) -> str:
    """A long silent FLAC: a few hundred bytes per minute at this rate (written in blocks)."""
    buf = io.BytesIO()
    with sf.SoundFile(buf, "w", rate, 1, format="FLAC") as f:
        for _ in range(int(seconds // 60)):
            f.write(np.zeros(60 * rate, np.float32))
    return base64.b64encode(buf.getvalue()).decode()


def test_server_binds_to_loopback_and_reports_health(server):
    assert server.server_address[0] == "127.0.0.1"
    with urllib.request.urlopen(server.url + "/health", timeout=10) as response:
        assert json.loads(response.read())["status"] == "ok"
    with urllib.request.urlopen(server.url + "/v1/models", timeout=10) as response:
        assert json.loads(response.read())["data"][0]["id"] == "tiny"


def test_openapi_page_describes_the_chat_request(server):
    with urllib.request.urlopen(server.url + "/docs", timeout=10) as response:
        assert "swagger" in response.read().decode().lower()
    with urllib.request.urlopen(server.url + "/openapi.json", timeout=10) as response:
        spec = json.loads(response.read())
    assert "/v1/chat/completions" in spec["paths"]
    fields = spec["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    assert {"messages", "max_tokens", "temperature", "stream", "enable_thinking"} <= set(fields)


def test_chat_completion_answers_like_the_engine_with_usage(server, clips):
    status, reply = _post(server, _chat("which tone is higher?", clips["a"], clips["b"], max_tokens=5))
    assert status == 200, reply
    expected = server.engine.run([Request([clips["paths"]["a"], clips["paths"]["b"]], "which tone is higher?")],
                                 server.engine.params(max_new_tokens=5))[0]
    assert reply["choices"][0]["message"]["content"] == expected.answer
    assert reply["object"] == "chat.completion"
    usage = reply["usage"]
    assert usage["completion_tokens"] == len(expected.tokens)
    assert usage["prompt_tokens"] == expected.prompt_tokens > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_concurrent_requests_are_batched_and_answered_each_their_own(server, clips):
    bodies = [_chat(f"question {i}", clips["a"] if i % 2 else clips["b"], max_tokens=4) for i in range(4)]
    before = server.batcher.batches
    with ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(lambda b: _post(server, b), bodies))
    assert all(status == 200 for status, _ in replies)
    assert server.batcher.batches - before < 4  # at least two requests shared a batch
    for body, (_, reply) in zip(bodies, replies):
        alone = _post(server, body)[1]
        assert reply["choices"][0]["message"]["content"] == alone["choices"][0]["message"]["content"]


@pytest.mark.parametrize("case, status, words", [
    ("not json", 400, "not valid JSON"),
    ("not an object", 400, "must be a JSON object"),
    ("no audio", 400, "no audio"),
    ("bad base64", 400, "base64"),
    ("not audio", 400, "content[1].input_audio.data: cannot decode"),
    ("too long", 400, "at most 3 s"),
    ("hour of flac", 400, "3600.0 s long"),
    ("too many tokens", 400, "limit of 16"),
    ("three clips", 400, "at most 2"),
    ("too big", 413, "limit is 200000"),
    ("bad part", 400, "content[0].type: Input should be 'text' or 'input_audio'"),
])
def test_bad_requests_get_clear_4xx_errors_in_openai_shape(server, clips, case, status, words):
    raw = None
    body = {
        "not json": None, "not an object": [1, 2], "no audio": _chat("hi"),
        "bad base64": _chat("hi", "@@@not base64@@@"),
        "not audio": _chat("hi", base64.b64encode(b"hello, not a wav file").decode()),
        "too long": _chat("hi", clips["long"]),
        "hour of flac": _chat("hi", _silent_flac(3600)),
        "too many tokens": _chat("hi", clips["a"], max_tokens=17),
        "three clips": _chat("hi", clips["a"], clips["a"], clips["b"]),
        "too big": _chat("hi", base64.b64encode(b"x" * 300_000).decode()),
        "bad part": {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
    }[case]
    if case == "not json":
        raw = b"{not json"
    code, reply = _post(server, body, raw=raw)
    assert code == status
    error = reply["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert words in error["message"]
    assert error["type"] == "invalid_request_error"
    assert " at 0x" not in error["message"]  # no object reprs (<_io.BytesIO object at 0x...>)
    # the server keeps serving after a bad request
    assert _post(server, _chat("ok?", clips["a"], max_tokens=2))[0] == 200


@pytest.mark.parametrize("field, value, param", [
    ("input_audio", "x", "messages[0].content[1].input_audio"),
    ("temperature", "hot", "temperature"),
    ("temperature", [1], "temperature"),
    ("temperature", "0.5", "temperature"),
    ("stop", 5, "stop"),
    ("stop", [1, 2], "stop"),
    ("seed", "abc", "seed"),
    ("seed", 1.5, "seed"),
    ("max_tokens", "4", "max_tokens"),
    ("stream", "yes", "stream"),
    ("n", 2, "n"),
    ("top_p", 0, "top_p"),
    ("enable_thinking", "no", "enable_thinking"),
    ("max_token", 4, "max_token"),  # a misspelt field is not ignored silently
    ("frequency_penalty", 0.5, "frequency_penalty"),  # an OpenAI field this server does not implement
])
def test_every_field_is_type_checked_and_the_400_names_it(server, clips, field, value, param):
    body = _chat("hi", clips["a"], max_tokens=2)
    if field == "input_audio":
        body["messages"][0]["content"][1]["input_audio"] = value
    else:
        body[field] = value
    code, reply = _post(server, body)
    assert code == 400, reply
    assert reply["error"]["param"] == param
    assert reply["error"]["message"].startswith(f"{param}: ")


def test_openai_fields_at_their_defaults_are_accepted(server, clips):
    neutral = {"frequency_penalty": 0, "presence_penalty": 0.0, "logprobs": False, "tools": [],
               "tool_choice": "auto", "response_format": {"type": "text"}, "metadata": {"who": "test"},
               "user": "someone"}
    code, reply = _post(server, _chat("hi", clips["a"], max_tokens=2, **neutral))
    assert code == 200, reply


def test_enable_thinking_is_ignored_by_a_model_without_thinking(server, clips):
    plain = _post(server, _chat("hi", clips["a"], max_tokens=4))
    for switch in (True, False):
        code, reply = _post(server, _chat("hi", clips["a"], max_tokens=4, enable_thinking=switch))
        assert code == 200, reply
        assert reply["choices"][0]["message"] == plain[1]["choices"][0]["message"]


def _slow_client(server, declared: int = 1000, sent: bytes = b"{}") -> socket.socket:
    """A client that declares a body of ``declared`` bytes and sends only ``sent``."""
    sock = socket.create_connection(server.server_address, timeout=30)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (declared, sent))
    return sock


def _read_all(sock: socket.socket) -> bytes:
    out = b""
    while chunk := sock.recv(65536):
        out += chunk
    return out


def test_a_stalled_upload_gets_408_and_its_connection_is_closed(server, clips):
    sock = _slow_client(server)
    with sock:
        reply = _read_all(sock)  # ends only when the server closes; the socket timeout fails the test
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408")
    assert "did not arrive within 2 s" in json.loads(body)["error"]["message"]
    assert _post(server, _chat("ok?", clips["a"], max_tokens=2))[0] == 200


def test_connections_are_bounded_and_freed_by_the_body_timeout(engine, clips):
    srv, thread = _start(engine, ServerLimits(max_connections=2, body_timeout_s=2.0, max_tokens=4))
    try:
        with _slow_client(srv) as slow:
            _wait_for(lambda: len(srv.uvicorn.server_state.tasks) == 1)  # the slow request is in
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(srv.url + "/health", timeout=10)
            assert refused.value.code == 503
            assert _read_all(slow).startswith(b"HTTP/1.1 408")
        status = None
        for _ in range(50):  # the server may still be closing the slow connection
            try:
                with urllib.request.urlopen(srv.url + "/health", timeout=10) as response:
                    status = response.status
                    break
            except urllib.error.HTTPError as exc:
                status = exc.code
        assert status == 200
    finally:
        _stop(srv, thread)


def test_unknown_endpoint_is_404_in_openai_shape(server):
    code, reply = _post(server, {}, path="/v1/completions")
    assert code == 404 and "no such endpoint" in reply["error"]["message"]


def test_an_internal_error_is_500_without_details(engine, clips, monkeypatch):
    openai = pytest.importorskip("openai")
    srv, thread = _start(engine, LIMITS)
    monkeypatch.setattr(engine, "generate_batch", lambda *a, **k: (_ for _ in ()).throw(
        RuntimeError(f"broken by {object()}")))
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        with pytest.raises(openai.InternalServerError) as failed:
            client.chat.completions.create(model="tiny", messages=[
                {"role": "user", "content": _content("hi", clips["a"])}], max_tokens=2)
        assert "RuntimeError" in failed.value.message and " at 0x" not in failed.value.message
    finally:
        _stop(srv, thread)


# ---------------------------------------------------------------------- the official openai client
def _ask(client, clips, **extra):
    return client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": _content("which tone is higher?", clips["a"],
                                                                     clips["b"])}], **extra)


def test_openai_client_non_stream_with_usage(server, client, clips):
    reply = _ask(client, clips, max_tokens=6, temperature=0)
    expected = server.engine.run([Request([clips["paths"]["a"], clips["paths"]["b"]], "which tone is higher?")],
                                 server.engine.params(max_new_tokens=6))[0]
    assert reply.choices[0].message.content == expected.answer
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.prompt_tokens == expected.prompt_tokens > 0
    assert reply.usage.completion_tokens == len(expected.tokens)
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_openai_client_stream_sends_chunks_that_join_to_the_answer(client, clips):
    whole = _ask(client, clips, max_tokens=12)
    chunks = list(_ask(client, clips, max_tokens=12, stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    texts = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(texts) > 1  # the text came in pieces, as generated
    assert "".join(texts) == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].usage.model_dump() == whole.usage.model_dump() and not chunks[-1].choices


def test_openai_client_errors_map_to_its_exception_types(client, clips):
    openai = pytest.importorskip("openai")
    with pytest.raises(openai.BadRequestError) as bad:
        _ask(client, clips, max_tokens=2, temperature="hot")
    assert bad.value.param == "temperature" and bad.value.status_code == 400
    with pytest.raises(openai.BadRequestError):  # errors found by the engine come before the stream starts
        client.chat.completions.create(model="tiny", stream=True, messages=[
            {"role": "user", "content": _content("hi", clips["a"], clips["a"], clips["b"])}])
    with pytest.raises(openai.APIStatusError) as too_big:
        client.chat.completions.create(model="tiny", messages=[
            {"role": "user", "content": _content("x" * 300_000, clips["a"])}])
    assert too_big.value.status_code == 413 and "limit is 200000" in too_big.value.message
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="tiny", prompt="hi")
