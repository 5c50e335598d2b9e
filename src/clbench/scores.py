"""TRACE's per-task scorers (Wang et al. 2023, github.com/BeyonderXX/TRACE), reproduced on a 0-1 scale.

Each scorer mirrors one function of TRACE's ``metrics.py`` / ``evaluations/eval_*.py`` and keeps its quirks:

- C-STANCE, FOMC, NumGLUE-cm, NumGLUE-ds: ``accuracy`` (``metrics.caculate_accuracy``)
- ScienceQA: ``first_char_accuracy`` (``evaluations/eval_ScienceQA.py`` resolve + ``caculate_accuracy``)
- MeetingBank: ``rouge_l`` (``metrics.caculate_rouge``, ``rouge`` 1.0.1)
- Py150: ``edit_similarity`` (``evaluations/eval_Py150.py`` postprocess + ``metrics.caculate_fuzz``)
- 20Minuten: ``sari`` (``metrics.caculate_sari``, HF's ``sari`` metric script)

Shared rules (TRACE's ``caculate_*`` loops): a pair whose prediction or answer is the empty string scores 0 but stays in
the denominator; nothing is stripped or case-folded. SARI has no such rule (HF scores every pair). Where TRACE itself
crashes (an empty list divides by zero, ``""[0]`` raises in ScienceQA, ``rouge`` raises on a text made only of ".")
we return 0.0 for the list or the pair instead; see each function.
"""

from __future__ import annotations

import difflib
import re
import sys
from collections import Counter
from collections.abc import Callable, Sequence

from rouge import Rouge
from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

Scorer = Callable[[Sequence[str], Sequence[str], Sequence[str]], float]


def _check_lengths(predictions: Sequence[str], answers: Sequence[str]) -> None:
    if len(predictions) != len(answers):
        raise ValueError(f"got {len(predictions)} predictions but {len(answers)} answers; they must pair up 1:1")


def _mean_over_pairs(
    predictions: Sequence[str], answers: Sequence[str], pair_score: Callable[[str, str], float]
) -> float:
    """Σ pair_score(p, a) / n over pairs where neither p nor a is "" (those add 0); 0.0 for n = 0.

    Mirrors the loop shared by TRACE's metrics.caculate_accuracy / caculate_rouge / caculate_fuzz (which divide by
    len(results) and so raise ZeroDivisionError on an empty list; we return 0.0 instead).
    """
    _check_lengths(predictions, answers)
    if not predictions:
        return 0.0
    total = sum(pair_score(p, a) for p, a in zip(predictions, answers, strict=True) if p != "" and a != "")
    return total / len(predictions)


# ---------------------------------------------------------------- accuracy (C-STANCE, FOMC, NumGLUE-cm, NumGLUE-ds)


def accuracy(predictions: Sequence[str], answers: Sequence[str], prompts: Sequence[str] | None = None) -> float:
    """Exact match: #{i : p_i == a_i, p_i != "", a_i != ""} / n  (TRACE metrics.caculate_accuracy).

    Plain string equality, no normalisation: "A " != "A", "a" != "A", "3.0" != "3". Two empty strings score 0.
    Empty list -> 0.0. ``prompts`` is ignored.
    """
    return _mean_over_pairs(predictions, answers, lambda p, a: 1.0 if p == a else 0.0)


# ---------------------------------------------------------------- ScienceQA


def first_char_accuracy(
    predictions: Sequence[str], answers: Sequence[str], prompts: Sequence[str] | None = None
) -> float:
    """#{i : p_i[0] == a_i[0]} / n  (TRACE evaluations/eval_ScienceQA.py: resolve() keeps datium[0], then accuracy).

    Only the first character counts ("B\\nBecause ..." vs "B" is right), with no stripping: " B" vs "B" is wrong.
    TRACE raises IndexError on an empty prediction or answer; here such a pair scores 0 and stays in the denominator.
    Empty list -> 0.0. ``prompts`` is ignored.
    """
    _check_lengths(predictions, answers)
    return accuracy([p[:1] for p in predictions], [a[:1] for a in answers])


# ---------------------------------------------------------------- MeetingBank

_ROUGE_L = Rouge(metrics=["rouge-l"])


def _rouge_l_pair(prediction: str, answer: str) -> float:
    # TRACE metrics.score_rouge(target, prediction) calls Rouge.get_scores(target, prediction): the *answer* is
    # rouge's hypothesis. Summary-level ROUGE-L of rouge 1.0.1 is not symmetric, so the order matters.
    # rouge's LCS back-tracking is recursive (depth ~ words of both texts); TRACE would hit RecursionError past ~1000
    # words, we lift the limit so long texts get the score rouge's algorithm defines.
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, len(prediction.split()) + len(answer.split()) + 1000))
    try:
        return _ROUGE_L.get_scores(answer, prediction, avg=True)["rouge-l"]["f"]
    except ValueError:  # a text made only of "." has no sentence for rouge; TRACE crashes there, we score the pair 0
        return 0.0
    finally:
        sys.setrecursionlimit(limit)


def rouge_l(predictions: Sequence[str], answers: Sequence[str], prompts: Sequence[str] | None = None) -> float:
    """Mean ROUGE-L F of the ``rouge`` 1.0.1 package: Σ F_lcs(a_i, p_i) / n  (TRACE metrics.caculate_rouge).

    rouge 1.0.1 splits each text into sentences on "." and words on " " (case and punctuation kept: "A," != "A"),
    counts unique words m (answer) and n (prediction), takes the union of per-sentence LCS words u, and gives
    F = 2·(u/m)·(u/n) / (u/m + u/n + 1e-8) -- so a perfect match scores 0.999999995, not 1.
    Pairs with an empty prediction or answer score 0 (kept in n); a text of only "." scores 0 (TRACE raises).
    Empty list -> 0.0. ``prompts`` is ignored.
    """
    return _mean_over_pairs(predictions, answers, _rouge_l_pair)


# ---------------------------------------------------------------- Py150

_LITERAL = re.compile(r"<(STR|NUM|CHAR)_LIT:(.*?)>", re.S)


def postprocess_code(code: str) -> str:
    """Undo Py150's literal masks as TRACE evaluations/eval_Py150.py postprocess() does.

    "<NUM_LIT>" -> "0", "<STR_LIT>" and "<CHAR_LIT>" -> "", then every "<STR_LIT:x>", "<NUM_LIT:x>", "<CHAR_LIT:x>"
    found (non-greedy up to the first ">", across newlines) is replaced by x, one found literal at a time over the
    whole string (so a replacement can create text a later one rewrites). Nothing else is touched: "<EOL>",
    "<INDENT>", "<DEDENT>", "<s>", "</s>" stay as they are.
    """
    code = code.replace("<NUM_LIT>", "0").replace("<STR_LIT>", "").replace("<CHAR_LIT>", "")
    for kind, value in _LITERAL.findall(code):
        code = code.replace(f"<{kind}_LIT:{value}>", value)
    return code


def fuzz_ratio(a: str, b: str) -> int:
    """fuzzywuzzy 0.18 ``fuzz.ratio`` without python-Levenshtein, i.e. as TRACE's requirements install it.

    round(100 · difflib.SequenceMatcher(None, a, b).ratio()) with Python's round (half to even: 12.5 -> 12), 100 for
    equal strings, 0 if either is empty. difflib's ratio is 2·M/(|a|+|b|) with M from greedy longest-block matching
    (not the LCS), and autojunk on: in a text of 200+ characters, characters making up over 1% of it are never matched.
    """
    if a == b:
        return 100
    if not a or not b:
        return 0
    return int(round(100 * difflib.SequenceMatcher(None, a, b).ratio()))


def edit_similarity(predictions: Sequence[str], answers: Sequence[str], prompts: Sequence[str] | None = None) -> float:
    """Σ fuzz_ratio(post(p_i), post(a_i)) / n / 100  (TRACE eval_Py150.eval -> metrics.caculate_fuzz, rescaled 0-1).

    post = ``postprocess_code``; a pair that is empty *after* post-processing (e.g. a bare "<STR_LIT>") scores 0 and
    stays in n. TRACE reports this ×100. Empty list -> 0.0. ``prompts`` is ignored.
    """
    _check_lengths(predictions, answers)
    posts = [postprocess_code(p) for p in predictions]
    golds = [postprocess_code(a) for a in answers]
    return _mean_over_pairs(posts, golds, fuzz_ratio) / 100


# ---------------------------------------------------------------- 20Minuten (SARI)
# Hand-written because TRACE loads HF's "sari" metric script (datasets.load_metric("sari"), the same code as
# evaluate's metrics/sari/sari.py), which is fetched from the Hugging Face Hub at run time; no offline package ships it.
# This reproduces that script's arithmetic step by step (n-gram counts, 0/0 := 1 conventions, the keep-recall fix,
# summation order), with sacrebleu's 13a tokenizer after lowercasing, one reference per example.

_TOKENIZE_13A = Tokenizer13a()


def _sari_normalize(text: str) -> str:
    return _TOKENIZE_13A(text.lower())


def _f1(precision: float, recall: float) -> float:
    return 2 * precision * recall / (precision + recall) if precision > 0 or recall > 0 else 0.0


def _sari_ngram(src: list[str], pred: list[str], refs: list[list[str]]) -> tuple[float, float, float]:
    """(keep F1, deletion precision, addition F1) for one n-gram order (HF sari.py SARIngram)."""
    numref = len(refs)
    r_count = Counter(g for ref in refs for g in ref)
    s_rep = Counter({g: c * numref for g, c in Counter(src).items()})
    c_rep = Counter({g: c * numref for g, c in Counter(pred).items()})

    keep = s_rep & c_rep
    keep_good = keep & r_count
    keep_all = s_rep & r_count
    keep_p = sum(keep_good[g] / keep[g] for g in keep_good) / len(keep) if keep else 1
    keep_r = sum(keep_good.values()) / sum(keep_all.values()) if keep_all else 1

    deleted = s_rep - c_rep
    del_good = deleted - r_count
    del_p = sum(del_good[g] / deleted[g] for g in del_good) / len(deleted) if deleted else 1

    added = set(c_rep) - set(s_rep)
    add_good = added & set(r_count)
    add_all = set(r_count) - set(s_rep)
    add_p = len(add_good) / len(added) if added else 1
    add_r = len(add_good) / len(add_all) if add_all else 1
    return _f1(keep_p, keep_r), del_p, _f1(add_p, add_r)


def _ngrams(tokens: list[str], n: int) -> list[str]:
    return [" ".join(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def sari_sentence(source: str, prediction: str, references: Sequence[str]) -> float:
    """SARI of one example on a 0-1 scale (HF sari.py: normalize + SARIsent).

    Texts are lowercased and 13a-tokenized, then split on " " (an empty text is one "" token). For n = 1..4:
    keep F1, deletion precision and addition F1; SARI = (mean keep + mean del + mean add) / 3.
    """
    src = _sari_normalize(source).split(" ")
    pred = _sari_normalize(prediction).split(" ")
    refs = [_sari_normalize(r).split(" ") for r in references]
    keeps, dels, adds = zip(
        *(_sari_ngram(_ngrams(src, n), _ngrams(pred, n), [_ngrams(r, n) for r in refs]) for n in (1, 2, 3, 4)),
        strict=True,
    )
    return (sum(keeps) / 4 + sum(dels) / 4 + sum(adds) / 4) / 3


def sari(predictions: Sequence[str], answers: Sequence[str], prompts: Sequence[str]) -> float:
    """Σ SARI(prompt_i, p_i, [a_i]) / n  (TRACE metrics.caculate_sari -> HF "sari", which reports ×100).

    The prompt (TRACE's "sources", the full dataset prompt) is the source; each answer is the single reference.
    Unlike the other scorers every pair counts, empty predictions included (HF scores them normally).
    Empty list -> 0.0 (HF divides by zero).
    """
    _check_lengths(predictions, answers)
    if prompts is None or len(prompts) != len(predictions):
        got = "no prompts" if prompts is None else f"{len(prompts)} prompts"
        raise ValueError(f"sari needs one prompt (source) per prediction: got {got} for {len(predictions)} predictions")
    if not predictions:
        return 0.0
    total = 0.0
    for src, pred, ref in zip(prompts, predictions, answers, strict=True):
        total += sari_sentence(src, pred, [ref])
    return total / len(predictions)


# ---------------------------------------------------------------- registry

SCORERS: dict[str, Scorer] = {
    "accuracy": accuracy,
    "first_char_accuracy": first_char_accuracy,
    "rouge_l": rouge_l,
    "edit_similarity": edit_similarity,
    "sari": sari,
}


def get_scorer(name: str) -> Scorer:
    """The scorer registered under ``name``; ValueError naming the choices for an unknown name."""
    try:
        return SCORERS[name]
    except KeyError:
        raise ValueError(f"unknown metric {name!r}; choose one of: {', '.join(SCORERS)}") from None


def score(metric: str, predictions: Sequence[str], answers: Sequence[str], prompts: Sequence[str]) -> float:
    """``get_scorer(metric)(predictions, answers, prompts)``: a score in [0, 1]."""
    return get_scorer(metric)(predictions, answers, prompts)


# ---------------------------------------------------------------- per-example scores (for bootstrap intervals)


def _pair_scores(predictions: Sequence[str], answers: Sequence[str], pair_score: Callable[[str, str], float]
                 ) -> list[float]:
    """pair_score(p_i, a_i) for every pair, 0.0 where p_i or a_i is "" (the per-pair terms of _mean_over_pairs)."""
    _check_lengths(predictions, answers)
    return [pair_score(p, a) if p != "" and a != "" else 0.0 for p, a in zip(predictions, answers, strict=True)]


def _example_accuracy(predictions: Sequence[str], answers: Sequence[str], prompts: Sequence[str] | None) -> list[float]:
    return _pair_scores(predictions, answers, lambda p, a: 1.0 if p == a else 0.0)


def _example_first_char(predictions: Sequence[str], answers: Sequence[str], prompts: Sequence[str] | None
                        ) -> list[float]:
    _check_lengths(predictions, answers)
    return _example_accuracy([p[:1] for p in predictions], [a[:1] for a in answers], None)


def _example_rouge_l(predictions: Sequence[str], answers: Sequence[str], prompts: Sequence[str] | None) -> list[float]:
    return _pair_scores(predictions, answers, _rouge_l_pair)


def _example_edit_similarity(predictions: Sequence[str], answers: Sequence[str], prompts: Sequence[str] | None
                             ) -> list[float]:
    _check_lengths(predictions, answers)
    posts = [postprocess_code(p) for p in predictions]
    golds = [postprocess_code(a) for a in answers]
    return [r / 100 for r in _pair_scores(posts, golds, fuzz_ratio)]


def _example_sari(predictions: Sequence[str], answers: Sequence[str], prompts: Sequence[str] | None) -> list[float]:
    _check_lengths(predictions, answers)
    if prompts is None or len(prompts) != len(predictions):
        got = "no prompts" if prompts is None else f"{len(prompts)} prompts"
        raise ValueError(f"sari needs one prompt (source) per prediction: got {got} for {len(predictions)} predictions")
    return [sari_sentence(src, pred, [ref]) for src, pred, ref in zip(prompts, predictions, answers, strict=True)]


EXAMPLE_SCORERS: dict[str, Callable[[Sequence[str], Sequence[str], Sequence[str] | None], list[float]]] = {
    "accuracy": _example_accuracy,
    "first_char_accuracy": _example_first_char,
    "rouge_l": _example_rouge_l,
    "edit_similarity": _example_edit_similarity,
    "sari": _example_sari,
}


def example_scores(metric: str, predictions: Sequence[str], answers: Sequence[str],
                   prompts: Sequence[str] | None) -> list[float]:
    """The per-example terms x_i of ``score(metric, ...)``, so that mean(x) == score(...) (up to float rounding).

    Every TRACE scorer here is a mean over examples, score = (1/n) Σ_i x_i:
    accuracy / first-character accuracy x_i ∈ {0, 1}; ROUGE-L x_i = F_lcs(a_i, p_i); edit similarity
    x_i = fuzz_ratio(post(p_i), post(a_i)) / 100; with x_i = 0 for a pair whose prediction or answer is "" (the pair
    still counts in n). SARI is no exception: HF's ``sari`` script, which TRACE calls, averages the sentence-level
    SARIsent over examples (it has no corpus-level n-gram pooling), so x_i = ``sari_sentence(prompt_i, p_i, [a_i])``
    and a resample of examples is re-scored exactly by averaging the resampled x_i. That is what makes a bootstrap
    over test examples cheap: resampling never calls a scorer again. Empty input -> [].
    """
    if metric not in EXAMPLE_SCORERS:
        raise ValueError(f"unknown metric {metric!r}; choose one of: {', '.join(EXAMPLE_SCORERS)}")
    return EXAMPLE_SCORERS[metric](predictions, answers, prompts)
