"""tarq.metrics: Whisper normalization and WER / rare-WER / common-WER on cases counted by hand.

Word frequencies used below (wordfreq Zipf, English): caxton 2.45 (rare); the, press, printed, chapter,
so, it, big, cat, sat, too: all above 4 (common)."""

import random
import subprocess
import sys

import jiwer
import pytest
from jiwer import AlignmentChunk

from tarq.metrics import Scores, normalize, position_errors, score
from tarq.tagging import is_rare


def test_normalize_is_whispers():
    assert normalize("The invention, in the fifteenth century!") == "the invention in the 15th century"
    assert normalize("Her favourite colour.") == "her favorite color"  # spelling mapping from english.json
    assert normalize("Hmm. Uh, okay") == "okay"
    assert normalize("Mr. Caxton") == "mister caxton"
    assert normalize("") == ""


def test_normalize_does_not_import_torch():
    code = "import sys; from tarq.metrics import normalize; normalize('x'); assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def check_consistent(s: Scores) -> None:
    errors = s.substitutions + s.deletions + s.insertions
    assert s.rare_words + s.common_words == s.words
    assert s.rare_errors + s.common_errors + s.unattributed_insertions == errors
    if s.words:
        assert s.wer == pytest.approx(100 * errors / s.words)
        assert s.hits + s.substitutions + s.deletions == s.words


def test_substitution_at_a_rare_word():
    s = score(["The Caxton press."], ["the paxton press"])
    assert (s.substitutions, s.deletions, s.insertions) == (1, 0, 0)
    assert (s.words, s.rare_words, s.common_words) == (3, 1, 2)
    assert s.rare_wer == 100.0 and s.common_wer == 0.0 and s.wer == pytest.approx(100 / 3)
    check_consistent(s)


def test_rare_word_split_in_two_charges_the_insertion_to_it():
    # jiwer aligns "caxton" -> "cax ton" as insert "cax" + substitute caxton->ton: the insertion sits
    # between "the" (correct) and "caxton" (wrong) and goes to the wrong one.
    s = score(["the caxton press"], ["the cax ton press"])
    assert (s.substitutions, s.insertions, s.rare_errors, s.common_errors) == (1, 1, 2, 0)
    assert s.rare_wer == 200.0 and s.common_wer == 0.0 and s.wer == pytest.approx(200 / 3)
    check_consistent(s)


def test_insertion_between_correct_words_goes_to_the_preceding_word():
    s = score(["the caxton press"], ["the caxton big press"])  # preceding word: caxton (rare)
    assert (s.rare_errors, s.common_errors, s.rare_wer, s.common_wer) == (1, 0, 100.0, 0.0)
    s = score(["caxton printed"], ["caxton printed it"])  # preceding word: printed (common)
    assert (s.rare_errors, s.common_errors, s.rare_wer, s.common_wer) == (0, 1, 0.0, 100.0)


def test_insertion_at_the_start_goes_to_the_first_word():
    s = score(["caxton printed"], ["so so caxton printed"])
    assert (s.insertions, s.rare_errors, s.rare_wer, s.common_wer, s.wer) == (2, 2, 200.0, 0.0, 100.0)


def test_deletion_of_a_rare_word():
    s = score(["the caxton press"], ["the press"])
    assert (s.deletions, s.rare_wer, s.common_wer) == (1, 100.0, 0.0)


def test_empty_hypothesis():
    s = score(["The Caxton press", "a big cat"], ["", "a big cat"])
    assert (s.deletions, s.words, s.rare_words) == (3, 6, 1)
    assert s.rare_wer == 100.0 and s.common_wer == pytest.approx(200 / 5) and s.wer == 50.0
    check_consistent(s)


def test_no_rare_words_gives_rare_wer_none():
    s = score(["the cat sat"], ["the cat sat"])
    assert (s.rare_wer, s.rare_words, s.common_wer, s.wer) == (None, 0, 0.0, 0.0)


def test_reference_that_normalizes_to_nothing():
    # "Hmm." normalizes to "": its hypothesis words are insertions charged to no reference word.
    s = score(["Hmm.", "the cat"], ["hello there", "the cat"])
    assert (s.words, s.insertions, s.unattributed_insertions, s.wer) == (2, 2, 2, 100.0)
    assert (s.rare_errors, s.common_errors) == (0, 0)
    check_consistent(s)
    s = score(["Hmm."], ["uh"])
    assert (s.wer, s.rare_wer, s.common_wer, s.words) == (None, None, None, 0)


def test_normalization_applies_to_both_sides():
    s = score(["The Caxton press, in the fifteenth century!"], ["the caxton PRESS in the 15th century"])
    assert s.wer == 0.0 and s.rare_words == 2  # caxton, 15th (a digit)


def test_digits_are_tail_switch():
    # "two" normalizes to "2": tail when digits are tail, common (Zipf 6.0) when looked up.
    s = score(["chapter two"], ["chapter too"])
    assert (s.rare_words, s.rare_wer, s.common_wer) == (1, 100.0, 0.0)
    s = score(["chapter two"], ["chapter too"], digits_are_tail=False)
    assert (s.rare_words, s.rare_wer, s.common_wer) == (0, None, 50.0)


def test_threshold():
    s = score(["the caxton press"], ["the caxton dress"], zipf_threshold=5.5)  # press 5.16 is now rare
    assert (s.rare_words, s.rare_errors, s.common_words) == (2, 1, 1)


def test_length_mismatch():
    with pytest.raises(ValueError, match="2 references but 1 hypotheses"):
        score(["a", "b"], ["a"])


def chunk(kind, r0, r1, h0, h1):
    return AlignmentChunk(type=kind, ref_start_idx=r0, ref_end_idx=r1, hyp_start_idx=h0, hyp_end_idx=h1)


def test_position_errors_attribution_rules():
    # ref: w0 w1 w2 w3
    equal_ins_sub = [chunk("equal", 0, 1, 0, 1), chunk("insert", 1, 1, 1, 2), chunk("substitute", 1, 2, 2, 3),
                     chunk("equal", 2, 4, 3, 5)]  # fmt: skip
    assert position_errors(equal_ins_sub, 4) == [0, 2, 0, 0]  # the wrong neighbour, after the gap
    sub_ins_equal = [chunk("equal", 0, 1, 0, 1), chunk("substitute", 1, 2, 1, 2), chunk("insert", 2, 2, 2, 4),
                     chunk("equal", 2, 4, 4, 6)]  # fmt: skip
    assert position_errors(sub_ins_equal, 4) == [0, 3, 0, 0]  # the wrong neighbour, before the gap
    sub_ins_sub = [chunk("substitute", 0, 1, 0, 1), chunk("insert", 1, 1, 1, 2),
                   chunk("substitute", 1, 2, 2, 3)]  # fmt: skip
    assert position_errors(sub_ins_sub, 2) == [2, 1]  # both wrong: the preceding word
    start = [chunk("insert", 0, 0, 0, 2), chunk("equal", 0, 2, 2, 4)]
    assert position_errors(start, 2) == [2, 0]
    end = [chunk("equal", 0, 2, 0, 2), chunk("insert", 2, 2, 2, 3)]
    assert position_errors(end, 2) == [0, 1]
    deletion = [chunk("equal", 0, 1, 0, 1), chunk("delete", 1, 3, 1, 1)]
    assert position_errors(deletion, 3) == [0, 1, 1]


def corrupt(words: list[str], rng: random.Random) -> list[str]:
    out = []
    for w in words:
        r = rng.random()
        if r < 0.08:
            continue
        out.append("zyxt" if r < 0.16 else w)
        if r > 0.95:
            out.append("the")
    return out


def test_totals_on_real_transcripts(speech_dir):
    """Counts stay consistent over many utterances, WER equals jiwer's on the normalized text, and
    LJSpeech's raw and normalized transcripts agree once both go through the normalizer."""
    lines = (speech_dir / "transcripts.tsv").read_text().splitlines()[:120]
    refs = [ln.split("\t", 1)[1] for ln in lines]
    rng = random.Random(0)
    hyps = [" ".join(corrupt(normalize(r).split(), rng)) for r in refs]
    s = score(refs, hyps)
    check_consistent(s)
    assert s.utterances == 120 and s.unattributed_insertions == 0
    assert s.wer == pytest.approx(100 * jiwer.wer([normalize(r) for r in refs], hyps))
    assert 0 < s.rare_words < s.words and s.rare_wer > 0 and s.common_wer > 0
    assert s.rare_words == sum(is_rare(w) for r in refs for w in normalize(r).split())

    spelled_lines = (speech_dir / "transcripts_normalized.tsv").read_text().splitlines()
    spelled = dict(ln.split("\t", 1) for ln in spelled_lines)
    raw = dict(ln.split("\t", 1) for ln in lines)
    same = score(list(raw.values()), [spelled[k] for k in raw])
    assert same.wer < 1.0  # spelled-out numbers come back as digits
    assert Scores(**same.to_dict()) == same
