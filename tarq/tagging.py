"""Step 1 of TARQ: tag words, decoder tokens and encoder frames as common or tail (rare).

No entity labels: a word is rare when its wordfreq Zipf frequency (log10 occurrences per billion English
words) is below the threshold, 3 by default (under one per million words).

Numerals: wordfreq folds digit strings to a shape-based estimate, so "2" or "15th" look common although
the exact number is what an ASR system gets wrong. With `digits_are_tail=True` (default) any word that
contains a digit is tail; with False the word is looked up in wordfreq as it is (its own estimate for
numbers, e.g. "1455" -> 2.1, "15th" -> 3.9). Transcripts that spell numbers out ("fifteenth") are looked
up like any other word either way.
"""

from __future__ import annotations

import math
import re
from functools import lru_cache

from wordfreq import zipf_frequency

# Outer punctuation and symbols carry no frequency information ("Leonardo," is "leonardo").
_EDGES = re.compile(r"^[\W_]+|[\W_]+$")


def is_rare(word: str, threshold: float = 3.0, digits_are_tail: bool = True) -> bool:
    """True when `word` is in the lexical tail. Punctuation-only or empty words are common: they are not
    words a listener could miss."""
    return _is_rare(word.lower(), float(threshold), bool(digits_are_tail))


@lru_cache(maxsize=200_000)
def _is_rare(word: str, threshold: float, digits_are_tail: bool) -> bool:
    word = _EDGES.sub("", word)
    if not word:
        return False
    if digits_are_tail and any(ch.isdigit() for ch in word):
        return True
    return zipf_frequency(word, "en") < threshold


def token_tail_mask(
    tokenizer, token_ids, threshold: float = 3.0, digits_are_tail: bool = True
) -> list[bool]:
    """One tag per token: each byte-level BPE piece takes the tag of the word it belongs to.

    Special tokens (task, language, no-timestamps, timestamps, end of text) and pieces that hold only
    punctuation or spaces are common and end the current word. A piece that starts with a space starts a
    new word; any other text piece continues the open word ("ĠLeon" + "ardo" is one word "Leonardo").
    `tokenizer` is a Hugging Face Whisper tokenizer (or a processor holding one); `token_ids` any
    sequence of ints (a list or a 1-D tensor).
    """
    if not hasattr(tokenizer, "convert_ids_to_tokens"):
        tokenizer = tokenizer.tokenizer  # a processor
    ids = [int(i) for i in token_ids]
    special = _special_test(tokenizer)
    tags = [False] * len(ids)
    word: list[int] = []  # positions of the open word's pieces
    word_bytes = bytearray()

    def close() -> None:
        if word:
            rare = is_rare(word_bytes.decode("utf-8", errors="replace"), threshold, digits_are_tail)
            for pos in word:
                tags[pos] = rare
            word.clear()
            word_bytes.clear()

    for pos, tid in enumerate(ids):
        if special(tid):
            close()
            continue
        raw = _piece_bytes(tokenizer.convert_ids_to_tokens(tid))
        text = raw.decode("utf-8", errors="replace")
        if not _has_word_chars(text):
            close()
            continue
        if text[:1].isspace():
            close()
        word.append(pos)
        word_bytes.extend(raw)
    close()
    return tags


def special_mask(tokenizer, token_ids) -> list[bool]:
    """One flag per token: a special token (start of transcript, language, task, no-timestamps,
    timestamps, end of text), which token_tail_mask always calls common."""
    if not hasattr(tokenizer, "convert_ids_to_tokens"):
        tokenizer = tokenizer.tokenizer
    special = _special_test(tokenizer)
    return [special(int(t)) for t in token_ids]


def frame_tail_mask(
    word_spans: list[tuple[str, float, float]],
    num_frames: int,
    seconds_per_frame: float = 0.02,
    threshold: float = 3.0,
    digits_are_tail: bool = True,
) -> list[bool]:
    """Tag encoder frames that overlap a rare word's [start, end] (seconds, e.g. from Whisper's word
    timestamps); Whisper's encoder has one frame per 20 ms. Frame i covers [i, i+1) * seconds_per_frame;
    a frame that only touches a word's boundary is not tagged, a zero-length word tags its one frame."""
    mask = [False] * num_frames
    eps = 1e-6  # word times are rounded to 10 ms; keep 0.10 / 0.02 = 5.000000001 on frame 5's boundary
    for word, start, end in word_spans:
        if not is_rare(word, threshold, digits_are_tail):
            continue
        first = max(0, math.floor(start / seconds_per_frame + eps))
        last = min(num_frames - 1, max(first, math.ceil(end / seconds_per_frame - eps) - 1))
        for i in range(first, last + 1):
            mask[i] = True
    return mask


def _has_word_chars(text: str) -> bool:
    # U+FFFD is half of a multi-byte character split across pieces: part of a word, not punctuation.
    return any(ch.isalnum() or ch == "\ufffd" for ch in text)


def _special_test(tokenizer):
    """Whisper puts every special and timestamp token after the text vocabulary, from <|endoftext|> (the
    lowest special id) on; the explicit sets also cover tokenizers laid out differently."""
    explicit = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}))
    first = min(tokenizer.all_special_ids, default=None)
    size = len(tokenizer)
    return lambda tid: tid in explicit or (first is not None and tid >= first) or not 0 <= tid < size


def _piece_bytes(piece: str | None) -> bytes:
    """Undo byte-level BPE's byte-to-character mapping ('Ġ' is the space byte)."""
    if piece is None:
        return b""
    decoder = _byte_decoder()
    if all(ch in decoder for ch in piece):
        return bytes(decoder[ch] for ch in piece)
    return piece.replace("\u2581", " ").encode("utf-8")  # not byte-level (sentencepiece): '▁' is a space


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's bytes_to_unicode table, inverted: printable bytes map to themselves, the rest to U+0100+."""
    ranges = [(ord("!"), ord("~")), (ord("¡"), ord("¬")), (ord("®"), ord("ÿ"))]
    printable = [b for lo, hi in ranges for b in range(lo, hi + 1)]
    chars = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return {c: b for b, c in chars.items()}
