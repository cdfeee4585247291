"""Accuracy and speed of the transcription compute dtypes on this CPU: float32 against bfloat16 (what
`--dtype auto` picks on CPUs where a bf16 matmul measures faster), on the same clips with the same
decoding.

    python bench/dtype.py                                          # whisper-base and whisper-tiny.en
    python bench/dtype.py --tarq whisper-base                      # and whisper-base quantized with TARQ

`--tarq` models are quantized first (TARQ, W4G128, on bench/quality.py's calibration draw: 128 LJSpeech
clips with transcripts, seed 0; kept under --work/artifacts and reused). Each model is evaluated on
commonvoice-en-100 and on the first --lj LJSpeech clips held out from that draw, in both dtypes,
through tarq.evaluate.evaluate (greedy, English, batch 8: the recipe of every quality number). Reports
WER / rare-WER / common-WER, decoding seconds, the speed-up, and the clips whose text is the same in
both. Writes bench/results/dtype.md and .json.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from quality import SPEECH, split_ljspeech
from speed import RESULTS, environment, table

DTYPES = ("float32", "bfloat16")


def measure(name: str, sets: dict[str, tuple[Path, list[str] | None]], batch_size: int) -> dict:
    """Both dtypes of one model on every set: scores, decoding seconds and hypotheses."""
    from tarq.evaluate import evaluate
    from tarq.hub import pull

    source = name if Path(name).is_dir() else str(pull(name))
    out: dict = {"model": Path(name).name, "sets": {}}
    for dtype in DTYPES:
        for label, (folder, files) in sets.items():
            res = evaluate(source, folder, batch_size=batch_size, files=files, dtype=dtype)
            out["sets"].setdefault(label, {})[dtype] = {
                k: getattr(res, k) for k in ("wer", "rare_wer", "common_wer", "utterances", "words", "rare_words",
                                             "seconds", "audio_seconds", "hypotheses")}
            print(f"  {out['model']} {dtype} {label}: WER {res.wer:.2f} rare-WER {res.rare_wer:.2f} "
                  f"({res.seconds:.0f} s)", flush=True)
    return out


def quantized(name: str, calib: Path, folder: Path, batch_size: int) -> Path:
    """`name` quantized with TARQ on `calib` (every clip), made once under `folder`."""
    from tarq.config import QuantConfig
    from tarq.hub import pull
    from tarq.pipeline import quantize_model

    out = folder / f"{Path(name).name}-tarq"
    if not (out / "tarq_report.json").is_file():
        print(f"  quantizing {name} with TARQ into {out}", flush=True)
        quantize_model(name if Path(name).is_dir() else pull(name), calib, out,
                       QuantConfig(method="tarq", batch_size=batch_size))
    return out


def rows(result: dict) -> list[list[str]]:
    out = []
    for label, by_dtype in result["sets"].items():
        a, b = by_dtype["float32"], by_dtype["bfloat16"]
        same = sum(a["hypotheses"][f] == b["hypotheses"][f] for f in a["hypotheses"])
        rate = lambda r: f"{r['wer']:.2f} / {r['rare_wer']:.2f} / {r['common_wer']:.2f}"
        out.append([result["model"], label, str(a["utterances"]), rate(a), rate(b), f"{a['seconds']:.0f}",
                    f"{b['seconds']:.0f}", f"{a['seconds'] / b['seconds']:.2f}x", f"{same} / {len(a['hypotheses'])}"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="whisper-base,whisper-tiny.en", help="comma list: cached names or folders")
    ap.add_argument("--tarq", default="", help="comma list: also these models quantized with TARQ")
    ap.add_argument("--lj", type=int, default=100, help="held-out LJSpeech clips")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--work", type=Path, default=ROOT / ".cache" / "bench")
    ap.add_argument("--out", type=Path, default=RESULTS / "dtype.md")
    args = ap.parse_args()

    from tarq.transcribe import compute_dtype, dtype_name

    calib, _, holdout = split_ljspeech(128, 0, args.work)
    sets = {"commonvoice-en-100": (SPEECH / "commonvoice-en-100", None),
            f"ljspeech held out ({args.lj})": (SPEECH / "ljspeech-385", holdout[:args.lj])}
    models = [m for m in args.models.split(",") if m]
    models += [str(quantized(m, calib, args.work / "artifacts", args.batch_size)) for m in args.tarq.split(",") if m]
    results = [measure(m, sets, args.batch_size) for m in models]

    auto = dtype_name(compute_dtype("auto", "cpu"))
    lines = ["# Transcription compute dtype: float32 vs bfloat16", "",
             f"Command: `python bench/dtype.py {' '.join(sys.argv[1:])}`", "",
             f"Run: {environment('cpu')}. `--dtype auto` picks {auto} on this CPU.", "",
             ("Greedy, English, batch 8 (tarq.evaluate, as every quality number); rates in percent as "
              "WER / rare-WER / common-WER; seconds: decoding and scoring, model loading excluded; same text: "
              "clips whose hypothesis is identical in both dtypes."), ""]
    lines += table(["model", "set", "clips", "float32", "bfloat16", "s float32", "s bfloat16", "speed-up",
                    "same text"], [r for res in results for r in rows(res)])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    args.out.with_suffix(".json").write_text(json.dumps({"args": vars(args), "auto": auto, "results": results},
                                                        indent=1, default=str))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
