"""tarq.audio on real FLAC speech and on files encoded here with PyAV in the formats users upload."""

import io
import subprocess
import sys
import wave
from pathlib import Path

import av
import numpy as np
import pytest

from tarq.audio import (
    AUDIO_EXTENSIONS,
    SAMPLE_RATE,
    AudioInfo,
    list_audio,
    load_audio,
    probe_audio,
    read_transcripts,
)
from tarq.errors import AudioError, CalibrationError



@pytest.fixture
def cv_clip(speech_dir) -> Path:
    """A real Common Voice clip: 99456 samples, 16 kHz mono FLAC."""
    return speech_dir.parent / "commonvoice-en-100" / "common_voice_en_17250887.flac"


def sine(rate: int, seconds: float = 2.0, freq: float = 440.0, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


class Pipe(io.RawIOBase):
    """A write-only, unseekable output: muxers cannot go back to write the duration, as when a browser
    streams a MediaRecorder webm."""

    def __init__(self):
        self.data = bytearray()

    def writable(self):
        return True

    def write(self, b):
        self.data.extend(b)
        return len(b)


def encode(planes: np.ndarray, rate: int, container: str, codec: str, streamed: bool = False) -> bytes:
    """Encode float planes [channels, samples] with PyAV; the resampler converts to the codec's format."""
    layout = "mono" if planes.shape[0] == 1 else "stereo"
    buf = Pipe() if streamed else io.BytesIO()
    with av.open(buf, "w", format=container) as out:
        stream = out.add_stream(codec, rate=rate)
        stream.layout = layout
        planes = np.ascontiguousarray(planes, dtype=np.float32)
        frame = av.AudioFrame.from_ndarray(planes, format="fltp", layout=layout)
        frame.sample_rate = rate
        to_codec = av.AudioResampler(format=stream.codec_context.format.name, layout=layout, rate=rate)
        for chunk in [*to_codec.resample(frame), *to_codec.resample(None)]:
            out.mux(stream.encode(chunk))
        out.mux(stream.encode(None))
    return bytes(buf.data) if streamed else buf.getvalue()


def peak_frequency(audio: np.ndarray) -> float:
    middle = audio[len(audio) // 4 : 3 * len(audio) // 4]  # away from codec priming and padding
    spectrum = np.abs(np.fft.rfft(middle * np.hanning(len(middle))))
    return float(np.argmax(spectrum) * SAMPLE_RATE / len(middle))


# (container, codec, suffix, source rate, channels, how far the length may drift in seconds: lossy
# codecs add priming/padding samples)
FORMATS = [
    ("wav", "pcm_s16le", ".wav", 8000, 2, 0.001),
    ("wav", "pcm_s16le", ".wav", 44100, 1, 0.001),
    ("mp3", "libmp3lame", ".mp3", 44100, 2, 0.06),
    ("ogg", "libopus", ".ogg", 48000, 2, 0.03),
    ("ipod", "aac", ".m4a", 11025, 2, 0.2),
    ("webm", "libopus", ".webm", 48000, 1, 0.03),
    ("flac", "flac", ".flac", 22050, 2, 0.001),
]


@pytest.mark.parametrize(
    "container,codec,suffix,rate,channels,drift", FORMATS, ids=[f"{f[2]}-{f[3]}" for f in FORMATS]
)
def test_formats_are_resampled_to_16k_mono_keeping_the_tone(
    tmp_path, container, codec, suffix, rate, channels, drift
):
    data = encode(np.tile(sine(rate), (channels, 1)), rate, container, codec)
    path = tmp_path / f"tone{suffix}"
    path.write_bytes(data)

    audio = load_audio(path)

    assert audio.dtype == np.float32 and audio.ndim == 1
    assert abs(len(audio) / SAMPLE_RATE - 2.0) <= drift
    assert peak_frequency(audio) == pytest.approx(440.0, abs=2.0)
    # Identical channels are averaged, so the amplitude stays 0.5 (FFmpeg's own float downmix gives 0.71).
    assert np.percentile(np.abs(audio), 99.9) == pytest.approx(0.5, abs=0.05)
    info = probe_audio(path)
    assert (info.sample_rate, info.channels) == (rate, channels)
    assert info.duration == pytest.approx(2.0, abs=0.1)


def test_bytes_and_path_decode_identically(tmp_path):
    data = encode(sine(44100)[None], 44100, "mp3", "libmp3lame")
    path = tmp_path / "tone.mp3"
    path.write_bytes(data)
    np.testing.assert_array_equal(load_audio(data, name="tone.mp3"), load_audio(path))
    assert probe_audio(data).codec == "mp3"


def test_stereo_is_averaged_not_summed():
    left = sine(16000)
    data = encode(np.stack([left, -left]), 16000, "wav", "pcm_s16le")  # opposite phases cancel
    assert np.abs(load_audio(data)).max() < 1e-3
    data = encode(np.stack([left, np.zeros_like(left)]), 16000, "wav", "pcm_s16le")
    np.testing.assert_allclose(load_audio(data), left / 2, atol=1e-4)


def test_16k_mono_wav_is_passed_through_unchanged():
    x = sine(16000, freq=1000.0)
    audio = load_audio(encode(x[None], 16000, "wav", "pcm_s16le"))
    np.testing.assert_allclose(audio, x, atol=1 / 32768 + 1e-6)


def test_real_flac_speech(cv_clip):
    audio = load_audio(cv_clip)
    assert audio.shape == (99456,) and audio.dtype == np.float32
    assert 0.01 < np.abs(audio).max() <= 1.0
    np.testing.assert_array_equal(load_audio(cv_clip.read_bytes()), audio)
    assert probe_audio(cv_clip) == AudioInfo(duration=6.216, sample_rate=16000, channels=1, codec="flac")


def test_max_seconds(tmp_path):
    path = tmp_path / "long.wav"
    path.write_bytes(encode(sine(8000, seconds=3.0)[None], 8000, "wav", "pcm_s16le"))
    assert len(load_audio(path, max_seconds=3.0)) == 3 * SAMPLE_RATE
    # Declared 3 s against a 1 s limit: refused from metadata, before decoding.
    with pytest.raises(AudioError, match=r"long\.wav: audio is 3\.0 s long, the limit is 1 s"):
        load_audio(path, max_seconds=1)
    # Within the metadata slack: caught while decoding.
    with pytest.raises(AudioError, match=r"long\.wav: audio is longer than the limit of 2\.5 s"):
        load_audio(path, max_seconds=2.5)


def test_streamed_webm_without_a_declared_duration():
    data = encode(sine(48000)[None], 48000, "webm", "libopus", streamed=True)
    assert av.open(io.BytesIO(data)).duration is None
    assert probe_audio(data).duration == pytest.approx(2.0, abs=0.03)  # found by decoding
    assert len(load_audio(data)) == 2 * SAMPLE_RATE
    with pytest.raises(AudioError, match=r"^rec\.webm: audio is longer than the limit of 1\.5 s$"):
        load_audio(data, name="rec.webm", max_seconds=1.5)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.wav"
    path.write_bytes(b"")
    with pytest.raises(AudioError, match=r"empty\.wav: empty file"):
        load_audio(path)
    with pytest.raises(AudioError, match=r"^upload\.mp3: empty file$"):
        load_audio(b"", name="upload.mp3")
    with pytest.raises(AudioError, match="empty file"):
        probe_audio(path)


def test_missing_file(tmp_path):
    with pytest.raises(AudioError, match=r"nope\.flac: no such file"):
        load_audio(tmp_path / "nope.flac")


@pytest.mark.parametrize(
    "data",
    [np.random.default_rng(0).bytes(5000), b"hello, this is not audio\n" * 50, b"RIFF" + bytes(300)],
    ids=["random", "text", "fake-riff"],
)
def test_not_audio(tmp_path, data):
    path = tmp_path / "junk.wav"
    path.write_bytes(data)
    with pytest.raises(AudioError, match=r"^.*junk\.wav: not a readable audio file \(.+\)$"):
        load_audio(path)
    with pytest.raises(AudioError, match=r"^clip\.ogg: not a readable audio file"):
        probe_audio(data, name="clip.ogg")


def test_no_audio_stream():
    subtitles = b"1\n00:00:00,000 --> 00:00:01,000\nhello\n\n2\n00:00:01,000 --> 00:00:02,000\nworld\n\n"
    with pytest.raises(AudioError, match=r"^talk\.srt: no audio stream in the file$"):
        load_audio(subtitles, name="talk.srt")


def test_zero_samples():
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:  # a valid header with an empty data chunk
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
    with pytest.raises(AudioError, match=r"^silence\.wav: no audio samples could be decoded$"):
        load_audio(buf.getvalue(), name="silence.wav")
    with pytest.raises(AudioError, match="no audio samples"):
        probe_audio(buf.getvalue(), name="silence.wav")


def test_truncated_flac(cv_clip):
    data = cv_clip.read_bytes()
    with pytest.raises(AudioError, match=r"^cut\.flac: corrupt or truncated audio \(.+\)$"):
        load_audio(data[: len(data) // 2], name="cut.flac")


def test_truncated_webm_is_caught_by_its_declared_duration():
    data = encode(sine(48000)[None], 48000, "webm", "libopus")
    expected = r"^cut\.webm: truncated audio \(decoded .* of the declared 2\.01 s\)$"
    with pytest.raises(AudioError, match=expected):
        load_audio(data[: len(data) // 2], name="cut.webm")


def test_truncated_m4a():
    data = encode(np.tile(sine(11025), (2, 1)), 11025, "ipod", "aac")
    with pytest.raises(AudioError, match=r"^cut\.m4a: "):
        load_audio(data[: len(data) // 2], name="cut.m4a")


def test_list_audio(tmp_path):
    for name in ["b.wav", "A.FLAC", "c.mp3", "notes.txt", ".hidden.wav", "transcripts.tsv", "d.webm"]:
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub.wav").mkdir()
    assert [p.name for p in list_audio(tmp_path)] == ["A.FLAC", "b.wav", "c.mp3", "d.webm"]
    assert list_audio(tmp_path / "sub.wav") == []
    with pytest.raises(AudioError, match="not a folder"):
        list_audio(tmp_path / "b.wav")
    assert {".wav", ".flac", ".mp3", ".ogg", ".opus", ".m4a", ".webm", ".mp4", ".aac"} <= AUDIO_EXTENSIONS


def test_read_real_transcripts(speech_dir):
    lj = read_transcripts(speech_dir / "transcripts.tsv")
    assert len(lj) == 385
    assert lj["LJ001-0002.flac"] == "in being comparatively modern."
    assert set(lj) == {p.name for p in list_audio(speech_dir)}
    cv = read_transcripts(speech_dir.parent / "commonvoice-en-100" / "transcripts.tsv")
    assert len(cv) == 100 and cv["common_voice_en_22060973.flac"] == "one"


def test_read_transcripts_header_blank_lines_and_tabs(tmp_path):
    path = tmp_path / "t.tsv"
    lines = ["\ufefffile\ttext", "", "a.wav\tHello there.", "# a comment",
             "b.flac\t  spaced\tout  ", "c.mp3\t"]  # fmt: skip
    path.write_text("\n".join(lines) + "\n")
    assert read_transcripts(path) == {"a.wav": "Hello there.", "b.flac": "spaced\tout", "c.mp3": ""}


@pytest.mark.parametrize(
    "body,line,what",
    [
        ("a.wav\tfine\nb.wav no tab here\n", 2, "found no tab"),
        ("a.wav\tone\n\na.wav\ttwo\n", 3, "a.wav is listed twice"),
        ("a.wav\tone\n\tno name\n", 2, "empty file name"),
    ],
)
def test_read_transcripts_malformed(tmp_path, body, line, what):
    path = tmp_path / "bad.tsv"
    path.write_text(body)
    with pytest.raises(CalibrationError, match=rf"bad\.tsv:{line}: .*{what}"):
        read_transcripts(path)


def test_read_transcripts_missing_or_binary(tmp_path):
    with pytest.raises(CalibrationError, match=r"none\.tsv: transcripts file not found"):
        read_transcripts(tmp_path / "none.tsv")
    (tmp_path / "bin.tsv").write_bytes(b"a.wav\t\xff\xfe\n")
    with pytest.raises(CalibrationError, match=r"bin\.tsv: not UTF-8"):
        read_transcripts(tmp_path / "bin.tsv")


def test_no_torch_import():
    # The service imports this module and must stay torch-free.
    code = "import sys, tarq.audio; assert 'torch' not in sys.modules and 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
