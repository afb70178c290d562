"""`occrt serve`: the official `openai` client against a server on loopback (chat, completions, streaming, usage,
seeds, stop), plain HTTP for malformed requests (400 / 401 / 404 / 405 / 413 with OpenAI error bodies), overload (503
at once), a client that disconnects, and the command itself in a subprocess."""
from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from tests.conftest import sigint_default

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

import occrt  # noqa: E402
from occrt.server import create_app, listen  # noqa: E402

MODEL_ID = "tiny"


class Server:
    """uvicorn in a thread of the test process, on a free loopback port."""

    def __init__(self, app):
        import uvicorn

        self.sock = listen("127.0.0.1", 0)
        self.port = self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.01)

    def client(self, **kw):
        return openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key=kw.pop("api_key", "unused"),
                             max_retries=0, timeout=60, **kw)

    def request(self, method: str, path: str, body: bytes | dict | None = None, headers: dict | None = None
                ) -> tuple[int, dict, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        conn.request(method, path, body=data, headers={"content-type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        out = resp.status, dict(resp.getheaders()), resp.read()
        conn.close()
        return out

    def stop(self):
        self.server.should_exit = True
        self.thread.join(20)
        self.sock.close()


@pytest.fixture(scope="module")
def model(tiny_occ):
    m = occrt.load(tiny_occ)
    yield m
    m.close()


@pytest.fixture(scope="module")
def server(model):
    s = Server(create_app(model, model_id=MODEL_ID, max_body_bytes=64 * 1024))
    yield s
    s.stop()


def error_of(status_headers_body) -> tuple[int, dict]:
    status, _, body = status_headers_body
    doc = json.loads(body)
    assert set(doc) == {"error"} and set(doc["error"]) == {"message", "type", "param", "code"}
    assert doc["error"]["message"]
    return status, doc["error"]


# -- the openai client ----------------------------------------------------------------------------------------------
def test_models_list(server):
    client = server.client()
    assert [m.id for m in client.models.list().data] == [MODEL_ID]
    assert client.models.retrieve(MODEL_ID).owned_by == "occrt"


def test_chat_completion_matches_the_library(server, model):
    messages = [{"role": "user", "content": "the cat"}]
    r = server.client().chat.completions.create(model=MODEL_ID, messages=messages, max_tokens=12, temperature=0)
    want = model.complete_chat(messages, max_new_tokens=12, temperature=0)
    assert r.object == "chat.completion" and r.model == MODEL_ID and r.id.startswith("chatcmpl-")
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == want.text
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == \
        (want.prompt_tokens, 12, want.prompt_tokens + 12)


def test_completion_with_stop_and_seed(server, model):
    client = server.client()
    r = client.completions.create(model=MODEL_ID, prompt="the dog ran", max_tokens=20, temperature=0)
    full = model.complete("the dog ran", max_new_tokens=20, temperature=0).text
    assert r.object == "text_completion" and r.choices[0].text == full and r.choices[0].finish_reason == "length"
    stop = full[4:7]
    cut = client.completions.create(model=MODEL_ID, prompt="the dog ran", max_tokens=20, temperature=0, stop=[stop])
    assert cut.choices[0].text == full[:full.find(stop)] and cut.choices[0].finish_reason == "stop"
    kw = dict(model=MODEL_ID, prompt="the cat", max_tokens=16, temperature=1.0, top_p=0.95)
    a, b, c = (client.completions.create(seed=s, **kw).choices[0].text for s in (7, 7, 8))
    assert a == b and a != c
    default = client.completions.create(model=MODEL_ID, prompt="the cat", temperature=0)
    assert default.usage.completion_tokens == 16  # OpenAI's default max_tokens for completions


def test_chat_stream_with_usage(server, model):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the dog"}]
    chunks = list(server.client().chat.completions.create(
        model=MODEL_ID, messages=messages, max_tokens=10, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    want = model.complete_chat(messages, max_new_tokens=10, temperature=0)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want.text and len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert chunks[-1].usage.prompt_tokens == want.prompt_tokens


def test_completion_stream_is_sse_with_done(server, model):
    status, headers, body = server.request("POST", "/v1/completions", {
        "model": MODEL_ID, "prompt": "the cat", "max_tokens": 8, "temperature": 0, "stream": True})
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = body.decode().split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    docs = [json.loads(e[len("data: "):]) for e in events[:-2]]
    assert all(d["object"] == "text_completion" for d in docs)
    assert "".join(d["choices"][0]["text"] for d in docs) == model.complete("the cat", max_new_tokens=8).text
    assert docs[-1]["choices"][0]["finish_reason"] == "length"
    streamed = "".join(c.choices[0].text for c in server.client().completions.create(
        model=MODEL_ID, prompt="the cat", max_tokens=8, temperature=0, stream=True))
    assert streamed == model.complete("the cat", max_new_tokens=8).text


def test_openai_client_raises_on_errors(server):
    client = server.client()
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="maximum context length is 256") as caught:
        client.completions.create(model=MODEL_ID, prompt="the cat " * 200, max_tokens=4)
    assert caught.value.code == "context_length_exceeded" and caught.value.param == "prompt"


# -- malformed requests over plain HTTP -----------------------------------------------------------------------------
CHAT = "/v1/chat/completions"


@pytest.mark.parametrize("body, param, code", [
    (b"{not json", None, "invalid_json"),
    (b"[1, 2]", None, "invalid_json"),
    (b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "temperature": NaN}', None, "invalid_json"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "model", "missing_required_parameter"),
    ({"model": MODEL_ID}, "messages", "missing_required_parameter"),
    ({"model": MODEL_ID, "messages": []}, "messages", "invalid_type"),
    ({"model": MODEL_ID, "messages": ["hi"]}, "messages[0]", "invalid_type"),
    ({"model": MODEL_ID, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     "messages[0].content[0]", "unsupported_value"),
    ({"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, "max_tokens",
     "invalid_value"),
    ({"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "max_tokens": "5"}, "max_tokens",
     "invalid_type"),
    ({"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "temperature": 3}, "temperature",
     "invalid_value"),
    ({"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "top_p": 1.5}, "top_p", "invalid_value"),
    ({"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "stop": ["a"] * 5}, "stop",
     "invalid_value"),
    ({"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "n": 2}, "n", "unsupported_value"),
    ({"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "stream": "yes"}, "stream",
     "invalid_type"),
    ({"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "stream_options": {}}, "stream_options",
     None),
    ({"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1000}, "messages",
     "context_length_exceeded"),
    ({"model": MODEL_ID, "messages": [{"role": "user", "content": "the cat " * 200}]}, "messages",
     "context_length_exceeded"),
])
def test_bad_chat_requests_are_400(server, body, param, code):
    status, err = error_of(server.request("POST", CHAT, body))
    assert status == 400 and err["type"] == "invalid_request_error"
    assert (err["param"], err["code"]) == (param, code)


@pytest.mark.parametrize("body, param", [
    ({"model": MODEL_ID}, "prompt"),
    ({"model": MODEL_ID, "prompt": ""}, "prompt"),
    ({"model": MODEL_ID, "prompt": ["a", "b"]}, "prompt"),
    ({"model": MODEL_ID, "prompt": [1, 100000]}, "prompt"),
    ({"model": MODEL_ID, "prompt": "hi", "echo": True}, "echo"),
])
def test_bad_completion_requests_are_400(server, body, param):
    status, err = error_of(server.request("POST", "/v1/completions", body))
    assert status == 400 and err["param"] == param


def test_unknown_model_path_and_method(server):
    status, err = error_of(server.request("POST", CHAT, {"model": "gpt-4o", "messages": [
        {"role": "user", "content": "hi"}]}))
    assert status == 404 and (err["param"], err["code"]) == ("model", "model_not_found")
    status, err = error_of(server.request("GET", "/v1/models/other"))
    assert status == 404 and err["code"] == "model_not_found"
    status, err = error_of(server.request("POST", "/v1/embeddings", {"model": MODEL_ID}))
    assert status == 404 and err["code"] == "unknown_url"
    status, err = error_of(server.request("GET", CHAT))
    assert status == 405


def test_oversized_body_is_413_declared_or_not(server):
    big = {"model": MODEL_ID, "messages": [{"role": "user", "content": "x" * 70_000}]}
    status, err = error_of(server.request("POST", CHAT, big))
    assert status == 413 and err["code"] == "request_too_large"
    # chunked, with no Content-Length: counted as it arrives
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("POST", CHAT, body=iter([json.dumps(big).encode()[i:i + 8192] for i in range(0, 70_100, 8192)]),
                 headers={"content-type": "application/json"}, encode_chunked=True)
    resp = conn.getresponse()
    assert resp.status == 413 and json.loads(resp.read())["error"]["code"] == "request_too_large"
    conn.close()


def test_api_key(model):
    s = Server(create_app(model, model_id=MODEL_ID, api_key="sekrit"))
    try:
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "sekrit"}):
            status, err = error_of(s.request("GET", "/v1/models", headers=headers))
            assert status == 401 and err["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            s.client(api_key="wrong").models.list()
        r = s.client(api_key="sekrit").chat.completions.create(
            model=MODEL_ID, messages=[{"role": "user", "content": "hi"}], max_tokens=3)
        assert r.usage.completion_tokens <= 3
    finally:
        s.stop()


# -- overload and disconnects ---------------------------------------------------------------------------------------
class Gated:
    """A network whose forward waits for the test to open the gate; counts forward steps."""

    def __init__(self, network):
        self.network = network
        self.gate = threading.Event()
        self.steps = 0
        self.entered = threading.Event()

    def new_cache(self, capacity):
        return self.network.new_cache(capacity)

    def forward(self, tokens, cache, *, all_logits=False):
        self.entered.set()
        assert self.gate.wait(30), "the test never opened the gate"
        self.steps += 1
        return self.network.forward(tokens, cache, all_logits=all_logits)


@pytest.fixture
def gated(tiny_occ):
    m = occrt.load(tiny_occ)
    m.network = Gated(m.network)
    yield m
    m.network.gate.set()
    m.close()


def open_stream(port: int, max_tokens: int = 20) -> http.client.HTTPConnection:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("POST", CHAT, body=json.dumps({"model": MODEL_ID, "stream": True, "max_tokens": max_tokens,
                                                "messages": [{"role": "user", "content": "hi"}]}),
                 headers={"content-type": "application/json"})
    return conn


def test_overload_is_503_at_once_and_the_queue_drains(gated):
    s = Server(create_app(gated, model_id=MODEL_ID, parallel=1, queue=1))
    try:
        running = open_stream(s.port)
        assert gated.network.entered.wait(10)  # the first request holds the only slot, stuck in its prefill
        waiting = open_stream(s.port)  # admitted to the queue
        time.sleep(0.2)
        t0 = time.monotonic()
        status, headers, body = s.request("POST", CHAT, {"model": MODEL_ID, "messages": [
            {"role": "user", "content": "hi"}]})
        assert time.monotonic() - t0 < 2
        assert status == 503 and headers.get("retry-after") == "1"
        err = json.loads(body)["error"]
        assert (err["type"], err["code"]) == ("server_error", "server_overloaded")
        gated.network.gate.set()
        for conn in (running, waiting):
            resp = conn.getresponse()
            assert resp.status == 200 and resp.read().endswith(b"data: [DONE]\n\n")
            conn.close()
        status, _, _ = s.request("POST", CHAT, {"model": MODEL_ID, "max_tokens": 2,
                                                "messages": [{"role": "user", "content": "hi"}]})
        assert status == 200
    finally:
        gated.network.gate.set()
        s.stop()


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_leaves_stops_its_generation(gated, stream):
    s = Server(create_app(gated, model_id=MODEL_ID, parallel=1, queue=0))
    try:
        conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=30)
        conn.request("POST", CHAT, body=json.dumps({"model": MODEL_ID, "stream": stream, "max_tokens": 200,
                                                    "messages": [{"role": "user", "content": "hi"}]}),
                     headers={"content-type": "application/json"})
        assert gated.network.entered.wait(10)
        conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()
        time.sleep(0.3)  # the server notices the disconnect while the step is still blocked
        gated.network.gate.set()
        deadline = time.monotonic() + 10
        while True:  # the slot comes back once the step in flight ends
            status, _, _ = s.request("POST", CHAT, {"model": MODEL_ID, "max_tokens": 1,
                                                    "messages": [{"role": "user", "content": "hi"}]})
            if status == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert status == 200
        assert gated.network.steps < 20  # 1 + 1 for the probe; far from the 200 tokens asked for
    finally:
        gated.network.gate.set()
        s.stop()


# -- the command ----------------------------------------------------------------------------------------------------
def test_occrt_serve_command(tiny_occ):
    env = {**os.environ, "OCCRT_API_KEY": "k1"}
    proc = subprocess.Popen([sys.executable, "-m", "occrt", "serve", tiny_occ, "--port", "0", "--quiet"],
                            stderr=subprocess.PIPE, text=True, env=env, preexec_fn=sigint_default)
    try:
        line = proc.stderr.readline()
        m = re.search(r"serving 'tiny' at http://127\.0\.0\.1:(\d+)/v1", line)
        assert m, line
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{m.group(1)}/v1", api_key="k1", max_retries=0)
        deadline = time.monotonic() + 30
        while True:
            try:
                assert [x.id for x in client.models.list().data] == ["tiny"]
                break
            except openai.APIConnectionError:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        r = client.completions.create(model="tiny", prompt="the cat", max_tokens=4, temperature=0)
        assert r.usage.completion_tokens == 4
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C: uvicorn shuts down, then the CLI reports the interrupt
        try:
            rest = proc.communicate(timeout=20)[1]
        finally:
            proc.kill()
    assert proc.returncode == 130 and "Traceback" not in rest and "interrupted" in rest


def test_serve_refuses_a_busy_port(tiny_occ):
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "occrt", "serve", tiny_occ, "--port", str(port)],
                              capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "cannot listen" in done.stderr
