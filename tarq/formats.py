"""Transcripts and the response formats of OpenAI's `audio.transcriptions` endpoint.

Torch-free on purpose: the API process renders a worker's transcript (sent as JSON through
`Transcript.to_dict()` / `Transcript.from_dict()`) without loading torch or transformers.

Shapes follow OpenAI's `whisper-1` responses so the official `openai` client parses them:
- json:         {"text": ...}
- text:         the text and a newline (text/plain)
- srt, vtt:     numbered / WEBVTT cues, one per segment, hours always written
- verbose_json: {"task", "language" (full name, e.g. "english"), "duration", "text",
                 "segments": [...] (when segment granularity is asked, the default),
                 "words": [...] (when word granularity is asked)}
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

FORMATS = ("json", "text", "srt", "vtt", "verbose_json")
GRANULARITIES = ("segment", "word")

# Whisper's language codes and the names OpenAI reports in verbose_json (same table as
# transformers' tokenization_whisper.LANGUAGES, copied so that this module stays dependency-free).
LANGUAGES = {
    "en": "english", "zh": "chinese", "de": "german", "es": "spanish", "ru": "russian", "ko": "korean",
    "fr": "french", "ja": "japanese", "pt": "portuguese", "tr": "turkish", "pl": "polish", "ca": "catalan",
    "nl": "dutch", "ar": "arabic", "sv": "swedish", "it": "italian", "id": "indonesian", "hi": "hindi",
    "fi": "finnish", "vi": "vietnamese", "he": "hebrew", "uk": "ukrainian", "el": "greek", "ms": "malay",
    "cs": "czech", "ro": "romanian", "da": "danish", "hu": "hungarian", "ta": "tamil", "no": "norwegian",
    "th": "thai", "ur": "urdu", "hr": "croatian", "bg": "bulgarian", "lt": "lithuanian", "la": "latin",
    "mi": "maori", "ml": "malayalam", "cy": "welsh", "sk": "slovak", "te": "telugu", "fa": "persian",
    "lv": "latvian", "bn": "bengali", "sr": "serbian", "az": "azerbaijani", "sl": "slovenian",
    "kn": "kannada", "et": "estonian", "mk": "macedonian", "br": "breton", "eu": "basque",
    "is": "icelandic", "hy": "armenian", "ne": "nepali", "mn": "mongolian", "bs": "bosnian",
    "kk": "kazakh", "sq": "albanian", "sw": "swahili", "gl": "galician", "mr": "marathi", "pa": "punjabi",
    "si": "sinhala", "km": "khmer", "sn": "shona", "yo": "yoruba", "so": "somali", "af": "afrikaans",
    "oc": "occitan", "ka": "georgian", "be": "belarusian", "tg": "tajik", "sd": "sindhi", "gu": "gujarati",
    "am": "amharic", "yi": "yiddish", "lo": "lao", "uz": "uzbek", "fo": "faroese", "ht": "haitian creole",
    "ps": "pashto", "tk": "turkmen", "nn": "nynorsk", "mt": "maltese", "sa": "sanskrit",
    "lb": "luxembourgish", "my": "myanmar", "bo": "tibetan", "tl": "tagalog", "mg": "malagasy",
    "as": "assamese", "tt": "tatar", "haw": "hawaiian", "ln": "lingala", "ha": "hausa", "ba": "bashkir",
    "jw": "javanese", "su": "sundanese", "yue": "cantonese",
}


@dataclass
class Word:
    word: str
    start: float
    end: float


@dataclass
class Segment:
    """One timestamped piece of a transcript. `text` keeps Whisper's leading space, as OpenAI's does;
    `seek` is the offset of the 30 s window it came from, in mel frames (100 per second)."""

    id: int
    start: float
    end: float
    text: str
    tokens: list[int] = field(default_factory=list)
    seek: int = 0
    temperature: float = 0.0
    avg_logprob: float = 0.0
    compression_ratio: float = 0.0
    no_speech_prob: float = 0.0


@dataclass
class Transcript:
    """`language` is Whisper's code ("en"); `duration` the audio length in seconds."""

    text: str
    language: str
    duration: float
    segments: list[Segment] = field(default_factory=list)
    words: list[Word] = field(default_factory=list)
    task: str = "transcribe"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Transcript":
        return cls(
            text=d["text"],
            language=d["language"],
            duration=float(d["duration"]),
            segments=[Segment(**s) for s in d.get("segments", [])],
            words=[Word(**w) for w in d.get("words", [])],
            task=d.get("task", "transcribe"),
        )


def language_name(code: str) -> str:
    """OpenAI reports the language by name ("english"); unknown values pass through unchanged."""
    return LANGUAGES.get(code, code)


def _timestamp(seconds: float, decimal: str) -> str:
    ms = max(0, round(seconds * 1000))
    hours, ms = divmod(ms, 3_600_000)
    minutes, ms = divmod(ms, 60_000)
    secs, ms = divmod(ms, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{decimal}{ms:03d}"


def srt_timestamp(seconds: float) -> str:
    """3723.5 -> '01:02:03,500'."""
    return _timestamp(seconds, ",")


def vtt_timestamp(seconds: float) -> str:
    """3723.5 -> '01:02:03.500'."""
    return _timestamp(seconds, ".")


def _cue_text(text: str) -> str:
    # An arrow inside a cue would end it early in both formats (openai/whisper does the same).
    return text.strip().replace("-->", "->")


def _cue_segments(transcript: Transcript) -> list[Segment]:
    # A transcript without timestamps still deserves one cue covering the whole clip.
    if transcript.segments:
        return transcript.segments
    if not transcript.text.strip():
        return []
    return [Segment(id=0, start=0.0, end=transcript.duration, text=transcript.text)]


def to_srt(transcript: Transcript) -> str:
    # Every cue ends with a blank line, as openai/whisper's SRT writer and OpenAI's API write it.
    return "".join(
        f"{i}\n{srt_timestamp(s.start)} --> {srt_timestamp(s.end)}\n{_cue_text(s.text)}\n\n"
        for i, s in enumerate(_cue_segments(transcript), start=1)
    )


def to_vtt(transcript: Transcript) -> str:
    cues = [
        f"{vtt_timestamp(s.start)} --> {vtt_timestamp(s.end)}\n{_cue_text(s.text)}\n\n"
        for s in _cue_segments(transcript)
    ]
    return "WEBVTT\n\n" + "".join(cues)


def to_verbose_json(transcript: Transcript, granularities: Iterable[str] = ("segment",)) -> dict[str, Any]:
    body: dict[str, Any] = {
        "task": transcript.task,
        "language": language_name(transcript.language),
        "duration": transcript.duration,
        "text": transcript.text,
    }
    if "segment" in granularities:
        body["segments"] = [
            {
                "id": s.id, "seek": s.seek, "start": s.start, "end": s.end, "text": s.text,
                "tokens": list(s.tokens), "temperature": s.temperature, "avg_logprob": s.avg_logprob,
                "compression_ratio": s.compression_ratio, "no_speech_prob": s.no_speech_prob,
            }
            for s in transcript.segments
        ]
    if "word" in granularities:
        body["words"] = [{"word": w.word, "start": w.start, "end": w.end} for w in transcript.words]
    return body


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise ValueError(f"response format {fmt!r} is not one of {', '.join(FORMATS)}")
    return fmt


def check_granularities(granularities: Iterable[str]) -> tuple[str, ...]:
    out = tuple(granularities)
    bad = [g for g in out if g not in GRANULARITIES]
    if bad:
        raise ValueError(f"timestamp granularity {bad[0]!r} is not one of {', '.join(GRANULARITIES)}")
    return out


def render(
    transcript: Transcript, fmt: str = "json", *, granularities: Iterable[str] = ("segment",)
) -> tuple[str | dict[str, Any], str]:
    """(body, media type) for an OpenAI `response_format`. Dict bodies are JSON; `granularities`
    (OpenAI's `timestamp_granularities[]`) only shapes verbose_json, as in OpenAI's API."""
    check_format(fmt)
    granularities = check_granularities(granularities)
    if fmt == "json":
        return {"text": transcript.text}, "application/json"
    if fmt == "verbose_json":
        return to_verbose_json(transcript, granularities), "application/json"
    if fmt == "text":
        return transcript.text + "\n", "text/plain; charset=utf-8"
    if fmt == "srt":
        return to_srt(transcript), "text/plain; charset=utf-8"
    return to_vtt(transcript), "text/vtt; charset=utf-8"
