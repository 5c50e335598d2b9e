"""The bundled trace-mini data: equal to what its generator writes, well formed, split-disjoint and class-balanced."""

from __future__ import annotations

import importlib.util
import json
import re
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "src" / "clbench" / "benchmarks" / "trace_mini"
DATA = ROOT / "data"
SPLITS = ("train", "eval", "test")
SIZES = {"train": 400, "eval": 16, "test": 24}
CLASSES = {"C-STANCE": "ABC", "FOMC": "ABC", "ScienceQA": "ABCD"}


def _load_generator():
    spec = importlib.util.spec_from_file_location("trace_mini_generate", ROOT / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gen = _load_generator()


def _read(root: Path, task: str, split: str) -> list[dict[str, str]]:
    return json.loads((root / task / f"{split}.json").read_text(encoding="utf-8"))


def _stdlib_matches() -> bool:
    """Whether this Python's Py150 source modules are the ones the committed Py150 data was cut from."""
    recorded = json.loads((DATA / "Py150" / gen.PY150_SOURCES_FILE).read_text(encoding="utf-8"))["modules"]
    return recorded == gen.source_fingerprint()


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("trace_mini")
    gen.main(["--out", str(out)])
    return out


def test_task_names_are_traces():
    assert gen.TASKS == ("C-STANCE", "FOMC", "MeetingBank", "Py150", "ScienceQA", "NumGLUE-cm", "NumGLUE-ds",
                         "20Minuten")
    assert sorted(p.name for p in DATA.iterdir() if p.is_dir()) == sorted(gen.TASKS)


@pytest.mark.parametrize("task", [t for t in gen.TASKS if t != "Py150"])
def test_committed_data_equals_generator_output(regenerated: Path, task: str):
    for split in SPLITS:
        name = f"{task}/{split}.json"
        assert (regenerated / name).read_bytes() == (DATA / name).read_bytes(), f"{name} is stale: rerun generate.py"


def test_committed_py150_equals_generator_output_or_is_well_formed(regenerated: Path):
    if _stdlib_matches():
        for name in ("train.json", "eval.json", "test.json", gen.PY150_SOURCES_FILE):
            assert (regenerated / "Py150" / name).read_bytes() == (DATA / "Py150" / name).read_bytes(), name
    else:  # a Python whose stdlib sources differ: the committed data cannot be reproduced here, check its shape
        for split in SPLITS:
            records = _read(DATA, "Py150", split)
            assert len(records) == SIZES[split]
            for rec in records:
                assert rec["prompt"].startswith("Continue writing the code.\n") and rec["prompt"].endswith(" <EOL>")
                assert rec["prompt"].count("<EOL>") >= 3
                assert 4 <= len(rec["answer"]) <= 60 and rec["answer"] == rec["answer"].strip()


@pytest.mark.parametrize("task", gen.TASKS)
def test_splits_are_lists_of_prompt_answer_records(task: str):
    for split in SPLITS:
        records = _read(DATA, task, split)
        assert isinstance(records, list) and len(records) == SIZES[split]
        for rec in records:
            assert list(rec) == ["prompt", "answer"]
            assert isinstance(rec["prompt"], str) and rec["prompt"].strip()
            assert isinstance(rec["answer"], str) and rec["answer"].strip()
            assert len(rec["prompt"]) <= 480 and len(rec["answer"]) <= 80


@pytest.mark.parametrize("task", gen.TASKS)
def test_no_prompt_is_shared_between_splits(task: str):
    prompts = {split: [rec["prompt"] for rec in _read(DATA, task, split)] for split in SPLITS}
    for split in SPLITS:
        assert len(set(prompts[split])) == len(prompts[split]), f"{task}/{split} repeats a prompt"
    assert not set(prompts["train"]) & set(prompts["eval"])
    assert not set(prompts["train"]) & set(prompts["test"])
    assert not set(prompts["eval"]) & set(prompts["test"])


@pytest.mark.parametrize("task", sorted(CLASSES))
def test_classification_classes_are_balanced(task: str):
    for split in SPLITS:
        counts = Counter(rec["answer"] for rec in _read(DATA, task, split))
        assert sorted(counts) == list(CLASSES[task]), (task, split, counts)
        assert max(counts.values()) - min(counts.values()) <= 1, (task, split, counts)


def test_stance_inputs_never_spell_out_a_letter():
    # the label menu is the instruction line; the comment or sentence below it carries cues, never an answer letter
    for task in ("C-STANCE", "FOMC"):
        for split in SPLITS:
            for rec in _read(DATA, task, split):
                assert not re.search(r"(?<![A-Za-z])[ABC](?![A-Za-z])", rec["prompt"].split("\n", 1)[1]), rec


def test_scienceqa_answer_is_the_letter_after_the_option_the_context_names():
    """If the context and the letter disagreed, no model could learn ScienceQA and its column would measure noise."""
    for split in SPLITS:
        for record in _read(DATA, "ScienceQA", split):
            context = re.search(r"Context: (.*)\n", record["prompt"]).group(1)
            menu = re.findall(r"(an? [a-z ]+?) \(([A-D])\)", re.search(r"Options: (.*)\n", record["prompt"]).group(1))
            named = [letter for option, letter in menu if context.endswith(f" {option}.")]
            assert named == [record["answer"]], record


def test_numglue_answers_are_right():
    """A wrong NumGLUE answer would make the task unlearnable: cm answers the sum, ds the quantity asked about."""
    for task in ("NumGLUE-cm", "NumGLUE-ds"):
        for split in SPLITS:
            for rec in _read(DATA, task, split):
                numbers = [int(w) for w in rec["prompt"].replace(".", " ").split() if w.isdigit()]
                assert len(numbers) == 2 and rec["answer"].isdigit()
                a, b = numbers
                if task == "NumGLUE-cm":
                    assert int(rec["answer"]) == a + b
                else:  # the question asks about the first or the second quantity of its statement
                    question = rec["prompt"].split("\nQuestion: ")[1].removesuffix("\nAnswer:")
                    [which] = [qs.index(question) for _, qs in gen.DS_FACTS if question in qs]
                    assert int(rec["answer"]) == (a, b)[which], rec


def test_generation_is_deterministic_and_test_split_ignores_train_size(tmp_path: Path):
    gen.main(["--out", str(tmp_path / "a"), "--train", "30", "--eval", "4", "--test", "6", "--seed", "3"])
    gen.main(["--out", str(tmp_path / "b"), "--train", "30", "--eval", "4", "--test", "6", "--seed", "3"])
    gen.main(["--out", str(tmp_path / "c"), "--train", "50", "--eval", "4", "--test", "6", "--seed", "3"])
    for task in gen.TASKS:
        for split in SPLITS:
            name = f"{task}/{split}.json"
            assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
        assert _read(tmp_path / "a", task, "test") == _read(tmp_path / "c", task, "test")
        assert len(_read(tmp_path / "c", task, "train")) == 50


def test_loads_through_the_benchmark_loader():
    from clbench.benchmark import read_split

    for task in gen.TASKS:
        for split in SPLITS:
            assert len(read_split(DATA / task / f"{split}.json")) == SIZES[split]
