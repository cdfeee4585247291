"""Shared fixtures: a tiny random-weight Whisper built from a config (no download), real speech clips."""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

FIXTURES = Path(__file__).parent / "fixtures"
PROCESSOR_DIR = FIXTURES / "whisper-processor-en"
SPEECH_ROOT = Path(os.environ.get("TARQ_SPEECH_DIR", Path(__file__).resolve().parents[1].parent / "shared/data/speech"))
LJSPEECH = SPEECH_ROOT / "ljspeech-385"
COMMONVOICE = SPEECH_ROOT / "commonvoice-en-100"


def tiny_config(**overrides):
    """Whisper with the real tokenizer and feature shapes but 2+2 blocks of width 128 (one W4G128 group)."""
    import json

    from transformers import WhisperConfig

    vocab = json.loads((PROCESSOR_DIR / "tokenizer.json").read_text())
    vocab_size = len(vocab["model"]["vocab"]) + len(vocab.get("added_tokens", []))
    kw = dict(vocab_size=vocab_size, num_mel_bins=80, d_model=128, encoder_layers=2, decoder_layers=2,
              encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=256, decoder_ffn_dim=256,
              max_source_positions=1500, max_target_positions=448, decoder_start_token_id=50257,
              bos_token_id=50257, eos_token_id=50256, pad_token_id=50256)
    kw.update(overrides)
    return WhisperConfig(**kw)


def build_tiny_whisper(out: Path, seed: int = 0, **overrides) -> Path:
    """Save a random tiny Whisper as a normal HF folder (safetensors + processor + generation config)."""
    import torch
    from transformers import GenerationConfig, WhisperForConditionalGeneration

    torch.manual_seed(seed)
    model = WhisperForConditionalGeneration(tiny_config(**overrides)).eval()
    gen = GenerationConfig.from_pretrained(PROCESSOR_DIR)
    gen.alignment_heads = [[1, 0], [1, 1]]
    model.generation_config = gen
    model.save_pretrained(out, safe_serialization=True)
    for f in PROCESSOR_DIR.iterdir():
        if f.name != "generation_config.json":
            shutil.copy(f, out / f.name)
    return out


def make_multilingual(folder: Path, timestamps: bool = True) -> Path:
    """Give a tiny Whisper folder a multilingual generation config (two languages of the fixture's
    vocabulary, both tasks): with no language given, generate detects one."""
    gen = json.loads((folder / "generation_config.json").read_text())
    gen.update(is_multilingual=True, lang_to_id={"<|en|>": 50258, "<|de|>": 50260},
               task_to_id={"transcribe": 50358, "translate": 50357})
    if not timestamps:
        del gen["no_timestamps_token_id"]
    (folder / "generation_config.json").write_text(json.dumps(gen))
    return folder


@pytest.fixture(scope="session")
def multilingual_whisper_dir(short_whisper_dir, tiny_whisper_dir) -> Path:
    """The short tiny Whisper made multilingual, beside tiny-whisper (so under the service tests' model
    root, as `tiny-whisper-multi`)."""
    out = tiny_whisper_dir.parent / "tiny-whisper-multi"
    shutil.copytree(short_whisper_dir, out)
    return make_multilingual(out)


@pytest.fixture(autouse=True)
def _seeded():
    import torch

    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_en():
    """(model, processor) of the real whisper-tiny.en in float32, for tests on real speech (both sets)."""
    from tarq.hub import cached
    from tarq.transcribe import load

    path = cached("whisper-tiny.en")
    if path is None:
        pytest.skip("whisper-tiny.en is not in the model cache (tarq models pull whisper-tiny.en)")
    if not (LJSPEECH.is_dir() and COMMONVOICE.is_dir()):
        pytest.skip(f"real speech not found at {SPEECH_ROOT}")
    return load(path)


@pytest.fixture(scope="session")
def processor_dir() -> Path:
    return PROCESSOR_DIR


@pytest.fixture(scope="session")
def make_tiny_whisper():
    """build_tiny_whisper(out, seed=0, **config overrides): a random tiny Whisper of another shape (a test
    file cannot import conftest by name: tests/service has one too)."""
    return build_tiny_whisper


@pytest.fixture(scope="session")
def tiny_whisper_dir(tmp_path_factory) -> Path:
    return build_tiny_whisper(tmp_path_factory.mktemp("models") / "tiny-whisper")


@pytest.fixture(scope="session")
def short_whisper_dir(tiny_whisper_dir, tmp_path_factory) -> Path:
    """The tiny random Whisper stopping after 16 tokens: random weights never say <|endoftext|>, and
    448 decoding steps per window would make transcription tests slow."""
    import json

    out = tmp_path_factory.mktemp("short") / "tiny-whisper"
    shutil.copytree(tiny_whisper_dir, out)
    gen = json.loads((out / "generation_config.json").read_text())
    gen["max_length"] = 16
    (out / "generation_config.json").write_text(json.dumps(gen))
    return out


@pytest.fixture(scope="session")
def tone_wav():
    """write(path, seconds, hz): a 16 kHz mono 16-bit WAV sine tone at `path`, which it returns."""
    import wave

    def write(path: Path, seconds: float, hz: float = 330.0) -> Path:
        t = np.arange(int(seconds * 16000)) / 16000
        with wave.open(str(path), "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(16000)
            w.writeframes((0.3 * np.sin(2 * np.pi * hz * t) * 32767).astype("<i2").tobytes())
        return path

    return write


@pytest.fixture(scope="session")
def speech_dir() -> Path:
    if not LJSPEECH.is_dir():
        pytest.skip(f"real speech not found at {LJSPEECH}")
    return LJSPEECH


@pytest.fixture(scope="session")
def calib_dir(tmp_path_factory, speech_dir) -> Path:
    """Six real LJSpeech clips with their transcripts (the layout tarq expects)."""
    out = tmp_path_factory.mktemp("calib")
    lines = (speech_dir / "transcripts.tsv").read_text().splitlines()
    keep = [ln for ln in lines if ln.split("\t")[0].endswith(".flac")][:6]
    for ln in keep:
        shutil.copy(speech_dir / ln.split("\t")[0], out)
    (out / "transcripts.tsv").write_text("\n".join(keep) + "\n")
    return out


@pytest.fixture(scope="session")
def audio_only_dir(tmp_path_factory, calib_dir) -> Path:
    out = tmp_path_factory.mktemp("calib-audio-only")
    for f in sorted(calib_dir.glob("*.flac"))[:3]:
        shutil.copy(f, out)
    return out
