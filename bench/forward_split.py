"""Where the calibration forward passes spend their time: encoder blocks or decoder blocks, GPTQ and TARQ.

    python bench/forward_split.py                          # whisper-tiny.en, 32 LJSpeech clips
    python bench/forward_split.py --model whisper-base --calib-n 32

Times every block forward of the sequential driver (tarq.sequential.Driver.forward, wrapped here) by the
side of the model it belongs to, in one run per method on the same clips, and prints a table. It says
which stream merging could pay: TARQ's extra full-precision pass costs what its side costs.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SPEECH = Path(os.environ.get("TARQ_SPEECH_DIR", ROOT.parent / "shared" / "data" / "speech"))


def split(model: str, method: str, calib: Path, n: int) -> dict[str, float]:
    from tarq import sequential
    from tarq.config import QuantConfig
    from tarq.pipeline import quantize_model

    seconds: dict[str, float] = {}
    plain = sequential.Driver.forward

    def timed(self, block, h, kw):
        start = time.perf_counter()
        try:
            return plain(self, block, h, kw)
        finally:
            seconds[block.side] = seconds.get(block.side, 0.0) + time.perf_counter() - start

    sequential.Driver.forward = timed
    out = Path(tempfile.mkdtemp(prefix="tarq-split-"))
    try:
        start = time.perf_counter()
        quantize_model(model, calib, out / "artifact", QuantConfig(method=method, num_samples=n))
        seconds["run"] = time.perf_counter() - start
    finally:
        sequential.Driver.forward = plain
        shutil.rmtree(out, ignore_errors=True)
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="whisper-tiny.en")
    ap.add_argument("--calib-n", type=int, default=32)
    ap.add_argument("--calib", type=Path, default=SPEECH / "ljspeech-385")
    args = ap.parse_args()
    if not args.calib.is_dir():
        sys.exit(f"no calibration clips at {args.calib} (TARQ_SPEECH_DIR)")
    from tarq.hub import pull

    model = str(pull(args.model))
    rows = {m: split(model, m, args.calib, args.calib_n) for m in ("gptq", "tarq")}
    print(f"{args.model}, {args.calib_n} clips, block order, float32 passes (`python bench/forward_split.py "
          f"--model {args.model} --calib-n {args.calib_n}`)\n")
    print("| method | encoder forward s | decoder forward s | whole run s |")
    print("|---|---|---|---|")
    for method, s in rows.items():
        print(f"| {method} | {s.get('encoder', 0):.1f} | {s.get('decoder', 0):.1f} | {s['run']:.1f} |")


if __name__ == "__main__":
    main()
