"""Row formats -> canonical rows.

Canonical SFT rows are one of:
  {"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": str, ...}, ...], "tools"?: [...]}
  (an assistant message may carry ``reasoning_content`` and ``tool_calls``; a row may carry the
  function schemas its tool calls use, in ``tools``)
  {"prompt": str, "completion": str}      (plain text, no chat template)
  {"text": str}                            (language modelling, loss on every token)

Canonical preference rows (format ``preference``, for reward models and DPO) are one of:
  {"prompt": [messages], "chosen": [assistant messages], "rejected": [assistant messages]}
  {"prompt": str, "chosen": str, "rejected": str}   (plain text, no chat template)
read from ``{prompt, chosen, rejected}`` (strings or conversations) or from ``{chosen, rejected}``
conversations that share their opening turns (the shared prefix is the prompt). A pair may
carry a numeric ``margin`` (reward models subtract it inside the sigmoid).

Canonical prompt-only rows (format ``prompt``, for online RL: grpo, ppo) are
  {"prompt": [messages ending with a user turn], **extra columns}
read from ``prompt`` (a string = one user message, or a conversation). Every other column of
the row (a reference ``answer``, a task id...) is kept as it is and handed to the reward
functions.

A row that cannot be converted raises ``BadRow`` with the reason; the caller adds file and
row number and either stops or counts and skips it (``data.on_bad_row``). Every value a canonical
row carries is checked too (``check_values``): text is valid Unicode (a lone surrogate from a JSON
``\\ud800`` escape would crash the tokenizer), numbers are finite (a NaN margin would stop training at
step 1 without naming the row), and free-form values (tool-call arguments, tool schemas, extra
columns) are nested at most ``MAX_DEPTH`` deep with integers that fit in 64 bits.
"""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tunelab.specs import DataSource


ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_FIELDS = {"messages": "conversations", "role": "from", "content": "value"}
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "model": "assistant", "bot": "assistant"}
# the columns each format needs (canonical names, before the field map)
REQUIRED_FIELDS = {
    "messages": ("messages",),
    "sharegpt": ("messages",),
    "alpaca": ("instruction", "output"),
    "prompt_completion": ("prompt", "completion"),
    "text": ("text",),
    "preference": ("chosen", "rejected"),
    "prompt": ("prompt",),
}


MAX_DEPTH = 32  # nesting of a free-form value (tool-call arguments, tool schemas, extra columns)
INT64 = (-(2**63), 2**63 - 1)  # integers outside this do not fit an Arrow column (extra columns go into one)


class BadRow(ValueError):
    """A row that does not fit its format (missing field, unknown role, empty response...)."""


class Unreadable:
    """A row that could not be read (invalid JSON or UTF-8 on one line, a csv row with extra fields).

    Yielded in the row's place so that the caller treats it as a bad row (``data.on_bad_row``) with its row
    number: ``formats.convert`` raises ``BadRow`` with the reason.
    """

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _field(row: dict[str, Any], name: str, field_map: dict[str, str], required: bool = True) -> Any:
    col = field_map.get(name, name)
    if col not in row or row[col] is None:
        if required:
            cols = ", ".join(map(str, row)) if row else "none"
            raise BadRow(f"missing field {col!r} (columns: {cols}); map it with field_map: {{{name}: <column>}}")
        return None
    return row[col]


def _text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise BadRow(f"{what} must be a string, got {type(value).__name__}")
    return value


def _tool_calls(value: Any, i: int) -> list[dict[str, Any]]:
    """A message's ``tool_calls``: [{type: function, function: {name, arguments}}] (the OpenAI / HF shape)."""
    if not isinstance(value, list) or not value:
        raise BadRow(f"message {i} tool_calls must be a non-empty list of {{type, function: {{name, arguments}}}}")
    out = []
    for k, call in enumerate(value):
        fn = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise BadRow(f"message {i} tool_calls[{k}] has no function name")
        args = fn.get("arguments", {})
        if not isinstance(args, (dict, str)):
            raise BadRow(f"message {i} tool_calls[{k}] arguments must be an object or a JSON string")
        out.append({**{k2: v for k2, v in call.items() if k2 != "function"}, "type": call.get("type", "function"),
                    "function": {"name": fn["name"], "arguments": args}})
    return out


def _messages(value: Any, src: "DataSource", fmt: str) -> list[dict[str, Any]]:
    """Messages as the chat templates read them: role, content, and only the optional keys a message has.

    Optional keys: ``reasoning_content`` (also read from ``reasoning`` / ``thinking``), ``tool_calls``
    (assistant), ``name`` / ``tool_call_id`` (tool results). A key is never added when absent: some
    templates test ``'tool_calls' in message``.
    """
    fm = {**(SHAREGPT_FIELDS if fmt == "sharegpt" else {}), **src.field_map}
    role_map = {**(SHAREGPT_ROLES if fmt == "sharegpt" else {}), **src.role_map}
    role_key, content_key = fm.get("role", "role"), fm.get("content", "content")
    if not isinstance(value, list) or not value:
        raise BadRow("messages must be a non-empty list of {role, content}")
    out = []
    for i, msg in enumerate(value):
        if not isinstance(msg, dict):
            raise BadRow(f"message {i} is not a mapping")
        if role_key not in msg:
            raise BadRow(f"message {i} has no {role_key!r}")
        if not isinstance(msg[role_key], str):
            raise BadRow(f"message {i} {role_key!r} must be a string, got {type(msg[role_key]).__name__}")
        role = role_map.get(msg[role_key], msg[role_key])
        if role not in ROLES:
            known = sorted(set(ROLES) | set(role_map))
            raise BadRow(f"message {i} has unknown role {msg[role_key]!r} (known: {', '.join(map(str, known))}; "
                         "map others with role_map)")
        calls = msg.get("tool_calls")
        if content_key not in msg and not (role == "assistant" and calls):
            raise BadRow(f"message {i} has no {content_key!r}")
        content = msg.get(content_key)
        if content is None and role == "assistant" and calls:
            content = ""
        if not isinstance(content, str):
            raise BadRow(f"message {i} content must be a string, got {type(content).__name__}")
        m: dict[str, Any] = {"role": role, "content": content}
        for alias in ("reasoning_content", "reasoning", "thinking"):
            if msg.get(alias) is not None:
                if role != "assistant" or not isinstance(msg[alias], str):
                    raise BadRow(f"message {i} {alias} must be a string on an assistant message")
                m["reasoning_content"] = msg[alias]
                break
        if calls is not None:
            if role != "assistant":
                raise BadRow(f"message {i} has tool_calls but is a {role} message (only assistant messages call tools)")
            m["tool_calls"] = _tool_calls(calls, i)
        for extra in ("name", "tool_call_id"):
            if role == "tool" and isinstance(msg.get(extra), str):
                m[extra] = msg[extra]
        out.append(m)
    return out


def _check_conversation(messages: list[dict[str, Any]]) -> None:
    assistant = [m for m in messages if m["role"] == "assistant"]
    if not assistant:
        raise BadRow("conversation has no assistant message")
    if messages[-1]["role"] != "assistant":
        raise BadRow(f"the conversation ends with a {messages[-1]['role']} turn, which nothing answers: end it with "
                     "the assistant's reply, or drop the last turn")
    for i, m in enumerate(messages):
        if m["role"] == "assistant" and not m["content"].strip() and not m.get("tool_calls"):
            raise BadRow(f"message {i} (assistant) is empty")
        if m["role"] == "system" and i != 0:
            raise BadRow(f"message {i}: a system message must come first")
        if m["role"] == "tool" and (i == 0 or messages[i - 1]["role"] not in ("assistant", "tool")):
            raise BadRow(f"message {i}: a tool result must follow an assistant tool call")


def _tools(row: dict[str, Any], fm: dict[str, str]) -> list[dict[str, Any]] | None:
    """The row's ``tools`` column (function schemas handed to the chat template), if it has one."""
    tools = row.get(fm.get("tools", "tools"))
    if tools is None:
        return None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise BadRow("tools must be a list of function schemas ({type: function, function: {name, ...}})")
    return tools


def to_canonical(row: Any, src: "DataSource") -> dict[str, Any]:
    """Convert one row of ``src.format`` into a canonical SFT row; raise BadRow if it cannot."""
    if not isinstance(row, dict):
        raise BadRow(f"a row must be a mapping, got {type(row).__name__}")
    fmt, fm = src.format, src.field_map
    if fmt in ("messages", "sharegpt"):
        col = fm.get("messages", SHAREGPT_FIELDS["messages"] if fmt == "sharegpt" and "messages" not in row else "messages")
        if col not in row:
            cols = ", ".join(map(str, row)) if row else "none"
            raise BadRow(f"missing field {col!r} (columns: {cols}); map it with field_map: {{messages: <column>}}")
        messages = _messages(row[col], src, fmt)
        if src.system and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": src.system})
        _check_conversation(messages)
        tools = _tools(row, fm)
        return {"messages": messages, **({"tools": tools} if tools else {})}
    if fmt == "alpaca":
        instruction = _text(_field(row, "instruction", fm), "instruction")
        extra = _field(row, "input", fm, required=False)
        output = _text(_field(row, "output", fm), "output")
        system = _field(row, "system", fm, required=False) or src.system
        user = instruction if not extra else f"{instruction}\n\n{_text(extra, 'input')}"
        if not user.strip():
            raise BadRow("instruction is empty")
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": user}, {"role": "assistant", "content": output}]
        _check_conversation(messages)
        return {"messages": messages}
    if fmt == "prompt_completion":
        prompt, completion = _field(row, "prompt", fm), _field(row, "completion", fm)
        if isinstance(prompt, list):  # conversational prompt-completion
            messages = _messages(prompt, src, "messages")
            tail = _messages(completion, src, "messages") if isinstance(completion, list) else [
                {"role": "assistant", "content": _text(completion, "completion")}]
            messages += tail
            _check_conversation(messages)
            return {"messages": messages}
        prompt, completion = _text(prompt, "prompt"), _text(completion, "completion")
        if not completion.strip():
            raise BadRow("completion is empty")
        if not prompt.strip():
            raise BadRow("prompt is empty")
        return {"prompt": prompt, "completion": completion}
    if fmt == "text":
        text = _text(_field(row, "text", fm), "text")
        if not text.strip():
            raise BadRow("text is empty")
        return {"text": text}
    raise BadRow(f"unknown format {fmt!r}")  # the schema rules this out


def _response(value: Any, src: "DataSource", side: str) -> list[dict[str, str]]:
    """One side of a pair as assistant messages (a string is one assistant message)."""
    if isinstance(value, str):
        value = [{"role": "assistant", "content": value}]
    msgs = _messages(value, src, "messages") if value else []
    if msgs and msgs[0]["role"] != "assistant":
        raise BadRow(f"{side} must start with an assistant message, got {msgs[0]['role']!r}")
    if not any(m["role"] == "assistant" and m["content"].strip() for m in msgs):
        raise BadRow(f"{side} is empty")
    return msgs


def to_preference(row: Any, src: "DataSource") -> dict[str, Any]:
    """Convert one row into a canonical preference pair; raise BadRow if it cannot."""
    if not isinstance(row, dict):
        raise BadRow(f"a row must be a mapping, got {type(row).__name__}")
    fm = src.field_map
    chosen, rejected = _field(row, "chosen", fm), _field(row, "rejected", fm)
    prompt = _field(row, "prompt", fm, required=False)
    out: dict[str, Any]
    if prompt is None:
        if not (isinstance(chosen, list) and isinstance(rejected, list)):
            raise BadRow(f"missing field {fm.get('prompt', 'prompt')!r}: without a prompt, chosen and rejected "
                         "must be conversations that share their opening turns")
        c, r = _messages(chosen, src, "messages"), _messages(rejected, src, "messages")
        if c == r:
            raise BadRow("chosen and rejected are identical")
        k = 0
        while k < min(len(c), len(r)) and c[k] == r[k]:
            k += 1
        while k > 0 and c[k - 1]["role"] == "assistant":  # a response starts at an assistant turn
            k -= 1
        if k == 0:
            raise BadRow("chosen and rejected share no opening turns to use as the prompt; add a prompt field")
        prompt = c[:k]
        out = {"prompt": prompt, "chosen": _response(c[k:], src, "chosen"),
               "rejected": _response(r[k:], src, "rejected")}
    elif isinstance(prompt, list) or isinstance(chosen, list) or isinstance(rejected, list):
        msgs = _messages(prompt, src, "messages") if isinstance(prompt, list) else [
            {"role": "user", "content": _text(prompt, "prompt")}]
        out = {"prompt": msgs, "chosen": _response(chosen, src, "chosen"),
               "rejected": _response(rejected, src, "rejected")}
    else:
        out = {"prompt": _text(prompt, "prompt"), "chosen": _text(chosen, "chosen"),
               "rejected": _text(rejected, "rejected")}
        for side in ("chosen", "rejected"):
            if not out[side].strip():
                raise BadRow(f"{side} is empty")
    if isinstance(out["prompt"], list):
        if src.system and out["prompt"][0]["role"] != "system":
            out["prompt"].insert(0, {"role": "system", "content": src.system})
        if not any(m["role"] != "system" and m["content"].strip() for m in out["prompt"]):
            raise BadRow("prompt is empty")
        if out["prompt"][-1]["role"] == "assistant":
            raise BadRow("the prompt ends with an assistant turn; the response must be the next assistant turn")
    elif not out["prompt"].strip():
        raise BadRow("prompt is empty")
    if out["chosen"] == out["rejected"]:
        raise BadRow("chosen and rejected are identical")
    margin = _field(row, "margin", fm, required=False)
    if margin is not None:
        col = fm.get("margin", "margin")
        out["margin"] = finite_number(margin, "margin" if col == "margin" else f"margin (column {col!r})")
    return out


def finite_number(value: Any, what: str) -> float:
    """A number a method reads (a margin) as a float: refused when it is not a number, or not finite.

    A bool is not a number here (``true`` is a column type mistake); NaN or infinity would reach the
    loss and stop training at its first step without naming the row.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadRow(f"{what} must be a number, got {_short(value)} ({type(value).__name__})")
    try:
        number = float(value)
    except OverflowError:
        raise BadRow(f"{what} is an integer of {len(str(value))} digits, too large for a number") from None
    if not math.isfinite(number):
        raise BadRow(f"{what} must be a finite number, got {value!r}")
    return number


def _short(value: Any, n: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= n else text[: n - 3] + "..."


def to_prompt(row: Any, src: "DataSource") -> dict[str, Any]:
    """Convert one row into a canonical prompt-only row (prompt messages + extra columns)."""
    if not isinstance(row, dict):
        raise BadRow(f"a row must be a mapping, got {type(row).__name__}")
    col = src.field_map.get("prompt", "prompt")
    prompt = _field(row, "prompt", src.field_map)
    if isinstance(prompt, list):
        msgs = _messages(prompt, src, "messages")
    else:
        msgs = [{"role": "user", "content": _text(prompt, "prompt")}]
    if src.system and msgs and msgs[0]["role"] != "system":
        msgs.insert(0, {"role": "system", "content": src.system})
    if not any(m["role"] == "user" and m["content"].strip() for m in msgs):
        raise BadRow("prompt is empty")
    if msgs[-1]["role"] != "user":
        raise BadRow(f"the prompt ends with a {msgs[-1]['role']} turn; it must end with a user turn for the "
                     "model to answer")
    extras = {k: v for k, v in row.items() if k != col}
    clash = {"prompt_ids", "completion", "completion_ids"} & set(extras)
    if clash:
        raise BadRow(f"column {sorted(clash)[0]!r} is reserved for generated text; rename it")
    return {"prompt": msgs, **extras}


def convert(row: Any, src: "DataSource") -> dict[str, Any]:
    """The canonical row of ``src.format`` (a preference pair, a prompt-only row or an SFT row), every value checked."""
    return convert_keyed(row, src)[0]


def convert_keyed(row: Any, src: "DataSource") -> tuple[dict[str, Any], str]:
    """(canonical row, its canonical JSON): the JSON is what ``check_values`` checked, and identifies the row.

    Two rows with the same canonical JSON render identically with any chat template (validate counts the
    eval rows that are also training rows with it).
    """
    if isinstance(row, Unreadable):
        raise BadRow(row.reason)
    if src.format == "preference":
        canonical = to_preference(row, src)
    elif src.format == "prompt":
        canonical = to_prompt(row, src)
    else:
        canonical = to_canonical(row, src)
    return canonical, check_values(canonical, src.format)


# ------------------------------------------------------------------------------------------- values

def check_values(canonical: dict[str, Any], fmt: str = "messages") -> str:
    """The canonical row as JSON text (sorted keys), or BadRow naming the first value that cannot be used.

    One C-speed ``json.dumps`` checks the common case, every row: a string with a lone surrogate cannot be
    encoded as UTF-8 (the tokenizer would fail with a TypeError naming nothing) and a NaN or infinity is
    refused by ``allow_nan=False``. Only a row that fails is walked, to name the field. Free-form values
    (tool-call arguments, tool schemas, a prompt row's extra columns) are also walked for depth and
    integer size, which JSON itself allows. ``fmt``: the source's format (a prompt row's other keys are its
    extra columns, whatever their names).
    """
    try:
        try:
            text = _SORTED.encode(canonical)
        except TypeError:  # keys that do not sort (mixed types in a hub dataset's mapping)
            text = _UNSORTED.encode(canonical)
        text.encode("utf-8")
    except (ValueError, RecursionError):  # UnicodeEncodeError is a ValueError
        raise BadRow(_bad_value(canonical, "", 0) or "a value of this row cannot be written as JSON text") from None
    # only rows with free-form values are walked (the key is in the text: a plain chat row costs nothing)
    if '"tool_calls": ' in text or '"tools": ' in text or fmt == "prompt":
        _free_form_problems(canonical, fmt)
    return text


# built once: json.dumps with options builds a new encoder per call, a third of the cost on short rows
_SORTED = json.JSONEncoder(ensure_ascii=False, allow_nan=False, sort_keys=True, default=str)
_UNSORTED = json.JSONEncoder(ensure_ascii=False, allow_nan=False, default=str)


def _path(parent: str, key: Any) -> str:
    if isinstance(key, int):
        return f"{parent}[{key}]"
    return f"{parent}.{key}" if parent else str(key)


def _bad_value(value: Any, path: str, depth: int) -> str | None:
    """What is wrong with the first unusable value under ``value`` (a lone surrogate, NaN, infinity), or None."""
    if depth > MAX_DEPTH:
        return f"{path or 'the row'} is nested more than {MAX_DEPTH} levels deep"
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            bad = value[exc.start]
            return (f"{path or 'a value'} is not valid Unicode text: lone surrogate \\u{ord(bad):04x} at character "
                    f"{exc.start} (half of a UTF-16 pair, e.g. from a JSON \\u{ord(bad):04x} escape without its "
                    "partner); fix the text or drop the row")
        return None
    if isinstance(value, float):
        return None if math.isfinite(value) else f"{path or 'a value'} is {value!r}: numbers must be finite"
    if isinstance(value, dict):
        for k, v in value.items():
            if isinstance(k, str) and (why := _bad_value(k, f"a key of {path or 'the row'}", depth)):
                return why
            if why := _bad_value(v, _path(path, k), depth + 1):
                return why
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            if why := _bad_value(v, _path(path, i), depth + 1):
                return why
    return None


def _free_form_problems(canonical: dict[str, Any], fmt: str) -> None:
    """Depth and integer size of the values a row may nest freely: JSON allows both, Arrow and renderers do not."""
    parts: list[tuple[str, Any]] = []
    for key in ("prompt",) if fmt == "prompt" else ("messages", "prompt", "chosen", "rejected"):
        msgs = canonical.get(key)
        if isinstance(msgs, list):  # canonical messages: dicts, with tool_calls only where a message has them
            parts += [(f"{key}[{i}].tool_calls", m["tool_calls"]) for i, m in enumerate(msgs) if "tool_calls" in m]
    if fmt == "prompt":  # every other key of a prompt row is an extra column, whatever its name
        parts += [(f"column {k!r}", v) for k, v in canonical.items() if k != "prompt"]
    elif "tools" in canonical:
        parts.append(("tools", canonical["tools"]))
    for path, value in parts:
        if why := _nesting(value, path, 1):
            raise BadRow(why)


def _nesting(value: Any, path: str, depth: int) -> str | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        if not INT64[0] <= value <= INT64[1]:
            return f"{path} is an integer of {len(str(abs(value)))} digits: more than 64 bits (write it as text)"
        return None
    if isinstance(value, (dict, list, tuple)):
        if depth > MAX_DEPTH:
            return f"{path} is nested more than {MAX_DEPTH} levels deep"
        items = value.items() if isinstance(value, dict) else enumerate(value)
        for k, v in items:
            if why := _nesting(v, _path(path, k), depth + 1):
                return why
    return None
