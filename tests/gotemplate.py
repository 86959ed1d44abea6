"""A small interpreter of the Go text/template subset Ollama's Modelfile TEMPLATEs use here.

Enough to render our TEMPLATEs the way Ollama would and compare them with the Jinja chat
templates (no `ollama` or Go toolchain on the test machines): text and ``{{ }}`` actions with
``{{-``/``-}}`` whitespace trimming; ``if``/``else if``/``else``/``end``; ``range $i, $m := X``;
``$x := v`` and ``$x = v`` with block scoping; the functions eq, ne, and, or, not, len, slice;
fields (``.Messages``, ``$m.Role``, ``$.Messages``) and string literals. Anything else raises.
"""

from __future__ import annotations

import re
from typing import Any

_ACTION = re.compile(r"\{\{(-\s)?(.*?)(\s-)?\}\}", re.S)
_TERM = re.compile(r'\s*("(?:[^"\\]|\\.)*"|\(|\)|[^\s()]+)')


def _lex(src: str) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    pos, trim_next = 0, False
    for m in _ACTION.finditer(src):
        text = src[pos:m.start()]
        if trim_next:
            text = text.lstrip()
        if m.group(1):
            text = text.rstrip()
        out.append(("text", text))
        out.append(("action", m.group(2).strip()))
        trim_next, pos = bool(m.group(3)), m.end()
    text = src[pos:]
    out.append(("text", text.lstrip() if trim_next else text))
    return out


def _parse(tokens: list[tuple[str, str]], i: int = 0, stop: tuple[str, ...] = ()) -> tuple[list[Any], int, str]:
    body: list[Any] = []
    while i < len(tokens):
        kind, val = tokens[i]
        i += 1
        if kind == "text":
            body.append(("text", val))
            continue
        word = val.split(None, 1)[0] if val else ""
        if word in ("end", "else") and stop:
            return body, i, val
        if word == "if":
            branches, cond = [], val[3:]
            while True:
                inner, i, ended = _parse(tokens, i, ("end", "else"))
                branches.append((cond, inner))
                if ended.startswith("else if"):
                    cond = ended[len("else if"):]
                    continue
                if ended == "else":
                    inner, i, ended = _parse(tokens, i, ("end",))
                    branches.append(("true", inner))
                break
            body.append(("if", branches))
        elif word == "range":
            m = re.fullmatch(r"range\s+(?:(\$\w+)\s*,\s*(\$\w+)\s*:=\s*)?(.+)", val, re.S)
            assert m, val
            inner, i, _ = _parse(tokens, i, ("end",))
            body.append(("range", m.group(1), m.group(2), m.group(3), inner))
        elif m := re.fullmatch(r"(\$\w+)\s*(:?=)\s*(.+)", val, re.S):
            body.append(("decl" if m.group(2) == ":=" else "assign", m.group(1), m.group(3)))
        else:
            body.append(("out", val))
    return body, i, ""


class _Ctx:
    def __init__(self, root: dict[str, Any]):
        self.root, self.dot, self.scopes = root, root, [{"$": root}]

    def lookup(self, name: str) -> Any:
        for scope in reversed(self.scopes):
            if name in scope:
                return scope[name]
        raise KeyError(f"undefined variable {name}")

    def assign(self, name: str, value: Any) -> None:
        for scope in reversed(self.scopes):
            if name in scope:
                scope[name] = value
                return
        raise KeyError(f"assignment to undeclared {name}")


def _field(obj: Any, path: list[str]) -> Any:
    for p in path:
        obj = obj.get(p) if isinstance(obj, dict) else getattr(obj, p)
    return obj


def _truth(v: Any) -> bool:
    return bool(v)


_FUNCS = {
    "eq": lambda a, *b: any(a == x for x in b), "ne": lambda a, b: a != b, "not": lambda a: not _truth(a),
    "and": lambda *a: next((x for x in a if not _truth(x)), a[-1]),
    "or": lambda *a: next((x for x in a if _truth(x)), a[-1]),
    "len": len, "slice": lambda x, i=0, j=None: x[i:j],
}


def _eval(expr: str, ctx: _Ctx) -> Any:
    toks = [t for t in _TERM.findall(expr)]
    value, rest = _expr(toks, ctx)
    assert not rest, f"trailing {rest} in {expr!r}"
    return value


def _expr(toks: list[str], ctx: _Ctx) -> tuple[Any, list[str]]:
    head, rest = toks[0], toks[1:]
    if head in _FUNCS:
        args = []
        while rest and rest[0] != ")":
            v, rest = _term(rest, ctx)
            args.append(v)
        return _FUNCS[head](*args), rest
    return _term(toks, ctx)


def _term(toks: list[str], ctx: _Ctx) -> tuple[Any, list[str]]:
    head, rest = toks[0], toks[1:]
    if head == "(":
        v, rest = _expr(rest, ctx)
        assert rest and rest[0] == ")"
        return v, rest[1:]
    if head.startswith('"'):
        return bytes(head[1:-1], "utf-8").decode("unicode_escape"), rest
    if re.fullmatch(r"-?\d+", head):
        return int(head), rest
    if head == ".":
        return ctx.dot, rest
    if head.startswith("."):
        return _field(ctx.dot, head[1:].split(".")), rest
    if head.startswith("$"):
        name, *path = head.split(".")
        return _field(ctx.lookup(name), path), rest
    if head in ("true", "false"):
        return head == "true", rest
    raise ValueError(f"unsupported template term {head!r}")


def _run(body: list[Any], ctx: _Ctx, out: list[str]) -> None:
    for node in body:
        kind = node[0]
        if kind == "text":
            out.append(node[1])
        elif kind == "out":
            v = _eval(node[1], ctx)
            out.append("" if v is None else str(v))
        elif kind == "decl":
            ctx.scopes[-1][node[1]] = _eval(node[2], ctx)
        elif kind == "assign":
            ctx.assign(node[1], _eval(node[2], ctx))
        elif kind == "if":
            for cond, inner in node[1]:
                if _truth(_eval(cond, ctx)):
                    ctx.scopes.append({})
                    _run(inner, ctx, out)
                    ctx.scopes.pop()
                    break
        elif kind == "range":
            _, iname, vname, expr, inner = node
            saved = ctx.dot
            for i, item in enumerate(_eval(expr, ctx) or []):
                ctx.scopes.append({k: v for k, v in ((iname, i), (vname, item)) if k})
                ctx.dot = item
                _run(inner, ctx, out)
                ctx.scopes.pop()
            ctx.dot = saved


def render(template: str, data: dict[str, Any]) -> str:
    """Render a Go template with ``data`` as the dot (e.g. {"Messages": [{"Role": ..., "Content": ...}]})."""
    body, _, _ = _parse(_lex(template))
    out: list[str] = []
    _run(body, _Ctx(data), out)
    return "".join(out)
