"""Row formats (data/formats.py): SFT formats and field maps, preference pairs, tool and reasoning fields, bad rows
(errors naming why)."""

import json
import math
import re

import pytest

from tunelab.data.formats import (
    MAX_DEPTH,
    BadRow,
    check_values,
    convert,
    convert_keyed,
    finite_number,
    to_canonical,
    to_preference,
)
from tunelab.specs import DataSource

U = {"role": "user", "content": "What is 2 plus 2?"}
GOOD_A = {"role": "assistant", "content": "2 plus 2 is 4."}
BAD_A = {"role": "assistant", "content": "I don't know."}


# the preference tests' helper; the SFT-format tests here pass format= on every call, so it builds their sources
# exactly as test_data.py's src did
def src(**kw) -> DataSource:
    return DataSource(**{"source": "x.jsonl", "format": "preference", **kw})


def test_sharegpt_with_role_map_and_system():
    row = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}
    out = to_canonical(row, src(format="sharegpt", system="Be kind."))
    assert out == {"messages": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "hi"},
                                {"role": "assistant", "content": "hello"}]}
    custom = {"turns": [{"speaker": "client", "text": "q"}, {"speaker": "agent", "text": "a"}]}
    out = to_canonical(custom, src(format="messages", field_map={"messages": "turns", "role": "speaker",
                                                                 "content": "text"},
                                   role_map={"client": "user", "agent": "assistant"}))
    assert [m["role"] for m in out["messages"]] == ["user", "assistant"]


def test_alpaca_prompt_completion_text():
    a = to_canonical({"instruction": "Add", "input": "2 and 3", "output": "5"}, src(format="alpaca"))
    assert a["messages"][0] == {"role": "user", "content": "Add\n\n2 and 3"}
    assert a["messages"][1] == {"role": "assistant", "content": "5"}
    pc = to_canonical({"q": "2+2=", "a": "4"}, src(format="prompt_completion", field_map={"prompt": "q",
                                                                                           "completion": "a"}))
    assert pc == {"prompt": "2+2=", "completion": "4"}
    conv = to_canonical({"prompt": [{"role": "user", "content": "hi"}], "completion": "yo"},
                        src(format="prompt_completion"))
    assert conv["messages"][-1] == {"role": "assistant", "content": "yo"}
    assert to_canonical({"text": "plain"}, src(format="text")) == {"text": "plain"}


@pytest.mark.parametrize("row, fmt, msg", [
    ({"messages": [{"role": "user", "content": "q"}]}, "messages", "no assistant"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}]}, "messages", "empty"),
    ({"messages": [{"role": "robot", "content": "q"}]}, "messages", "unknown role 'robot'"),
    ({"msgs": []}, "messages", "missing field 'messages'"),
    ({"instruction": "x"}, "alpaca", "missing field 'output'"),
    ({"prompt": "p", "completion": ""}, "prompt_completion", "completion is empty"),
    ({"text": 3}, "text", "must be a string"),
])
def test_bad_rows_say_why(row, fmt, msg):
    with pytest.raises(BadRow, match=msg):
        to_canonical(row, src(format=fmt))


@pytest.mark.parametrize("messages,why", [
    ([{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}], "must follow an assistant tool call"),
    ([{"role": "user", "content": "x", "tool_calls": [{"function": {"name": "f"}}]},
      {"role": "assistant", "content": "y"}], "only assistant messages call tools"),
    ([{"role": "user", "content": "x"}, {"role": "assistant", "content": "", "tool_calls": [{"function": {}}]}],
     "no function name"),
    ([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "reasoning_content": 3}],
     "reasoning_content must be a string"),
])
def test_tool_and_reasoning_fields_are_checked_per_row(messages, why):
    from tunelab.data.formats import BadRow, to_canonical
    from tunelab.specs import DataSource

    with pytest.raises(BadRow, match=why):
        to_canonical({"messages": messages}, DataSource(source="x.jsonl"))


def test_canonical_messages_carry_only_the_keys_a_message_has():
    """Llama 3.1's template tests `'tool_calls' in message`: an absent key must stay absent."""
    from tunelab.data.formats import to_canonical
    from tunelab.specs import DataSource

    row = {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "thinking": "t"}],
           "tools": [{"type": "function", "function": {"name": "f"}}]}
    out = to_canonical(row, DataSource(source="x.jsonl"))
    assert out["messages"][0] == {"role": "user", "content": "x"}
    assert out["messages"][1] == {"role": "assistant", "content": "y", "reasoning_content": "t"}
    assert out["tools"] == row["tools"]


def test_string_and_conversation_pairs():
    assert to_preference({"prompt": "Q:", "chosen": " yes", "rejected": " no"}, src()) == {
        "prompt": "Q:", "chosen": " yes", "rejected": " no"}
    conv = to_preference({"prompt": [U], "chosen": [GOOD_A], "rejected": [BAD_A]}, src(system="Be brief."))
    assert conv["prompt"] == [{"role": "system", "content": "Be brief."}, U]
    assert conv["chosen"] == [GOOD_A] and conv["rejected"] == [BAD_A]
    # a string prompt with conversational answers is one user turn; string answers are assistant turns
    mixed = to_preference({"prompt": "hi", "chosen": "hello", "rejected": [BAD_A]}, src())
    assert mixed["prompt"] == [{"role": "user", "content": "hi"}]
    assert mixed["chosen"] == [{"role": "assistant", "content": "hello"}]


def test_shared_prefix_conversations_and_field_map():
    earlier = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}, U]
    row = {"good": earlier + [GOOD_A], "bad": earlier + [BAD_A], "score": 2}
    out = to_preference(row, src(field_map={"chosen": "good", "rejected": "bad", "margin": "score"}))
    assert out["prompt"] == earlier and out["chosen"] == [GOOD_A] and out["rejected"] == [BAD_A]
    assert out["margin"] == 2.0
    # a shared assistant turn stays in the prompt only up to the last user turn before the answers differ
    row = {"chosen": [U, GOOD_A, {"role": "user", "content": "thanks"}, GOOD_A],
           "rejected": [U, GOOD_A, {"role": "user", "content": "thanks"}, BAD_A]}
    assert len(to_preference(row, src())["prompt"]) == 3


@pytest.mark.parametrize("row, msg", [
    ({"prompt": "q", "chosen": "same", "rejected": "same"}, "chosen and rejected are identical"),
    ({"prompt": [U], "chosen": [GOOD_A], "rejected": [GOOD_A]}, "chosen and rejected are identical"),
    ({"chosen": [U, GOOD_A], "rejected": [U, GOOD_A]}, "chosen and rejected are identical"),
    ({"prompt": "q", "chosen": "a"}, "missing field 'rejected'"),
    ({"prompt": "q", "rejected": "a"}, "missing field 'chosen'"),
    ({"prompt": "  ", "chosen": "a", "rejected": "b"}, "prompt is empty"),
    ({"prompt": [{"role": "user", "content": ""}], "chosen": "a", "rejected": "b"}, "prompt is empty"),
    ({"prompt": "q", "chosen": "", "rejected": "b"}, "chosen is empty"),
    ({"prompt": [U], "chosen": [GOOD_A], "rejected": []}, "rejected is empty"),
    ({"prompt": [U], "chosen": [U], "rejected": [GOOD_A]}, "chosen must start with an assistant message"),
    ({"chosen": "a", "rejected": "b"}, "missing field 'prompt'"),
    ({"chosen": [U, GOOD_A], "rejected": [{"role": "user", "content": "other"}, BAD_A]}, "share no opening turns"),
    ({"prompt": "q", "chosen": "a", "rejected": "b", "margin": "big"}, "margin must be a number"),
    ({"messages": [U, GOOD_A]}, "missing field 'chosen'"),  # SFT data given to a preference method
])
def test_bad_pairs(row, msg):
    with pytest.raises(BadRow, match=msg):
        to_preference(row, src())


# --- property-based: generated malformed rows never crash a converter -------------------------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tunelab.data.formats import convert  # noqa: E402

FORMATS = ["messages", "sharegpt", "alpaca", "prompt_completion", "text", "preference", "prompt"]
_roles = st.sampled_from(["user", "assistant", "system", "tool", "human", "gpt", "bot", ""])
_leaf = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=4) | _roles
_json = st.recursive(_leaf, lambda inner: st.lists(inner, max_size=3)
                     | st.dictionaries(st.text(max_size=3), inner, max_size=3), max_leaves=8)
_call = st.dictionaries(st.sampled_from(["type", "function", "name", "arguments", "id"]),
                        _json | st.dictionaries(st.sampled_from(["name", "arguments"]), _json), max_size=3) | _json
_message = st.dictionaries(
    st.sampled_from(["role", "content", "from", "value", "tool_calls", "reasoning", "reasoning_content", "thinking",
                     "name", "tool_call_id"]),
    _roles | _json | st.lists(_call, max_size=2), max_size=5) | _json
_conversation = st.lists(_message, max_size=4) | _json
_row = st.dictionaries(
    st.sampled_from(["messages", "conversations", "instruction", "input", "output", "prompt", "completion", "text",
                     "chosen", "rejected", "margin", "tools", "system", "answer", "prompt_ids"]),
    _conversation | _json, max_size=5) | _json


@settings(max_examples=1500, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.sampled_from(FORMATS), _row, st.booleans())
def test_generated_rows_convert_or_raise_bad_row(fmt, row, with_maps):
    """Every format's converter, on rows shaped like its own with every field's type and value varied: a
    canonical row or ``BadRow`` (which the pipeline turns into "file row N: why"), never anything else."""
    extra = {"field_map": {"messages": "conversations"}, "role_map": {"bot": "assistant"}, "system": "s"} if with_maps \
        else {}
    try:
        out = convert(row, DataSource(source="x.jsonl", format=fmt, **extra))
    except BadRow as exc:
        assert str(exc)
        return
    assert isinstance(out, dict)
    if "messages" in out and fmt != "prompt":  # a prompt row keeps its other columns as they are, "messages" too
        assert out["messages"][-1]["role"] == "assistant"
        assert all(isinstance(m["content"], str) for m in out["messages"])


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(st.binary(max_size=40) | st.sampled_from([b"{}", b"[]", b'{"messages": 1}', b"\xef\xbb\xbf{}",
                                                           b"\x1f\x8b\x08", b"\r", b"\xff\xfe"]), max_size=6),
       st.sampled_from(["d.jsonl", "d.json", "d.csv"]))
def test_generated_file_bytes_read_or_raise_data_error(tmp_path_factory, lines, name):
    """Arbitrary bytes in a data file: rows (each converted or a BadRow) or a DataError naming the file."""
    from tunelab.data.sources import iter_local
    from tunelab.errors import DataError

    path = tmp_path_factory.mktemp("bytes") / name
    path.write_bytes(b"\n".join(lines))
    try:
        for rowno, row in iter_local(path):
            assert rowno >= 1
            try:
                convert(row, DataSource(source=str(path), format="alpaca" if name.endswith(".csv") else "messages"))
            except BadRow:
                pass
    except DataError as exc:
        assert str(path) in str(exc)


# --- every value a row carries (issue 26.2) ------------------------------------------------------------------------
# numbers that are read are finite, text is valid Unicode, free-form values are bounded (check_values)

CHAT2 = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]

def vsrc(fmt: str = "messages", **kw) -> DataSource:
    return DataSource(source="x.jsonl", format=fmt, **kw)


@pytest.mark.parametrize("margin, why", [
    (float("nan"), "must be a finite number, got nan"),
    (float("inf"), "must be a finite number, got inf"),
    (float("-inf"), "must be a finite number, got -inf"),
    ("0.5", "must be a number, got '0.5' (str)"),
    (True, "must be a number, got True (bool)"),
    ([1.0], "must be a number, got [1.0] (list)"),
    (10 ** 400, "is an integer of 401 digits, too large"),
], ids=["nan", "inf", "-inf", "string", "bool", "list", "huge-int"])
def test_a_margin_that_is_not_a_finite_number_is_a_bad_row(margin, why):
    row = {"prompt": "Say hi.", "chosen": "Hi!", "rejected": "Go away.", "margin": margin}
    with pytest.raises(BadRow, match=re.escape(f"margin {why}")):
        convert(row, vsrc("preference"))

def test_a_finite_margin_is_read_as_a_float_and_a_mapped_column_is_named():
    row = {"prompt": "Say hi.", "chosen": "Hi!", "rejected": "Go away.", "gap": 2}
    assert convert(row, vsrc("preference", field_map={"margin": "gap"}))["margin"] == 2.0
    with pytest.raises(BadRow, match=r"margin \(column 'gap'\) must be a finite number"):
        convert({**row, "gap": float("nan")}, vsrc("preference", field_map={"margin": "gap"}))
    assert finite_number(-0.0, "m") == 0.0 and math.isclose(finite_number(1e308, "m"), 1e308)

def test_a_non_finite_number_anywhere_in_the_canonical_row_is_named():
    """Tool-call arguments and tool schemas reach the template; a prompt row's columns reach the rewards."""
    call = {"type": "function", "function": {"name": "add", "arguments": {"a": 1, "b": float("inf")}}}
    msgs = [{"role": "user", "content": "1+inf?"}, {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "content": "inf"}, {"role": "assistant", "content": "inf"}]
    with pytest.raises(BadRow, match=r"messages\[1\]\.tool_calls\[0\]\.function\.arguments\.b is inf"):
        convert({"messages": msgs}, vsrc())
    with pytest.raises(BadRow, match=r"^answer is nan: numbers must be finite"):
        convert({"prompt": "What is 2+2?", "answer": float("nan")}, vsrc("prompt"))

@pytest.mark.parametrize("row, where", [
    ({"messages": [{"role": "user", "content": "a\ud800b"}, CHAT2[1]]}, r"messages\[0\]\.content"),
    ({"messages": [{"role": "system", "content": "\udfff"}, *CHAT2]}, r"messages\[0\]\.content"),
    ({"messages": CHAT2, "tools": [{"type": "function", "function": {"name": "f", "description": "x\udc80"}}]},
     r"tools\[0\]\.function\.description"),
    ({"messages": CHAT2, "tools": [{"type": "function", "function": {"name": "f", "parameters": {"\ud83d": 1}}}]},
     r"a key of tools\[0\]\.function\.parameters"),
])
def test_a_lone_surrogate_is_a_bad_row_naming_the_field(row, where):
    """Text the tokenizer cannot encode (it raises a TypeError naming nothing) is refused before it gets there."""
    with pytest.raises(BadRow, match=where + r".*not valid Unicode text: lone surrogate \\u"):
        convert(row, vsrc())

def test_valid_unicode_of_every_plane_passes_and_the_key_is_canonical_json():
    row = {"messages": [{"role": "user", "content": "\U0001f600 \u4f60\u597d \x00 \ufffe \U0010ffff"}, CHAT2[1]]}
    canonical, text = convert_keyed(row, vsrc())
    assert json.loads(text) == canonical

def _nested(depth: int) -> object:
    value: object = 1
    for _ in range(depth):
        value = [value]
    return value

def test_free_form_values_nested_deeper_than_the_limit_are_a_bad_row():
    call = {"type": "function", "function": {"name": "f", "arguments": {"x": _nested(MAX_DEPTH + 5)}}}
    msgs = [CHAT2[0], {"role": "assistant", "content": "", "tool_calls": [call]}, {"role": "tool", "content": "1"},
            CHAT2[1]]
    with pytest.raises(BadRow, match=f"nested more than {MAX_DEPTH} levels deep"):
        convert({"messages": msgs}, vsrc())
    ok = {"type": "function", "function": {"name": "f", "arguments": {"x": _nested(5)}}}
    convert({"messages": [CHAT2[0], {"role": "assistant", "content": "", "tool_calls": [ok]},
                          {"role": "tool", "content": "1"}, CHAT2[1]]}, vsrc())
    with pytest.raises(BadRow, match=f"column 'meta'.* nested more than {MAX_DEPTH}"):
        convert({"prompt": "q", "meta": _nested(MAX_DEPTH + 1)}, vsrc("prompt"))

def test_a_value_nested_past_the_json_encoders_own_limit_is_a_bad_row_not_a_recursion_error():
    with pytest.raises(BadRow, match="nested more than"):
        check_values({"prompt": [{"role": "user", "content": "q"}], "meta": _nested(2000)}, "prompt")

def test_an_integer_wider_than_64_bits_in_a_prompt_column_is_a_bad_row():
    """Prompt rows' columns become Arrow columns: 2**64 would stop training with an OverflowError."""
    with pytest.raises(BadRow, match="column 'id' is an integer of 20 digits: more than 64 bits"):
        convert({"prompt": "q", "id": 2 ** 64}, vsrc("prompt"))
    convert({"prompt": "q", "id": 2 ** 63 - 1}, vsrc("prompt"))
