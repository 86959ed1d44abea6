"""``tunelab serve`` and ``tunelab chat``: a trained model behind an OpenAI-compatible HTTP API, or in a terminal.

The server speaks the subset of the OpenAI API that chat clients use: ``GET /v1/models`` and
``POST /v1/chat/completions`` (``messages``, ``max_tokens`` / ``max_completion_tokens``,
``temperature`` (0: greedy; omitted: 1.0, OpenAI's default), ``top_p``, ``stop``, ``seed``,
``stream``). Prompts are rendered with the chat template the model was trained with (what
``load_for_inference`` recognises) and generation stops at the template's end-of-turn token
(``end_of_turn_ids``), whose text never reaches the reply. One request generates at a time (a
lock): this is a server for trying a model and for evaluation harnesses, not for throughput.

A ``model`` field naming another model is accepted and answered by the one served model (the
reply's ``model`` says which): clients that insist on a model name of their own still work.

Why not ``transformers serve``: its model manager (transformers/cli/serving/model_manager.py,
``_load_model`` / ``_load_processor``) takes a hub id or path, ``"id@revision"``, and loads it
itself with ``AutoConfig``/``AutoModel*.from_pretrained`` and ``AutoTokenizer``/``AutoProcessor``;
there is no way to hand it a model already loaded. So it cannot serve what tunelab loads: a run
directory, a LoRA adapter merged onto its base, ``builtin:tiny-*``, an MLA-converted checkpoint, or
a tokenizer whose registry template (and end-of-turn token) tunelab recognised. It also needs
fastapi and uvicorn, which tunelab does not depend on. This server uses the standard library
(``http.server.ThreadingHTTPServer``) and transformers' own ``generate`` / ``TextIteratorStreamer``.

vLLM is not implemented (it is not installed here): there is no ``--backend vllm``.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Generator

from tunelab.data.templates import end_of_turn_ids
from tunelab.errors import Problem, UserError
from tunelab.log import say
from tunelab.models.inference import load_for_inference

DEFAULT_MAX_TOKENS = 512
ROLES = ("system", "developer", "user", "assistant")


class RequestError(Exception):
    """A request the API rejects: answered with OpenAI's error shape."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None,
                 status: int = HTTPStatus.BAD_REQUEST, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.message, self.param, self.code, self.status, self.kind = message, param, code, int(status), kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class ChatRequest:
    """A validated ``/v1/chat/completions`` body."""

    messages: list[dict[str, str]]
    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = 1.0
    top_p: float | None = None
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    stream: bool = False
    model: str | None = None


def _number(body: dict[str, Any], key: str) -> float | None:
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise RequestError(f"{key} must be a number, got {v!r}", key)
    return float(v)


def _integer(body: dict[str, Any], key: str) -> int | None:
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise RequestError(f"{key} must be an integer, got {v!r}", key)
    return v


def _content(message: Any, i: int) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: text only
        parts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise RequestError(f"messages[{i}].content: only text parts are supported", f"messages[{i}].content")
            parts.append(part["text"])
        return "".join(parts)
    raise RequestError(f"messages[{i}] has no content (a string)", f"messages[{i}].content")


def parse_chat_request(body: Any) -> ChatRequest:
    """Check a request body; a RequestError (400) names the first thing wrong."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise RequestError("messages must be a non-empty list of {role, content}", "messages")
    messages = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict) or "role" not in m:
            raise RequestError(f"messages[{i}] has no role", f"messages[{i}].role")
        if m["role"] not in ROLES:
            raise RequestError(f"messages[{i}].role {m['role']!r} is not one of {', '.join(ROLES)}",
                               f"messages[{i}].role")
        role = "system" if m["role"] == "developer" else m["role"]
        messages.append({"role": role, "content": _content(m, i)})
    req = ChatRequest(messages=messages, model=body.get("model") if isinstance(body.get("model"), str) else None)
    for key in ("max_completion_tokens", "max_tokens"):
        n = _integer(body, key)
        if n is not None:
            if n <= 0:
                raise RequestError(f"{key} must be at least 1, got {n}", key)
            req.max_tokens = n
            break
    n_choices = _integer(body, "n")
    if n_choices is not None and n_choices != 1:
        raise RequestError(f"n must be 1 (one choice per request), got {n_choices}", "n")
    temperature = _number(body, "temperature")
    if temperature is not None:
        if temperature < 0:
            raise RequestError(f"temperature must be >= 0, got {temperature}", "temperature")
        req.temperature = temperature
    top_p = _number(body, "top_p")
    if top_p is not None and not 0 < top_p <= 1:
        raise RequestError(f"top_p must be in (0, 1], got {top_p}", "top_p")
    req.top_p = top_p
    stop = body.get("stop")
    if isinstance(stop, str):
        req.stop = [stop] if stop else []
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        req.stop = [s for s in stop if s]
    elif stop is not None:
        raise RequestError("stop must be a string or a list of strings", "stop")
    req.seed = _integer(body, "seed")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError("stream must be true or false", "stream")
    req.stream = stream
    return req


class StopText:
    """Cuts generated text at the first stop string, holding back a tail that could begin one (for streaming)."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.buffer = ""
        self.stopped = False

    def feed(self, piece: str) -> str:
        """The text that can be emitted now."""
        if self.stopped:
            return ""
        self.buffer += piece
        cut = min((i for i in (self.buffer.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            out, self.buffer, self.stopped = self.buffer[:cut], "", True
            return out
        keep = len(self.buffer) - self.hold if self.hold else len(self.buffer)
        out, self.buffer = self.buffer[:keep], self.buffer[keep:]
        return out

    def finish(self) -> str:
        out, self.buffer = ("" if self.stopped else self.buffer), ""
        return out


@dataclass
class Completion:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


class ChatModel:
    """A loaded model answering chat messages, one generation at a time."""

    def __init__(self, model: Any, tokenizer: Any) -> None:
        self.model, self.tok = model, tokenizer
        self.stop_ids = end_of_turn_ids(tokenizer)
        # the end-of-turn token's text is cut too, should a tokenizer not treat it as special
        self.stop_texts = [t for t in (tokenizer.convert_ids_to_tokens(i) for i in self.stop_ids) if isinstance(t, str)]
        self.lock = threading.Lock()
        model.eval()

    def encode(self, messages: list[dict[str, str]]) -> Any:
        """The prompt's input ids (1 x L) through the model's chat template."""
        if getattr(self.tok, "chat_template", None):
            enc = self.tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True,
                                               return_tensors="pt")
            ids = enc["input_ids"]
        else:  # a base model without a template: plain text continuation
            ids = self.tok("\n".join(m["content"] for m in messages), return_tensors="pt")["input_ids"]
        return ids.to(next(self.model.parameters()).device)

    def _kwargs(self, req: ChatRequest, ids: Any) -> dict[str, Any]:
        import torch

        kw: dict[str, Any] = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=req.max_tokens,
                                  eos_token_id=self.stop_ids or None, pad_token_id=self.tok.pad_token_id)
        if req.temperature > 0:
            kw.update(do_sample=True, temperature=req.temperature, top_k=0)
            if req.top_p is not None:
                kw["top_p"] = req.top_p
        else:
            kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if req.stop:
            kw.update(stop_strings=req.stop, tokenizer=self.tok)
        if req.seed is not None:
            torch.manual_seed(req.seed)
        return kw

    def _finish(self, new: list[int], req: ChatRequest, stopped_by_text: bool) -> str:
        if stopped_by_text or (new and new[-1] in self.stop_ids) or len(new) < req.max_tokens:
            return "stop"
        return "length"

    def complete(self, req: ChatRequest) -> Completion:
        import torch

        ids = self.encode(req.messages)
        with self.lock, torch.no_grad():
            out = self.model.generate(**self._kwargs(req, ids))
        new = out[0, ids.shape[1]:].tolist()
        body = new[:-1] if new and new[-1] in self.stop_ids else new
        cut = StopText(req.stop + self.stop_texts)
        text = cut.feed(self.tok.decode(body, skip_special_tokens=True)) + cut.finish()
        return Completion(text, self._finish(new, req, cut.stopped), ids.shape[1], len(new))

    def stream(self, req: ChatRequest, cancel: threading.Event | None = None) -> Generator[str | Completion, None, None]:
        """Text pieces as they are generated, then the Completion (its text: the whole reply)."""
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        stop_event: threading.Event = cancel or threading.Event()

        class Cancelled(StoppingCriteria):
            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
                return torch.full((input_ids.shape[0],), stop_event.is_set(), dtype=torch.bool, device=input_ids.device)

        ids = self.encode(req.messages)
        streamer = TextIteratorStreamer(self.tok, skip_prompt=True, skip_special_tokens=True)
        result: dict[str, Any] = {}

        def run() -> None:
            try:
                with torch.no_grad():
                    result["out"] = self.model.generate(**kw, streamer=streamer,
                                                        stopping_criteria=StoppingCriteriaList([Cancelled()]))
            except BaseException as exc:  # noqa: BLE001 -- re-raised in the consumer
                result["error"] = exc
                streamer.end()

        with self.lock:
            kw = self._kwargs(req, ids)
            thread = threading.Thread(target=run, name="tunelab-generate", daemon=True)
            thread.start()
            cut = StopText(req.stop + self.stop_texts)
            pieces = []
            try:
                for piece in streamer:
                    text = cut.feed(piece)
                    if text:
                        pieces.append(text)
                        yield text
                tail = cut.finish()
                if tail:
                    pieces.append(tail)
                    yield tail
            finally:
                stop_event.set()  # a consumer that left early stops the generation at its next token
                thread.join()
            if "error" in result:
                raise result["error"]
            new = result["out"][0, ids.shape[1]:].tolist()
            yield Completion("".join(pieces), self._finish(new, req, cut.stopped), ids.shape[1], len(new))


# ---------------------------------------------------------------------------------------------- HTTP


def _completion_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex[:24]


def _usage(c: Completion) -> dict[str, int]:
    return {"prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
            "total_tokens": c.prompt_tokens + c.completion_tokens}


def make_handler(gen: ChatModel, name: str) -> type[BaseHTTPRequestHandler]:
    created = int(time.time())

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "tunelab-serve"

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 -- the base class's name
            say(f"{self.address_string()} {format % args}")

        def _json(self, status: int, obj: Any) -> None:
            data = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, err: RequestError) -> None:
            self._json(err.status, err.body())

        def _not_found(self) -> None:
            self._error(RequestError(f"unknown path {self.command} {self.path}", code="not_found",
                                     status=HTTPStatus.NOT_FOUND))

        def _model(self) -> dict[str, Any]:
            return {"id": name, "object": "model", "created": created, "owned_by": "tunelab"}

        def do_GET(self) -> None:  # noqa: N802 -- http.server's name
            path = self.path.split("?")[0].rstrip("/")
            if path == "/v1/models":
                self._json(200, {"object": "list", "data": [self._model()]})
            elif path == f"/v1/models/{name}":
                self._json(200, self._model())
            elif path.startswith("/v1/models/"):
                self._error(RequestError(f"the model {path[len('/v1/models/'):]!r} does not exist (serving {name!r})",
                                         "model", "model_not_found", HTTPStatus.NOT_FOUND))
            elif path == "/health":
                self._json(200, {"status": "ok"})
            else:
                self._not_found()

        def do_POST(self) -> None:  # noqa: N802
            path = self.path.split("?")[0].rstrip("/")
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            if path != "/v1/chat/completions":
                return self._not_found()
            try:
                try:
                    body = json.loads(raw or b"null")
                except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                    raise RequestError(f"the request body is not valid JSON: {exc}") from None
                req = parse_chat_request(body)
            except RequestError as err:
                return self._error(err)
            try:
                if req.stream:
                    self._stream(req)
                else:
                    c = gen.complete(req)
                    self._json(200, {"id": _completion_id(), "object": "chat.completion", "created": int(time.time()),
                                     "model": name, "choices": [{"index": 0, "message": {"role": "assistant",
                                                                                          "content": c.text},
                                                                 "finish_reason": c.finish_reason, "logprobs": None}],
                                     "usage": _usage(c)})
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True
            except Exception as exc:  # noqa: BLE001 -- the client gets the error, the server stays up
                say(f"error: {type(exc).__name__}: {exc}")
                if not req.stream:
                    self._error(RequestError(f"{type(exc).__name__}: {exc}", status=500, kind="server_error"))

        def _stream(self, req: ChatRequest) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True
            cid, now = _completion_id(), int(time.time())

            def send(delta: dict[str, Any], finish: str | None = None, usage: dict[str, int] | None = None) -> None:
                chunk: dict[str, Any] = {"id": cid, "object": "chat.completion.chunk", "created": now, "model": name,
                                         "choices": [{"index": 0, "delta": delta, "finish_reason": finish,
                                                      "logprobs": None}]}
                if usage is not None:
                    chunk["usage"] = usage
                self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                self.wfile.flush()

            send({"role": "assistant", "content": ""})
            items = gen.stream(req)
            try:
                for item in items:
                    if isinstance(item, Completion):
                        send({}, item.finish_reason, _usage(item))
                    else:
                        send({"content": item})
            finally:
                items.close()  # a client that went away: stop generating, free the lock
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()

    return Handler


def make_server(gen: ChatModel, name: str, host: str = "127.0.0.1", port: int = 8000) -> ThreadingHTTPServer:
    """A server bound to host:port (port 0: a free one, ``server.server_address[1]``), not yet serving."""
    server = ThreadingHTTPServer((host, port), make_handler(gen, name))
    server.daemon_threads = True
    return server


def load_generator(model_path: str) -> ChatModel:
    """The model (adapters merged) on the GPU when there is one, with the chat template it was trained with."""
    import torch

    model, tok = load_for_inference(model_path, merge=True)
    if torch.cuda.is_available():
        model = model.to("cuda")
    return ChatModel(model, tok)


def default_name(model_path: str) -> str:
    from pathlib import Path

    if model_path.startswith("builtin:"):
        return model_path
    p = Path(model_path.rstrip("/"))
    return p.parent.name if p.name == "final" else p.name or model_path


def run_serve(model_path: str, host: str, port: int, name: str | None) -> None:
    gen = load_generator(model_path)
    name = name or default_name(model_path)
    try:
        server = make_server(gen, name, host, port)
    except OSError as exc:
        raise UserError(Problem("--port", f"cannot listen on {host}:{port}: {exc}")) from None
    h, p = server.server_address[:2]
    h = h.decode() if isinstance(h, bytes) else h
    say(f"serving {name} ({model_path}) at http://{h}:{p}/v1 (stops at token ids {gen.stop_ids}); Ctrl-C stops")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


# ---------------------------------------------------------------------------------------------- chat


class Conversation:
    """The messages of a terminal chat: an optional system message, then the turns so far."""

    def __init__(self, system: str | None = None) -> None:
        self.system = system
        self.turns: list[dict[str, str]] = []

    def messages(self, user: str) -> list[dict[str, str]]:
        """What the model sees for the next user message (history included)."""
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.turns + [{"role": "user", "content": user}]

    def add(self, user: str, reply: str) -> None:
        self.turns += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]

    def reset(self) -> None:
        self.turns = []


def chat_loop(gen: ChatModel, conv: Conversation, req: ChatRequest, read: Callable[[str], str],
              write: Callable[[str], None]) -> None:
    """Read lines until /exit or end of input; stream each reply; /reset forgets the history."""
    while True:
        try:
            line = read("you> ")
        except EOFError:
            write("\n")
            return
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return
        if text == "/reset":
            conv.reset()
            write("(history cleared)\n")
            continue
        req.messages = conv.messages(text)
        write("assistant> ")
        done = None
        for item in gen.stream(req):
            if isinstance(item, Completion):
                done = item
            else:
                write(item)
        assert done is not None
        cut = " (cut at --max-new-tokens)" if done.finish_reason == "length" else ""
        write(f"\n[turn {len(conv.turns) // 2 + 1}: {done.prompt_tokens} prompt tokens, "
              f"{done.completion_tokens} reply tokens{cut}]\n")
        conv.add(text, done.text)


def run_chat(model_path: str, system: str | None, max_new_tokens: int, temperature: float) -> None:
    import sys

    gen = load_generator(model_path)
    say(f"chatting with {model_path}: /reset clears the history, /exit or Ctrl-D quits")

    def write(s: str) -> None:
        sys.stdout.write(s)
        sys.stdout.flush()

    req = ChatRequest(messages=[], max_tokens=max_new_tokens, temperature=temperature)
    chat_loop(gen, Conversation(system), req, input, write)
