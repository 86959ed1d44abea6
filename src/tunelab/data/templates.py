"""Chat templates for training: a registry per model family, and how a conversation's loss mask is found.

The loss mask of a conversation is exactly its assistant turns in the rendering of the whole
conversation: what the model writes after the assistant cue (the text ``add_generation_prompt``
ends with), through the template's end-of-turn token; never a system, user or tool token, and
never the separator a template writes after the end-of-turn token. Three ways to get it:

1. a registry template (``model.chat_template: NAME``, or ``auto`` when the model's own template
   renders like one): our training version of a family's official template, byte-identical to
   it, with each assistant turn inside ``{% generation %}``. Under ``auto`` every row is also
   rendered with the model's own template, and a row on which the two differ is an error;
2. the model's own template (or ``PATH``) when it already has ``{% generation %}`` markers;
3. any other template: the prefix difference (render the conversation up to each assistant turn
   with and without it). Used only when provably consistent on the row: every prefix rendering
   must be a prefix of the whole rendering, else the row is an error naming
   ``model.chat_template`` -- a template that renders history differently from the last turn
   (Qwen3 drops earlier reasoning) would otherwise put the loss on the wrong tokens.

The registry's training templates live in ``chat_templates/`` beside this file (our own text;
the official templates they match are test assets, or TRL's copies, compared in the tests).

Control tokens: a tokenizer turns the text of its special tokens (``<|im_end|>``, ``<|eot_id|>``,
``<start_of_turn>``...) into their control ids wherever the text occurs, also inside a message. A
message holding ``<|im_end|>\\n<|im_start|>assistant`` would render a fake turn inside the loss mask.
``ControlTokens`` finds such text; a row holding it is refused (``data.control_tokens: error``) or
encoded as plain text (``as_text``): the occurrences inside message text are tokenized with
``split_special_tokens`` (ordinary tokens, never the control id) while the template's own markers keep
their ids. See ``protect``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

TEMPLATE_DIR = Path(__file__).parent / "chat_templates"
_MARKER = re.compile(r"\{%-?\s*generation\s*-?%\}")


@dataclass(frozen=True)
class TemplateEntry:
    """One family's training template and what it can render."""

    name: str
    end_of_turn: str  # the token that ends every assistant turn: trained, and a stop token of every saved model
    family: str  # the checkpoints whose own template this one renders identically
    system: bool = True  # renders a system message (gemma2 refuses one)
    tools: bool = False  # renders tool calls and tool results
    reasoning: bool = False  # renders a message's ``reasoning_content``

    @property
    def text(self) -> str:
        return (TEMPLATE_DIR / f"{self.name}.jinja").read_text(encoding="utf-8")


REGISTRY: dict[str, TemplateEntry] = {e.name: e for e in (
    TemplateEntry("chatml", "<|im_end|>", "plain ChatML (no default system prompt)"),
    TemplateEntry("smollm2", "<|im_end|>", "SmolLM2-Instruct (ChatML with its default system prompt)"),
    TemplateEntry("qwen2.5", "<|im_end|>", "Qwen2.5-Instruct", tools=True),
    TemplateEntry("qwen3", "<|im_end|>", "Qwen3 (thinking and non-thinking: chat_template_kwargs enable_thinking)",
                  tools=True, reasoning=True),
    TemplateEntry("llama3", "<|eot_id|>", "Llama 3.1 / 3.3 Instruct", tools=True),
    TemplateEntry("mistral-v3", "</s>", "Mistral v3 (Mistral-7B-Instruct-v0.3; the system message goes into the "
                  "last user turn only)", tools=True),
    TemplateEntry("mistral-v7-tekken", "</s>", "Mistral v7 tekken (Mistral-Small-24B-Instruct-2501)"),
    TemplateEntry("gemma2", "<end_of_turn>", "Gemma 2 (and 1) instruct: no system role", system=False),
    TemplateEntry("gemma3", "<end_of_turn>", "Gemma 3 instruct (system folded into the first user turn)"),
    TemplateEntry("phi4", "<|im_end|>", "Phi-4"),
    TemplateEntry("deepseek-r1", "<｜end▁of▁sentence｜>", "DeepSeek-R1 distilled checkpoints (drops reasoning "
                  "from every assistant turn, as the original does)"),
) if (TEMPLATE_DIR / f"{e.name}.jinja").is_file()}


class TemplateMismatch(ValueError):
    """A row whose loss mask cannot be found exactly with this template (the message says why and what to do)."""


def has_generation_markers(template: str | None) -> bool:
    return template is not None and _MARKER.search(template) is not None


def template_hash(text: str | None) -> str | None:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16] if text else None


@dataclass
class ChatTemplateChoice:
    """The template a run trains with, how its masks are found, and what it is checked against."""

    name: str  # a registry name, "model" (the model's own), or "file:PATH"
    text: str | None  # the template the tokenizer renders with (training version)
    mode: str  # "marked" ({% generation %} masks) or "prefix" (prefix difference, checked per row)
    end_of_turn: str | None = None
    entry: TemplateEntry | None = None
    reference: str | None = None  # the model's own template: every row must render identically with it
    kwargs: dict[str, Any] = field(default_factory=dict)  # model.chat_template_kwargs (enable_thinking, ...)

    def describe(self) -> str:
        how = {"marked": "assistant turns marked with {% generation %}",
               "prefix": "prefix difference, checked on every row"}[self.mode]
        eot = f", end of turn {self.end_of_turn}" if self.end_of_turn else ""
        return f"chat template {self.name} ({how}{eot}; sha256 {template_hash(self.text)})"

    def lock_record(self) -> dict[str, Any]:
        return {"name": self.name, "sha256": template_hash(self.text), "mode": self.mode,
                "end_of_turn": self.end_of_turn}


# conversations that tell the families apart: no system (default system prompts), system, two turns
_PROBES: list[list[dict[str, Any]]] = [
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"},
     {"role": "assistant", "content": "Bye."}],
]


def _render_text(tokenizer: Any, template: str, messages: list[dict[str, Any]], tools: Any = None,
                 add_generation_prompt: bool = False, kwargs: dict[str, Any] | None = None) -> str:
    return tokenizer.apply_chat_template(messages, tools=tools, chat_template=template, tokenize=False,
                                         add_generation_prompt=add_generation_prompt, **(kwargs or {}))


def identify(tokenizer: Any, template: str, kwargs: dict[str, Any] | None = None) -> TemplateEntry | None:
    """The registry entry that renders like ``template`` on the probe conversations (refusing the same ones)."""
    def render(text: str, probe: list[dict[str, Any]]) -> str | None:
        try:
            return _render_text(tokenizer, text, probe, kwargs=kwargs)
        except Exception:  # noqa: BLE001 -- a template that refuses the probe (raise_exception)
            return None

    theirs = [render(template, p) for p in _PROBES]
    if all(t is None for t in theirs):
        return None
    for entry in REGISTRY.values():
        if all(render(entry.text, p) == t for p, t in zip(_PROBES, theirs)):
            return entry
    return None


def choose_template(spec: Any, tokenizer: Any) -> ChatTemplateChoice:
    """The training template for ``model.chat_template`` (auto | NAME | PATH) and this tokenizer.

    Raises TemplateMismatch (with the fix) when no template can be had: a PATH that does not exist,
    or ``auto`` on a tokenizer without a chat template.
    """
    want = getattr(spec, "chat_template", "auto") or "auto"
    kwargs = dict(getattr(spec, "chat_template_kwargs", {}) or {})
    own = tokenizer.chat_template if isinstance(getattr(tokenizer, "chat_template", None), str) else None
    if want in REGISTRY:
        e = REGISTRY[want]
        return ChatTemplateChoice(e.name, e.text, "marked", e.end_of_turn, e, None, kwargs)
    if want != "auto":
        path = Path(want).expanduser()
        if not path.is_file():
            raise TemplateMismatch(f"{want} is neither a registry template nor a file; registry: "
                                   + ", ".join(REGISTRY))
        text = path.read_text(encoding="utf-8")
        return _for_text(f"file:{want}", text, tokenizer, kwargs)
    if own is None:
        raise TemplateMismatch("the tokenizer has no chat template; set model.chat_template to one of: "
                               + ", ".join(REGISTRY) + " (or a .jinja file)")
    return _for_text("model", own, tokenizer, kwargs)


def _for_text(name: str, text: str, tokenizer: Any, kwargs: dict[str, Any]) -> ChatTemplateChoice:
    for e in REGISTRY.values():  # a model tunelab saved carries the registry's training text itself
        if text == e.text:
            return ChatTemplateChoice(e.name, e.text, "marked", e.end_of_turn, e, None, kwargs)
    if has_generation_markers(text):
        return ChatTemplateChoice(name, text, "marked", None, None, None, kwargs)
    entry = identify(tokenizer, text, kwargs)
    if entry is not None:
        return ChatTemplateChoice(entry.name, entry.text, "marked", entry.end_of_turn, entry, text, kwargs)
    # outside the registry the end-of-turn token is read off the first row (_check_end_of_turn)
    return ChatTemplateChoice(name, text, "prefix", None, None, None, kwargs)


def apply_choice(tokenizer: Any, choice: ChatTemplateChoice) -> Any:
    """Make the tokenizer render with the chosen template (saved with every model the run writes)."""
    if choice.text is not None:
        tokenizer.chat_template = choice.text
    tokenizer.tunelab_template = choice
    return tokenizer


def choice_of(tokenizer: Any) -> ChatTemplateChoice:
    """The choice ``apply_choice`` attached, or one made from the tokenizer's own template as it is."""
    choice = getattr(tokenizer, "tunelab_template", None)
    if choice is None:
        text = tokenizer.chat_template if isinstance(getattr(tokenizer, "chat_template", None), str) else None
        mode = "marked" if has_generation_markers(text) else "prefix"
        choice = ChatTemplateChoice("model", text, mode)
    return choice


# ------------------------------------------------------------------------------------------- masks

def row_problem(choice: ChatTemplateChoice, messages: list[dict[str, Any]], tools: Any) -> str | None:
    """What a registry template cannot render of this row (tools, reasoning, a system turn), or None."""
    e = choice.entry
    if e is None:
        return None
    if not e.system and messages and messages[0]["role"] == "system":
        return (f"chat template {e.name} has no system role; drop the system message (or fold it into the first "
                "user turn)")
    uses_tools = tools or any(m["role"] == "tool" or m.get("tool_calls") for m in messages)
    if uses_tools and not e.tools:
        return (f"chat template {e.name} does not render tool calls or tool results (they would be dropped); "
                "use a template that does: " + ", ".join(n for n, x in REGISTRY.items() if x.tools))
    if not e.reasoning and any(m.get("reasoning_content") for m in messages):
        return (f"chat template {e.name} does not render reasoning_content (it would be dropped); put the "
                "reasoning in the content (<think>...</think>) or use qwen3")
    return None


def render_with_mask(tokenizer: Any, messages: list[dict[str, Any]], tools: Any = None,
                     literal: "ControlTokens | None" = None) -> tuple[list[int], list[int]]:
    """(input_ids, 0/1 mask of the assistant tokens) of one conversation, exact or TemplateMismatch.

    ``literal``: control-token text inside the messages is encoded as plain text (``data.control_tokens:
    as_text``); without it the text is tokenized as the tokenizer does (the caller refused such rows).
    """
    choice = choice_of(tokenizer)
    if (why := row_problem(choice, messages, tools)) is not None:
        raise TemplateMismatch(why)
    if choice.text is None:
        raise TemplateMismatch("the tokenizer has no chat template; set model.chat_template to one of: "
                               + ", ".join(REGISTRY))
    protected = protect(messages, tools, literal) if literal is not None else None
    if protected is not None:  # same-length placeholders: every span below holds for the restored text
        messages, tools = protected.messages, protected.tools
    with _template_errors():
        if choice.mode == "marked":  # one rendering gives the text and the {% generation %} spans
            text, spans = _render_marked(tokenizer, choice, messages, tools)
        else:
            text = _render_text(tokenizer, choice.text, messages, tools, kwargs=choice.kwargs)
            spans = _prefix_spans(tokenizer, choice, messages, tools, text)
        theirs = _render_text(tokenizer, choice.reference, messages, tools, kwargs=choice.kwargs) \
            if choice.reference is not None else text
    if choice.reference is not None:
        if theirs != text:
            raise TemplateMismatch(f"the model's own chat template renders this conversation differently from "
                                   f"registry template {choice.name} (first difference at character "
                                   f"{_first_diff(theirs, text)}); set model.chat_template to the right registry "
                                   f"name ({', '.join(REGISTRY)}) or to a .jinja file with {{% generation %}} markers")
    text, literal_spans = protected.restore(text) if protected is not None else (text, [])
    ids, offsets = encode_text(tokenizer, text, literal_spans)
    mask = [0] * len(ids)
    for j, (a, b) in enumerate(offsets):
        if b > a and any(s < b and a < e for s, e in spans):
            mask[j] = 1
    _check_end_of_turn(tokenizer, choice, ids, mask)
    return ids, mask


def render_ids(tokenizer: Any, messages: list[dict[str, Any]], add_generation_prompt: bool = False,
               tools: Any = None, literal: "ControlTokens | None" = None) -> list[int]:
    """Token ids of a conversation rendered with the run's template (no mask): prompts and preference pairs.

    ``literal`` as in ``render_with_mask``. Without control-token text this is ``apply_chat_template``.
    """
    choice = choice_of(tokenizer)
    protected = protect(messages, tools, literal) if literal is not None else None
    if protected is None:
        with _template_errors():
            out = tokenizer.apply_chat_template(messages, tools=tools, tokenize=True,
                                                add_generation_prompt=add_generation_prompt, return_dict=True,
                                                **choice.kwargs)
        return list(out["input_ids"])
    template = choice.text if choice.text is not None else tokenizer.chat_template
    with _template_errors():
        text = _render_text(tokenizer, template, protected.messages, protected.tools, add_generation_prompt,
                            choice.kwargs)
    return encode_text(tokenizer, *protected.restore(text))[0]


@contextlib.contextmanager
def _template_errors() -> Iterator[None]:
    """A template that raises on a row (its ``raise_exception``, a filter on an odd value) is a TemplateMismatch
    naming the row, not a crash of the run with exit 1 and no row."""
    try:
        yield
    except TemplateMismatch:
        raise
    except Exception as exc:  # noqa: BLE001 -- templates are user code and may raise anything
        raise TemplateMismatch(f"the chat template fails on this conversation: {type(exc).__name__}: {exc}"[:400]) \
            from None


def encode_text(tokenizer: Any, text: str, literal_spans: list[tuple[int, int]] | None = None,
                ) -> tuple[list[int], list[tuple[int, int]]]:
    """(ids, character offsets) of rendered text; the ``literal_spans`` are tokenized as plain text.

    The text is cut at the literal spans: the pieces between them are tokenized as usual (the template's
    markers become their control ids), each span with ``split_special_tokens=True`` (its control-token text
    becomes ordinary tokens). Cutting there changes how a few characters at each cut are merged, never
    what they are: no control id can come from a span.
    """
    cuts = [0] + [x for span in sorted(literal_spans or []) for x in span] + [len(text)]
    ids: list[int] = []
    offsets: list[tuple[int, int]] = []
    for k in range(len(cuts) - 1):
        a, b = cuts[k], cuts[k + 1]
        if b <= a:
            continue
        enc = tokenizer(text[a:b], add_special_tokens=False, return_offsets_mapping=True,
                        split_special_tokens=k % 2 == 1)  # odd pieces are the literal spans
        ids += enc["input_ids"]
        offsets += [(x + a, y + a) for x, y in enc["offset_mapping"]]
    return ids, offsets


def _first_diff(a: str, b: str) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _render_marked(tokenizer: Any, choice: ChatTemplateChoice, messages: list[dict[str, Any]],
                   tools: Any) -> tuple[str, list[tuple[int, int]]]:
    """(rendered text, character spans of its ``{% generation %}`` blocks), from transformers' own renderer.

    The variables are the ones ``apply_chat_template`` hands a template: the special tokens and the kwargs.
    """
    from transformers.utils.chat_template_utils import render_jinja_template

    out: Any = render_jinja_template(conversations=[messages], tools=tools, chat_template=choice.text,
                                     return_assistant_tokens_mask=True, add_generation_prompt=False,
                                     **tokenizer.special_tokens_map, **choice.kwargs)
    rendered, indices = out  # (rendered conversations, assistant index spans per conversation)
    return rendered[0], [(s, e) for s, e in indices[0] if e > s]


def _prefix_spans(tokenizer: Any, choice: ChatTemplateChoice, messages: list[dict[str, Any]], tools: Any,
                  full: str) -> list[tuple[int, int]]:
    """Assistant spans by the prefix difference, or TemplateMismatch where a prefix does not hold."""
    spans = []
    assert choice.text is not None, "a chat template to render with"
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _render_text(tokenizer, choice.text, messages[:i], tools, add_generation_prompt=True,
                              kwargs=choice.kwargs)
        through = _render_text(tokenizer, choice.text, messages[: i + 1], tools, kwargs=choice.kwargs)
        for what, part in (("the conversation before it (with the generation prompt)", before),
                           ("the conversation through it", through)):
            if not full.startswith(part):
                raise TemplateMismatch(
                    f"the chat template renders assistant turn {i} differently inside the whole conversation than "
                    f"in {what} (e.g. it drops earlier turns' reasoning), so its loss mask cannot be found by "
                    f"prefix difference; set model.chat_template to a registry template ({', '.join(REGISTRY)}) "
                    "or a .jinja file whose assistant turns are inside {% generation %} ... {% endgeneration %}")
        end = len(through.rstrip())  # the separator after the end-of-turn token is not the model's
        if end > len(before):
            spans.append((len(before), end))
    return spans


def _check_end_of_turn(tokenizer: Any, choice: ChatTemplateChoice, ids: list[int], mask: list[int]) -> None:
    """Every assistant span must end with the end-of-turn token: that is what teaches the model to stop.

    A registry template names its token; for any other template it is the token every span ends
    with, which must be a special token (a span ending in plain text means the turn is not closed).
    """
    runs = [j for j in range(len(mask)) if mask[j] and (j + 1 == len(mask) or not mask[j + 1])]
    if not runs:
        raise TemplateMismatch(f"chat template {choice.name} marks no assistant tokens in this conversation")
    if choice.entry is None and choice.end_of_turn is None:
        last = tokenizer.convert_ids_to_tokens(ids[runs[0]])
        special = set(tokenizer.all_special_tokens) | set(getattr(tokenizer, "added_tokens_encoder", {}) or {})
        if last not in special:
            raise TemplateMismatch(f"chat template {choice.name}: an assistant turn ends with {last!r}, not with an "
                                   "end-of-turn special token; the model would not learn to stop. Use a registry "
                                   f"template ({', '.join(REGISTRY)}) or a template that closes assistant turns")
        choice.end_of_turn = last
    eot = tokenizer.convert_tokens_to_ids(choice.end_of_turn)
    if eot is None or (eot == tokenizer.unk_token_id and choice.end_of_turn != tokenizer.unk_token):
        raise TemplateMismatch(f"end-of-turn token {choice.end_of_turn!r} of chat template {choice.name} is not a "
                               "token of this tokenizer; choose the template of this model's family")
    for j in runs:
        if ids[j] != eot:
            raise TemplateMismatch(f"an assistant turn does not end with the end-of-turn token {choice.end_of_turn!r} "
                                   f"(it ends with {tokenizer.convert_ids_to_tokens(ids[j])!r}); the model would not "
                                   "learn to stop. Set model.chat_template to this model family's registry template")


def end_of_turn_ids(tokenizer: Any) -> list[int]:
    """Token ids a trained model must stop at: the template's end-of-turn token and the tokenizer's eos."""
    choice = choice_of(tokenizer)
    out = []
    for tok in (choice.end_of_turn, tokenizer.eos_token):
        if tok:
            i = tokenizer.convert_tokens_to_ids(tok)
            if isinstance(i, int) and i != tokenizer.unk_token_id and i not in out:
                out.append(i)
    return out


# ------------------------------------------------------------------------------------------- control tokens

def _trie(words: Iterable[str]) -> str:
    """A regex matching any of ``words``, as a trie: one pass over a text however many tokens there are
    (Llama 3 has 256 special tokens; an alternation of them would be tried one by one at every character)."""
    root: dict[str, Any] = {}
    for w in words:
        node = root
        for ch in w:
            node = node.setdefault(ch, {})
        node[""] = {}

    def build(node: dict[str, Any]) -> str:
        alts = [re.escape(ch) + build(child) for ch, child in sorted(node.items()) if ch]
        if not alts:
            return ""
        if "" in node:
            return "(?:" + "|".join(alts) + ")?"
        return alts[0] if len(alts) == 1 else "(?:" + "|".join(alts) + ")"

    return build(root)


# the fields of a canonical row, by format, that a template or the tokenizer turns into tokens
RENDERED = {"preference": ("prompt", "chosen", "rejected"), "prompt": ("prompt",), "text": ("text",)}
RENDERED_SFT = ("messages", "tools", "prompt", "completion")


class ControlTokens:
    """The texts a tokenizer turns into control ids wherever they occur, and where a row holds one.

    Control tokens are the tokenizer's special tokens (``special=True`` added tokens and the named ones:
    bos, eos, pad, unk...) and the chat template's end-of-turn token. Added tokens that are not special
    (Qwen's ``<think>``) are left alone: reasoning data writes them in message text on purpose.
    """

    def __init__(self, tokens: Iterable[str]) -> None:
        self.tokens = tuple(sorted({t for t in tokens if isinstance(t, str) and t}))
        self.pattern = re.compile(_trie(self.tokens)) if self.tokens else None
        # the tokens as json.dumps(ensure_ascii=False) writes them: a search over a row's canonical JSON
        # rules out (nearly) every row at C speed; a hit is confirmed on the row's strings
        self.json_pattern = re.compile(_trie(json.dumps(t, ensure_ascii=False)[1:-1] for t in self.tokens)) \
            if self.tokens else None

    def __bool__(self) -> bool:
        return bool(self.tokens)

    def find(self, canonical: dict[str, Any], fmt: str, row_json: str | None = None) -> tuple[str, str] | None:
        """(where, token) of the first control-token text in the rendered fields of a canonical row, or None.

        ``row_json``: the row's canonical JSON (``formats.convert_keyed``), to rule the row out quickly.
        """
        if self.pattern is None or self.json_pattern is None:
            return None
        if row_json is not None and self.json_pattern.search(row_json) is None:
            return None
        for key in RENDERED.get(fmt, RENDERED_SFT):
            if key in canonical and (hit := self._walk(canonical[key], key)):
                return hit
        return None

    def _walk(self, value: Any, path: str) -> tuple[str, str] | None:
        assert self.pattern is not None
        if isinstance(value, str):
            m = self.pattern.search(value)
            return (path, m.group()) if m else None
        items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
        for k, v in items:
            if isinstance(k, str) and (m := self.pattern.search(k)):
                return f"a key of {path}", m.group()
            sub = f"{path}[{k}]" if isinstance(k, int) else f"{path}.{k}"
            if hit := self._walk(v, sub):
                return hit
        return None


def control_tokens(tokenizer: Any) -> ControlTokens:
    """The control tokens of a loaded tokenizer (and of the chat template it renders with)."""
    found = set(getattr(tokenizer, "all_special_tokens", None) or [])
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    found |= {t.content for t in decoder.values() if getattr(t, "special", False)}
    eot = choice_of(tokenizer).end_of_turn
    if eot:
        found.add(eot)
    return ControlTokens(found)


NAMED_SPECIAL = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def control_tokens_from_files(folder: Path) -> ControlTokens | None:
    """The control tokens of the tokenizer saved in ``folder`` (tokenizer.json, tokenizer_config.json), read
    as JSON: what ``control_tokens`` finds once transformers has loaded it, without importing transformers
    (validate reads every row before it loads anything heavy). None when neither file is there."""
    found: set[str] = set()
    seen = False
    try:
        data = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
        found |= {t["content"] for t in data.get("added_tokens", []) if t.get("special")}
        seen = True
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    try:
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
        seen = True
    except (OSError, ValueError):
        config = {}

    def text(value: Any) -> str | None:
        return value if isinstance(value, str) else value.get("content") if isinstance(value, dict) else None

    if isinstance(config, dict):
        for name in NAMED_SPECIAL:
            found.add(text(config.get(name)) or "")
        for name in ("additional_special_tokens", "extra_special_tokens"):
            extra = config.get(name)
            values = extra.values() if isinstance(extra, dict) else extra if isinstance(extra, list) else []
            found |= {t for v in values if (t := text(v))}
        decoder = config.get("added_tokens_decoder")
        if isinstance(decoder, dict):
            found |= {t for v in decoder.values() if isinstance(v, dict) and v.get("special") and (t := text(v))}
    return ControlTokens(found) if seen else None


@dataclass
class Protected:
    """A conversation whose control-token texts are replaced by placeholders of the same length.

    The template renders the placeholders like any text (private-use characters), so every span the
    rendering yields ({% generation %} blocks, prefix differences) holds for the real text too; ``restore``
    puts the tokens back and says where they are, for ``encode_text`` to tokenize them as plain text.
    """

    messages: list[dict[str, Any]]
    tools: Any
    mark: str
    table: dict[str, str]  # placeholder -> the control-token text it stands for

    def restore(self, text: str) -> tuple[str, list[tuple[int, int]]]:
        """(the text with the tokens back, their spans); TemplateMismatch if the template altered a placeholder."""
        lengths = sorted({len(p) for p in self.table}, reverse=True)
        out, spans, pos = [], [], 0
        while (at := text.find(self.mark, pos)) >= 0:
            token = next((self.table[text[at:at + n]] for n in lengths if text[at:at + n] in self.table), None)
            if token is None:
                raise TemplateMismatch("the chat template changed text that holds a control token, so it cannot be "
                                       "encoded as plain text; set data.control_tokens: error to refuse such rows")
            out += [text[pos:at], token]
            spans.append((at, at + len(token)))
            pos = at + len(token)
        out.append(text[pos:])
        return "".join(out), spans


PLACEHOLDER_DIGITS = 4096  # private-use characters U+E000.. U+EFFF: the digits of an occurrence's number
MARKS = "\uf8ff\uf8fe\uf8fd\uf8fc"  # the first of these not in the row starts every placeholder


def protect(messages: list[dict[str, Any]], tools: Any, control: ControlTokens) -> Protected | None:
    """The conversation with each control-token text replaced by a same-length placeholder; None if it has none."""
    if control.pattern is None:
        return None
    pattern = control.pattern
    strings: list[str] = []

    def collect(value: Any) -> None:
        if isinstance(value, str):
            strings.append(value)
        elif isinstance(value, dict):
            for v in value.values():
                collect(v)
        elif isinstance(value, list):
            for v in value:
                collect(v)

    collect(messages)
    collect(tools)
    if not any(pattern.search(t) for t in strings):
        return None
    mark = next((m for m in MARKS if not any(m in t for t in strings)), None)
    if mark is None:
        raise TemplateMismatch("this row holds control-token text and every placeholder character tunelab could "
                               "use; set data.control_tokens: error to refuse it")
    table: dict[str, str] = {}

    def placeholder(m: re.Match[str]) -> str:
        token, n = m.group(), len(table)
        if len(token) < 2 or n >= PLACEHOLDER_DIGITS ** (len(token) - 1):
            raise TemplateMismatch(f"control token {token!r} cannot be encoded as plain text here; set "
                                   "data.control_tokens: error to refuse such rows")
        digits = []
        for _ in range(len(token) - 1):
            n, d = divmod(n, PLACEHOLDER_DIGITS)
            digits.append(chr(0xE000 + d))
        ph = mark + "".join(digits)
        table[ph] = token
        return ph

    def sub(value: Any) -> Any:
        if isinstance(value, str):
            return pattern.sub(placeholder, value)
        if isinstance(value, dict):
            return {k: sub(v) for k, v in value.items()}
        if isinstance(value, list):
            return [sub(v) for v in value]
        return value

    return Protected(sub(messages), sub(tools), mark, table)
