"""TRACE's scorers (clbench/scores.py): hand-computed values, including TRACE's quirks.

If one of these fails, clbench's per-task scores no longer match what TRACE's own evaluation code reports, so results
stop being comparable with the TRACE paper and with other TRACE runs.
"""

from __future__ import annotations

import sys
import warnings

import pytest

from clbench.scores import (
    SCORERS,
    accuracy,
    edit_similarity,
    first_char_accuracy,
    fuzz_ratio,
    get_scorer,
    postprocess_code,
    rouge_l,
    sari,
    sari_sentence,
    score,
)

EPS = 1e-8  # rouge 1.0.1 adds this to the F denominator


def rouge101_f(p: float, r: float) -> float:
    return 2.0 * p * r / (p + r + EPS)


# ---------------------------------------------------------------- shared contract


@pytest.mark.parametrize("name", sorted(SCORERS))
def test_length_mismatch_is_an_error(name: str) -> None:
    """Otherwise a dropped prediction would silently shift every pair and score the wrong answers."""
    with pytest.raises(ValueError, match="2 predictions but 1 answers"):
        score(name, ["a", "b"], ["a"], ["s", "t"])


@pytest.mark.parametrize("name", sorted(SCORERS))
def test_empty_list_scores_zero(name: str) -> None:
    """TRACE divides by zero on an empty test set; we document 0.0 instead of crashing the run."""
    assert score(name, [], [], []) == 0.0


def test_unknown_metric_names_the_choices() -> None:
    """A typo in a task's metric must fail loudly and say what exists."""
    with pytest.raises(ValueError, match=r"unknown metric 'bleu'; choose one of: accuracy, first_char_accuracy"):
        get_scorer("bleu")
    assert get_scorer("accuracy") is accuracy


def test_sari_needs_one_prompt_per_prediction() -> None:
    """SARI's source is the prompt; scoring without it would be a different metric."""
    with pytest.raises(ValueError, match="sari needs one prompt"):
        sari(["a"], ["a"], [])


# ---------------------------------------------------------------- accuracy


def test_accuracy_has_no_normalisation() -> None:
    """TRACE caculate_accuracy: "A " / "a" / "3.0" are wrong for "A" / "A" / "3"; a normaliser would inflate scores."""
    preds = ["A", "A ", "a", "3.0", "3"]
    golds = ["A", "A", "A", "3", "3"]
    assert accuracy(preds, golds) == pytest.approx(2 / 5)


def test_accuracy_empty_pairs_count_zero_but_stay_in_the_denominator() -> None:
    """TRACE skips a pair with an empty prediction or answer but divides by all n -- even "" == "" scores 0."""
    assert accuracy(["", "B", "", "C"], ["A", "", "", "C"]) == pytest.approx(1 / 4)


# ---------------------------------------------------------------- ScienceQA


def test_first_char_accuracy_uses_only_the_first_character() -> None:
    """eval_ScienceQA.resolve keeps datium[0]: the reasoning after the letter is ignored, a leading space is wrong."""
    preds = ["B\nBecause plants need light.", " B", "b", "C"]
    golds = ["B\nThe reason is light.", "B", "B", "C. Because"]
    assert first_char_accuracy(preds, golds) == pytest.approx(2 / 4)


def test_first_char_accuracy_empty_prediction_scores_zero() -> None:
    """TRACE raises IndexError on an empty prediction; here it is a wrong answer that still counts in n."""
    assert first_char_accuracy(["", "A"], ["A", "A"]) == pytest.approx(1 / 2)


# ---------------------------------------------------------------- MeetingBank (rouge 1.0.1)


def test_rouge_keeps_punctuation_on_words_unlike_rouge_score() -> None:
    """rouge 1.0.1 splits on spaces only: "A," != "A", so only "and", "C" match (rouge-score would give 1.0).

    answer "A B and C" vs prediction "A, B, and C.": 4 unique words each, LCS {and, C} = 2, P = R = 1/2.
    """
    assert rouge_l(["A, B, and C."], ["A B and C"]) == pytest.approx(rouge101_f(0.5, 0.5), abs=1e-15)
    assert rouge_l(["A, B, and C."], ["A B and C"]) != pytest.approx(1.0, abs=1e-3)


def test_rouge_perfect_match_is_not_exactly_one() -> None:
    """The 1e-8 in rouge 1.0.1's F denominator makes a perfect match 0.999999995; TRACE reports exactly that."""
    assert rouge_l(["the cat sat"], ["the cat sat"]) == pytest.approx(1 / (1 + EPS / 2), abs=1e-15)


def test_rouge_is_case_sensitive_and_counts_unique_words() -> None:
    """rouge 1.0.1 keeps case ("The" != "the") and uses word sets, so "the the the" vs "the" is a perfect match."""
    assert rouge_l(["The cat"], ["the cat"]) == pytest.approx(rouge101_f(0.5, 0.5), abs=1e-15)
    assert rouge_l(["the the the"], ["the"]) == pytest.approx(rouge101_f(1.0, 1.0), abs=1e-15)


def test_rouge_takes_the_answer_as_hypothesis_like_trace() -> None:
    """TRACE calls get_scores(target, prediction); summary-level ROUGE-L is not symmetric, so swapping changes scores.

    hyp = answer "c b a", refs = prediction sentences "d d a", "a d b": LCS words {a} then {b} -> union 2 of 3 words.
    The other way round the tie-break picks {a} twice -> 1 of 3.
    """
    assert rouge_l(["d d a . a d b"], ["c b a"]) == pytest.approx(rouge101_f(2 / 3, 2 / 3), abs=1e-15)
    assert rouge_l(["c b a"], ["d d a . a d b"]) == pytest.approx(rouge101_f(1 / 3, 1 / 3), abs=1e-15)


def test_rouge_empty_and_degenerate_pairs_score_zero_in_the_denominator() -> None:
    """Empty strings are skipped by TRACE (0, kept in n); "..." makes rouge raise in TRACE, here it scores 0."""
    perfect = rouge101_f(1.0, 1.0)
    assert rouge_l(["a b", "", "x", "..."], ["a b", "x", "", "x"]) == pytest.approx(perfect / 4, abs=1e-15)
    assert rouge_l([" "], ["x"]) == 0.0  # whitespace is not "" for TRACE: scored by rouge, which gives 0


def test_rouge_long_single_sentence_does_not_hit_the_recursion_limit() -> None:
    """rouge's LCS back-tracking recurses once per word; a 1000-word sentence crashes it at Python's default limit."""
    text = " ".join(f"w{i}" for i in range(1000))
    limit = sys.getrecursionlimit()
    assert rouge_l([text], [text]) == pytest.approx(1 / (1 + EPS / 2), abs=1e-15)
    assert sys.getrecursionlimit() == limit


# ---------------------------------------------------------------- Py150


def test_py150_postprocess_undoes_literal_masks_only() -> None:
    """eval_Py150.postprocess: <NUM_LIT> -> 0, <STR_LIT>/<CHAR_LIT> -> "", <X_LIT:v> -> v; <EOL> etc. are kept."""
    code = "x = <NUM_LIT> <EOL> y = '<STR_LIT>' + <CHAR_LIT> <EOL> z = <STR_LIT:hello> + <NUM_LIT:42> + <CHAR_LIT:c>"
    assert postprocess_code(code) == "x = 0 <EOL> y = '' +  <EOL> z = hello + 42 + c"
    assert postprocess_code("<INDENT> <s> return <STR_LIT:a\nb> </s>") == "<INDENT> <s> return a\nb </s>"


def test_py150_postprocess_replaces_found_literals_one_after_another() -> None:
    """TRACE finds all literals first, then str.replace()s each over the whole text, so nested masks unwrap twice.

    findall gives "<STR_LIT:<STR_LIT:a>" (value "<STR_LIT:a") and "<STR_LIT:a>"; replacing the first creates a second
    "<STR_LIT:a>", which the next replace also rewrites (a single re.sub would leave "<STR_LIT:a> a").
    """
    assert postprocess_code("<STR_LIT:<STR_LIT:a>> <STR_LIT:a>") == "a a"


def test_py150_scores_after_postprocessing() -> None:
    """Literal masks are undone before scoring: "x = <NUM_LIT>" equals "x = 0"; a bare "<STR_LIT>" becomes "".

    Two bare "<STR_LIT>" are identical before post-processing yet score 0 (empty after it, skipped, kept in n).

    "return x <EOL>" vs "return x": difflib M = 8 of 14 + 8 characters -> 16/22 = 0.727 -> 73 -> 0.73.
    """
    assert edit_similarity(["x = <NUM_LIT>"], ["x = 0"]) == 1.0
    assert edit_similarity(["<STR_LIT>", "abc"], ["<STR_LIT>", "abc"]) == pytest.approx(0.5)
    assert edit_similarity(["return x <EOL>"], ["return x"]) == pytest.approx(0.73)
    assert edit_similarity(["abc", ""], ["abc", "abc"]) == pytest.approx(0.5)


def test_fuzz_ratio_is_difflib_not_levenshtein() -> None:
    """TRACE installs fuzzywuzzy without python-Levenshtein, so fuzz.ratio is difflib's greedy block matching.

    "cbc" vs "bac": difflib first matches a[0]="c" with b[2]="c", leaving nothing on either side: M = 1,
    2·1/6 -> 33. The LCS ("bc", python-Levenshtein's indel ratio) would give 2·2/6 -> 67.
    """
    assert fuzz_ratio("cbc", "bac") == 33
    assert edit_similarity(["cbc"], ["bac"]) == pytest.approx(0.33)


def test_fuzz_ratio_autojunk_and_half_to_even_rounding() -> None:
    """difflib's autojunk ignores characters over 1% of a 200+ character text; Python rounds 12.5 down to 12.

    "x" + 250 zeros vs "y" + 250 zeros shares 250 characters yet scores 0; "abbbbbbb" vs "accccccc" is 2·1/16 = 12.5%.
    """
    assert fuzz_ratio("x" + "0" * 250, "y" + "0" * 250) == 0
    assert fuzz_ratio("a" + "b" * 7, "a" + "c" * 7) == 12
    assert fuzz_ratio("same", "same") == 100 and fuzz_ratio("", "x") == 0


def test_fuzz_ratio_matches_installed_fuzzywuzzy() -> None:
    """Cross-check with fuzzywuzzy itself when it runs on difflib (as in TRACE's environment)."""
    pytest.importorskip("fuzzywuzzy")
    try:
        import Levenshtein  # noqa: F401

        pytest.skip("python-Levenshtein installed: fuzzywuzzy no longer uses difflib, unlike TRACE")
    except ImportError:
        pass
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from fuzzywuzzy import fuzz
    pairs = [("cbc", "bac"), ("x" + "0" * 250, "y" + "0" * 250), ("a" + "b" * 7, "a" + "c" * 7), ("f(x)", "g(y)")]
    for a, b in pairs:
        assert fuzz_ratio(a, b) == fuzz.ratio(a, b)


# ---------------------------------------------------------------- 20Minuten (SARI)


def test_sari_copying_the_source() -> None:
    """source "a b c", prediction = source, reference "a b d" (HF sari.py arithmetic):

    keep F1 per n = 4/5, 2/3, 0, 1 (no 4-grams: 0/0 := 1); deletion precision 1 (nothing deleted);
    addition F1 = 0, 0, 0, 1. SARI = (37/60 + 1 + 1/4) / 3 = 28/45.
    """
    assert sari(["a b c"], ["a b d"], ["a b c"]) == pytest.approx(28 / 45, abs=1e-15)


def test_sari_prediction_equal_to_reference_is_one() -> None:
    """Keeping "a b", deleting "c" and adding "d" exactly as the reference does is perfect on every n-gram order."""
    assert sari(["a b d"], ["a b d"], ["a b c"]) == pytest.approx(1.0, abs=1e-15)


def test_sari_lowercases_and_13a_tokenizes() -> None:
    """HF normalises every text (lowercase, sacrebleu 13a), so "Der Hund bellt." equals "der hund bellt ."."""
    assert sari(["der hund bellt ."], ["Der Hund bellt."], ["Der Hund bellt."]) == pytest.approx(1.0, abs=1e-15)


def test_sari_scores_empty_predictions() -> None:
    """HF's SARI does not skip an empty prediction (unlike TRACE's other metrics), and scores it well above 0.

    source "a b", prediction "" (one "" token), reference "a": n=1 keep 0, del 1/2, add 0; n=2..4 give 1, 1, 1.
    SARI = (3/4 + 7/8 + 3/4) / 3 = 19/24; averaged with a perfect second pair -> (19/24 + 1) / 2.
    """
    assert sari([""], ["a"], ["a b"]) == pytest.approx(19 / 24, abs=1e-15)
    assert sari(["", "a b d"], ["a", "a b d"], ["a b", "a b c"]) == pytest.approx((19 / 24 + 1) / 2, abs=1e-15)


def test_sari_matches_hf_docstring_example() -> None:
    """HF sari's own documented example (three references) gives 26.953601953601954 on its 0-100 scale."""
    refs = [
        "About 95 species are currently known .",
        "About 95 species are now accepted .",
        "95 species are now accepted .",
    ]
    value = sari_sentence("About 95 species are currently accepted .", "About 95 you now get in .", refs)
    assert 100 * value == pytest.approx(26.953601953601954, abs=1e-12)
