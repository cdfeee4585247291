import json
import subprocess
import sys

import pytest

from tarq.formats import (
    FORMATS, Segment, Transcript, Word, render, srt_timestamp, vtt_timestamp,
)


def hand_made() -> Transcript:
    return Transcript(
        text="Hello there. It is --> late.",
        language="en",
        duration=3725.0,
        segments=[
            Segment(id=0, start=0.0, end=2.5, text=" Hello there.", tokens=[50364, 15947, 612, 13, 50489],
                    avg_logprob=-0.25, compression_ratio=0.8, no_speech_prob=0.01),
            Segment(id=1, seek=372000, start=3723.5, end=3724.999, text=" It is --> late.",
                    tokens=[50364, 632]),
        ],
        words=[Word("Hello", 0.0, 0.5), Word("there.", 0.5, 2.5)],
    )


def test_timestamps():
    assert srt_timestamp(0) == "00:00:00,000"
    assert srt_timestamp(3723.5) == "01:02:03,500"
    assert vtt_timestamp(3723.5) == "01:02:03.500"
    assert srt_timestamp(59.9996) == "00:01:00,000"  # rounds into the next minute, never ",1000"
    assert vtt_timestamp(-0.01) == "00:00:00.000"


def test_srt_exact():
    body, media = render(hand_made(), "srt")
    assert body == (
        "1\n00:00:00,000 --> 00:00:02,500\nHello there.\n\n"
        "2\n01:02:03,500 --> 01:02:04,999\nIt is -> late.\n\n"
    )
    assert media.startswith("text/plain")


def test_vtt_exact():
    body, media = render(hand_made(), "vtt")
    assert body == (
        "WEBVTT\n\n"
        "00:00:00.000 --> 00:00:02.500\nHello there.\n\n"
        "01:02:03.500 --> 01:02:04.999\nIt is -> late.\n\n"
    )
    assert media.startswith("text/vtt")


def test_text_and_json():
    assert render(hand_made(), "text") == ("Hello there. It is --> late.\n", "text/plain; charset=utf-8")
    assert render(hand_made(), "json") == ({"text": "Hello there. It is --> late."}, "application/json")


def test_verbose_json_matches_openai_shape():
    from openai.types.audio import TranscriptionVerbose

    body, media = render(hand_made(), "verbose_json")
    assert media == "application/json"
    assert list(body) == ["task", "language", "duration", "text", "segments"]
    assert body["language"] == "english" and body["task"] == "transcribe"
    assert list(body["segments"][0]) == ["id", "seek", "start", "end", "text", "tokens", "temperature",
                                         "avg_logprob", "compression_ratio", "no_speech_prob"]
    parsed = TranscriptionVerbose.model_validate(json.loads(json.dumps(body)))
    assert parsed.segments[1].seek == 372000 and parsed.words is None

    both, _ = render(hand_made(), "verbose_json", granularities=["word", "segment"])
    assert both["words"] == [
        {"word": "Hello", "start": 0.0, "end": 0.5}, {"word": "there.", "start": 0.5, "end": 2.5},
    ]
    words_only, _ = render(hand_made(), "verbose_json", granularities=["word"])
    assert "segments" not in words_only and len(words_only["words"]) == 2
    assert TranscriptionVerbose.model_validate(words_only).words[1].word == "there."


def test_no_segments_still_gives_one_cue():
    t = Transcript(text="Hi.", language="en", duration=1.25)
    assert render(t, "srt")[0] == "1\n00:00:00,000 --> 00:00:01,250\nHi.\n\n"
    assert render(Transcript(text="", language="en", duration=1.0), "vtt")[0] == "WEBVTT\n\n"


def test_unknown_language_passes_through():
    t = Transcript(text="x", language="xx", duration=1.0)
    assert render(t, "verbose_json")[0]["language"] == "xx"


def test_bad_format_and_granularity():
    with pytest.raises(ValueError, match="json, text, srt, vtt, verbose_json") as err:
        render(hand_made(), "docx")
    assert "'docx'" in str(err.value)
    with pytest.raises(ValueError, match="segment, word"):
        render(hand_made(), "verbose_json", granularities=["sentence"])
    assert FORMATS == ("json", "text", "srt", "vtt", "verbose_json")


def test_dict_round_trip_through_json():
    t = hand_made()
    again = Transcript.from_dict(json.loads(json.dumps(t.to_dict())))
    assert again == t
    for fmt in FORMATS:
        assert render(again, fmt) == render(t, fmt)


def test_torch_free():
    code = "import sys, tarq.formats; bad = {'torch', 'transformers'} & set(sys.modules); assert not bad, bad"
    subprocess.run([sys.executable, "-c", code], check=True)
