"""alm-kit serve: a real HTTP client against a server on a free loopback port."""

from __future__ import annotations

import base64
import json
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from alm_kit.config.loader import recipe_from_dict
from alm_kit.inference.engine import InferenceEngine
from alm_kit.inference.server import ALMServer, ServerLimits
from alm_kit.model import build_model
from tests.conftest import tiny_recipe_dict, write_tone


@pytest.fixture(scope="module")
def server():
    recipe = recipe_from_dict(tiny_recipe_dict())
    engine = InferenceEngine(build_model(recipe.model).eval(), recipe.generation)
    limits = ServerLimits(max_upload_bytes=200_000, max_audio_seconds=3.0, max_tokens=16, max_batch=4,
                          batch_wait_ms=300)
    srv = ALMServer(engine, host="127.0.0.1", port=0, limits=limits, model_name="tiny")
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


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


def _chat(text, *audios, **extra):
    content = [{"type": "text", "text": text}] + [
        {"type": "input_audio", "input_audio": {"data": a, "format": "wav"}} for a in audios]
    return {"model": "tiny", "messages": [{"role": "user", "content": content}], **extra}


def test_server_binds_to_loopback_and_reports_health(server):
    assert server.server_address[0] == "127.0.0.1"
    with urllib.request.urlopen(server.url + "/health", timeout=10) as response:
        assert json.loads(response.read())["status"] == "ok"
    with urllib.request.urlopen(server.url + "/v1/models", timeout=10) as response:
        assert json.loads(response.read())["data"][0]["id"] == "tiny"


def test_chat_completion_answers_like_the_engine(server, clips):
    from alm_kit.inference.engine import Request

    status, reply = _post(server, _chat("which tone is higher?", clips["a"], clips["b"], max_tokens=5))
    assert status == 200, reply
    expected = server.engine.run([Request([clips["paths"]["a"], clips["paths"]["b"]], "which tone is higher?")],
                                 server.engine.params(max_new_tokens=5))[0]
    assert reply["choices"][0]["message"]["content"] == expected.answer
    assert reply["usage"]["completion_tokens"] == len(expected.tokens)
    assert reply["object"] == "chat.completion"


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
    ("no audio", 400, "no audio"),
    ("bad base64", 400, "base64"),
    ("not audio", 400, "content[1]"),
    ("too long", 400, "at most 3 s"),
    ("too many tokens", 400, "limit of 16"),
    ("three clips", 400, "at most 2"),
    ("too big", 413, "limit is 200000"),
    ("bad part", 400, "unsupported part type"),
])
def test_bad_requests_get_clear_4xx_errors(server, clips, case, status, words):
    raw = None
    body = {
        "not json": None, "no audio": _chat("hi"),
        "bad base64": _chat("hi", "@@@not base64@@@"),
        "not audio": _chat("hi", base64.b64encode(b"hello, not a wav file").decode()),
        "too long": _chat("hi", clips["long"]),
        "too many tokens": _chat("hi", clips["a"], max_tokens=17),
        "three clips": _chat("hi", clips["a"], clips["a"], clips["b"]),
        "too big": _chat("hi", base64.b64encode(b"x" * 300_000).decode()),
        "bad part": {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
    }[case]
    if case == "not json":
        raw = b"{not json"
    code, reply = _post(server, body, raw=raw)
    assert code == status
    assert words in reply["error"]["message"]
    # the server keeps serving after a bad request
    assert _post(server, _chat("ok?", clips["a"], max_tokens=2))[0] == 200


def test_unknown_endpoint_is_404(server):
    code, reply = _post(server, {}, path="/v1/completions")
    assert code == 404 and "no such endpoint" in reply["error"]["message"]
