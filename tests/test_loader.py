"""Model folders that must be refused, each with a message naming the problem."""
import json
import shutil

import pytest

from tarq.errors import ModelError
from tarq.models.loader import load_whisper, resolve


def copy_model(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_loads_a_whisper_folder(tiny_whisper_dir):
    model, processor = load_whisper(tiny_whisper_dir)
    assert model.config.model_type == "whisper" and not model.training
    assert processor.tokenizer is not None


def test_missing_folder(tmp_path):
    with pytest.raises(ModelError, match="neither a folder nor a Hub id"):
        load_whisper(tmp_path / "nope" / "x y")


def test_not_whisper(tiny_whisper_dir, tmp_path):
    m = copy_model(tiny_whisper_dir, tmp_path / "m")
    cfg = json.loads((m / "config.json").read_text())
    cfg["model_type"] = "bert"
    (m / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="bert model, not Whisper"):
        load_whisper(m)


def test_remote_code_refused(tiny_whisper_dir, tmp_path):
    m = copy_model(tiny_whisper_dir, tmp_path / "m")
    cfg = json.loads((m / "config.json").read_text())
    cfg["auto_map"] = {"AutoModel": "evil.Model"}
    (m / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="remote code"):
        load_whisper(m)


def test_pickle_only_refused(tiny_whisper_dir, tmp_path):
    m = copy_model(tiny_whisper_dir, tmp_path / "m")
    (m / "model.safetensors").rename(m / "pytorch_model.bin")
    with pytest.raises(ModelError, match="pickle"):
        load_whisper(m)


def test_corrupt_config(tiny_whisper_dir, tmp_path):
    m = copy_model(tiny_whisper_dir, tmp_path / "m")
    (m / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match="not valid JSON"):
        load_whisper(m)


def test_corrupt_weights(tiny_whisper_dir, tmp_path):
    m = copy_model(tiny_whisper_dir, tmp_path / "m")
    (m / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ModelError, match="cannot load Whisper"):
        load_whisper(m)


def test_weights_lacking_tensors_refused(tiny_whisper_dir, tmp_path):
    """transformers would fill them with random values; a tied output projection is not missing."""
    from safetensors.torch import load_file, save_file

    m = copy_model(tiny_whisper_dir, tmp_path / "m")
    tensors = load_file(m / "model.safetensors")
    assert "proj_out.weight" not in tensors  # tied to the token embedding, as Whisper checkpoints store it
    for name in ("model.decoder.layers.0.fc1.weight", "model.decoder.layers.0.fc1.bias"):
        del tensors[name]
    save_file(tensors, m / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelError, match=r"lack 2 tensors the config needs: model\.decoder\.layers\.0\.fc1\.bias, "
                                         r"model\.decoder\.layers\.0\.fc1\.weight"):
        load_whisper(m)


def test_unreachable_hub_id(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="Hugging Face Hub"):
        resolve("someone/not-a-model-here")
