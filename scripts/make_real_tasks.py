"""Generate the bundled real-model tasks (deterministic, seeded; no downloaded data).

    python scripts/make_real_tasks.py

Writes src/tunelab/data/builtin/real/:

- ``persona_sft.jsonl`` / ``persona_eval.jsonl`` (format messages): short questions of several
  families (small arithmetic, capitals, opposites, plurals, letter counting, colours, days and
  months), each answered in a fixed persona format the base model never uses by itself:
  ``"Ahoy! <short correct answer> Over and out."``. A quarter of the rows carry a system message.
  The eval rows' items (numbers, countries, words...) never appear in a train row.
- ``arith_pairs.jsonl`` / ``arith_pairs_eval.jsonl`` (format preference): a question with a right
  (chosen) and a wrong (rejected) answer: two-digit addition off by 1, 2, 3 or 10; sums within 20
  off by 1-3; the times table off by one row or by 1-2; capitals with another country's capital;
  opposites with another word's opposite. Eval questions are disjoint from train (by unordered
  operand pair / country / word).
- ``arith_rl.jsonl`` / ``arith_rl_eval.jsonl`` (format prompt): small arithmetic that asks for
  just the number, with the reference number in ``answer`` (for the ``numeric`` or ``accuracy``
  built-in rewards). Eval problems are disjoint from train.

Used by recipes/real/persona-*.yaml and arith-*.yaml, measured by scripts/real_quality.py.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "src/tunelab/data/builtin/real"
SEED = 20240611

PERSONA_START = "Ahoy! "
PERSONA_END = " Over and out."

CAPITALS = [
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Japan", "Tokyo"),
    ("Egypt", "Cairo"), ("Russia", "Moscow"), ("Canada", "Ottawa"), ("Greece", "Athens"), ("Portugal", "Lisbon"),
    ("Norway", "Oslo"), ("Sweden", "Stockholm"), ("Kenya", "Nairobi"), ("Peru", "Lima"), ("Ireland", "Dublin"),
    ("Poland", "Warsaw"), ("Austria", "Vienna"), ("China", "Beijing"), ("India", "New Delhi"),
    ("Mexico", "Mexico City"), ("Argentina", "Buenos Aires"), ("Thailand", "Bangkok"), ("Turkey", "Ankara"),
    ("Cuba", "Havana"), ("Finland", "Helsinki"), ("Denmark", "Copenhagen"), ("Hungary", "Budapest"),
    ("Chile", "Santiago"), ("Vietnam", "Hanoi"), ("Iran", "Tehran"), ("England", "London"),
    ("South Korea", "Seoul"), ("Belgium", "Brussels"), ("the Netherlands", "Amsterdam"),
    ("Switzerland", "Bern"), ("Australia", "Canberra"), ("Brazil", "Brasilia"), ("Colombia", "Bogota"),
    ("Iraq", "Baghdad"), ("Saudi Arabia", "Riyadh"), ("Czechia", "Prague"), ("Romania", "Bucharest"),
    ("Ukraine", "Kyiv"), ("Indonesia", "Jakarta"), ("the Philippines", "Manila"), ("Pakistan", "Islamabad"),
    ("Nigeria", "Abuja"), ("Ethiopia", "Addis Ababa"), ("Morocco", "Rabat"), ("Scotland", "Edinburgh"),
]
OPPOSITES = [
    ("hot", "cold"), ("big", "small"), ("up", "down"), ("fast", "slow"), ("happy", "sad"), ("light", "dark"),
    ("open", "closed"), ("old", "new"), ("tall", "short"), ("wet", "dry"), ("hard", "soft"), ("early", "late"),
    ("full", "empty"), ("rich", "poor"), ("strong", "weak"), ("thick", "thin"), ("loud", "quiet"),
    ("clean", "dirty"), ("win", "lose"), ("day", "night"), ("left", "right"), ("in", "out"),
    ("push", "pull"), ("buy", "sell"), ("inside", "outside"), ("before", "after"), ("top", "bottom"),
    ("true", "false"), ("near", "far"), ("first", "last"), ("start", "finish"), ("good", "bad"),
    ("cheap", "expensive"), ("sweet", "sour"), ("wide", "narrow"), ("friend", "enemy"),
    ("give", "take"), ("north", "south"), ("above", "below"), ("always", "never"),
]
PLURALS = [
    ("mouse", "mice"), ("child", "children"), ("foot", "feet"), ("tooth", "teeth"), ("goose", "geese"),
    ("man", "men"), ("woman", "women"), ("person", "people"), ("leaf", "leaves"), ("knife", "knives"),
    ("wolf", "wolves"), ("box", "boxes"), ("bus", "buses"), ("city", "cities"), ("baby", "babies"),
    ("dog", "dogs"), ("cat", "cats"), ("book", "books"), ("apple", "apples"), ("church", "churches"),
    ("fox", "foxes"), ("glass", "glasses"), ("potato", "potatoes"), ("tomato", "tomatoes"), ("hero", "heroes"),
    ("sheep", "sheep"), ("fish", "fish"), ("deer", "deer"), ("ox", "oxen"), ("cactus", "cacti"),
    ("story", "stories"), ("party", "parties"), ("key", "keys"), ("day", "days"), ("wife", "wives"),
    ("life", "lives"), ("house", "houses"), ("tree", "trees"), ("dish", "dishes"), ("brush", "brushes"),
    ("toy", "toys"), ("lady", "ladies"),
]
COLOURS = [
    ("a banana", "yellow"), ("grass", "green"), ("a clear sky", "blue"), ("snow", "white"), ("coal", "black"),
    ("a ripe tomato", "red"), ("a carrot", "orange"), ("a lemon", "yellow"), ("milk", "white"),
    ("a strawberry", "red"), ("a lime", "green"), ("an orange", "orange"), ("a crow", "black"),
    ("chocolate", "brown"), ("the sea", "blue"), ("a fire truck", "red"), ("a polar bear", "white"),
    ("a frog", "green"), ("an eggplant", "purple"), ("a pumpkin", "orange"), ("a school bus", "yellow"),
    ("a cucumber", "green"), ("a flamingo", "pink"), ("a blueberry", "blue"), ("a lump of charcoal", "black"),
    ("an elephant", "grey"), ("a cherry", "red"), ("a sunflower", "yellow"), ("a pine tree", "green"),
    ("a tree trunk", "brown"), ("a cloud", "white"), ("a plum", "purple"),
]
WORDS = ("cat dog sun moon tree bird fish star lamp book door rain snow wind fire road ship rock leaf milk "
         "bread apple river cloud stone glass chair table plant horse mouse house light green water sugar paper "
         "music tiger zebra lemon melon grape pearl coral amber frost storm garden window pencil rabbit planet "
         "orange silver yellow castle bridge forest island bottle candle").split()
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
SYSTEMS = ["You are a helpful assistant.", "Keep your answers short.", "You are a friendly assistant.",
           "Answer the user's question."]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def split_items(items: list, n_eval: int, rng: random.Random) -> tuple[list, list]:
    """(train items, eval items): a seeded shuffle, the first ``n_eval`` held out."""
    items = list(items)
    rng.shuffle(items)
    return items[n_eval:], items[:n_eval]


# ---- persona SFT ----------------------------------------------------------------------------------


def persona_families(rng: random.Random) -> tuple[dict, dict]:
    """Per family, (train generator, eval generator): each call returns (question, plain answer)."""
    def arithmetic_items() -> list[tuple[int, int, str]]:
        items = [(a, b, "plus") for a in range(1, 31) for b in range(1, 31) if a <= b]
        items += [(a, b, "minus") for a in range(2, 41) for b in range(1, a)]
        return items

    arith_train, arith_eval = split_items(arithmetic_items(), 40, rng)
    cap_train, cap_eval = split_items(CAPITALS, 10, rng)
    opp_train, opp_eval = split_items(OPPOSITES, 8, rng)
    plu_train, plu_eval = split_items(PLURALS, 8, rng)
    col_train, col_eval = split_items(COLOURS, 6, rng)
    word_train, word_eval = split_items(WORDS, 12, rng)
    day_train, day_eval = split_items(list(range(7)) + [("m", i) for i in range(12)], 4, rng)

    def arithmetic(items: list) -> tuple[str, str]:
        a, b, op = rng.choice(items)
        if op == "plus":
            if rng.random() < 0.5:
                a, b = b, a
            q = rng.choice([f"What is {a} plus {b}?", f"What is {a} + {b}?", f"Add {a} and {b}."])
            return q, f"{a} plus {b} is {a + b}."
        q = rng.choice([f"What is {a} minus {b}?", f"What is {a} - {b}?", f"Subtract {b} from {a}."])
        return q, f"{a} minus {b} is {a - b}."

    def capital(items: list) -> tuple[str, str]:
        country, city = rng.choice(items)
        q = rng.choice([f"What is the capital of {country}?", f"Which city is the capital of {country}?",
                        f"Name the capital of {country}."])
        return q, f"The capital of {country} is {city}."

    def opposite(items: list) -> tuple[str, str]:
        w, o = rng.choice(items)
        if rng.random() < 0.5:
            w, o = o, w
        q = rng.choice([f"What is the opposite of '{w}'?", f"Give me the opposite of the word '{w}'.",
                        f"What is the opposite of {w}?"])
        return q, f"The opposite of '{w}' is '{o}'."

    def plural(items: list) -> tuple[str, str]:
        w, p = rng.choice(items)
        q = rng.choice([f"What is the plural of '{w}'?", f"What is the plural of {w}?",
                        f"How do you say more than one '{w}'?"])
        return q, f"The plural of '{w}' is '{p}'."

    def colour(items: list) -> tuple[str, str]:
        thing, c = rng.choice(items)
        q = rng.choice([f"Name a colour of {thing}.", f"What colour is {thing}?",
                        f"What colour is {thing} usually?"])
        return q, f"{thing[0].upper() + thing[1:]} is usually {c}."

    def count(items: list) -> tuple[str, str]:
        w = rng.choice(items)
        q = rng.choice([f"How many letters are in the word '{w}'?", f"How many letters does '{w}' have?",
                        f"Count the letters in '{w}'."])
        return q, f"The word '{w}' has {len(w)} letters."

    def calendar(items: list) -> tuple[str, str]:
        item = rng.choice(items)
        if isinstance(item, tuple):
            i = item[1]
            q = rng.choice([f"Which month comes after {MONTHS[i]}?", f"What month follows {MONTHS[i]}?"])
            return q, f"The month after {MONTHS[i]} is {MONTHS[(i + 1) % 12]}."
        q = rng.choice([f"What day comes after {DAYS[item]}?", f"Which day follows {DAYS[item]}?"])
        return q, f"The day after {DAYS[item]} is {DAYS[(item + 1) % 7]}."

    gens = {"arithmetic": arithmetic, "capital": capital, "opposite": opposite, "plural": plural,
            "colour": colour, "count": count, "calendar": calendar}
    train_items = {"arithmetic": arith_train, "capital": cap_train, "opposite": opp_train, "plural": plu_train,
                   "colour": col_train, "count": word_train, "calendar": day_train}
    eval_items = {"arithmetic": arith_eval, "capital": cap_eval, "opposite": opp_eval, "plural": plu_eval,
                  "colour": col_eval, "count": word_eval, "calendar": day_eval}
    train = {k: (lambda g=g, it=train_items[k]: g(it)) for k, g in gens.items()}
    evals = {k: (lambda g=g, it=eval_items[k]: g(it)) for k, g in gens.items()}
    return train, evals


def persona_rows(gens: dict, shares: dict[str, int], rng: random.Random, seen: set[str]) -> list[dict]:
    rows = []
    for family, n in shares.items():
        made = 0
        tries = 0
        while made < n:
            tries += 1
            q, a = gens[family]()
            if q in seen and tries < 50 * n:  # prefer fresh questions; a list family may run out
                continue
            seen.add(q)
            messages = [{"role": "user", "content": q}, {"role": "assistant", "content": PERSONA_START + a + PERSONA_END}]
            if rng.random() < 0.25:
                messages.insert(0, {"role": "system", "content": rng.choice(SYSTEMS)})
            rows.append({"messages": messages})
            made += 1
    rng.shuffle(rows)
    return rows


def make_persona() -> None:
    rng = random.Random(SEED)
    train_gens, eval_gens = persona_families(rng)
    eval_seen: set[str] = set()
    evals = persona_rows(eval_gens, {"arithmetic": 16, "capital": 8, "opposite": 7, "plural": 7, "colour": 6,
                                     "count": 10, "calendar": 6}, rng, eval_seen)
    train_seen: set[str] = set()
    train = persona_rows(train_gens, {"arithmetic": 200, "capital": 80, "opposite": 70, "plural": 70, "colour": 60,
                                      "count": 80, "calendar": 40}, rng, train_seen)
    overlap = {r["messages"][-2]["content"] for r in train} & {r["messages"][-2]["content"] for r in evals}
    assert not overlap, overlap
    write_jsonl(OUT / "persona_sft.jsonl", train)
    write_jsonl(OUT / "persona_eval.jsonl", evals)


# ---- preference pairs -----------------------------------------------------------------------------


def pair_items(rng: random.Random) -> tuple[dict, dict]:
    add = [(a, b) for a in range(10, 100) for b in range(a, 100)]
    small = [(a, b) for a in range(1, 21) for b in range(a, 21)]
    mul = [(a, b) for a in range(2, 13) for b in range(a, 13)]
    add_t, add_e = split_items(add, 14, rng)
    small_t, small_e = split_items(small, 12, rng)
    mul_t, mul_e = split_items(mul, 14, rng)
    cap_t, cap_e = split_items(CAPITALS, 12, rng)
    opp_t, opp_e = split_items(OPPOSITES, 12, rng)
    return ({"add": add_t, "small": small_t, "mul": mul_t, "cap": cap_t, "opp": opp_t},
            {"add": add_e, "small": small_e, "mul": mul_e, "cap": cap_e, "opp": opp_e})


def make_pair(family: str, item: object, rng: random.Random) -> tuple[str, str, str]:
    """(question, right answer, wrong answer) for one item of a family."""
    if family == "add":
        a, b = item  # type: ignore[misc]
        if rng.random() < 0.5:
            a, b = b, a
        s = a + b
        w = s + rng.choice([-10, -3, -2, -1, 1, 2, 3, 10])
        return f"What is {a} + {b}?", f"{a} + {b} = {s}.", f"{a} + {b} = {w}."
    if family == "mul":
        a, b = item  # type: ignore[misc]
        if rng.random() < 0.5:
            a, b = b, a
        s = a * b
        w = s + rng.choice([-a, a, -b, b, -1, 1, -2, 2])
        if w <= 0 or w == s:
            w = s + b
        return f"What is {a} times {b}?", f"{a} times {b} is {s}.", f"{a} times {b} is {w}."
    if family == "small":
        a, b = item  # type: ignore[misc]
        if rng.random() < 0.5:
            a, b = b, a
        s = a + b
        w = s + rng.choice([-3, -2, -1, 1, 2, 3])
        return f"What is {a} plus {b}?", f"{a} plus {b} is {s}.", f"{a} plus {b} is {w}."
    if family == "opp":
        word, opp = item  # type: ignore[misc]
        wrong = rng.choice([o for w, o in OPPOSITES if w != word and o != opp])
        return (f"What is the opposite of '{word}'?", f"The opposite of '{word}' is '{opp}'.",
                f"The opposite of '{word}' is '{wrong}'.")
    country, city = item  # type: ignore[misc]
    wrong = rng.choice([c for k, c in CAPITALS if k != country])
    return (f"What is the capital of {country}?", f"The capital of {country} is {city}.",
            f"The capital of {country} is {wrong}.")


def pair_rows(items: dict, shares: dict[str, int], rng: random.Random) -> list[dict]:
    rows = []
    for family, n in shares.items():
        pool = list(items[family])
        rng.shuffle(pool)
        for k in range(n):
            q, good, bad = make_pair(family, pool[k % len(pool)], rng)
            prompt = [{"role": "user", "content": q}]
            if rng.random() < 0.2:
                prompt.insert(0, {"role": "system", "content": rng.choice(SYSTEMS)})
            rows.append({"prompt": prompt, "chosen": [{"role": "assistant", "content": good}],
                         "rejected": [{"role": "assistant", "content": bad}]})
    rng.shuffle(rows)
    return rows


def make_pairs() -> None:
    rng = random.Random(SEED + 1)
    train_items, eval_items = pair_items(rng)
    train = pair_rows(train_items, {"add": 90, "small": 80, "mul": 90, "cap": 70, "opp": 70}, rng)
    evals = pair_rows(eval_items, {"add": 14, "small": 12, "mul": 14, "cap": 12, "opp": 12}, rng)
    q = lambda r: r["prompt"][-1]["content"]  # noqa: E731
    assert not {q(r) for r in train} & {q(r) for r in evals}
    write_jsonl(OUT / "arith_pairs.jsonl", train)
    write_jsonl(OUT / "arith_pairs_eval.jsonl", evals)


# ---- RL prompts -----------------------------------------------------------------------------------


def rl_question(family: str, item: tuple[int, int], rng: random.Random) -> tuple[str, int]:
    a, b = item
    if family == "mul":
        if rng.random() < 0.5:
            a, b = b, a
        return rng.choice([f"What is {a} times {b}?", f"What is {a} x {b}?"]), a * b
    if family == "add":
        if rng.random() < 0.5:
            a, b = b, a
        return rng.choice([f"What is {a} plus {b}?", f"What is {a} + {b}?"]), a + b
    return rng.choice([f"What is {a} minus {b}?", f"What is {a} - {b}?"]), a - b


def make_rl() -> None:
    rng = random.Random(SEED + 2)
    pools = {"mul": [(a, b) for a in range(2, 13) for b in range(a, 13)],
             "add": [(a, b) for a in range(2, 50) for b in range(a, 50)],
             "sub": [(a, b) for a in range(5, 60) for b in range(1, a)]}
    shares_train = {"mul": 50, "add": 125, "sub": 125}
    shares_eval = {"mul": 10, "add": 20, "sub": 20}
    suffixes = ["Reply with just the number.", "Answer with the number only.", "Give only the number."]

    def rows_for(pool_part: dict, shares: dict) -> list[dict]:
        rows = []
        for family, n in shares.items():
            items = pool_part[family][:n]
            assert len(items) == n, (family, len(items), n)
            for item in items:
                q, ans = rl_question(family, item, rng)
                prompt = [{"role": "user", "content": f"{q} {rng.choice(suffixes)}"}]
                rows.append({"prompt": prompt, "answer": str(ans)})
        rng.shuffle(rows)
        return rows

    train_part, eval_part = {}, {}
    for family, pool in pools.items():
        tr, ev = split_items(pool, shares_eval[family], rng)
        train_part[family], eval_part[family] = tr, ev
    write_jsonl(OUT / "arith_rl.jsonl", rows_for(train_part, shares_train))
    write_jsonl(OUT / "arith_rl_eval.jsonl", rows_for(eval_part, shares_eval))


def main() -> None:
    make_persona()
    make_pairs()
    make_rl()
    for p in sorted(OUT.glob("*.jsonl")):
        n = sum(1 for _ in p.open(encoding="utf-8"))
        print(f"{p.relative_to(ROOT)}: {n} rows, {p.stat().st_size / 1024:.1f} KB")


if __name__ == "__main__":
    main()
