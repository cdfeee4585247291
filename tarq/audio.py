"""Audio in: decode any common container/codec to the 16 kHz mono float32 waveform Whisper expects.

PyAV (FFmpeg) does the decoding, so the same code reads calibration FLAC, service uploads (mp3, m4a,
browser webm/opus) and video files with an audio track. No torch here: the service imports this module.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
from av.audio.stream import AudioStream
from av.container import InputContainer

from tarq.errors import AudioError, CalibrationError

SAMPLE_RATE = 16000

# Lowercase suffixes with the leading dot, as Path.suffix gives them. Video containers are included
# because their audio track is decoded like any other.
AUDIO_EXTENSIONS = frozenset(
    {
        ".wav", ".flac", ".mp3", ".ogg", ".oga", ".opus", ".m4a", ".mp4", ".webm", ".aac", ".wma",
        ".aif", ".aiff", ".mka", ".mkv", ".mov", ".amr", ".3gp", ".caf", ".spx", ".ac3",
    }
)  # fmt: skip

# FFmpeg estimates the duration of these formats from the bit rate of the first frames, so a file that
# decodes shorter than declared is not necessarily truncated (VBR mp3 without a Xing header).
_ESTIMATED_DURATION_FORMATS = frozenset({"mp3", "aac", "ac3", "eac3", "mpegts", "mpeg", "amr"})

# A file counts as truncated when it decodes to less than this share of its declared duration (minus a
# little slack for encoder padding and container rounding).
_TRUNCATED_SHARE = 0.9
_TRUNCATED_SLACK_S = 0.25

# Declared durations include encoder padding; only refuse before decoding when clearly over the limit.
_MAX_SECONDS_SLACK_S = 1.0


@dataclass(frozen=True)
class AudioInfo:
    """What a file holds before decoding: duration in seconds, the native rate and channel count."""

    duration: float
    sample_rate: int
    channels: int
    codec: str


def load_audio(
    source: str | Path | bytes, name: str | None = None, max_seconds: float | None = None
) -> np.ndarray:
    """Decode `source` (a path or the file's bytes) to float32 mono at SAMPLE_RATE.

    FFmpeg's resampler brings every channel to 16 kHz, then channels are averaged (what Whisper's own
    `ffmpeg -ac 1` to 16-bit output amounts to). `name` is used in error messages (defaults to the path).
    Raises AudioError for empty, unreadable, truncated, sample-less or too long audio.
    """
    label = _label(source, name)
    with _open(source, label) as container:
        stream = _audio_stream(container, label)
        declared = _declared_duration(container, stream)
        if max_seconds is not None and declared is not None and declared > max_seconds + _MAX_SECONDS_SLACK_S:
            raise AudioError(f"{label}: audio is {declared:.1f} s long, the limit is {max_seconds:g} s")
        chunks = _decode_resampled(container, stream, label, max_seconds)
        fmt = container.format.name
    audio = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float32)
    if audio.size == 0:
        raise AudioError(f"{label}: no audio samples could be decoded")
    _check_not_truncated(audio.size / SAMPLE_RATE, declared, fmt, label)
    return audio


def probe_audio(source: str | Path | bytes, name: str | None = None) -> AudioInfo:
    """Describe the first audio stream from container metadata; decode only when the duration is unknown
    (e.g. browser-recorded webm), so it is cheap for the usual files."""
    label = _label(source, name)
    with _open(source, label) as container:
        stream = _audio_stream(container, label)
        ctx = stream.codec_context
        duration = _declared_duration(container, stream)
        if duration is None or duration <= 0:
            duration = _count_seconds(container, stream, label)
        if duration <= 0:
            raise AudioError(f"{label}: no audio samples could be decoded")
        return AudioInfo(
            duration=float(duration),
            sample_rate=int(ctx.sample_rate),
            channels=int(ctx.channels),
            codec=ctx.codec.canonical_name,
        )


def list_audio(directory: str | Path) -> list[Path]:
    """Audio files directly inside `directory` (not recursive, hidden files skipped), sorted by name so
    calibration order and sample selection are reproducible."""
    folder = Path(directory)
    if not folder.is_dir():
        raise AudioError(f"{folder}: not a folder of audio files")
    return sorted(
        p for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in AUDIO_EXTENSIONS
    )  # fmt: skip


# First-column names that mark a header line rather than a clip.
_HEADER_NAMES = frozenset({"file", "filename", "file_name", "path", "audio", "name", "id", "clip"})


def read_transcripts(path: str | Path) -> dict[str, str]:
    """Read `file<TAB>text` lines (the layout of the speech folders' transcripts.tsv) into {file: text}.

    Blank lines and `#` comments are skipped, a header line (`file<TAB>text` and similar) is tolerated.
    The text keeps its original spelling; normalization is the scorer's job. A line without a tab, an
    empty file name or a file listed twice raises CalibrationError naming the file and line.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except FileNotFoundError:
        raise CalibrationError(f"{path}: transcripts file not found") from None
    except UnicodeDecodeError as e:
        raise CalibrationError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise CalibrationError(f"{path}: cannot read transcripts file ({e.strerror})") from None
    transcripts: dict[str, str] = {}
    first = True
    for number, line in enumerate(lines, start=1):
        if not line.strip() or line.startswith("#"):
            continue
        if "\t" not in line:
            raise CalibrationError(f"{path}:{number}: expected 'file<TAB>text', found no tab")
        file, text = (part.strip() for part in line.split("\t", 1))
        is_header = first and file.lower() in _HEADER_NAMES
        first = False
        if is_header:
            continue
        if not file:
            raise CalibrationError(f"{path}:{number}: empty file name")
        if file in transcripts:
            raise CalibrationError(f"{path}:{number}: {file} is listed twice")
        transcripts[file] = text
    return transcripts


def _label(source: str | Path | bytes, name: str | None) -> str:
    if name:
        return name
    if isinstance(source, (bytes, bytearray, memoryview)):
        return "uploaded audio"
    return str(source)


def _open(source: str | Path | bytes, label: str) -> InputContainer:
    """Open the container, turning every way a file can fail to open into one AudioError line."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise AudioError(f"{label}: empty file")
        target: object = io.BytesIO(bytes(source))
    else:
        path = Path(source)
        if not path.is_file():
            raise AudioError(f"{label}: no such file")
        if path.stat().st_size == 0:
            raise AudioError(f"{label}: empty file")
        target = str(path)
    try:
        return av.open(target, mode="r")
    except (av.error.FFmpegError, UnicodeDecodeError) as e:
        raise AudioError(f"{label}: not a readable audio file ({_reason(e)})") from None


def _audio_stream(container: InputContainer, label: str) -> AudioStream:
    if not container.streams.audio:
        raise AudioError(f"{label}: no audio stream in the file")
    return container.streams.audio[0]


def _declared_duration(container: InputContainer, stream: AudioStream) -> float | None:
    """Duration from metadata, or None when the container does not say. The container's own duration is
    only used when the audio is its one stream: with video it may be the video's length."""
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None and len(container.streams) == 1:
        return container.duration / av.time_base
    return None


def _decode_resampled(
    container: InputContainer,
    stream: AudioStream,
    label: str,
    max_seconds: float | None,
) -> list[np.ndarray]:
    """Decode and resample frame by frame (memory stays one copy of the 16 kHz signal), stopping as soon
    as the limit is passed so a long upload costs little."""
    limit = None if max_seconds is None else math.floor(max_seconds * SAMPLE_RATE)
    resampler: av.AudioResampler | None = None
    chunks: list[np.ndarray] = []
    total = 0
    try:
        for frame in container.decode(stream):
            if resampler is None:
                # Keep the source layout: channels are averaged in numpy, FFmpeg's own downmix to mono
                # would scale a float stereo signal by sqrt(2).
                resampler = av.AudioResampler(format="fltp", layout=frame.layout, rate=SAMPLE_RATE)
            for out in resampler.resample(frame):
                total += _append_mono(chunks, out)
            if limit is not None and total > limit:
                raise AudioError(f"{label}: audio is longer than the limit of {max_seconds:g} s")
        if resampler is not None:
            for out in resampler.resample(None):
                total += _append_mono(chunks, out)
    except (av.error.FFmpegError, ValueError) as e:
        raise AudioError(f"{label}: corrupt or truncated audio ({_reason(e)})") from None
    if limit is not None and total > limit:
        raise AudioError(f"{label}: audio is longer than the limit of {max_seconds:g} s")
    return chunks


def _append_mono(chunks: list[np.ndarray], frame: av.AudioFrame) -> int:
    planes = frame.to_ndarray()  # fltp: [channels, samples]
    mono = planes.mean(axis=0, dtype=np.float32) if planes.shape[0] > 1 else planes[0]
    chunks.append(np.ascontiguousarray(mono, dtype=np.float32))
    return mono.shape[0]


def _count_seconds(container: InputContainer, stream: AudioStream, label: str) -> float:
    samples = 0
    try:
        for frame in container.decode(stream):
            samples += frame.samples
    except av.error.FFmpegError as e:
        raise AudioError(f"{label}: corrupt or truncated audio ({_reason(e)})") from None
    rate = stream.codec_context.sample_rate or 0
    return samples / rate if rate else 0.0


def _check_not_truncated(decoded: float, declared: float | None, fmt: str, label: str) -> None:
    """Some containers (mkv/webm, mp4, flac) state their length up front; decoding far less than that
    means the end of the file is missing, which FFmpeg itself often passes over silently."""
    if declared is None or any(name in _ESTIMATED_DURATION_FORMATS for name in fmt.split(",")):
        return
    if decoded < _TRUNCATED_SHARE * declared - _TRUNCATED_SLACK_S:
        raise AudioError(
            f"{label}: truncated audio (decoded {decoded:.2f} s of the declared {declared:.2f} s)"
        )


def _reason(error: Exception) -> str:
    """FFmpeg errors carry a strerror like 'Invalid data found when processing input'; keep just that."""
    text = getattr(error, "strerror", None) or str(error)
    return " ".join(str(text).split())
