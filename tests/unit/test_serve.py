"""tunelab/serve.py: the OpenAI-compatible server (through the openai client) and the terminal chat (in tmux)."""

from __future__ import annotations

import http.client
import json
import os
import select
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from types import SimpleNamespace

import pytest

from tunelab import serve
from tunelab.errors import UserError
from tunelab.serve import DEFAULT_MAX_TOKENS, MAX_BODY_BYTES, ChatRequest, Conversation, RequestError, StopText, \
    chat_loop, context_length, is_loopback, load_generator, make_server, parse_chat_request

openai = pytest.importorskip("openai")

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def serving(model: str, name: str):
    gen = load_generator(model)
    server = make_server(gen, name, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    port = server.server_address[1]
    return server, gen, port, openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)


@pytest.fixture(scope="module")
def tiny():
    """A random builtin:tiny-llama behind the server: (openai client, port, ChatModel)."""
    server, gen, port, client = serving("builtin:tiny-llama", "tiny")
    yield client, port, gen
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def trained(quickstart_sft):
    """The quickstart SFT model (it learned to end its turns with <|im_end|>) behind the server."""
    run_dir, rc, out, err = quickstart_sft
    assert rc == 0, out + err
    server, gen, port, client = serving(str(run_dir), "quickstart")
    yield client, gen
    server.shutdown()
    server.server_close()


def streamed(client, **kw):
    """(concatenated content deltas, finish_reason, the chunks) of a streamed request."""
    chunks = list(client.chat.completions.create(stream=True, **kw))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    return text, finish, chunks


def raw(port: int, method: str, path: str, body: bytes | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body, method=method,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


# ------------------------------------------------------------------------------------------- protocol


def test_models_lists_the_served_name(tiny):
    client, port, _ = tiny
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    code, body = raw(port, "GET", "/v1/models/other")
    assert code == 404 and body["error"]["code"] == "model_not_found"


def test_a_reply_with_usage(tiny):
    client, _, _ = tiny
    r = client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=12, temperature=0)
    assert r.object == "chat.completion" and r.model == "tiny" and r.id.startswith("chatcmpl-")
    choice = r.choices[0]
    assert choice.index == 0 and choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 5 and 0 < r.usage.completion_tokens <= 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_another_model_name_is_answered_by_the_served_model(tiny):
    client, _, _ = tiny
    r = client.chat.completions.create(model="gpt-4o", messages=QUESTION, max_tokens=2, temperature=0)
    assert r.model == "tiny"


@pytest.mark.parametrize("sampling", [dict(temperature=0), dict(temperature=1.0, seed=3)], ids=["greedy", "seeded"])
def test_streamed_deltas_equal_the_whole_reply(tiny, sampling):
    """(The random model's greedy reply is blank lines; a seeded sampled one is varied text.)"""
    client, _, _ = tiny
    kw = dict(model="tiny", messages=QUESTION, max_tokens=24, **sampling)
    whole = client.chat.completions.create(**kw)
    text, finish, chunks = streamed(client, **kw)
    assert text == whole.choices[0].message.content
    assert finish == [whole.choices[0].finish_reason]
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert len([c for c in chunks if c.choices[0].delta.content]) > 1  # streamed, not sent in one piece


def test_sse_framing_ends_with_done(tiny):
    _, port, _ = tiny
    body = json.dumps({"messages": QUESTION, "max_tokens": 4, "temperature": 0, "stream": True}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=body, method="POST")
    with urllib.request.urlopen(req, timeout=30) as r:
        assert r.headers["Content-Type"] == "text/event-stream"
        events = r.read().decode().split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    assert all(e.startswith("data: {") for e in events[:-2])


def finish_of(client, stream: bool, **kw) -> tuple[str, str, int]:
    """(text, finish_reason, completion tokens) of one request, streamed or not."""
    if not stream:
        r = client.chat.completions.create(**kw)
        return r.choices[0].message.content, r.choices[0].finish_reason, r.usage.completion_tokens
    kw["stream_options"] = {"include_usage": True}
    text, finish, chunks = streamed(client, **kw)
    assert len(finish) == 1
    return text, finish[0], chunks[-1].usage.completion_tokens


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_finish_reason_is_length_exactly_when_the_budget_ran_out(tiny, stream):
    """Each case built so that it happens: the random model's greedy reply is token 201 ('\\n') forever, never its
    end of turn, so a greedy budget of 3 runs out; a stop string taken from a sampled reply ends that reply
    early; and with 201 made the end-of-turn token, the reply ends at once, by a stop, even when that one
    token is the whole budget."""
    client, _, gen = tiny
    base = dict(model="tiny", messages=QUESTION)
    for key in ("max_tokens", "max_completion_tokens"):
        text, finish, n = finish_of(client, stream, temperature=0, **base, **{key: 3})
        assert (text, finish, n) == ("\n\n\n", "length", 3)

    sampled = dict(temperature=1.0, seed=3, max_tokens=32, **base)
    full, finish, n = finish_of(client, stream, **sampled)
    assert (finish, n) == ("length", 32)
    stop = next(full[i : i + 3] for i in range(2, len(full) // 2) if full[i : i + 3].strip())
    text, finish, n = finish_of(client, stream, stop=stop, **sampled)
    assert text == full[: full.find(stop)] and finish == "stop" and n < 32

    original = gen.stop_ids, gen.stop_texts
    # the end of turn is what the model says first (and its text is cut, as ChatModel does for <|im_end|>'s)
    gen.stop_ids, gen.stop_texts = [201], [gen.tok.decode([201])]
    try:
        for budget in (1, 5):
            text, finish, n = finish_of(client, stream, temperature=0, max_tokens=budget, **base)
            assert (text, finish, n) == ("", "stop", 1)  # the budget of 1 is used up, by the end of turn
    finally:
        gen.stop_ids, gen.stop_texts = original


def test_stop_strings_cut_the_reply_in_both_modes(tiny):
    client, _, _ = tiny
    kw = dict(model="tiny", messages=QUESTION, max_tokens=32, temperature=1.0, seed=3)
    full = client.chat.completions.create(**kw).choices[0].message.content
    stop = next(full[i : i + 3] for i in range(len(full) // 2, len(full) - 3) if full[i : i + 3].strip())
    expected = full[: full.find(stop)]
    r = client.chat.completions.create(stop=[stop, "never-appears"], **kw)
    assert r.choices[0].message.content == expected and r.choices[0].finish_reason == "stop"
    text, finish, _ = streamed(client, stop=stop, **kw)
    assert text == expected and finish == ["stop"]


def test_a_seed_repeats_a_sampled_reply(tiny):
    client, _, _ = tiny
    kw = dict(model="tiny", messages=QUESTION, max_tokens=16, temperature=1.0, top_p=0.9, seed=7)
    a, b = (client.chat.completions.create(**kw).choices[0].message.content for _ in range(2))
    assert a == b


@pytest.mark.parametrize("kw, says", [
    (dict(max_tokens=0), "max_tokens must be at least 1"),
    (dict(messages=[{"role": "wizard", "content": "hi"}]), "'wizard' is not one of"),
    (dict(messages=[]), "messages must be a non-empty list"),
    (dict(messages=[{"role": "user"}]), "messages[0] has no content"),
    (dict(messages=[{"content": "hi"}]), "messages[0] has no role"),
    (dict(n=2), "n must be 1"),
    (dict(temperature=-0.5), "temperature must be >= 0"),
])
def test_bad_requests_are_400_with_our_message(tiny, kw, says):
    client, _, _ = tiny
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(**{"model": "tiny", "messages": QUESTION, **kw})
    assert says in err.value.message
    assert err.value.body["type"] == "invalid_request_error" and err.value.body["param"]


def test_malformed_json_and_unknown_paths(tiny):
    _, port, _ = tiny
    code, body = raw(port, "POST", "/v1/chat/completions", b"{not json")
    assert code == 400 and "not valid JSON" in body["error"]["message"]
    assert set(body["error"]) == {"message", "type", "param", "code"}
    code, body = raw(port, "POST", "/v1/chat/completions", b"[1, 2]")
    assert code == 400 and "JSON object" in body["error"]["message"]
    assert raw(port, "GET", "/v1/nothing")[0] == 404
    assert raw(port, "POST", "/v1/completions", b"{}")[0] == 404


class GenerationSpy:
    """Wraps a model's generate: counts the generations running at once (the most of them in ``peak``) and makes
    each take at least ``hold`` seconds, so that requests that were not serialised would overlap."""

    def __init__(self, model, hold: float = 0.0) -> None:  # noqa: ANN001
        self.model, self.hold, self.generate = model, hold, model.generate
        self.running = self.peak = 0
        self.calls: list[tuple[int, int]] = []  # (max_new_tokens, tokens generated)
        self.guard = threading.Lock()

    def __call__(self, **kw):  # noqa: ANN003, ANN204
        with self.guard:
            self.running += 1
            self.peak = max(self.peak, self.running)
        try:
            time.sleep(self.hold)
            out = self.generate(**kw)
        finally:
            with self.guard:
                self.running -= 1
        with self.guard:
            self.calls.append((kw["max_new_tokens"], out.shape[1] - kw["input_ids"].shape[1]))
        return out

    def __enter__(self) -> GenerationSpy:
        self.model.generate = self
        return self

    def __exit__(self, *exc) -> None:  # noqa: ANN002
        del self.model.generate


def test_concurrent_requests_are_served_one_at_a_time(tiny):
    """Six requests sent at once, three streamed: every generation holds the model alone (at most one running at any
    moment, though all six were in flight together), and each reply is what the request alone would get."""
    client, _, gen = tiny
    asks = [dict(messages=QUESTION, max_tokens=6 + i, temperature=1.0, seed=i, stream=i % 2 == 1) for i in range(6)]
    expected = [gen.complete(parse_chat_request(a)).text for a in asks]
    got: dict[int, str] = {}
    spans: list[tuple[float, float]] = []
    start = threading.Barrier(len(asks))

    def ask(i: int) -> None:
        start.wait()
        t0 = time.monotonic()
        kw = {k: v for k, v in asks[i].items() if k != "stream"}
        if asks[i]["stream"]:
            got[i] = streamed(client, model="tiny", **kw)[0]
        else:
            got[i] = client.chat.completions.create(model="tiny", **kw).choices[0].message.content
        spans.append((t0, time.monotonic()))

    with GenerationSpy(gen.model, hold=0.25) as spy:
        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(asks))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert len(spy.calls) == len(asks) and spy.peak == 1
    assert max(a for a, _ in spans) < min(b for _, b in spans)  # all in flight together: overlap was possible
    assert [got.get(i) for i in range(len(asks))] == expected


def test_parse_chat_request_defaults_and_content_parts():
    req = parse_chat_request({"messages": [{"role": "developer", "content": [{"type": "text", "text": "be "},
                                                                              {"type": "text", "text": "brief"}]},
                                           {"role": "user", "content": "hi"}], "stop": "x"})
    assert req.messages[0] == {"role": "system", "content": "be brief"}
    assert req.temperature == 1.0 and req.stop == ["x"] and not req.stream
    with pytest.raises(RequestError, match="stream must be"):
        parse_chat_request({"messages": [{"role": "user", "content": "hi"}], "stream": "yes"})


def test_stop_text_holds_back_a_possible_stop_string():
    cut = StopText(["END"])
    assert cut.feed("abcE") == "ab" and cut.feed("N") == "c" and cut.feed("Dxyz") == ""
    assert cut.stopped and cut.finish() == ""
    cut = StopText(["END"])
    assert cut.feed("abEN") + cut.finish() == "abEN"


# ------------------------------------------------------------------------------------------- hardening

POST = b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
GOOD = json.dumps({"messages": QUESTION, "max_tokens": 2, "temperature": 0}).encode()
ERROR_KEYS = {"message", "type", "param", "code"}


def post(headers: str, body: bytes = b"") -> bytes:
    return POST + headers.encode("latin-1") + b"\r\n" + body  # the bytes http.server decodes headers from


@dataclass
class Reply:
    status: int | None  # None: no status line (http.server answers a garbled request line the HTTP/0.9 way)
    head: str
    body: dict | None
    seconds: float  # until the server closed the connection


def exchange(port: int, data: bytes, timeout: float = 20) -> Reply:
    """Send raw bytes and read until the server closes the connection."""
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        reply = b""
        while chunk := s.recv(1 << 16):
            reply += chunk
    interim = b""  # a '100 Continue' before the answer: kept in head, for the tests that must not see one
    while reply.startswith(b"HTTP/1.1 100 "):
        first, _, reply = reply.partition(b"\r\n\r\n")
        interim += first + b"\r\n"
    head, _, body = reply.partition(b"\r\n\r\n") if reply.startswith(b"HTTP/") else (b"", b"", reply)
    status = int(head.split()[1]) if head else None
    return Reply(status, (interim + head).decode("latin-1"), json.loads(body) if body else None,
                 time.monotonic() - t0)


@pytest.fixture(scope="module")
def quick(tiny):
    """A second server on the same model with a read timeout of 0.5 s (10 by default): (port, ChatModel)."""
    _, _, gen = tiny
    server = make_server(gen, "tiny", "127.0.0.1", 0, read_timeout=0.5)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1], gen
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def keyed(tiny):
    """The model behind a server that wants an API key: (port, openai client with that key)."""
    _, _, gen = tiny
    server = make_server(gen, "tiny", "127.0.0.1", 0, api_key="s3cret-key")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    yield port, openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="s3cret-key", max_retries=0)
    server.shutdown()
    server.server_close()


def settled_threads(at_most: int, timeout: float = 6.0) -> int:
    """The thread count once it is at most at_most, or what it still is after timeout seconds."""
    end = time.monotonic() + timeout
    while threading.active_count() > at_most and time.monotonic() < end:
        time.sleep(0.05)
    return threading.active_count()


SURROGATE = b'{"messages": [{"role": "user", "content": "\\ud800"}]}'
FRAMING = {  # what the client sends: (status, error code, words of the message)
    "no length": (post(""), 411, "length_required", "needs a Content-Length"),
    "chunked": (post("Transfer-Encoding: chunked\r\n", b"5\r\nhello\r\n0\r\n\r\n"), 411, "length_required",
                "chunked"),
    "non-numeric length": (post("Content-Length: abc\r\n", GOOD), 400, "invalid_content_length", "'abc'"),
    "negative length": (post("Content-Length: -5\r\n", GOOD), 400, "invalid_content_length", "'-5'"),
    "Unicode digits length": (post("Content-Length: ²³\r\n", GOOD), 400, "invalid_content_length", "'²³'"),
    "two lengths": (post(f"Content-Length: {len(GOOD)}\r\nContent-Length: 3\r\n", GOOD), 400,
                    "invalid_content_length", "conflicting"),
    "over the limit": (post(f"Content-Length: {MAX_BODY_BYTES + 1}\r\n"), 413, "request_too_large",
                       f"limit of {MAX_BODY_BYTES} bytes"),
    # more than the kernel's socket buffers hold: without the server's lingering close, the client sees a reset
    "2 GB, 16 MiB of it sent at once": (post("Content-Length: 2000000000\r\n", b"x" * (16 << 20)), 413,
                                        "request_too_large", "2000000000 bytes"),
    "5000-digit length": (post(f"Content-Length: {'9' * 5000}\r\n"), 413, "request_too_large", "larger"),
    "2 GB, asked first": (post("Content-Length: 2000000000\r\nExpect: 100-continue\r\n"), 413,
                          "request_too_large", "larger"),
    "not UTF-8": (post("Content-Length: 6\r\n", b'"\xff\xfe"  '), 400, None, "not valid UTF-8"),
    "JSON nested 100000 deep": (post("Content-Length: 100000\r\n", b"[" * 100000), 400, None, "not valid JSON"),
    "a lone surrogate": (post(f"Content-Length: {len(SURROGATE)}\r\n", SURROGATE), 400, None, "lone surrogate"),
    "unknown method": (b"BREW /v1/models HTTP/1.1\r\nHost: x\r\n\r\n", 501, None, "Unsupported method"),
    "header too long": (b"GET /v1/models HTTP/1.1\r\nX-Long: " + b"a" * 70000 + b"\r\n\r\n", 431, "invalid_request",
                        "Line too long"),
}


@pytest.mark.parametrize("case", FRAMING)
def test_bad_framing_is_refused_in_openai_shape_without_reading_or_waiting(tiny, capfd, case):
    """Each refusal: its status, OpenAI's error body, the connection closed at once (well before the server's read
    timeout of 10 s: nothing waited for a body), one log line and no traceback; the next request is answered."""
    _, port, _ = tiny
    data, status, code, says = FRAMING[case]
    r = exchange(port, data)
    assert r.status == status and r.body is not None and set(r.body["error"]) == ERROR_KEYS, r
    assert r.body["error"]["code"] == code and says in r.body["error"]["message"]
    assert r.seconds < 5.0 and "Connection: close" in r.head
    assert "100 Continue" not in r.head
    assert exchange(port, post(f"Content-Length: {len(GOOD)}\r\nConnection: close\r\n", GOOD)).status == 200
    log = "".join(capfd.readouterr())
    assert f'" {status} ' in log and "Traceback" not in log


def test_an_exception_escaping_a_handler_is_one_log_line(tiny, capfd, monkeypatch):
    """(A bug stands in for what can escape: a client gone while its refusal is written.)"""
    _, port, _ = tiny

    def bug(headers, limit):  # noqa: ANN001, ANN202
        raise ValueError("a bug")

    monkeypatch.setattr(serve, "_content_length", bug)
    r = exchange(port, post("Content-Length: 2\r\n", b"{}"))
    assert (r.status, r.body) == (None, None)  # closed without an answer
    monkeypatch.undo()
    assert exchange(port, post(f"Content-Length: {len(GOOD)}\r\nConnection: close\r\n", GOOD)).status == 200
    log = "".join(capfd.readouterr())
    assert "127.0.0.1 connection dropped: ValueError: a bug" in log and "Traceback" not in log


def test_a_garbled_request_line_is_answered_and_logged_escaped(tiny, capfd):
    _, port, _ = tiny
    r = exchange(port, b"\x00\x1b[31m\xff\xfe GARBAGE HTTP/x\r\n\r\n")
    assert r.status is None and r.body["error"]["type"] == "invalid_request_error"  # HTTP/0.9-style: no status line
    log = "".join(capfd.readouterr())
    assert "\\x1b[31m" in log and "\x1b" not in log and "Traceback" not in log


def test_a_body_slower_than_the_timeout_is_408_and_frees_its_thread(quick, capfd):
    """One byte every 0.2 s keeps each read well inside the 0.5 s timeout: the deadline is for the whole body."""
    port, _ = quick
    before = threading.active_count()
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(post("Content-Length: 1000\r\n", b"{"))
        reply = b""
        while time.monotonic() - t0 < 8:
            if select.select([s], [], [], 0.2)[0]:
                if not (chunk := s.recv(1 << 16)):
                    break
                reply += chunk
            else:
                s.sendall(b" ")
    seconds = time.monotonic() - t0
    assert reply.startswith(b"HTTP/1.1 408 "), reply
    assert json.loads(reply.partition(b"\r\n\r\n")[2])["error"]["code"] == "request_timeout"
    assert 0.5 <= seconds < 4.0  # the trickle alone would take 200 s
    assert settled_threads(before) <= before
    # a client that says nothing at all is let go after the timeout too
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"POST /v1/chat/comp")
        t0 = time.monotonic()
        assert s.recv(100) == b"" and time.monotonic() - t0 < 4.0
    log = "".join(capfd.readouterr())
    assert '" 408 (the request body did not arrive within 0.5 s)' in log and "Request timed out" in log
    assert "Traceback" not in log


def test_max_tokens_and_prompts_past_the_context_are_400(tiny):
    client, _, gen = tiny
    n = gen.prompt(parse_chat_request({"messages": QUESTION}))[0].shape[1]
    assert gen.context == 1024 and n < 100
    for key in ("max_tokens", "max_completion_tokens"):
        for stream in (False, True):
            with pytest.raises(openai.BadRequestError) as err:
                client.chat.completions.create(model="tiny", messages=QUESTION, stream=stream, **{key: 100_000_000})
            e = err.value.body
            assert (e["param"], e["code"]) == (key, "context_length_exceeded")
            assert f"{key} is too large: 100000000" in e["message"] and "context length is 1024 tokens" in \
                e["message"] and f"the messages take {n}, so at most {1024 - n} can be generated" in e["message"]
    long = [{"role": "user", "content": "word " * 1100}]
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model="tiny", messages=long, max_tokens=1, stream=stream)
        assert (err.value.body["param"], err.value.body["code"]) == ("messages", "context_length_exceeded")
        assert "maximum context length is 1024 tokens" in err.value.body["message"]


def test_max_tokens_up_to_what_the_context_leaves(tiny):
    """The exact edge: the room left is allowed, one more is not; the default max_tokens shrinks to the room."""
    _, _, gen = tiny
    n = gen.prompt(parse_chat_request({"messages": QUESTION}))[0].shape[1]
    assert gen.prompt(parse_chat_request({"messages": QUESTION, "max_tokens": 1024 - n}))[1] == 1024 - n
    with pytest.raises(RequestError, match=f"at most {1024 - n} can"):
        gen.prompt(parse_chat_request({"messages": QUESTION, "max_tokens": 1025 - n}))
    assert gen.prompt(parse_chat_request({"messages": QUESTION}))[1] == DEFAULT_MAX_TOKENS
    long = [{"role": "user", "content": "word " * 600}]
    ids, budget = gen.prompt(parse_chat_request({"messages": long}))
    assert 1024 - ids.shape[1] < DEFAULT_MAX_TOKENS and budget == 1024 - ids.shape[1]


def test_the_context_comes_from_the_config_else_the_tokenizer():
    def model(**config):  # noqa: ANN003, ANN202
        cfg = SimpleNamespace(**config)
        cfg.get_text_config = lambda: cfg
        return SimpleNamespace(config=cfg)

    def tok(n: int) -> SimpleNamespace:
        return SimpleNamespace(model_max_length=n)

    assert context_length(model(max_position_embeddings=2048), tok(4096)) == 2048
    dynamic = {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 4.0}  # patches/rope.py's dynamic_ntk
    assert context_length(model(max_position_embeddings=2048, rope_parameters=dynamic), tok(8192)) == 8192
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 2048}
    assert context_length(model(max_position_embeddings=8192, rope_parameters=yarn), tok(8192)) == 8192
    assert context_length(model(), tok(4096)) == 4096
    assert context_length(model(), tok(int(1e30))) is None  # transformers' "no limit known"


def test_an_api_key_is_required_when_set(keyed):
    port, client = keyed
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=2).choices[0].message.content
    assert streamed(client, model="tiny", messages=QUESTION, max_tokens=2)[1]
    for auth in ("", "Authorization: Bearer wrong\r\n", "Authorization: Basic s3cret-key\r\n",
                 "Authorization: Bearer s3cret-key-and-more\r\n", "Authorization: Bearer s3cret-ke\r\n"):
        for request in (f"GET /v1/models HTTP/1.1\r\nHost: x\r\n{auth}\r\n".encode(),
                        post(f"{auth}Content-Length: 2000000000\r\n")):  # the key comes before the size
            r = exchange(port, request)
            assert r.status == 401 and r.body["error"]["code"] == "invalid_api_key", (auth, r)
            assert set(r.body["error"]) == ERROR_KEYS and "WWW-Authenticate: Bearer" in r.head
    wrong = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=2)


@pytest.mark.parametrize("host, loopback", [
    ("127.0.0.1", True), ("127.8.9.10", True), ("::1", True), ("localhost", True), ("LocalHost", True),
    ("0.0.0.0", False), ("", False), ("::", False), ("192.0.2.7", False), ("example.com", False),
])
def test_listening_beyond_loopback_needs_a_key(monkeypatch, host, loopback):
    """Checked before the weights load (a refused start costs nothing); with a key, any host goes on to load."""
    class Loaded(Exception):
        pass

    def load(path: str):  # noqa: ANN202
        raise Loaded

    monkeypatch.setattr(serve, "load_generator", load)
    assert is_loopback(host) is loopback
    if loopback:
        with pytest.raises(Loaded):
            serve.run_serve("builtin:tiny-llama", host, 0, None, None)
    else:
        with pytest.raises(UserError) as err:
            serve.run_serve("builtin:tiny-llama", host, 0, None, None)
        assert "--api-key" in str(err.value) and "TUNELAB_API_KEY" in str(err.value)
    with pytest.raises(Loaded):
        serve.run_serve("builtin:tiny-llama", host, 0, None, "a-key")


def test_the_cli_refuses_an_open_host_and_takes_the_key_from_the_environment(monkeypatch):
    from typer.testing import CliRunner

    from tunelab.cli import app

    monkeypatch.delenv("TUNELAB_API_KEY", raising=False)
    monkeypatch.setattr(serve, "load_generator", lambda path: pytest.fail("got past the check: would serve"))
    r = CliRunner().invoke(app, ["serve", "builtin:tiny-llama", "--host", "0.0.0.0"])
    assert r.exit_code == 2 and "--api-key" in r.output and "TUNELAB_API_KEY" in r.output
    seen = []
    monkeypatch.setattr(serve, "run_serve", lambda *args: seen.append(args))
    r = CliRunner().invoke(app, ["serve", "builtin:tiny-llama", "--host", "0.0.0.0"], env={"TUNELAB_API_KEY": "k1"})
    assert r.exit_code == 0 and seen[-1] == ("builtin:tiny-llama", "0.0.0.0", 8000, None, "k1")
    r = CliRunner().invoke(app, ["serve", "builtin:tiny-llama", "--api-key", "k2"])
    assert r.exit_code == 0 and seen[-1][-1] == "k2"


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback here")
def test_serving_on_the_ipv6_loopback(tiny):
    """::1 counts as loopback (no key needed), so the server must be able to listen there."""
    _, _, gen = tiny
    server = make_server(gen, "tiny", "::1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with socket.create_connection(("::1", server.server_address[1]), timeout=10) as s:
            s.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            reply = b"".join(iter(lambda: s.recv(1 << 16), b""))
        assert reply.startswith(b"HTTP/1.1 200 ") and b'"id": "tiny"' in reply
    finally:
        server.shutdown()
        server.server_close()


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def test_a_bounded_load_leaves_the_server_answering_and_every_good_request_right(quick, capfd):
    """16 clients at once on 127.0.0.1, 3 rounds each (about 5 s on one core): 7 send well-formed requests (4
    whole, 3 streamed; seeded sampling, so every reply differs and a mixed-up one shows), 2 garbage, 2 claim a
    2 GB body and hang up, 1 hangs up mid-body, 2 trickle a body past the timeout, 2 hang up mid-stream.

    After it: every well-formed reply equals the request answered alone, no client hung, the model ran one
    generation at a time and the abandoned streams stopped generating, the server still answers, its thread
    count is back to where it was, resident memory grew by less than 64 MiB, the log has no traceback.
    """
    port, gen = quick
    roles = ["whole"] * 4 + ["stream"] * 3 + ["garbage"] * 2 + ["too big"] * 2 + ["gone mid-body"] + \
        ["slow body"] * 2 + ["gone mid-stream"] * 2
    rounds = 3

    def body(c: int, r: int, **kw) -> dict:  # noqa: ANN003
        return {"messages": [{"role": "user", "content": f"client {c} asks question {r}"}], "temperature": 1.0,
                "seed": 100 * c + r, "max_tokens": 4 + (c + r) % 8, **kw}

    expected = {(c, r): gen.complete(parse_chat_request(body(c, r)))
                for c, role in enumerate(roles) if role in ("whole", "stream") for r in range(rounds)}
    garbage = [os.urandom(300) + b"\r\n\r\n", post("Content-Length: abc\r\n", GOOD), post("Content-Length: -1\r\n"),
               post(""), post("Content-Length: 50\r\n", b"\xff" * 50), post("Content-Length: 9000\r\n", b"[" * 9000)]
    got: dict[tuple[int, int], tuple[str, str, int]] = {}
    problems: list[str] = []

    def well_formed(c: int, r: int, stream: bool) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("POST", "/v1/chat/completions", json.dumps(body(c, r, stream=stream)),
                     {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            problems.append(f"client {c} round {r}: {resp.status} {resp.read()[:200]!r}")
        elif not stream:
            out = json.loads(resp.read())
            got[c, r] = (out["choices"][0]["message"]["content"], out["choices"][0]["finish_reason"],
                         out["usage"]["completion_tokens"])
        else:
            events = [json.loads(line[6:]) for line in resp if line.startswith(b"data: {")]
            got[c, r] = ("".join(e["choices"][0]["delta"].get("content", "") for e in events),
                         events[-1]["choices"][0]["finish_reason"], events[-1]["usage"]["completion_tokens"])
        conn.close()

    def raw_socket(c: int, r: int, role: str) -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            if role == "garbage":
                s.sendall(garbage[(c * rounds + r) % len(garbage)])  # the two garbage clients send each kind once
            elif role == "too big":
                s.sendall(post("Content-Length: 2000000000\r\n", b"x" * (1 << 16)))
                if r % 2:  # hang up without reading the 413, or read it
                    return
            elif role == "gone mid-body":
                s.sendall(post("Content-Length: 1000\r\n", b'{"messages": '))
                return
            elif role == "slow body":
                s.sendall(post("Content-Length: 1000\r\n", b'{"messages": '))
            elif role == "gone mid-stream":
                data = json.dumps(body(c, r, stream=True, max_tokens=300)).encode()
                s.sendall(post(f"Content-Length: {len(data)}\r\n", data))
                while (chunk := s.recv(1 << 16)) and b"data: {" not in chunk:  # the first chunk, then leave
                    pass
                if not chunk:
                    problems.append(f"client {c} (gone mid-stream) round {r}: closed before the first chunk")
                return
            reply = b""
            while chunk := s.recv(1 << 16):
                reply += chunk
        status = int(reply.split()[1]) if reply.startswith(b"HTTP/1.1 ") else None
        allowed = {"garbage": (None, 400, 411), "too big": (413,), "slow body": (408,)}[role]
        if status not in allowed or b'"error"' not in reply:
            problems.append(f"client {c} ({role}) round {r}: {reply[:200]!r}")

    def client(c: int) -> None:
        for r in range(rounds):
            try:
                if roles[c] in ("whole", "stream"):
                    well_formed(c, r, roles[c] == "stream")
                else:
                    raw_socket(c, r, roles[c])
            except Exception as exc:  # noqa: BLE001 -- reported below, with the client
                problems.append(f"client {c} ({roles[c]}) round {r}: {type(exc).__name__}: {exc}")

    assert exchange(port, post(f"Content-Length: {len(GOOD)}\r\nConnection: close\r\n", GOOD)).status == 200
    threads_before, rss_before = threading.active_count(), rss_mib()
    t0 = time.monotonic()
    with GenerationSpy(gen.model) as spy:
        clients = [threading.Thread(target=client, args=(c,)) for c in range(len(roles))]
        for t in clients:
            t.start()
        for t in clients:
            t.join(60)
    seconds = time.monotonic() - t0
    assert not [t for t in clients if t.is_alive()] and not problems, problems
    assert got == {k: (v.text, v.finish_reason, v.completion_tokens) for k, v in expected.items()}
    assert exchange(port, post(f"Content-Length: {len(GOOD)}\r\nConnection: close\r\n", GOOD)).status == 200
    threads_after = settled_threads(threads_before)
    assert spy.peak == 1
    abandoned = [n for budget, n in spy.calls if budget == 300]
    assert len(abandoned) == 2 * rounds and max(abandoned) < 100, abandoned  # stopped once the client was gone
    assert threads_after <= threads_before
    grown = rss_mib() - rss_before
    assert grown < 64, f"resident memory grew by {grown:.0f} MiB"
    log = "".join(capfd.readouterr())
    assert "Traceback" not in log
    for status in ("400", "408", "411", "413"):
        assert f'" {status} (' in log
    print(f"load: {seconds:.1f} s, {len(spy.calls)} generations (abandoned streams: {abandoned} tokens), "
          f"{grown:+.1f} MiB resident, threads {threads_before} -> {threads_after}")


# ------------------------------------------------------------------------------------------- trained


@pytest.mark.slow
def test_the_trained_model_stops_at_its_end_of_turn(trained):
    client, gen = trained
    assert gen.stop_ids == [2]
    r = client.chat.completions.create(model="quickstart", messages=QUESTION, max_tokens=100, temperature=0)
    content = r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens < 100
    assert content and "<|im_end|>" not in content and "<|im_start|>" not in content
    text, finish, _ = streamed(client, model="quickstart", messages=QUESTION, max_tokens=100, temperature=0)
    assert text == content and finish == ["stop"]


@pytest.mark.slow
def test_the_trained_model_cut_short_is_length(trained):
    client, _ = trained
    story = [{"role": "user", "content": "Write a long story about a dragon who learns to bake bread."}]
    r = client.chat.completions.create(model="quickstart", messages=story, max_tokens=3, temperature=0)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3
    text, finish, _ = streamed(client, model="quickstart", messages=story, max_tokens=3, temperature=0)
    assert text == r.choices[0].message.content and finish == ["length"]


# ------------------------------------------------------------------------------------------- chat


def test_conversation_keeps_the_history():
    conv = Conversation("be brief")
    assert conv.messages("hi") == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    conv.add("hi", "hello!")
    assert conv.messages("again") == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                                      {"role": "assistant", "content": "hello!"}, {"role": "user", "content": "again"}]
    conv.reset()
    assert conv.messages("x") == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "x"}]


def test_chat_loop_streams_keeps_history_resets_and_exits(tiny):
    _, _, gen = tiny
    lines = iter(["hello", "", "and then?", "/reset", "hello", "/exit", "never read"])
    seen: list[list[dict[str, str]]] = []
    original = gen.stream

    def spy(req, cancel=None, prompt=None):  # noqa: ANN001, ANN202
        seen.append([dict(m) for m in req.messages])
        return original(req, cancel, prompt)

    gen.stream = spy
    out: list[str] = []
    conv = Conversation()
    try:
        chat_loop(gen, conv, ChatRequest(messages=[], max_tokens=6, temperature=0), lambda p: next(lines), out.append)
    finally:
        del gen.stream
    assert [len(m) for m in seen] == [1, 3, 1]
    assert seen[1][:2] == [{"role": "user", "content": "hello"}, seen[1][1]] and seen[1][1]["role"] == "assistant"
    assert seen[1][2] == {"role": "user", "content": "and then?"}
    assert "(history cleared)\n" in out and next(lines) == "never read"
    assert conv.turns[0]["content"] == "hello" and len(conv.turns) == 2
    # end of input (Ctrl-D) ends the loop too
    chat_loop(gen, Conversation(), ChatRequest(messages=[]), lambda p: (_ for _ in ()).throw(EOFError), out.append)


def test_chat_loop_says_when_the_history_outgrows_the_context(tiny):
    _, _, gen = tiny
    lines = iter(["word " * 1100, "/reset", "hi", "/exit"])
    out: list[str] = []
    chat_loop(gen, Conversation(), ChatRequest(messages=[], max_tokens=2, temperature=0), lambda p: next(lines),
              out.append)
    assert any("maximum context length is 1024 tokens" in o and "/reset clears the history" in o for o in out)
    assert out.count("assistant> ") == 1  # the next message is answered


def _tmux(sock: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["tmux", "-L", sock, *args], capture_output=True, text=True, timeout=30)


def _wait_for(pred, timeout: float = 90.0, every: float = 0.3):  # noqa: ANN001, ANN202
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        got = pred()
        if got:
            return got
        time.sleep(every)
    return None


@pytest.mark.slow
@pytest.mark.skipif(not shutil.which("tmux"), reason="tmux is not installed")
def test_tunelab_chat_in_a_terminal(quickstart_sft):
    """The real `tunelab chat` in a tmux pane: a reply, a second turn that sees the first, /reset, /exit."""
    from conftest import tunelab_cmd

    run_dir, rc, out, err = quickstart_sft
    assert rc == 0, out + err
    sock, session = f"tunelab-test-{os.getpid()}", f"chat{os.getpid()}"
    cmd = " ".join([*tunelab_cmd(), "chat", str(run_dir), "--max-new-tokens", "60"])
    assert _tmux(sock, "new-session", "-d", "-s", session, "-x", "200", "-y", "50", cmd).returncode == 0

    def pane() -> str:
        return _tmux(sock, "capture-pane", "-p", "-t", session, "-S", "-200").stdout

    def turns() -> list[tuple[int, int, int]]:
        import re

        return [tuple(map(int, m)) for m in re.findall(r"\[turn (\d+): (\d+) prompt tokens, (\d+) reply tokens\]",
                                                       pane())]

    try:
        assert _wait_for(lambda: "you>" in pane()), pane()  # capture-pane drops trailing blanks
        _tmux(sock, "send-keys", "-t", session, "What is the capital of France?", "Enter")
        assert _wait_for(lambda: len(turns()) == 1), pane()
        text = pane()
        reply = text.split("assistant> ", 1)[1].split("\n", 1)[0].strip()
        assert reply and "<|im_end|>" not in text
        _tmux(sock, "send-keys", "-t", session, "What is the capital of France?", "Enter")
        assert _wait_for(lambda: len(turns()) == 2), pane()
        (n1, p1, c1), (n2, p2, _) = turns()
        assert (n1, n2) == (1, 2) and p2 > p1 + c1  # the second prompt holds the first turn
        _tmux(sock, "send-keys", "-t", session, "/reset", "Enter")
        assert _wait_for(lambda: "(history cleared)" in pane()), pane()
        _tmux(sock, "send-keys", "-t", session, "What is the capital of France?", "Enter")
        assert _wait_for(lambda: len(turns()) == 3), pane()
        assert turns()[2][:2] == (1, p1)  # after /reset: the first prompt again
        _tmux(sock, "send-keys", "-t", session, "/exit", "Enter")
        assert _wait_for(lambda: _tmux(sock, "has-session", "-t", session).returncode != 0, timeout=30), pane()
    finally:
        _tmux(sock, "kill-server")
