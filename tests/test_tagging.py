"""tarq.tagging: word, token and frame tags with the real Whisper tiny.en tokenizer (tests/fixtures).

Zipf frequencies (wordfreq, English) relied on: the 7.73, press 5.16, printed 4.4, servant 4.2,
semi 3.5, 15th 3.89, 2 6.0 (digit strings are estimated by shape); caxton 2.45, prehensile 2.11,
1455 2.11."""

import pytest

from tarq.tagging import frame_tail_mask, is_rare, special_mask, token_tail_mask


@pytest.mark.parametrize(
    "word,rare",
    [("the", False), ("THE", False), ("Caxton", True), ("Caxton,", True), ('"caxton."', True),
     ("servant", False), ("prehensile", True), ("", False), ("...", False), ("—", False),
     ("1455", True), ("2", True), ("15th", True), ("$5", True), ("zzqxv", True)],
)  # fmt: skip
def test_is_rare(word, rare):
    assert is_rare(word) is rare


def test_digits_are_looked_up_when_not_tail():
    assert not is_rare("2", digits_are_tail=False)
    assert not is_rare("15th", digits_are_tail=False)
    assert is_rare("1455", digits_are_tail=False)  # wordfreq's own estimate is below 3


def test_threshold():
    assert not is_rare("press")
    assert is_rare("press", threshold=5.5)
    assert not is_rare("caxton", threshold=2.0)


@pytest.fixture(scope="module")
def processor(processor_dir):
    from transformers import WhisperProcessor

    return WhisperProcessor.from_pretrained(processor_dir)


@pytest.fixture(scope="module")
def tok(processor):
    return processor.tokenizer


def encode(tok, text: str) -> list[int]:
    """Whisper's decoder input: start, no-timestamps, the text, end of text."""
    prefix = tok.convert_tokens_to_ids(["<|startoftranscript|>", "<|notimestamps|>"])
    return prefix + tok(text, add_special_tokens=False).input_ids + [tok.eos_token_id]


def tagged(tok, ids, **kw) -> list[tuple[str, bool]]:
    return list(zip((tok.decode([i]) for i in ids), token_tail_mask(tok, ids, **kw)))


def test_pieces_take_their_words_tag(tok):
    ids = encode(tok, " The Servant met Caxton's men in 1455, semi-prehensile.")
    assert tagged(tok, ids) == [
        ("<|startoftranscript|>", False), ("<|notimestamps|>", False),
        (" The", False), (" Serv", False), ("ant", False),  # "Servant" is common: both pieces
        (" met", False), (" Ca", True), ("xton", True), ("'s", True),  # "Caxton's": every piece
        (" men", False), (" in", False), (" 14", True), ("55", True), (",", False),
        (" semi", False), ("-", False), ("pre", True), ("hens", True), ("ile", True),  # "-" splits words
        (".", False), ("<|endoftext|>", False),
    ]  # fmt: skip


def test_digits_switch_on_tokens(tok):
    ids = encode(tok, " chapter 2")
    assert token_tail_mask(tok, ids) == [False, False, False, True, False]
    assert token_tail_mask(tok, ids, digits_are_tail=False) == [False] * 5


def test_first_word_without_space_and_threshold(tok):
    ids = tok("Caxton printed", add_special_tokens=False).input_ids  # no special prefix, no leading space
    assert [tok.decode([i]) for i in ids] == ["Ca", "xton", " printed"]
    assert token_tail_mask(tok, ids) == [True, True, False]
    assert token_tail_mask(tok, ids, threshold=4.5) == [True, True, True]


def test_timestamps_and_other_specials_are_common(tok, processor):
    stamps = tok.convert_tokens_to_ids(["<|0.00|>", "<|1.50|>"])
    caxton = tok(" Caxton", add_special_tokens=False).input_ids
    ids = [tok.convert_tokens_to_ids("<|startoftranscript|>"), stamps[0], *caxton, stamps[1]]
    assert token_tail_mask(tok, ids) == [False, False, True, True, False]
    assert token_tail_mask(processor, ids) == token_tail_mask(tok, ids)  # a processor works too
    assert token_tail_mask(tok, [len(tok) + 5, -1]) == [False, False]  # ids outside the tokenizer
    assert token_tail_mask(tok, []) == []
    assert special_mask(tok, ids) == [True, True, False, False, True]
    assert special_mask(processor, ids) == special_mask(tok, ids) and special_mask(tok, []) == []


def test_tensor_ids_and_multibyte_characters(tok):
    import torch

    ids = encode(tok, " café 東京 the")
    tags = token_tail_mask(tok, torch.tensor(ids))
    assert tags == token_tail_mask(tok, ids)
    words = tok.convert_ids_to_tokens(ids)
    # "東京" is split into byte pieces that decode to U+FFFD alone; they still form one (rare) word.
    cjk = [t for w, t in zip(words, tags) if w not in ("Ġcaf\u00c3\u00a9", "Ġthe") and not w.startswith("<|")]
    assert cjk and all(cjk)
    assert tags[-2] is False  # " the"


def test_real_transcript(tok, speech_dir):
    # LJ001-0003; its one word under Zipf 3 is "woodcutters" (1.72; "Netherlands" is common).
    text = (speech_dir / "transcripts.tsv").read_text().splitlines()[2].split("\t", 1)[1]
    assert "the woodcutters of the Netherlands" in text
    ids = encode(tok, " " + text)
    tags = token_tail_mask(tok, ids)
    assert len(tags) == len(ids)
    assert tok.decode([i for i, t in zip(ids, tags) if t]) == " woodcutters"


SPANS = [("the", 0.0, 0.1), ("Caxton,", 0.1, 0.5), ("printed", 0.5, 0.8)]


def test_frame_tail_mask_marks_overlapping_frames():
    mask = frame_tail_mask(SPANS, 50)
    assert len(mask) == 50
    # 20 ms frames: [0.10, 0.50) is frames 5..24; frames 4 and 25 only touch the word's boundaries.
    assert [i for i, m in enumerate(mask) if m] == list(range(5, 25))
    assert frame_tail_mask(SPANS, 50, seconds_per_frame=0.1) == [False, True, True, True, True] + [False] * 45


def tagged_frames(spans, num_frames=50) -> list[int]:
    return [i for i, m in enumerate(frame_tail_mask(spans, num_frames)) if m]


def test_frame_tail_mask_edges():
    assert tagged_frames([("Caxton", 0.333, 0.333)]) == [16]  # zero length: its one frame
    assert tagged_frames([("Caxton", 0.95, 2.0)]) == [47, 48, 49]  # clamped to the frames there are
    assert tagged_frames([("Caxton", 5.0, 6.0)]) == []  # past the end
    assert tagged_frames([("1455", -0.1, 0.03)]) == [0, 1]
    assert frame_tail_mask([("1455", 0.0, 0.03)], 10, digits_are_tail=False, threshold=2.0) == [False] * 10
    assert frame_tail_mask([], 3) == [False] * 3


def test_no_torch_import():
    import subprocess
    import sys

    code = "import sys, tarq.tagging; assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
