"""Load a Whisper model safely: a local folder or a Hub id, safetensors only, never remote code."""
from __future__ import annotations

import json
import re
from pathlib import Path

from ..errors import ModelError

HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.tiktoken", "README.md"]


def check_folder(path: Path) -> dict:
    """The folder's config, after refusing what cannot be loaded safely. Raises ModelError."""
    if not path.is_dir():
        raise ModelError(f"model folder {path} does not exist or is not a folder")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise ModelError(f"{path} is not a Hugging Face model folder: no config.json")
    try:
        cfg = json.loads(cfg_file.read_text())
    except (OSError, ValueError) as e:
        raise ModelError(f"{cfg_file} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise ModelError(f"{cfg_file} does not hold a JSON object")
    if "auto_map" in cfg:
        raise ModelError(f"{path} asks for remote code (auto_map in config.json); refused")
    if cfg.get("model_type") != "whisper":
        raise ModelError(f"{path} holds a {cfg.get('model_type') or 'unknown'!s} model, not Whisper")
    if not any(path.glob("*.safetensors")):
        pickled = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
        if pickled:
            raise ModelError(f"{path} has only pickle weights ({', '.join(pickled)}); safetensors required")
        raise ModelError(f"{path} has no weights (*.safetensors)")
    return cfg


def resolve(source: str | Path) -> Path:
    """A local folder as is; a cached short name (whisper-base) from tarq's model cache; a Hub id
    (owner/name) downloaded with safetensors and json files only."""
    path = Path(source).expanduser()
    if path.exists():
        return path
    name = str(source)
    from ..hub import cached  # noqa: PLC0415  (the cache knows short names such as whisper-tiny.en)

    try:
        hit = cached(name)
    except ModelError:  # not a name the cache knows
        hit = None
    if hit is not None:
        return hit
    if not HUB_ID.match(name):
        raise ModelError(f"model {name!r} is neither a folder nor a Hub id (owner/name) nor a cached model")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, allow_patterns=HUB_FILES))
    except Exception as e:  # noqa: BLE001 -- the hub raises many kinds; all mean "cannot get it"
        raise ModelError(f"cannot download {name!r} from the Hugging Face Hub: {type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}".rstrip(": ")) from None


def load_whisper(source: str | Path, device: str = "cpu", dtype=None):
    """(model, processor) in eval mode, in `dtype` (float models: float32 when None; artifacts: as
    stored when None). Artifact folders load through tarq.artifact."""
    import torch
    from safetensors import SafetensorError
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    from ..artifact import is_artifact, load_artifact

    path = resolve(source)
    if is_artifact(path):
        model, processor = load_artifact(path, device=device)
        # the int4 layers keep their codes; their scales and everything else follow the dtype
        return (model if dtype is None else model.to(dtype)), processor
    check_folder(path)
    try:
        model, info = WhisperForConditionalGeneration.from_pretrained(
            path, use_safetensors=True, dtype=dtype or torch.float32, output_loading_info=True)
        processor = WhisperProcessor.from_pretrained(path)
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as e:
        raise ModelError(f"cannot load Whisper from {path}: {str(e).splitlines()[0]}") from None
    # transformers fills weights the files lack with random values and only logs it: a truncated or
    # mis-converted folder would quantize and transcribe garbage without a word
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        raise ModelError(f"{path}: the weights lack {len(missing)} tensors the config needs: "
                         f"{', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
    return model.to(device).eval(), processor
