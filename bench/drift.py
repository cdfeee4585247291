"""Does the residual correction keep the quantized network close to the full-precision one?

    python bench/drift.py                                  # whisper-tiny.en, 32 LJSpeech clips
    python bench/drift.py --model whisper-base --calib-n 32

Quantizes with TARQ's residual as the paper gives it (alpha) and with the full least-squares step
(alpha = 1), each with the block's groups solved on inputs captured in one pass ("block") and group
after group ("layer"), and tabulates the drift |x - x_fp|^2 / |x_fp|^2 of the hidden states after
every block (from tarq_report.json) and the residual's step sizes. Writes bench/results/drift.md.
No speech is transcribed: bench/quality.py says what the drift costs in WER.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# the shared speech folder beside the checkout, or wherever TARQ_SPEECH_DIR says (as the tests)
SPEECH = Path(os.environ.get("TARQ_SPEECH_DIR", ROOT.parent / "shared" / "data" / "speech"))
RESULTS = ROOT / "bench" / "results"

VARIANTS = {  # name -> QuantConfig overrides (method tarq, transcripts given)
    "paper-block": {},
    "paper-layer": {"sequential": "layer"},
    "full-block": {"residual_step": "full"},
    "full-layer": {"residual_step": "full", "sequential": "layer"},
}


def summary(layers: list[dict]) -> dict:
    alphas = [abs(r["alpha"]) for r in layers]
    cos = [abs(r["drift_cosine"]) for r in layers]
    unrelated = [1 / math.sqrt(r["rows"] * r["h_effective_rank"]) for r in layers]
    return {"median abs(alpha)": statistics.median(alphas), "max abs(alpha)": max(alphas),
            "median abs(cos(E, D))": statistics.median(cos),
            "median 1/sqrt(rows x rank H)": statistics.median(unrelated)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="whisper-tiny.en")
    ap.add_argument("--calib-n", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--work", type=Path, default=ROOT / ".cache" / "bench-drift")
    args = ap.parse_args()

    from tarq.config import QuantConfig
    from tarq.hub import pull
    from tarq.pipeline import quantize_model

    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant {unknown[0]!r}; known: {', '.join(VARIANTS)}")
    model_dir = pull(args.model)
    runs = {}
    for name in args.variants.split(","):
        out = quantize_model(model_dir, SPEECH / "ljspeech-385", args.work / f"{args.model}-{name}",
                             QuantConfig(num_samples=args.calib_n, seed=args.seed, **VARIANTS[name]))
        report = json.loads((out / "tarq_report.json").read_text())
        runs[name] = report
        print(f"{name}: quantized in {report['seconds']['quantize']:.0f} s", flush=True)

    names = list(runs)
    lines = ["# Drift of the quantized network from the full-precision one, per block", "",
             f"Command: `python bench/drift.py {' '.join(sys.argv[1:])}`".rstrip(), "",
             f"{args.model}, TARQ W4G128, {args.calib_n} LJSpeech calibration clips (seed {args.seed}). "
             "Drift = |x - x_fp|^2 / |x_fp|^2 over the calibration positions after each block (x: the "
             "quantized network's hidden states, x_fp: the full-precision network's). paper: alpha as "
             "TARQ.md; full: alpha = 1. block: a block's groups solved on inputs captured in one pass; "
             "layer: group after group, each on the inputs the quantized groups before it produce.", "",
             "| block | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    blocks = [d["block"] for d in runs[names[0]]["stream_drift"]]
    for i, b in enumerate(blocks):
        lines.append(f"| {b.replace('model.', '')} | "
                     + " | ".join(f"{runs[n]['stream_drift'][i]['drift']:.4f}" for n in names) + " |")
    lines += ["", "Residual step sizes over all layers (E = pilot - W, D = drift direction):", "",
              "| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    sums = {n: summary(runs[n]["layers"]) for n in names}
    for key in sums[names[0]]:
        lines.append(f"| {key} | " + " | ".join(f"{sums[n][key]:.4f}" for n in names) + " |")
    lines += ["", "1/sqrt(rows x rank H) is the typical H-cosine of two unrelated displacements of a layer's "
                  "weight (rank H = tr(H)^2 / tr(H^2)). A |cos(E, D)| at or below it means the pilot's error "
                  "carries no information about the drift, so the paper's alpha = cos(E, D) |E|_H / |D|_H is "
                  "about 0 and W + alpha D is W. The drift is measured on the calibration positions (in "
                  "sample); bench/quality.py measures what it costs on held-out speech."]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "drift.md").write_text("\n".join(lines) + "\n")
    print((RESULTS / "drift.md").read_text())


if __name__ == "__main__":
    main()
