"""How much of a TARQ-vs-GPTQ difference is the calibration draw?

    python bench/seeds.py --models whisper-tiny.en --seeds 0,1,2,3,4
    python bench/seeds.py --models whisper-base --seeds 0,1,2,3,4 --work .cache/bench-base
    python bench/seeds.py --models whisper-tiny.en --seeds 0,1,2,3,4 --order layer   # seeds-layer.md
    python bench/seeds.py --models whisper-tiny.en --seeds 0,1,2,3,4 --tarq-variant tarq-text-lambda

bench/quality.py's bootstrap intervals resample the evaluation utterances, not the quantizer: a GPTQ run
on another draw of calibration clips flips other roundings, and on sets with 39 and 119 rare words a
flipped word is 2.6 and 0.8 points. This runs FP, GPTQ and TARQ once per seed (quality.py's settings and
cache, so seed 0 reuses the main table's results), and tabulates TARQ - GPTQ per seed with its interval.
The LJSpeech hold-out is the first 100 clips not drawn for calibration, so it changes a little with the
seed; Common Voice does not. Writes bench/results/seeds.md; `--order layer` runs GPTQ and TARQ in
`--sequential layer` order (quality.py's `gptq-layer`, `tarq-layer`) and writes seeds-layer.md;
`--tarq-variant` puts another of quality.py's TARQ variants in TARQ's column (seeds-<variant>.md).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from quality import RESULTS, SPEECH, fmt, paired_delta, result_path, run_variant, split_ljspeech
from quality import VARIANTS as VARIANT_TABLE

from tarq.config import ORDERS

SETS = ["commonvoice-en-100", "ljspeech-holdout"]
VARIANTS = ["fp", "gptq", "tarq"]


def variants(order: str) -> dict[str, str]:
    """Column name -> quality.py variant for this --sequential order."""
    suffix = "" if order == "block" else f"-{order}"
    return {"fp": "fp", "gptq": f"gptq{suffix}", "tarq": f"tarq{suffix}"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="whisper-tiny.en")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--calib-n", type=int, default=128)
    ap.add_argument("--holdout-limit", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--work", type=Path, default=ROOT / ".cache" / "bench")
    ap.add_argument("--report-only", action="store_true", help="only tabulate results already cached")
    ap.add_argument("--order", choices=ORDERS, default="block", help="--sequential of GPTQ and TARQ")
    ap.add_argument("--tarq-variant", default=None, help="a bench/quality.py TARQ variant for the TARQ column")
    ap.add_argument("--out", type=Path, default=None,
                    help="default bench/results/seeds.md (seeds-layer.md, seeds-<tarq variant>.md)")
    args = ap.parse_args()
    names = variants(args.order)
    if args.tarq_variant:
        if args.tarq_variant not in VARIANT_TABLE or VARIANT_TABLE[args.tarq_variant][0] != "tarq":
            raise SystemExit(f"--tarq-variant {args.tarq_variant!r} is not one of bench/quality.py's TARQ variants")
        names["tarq"] = args.tarq_variant
    stem = "seeds" + (f"-{args.order}" if args.order != "block" else "") + (f"-{args.tarq_variant}" if args.tarq_variant else "")
    args.out = args.out or RESULTS / f"{stem}.md"
    # the cache key's other parts, as bench/quality.py runs for the README (untagged, float32 encoder path)
    args.eval_limit, args.cpu_bf16, args.tag = None, False, ""
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        raise SystemExit(f"--seeds takes integers separated by commas, not {args.seeds!r}") from None
    if not (SPEECH / "ljspeech-385").is_dir():
        raise SystemExit(f"no speech in {SPEECH} (set TARQ_SPEECH_DIR)")

    from tarq.hub import pull
    from tarq.qlinear import QuantLinear

    QuantLinear.cpu_dense_dtype = None  # score the quantization alone, in float32 like FP (as quality.py)
    (RESULTS / "quality").mkdir(parents=True, exist_ok=True)
    rows: dict[tuple[str, int, str], dict] = {}
    for model in args.models.split(","):
        model_dir = None if args.report_only else pull(model)
        for seed in seeds:
            calib, audio_only, holdout = split_ljspeech(args.calib_n, seed, args.work)
            for column in VARIANTS:
                variant = names[column]
                key = result_path(model, variant, args.calib_n, seed, args)
                if key.exists():
                    rows[(model, seed, column)] = json.loads(key.read_text())
                    continue
                if args.report_only:
                    continue
                print(f"{model} seed {seed} {variant} ...", flush=True)
                t = time.perf_counter()
                row = run_variant(model, model_dir, variant, calib, audio_only, holdout, args.work,
                                  args.batch_size, None, args.holdout_limit)
                row["wall_seconds"] = round(time.perf_counter() - t, 1)
                key.write_text(json.dumps(row, indent=1))
                rows[(model, seed, column)] = row
            write_report(rows, args)
    if not rows:
        raise SystemExit("no cached results for these models and seeds")
    write_report(rows, args)
    print(args.out.read_text())


def write_report(rows: dict[tuple[str, int, str], dict], args) -> None:
    order = "" if args.order == "block" else f", both in {args.order} order (`--sequential {args.order}`)"
    tarq = f" (TARQ column: `{args.tarq_variant}`)" if args.tarq_variant else ""
    lines = [f"# TARQ vs GPTQ across calibration draws{order}{tarq}", "",
             f"Command: `python bench/seeds.py {' '.join(sys.argv[1:])}`".rstrip(), "",
             (f"{args.calib_n} LJSpeech calibration clips drawn with each seed; W4G128; evaluation as "
             "bench/results/quality.md (greedy English decoding, rare = wordfreq Zipf < 3). WER / rare-WER in %; "
             "TARQ - GPTQ in rare-WER points with a 95% bootstrap interval over utterances."), ""]
    head = ["model", "seed"] + [f"{v} {s} WER / rare" for s in SETS for v in VARIANTS] + \
           [f"TARQ - GPTQ rare, {s}" for s in SETS]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    deltas: dict[tuple[str, str], list[float]] = {}
    wer_deltas: dict[tuple[str, str], list[float]] = {}
    for model, seed in dict.fromkeys((m, s) for m, s, _ in rows):
        got = {v: rows.get((model, seed, v)) for v in VARIANTS}
        cells = [model, str(seed)]
        for s in SETS:
            for v in VARIANTS:
                e = got[v]["eval"].get(s) if got[v] else None
                cells.append(f"{fmt(e['wer'])} / {fmt(e['rare_wer'])}" if e else "-")
        for s in SETS:
            d = paired_delta(got["gptq"], got["tarq"], s) if got["gptq"] and got["tarq"] else None
            cells.append("-" if d is None else f"{d[0]:+.2f} [{d[1]:+.2f}, {d[2]:+.2f}]")
            if d is not None:
                deltas.setdefault((model, s), []).append(d[0])
                wer_deltas.setdefault((model, s), []).append(got["tarq"]["eval"][s]["wer"] - got["gptq"]["eval"][s]["wer"])
        lines.append("| " + " | ".join(cells) + " |")
    for what, got_deltas in (("rare-WER", deltas), ("WER", wer_deltas)):
        if got_deltas:
            lines += ["", f"TARQ - GPTQ {what} over the seeds (points): "
                      + "; ".join(f"{m} {s}: " + ", ".join(f"{x:+.2f}" for x in xs)
                                  + (f" (mean {statistics.mean(xs):+.2f})" if len(xs) > 1 else "")
                                  for (m, s), xs in got_deltas.items())]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
