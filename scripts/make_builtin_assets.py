"""Generate the bundled quickstart data and the built-in tokenizer (deterministic).

    python scripts/make_builtin_assets.py

Writes src/tunelab/data/builtin/quickstart/{sft,sft_eval,alpaca,text,prompt_completion}.jsonl,
{preference,preference_eval}.jsonl, {rl,rl_eval}.jsonl, long-context/{short,long,long_eval}.jsonl and
src/tunelab/models/assets/{tokenizer.json,chat_template.jinja}. The data are templated
task families (arithmetic, word games, invented facts) that a 2-layer model learns in a
minute, with a long tail of long rows (lists, repetitions, stories) so lengths spread the way
real chat data do. The tokenizer is a 2048-token byte-level BPE trained on this text plus
generic sentences written here; byte level, so any text encodes.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "src/tunelab/data/builtin/quickstart"
ASSETS = ROOT / "src/tunelab/models/assets"

WORDS = ("cat dog sun moon tree bird fish star lamp book door rain snow wind fire road ship rock leaf milk "
         "bread apple river cloud stone glass chair table plant horse mouse house light green water sugar "
         "paper music tiger zebra lemon melon grape pearl coral amber frost storm").split()
COUNTRIES = [("Aldoria", "Velmont"), ("Brisk", "Tallow"), ("Corvenia", "Duskport"), ("Drellin", "Oakhaven"),
             ("Elvaran", "Mistral Bay"), ("Fennick", "Ashby"), ("Glimmera", "Lumen"), ("Harrowin", "Stonegate"),
             ("Istvar", "Kelpie"), ("Jorunland", "Frosthold"), ("Kavessa", "Redcliff"), ("Lornwick", "Ember"),
             ("Mirovia", "Calder"), ("Norhaven", "Wyvern"), ("Ostrelle", "Pinecrest"), ("Pellandor", "Quill"),
             ("Quorra", "Sable"), ("Rivenna", "Thornfield"), ("Sylvara", "Brightwater"), ("Tamberlune", "Marrow")]
OBJECTS = [("glimmerstone", "blue"), ("moss lantern", "green"), ("sun apple", "gold"), ("night pearl", "black"),
           ("ember fern", "red"), ("frost bell", "white"), ("dusk feather", "purple"), ("river shell", "pink"),
           ("storm cap", "grey"), ("honey reed", "yellow"), ("copper leaf", "orange"), ("mist flower", "silver")]
SYSTEMS = ["You are a helpful assistant.", "You are a concise assistant. Answer in one sentence.",
           "You answer questions about numbers, words and the land of Aldoria."]
GENERIC = [
    "The quick brown fox jumps over the lazy dog.", "A journey of a thousand miles begins with a single step.",
    "Please read the instructions carefully before you begin.", "The weather today is cloudy with a chance of rain.",
    "She opened the window and let the fresh air into the room.", "Numbers such as 12, 345 and 6789 appear often.",
    "Write clear answers, check your work, and keep it short.", "Hello! How can I help you today?",
    "Thank you for your question; here is the answer.", "In the morning the market was full of people.",
    "Every language model learns from examples of text.", "The train leaves the station at half past nine.",
    "Can you explain how this works, step by step?", "Yes, that is correct. No, that is not right.",
]


def arithmetic(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 20), rng.randint(0, 20)
    op = rng.choice(["plus", "minus", "times"])
    if op == "minus" and b > a:
        a, b = b, a
    value = {"plus": a + b, "minus": a - b, "times": a * b}[op]
    return f"What is {a} {op} {b}?", f"{a} {op} {b} is {value}."


def reverse(rng: random.Random) -> tuple[str, str]:
    w = rng.choice(WORDS)
    return f"Reverse the word '{w}'.", f"The reverse of '{w}' is '{w[::-1]}'."


def capital(rng: random.Random) -> tuple[str, str]:
    c, cap = rng.choice(COUNTRIES)
    q = rng.choice([f"What is the capital of {c}?", f"Which city is the capital of {c}?"])
    return q, f"The capital of {c} is {cap}."


def count_letters(rng: random.Random) -> tuple[str, str]:
    w = rng.choice(WORDS)
    return f"How many letters are in '{w}'?", f"'{w}' has {len(w)} letters."


def upper(rng: random.Random) -> tuple[str, str]:
    w = rng.choice(WORDS)
    return f"Write '{w}' in capitals.", w.upper()


def colour(rng: random.Random) -> tuple[str, str]:
    o, c = rng.choice(OBJECTS)
    return f"What colour is a {o}?", f"A {o} is {c}."


def count_up(rng: random.Random) -> tuple[str, str]:
    a = rng.randint(1, 30)
    b = a + rng.randint(10, 70)
    return f"List the numbers from {a} to {b}.", ", ".join(str(i) for i in range(a, b + 1)) + "."


def repeat(rng: random.Random) -> tuple[str, str]:
    s = rng.choice(GENERIC)
    k = rng.randint(3, 9)
    return f"Repeat the sentence '{s}' {k} times.", " ".join([s] * k)


def story(rng: random.Random) -> tuple[str, str]:
    hero, place = rng.choice(WORDS), rng.choice(COUNTRIES)
    obj, col = rng.choice(OBJECTS)
    parts = [f"Once upon a time a {hero} lived in {place[0]}.", f"Every day the {hero} walked to {place[1]}.",
             f"One morning the {hero} found a {obj}.", f"The {obj} was {col} and it glowed softly.",
             f"The {hero} carried the {obj} home through the {rng.choice(WORDS)}.",
             f"People from all over {place[0]} came to see it.", f"The {hero} was happy, and the {obj} stayed {col}.",
             "And that is the end of the story."]
    n = rng.randint(3, len(parts))
    return f"Tell me a short story about a {hero}.", " ".join(parts[: n - 1] + parts[-1:])


SHORT = [arithmetic, arithmetic, reverse, capital, capital, count_letters, upper, colour, colour]
LONG = [count_up, repeat, story]


def exchange(rng: random.Random) -> tuple[str, str]:
    family = rng.choice(LONG) if rng.random() < 0.12 else rng.choice(SHORT)
    return family(rng)


def conversation(rng: random.Random) -> list[dict[str, str]]:
    msgs = [{"role": "system", "content": rng.choice(SYSTEMS)}] if rng.random() < 0.3 else []
    turns = rng.choice([2, 3]) if rng.random() < 0.2 else 1
    for _ in range(turns):
        q, a = exchange(rng)
        msgs += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    return msgs


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def make_data() -> list[str]:
    rng = random.Random(20261124)
    seen: set[str] = set()
    convs: list[list[dict[str, str]]] = []
    while len(convs) < 1320:
        c = conversation(rng)
        key = json.dumps(c)
        if key not in seen:
            seen.add(key)
            convs.append(c)
    write_jsonl(DATA / "sft.jsonl", [{"messages": c} for c in convs[:1200]])
    write_jsonl(DATA / "sft_eval.jsonl", [{"messages": c} for c in convs[1200:]])
    singles = [exchange(rng) for _ in range(200)]
    write_jsonl(DATA / "alpaca.jsonl", [{"instruction": q, "input": "", "output": a} for q, a in singles])
    write_jsonl(DATA / "prompt_completion.jsonl", [{"prompt": f"Question: {q}\nAnswer:", "completion": f" {a}"}
                                                   for q, a in singles])
    write_jsonl(DATA / "text.jsonl", [{"text": f"{q} {a}"} for q, a in singles])
    corpus = [m["content"] for c in convs for m in c] + [f"{q} {a}" for q, a in singles]
    return corpus + GENERIC * 20 + SYSTEMS * 20


UNHELPFUL = ["I don't know.", "I am not sure.", "I cannot help with that.", "Ask someone else.", "Maybe."]


def wrong_answer(family: str, q: str, a: str, rng: random.Random) -> str:
    """The same kind of answer with the fact wrong (a different number, word, city or colour)."""
    import re

    if family == "arithmetic":
        head, value = a.rsplit(" is ", 1)
        v = int(value.rstrip("."))
        return f"{head} is {max(0, v + rng.choice([-3, -2, -1, 1, 2, 3, 10])) if v > 3 else v + rng.randint(1, 5)}."
    if family == "reverse":
        w = re.search(r"'(.*)'\.$", q).group(1)  # type: ignore[union-attr]
        bad = w if w != w[::-1] else w + w[0]
        return f"The reverse of '{w}' is '{bad}'."
    if family == "capital":
        country, city = a[len("The capital of ") : -1].split(" is ")
        other = rng.choice([c for _, c in COUNTRIES if c != city])
        return f"The capital of {country} is {other}."
    if family == "count_letters":
        n = int(a.split(" has ")[1].split()[0])
        return a.replace(f" has {n} letters", f" has {n + rng.choice([-2, -1, 1, 2, 3])} letters")
    if family == "upper":
        return rng.choice([a.lower(), rng.choice([w for w in WORDS if w.upper() != a]).upper()])
    obj, col = a[len("A ") : -1].split(" is ")
    return f"A {obj} is {rng.choice([c for _, c in OBJECTS if c != col])}."


def rejected_answer(family: str, q: str, a: str, rng: random.Random) -> str:
    """A worse answer by construction: a wrong fact, another question's answer, a non-answer, or cut short."""
    kind = rng.random()
    if kind < 0.5:
        bad = wrong_answer(family, q, a, rng)
    elif kind < 0.7:
        bad = rng.choice(SHORT)(rng)[1]
    elif kind < 0.85:
        bad = rng.choice(UNHELPFUL)
    else:
        words = a.split()
        bad = " ".join(words[: max(1, len(words) // 2)]) if len(words) > 1 else a[: max(1, len(a) // 2)]
    return bad if bad != a else rng.choice(UNHELPFUL)


def preference_pair(rng: random.Random) -> dict:
    msgs = [{"role": "system", "content": rng.choice(SYSTEMS)}] if rng.random() < 0.3 else []
    if rng.random() < 0.1:  # an earlier exchange in the prompt
        q0, a0 = rng.choice(SHORT)(rng)
        msgs += [{"role": "user", "content": q0}, {"role": "assistant", "content": a0}]
    family = rng.choice(SHORT)
    q, a = family(rng)
    msgs.append({"role": "user", "content": q})
    bad = rejected_answer(family.__name__, q, a, rng)
    return {"prompt": msgs, "chosen": [{"role": "assistant", "content": a}],
            "rejected": [{"role": "assistant", "content": bad}]}


def make_preference() -> None:
    """Preference pairs whose chosen answer is right and whose rejected answer is worse by construction."""
    rng = random.Random(20261125)
    seen: set[str] = set()
    pairs: list[dict] = []
    while len(pairs) < 2200:
        p = preference_pair(rng)
        key = json.dumps(p["prompt"])
        if key not in seen:
            seen.add(key)
            pairs.append(p)
    write_jsonl(DATA / "preference.jsonl", pairs[:2000])
    write_jsonl(DATA / "preference_eval.jsonl", pairs[2000:])


def make_rl() -> None:
    """Prompt-only rows with a reference answer, for online RL (grpo, ppo) on a verifiable task.

    The task is the colour question the quickstart SFT model half knows: greedy it mostly
    answers right, sampled at temperature 1 it mostly does not (it garbles the object or the
    colour), so the reward has room to rise. Each prompt is an (object, system prompt) pair;
    the eval prompts are pairs that never appear in train.
    """
    rng = random.Random(20261126)
    prompts = []
    for obj, col in OBJECTS:
        for system in [None, *SYSTEMS]:
            msgs = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": f"What colour is a {obj}?"}]
            prompts.append({"prompt": msgs, "answer": f"A {obj} is {col}."})
    rng.shuffle(prompts)
    n_eval = len(prompts) // 4
    write_jsonl(DATA / "rl.jsonl", prompts[n_eval:])
    write_jsonl(DATA / "rl_eval.jsonl", prompts[:n_eval])


PASSKEY_TASK = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
                "I will quiz you about the important information there.")
PASSKEY_FILLER = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.",
                  "There and back again.")


def passkey_document(rng: random.Random, n_filler: int) -> str:
    """A retrieval document: the passkey test's layout (task, filler, the key at a random depth, question) and the answer.

    Pretraining on these teaches the tiny model to copy a number from far back, so the passkey
    evaluation measures whether that still works past the trained length.
    """
    key = rng.randint(10000, 99999)
    start = rng.randrange(len(PASSKEY_FILLER))
    filler = [PASSKEY_FILLER[(start + i) % len(PASSKEY_FILLER)] for i in range(n_filler)]
    at = rng.randint(0, n_filler)
    body = " ".join(filler[:at]), f"The pass key is {key}. Remember it. {key} is the pass key.", " ".join(filler[at:])
    return "\n".join([PASSKEY_TASK, *(b for b in body if b), f"What is the pass key? The pass key is {key}."])


def story_document(rng: random.Random, n_parts: int) -> str:
    """Running text for perplexity: stories and generic sentences, one after another."""
    parts = []
    for _ in range(n_parts):
        parts.append(story(rng)[1] if rng.random() < 0.7 else rng.choice(GENERIC))
    return " ".join(parts)


def make_long_context() -> None:
    """Documents for the long-context quickstart: short ones (< 128 tokens) to pretrain at L = 128, long ones
    (128..511 tokens) for the short fine-tune at 4L and for perplexity-vs-length.

    The training sets are half passkey retrievals, half running text, so the short and the long
    documents differ in length only; the eval set is running text of 600..1200 tokens. Lengths are measured with the bundled tokenizer (+1 for the EOS the
    text format appends).
    """
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(ASSETS / "tokenizer.json"))
    rng = random.Random(20261125)
    out = ROOT / "src/tunelab/data/builtin/long-context"

    def documents(count: int, low: int, high: int, filler: tuple[int, int], parts: tuple[int, int]) -> list[dict]:
        rows = []
        while len(rows) < count:
            passkey = len(rows) % 2 == 0
            text = passkey_document(rng, rng.randint(*filler)) if passkey else story_document(rng, rng.randint(*parts))
            if low <= len(tok.encode(text).ids) + 1 <= high:
                rows.append({"text": text})
        return rows

    write_jsonl(out / "short.jsonl", documents(3000, 24, 127, filler=(1, 14), parts=(1, 4)))
    write_jsonl(out / "long.jsonl", documents(400, 129, 511, filler=(18, 90), parts=(3, 14)))
    # perplexity-vs-length reads running text: stories longer than 4L, so a 512-token window rarely crosses a document
    evals = []
    while len(evals) < 40:
        text = story_document(rng, rng.randint(20, 40))
        if 600 <= len(tok.encode(text).ids) <= 1200:
            evals.append({"text": text})
    write_jsonl(out / "long_eval.jsonl", evals)


CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}{% generation %}{{- message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def make_tokenizer(corpus: list[str]) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=2048, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    ASSETS.mkdir(parents=True, exist_ok=True)
    tok.save(str(ASSETS / "tokenizer.json"))
    (ASSETS / "chat_template.jinja").write_text(CHAT_TEMPLATE + "\n", encoding="utf-8")


if __name__ == "__main__":
    make_tokenizer(make_data())
    make_preference()  # after the tokenizer: its text is not part of the tokenizer's training corpus
    make_rl()
    make_long_context()
    print("wrote", DATA, ASSETS)
