"""Write tinyfacts.jsonl: 20 four-way multiple-choice facts for the lm-eval task in tinyfacts.yaml.

The facts are the invented ones the quickstart SFT data teaches (src/tunelab/data/builtin/quickstart/sft.jsonl:
"The capital of Corvenia is Duskport.", "A frost bell is white."), so a quickstart-trained model should beat
the 25% of chance and a random model should not. Distractors are other answers of the same kind, drawn with
a fixed seed; the gold answer's position is drawn too. Run it again only to change the data:

    python tests/assets/lm_eval/tinyfacts/make_tinyfacts.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

CAPITALS = {"Corvenia": "Duskport", "Istvar": "Kelpie", "Kavessa": "Redcliff", "Ostrelle": "Pinecrest",
            "Glimmera": "Lumen", "Mirovia": "Calder", "Jorunland": "Frosthold", "Norhaven": "Wyvern",
            "Tamberlune": "Marrow", "Rivenna": "Thornfield"}
COLOURS = {"ember fern": "red", "frost bell": "white", "copper leaf": "orange", "dusk feather": "purple",
           "mist flower": "silver", "river shell": "pink", "storm cap": "grey", "glimmerstone": "blue",
           "honey reed": "yellow", "moss lantern": "green"}


def rows(seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for table, context in ((CAPITALS, "The capital of {} is"), (COLOURS, "A {} is")):
        for subject, answer in table.items():
            wrong = rng.sample(sorted(set(table.values()) - {answer}), 3)
            label = rng.randrange(4)
            choices = wrong[:label] + [answer] + wrong[label:]
            out.append({"context": context.format(subject), "choices": choices, "label": label})
    return out


if __name__ == "__main__":
    path = Path(__file__).with_name("tinyfacts.jsonl")
    path.write_text("".join(json.dumps(r) + "\n" for r in rows()), encoding="utf-8")
    print(f"wrote {path}")
