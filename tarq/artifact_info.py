"""What an artifact folder holds, from its json files only (no torch), so the API process can list models.

An artifact is a Hugging Face model folder whose config.json carries a compressed-tensors
`quantization_config` (format pack-quantized) and a `tarq` section written by tarq.artifact.save_artifact.
"""
from __future__ import annotations

import json
from pathlib import Path

from .errors import ModelError

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
REPORT = "tarq_report.json"
CARD = "README.md"
QUANT_METHOD = "compressed-tensors"
FORMAT = "pack-quantized"


def read_json(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ModelError(f"{path}: file is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"{path}: not readable JSON ({type(e).__name__}: "
                         f"{str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path}: expected a JSON object")
    return data


def is_artifact(path: str | Path) -> bool:
    """True for a folder whose config.json declares compressed-tensors pack-quantized weights."""
    path = Path(path)
    if not (path / CONFIG).is_file():
        return False
    try:
        qc = read_json(path / CONFIG).get("quantization_config")
    except ModelError:
        return False
    return isinstance(qc, dict) and qc.get("quant_method") == QUANT_METHOD


def quantization_config(config: dict, where: Path) -> dict:
    """The `quantization_config` of a config.json dict, checked to be one this project can load."""
    qc = config.get("quantization_config")
    if not isinstance(qc, dict):
        raise ModelError(f"{where}: no quantization_config (not a quantized artifact)")
    if qc.get("quant_method") != QUANT_METHOD:
        raise ModelError(f"{where}: quantization_config.quant_method is {qc.get('quant_method')!r}, "
                         f"expected {QUANT_METHOD!r}")
    if qc.get("format") != FORMAT:
        raise ModelError(f"{where}: quantization_config.format is {qc.get('format')!r}, expected {FORMAT!r}")
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or len(groups) != 1:
        raise ModelError(f"{where}: quantization_config.config_groups must hold exactly one scheme")
    scheme = next(iter(groups.values()))
    weights = scheme.get("weights") if isinstance(scheme, dict) else None
    if not isinstance(weights, dict):
        raise ModelError(f"{where}: quantization_config.config_groups has no weights arguments")
    if weights.get("type") != "int" or weights.get("strategy") != "group":
        raise ModelError(f"{where}: only int weights with group strategy are supported, got "
                         f"type={weights.get('type')!r} strategy={weights.get('strategy')!r}")
    return qc


def weight_args(qc: dict) -> dict:
    """bits, group_size, sym of the single weight scheme."""
    weights = next(iter(qc["config_groups"].values()))["weights"]
    return {"bits": weights.get("num_bits"), "group_size": weights.get("group_size"),
            "sym": weights.get("symmetric"), "actorder": weights.get("actorder")}


def artifact_info(path: str | Path) -> dict:
    """Summary of an artifact folder: base_model, method, bits, group_size, sym, size_bytes, metrics."""
    path = Path(path)
    if not path.is_dir():
        raise ModelError(f"{path}: not a folder")
    config = read_json(path / CONFIG)
    qc = quantization_config(config, path / CONFIG)
    tarq = config.get("tarq") if isinstance(config.get("tarq"), dict) else {}
    args = weight_args(qc)
    return {
        "path": str(path),
        "base_model": tarq.get("base_model"),
        "method": tarq.get("method"),
        "bits": args["bits"],
        "group_size": args["group_size"],
        "sym": args["sym"],
        "act_order": bool(tarq.get("settings", {}).get("act_order", args["actorder"] is not None)),
        "size_bytes": sum(f.stat().st_size for f in path.rglob("*") if f.is_file()),
        "metrics": tarq.get("metrics"),
        "tarq_version": tarq.get("version"),
    }


def update_metrics(path: str | Path, metrics: dict) -> None:
    """Record evaluation metrics in an existing artifact (config.json's tarq section and the model card),
    for runs that evaluate after saving."""
    path = Path(path)
    config = read_json(path / CONFIG)
    quantization_config(config, path / CONFIG)
    config.setdefault("tarq", {})["metrics"] = metrics
    (path / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    write_card(path, config)


def _metrics_table(metrics: dict) -> list[str]:
    """Markdown table: rows of {name: {metric: value}} or a flat {metric: value}."""
    def fmt(v) -> str:
        return f"{v:.2f}" if isinstance(v, float) else str(v)

    if metrics and all(isinstance(v, dict) for v in metrics.values()):
        cols = list(dict.fromkeys(k for row in metrics.values() for k in row))
        lines = ["| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        lines += [f"| {name} | " + " | ".join(fmt(row.get(c, "")) for c in cols) + " |"
                  for name, row in metrics.items()]
        return lines
    return ["| metric | value |", "|---|---|"] + [f"| {k} | {fmt(v)} |" for k, v in metrics.items()]


def write_card(path: str | Path, config: dict) -> Path:
    """README.md model card from an artifact's config.json dict (front matter for the Hub, then a summary)."""
    tarq = config.get("tarq", {})
    args = weight_args(config["quantization_config"])
    base = tarq.get("base_model") or "unknown"
    method = tarq.get("method") or "unknown"
    settings = tarq.get("settings", {})
    scheme = f"W{args['bits']}G{args['group_size']}"
    front = ["---", f"base_model: {json.dumps(base)}", "base_model_relation: quantized",
             "library_name: transformers", "pipeline_tag: automatic-speech-recognition", "tags:"]
    front += [f"- {t}" for t in ("whisper", "automatic-speech-recognition", "compressed-tensors",
                                 f"{args['bits']}-bit", method, "tarq")]
    front.append("---")
    body = [
        f"# {Path(str(base)).name or base} · {method.upper()} {scheme}", "",
        f"`{base}` quantized with **{method}** by tarq "
        f"(tail-aware GPTQ for speech recognition).", "",
        "| setting | value |", "|---|---|",
        f"| method | {method} |",
        f"| bits | {args['bits']} |",
        f"| group size | {args['group_size']} |",
        f"| symmetric | {str(bool(args['sym'])).lower()} |",
        f"| act-order | {str(bool(settings.get('act_order', False))).lower()} |",
        f"| format | compressed-tensors {FORMAT} |", "",
        "Weights of the quantized Linear layers are stored packed (`weight_packed`, `weight_scale`, "
        "`weight_zero_point`); other layers keep their original dtype. Load with `tarq transcribe` or "
        "`tarq.artifact.load_artifact`. The full run report is in `tarq_report.json`.", "",
    ]
    metrics = tarq.get("metrics")
    if metrics:
        body += ["## Metrics", "", *_metrics_table(metrics), ""]
    out = Path(path) / CARD
    out.write_text("\n".join(front + body))
    return out
