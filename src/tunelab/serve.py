"""``tunelab serve`` and ``tunelab chat``: a trained model behind an OpenAI-compatible HTTP API, or in a terminal.

The server speaks the subset of the OpenAI API that chat clients use: ``GET /v1/models`` and
``POST /v1/chat/completions`` (``messages``, ``max_tokens`` / ``max_completion_tokens``,
``temperature`` (0: greedy; omitted: 1.0, OpenAI's default), ``top_p``, ``stop``, ``seed``,
``stream``). Prompts are rendered with the chat template the model was trained with (what
``load_for_inference`` recognises) and generation stops at the template's end-of-turn token
(``end_of_turn_ids``), whose text never reaches the reply. One request generates at a time (a
lock): this is a server for trying a model and for evaluation harnesses, not for throughput.

What a client cannot do to it: a POST needs a ``Content-Length`` (411 without one, or with a chunked body),
a numeric one (400), at most ``MAX_BODY_BYTES`` (413, refused before any of it is read); the body
must arrive within ``READ_TIMEOUT_S`` as a whole (408: a client trickling bytes cannot hold a thread),
and be UTF-8 JSON (400). The prompt and ``max_tokens`` must fit the model's context (400,
``context_length_exceeded``, naming the parameter and the limit). Every refusal is OpenAI's error
shape and one line in the log, never a traceback. With an API key (``--api-key`` or
``TUNELAB_API_KEY``) every request needs ``Authorization: Bearer KEY`` (401 otherwise); listening on
anything but loopback without one is refused at startup, since the server would then run any
prompt for anyone who can reach the port.

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

import hmac
import ipaddress
import json
import os
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from email.message import Message
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Generator

from tunelab.data.templates import end_of_turn_ids
from tunelab.errors import Problem, UserError
from tunelab.log import say
from tunelab.models.inference import load_for_inference
from tunelab.models.ref import ResolvedModel, resolve_model

DEFAULT_MAX_TOKENS = 512  # when a request names no max_tokens (and fewer when less of the context is left)
# A request body's limit. 4 MiB: a 128k-token prompt of non-ASCII text, JSON-escaped (\uXXXX), is about 1 MB, so
# no prompt that fits such a context is refused, while one request never makes a thread hold more than this.
MAX_BODY_BYTES = 4 << 20
# Seconds a connection may stay silent (or leave its reply unread), and the time a whole body has to arrive in (408).
READ_TIMEOUT_S = 10.0
# After a refusal, how long to keep reading (and dropping) what the client still sends before closing: see finish()
LINGER_S = 2.0
API_KEY_ENV = "TUNELAB_API_KEY"
# a tokenizer.model_max_length this large means "no limit known" (transformers puts VERY_LARGE_INTEGER, 1e30, there)
_NO_LIMIT = 10**9
# control characters in a logged request line (a client sending garbage) are escaped, as http.server's own log does
_ESCAPE = str.maketrans({c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0))})
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
    # the key that set max_tokens (max_tokens or max_completion_tokens), named when it does not fit the context;
    # None: the default, which is cut to what the context leaves instead
    max_tokens_param: str | None = None
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


def _text(s: str, param: str) -> str:
    """s, unless it holds a lone surrogate (JSON's '\\ud800' parses to one): the tokenizer could not encode it."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise RequestError(f"{param} is not valid Unicode (a lone surrogate)", param) from None
    return s


def _content(message: Any, i: int) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return _text(content, f"messages[{i}].content")
    if isinstance(content, list):  # content parts: text only
        parts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise RequestError(f"messages[{i}].content: only text parts are supported", f"messages[{i}].content")
            parts.append(part["text"])
        return _text("".join(parts), f"messages[{i}].content")
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
            req.max_tokens, req.max_tokens_param = n, key
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
    req.stop = [_text(x, "stop") for x in req.stop]
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


def context_length(model: Any, tokenizer: Any) -> int | None:
    """The most tokens (prompt and reply together) the model takes, or None when neither config nor tokenizer says.

    The config's ``max_position_embeddings`` first (tunelab's RoPE patch sets it to the extended length), times the
    factor for dynamic NTK, whose ``max_position_embeddings`` is where scaling starts (patches/rope.py keeps it at
    the original length); else the tokenizer's ``model_max_length`` when it is a real limit, not the 1e30 for
    "unknown".
    """
    config = model.config.get_text_config()
    n = getattr(config, "max_position_embeddings", None)
    if isinstance(n, int) and n > 0:
        rope = getattr(config, "rope_parameters", None)
        if isinstance(rope, dict) and rope.get("rope_type") == "dynamic" and rope.get("factor"):
            return int(round(n * float(rope["factor"])))
        return n
    n = getattr(tokenizer, "model_max_length", None)
    return n if isinstance(n, int) and 0 < n < _NO_LIMIT else None


class ChatModel:
    """A loaded model answering chat messages, one generation at a time."""

    def __init__(self, model: Any, tokenizer: Any) -> None:
        self.model, self.tok = model, tokenizer
        self.stop_ids = end_of_turn_ids(tokenizer)
        # the end-of-turn token's text is cut too, should a tokenizer not treat it as special
        self.stop_texts = [t for t in (tokenizer.convert_ids_to_tokens(i) for i in self.stop_ids) if isinstance(t, str)]
        self.context = context_length(model, tokenizer)
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

    def prompt(self, req: ChatRequest) -> tuple[Any, int]:
        """The prompt's ids and the reply's token budget, checked against the context (a RequestError, 400).

        A max_tokens the client set must fit beside the prompt; the default one is cut to what is left, as
        OpenAI does. The server calls this before it answers 200, so that a stream can still be refused.
        """
        ids = self.encode(req.messages)
        n, budget = ids.shape[1], req.max_tokens
        if self.context is None:
            return ids, budget
        room = self.context - n
        if room < 1:
            raise RequestError(f"This model's maximum context length is {self.context} tokens, and the messages "
                               f"take {n}: shorten them", "messages", "context_length_exceeded")
        if budget > room:
            if req.max_tokens_param is not None:
                raise RequestError(f"{req.max_tokens_param} is too large: {budget}. This model's maximum context "
                                   f"length is {self.context} tokens and the messages take {n}, so at most {room} "
                                   f"can be generated", req.max_tokens_param, "context_length_exceeded")
            budget = room
        return ids, budget

    def _kwargs(self, req: ChatRequest, ids: Any, budget: int) -> dict[str, Any]:
        import torch

        kw: dict[str, Any] = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=budget,
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

    def _finish(self, new: list[int], budget: int, stopped_by_text: bool) -> str:
        """OpenAI's finish_reason: 'length' when the budget ran out before a stop (string or end of turn)."""
        if stopped_by_text or (new and new[-1] in self.stop_ids) or len(new) < budget:
            return "stop"
        return "length"

    def complete(self, req: ChatRequest, prompt: tuple[Any, int] | None = None) -> Completion:
        """The whole reply; ``prompt``: what ``self.prompt(req)`` returned, when the caller checked it already."""
        import torch

        ids, budget = prompt or self.prompt(req)
        with self.lock, torch.no_grad():
            out = self.model.generate(**self._kwargs(req, ids, budget))
        new = out[0, ids.shape[1]:].tolist()
        body = new[:-1] if new and new[-1] in self.stop_ids else new
        cut = StopText(req.stop + self.stop_texts)
        text = cut.feed(self.tok.decode(body, skip_special_tokens=True)) + cut.finish()
        return Completion(text, self._finish(new, budget, cut.stopped), ids.shape[1], len(new))

    def stream(self, req: ChatRequest, cancel: threading.Event | None = None,
               prompt: tuple[Any, int] | None = None) -> Generator[str | Completion, None, None]:
        """Text pieces as they are generated, then the Completion (its text: the whole reply)."""
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        stop_event: threading.Event = cancel or threading.Event()

        class Cancelled(StoppingCriteria):
            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
                return torch.full((input_ids.shape[0],), stop_event.is_set(), dtype=torch.bool, device=input_ids.device)

        ids, budget = prompt or self.prompt(req)
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
            kw = self._kwargs(req, ids, budget)
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
            yield Completion("".join(pieces), self._finish(new, budget, cut.stopped), ids.shape[1], len(new))


# ---------------------------------------------------------------------------------------------- HTTP


def _completion_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex[:24]


def _usage(c: Completion) -> dict[str, int]:
    return {"prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
            "total_tokens": c.prompt_tokens + c.completion_tokens}


def _content_length(headers: Message, limit: int) -> int:
    """The body's length; a RequestError when it is missing or chunked (411), malformed (400) or over limit (413)."""
    if headers.get("Transfer-Encoding"):
        raise RequestError("a chunked request body is not supported: send it with a Content-Length",
                           code="length_required", status=HTTPStatus.LENGTH_REQUIRED)
    values = {v.strip() for v in headers.get_all("Content-Length", [])}
    if not values:
        raise RequestError("a POST needs a Content-Length header", code="length_required",
                           status=HTTPStatus.LENGTH_REQUIRED)
    if len(values) > 1:  # two framings of one body: a request smuggled past a proxy reads one, we the other
        raise RequestError("conflicting Content-Length headers", code="invalid_content_length")
    value = values.pop()
    if not (value.isascii() and value.isdigit()):  # isascii: isdigit alone takes '²' and other Unicode digits
        raise RequestError(f"Content-Length must be a non-negative integer, got {value[:32]!r}",
                           code="invalid_content_length")
    digits = value.lstrip("0")
    n = int(digits or "0") if len(digits) <= 18 else limit + 1  # int() raises past 4300 digits: never ask it
    if n > limit:
        raise RequestError(f"the request body ({value[:32]} bytes) is larger than this server's limit of {limit} "
                           "bytes", code="request_too_large", status=HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
    return n


def _json_body(raw: bytes) -> Any:
    """The parsed body; a RequestError (400) when it is not UTF-8 JSON."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RequestError(f"the request body is not valid UTF-8: {exc}") from None
    try:
        return json.loads(text or "null")
    except (ValueError, RecursionError) as exc:  # RecursionError: '[[[[...' nested deeper than Python's stack
        raise RequestError(f"the request body is not valid JSON: {exc}") from None


def make_handler(gen: ChatModel, name: str, api_key: str | None = None, max_body: int = MAX_BODY_BYTES,
                 read_timeout: float = READ_TIMEOUT_S) -> type[BaseHTTPRequestHandler]:
    """The request handler: the API above, with its refusals (see the module docstring)."""
    created = int(time.time())
    key = api_key.encode() if api_key else None

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "tunelab-serve"
        # StreamRequestHandler puts this on the socket: a silent client (no request line, no headers, a reply it
        # does not read) frees its thread after it; the body has its own deadline (_read_body)
        timeout = read_timeout
        note = ""  # why a request was refused, for its log line
        linger = False  # a refusal went out: the client may still be sending what was refused
        streaming = False  # a stream's 200 went out: an error can no longer be answered with a status

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 -- the base class's name
            say(f"{self.address_string()} {(format % args).translate(_ESCAPE)}")

        def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
            self.log_message('"%s" %s%s', self.requestline, str(code), f" ({self.note})" if self.note else "")

        def _json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
            data = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

        def _error(self, err: RequestError) -> None:
            """Answer with OpenAI's error shape and close: a refused request's body may be unread, and closing is
            the one framing that is right whatever is left of it."""
            self.note, self.linger = err.message, True
            headers = {"Connection": "close"}  # send_header sets close_connection too
            if err.status == HTTPStatus.UNAUTHORIZED:
                headers["WWW-Authenticate"] = "Bearer"
            self._json(err.status, err.body(), headers)

        def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
            """http.server's own refusals (a malformed request line, headers too long, an unknown method) in
            OpenAI's error shape, not as an HTML page."""
            text = message or self.responses.get(code, ("error",))[0]
            self._error(RequestError(text, code="invalid_request" if code < 500 else None, status=code))

        def _check_key(self) -> None:
            if key is None:
                return
            scheme, _, given = self.headers.get("Authorization", "").partition(" ")
            if not given:
                raise RequestError("no API key: send it as 'Authorization: Bearer KEY'", code="invalid_api_key",
                                   status=HTTPStatus.UNAUTHORIZED)
            # compare_digest: the time taken does not tell how much of a guess was right. Header values arrive
            # decoded as latin-1, so encoding them back gives the bytes the client sent
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode("latin-1"), key):
                raise RequestError("incorrect API key", code="invalid_api_key", status=HTTPStatus.UNAUTHORIZED)

        def handle_expect_100(self) -> bool:
            """A client that asks before sending its body (``Expect: 100-continue``) is refused before it sends."""
            try:
                self._check_key()
                if self.command == "POST":
                    _content_length(self.headers, max_body)
            except RequestError as err:
                self._error(err)
                return False
            return super().handle_expect_100()

        def _read_body(self, length: int) -> bytes:
            """The body, all of it within read_timeout (a TimeoutError otherwise): one recv at a time, so that a
            client trickling a byte now and then cannot hold the thread past the deadline either."""
            deadline = time.monotonic() + read_timeout
            chunks, got = [], 0
            try:
                while got < length:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise TimeoutError
                    self.connection.settimeout(left)
                    chunk = self.rfile.read1(length - got)  # type: ignore[attr-defined]  # a BufferedReader
                    if not chunk:
                        raise ConnectionResetError("the client closed the connection before its body arrived")
                    chunks.append(chunk)
                    got += len(chunk)
            finally:
                self.connection.settimeout(read_timeout)
            return b"".join(chunks)

        def finish(self) -> None:
            """After a refusal, drop what the client still sends for up to LINGER_S before the socket closes.

            Closing a socket with unread bytes resets the connection, and a client still writing a body we refused
            (a 5 MB POST sent in one go) would get that reset, never the 413. So: end our side, read to the
            client's close or the deadline, discarding (memory stays flat, the thread is held LINGER_S at most).
            """
            super().finish()
            if not self.linger:
                return
            try:
                self.connection.shutdown(socket.SHUT_WR)  # the reply is complete: the client reads it, then end of file
                deadline = time.monotonic() + LINGER_S
                while (left := deadline - time.monotonic()) > 0:
                    self.connection.settimeout(left)
                    if not self.connection.recv(1 << 16):
                        break
            except OSError:  # reset by the client, or the deadline: either way, done
                pass

        def _path(self) -> str:
            return self.path.split("?")[0].rstrip("/")

        def _not_found(self) -> None:
            self._error(RequestError(f"unknown path {self.command} {self.path}", code="not_found",
                                     status=HTTPStatus.NOT_FOUND))

        def _model(self) -> dict[str, Any]:
            return {"id": name, "object": "model", "created": created, "owned_by": "tunelab"}

        def do_GET(self) -> None:  # noqa: N802 -- http.server's name
            try:
                self._check_key()
            except RequestError as err:
                return self._error(err)
            path = self._path()
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
            try:
                self._check_key()
                raw = self._read_body(_content_length(self.headers, max_body))
                if self._path() != "/v1/chat/completions":
                    return self._not_found()
                req = parse_chat_request(_json_body(raw))
            except RequestError as err:
                return self._error(err)
            except TimeoutError:
                return self._error(RequestError(f"the request body did not arrive within {read_timeout:g} s",
                                                code="request_timeout", status=HTTPStatus.REQUEST_TIMEOUT))
            except ConnectionError as exc:  # nobody left to answer
                self.log_error("%s", f"{self.requestline}: {exc}")
                self.close_connection = True
                return
            try:
                prompt = gen.prompt(req)  # before the 200: a stream that does not fit is refused too
                if req.stream:
                    self._stream(req, prompt)
                else:
                    c = gen.complete(req, prompt)
                    self._json(200, {"id": _completion_id(), "object": "chat.completion", "created": int(time.time()),
                                     "model": name, "choices": [{"index": 0, "message": {"role": "assistant",
                                                                                          "content": c.text},
                                                                 "finish_reason": c.finish_reason, "logprobs": None}],
                                     "usage": _usage(c)})
            except RequestError as err:
                self._error(err)
            except (ConnectionError, TimeoutError) as exc:  # the client hung up, or stopped reading its reply
                self.log_error("%s", f"{self.requestline}: the client went away ({type(exc).__name__})")
                self.close_connection = True
            except Exception as exc:  # noqa: BLE001 -- the client gets the error, the server stays up
                self.log_error("%s", f"{self.requestline}: {type(exc).__name__}: {exc}")
                if self.streaming:
                    self.close_connection = True
                else:
                    self._error(RequestError(f"{type(exc).__name__}: {exc}", status=500, kind="server_error"))

        def _stream(self, req: ChatRequest, prompt: tuple[Any, int]) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")
            self.end_headers()
            self.streaming = self.close_connection = True
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
            items = gen.stream(req, prompt=prompt)
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


class Server(ThreadingHTTPServer):
    """A ThreadingHTTPServer on IPv4 or IPv6 whose failed connections are one line in the log, not a traceback."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler]) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        super().__init__(address, handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """What escaped a handler (a client gone mid-reply, or a bug): one line; TUNELAB_DEBUG=1 adds the traceback."""
        exc = sys.exc_info()[1]
        say(f"{client_address[0]} connection dropped: {type(exc).__name__}: {exc}")
        if os.environ.get("TUNELAB_DEBUG"):
            super().handle_error(request, client_address)


def make_server(gen: ChatModel, name: str, host: str = "127.0.0.1", port: int = 8000, *, api_key: str | None = None,
                max_body: int = MAX_BODY_BYTES, read_timeout: float = READ_TIMEOUT_S) -> Server:
    """A server bound to host:port (port 0: a free one, ``server.server_address[1]``), not yet serving."""
    return Server((host, port), make_handler(gen, name, api_key, max_body, read_timeout))


def is_loopback(host: str) -> bool:
    """Whether only this machine can reach host: localhost or a loopback address (127.0.0.0/8, ::1)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # another name, or '' (every interface)
        return False


def load_generator(source: ResolvedModel) -> ChatModel:
    """The model (adapters merged) on the GPU when there is one, with the chat template it was trained with."""
    import torch

    model, tok = load_for_inference(source, merge=True)
    if torch.cuda.is_available():
        model = model.to("cuda")
    return ChatModel(model, tok)


def default_name(source: ResolvedModel) -> str:
    """The served model's name: a built-in's ``builtin:NAME``, else the run's (or the folder's, the file's) name."""
    return source.given if source.kind in ("builtin", "real_builtin") else source.short_name


def run_serve(model_path: str, host: str, port: int, name: str | None, api_key: str | None = None) -> None:
    """Serve until Ctrl-C. Beyond loopback only with an API key, checked before the weights load."""
    if not api_key and not is_loopback(host):
        raise UserError(Problem("--host", f"{host or 'every interface'} can be reached from other machines, and "
                                "without an API key anyone who reaches it runs prompts on this model",
                                f"set a key with --api-key KEY or the {API_KEY_ENV} environment variable, "
                                "or listen on 127.0.0.1"))
    source = resolve_model(model_path, key="MODEL")
    gen = load_generator(source)
    name = name or default_name(source)
    try:
        server = make_server(gen, name, host, port, api_key=api_key or None)
    except OSError as exc:
        raise UserError(Problem("--port", f"cannot listen on {host}:{port}: {exc}")) from None
    h, p = server.server_address[:2]
    h = h.decode() if isinstance(h, bytes) else h
    h = f"[{h}]" if ":" in h else h
    limits = (f"context {gen.context} tokens" if gen.context else "context length unknown: max_tokens unbounded") + \
        (", API key required" if api_key else "")
    say(f"serving {name} ({model_path}) at http://{h}:{p}/v1 (stops at token ids {gen.stop_ids}; {limits}); "
        "Ctrl-C stops")
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
        try:
            prompt = gen.prompt(req)
        except RequestError as err:  # the history outgrew the context
            write(f"({err.message}; /reset clears the history)\n")
            continue
        write("assistant> ")
        done = None
        for item in gen.stream(req, prompt=prompt):
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

    gen = load_generator(resolve_model(model_path, key="MODEL"))
    say(f"chatting with {model_path}: /reset clears the history, /exit or Ctrl-D quits")

    def write(s: str) -> None:
        sys.stdout.write(s)
        sys.stdout.flush()

    req = ChatRequest(messages=[], max_tokens=max_new_tokens, temperature=temperature)
    chat_loop(gen, Conversation(system), req, input, write)
