"""tunelab/serve.py: the OpenAI-compatible server (through the openai client) and the terminal chat (in tmux)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.request

import pytest

from tunelab.serve import ChatRequest, Conversation, RequestError, StopText, chat_loop, load_generator, make_server, \
    parse_chat_request

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

    with GenerationSpy(gen.model, hold=0.15) as spy:
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
