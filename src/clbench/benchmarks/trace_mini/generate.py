"""Generate trace-mini: small, deterministic stand-ins for TRACE's 8 tasks (Wang et al., 2023), in TRACE's layout.

Writes ``<out>/<Task>/{train,eval,test}.json``, each a JSON list of ``{"prompt": str, "answer": str}``. Standard library
only; the same seed (and, for Py150, the same standard-library source) gives byte-identical files::

    python src/clbench/benchmarks/trace_mini/generate.py [--train 400] [--eval 50] [--test 100] [--seed 0] [--out DIR]

Each task draws from its own ``random.Random(f"{seed}:{task}")``, and the test split is drawn first, then eval, then
train, so changing ``--train`` leaves eval and test unchanged. No prompt appears in two splits. Every task but Py150
and NumGLUE-cm draws each split balanced over answer kinds, to within one example: the letters of C-STANCE, FOMC and
ScienceQA, approved/rejected in MeetingBank, the asked quantity in NumGLUE-ds, reason kept/dropped in 20Minuten.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import io
import json
import random
import tokenize
from collections.abc import Callable
from pathlib import Path

TASKS = ("C-STANCE", "FOMC", "MeetingBank", "Py150", "ScienceQA", "NumGLUE-cm", "NumGLUE-ds", "20Minuten")
SPLITS = ("test", "eval", "train")  # drawing order: test first, so its content never depends on the train size
# 100 test examples: one example is 1 point of a task's score; 50 eval examples, enough to tune on
DEFAULT_SIZES = {"train": 400, "eval": 50, "test": 100}
DEFAULT_OUT = Path(__file__).resolve().parent / "data"

# Py150 reads these standard-library modules, whose source files are byte-identical in CPython 3.10 to 3.13.
PY150_MODULES = ("difflib", "html", "json", "json.scanner", "pyclbr")
PY150_SOURCES_FILE = "sources.json"  # written beside Py150's splits: sha256 of each module's source

Record = dict[str, str]
Maker = Callable[[random.Random, str], tuple[str, str]]


class GenerationError(RuntimeError):
    """The templates cannot supply the requested number of distinct prompts."""


# ----------------------------------------------------------------------------------------------------------------
# Shared machinery
# ----------------------------------------------------------------------------------------------------------------


def _quotas(labels: list[str], n: int, rng: random.Random) -> dict[str, int]:
    """Split ``n`` over ``labels`` as evenly as possible; which labels get the remainder is drawn from ``rng``."""
    order = list(labels)
    rng.shuffle(order)
    return {label: n // len(labels) + (1 if i < n % len(labels) else 0) for i, label in enumerate(order)}


def _draw(make: Maker, labels: list[str], sizes: dict[str, int], rng: random.Random) -> dict[str, list[Record]]:
    """Draw distinct prompts per split (test, eval, train), ``labels`` balanced, each split shuffled."""
    seen: set[str] = set()
    out: dict[str, list[Record]] = {}
    for split in SPLITS:
        records: list[Record] = []
        for label, quota in sorted(_quotas(labels, sizes[split], rng).items()):
            got, tries = 0, 0
            while got < quota:
                tries += 1
                if tries > 200 * quota + 1000:
                    raise GenerationError(f"could not draw {quota} distinct prompts for label {label!r} ({split})")
                prompt, answer = make(rng, label)
                if prompt in seen:
                    continue
                seen.add(prompt)
                records.append({"prompt": prompt, "answer": answer})
                got += 1
        rng.shuffle(records)
        out[split] = records
    return out


def _pick(rng: random.Random, options: list[str] | tuple[str, ...]) -> str:
    return options[rng.randrange(len(options))]


# ----------------------------------------------------------------------------------------------------------------
# C-STANCE: stance of a Chinese or English comment toward a target; A support, B oppose, C neutral (TRACE's letters)
# ----------------------------------------------------------------------------------------------------------------

CSTANCE_PROMPT = "判断文本对对象的态度：A.支持，B.反对，C.中立。\n文本：{text}\n对象：{target}\n答案："

CSTANCE_TARGETS = (  # (Chinese, English)
    ("远程办公", "remote work"), ("电动汽车", "electric cars"), ("垃圾分类", "waste sorting"),
    ("延迟退休", "later retirement"), ("网课", "online classes"), ("共享单车", "bike sharing"),
    ("四天工作制", "the four-day week"), ("校服", "school uniforms"), ("外卖", "food delivery"),
    ("夜市", "night markets"), ("高铁", "high-speed rail"), ("无人驾驶", "self-driving cars"),
    ("核电", "nuclear power"), ("限塑令", "the plastic ban"), ("早高峰限行", "rush-hour driving limits"),
    ("城市绿道", "city greenways"),
)

# Six cues per class and language, most carrying the menu's own word (支持 / 反对 / 中立, support / oppose / neutral)
# and some not (抵制, 观望, "against", "unsure"). Measured (single task, 50 LoRA steps, lr 1e-3; README): two redesigns
# that made the cues harder stayed at the constant answer, 0.31 and 0.33 (five or six cues per class avoiding the menu
# words, negated cues such as 我不支持 in B, a sixth to a third of the comments opening with another target's opposite
# stance), and so did one with three menu-word cues of five plus that contrast (0.33). So C-STANCE keeps these
# cues and no contrast clause; its 100 test examples make it graded (one example = 1 point). CSTANCE_CONTRAST stays
# a knob of the generator.
CSTANCE_ZH = {
    "A": ("我支持{t}。", "强烈支持{t}！", "{t}很好，支持。", "我赞成{t}。", "支持{t}，利大于弊。", "完全赞成{t}。"),
    "B": ("我反对{t}。", "坚决反对{t}！", "{t}不好，反对。", "我抵制{t}。", "反对{t}，弊大于利。", "坚决抵制{t}。"),
    "C": ("我对{t}保持中立。", "{t}有利有弊，中立。", "对{t}持观望态度。", "{t}先观望吧。", "对{t}中立，再看看。",
          "{t}还在观望。"),
}
CSTANCE_ZH_OPEN = ("", "说实话，", "个人觉得，", "今天聊聊：")

CSTANCE_EN = {  # the target is always an object, so singular and plural targets both read well
    "A": ("I support {t}.", "I fully support {t}.", "Big support for {t}!", "Yes, I support {t}.",
          "I strongly support {t}.", "We should support {t}."),
    "B": ("I oppose {t}.", "I strongly oppose {t}.", "I am against {t}.", "We must oppose {t}!",
          "Totally against {t}.", "I firmly oppose {t}."),
    "C": ("I am neutral on {t}.", "Neutral on {t} for now.", "Unsure about {t} yet.", "I stay neutral about {t}.",
          "Still unsure about {t}.", "I feel neutral about {t}."),
}
CSTANCE_EN_OPEN = ("", "Honestly, ", "Well, ", "Update: ")
CSTANCE_CONTRAST = 0.0  # share of comments that open with another target's (different) stance (see above)


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def make_cstance(rng: random.Random, label: str) -> tuple[str, str]:
    (zh, en), (other_zh, other_en) = rng.sample(CSTANCE_TARGETS, 2)
    chinese = rng.random() < 0.5
    clauses, opener = (CSTANCE_ZH, CSTANCE_ZH_OPEN) if chinese else (CSTANCE_EN, CSTANCE_EN_OPEN)
    target, other = (zh, other_zh) if chinese else (en, other_en)
    main = _pick(rng, clauses[label]).format(t=target)
    if rng.random() < CSTANCE_CONTRAST:
        other_label = _pick(rng, [c for c in "ABC" if c != label])
        first = _pick(rng, clauses[other_label]).format(t=other)
        first = first.rstrip("。！.!")
        body = f"{first}，但{main}" if chinese else f"{_cap(first)}, but {main}"
    else:
        body = main if chinese else _cap(main)
    start = _pick(rng, opener)
    if start and not chinese and not body.startswith("I "):
        body = body[0].lower() + body[1:]
    text = start + body + ("" if body.endswith(("。", "！", ".", "!")) else "。" if chinese else ".")
    return CSTANCE_PROMPT.format(text=text, target=target), label


# ----------------------------------------------------------------------------------------------------------------
# FOMC: monetary-policy stance; TRACE's letters A dovish, B hawkish, C neutral (same alphabet as C-STANCE)
# ----------------------------------------------------------------------------------------------------------------

FOMC_PROMPT = ("What is the monetary policy stance of the text? A. dovish, B. hawkish, C. neutral.\n"
               "Text: {text}\nAnswer:")

FOMC_SUBJECTS = ("The Committee", "Participants", "Most members", "Several officials", "The Board", "Policymakers")
# The policy action decides the class. "rate" and "policy" occur in all three classes, "further" in A and B.
FOMC_ACTIONS = {
    "A": ("decided to lower the policy rate", "cut the target range", "judged that policy should ease",
          "agreed to slow the balance sheet runoff", "favored more accommodation", "signaled further rate cuts"),
    "B": ("decided to raise the policy rate", "lifted the target range", "judged that policy should tighten",
          "agreed to shrink the balance sheet faster", "favored a more restrictive stance",
          "signaled further rate hikes"),
    "C": ("decided to keep the policy rate unchanged", "left the target range where it was",
          "judged the current policy appropriate", "will continue to monitor incoming data",
          "made no change to guidance", "described the risks as balanced"),
}
# Economic conditions. Three quarters of the sentences give one that agrees with the action ("... as growth slows");
# the other quarter open with a concession that points the other way ("Although inflation is elevated, ... lower the
# policy rate"), so the condition words are distractors there and only the action tells the class.
FOMC_CONDITIONS = {
    "A": ("growth slows", "unemployment rises", "demand weakens", "inflation cools"),
    "B": ("price pressures build", "wage growth is strong", "inflation is elevated", "demand overheats"),
    "C": ("the outlook is uncertain", "the data are mixed", "conditions are stable", "markets are calm"),
}
FOMC_CONCESSION = 1 / 4  # share of sentences that open with a concession pointing away from the class
FOMC_MONTHS = ("", "In January, ", "In March, ", "In May, ", "In June, ", "In July, ", "In September, ",
               "In November, ", "In December, ")


def make_fomc(rng: random.Random, label: str) -> tuple[str, str]:
    subject, action = _pick(rng, FOMC_SUBJECTS), _pick(rng, FOMC_ACTIONS[label])
    if rng.random() < FOMC_CONCESSION:  # a concession pointing away from the label
        condition = _pick(rng, FOMC_CONDITIONS[_pick(rng, [c for c in "ABC" if c != label])])
        text = f"Although {condition}, {subject[0].lower()}{subject[1:]} {action}."
    else:
        month = _pick(rng, FOMC_MONTHS)
        if month:
            subject = subject[0].lower() + subject[1:]
        text = f"{month}{subject} {action} as {_pick(rng, FOMC_CONDITIONS[label])}."
    return FOMC_PROMPT.format(text=text), label


# ----------------------------------------------------------------------------------------------------------------
# MeetingBank: a council-meeting transcript -> a short summary whose content and wording follow the transcript
# ----------------------------------------------------------------------------------------------------------------

MEETING_PROMPT = "Write a summary of the meeting transcript.\nTranscript: {text}\nSummary:"

MEETING_BODIES = (("City Council", "The council"), ("Planning Committee", "The committee"),
                  ("School Board", "The board"), ("Parks Commission", "The commission"))
MEETING_MEMBERS = ("Garcia", "Chen", "Patel", "Okafor", "Miller", "Nguyen", "Rossi", "Kim", "Lopez", "Brown")
MEETING_ITEMS = ("a new bike lane", "a budget amendment", "a parking permit program", "a park renovation",
                 "a library expansion", "a street repair contract", "a youth job program", "new street lights",
                 "a housing grant", "a noise ordinance")
MEETING_PLACES = ("Main Street", "the downtown area", "District 3", "District 5", "the west side",
                  "Harbor Road", "Elm Park", "the north library")
MEETING_DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday")
MEETING_CONCERNS = ("traffic", "parking", "noise", "safety", "the timeline", "the cost")
MEETING_OUTCOMES = ["approved", "rejected"]  # balanced per split: "always approved" is right only half the time

# The summary is not one template: its wording follows the way the transcript reports the vote (three ways), and it
# ends with the residents' concern only when the transcript has a public comment. The seconder and the cost are
# never summarised, so a model that copies the whole transcript loses precision. ROUGE-L 1.0 needs every one of:
# outcome, item, place, both vote counts, the matching wording, and whether and which concern to mention.
MEETING_VOTES = (  # (transcript's vote sentence, the summary's main sentence)
    ("After a short discussion, the motion {outcome} by a vote of {yes} to {no}.",
     "{Short} {verb} {item} for {place}, {yes} to {no}."),
    ("Members then voted {yes} to {no}, and the motion {outcome}.",
     "{Short} voted {yes} to {no} and {verb} {item} for {place}."),
    ("The chair called the roll: {yes} in favor, {no} against; the motion {outcome}.",
     "With {yes} votes in favor and {no} against, {short} {verb} {item} for {place}."),
)


def make_meeting(rng: random.Random, outcome: str) -> tuple[str, str]:
    body, short = _pick(rng, MEETING_BODIES)
    chair, mover, seconder = rng.sample(MEETING_MEMBERS, 3)
    item, place = _pick(rng, MEETING_ITEMS), _pick(rng, MEETING_PLACES)
    size = rng.choice((5, 7, 9))
    yes = rng.randint(size // 2 + 1, size) if outcome == "approved" else rng.randint(0, size // 2)
    vote_line, summary_line = MEETING_VOTES[rng.randrange(len(MEETING_VOTES))]
    opening = f"Chair {chair} opened the {body} meeting on {_pick(rng, MEETING_DAYS)} evening."
    motion = f"Member {mover} moved to approve {item} for {place}."
    concern = _pick(rng, MEETING_CONCERNS) if rng.random() < 0.5 else None
    extras = [f"Member {seconder} seconded the motion." if rng.random() < 0.5 else "",
              f"Staff said it would cost about {rng.randint(2, 95) * 10} thousand dollars." if rng.random() < 0.5
              else "",
              f"During public comment, {rng.randint(2, 12)} residents spoke about {concern}." if concern else ""]
    fields = {"outcome": "passed" if outcome == "approved" else "failed", "yes": yes, "no": size - yes,
              "verb": outcome, "item": item, "place": place, "short": short.lower(), "Short": short}
    text = " ".join([opening, motion, *[e for e in extras if e], vote_line.format(**fields)])
    summary = summary_line.format(**fields) + (f" Residents spoke about {concern}." if concern else "")
    return MEETING_PROMPT.format(text=text), summary


# ----------------------------------------------------------------------------------------------------------------
# Py150: next-line completion on real standard-library code, TRACE's <EOL> line separator (edit similarity)
# ----------------------------------------------------------------------------------------------------------------

PY150_PROMPT = "Continue writing the code.\n{code} <EOL>"
PY150_BLOCK = 16  # code lines per block; blocks go whole to one split, and a prompt's context stays inside its block
PY150_MAX_ANSWER = 60
PY150_MAX_PROMPT = 240


def module_source(name: str) -> str:
    """The source text of a standard-library module, read from its file (nothing is imported)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        raise GenerationError(f"standard-library module {name!r} has no Python source file")
    return Path(spec.origin).read_text(encoding="utf-8")


def source_fingerprint() -> dict[str, str]:
    """sha256 of each Py150 module's source, so a test can tell whether this Python's stdlib matches the data's."""
    return {name: hashlib.sha256(module_source(name).encode("utf-8")).hexdigest() for name in PY150_MODULES}


def code_lines(source: str) -> list[str]:
    """The source's lines without comments, docstrings, blank lines or indentation."""
    drop: set[int] = set()
    cut: dict[int, int] = {}
    skip = {tokenize.NL, tokenize.COMMENT}
    tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    significant = [t for t in tokens if t.type not in skip]
    for tok in tokens:
        if tok.type == tokenize.COMMENT:
            cut[tok.start[0]] = min(cut.get(tok.start[0], tok.start[1]), tok.start[1])
    starts = (tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT)
    for i, tok in enumerate(significant):
        if tok.type != tokenize.STRING:
            continue
        before = significant[i - 1].type if i else tokenize.NEWLINE
        after = significant[i + 1].type if i + 1 < len(significant) else tokenize.ENDMARKER
        if before in starts and after in (tokenize.NEWLINE, tokenize.ENDMARKER):
            drop.update(range(tok.start[0], tok.end[0] + 1))
    lines = []
    for number, line in enumerate(source.splitlines(), start=1):
        if number in drop:
            continue
        text = line[: cut[number]] if number in cut else line
        text = text.strip()
        if text:
            lines.append(text)
    return lines


def _py150_block_candidates(block: list[str], rng: random.Random) -> list[Record]:
    out = []
    for j in range(3, len(block)):
        answer = block[j]
        if not 4 <= len(answer) <= PY150_MAX_ANSWER:
            continue
        k = rng.randint(3, min(6, j))
        prompt = PY150_PROMPT.format(code=" <EOL> ".join(block[j - k : j]))
        while len(prompt) > PY150_MAX_PROMPT and k > 3:
            k -= 1
            prompt = PY150_PROMPT.format(code=" <EOL> ".join(block[j - k : j]))
        if len(prompt) <= PY150_MAX_PROMPT + 40:
            out.append({"prompt": prompt, "answer": answer})
    return out


def build_py150(sizes: dict[str, int], rng: random.Random) -> dict[str, list[Record]]:
    """Cut each module's code lines into blocks, give whole blocks to test, then eval, then train, and sample."""
    blocks = []
    for name in PY150_MODULES:
        lines = code_lines(module_source(name))
        blocks += [lines[i : i + PY150_BLOCK] for i in range(0, len(lines), PY150_BLOCK)]
    candidates = [_py150_block_candidates(block, rng) for block in blocks]
    order = list(range(len(blocks)))
    rng.shuffle(order)
    seen: set[str] = set()
    out: dict[str, list[Record]] = {}
    for split in SPLITS:
        pool: list[Record] = []
        while order and (split == "train" or len(pool) < sizes[split]):
            for rec in candidates[order.pop(0)]:
                if rec["prompt"] not in seen:
                    seen.add(rec["prompt"])
                    pool.append(rec)
        if len(pool) < sizes[split]:
            raise GenerationError(f"Py150: only {len(pool)} distinct {split} prompts for {sizes[split]} requested")
        out[split] = rng.sample(pool, sizes[split])
    return out


# ----------------------------------------------------------------------------------------------------------------
# ScienceQA: a multiple-choice science question, 2-4 options A-D; the answer is the letter (first-character accuracy)
# ----------------------------------------------------------------------------------------------------------------

SCIENCEQA_PROMPT = ("Choose an answer for the following question.\n{context}Question: {question}\nOptions: {options}\n"
                    "Answer:")

# Options are shuffled and written "option (letter)", with the letter after the option: SmolLM2-135M then learns in 50
# LoRA steps to find the option the context names and copy the letter that follows it. With TRACE's "(A) option"
# order it stayed at chance (0.29-0.42 after 50-150 steps, with or without the context): it could not bind an option
# to the letter before it at this budget (measured; src/clbench/benchmarks/trace_mini/README.md).
# (question phrasings with {x}, how the context names the item, the options, the items whose right answer is each)
SCIENCEQA_FAMILIES: tuple[tuple[tuple[str, ...], str, tuple[str, ...], tuple[tuple[str, ...], ...]], ...] = (
    (("Which group does the {x} belong to?", "What kind of animal is the {x}?", "Select the group of the {x}."),
     "the {x}",
     ("a mammal", "a bird", "a fish", "a reptile"), (
         ("dog", "whale", "horse", "bat", "cow", "rabbit", "lion", "dolphin", "elephant", "mouse", "tiger", "sheep"),
         ("eagle", "owl", "penguin", "robin", "parrot", "duck", "sparrow", "ostrich", "swan", "pigeon", "crow"),
         ("shark", "trout", "salmon", "tuna", "goldfish", "cod", "carp", "herring", "catfish"),
         ("snake", "lizard", "turtle", "crocodile", "gecko", "iguana", "alligator", "chameleon"))),
    (("What is {x} at room temperature?", "In which state is {x} at room temperature?", "Select the state of {x}."),
     "{x}",
     ("a solid", "a liquid", "a gas"), (
         ("iron", "wood", "glass", "salt", "rock", "brick", "sand", "copper", "chalk", "marble"),
         ("water", "milk", "orange juice", "olive oil", "vinegar", "lemonade", "honey", "tea"),
         ("oxygen", "helium", "nitrogen", "carbon dioxide", "neon", "hydrogen", "steam", "argon"))),
    (("What is {x}?", "Which kind of object in space is {x}?", "Select the kind of object {x} is."),
     "{x}",
     ("a planet", "a star", "a moon"), (
         ("Mercury", "Venus", "Mars", "Jupiter", "Saturn", "Uranus", "Neptune", "Earth"),
         ("the Sun", "Sirius", "Polaris", "Vega", "Betelgeuse", "Rigel", "Antares", "Aldebaran"),
         ("Titan", "Europa", "Ganymede", "Io", "Phobos", "Callisto", "Deimos", "Triton"))),
    (("What does a {x} measure?", "What kind of unit is a {x}?", "Select what a {x} is a unit of."),
     "a {x}",
     ("a unit of length", "a unit of mass", "a unit of time", "a unit of temperature"), (
         ("meter", "kilometer", "centimeter", "mile", "inch", "foot", "yard"),
         ("kilogram", "gram", "milligram", "ton", "pound", "ounce"),
         ("second", "minute", "hour", "day", "week", "year"),
         ("degree Celsius", "kelvin", "degree Fahrenheit"))),
    (("Is {x} a conductor or an insulator?", "How well does {x} carry electricity?",
      "Select the electrical property of {x}."),
     "{x}",
     ("a conductor", "an insulator"), (
         ("copper", "silver", "aluminum", "gold", "steel", "iron", "brass", "tin"),
         ("rubber", "wood", "glass", "plastic", "cotton", "paper", "wool", "ceramic"))),
)
# ScienceQA questions often come with a context that holds the fact needed; here it always does.
SCIENCEQA_CONTEXTS = ("Context: {S} is {option}.\n", "Context: Scientists classify {s} as {option}.\n",
                      "Context: In science class we learned that {s} is {option}.\n",
                      "Context: A textbook says {s} is {option}.\n")
SCIENCEQA_LETTERS = ["A", "B", "C", "D"]


def make_scienceqa(rng: random.Random, letter: str) -> tuple[str, str]:
    index = SCIENCEQA_LETTERS.index(letter)  # where the right option goes in the shown menu
    families = [family for family in SCIENCEQA_FAMILIES if len(family[2]) > index]
    questions, subject, options, items = families[rng.randrange(len(families))]
    right = rng.randrange(len(options))
    item = _pick(rng, items[right])
    n_shown = max(index + 1, rng.randint(2, len(options)))
    wrong = rng.sample([option for i, option in enumerate(options) if i != right], n_shown - 1)
    shown = wrong[:index] + [options[right]] + wrong[index:]
    menu = ", ".join(f"{option} ({SCIENCEQA_LETTERS[i]})" for i, option in enumerate(shown))
    question = _pick(rng, questions).format(x=item)
    named = subject.format(x=item)
    context = _pick(rng, SCIENCEQA_CONTEXTS).format(S=_cap(named), s=named, option=options[right])
    return SCIENCEQA_PROMPT.format(context=context, question=question, options=menu), letter


# ----------------------------------------------------------------------------------------------------------------
# NumGLUE-cm: addition word problems; NumGLUE-ds: a quantity read from a statement. Both answer an integer.
# ----------------------------------------------------------------------------------------------------------------

NUMGLUE_PROMPT = "Solve the following math problem.\n{problem}\nAnswer:"

NAMES = (("Anna", "she"), ("Ben", "he"), ("Mia", "she"), ("Tom", "he"), ("Lena", "she"), ("Omar", "he"),
         ("Sara", "she"), ("Leo", "he"), ("Nora", "she"), ("Sam", "he"))
CM_THINGS = ("apples", "stickers", "marbles", "pencils", "cards", "shells", "books", "stamps")
CM_TEMPLATES = (
    "{name} has {a} {x}. {Pron} gets {b} more {x}. How many {x} does {name} have now?",
    "There are {a} {x} in a box and {b} {x} on the table. How many {x} are there in all?",
    "{name} collected {a} {x} on Monday and {b} {x} on Tuesday. How many {x} did {pron} collect in total?",
    "{name} has {a} {x} and a friend gives {pron_obj} {b} {x}. How many {x} does {name} have altogether?",
)
# NumGLUE-ds mirrors NumGLUE's reading-comprehension type: the answer is a quantity stated in the passage, so the model
# must read which one is asked. (Subtraction was tried first: SmolLM2-135M scored 0.04 after 50 LoRA steps.)
# (statement with {a} of the first kind and {b} of the second, (question about the first, question about the second))
DS_FACTS = (
    ("A farm has {a} sheep and {b} horses.", ("How many sheep are on the farm?", "How many horses are on the farm?")),
    ("A shelf holds {a} books and {b} magazines.", ("How many books are on the shelf?",
                                                    "How many magazines are on the shelf?")),
    ("A bus carries {a} adults and {b} children.", ("How many adults are on the bus?",
                                                    "How many children are on the bus?")),
    ("A garden has {a} roses and {b} tulips.", ("How many roses are in the garden?",
                                                "How many tulips are in the garden?")),
    ("A team scored {a} points in the first half and {b} points in the second half.",
     ("How many points did the team score in the first half?",
      "How many points did the team score in the second half?")),
    ("A class has {a} girls and {b} boys.", ("How many girls are in the class?", "How many boys are in the class?")),
    ("A store sold {a} shirts on Monday and {b} shirts on Friday.",
     ("How many shirts did the store sell on Monday?", "How many shirts did the store sell on Friday?")),
    ("A box contains {a} red pens and {b} blue pens.", ("How many red pens are in the box?",
                                                        "How many blue pens are in the box?")),
)


DS_ASKED = ["first", "second"]  # which quantity the question asks for, balanced per split (always copying the
# first number of the statement is then right only half the time)


def make_numglue_cm(rng: random.Random, _label: str) -> tuple[str, str]:
    name, pron = _pick(rng, NAMES)
    # the sum is drawn uniformly (4-40), then its split into two addends 2-20: no sum is much likelier than another
    total = rng.randint(4, 40)
    a = rng.randint(max(2, total - 20), min(20, total - 2))
    b = total - a
    problem = _pick(rng, CM_TEMPLATES).format(name=name, pron=pron, Pron=_cap(pron), a=a, b=b,
                                              pron_obj="her" if pron == "she" else "him", x=_pick(rng, CM_THINGS))
    return NUMGLUE_PROMPT.format(problem=problem), str(a + b)


def make_numglue_ds(rng: random.Random, asked_label: str) -> tuple[str, str]:
    statement, questions = DS_FACTS[rng.randrange(len(DS_FACTS))]
    a = rng.randint(2, 40)
    b = rng.choice([n for n in range(2, 41) if n != a])
    asked = DS_ASKED.index(asked_label)
    problem = f"Statement: {statement.format(a=a, b=b)}\nQuestion: {questions[asked]}"
    return NUMGLUE_PROMPT.format(problem=problem), str((a, b)[asked])


# ----------------------------------------------------------------------------------------------------------------
# 20Minuten: German sentence simplification (SARI against the prompt as source)
# ----------------------------------------------------------------------------------------------------------------

MINUTEN_PROMPT = "Simplify the following German paragraph.\nParagraph: {text}\nSimplified:"

# (actor, long object, short object, participle, pronoun of the object, reasons kept, side remarks dropped).
# A "weil" clause is the news: the simplification keeps it as a second main clause, with the verb moved to second
# place ("weil er ohne Ausweis unterwegs war" -> "Er war ohne Ausweis unterwegs."). A "nachdem"/relative clause is a
# side remark and is dropped. Which of the two a sentence has is balanced per split, so no single template scores
# the maximum, and SARI gives partial credit to a model that gets the core sentence but not the reason.
MinutenEvent = tuple[str, str, str, str, tuple[tuple[str, str], ...], tuple[str, ...]]
MINUTEN_EVENTS: tuple[MinutenEvent, ...] = (
    ("die Polizei", "einen {age}-jährigen Mann", "einen Mann", "festgenommen",
     (("weil er ohne Ausweis unterwegs war", "Er war ohne Ausweis unterwegs."),
      ("weil er mehrere Autos beschädigt hatte", "Er hatte mehrere Autos beschädigt.")),
     ("nachdem Anwohner ihn gemeldet hatten", "der sich in einem Keller versteckt hatte")),
    ("die Polizei", "eine {age}-jährige Frau", "eine Frau", "kontrolliert",
     (("weil sie viel zu schnell gefahren war", "Sie war viel zu schnell gefahren."),
      ("weil sie kein Licht am Velo hatte", "Sie hatte kein Licht am Velo.")),
     ("nachdem sie eine rote Ampel überfahren hatte", "die gerade auf dem Heimweg war")),
    ("die Feuerwehr", "einen grossen Brand in einer Wohnung", "einen Brand", "gelöscht",
     (("weil eine Kerze umgefallen war", "Eine Kerze war umgefallen."),
      ("weil ein Kochherd überhitzt war", "Ein Kochherd war überhitzt.")),
     ("nachdem Nachbarn Rauch bemerkt hatten", "der schnell auf das Dach übergriff")),
    ("die Gemeinde", "eine neue Schule für {age}0 Kinder", "eine Schule", "eröffnet",
     (("weil die alte Schule zu klein war", "Die alte Schule war zu klein."),
      ("weil immer mehr Familien zuziehen", "Immer mehr Familien ziehen zu.")),
     ("nachdem die Bauarbeiten zwei Jahre gedauert hatten", "die am Rand des Dorfes steht")),
    ("die Stadt", "einen neuen Spielplatz mit vielen Geräten", "einen Spielplatz", "gebaut",
     (("weil viele Familien ihn wollten", "Viele Familien wollten ihn."),
      ("weil der alte Spielplatz kaputt war", "Der alte Spielplatz war kaputt.")),
     ("der im Frühling eröffnet werden soll", "nachdem der Gemeinderat zugestimmt hatte")),
    ("ein Forscherteam", "eine bisher unbekannte Tierart", "eine Tierart", "entdeckt",
     (("weil es neue Kameras benutzt hat", "Es hat neue Kameras benutzt."),
      ("weil es nachts im Wald gesucht hat", "Es hat nachts im Wald gesucht.")),
     ("die nur in einem kleinen Tal lebt", "nachdem es monatelang gesucht hatte")),
    ("ein Bauer", "einen seltenen weissen Hirsch", "einen Hirsch", "gesehen",
     (("weil er früh auf dem Feld war", "Er war früh auf dem Feld."),
      ("weil er eine Kamera dabeihatte", "Er hatte eine Kamera dabei.")),
     ("als er am Morgen auf sein Feld ging", "der sofort im Wald verschwand")),
    ("der Zoo", "ein kleines Elefantenbaby", "ein Elefantenbaby", "vorgestellt",
     (("weil es vor {age} Tagen geboren wurde", "Es wurde vor {age} Tagen geboren."),
      ("weil es endlich draussen spielen darf", "Es darf endlich draussen spielen.")),
     ("das schon sehr neugierig ist", "nachdem es den ersten Tierarzttest bestanden hatte")),
)
MINUTEN_CITIES = ("Zürich", "Bern", "Basel", "Luzern", "Genf", "Winterthur", "Chur", "Lugano")
MINUTEN_TIMES = ("Am Montagabend", "Am Dienstag", "Am Mittwochmorgen", "Am Freitag", "Am Wochenende",
                 "Am Sonntagnachmittag", "Gestern", "In der Nacht auf Samstag")
MINUTEN_SOURCES = ("", " laut einer Mitteilung", " nach eigenen Angaben", " laut Augenzeugen")
MINUTEN_KINDS = ["reason", "remark"]  # keep a "weil" reason / drop a side remark, balanced per split


def make_minuten(rng: random.Random, kind: str) -> tuple[str, str]:
    actor, long_obj, short_obj, verb, reasons, remarks = _pick(rng, MINUTEN_EVENTS)
    small = "Tagen" in str(reasons) or "0 Kinder" in long_obj  # days since a birth, tens of pupils
    age = rng.randint(2, 9) if small else rng.randint(19, 78)
    city, when = _pick(rng, MINUTEN_CITIES), _pick(rng, MINUTEN_TIMES)
    source = _pick(rng, MINUTEN_SOURCES)
    if kind == "reason":
        clause, kept = reasons[rng.randrange(len(reasons))]
        tail = " " + kept.format(age=age)
    else:
        clause, tail = _pick(rng, remarks), ""
    text = f"{when} hat {actor}{source} in {city} {long_obj.format(age=age)} {verb}, {clause.format(age=age)}."
    simple = f"{_cap(actor)} hat in {city} {short_obj} {verb}.{tail}"
    return MINUTEN_PROMPT.format(text=text), simple


# ----------------------------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------------------------

MAKERS: dict[str, tuple[Maker, list[str]]] = {
    "C-STANCE": (make_cstance, ["A", "B", "C"]),
    "FOMC": (make_fomc, ["A", "B", "C"]),
    "MeetingBank": (make_meeting, MEETING_OUTCOMES),
    "ScienceQA": (make_scienceqa, SCIENCEQA_LETTERS),
    "NumGLUE-cm": (make_numglue_cm, [""]),
    "NumGLUE-ds": (make_numglue_ds, DS_ASKED),
    "20Minuten": (make_minuten, MINUTEN_KINDS),
}


def build_task(task: str, sizes: dict[str, int], seed: int) -> dict[str, list[Record]]:
    """One task's splits, ``{"train": [...], "eval": [...], "test": [...]}``."""
    rng = random.Random(f"{seed}:{task}")
    if task == "Py150":
        return build_py150(sizes, rng)
    make, labels = MAKERS[task]
    return _draw(make, labels, sizes, rng)


def dumps(records: list[Record]) -> str:
    """The exact bytes written for one split (TRACE's layout: a JSON list of {"prompt", "answer"})."""
    return json.dumps(records, ensure_ascii=False, indent=1) + "\n"


def generate(out: Path, sizes: dict[str, int] | None = None, seed: int = 0) -> dict[str, dict[str, list[Record]]]:
    """Write every task's ``train/eval/test.json`` under ``out`` (plus Py150's ``sources.json``); return the data."""
    sizes = {**DEFAULT_SIZES, **(sizes or {})}
    data = {}
    for task in TASKS:
        splits = build_task(task, sizes, seed)
        folder = out / task
        folder.mkdir(parents=True, exist_ok=True)
        for split in ("train", "eval", "test"):
            (folder / f"{split}.json").write_text(dumps(splits[split]), encoding="utf-8", newline="\n")
        data[task] = splits
    fingerprint = {"modules": source_fingerprint()}
    (out / "Py150" / PY150_SOURCES_FILE).write_text(json.dumps(fingerprint, indent=1) + "\n", encoding="utf-8",
                                                     newline="\n")
    return data


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", type=int, default=DEFAULT_SIZES["train"], help="train examples per task")
    parser.add_argument("--eval", type=int, default=DEFAULT_SIZES["eval"], help="eval examples per task")
    parser.add_argument("--test", type=int, default=DEFAULT_SIZES["test"], help="test examples per task")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default: the bundled data)")
    args = parser.parse_args(argv)
    sizes = {"train": args.train, "eval": args.eval, "test": args.test}
    data = generate(args.out, sizes, args.seed)
    for task, splits in data.items():
        print(f"{task:12s} " + " ".join(f"{split}={len(splits[split])}" for split in ("train", "eval", "test")))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
