"""Generate general-mini's data: four tiny stand-ins for TRACE's general-ability benchmarks, deterministically.

Writes ``<out>/<task>.{test,train}.json`` (JSON lists of records; ``train`` holds the few-shot examples only).
Standard library only, no side effects on import; the same seed gives byte-identical files::

    python -m clbench.benchmarks.general_mini.generate [--test 100] [--train 4] [--seed 0] [--out DIR]

Tasks (lm-eval task names in the YAMLs beside this file):

- ``gmini_piqa``   PIQA-like physical commonsense, two solutions, loglikelihood multiple choice (acc).
- ``gmini_boolq``  BoolQ-like yes/no reading comprehension of a one-sentence comparison, loglikelihood (acc).
- ``gmini_arith``  GSM8K-like one-step arithmetic word problems, generate-until, number extracted, exact match.
- ``gmini_tydiqa_de``  TydiQA-like extractive question answering in German, generate-until, exact match.

Each task draws from its own ``random.Random(f"{seed}:{task}")``; the test split is drawn first, and no prompt is in
both splits.
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable
from pathlib import Path

DEFAULT_OUT = Path(__file__).resolve().parent / "data"
DEFAULT_SIZES = {"test": 100, "train": 4}

# (goal, sensible solution, absurd solution): the absurd one is fluent but physically wrong
PIQA_FACTS = [
    ("dry your wet hands", "rub them with a clean towel", "rub them with a bucket of water"),
    ("cut a sheet of paper", "use a pair of scissors", "use a soft sponge"),
    ("keep milk fresh", "store it in the fridge", "store it in the oven"),
    ("light a dark room", "switch on a lamp", "close the curtains"),
    ("cool down hot soup", "let it rest for a few minutes", "put it back on the stove"),
    ("hang a picture on the wall", "hammer a nail into the wall", "glue it with water"),
    ("clean a dirty floor", "sweep it with a broom", "sprinkle sand over it"),
    ("carry water to the garden", "fill a watering can", "fill a paper bag"),
    ("open a locked door", "turn the key in the lock", "knock on the hinges"),
    ("warm up cold hands", "hold a cup of hot tea", "hold a block of ice"),
    ("sharpen a pencil", "turn it in a sharpener", "dip it in milk"),
    ("stop a bleeding cut", "press a clean bandage on it", "wash it with vinegar for an hour"),
    ("read a book at night", "turn on a reading light", "wear sunglasses"),
    ("tighten a loose screw", "turn it with a screwdriver", "tap it with a feather"),
    ("boil an egg", "put it in boiling water", "put it in the freezer"),
    ("keep a plant alive", "water it every few days", "keep it in a dark box"),
    ("wake up on time", "set an alarm clock", "hide the clock under the bed"),
    ("keep your feet dry in the rain", "wear rubber boots", "wear thin paper slippers"),
    ("fix a flat bicycle tyre", "patch the hole and pump it up", "paint the tyre a new colour"),
    ("make toast", "put bread in a toaster", "put bread in a glass of water"),
    ("find your way in a new city", "look at a map", "close your eyes and walk"),
    ("wash a dirty shirt", "put it in the washing machine with soap", "rub it with mud"),
    ("protect your skin from the sun", "put on sunscreen", "rub butter on your face"),
    ("stay warm in winter", "wear a thick coat", "wear a wet swimsuit"),
    ("keep ice cream frozen", "keep it in the freezer", "leave it on a sunny windowsill"),
    ("water a tall tree", "use a garden hose", "use a small spoon"),
    ("see better in the dark", "use a flashlight", "turn off every light"),
    ("send a letter", "put a stamp on it and post it", "throw it into a river"),
    ("cook rice", "simmer it in water", "soak it in cold oil"),
    ("remove a stain from a carpet", "blot it with soapy water", "pour coffee on it"),
    ("measure the length of a table", "use a tape measure", "use a bowl of soup"),
    ("keep bread fresh", "seal it in a bag", "leave it open in the rain"),
    ("put out a small candle", "blow it out gently", "pour petrol on it"),
    ("get a cat down from a low shelf", "lift it down gently", "shout at the shelf"),
    ("carry many books", "pack them in a sturdy box", "balance them on a balloon"),
    ("check if a pan is hot", "hold your hand above it", "lick the pan"),
    ("mix flour and eggs", "stir them with a whisk", "stir them with a candle"),
    ("dry wet clothes", "hang them on a line in the sun", "fold them in a damp drawer"),
    ("make tea", "pour hot water over a tea bag", "pour sand over a tea bag"),
    ("unclog a sink", "use a plunger", "pour glue into it"),
    ("paint a fence", "brush paint onto the boards", "spray the boards with milk"),
    ("write a note", "use a pen and paper", "use a fork and a plate"),
]
PIQA_OPENERS = ["To {goal}, you should", "If you want to {goal}, the best way is to", "How do you {goal}? You"]

BOOLQ_THINGS = [("an elephant", "a mouse"), ("a mountain", "a hill"), ("the sun", "the moon"), ("a truck", "a bicycle"),
                ("a whale", "a fish"), ("an ocean", "a pond"), ("a city", "a village"), ("a tree", "a flower"),
                ("a house", "a tent"), ("a river", "a stream"), ("a horse", "a dog"), ("a castle", "a cottage"),
                ("a lake", "a puddle"), ("a giraffe", "a rabbit")]
BOOLQ_RELATIONS = [("bigger", "smaller"), ("heavier", "lighter"), ("older", "younger")]

ARITH_ITEMS = ["apples", "books", "pencils", "stamps", "marbles", "cookies", "shells", "cards"]
ARITH_NAMES = ["Tom", "Mia", "Ali", "Sara", "Ben", "Lena", "Omar", "Yuki"]

DE_NAMES = ["Anna", "Jonas", "Lea", "Felix", "Marie", "Paul", "Sophie", "Lukas"]
DE_CITIES = ["Berlin", "Hamburg", "Wien", "Zürich", "Köln", "Bremen", "Graz", "Basel"]
DE_JOBS = ["Ärztin", "Lehrer", "Bäckerin", "Koch", "Malerin", "Pilot", "Gärtnerin", "Richter"]
DE_PETS = ["einen Hund", "eine Katze", "einen Papagei", "ein Pferd"]

Record = dict
Maker = Callable[[random.Random], tuple[str, Record]]  # -> (dedup key, record)


def make_piqa(rng: random.Random) -> tuple[str, Record]:
    """A goal with one sensible and one absurd solution; the right one's position is drawn."""
    goal, good, bad = rng.choice(PIQA_FACTS)
    opener = rng.choice(PIQA_OPENERS).format(goal=goal)
    label = rng.randrange(2)
    sols = [good, bad] if label == 0 else [bad, good]
    return opener, {"goal": opener, "sol1": sols[0], "sol2": sols[1], "label": label}


def make_boolq(rng: random.Random) -> tuple[str, Record]:
    """A stated comparison and a question that either repeats it (yes) or reverses it (no)."""
    big, small = rng.choice(BOOLQ_THINGS)
    more, less = rng.choice(BOOLQ_RELATIONS)
    passage = f"{big[0].upper()}{big[1:]} is {more} than {small}."
    answer = rng.randrange(2)  # 1 = yes
    form = rng.randrange(2)
    if answer:
        question = f"is {big} {more} than {small}" if form else f"is {small} {less} than {big}"
    else:
        question = f"is {small} {more} than {big}" if form else f"is {big} {less} than {small}"
    return passage + question, {"passage": passage, "question": question, "label": answer}


def make_arith(rng: random.Random) -> tuple[str, Record]:
    """A one-step word problem (add, take away, or share equally) with an integer answer."""
    name, item = rng.choice(ARITH_NAMES), rng.choice(ARITH_ITEMS)
    kind = rng.randrange(3)
    if kind == 0:
        a, b = rng.randint(2, 40), rng.randint(2, 40)
        q, ans = f"{name} has {a} {item} and buys {b} more. How many {item} does {name} have now?", a + b
    elif kind == 1:
        a = rng.randint(10, 60)
        b = rng.randint(1, a - 1)
        q, ans = f"{name} has {a} {item} and gives away {b}. How many {item} are left?", a - b
    else:
        k, each = rng.randint(2, 6), rng.randint(2, 9)
        q, ans = (f"{name} shares {k * each} {item} equally among {k} friends. How many {item} does each friend "
                  f"get?"), each
    return q, {"question": q, "answer": str(ans)}


def make_tydiqa_de(rng: random.Random) -> tuple[str, Record]:
    """A three-sentence German context about a person and a question whose answer is a span of it."""
    name, city, job, pet = rng.choice(DE_NAMES), rng.choice(DE_CITIES), rng.choice(DE_JOBS), rng.choice(DE_PETS)
    context = f"{name} wohnt in {city}. {name} arbeitet als {job}. {name} hat {pet}."
    asks = [(f"Wo wohnt {name}?", city), (f"Als was arbeitet {name}?", job),
            (f"Was für ein Tier hat {name}?", pet.split(" ", 1)[1])]
    question, answer = rng.choice(asks)
    return context + question, {"context": context, "question": question, "answer": answer}


MAKERS: dict[str, Maker] = {"gmini_piqa": make_piqa, "gmini_boolq": make_boolq, "gmini_arith": make_arith,
                            "gmini_tydiqa_de": make_tydiqa_de}


def generate(seed: int = 0, sizes: dict[str, int] | None = None) -> dict[str, dict[str, list[Record]]]:
    """All tasks' splits: ``{task: {"test": [...], "train": [...]}}`` (test drawn first, no prompt in both)."""
    sizes = {**DEFAULT_SIZES, **(sizes or {})}
    out: dict[str, dict[str, list[Record]]] = {}
    for task, make in MAKERS.items():
        rng = random.Random(f"{seed}:{task}")
        seen: set[str] = set()
        out[task] = {}
        for split in ("test", "train"):
            records: list[Record] = []
            for _ in range(1000 * sizes[split]):
                if len(records) == sizes[split]:
                    break
                key, record = make(rng)
                if key not in seen:
                    seen.add(key)
                    records.append(record)
            if len(records) < sizes[split]:
                raise RuntimeError(f"{task}: the templates give fewer than {sizes[split]} distinct {split} prompts")
            out[task][split] = records
    return out


def write(out_dir: Path, data: dict[str, dict[str, list[Record]]]) -> list[Path]:
    """Write ``<out_dir>/<task>.<split>.json`` for every task and split; returns the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for task, splits in data.items():
        for split, records in splits.items():
            path = out_dir / f"{task}.{split}.json"
            path.write_text(json.dumps(records, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
            paths.append(path)
    return paths


def main() -> None:
    """Command-line entry point (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--test", type=int, default=DEFAULT_SIZES["test"])
    parser.add_argument("--train", type=int, default=DEFAULT_SIZES["train"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    for path in write(args.out, generate(args.seed, {"test": args.test, "train": args.train})):
        print(path)


if __name__ == "__main__":
    main()
