"""WER, rare-WER and common-WER, computed the way TARQ reports them (docs/TARQ.md, "rare-WER, exactly").

Both sides go through Whisper's English text normalizer, jiwer aligns them, and every error is charged
to a reference position: a substitution or deletion to its own reference word, an insertion to a
neighbouring one (see `_charge_insertion`). rare-WER is the errors charged to rare reference words over
the number of rare reference words; common-WER the same for common words. So rare and common words add up
to all words and, apart from insertions in utterances whose reference normalizes to nothing, rare and
common errors add up to all errors of the overall WER.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass
from functools import lru_cache
from importlib import resources

import jiwer

from tarq.tagging import is_rare


@lru_cache(maxsize=1)
def _normalizer():
    # Imported here: the transformers module is torch-free but takes a second to import.
    from transformers.models.whisper.english_normalizer import EnglishTextNormalizer

    mapping = json.loads(resources.files("tarq").joinpath("data/english.json").read_text(encoding="utf-8"))
    return EnglishTextNormalizer(mapping)


def normalize(text: str) -> str:
    """Whisper's English normalizer: lowercase, no punctuation, numbers as digits ("fifteenth" -> "15th"),
    British spellings to American, fillers ("uh", "hmm") dropped. The same function for refs and hyps."""
    return _normalizer()(text)


@dataclass(frozen=True)
class Scores:
    """Error rates in percent (None where there is nothing to divide by) and the counts behind them, so
    results of several runs can be summed and recomputed."""

    wer: float | None
    rare_wer: float | None
    common_wer: float | None
    words: int
    rare_words: int
    common_words: int
    utterances: int
    hits: int
    substitutions: int
    deletions: int
    insertions: int
    rare_errors: int
    common_errors: int
    unattributed_insertions: int  # hypothesis words where the normalized reference is empty

    def to_dict(self) -> dict:
        return asdict(self)


def score(
    refs: list[str], hyps: list[str], zipf_threshold: float = 3.0, digits_are_tail: bool = True
) -> Scores:
    """Score hypotheses against references (raw text; both are normalized here), utterance by utterance
    aligned, corpus-level rates. Rare means `is_rare(word, zipf_threshold, digits_are_tail)` on the
    normalized reference word."""
    if len(refs) != len(hyps):
        raise ValueError(f"score: {len(refs)} references but {len(hyps)} hypotheses")
    ref_words = [normalize(r).split() for r in refs]
    hyp_words = [normalize(h).split() for h in hyps]
    # jiwer refuses empty references; what is said over one counts as insertions charged to no word.
    scored = [i for i, ref in enumerate(ref_words) if ref]
    unattributed = sum(len(hyp_words[i]) for i, ref in enumerate(ref_words) if not ref)
    n = Counter()
    if scored:
        out = jiwer.process_words(
            [" ".join(ref_words[i]) for i in scored], [" ".join(hyp_words[i]) for i in scored]
        )
        for field in ("hits", "substitutions", "deletions", "insertions"):
            n[field] = getattr(out, field)
        for i, chunks in zip(scored, out.alignments):
            for word, errors in zip(ref_words[i], position_errors(chunks, len(ref_words[i]))):
                kind = "rare" if is_rare(word, zipf_threshold, digits_are_tail) else "common"
                n.update({f"{kind}_words": 1, f"{kind}_errors": errors})
    words = n["rare_words"] + n["common_words"]
    errors = n["substitutions"] + n["deletions"] + n["insertions"] + unattributed
    return Scores(
        wer=_percent(errors, words),
        rare_wer=_percent(n["rare_errors"], n["rare_words"]),
        common_wer=_percent(n["common_errors"], n["common_words"]),
        words=words,
        rare_words=n["rare_words"],
        common_words=n["common_words"],
        utterances=len(refs),
        hits=n["hits"],
        substitutions=n["substitutions"],
        deletions=n["deletions"],
        insertions=n["insertions"] + unattributed,
        rare_errors=n["rare_errors"],
        common_errors=n["common_errors"],
        unattributed_insertions=unattributed,
    )


def position_errors(chunks: list[jiwer.AlignmentChunk], ref_len: int) -> list[int]:
    """Errors charged to each reference position of one aligned utterance (jiwer's alignment chunks)."""
    errors = [0] * ref_len
    wrong = [False] * ref_len
    for chunk in chunks:
        if chunk.type in ("substitute", "delete"):
            for pos in range(chunk.ref_start_idx, chunk.ref_end_idx):
                errors[pos] += 1
                wrong[pos] = True
    for chunk in chunks:
        if chunk.type == "insert":
            pos = _charge_insertion(chunk.ref_start_idx, wrong)
            errors[pos] += chunk.hyp_end_idx - chunk.hyp_start_idx
    return errors


def _charge_insertion(gap: int, wrong: list[bool]) -> int:
    """The reference position an insertion before reference word `gap` is charged to.

    An insertion next to a misrecognized word is usually part of the same mistake: a rare name heard as
    two common words ("Leonardo" -> "leo nardo") aligns as one substitution plus one insertion, and jiwer
    may put the insertion on either side of it. So: if exactly one neighbour (the reference word before
    the gap, the one after it) is itself a substitution or deletion, charge that one; otherwise charge the
    preceding word, or the following one at the start of the utterance.
    """
    before, after = gap - 1, gap
    has_before, has_after = before >= 0, after < len(wrong)
    if has_before and has_after and wrong[before] != wrong[after]:
        return before if wrong[before] else after
    return before if has_before else after


def _percent(numerator: int, denominator: int) -> float | None:
    return 100.0 * numerator / denominator if denominator else None
