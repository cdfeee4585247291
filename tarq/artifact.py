"""Save and load a quantized Whisper as a Hugging Face model folder in the compressed-tensors convention.

Folder layout:
  model.safetensors      packed tensors for quantized Linears (weight_packed, weight_scale, weight_zero_point,
                         weight_shape, weight_g_idx only under act-order) and the other tensors in the model's
                         own dtype, except that a float32 tensor holding only float16 values is stored as
                         float16 (OpenAI released Whisper in fp16: the fp32 checkpoints on the Hub are exact
                         upcasts, and half their bytes are zeros). config.json's `tarq.dtype` names the
                         model's dtype and load_artifact casts them back, so save -> load stays exact.
  config.json            the model config + `quantization_config` (written by compressed-tensors'
                         ModelCompressor from QuantizationConfig/Scheme/Args) + a `tarq` section (method,
                         settings, base model, metrics)
  generation_config.json, processor files, README.md (model card), tarq_report.json
Loading never runs remote code and reads weights with safetensors only.
"""
from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

import torch
from torch import nn

from . import __version__
from .artifact_info import (CONFIG, FORMAT, REPORT, WEIGHTS, artifact_info, is_artifact, quantization_config,
                            read_json, update_metrics, weight_args, write_card)
from .config import QuantConfig
from .errors import ModelError
from .qlinear import QuantLinear, trivial_g_idx
from .quantizer import QuantizedWeight

__all__ = ["save_artifact", "load_artifact", "is_artifact", "artifact_info", "update_metrics",
           "quantization_config_for"]


def quantization_config_for(model: nn.Module, quantized: dict[str, QuantizedWeight], act_order: bool = False):
    """compressed-tensors QuantizationConfig describing `quantized` (one group scheme over Linear layers,
    every other Linear in `ignore`)."""
    from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig, QuantizationScheme,
                                                 QuantizationStatus)

    schemes = {(q.bits, q.group_size, q.sym) for q in quantized.values()}
    if len(schemes) != 1:
        raise ValueError(f"all quantized layers must share bits/group_size/sym, got {sorted(schemes)}")
    bits, group_size, sym = schemes.pop()
    # compressed-tensors 0.20 dropped actorder="group" (a runtime g_idx); "weight" means the columns were
    # reordered during the solve only and the groups stay contiguous, which is what a trivial g_idx is.
    static = all(trivial_g_idx(q.g_idx, q.group_size) for q in quantized.values())
    actorder = "weight" if act_order and static else None
    args = QuantizationArgs(num_bits=bits, type="int", symmetric=sym, strategy="group", group_size=group_size,
                            actorder=actorder)
    ignore = [name for name, m in model.named_modules()
              if isinstance(m, (nn.Linear, QuantLinear)) and name not in quantized]
    return QuantizationConfig(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=args)},
                              format=FORMAT, quantization_status=QuantizationStatus.COMPRESSED, ignore=ignore)


def _artifact_tensors(model: nn.Module, quantized: dict[str, QuantizedWeight]) -> dict[str, torch.Tensor]:
    """State dict to store: packed buffers for quantized layers, everything else as is, tied copies once."""
    modules = dict(model.named_modules())
    out: dict[str, torch.Tensor] = {}
    for name, qw in quantized.items():
        linear = modules.get(name)
        if isinstance(linear, QuantLinear):  # a model already swapped by replace_linears
            for key, t in linear.state_dict().items():
                out[f"{name}.{key}"] = t.detach().cpu().contiguous()
            continue
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"quantized layer {name!r} is not an nn.Linear of the model")
        if tuple(qw.shape) != (linear.out_features, linear.in_features):
            raise ValueError(f"quantized weight for {name!r} has shape {tuple(qw.shape)}, "
                             f"the layer has {(linear.out_features, linear.in_features)}")
        bias = linear.bias.detach().cpu() if linear.bias is not None else None
        cpu_qw = QuantizedWeight(qw.codes.cpu(), qw.scale.cpu(), qw.zero.cpu(), qw.g_idx.cpu(), qw.bits,
                                 qw.group_size, qw.sym)
        for key, t in QuantLinear.from_quantized(cpu_qw, bias).state_dict().items():
            out[f"{name}.{key}"] = t.contiguous()
    seen: dict[tuple, str] = {}
    for key, t in model.state_dict().items():
        if key.rpartition(".")[0] in quantized:  # written above from the packed form
            continue
        # Tied parameters (proj_out.weight is embed_tokens.weight) appear twice; safetensors refuses
        # shared storage, and from_pretrained/load_artifact re-tie them.
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
        if ident in seen:
            continue
        seen[ident] = key
        out[key] = _compact(t.detach().cpu().contiguous())
    return out


def _compact(t: torch.Tensor) -> torch.Tensor:
    """t as float16 when it is float32 and every value survives the round trip (NaN or a value beyond
    float16's range does not), else t."""
    if t.dtype == torch.float32:
        half = t.half()
        if torch.equal(half.float(), t):
            return half
    return t


def _float_dtype(model: nn.Module) -> str:
    """The dtype of the model's float tensors, as config.json spells dtypes ("float32")."""
    dtypes = {t.dtype for t in model.state_dict().values() if t.is_floating_point()}
    widest = max(dtypes, key=lambda d: torch.finfo(d).bits) if dtypes else torch.float32
    return str(widest).removeprefix("torch.")


STORED_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _jsonable(obj):
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    raise TypeError(f"report value of type {type(obj).__name__} is not JSON serializable")


def save_artifact(model, quantized: dict[str, QuantizedWeight], processor, out_dir: str | Path, *,
                  config: QuantConfig, base_model: str, report: dict, metrics: dict | None = None) -> Path:
    """Write the artifact folder `out_dir` (replacing an earlier artifact or an empty folder there).
    The folder is built beside `out_dir` and renamed into place, so a crash never leaves half an artifact."""
    from compressed_tensors.compressors import ModelCompressor
    from safetensors.torch import save_file

    if not quantized:
        raise ValueError("no quantized layers to save")
    out_dir = Path(out_dir)
    if out_dir.exists() and not (out_dir.is_dir() and (not any(out_dir.iterdir()) or is_artifact(out_dir))):
        raise ModelError(f"{out_dir}: exists and is not an empty folder or an earlier artifact")
    qconfig = quantization_config_for(model, quantized, act_order=config.act_order)
    tmp = out_dir.parent / f".{out_dir.name}.partial-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        save_file(_artifact_tensors(model, quantized), str(tmp / WEIGHTS), metadata={"format": "pt"})
        model.config.save_pretrained(tmp)
        ModelCompressor(quantization_config=qconfig).update_config(str(tmp))
        cfg = read_json(tmp / CONFIG)
        cfg["tarq"] = {"version": __version__, "method": config.method, "base_model": base_model,
                       "settings": config.to_dict(), "metrics": metrics, "dtype": _float_dtype(model),
                       "act_order_g_idx": any(not trivial_g_idx(q.g_idx, q.group_size)
                                              for q in quantized.values())}
        (tmp / CONFIG).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        (tmp / REPORT).write_text(json.dumps(report, indent=2, default=_jsonable) + "\n")
        write_card(tmp, cfg)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _tied_keys(model: nn.Module) -> set[str]:
    tied = getattr(model, "_tied_weights_keys", None) or {}
    if not getattr(model.config, "tie_word_embeddings", True):
        return set()
    return set(tied) if isinstance(tied, (dict, list, tuple, set)) else set()


def load_artifact(path: str | Path, device: str | torch.device = "cpu"):
    """(model, processor) from an artifact folder; quantized Linears become QuantLinear (packed buffers)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from transformers import (GenerationConfig, WhisperConfig, WhisperForConditionalGeneration,
                              WhisperProcessor)

    path = Path(path)
    if not path.is_dir():
        raise ModelError(f"{path}: artifact folder not found")
    cfg = read_json(path / CONFIG)
    qc = quantization_config(cfg, path / CONFIG)
    try:
        from compressed_tensors.quantization import QuantizationConfig

        QuantizationConfig.model_validate(qc)
    except Exception as e:  # noqa: BLE001 -- pydantic's ValidationError and friends: all mean a bad config
        raise ModelError(f"{path / CONFIG}: invalid quantization_config: {str(e).splitlines()[0]}") from None
    if cfg.get("model_type") != "whisper":
        raise ModelError(f"{path / CONFIG}: model_type is {cfg.get('model_type')!r}, expected 'whisper'")
    args = weight_args(qc)
    if not (path / WEIGHTS).is_file():
        raise ModelError(f"{path / WEIGHTS}: file is missing")
    try:
        tensors = load_file(str(path / WEIGHTS))
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelError(f"{path / WEIGHTS}: not a readable safetensors file "
                         f"({str(e).splitlines()[0]})") from None

    model_cfg = {k: v for k, v in cfg.items() if k not in ("quantization_config", "tarq")}
    try:
        wconfig = WhisperConfig.from_dict(model_cfg)
        with torch.device("meta"):
            model = WhisperForConditionalGeneration(wconfig)
    except (TypeError, ValueError, KeyError, AssertionError) as e:
        raise ModelError(f"{path / CONFIG}: not a usable Whisper config ({str(e).splitlines()[0]})") from None

    names = sorted(k[: -len(".weight_packed")] for k in tensors if k.endswith(".weight_packed"))
    if not names:
        raise ModelError(f"{path / WEIGHTS}: holds no packed weights (no '*.weight_packed' tensors)")
    ignore = set(qc.get("ignore") or [])
    for name in names:
        if name in ignore:
            raise ModelError(f"{path / WEIGHTS}: {name} is packed but listed in quantization_config.ignore")
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            raise ModelError(f"{path / WEIGHTS}: packed layer {name!r} is not a module of this "
                             "Whisper") from None
        if not isinstance(linear, nn.Linear):
            raise ModelError(f"{path / WEIGHTS}: packed layer {name!r} is a {type(linear).__name__}, "
                             "not Linear")
        shape = tensors.get(f"{name}.weight_shape")
        if shape is None or shape.tolist() != [linear.out_features, linear.in_features]:
            raise ModelError(f"{path / WEIGHTS}: {name}.weight_shape is "
                             f"{None if shape is None else shape.tolist()}, the model expects "
                             f"{[linear.out_features, linear.in_features]}")
        scale = tensors.get(f"{name}.weight_scale")
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, QuantLinear(
            linear.in_features, linear.out_features, bits=args["bits"], group_size=args["group_size"],
            sym=bool(args["sym"]), bias=linear.bias is not None, g_idx=f"{name}.weight_g_idx" in tensors,
            scale_dtype=scale.dtype if scale is not None else torch.float32, device="meta"))

    expected = model.state_dict()
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise ModelError(f"{path / WEIGHTS}: unexpected tensors {', '.join(unexpected[:3])}"
                         f"{' ...' if len(unexpected) > 3 else ''}")
    missing = sorted(set(expected) - set(tensors) - _tied_keys(model))
    if missing:
        raise ModelError(f"{path / WEIGHTS}: missing tensors {', '.join(missing[:3])}"
                         f"{' ...' if len(missing) > 3 else ''}")
    for key, t in tensors.items():
        if tuple(t.shape) != tuple(expected[key].shape):
            raise ModelError(f"{path / WEIGHTS}: {key} has shape {tuple(t.shape)}, "
                             f"the model expects {tuple(expected[key].shape)}")
        if expected[key].dtype in (torch.int32, torch.int64) and t.dtype != expected[key].dtype:
            raise ModelError(f"{path / WEIGHTS}: {key} is {t.dtype}, expected {expected[key].dtype}")
    # tensors stored as float16 because nothing was lost (_compact) go back to the model's dtype; an
    # artifact written before `tarq.dtype` existed holds every tensor in it already
    dtype = (cfg.get("tarq") or {}).get("dtype")
    if dtype is not None:
        if dtype not in STORED_DTYPES:
            raise ModelError(f"{path / CONFIG}: tarq.dtype is {dtype!r}, expected one of "
                             f"{', '.join(STORED_DTYPES)}")
        want, packed = STORED_DTYPES[dtype], set(names)
        for key, t in tensors.items():
            if t.is_floating_point() and t.dtype != want and key.rpartition(".")[0] not in packed:
                tensors[key] = t.to(want)
    model.load_state_dict(tensors, strict=False, assign=True)
    model.tie_weights()
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise ModelError(f"{path / WEIGHTS}: no values for {', '.join(left[:3])}")

    if (path / "generation_config.json").is_file():
        try:
            model.generation_config = GenerationConfig.from_pretrained(path)
        except (OSError, ValueError) as e:
            raise ModelError(f"{path / 'generation_config.json'}: {str(e).splitlines()[0]}") from None
    # transformers 5 quietly builds an empty tokenizer when the files are gone, so look for them first.
    has_tokenizer = (path / "tokenizer.json").is_file() or (
        (path / "vocab.json").is_file() and (path / "merges.txt").is_file())
    has_features = (path / "preprocessor_config.json").is_file() or (path / "processor_config.json").is_file()
    if not (has_tokenizer and has_features):
        raise ModelError(f"{path}: processor files missing or broken (need tokenizer.json or "
                         "vocab.json+merges.txt, and preprocessor_config.json or processor_config.json)")
    try:
        processor = WhisperProcessor.from_pretrained(path)
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise ModelError(f"{path}: processor files missing or broken ({str(e).splitlines()[0]})") from None
    if len(processor.tokenizer) <= 1:
        raise ModelError(f"{path}: processor files missing or broken (the tokenizer is empty)")
    return model.to(device).eval(), processor
