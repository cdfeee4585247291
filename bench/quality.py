"""WER / rare-WER of FP vs RTN vs GPTQ vs TARQ (and TARQ's ablations) on real speech.

    python bench/quality.py                      # whisper-tiny.en and whisper-base, everything
    python bench/quality.py --models whisper-tiny.en --variants fp,gptq,tarq

Calibration: --calib-n clips drawn with --seed from ljspeech-385 (with transcripts, and again audio-only
for pseudo-labels). Evaluation: commonvoice-en-100 and the LJSpeech clips not used for calibration.
Never on calibration clips. Every variant is W4G128 and decodes greedily in English with identical
settings. Results are cached per (model, variant) under bench/results/quality/ so that an interrupted
run resumes; --fresh recomputes. Writes bench/results/quality.md and bench/results/quality.png.
--tag NAME keeps a rerun (say, after a change to the quantizer) apart: its quantized variants are cached
as ...-NAME.json and reported in quality-NAME.md / .png, beside the untagged results; FP is shared.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# the shared speech folder beside the checkout, or wherever TARQ_SPEECH_DIR says (as the tests)
SPEECH = Path(os.environ.get("TARQ_SPEECH_DIR", ROOT.parent / "shared" / "data" / "speech"))
RESULTS = ROOT / "bench" / "results"

# name -> (method, QuantConfig overrides, calibration with transcripts?)
VARIANTS: dict[str, tuple[str, dict, bool]] = {
    "fp": ("fp", {}, True),
    "rtn": ("rtn", {}, True),
    "gptq": ("gptq", {}, True),
    "tarq": ("tarq", {}, True),
    "tarq-pseudo": ("tarq", {}, False),
    "tarq-rarebal-only": ("tarq", {"residual": False}, True),
    "tarq-residual-only": ("tarq", {"rarebal": False}, True),
    "tarq-frames": ("tarq", {"encoder_tagging": "frames"}, True),
    "tarq-full-residual": ("tarq", {"residual_step": "full"}, True),
    "tarq-full-residual-layer": ("tarq", {"residual_step": "full", "sequential": "layer"}, True),
    "tarq-layer": ("tarq", {"sequential": "layer"}, True),
    "gptq-layer": ("gptq", {"sequential": "layer"}, True),
    "tarq-digits-lookup": ("tarq", {"digits_are_tail": False}, True),
    "tarq-c2": ("tarq", {"lambda_cost": 2.0}, True),
    # lambda's tr(Hc) over positions that read text, without the prompt's special tokens (massive activations)
    "tarq-text-lambda": ("tarq", {"lambda_positions": "text"}, True),
    "gptq-sym": ("gptq", {"sym": True}, True),
    "tarq-sym": ("tarq", {"sym": True}, True),
    # the calibration forward passes in bf16 (autocast; Hessians and solves stay float32)
    "gptq-bf16-passes": ("gptq", {"forward_dtype": "bfloat16"}, True),
    "tarq-bf16-passes": ("tarq", {"forward_dtype": "bfloat16"}, True),
}


def split_ljspeech(n: int, seed: int, work: Path) -> tuple[Path, Path, list[str]]:
    """Calibration folders (with and without transcripts) and the held-out LJSpeech file names."""
    lj = SPEECH / "ljspeech-385"
    lines = [ln for ln in (lj / "transcripts.tsv").read_text().splitlines() if "\t" in ln]
    names = sorted(ln.split("\t")[0] for ln in lines)
    calib = set(random.Random(seed).sample(names, n))
    with_text, audio_only = work / "calib", work / "calib-audio-only"
    for d in (with_text, audio_only):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
    for name in sorted(calib):
        for d in (with_text, audio_only):
            (d / name).symlink_to(lj / name)
    (with_text / "transcripts.tsv").write_text("\n".join(ln for ln in lines if ln.split("\t")[0] in calib) + "\n")
    return with_text, audio_only, [x for x in names if x not in calib]


def run_variant(model: str, model_dir: Path, variant: str, calib: Path, audio_only: Path, holdout: list[str],
                work: Path, batch_size: int, eval_limit: int | None, holdout_limit: int | None) -> dict:
    from tarq.config import QuantConfig
    from tarq.evaluate import evaluate
    from tarq.pipeline import quantize_model

    method, overrides, with_text = VARIANTS[variant]
    row: dict = {"model": model, "variant": variant}
    source: Path = model_dir
    if method != "fp":
        out = work / "artifacts" / f"{model}-{variant}"
        shutil.rmtree(out, ignore_errors=True)
        t = time.perf_counter()
        # float32 passes unless the variant says otherwise: every earlier row was made with them
        quantize_model(model_dir, calib if with_text else audio_only, out,
                       QuantConfig(method=method, batch_size=batch_size, **{"forward_dtype": "float32", **overrides}))
        row["quantize_seconds"] = round(time.perf_counter() - t, 1)
        report = json.loads((out / "tarq_report.json").read_text())
        row["layers"] = report["layers"]
        row["calibration"] = report["calibration"]
        source = out
    evals = {}
    for data, files in (("commonvoice-en-100", None), ("ljspeech-holdout", holdout)):
        folder = SPEECH / ("ljspeech-385" if data.startswith("ljspeech") else data)
        limit_here = holdout_limit if files else eval_limit
        picked = files[:limit_here] if files and limit_here else files
        res = evaluate(source, folder, batch_size=batch_size, files=picked,
                       limit=eval_limit if files is None else None)
        evals[data] = {k: getattr(res, k) for k in ("wer", "rare_wer", "common_wer", "utterances", "words",
                                                    "rare_words", "seconds")}
        evals[data]["hypotheses"] = res.hypotheses
        print(f"  {model} {variant} {data}: WER {res.wer:.2f} rare-WER {res.rare_wer:.2f} "
              f"common-WER {res.common_wer:.2f} ({res.seconds:.0f} s)", flush=True)
    row["eval"] = evals
    return row


def references(data: str) -> dict[str, str]:
    folder = SPEECH / ("ljspeech-385" if data.startswith("ljspeech") else data)
    from tarq.audio import read_transcripts

    return read_transcripts(folder / "transcripts.tsv")


def paired_delta(a: dict, b: dict, data: str, n_boot: int = 2000, seed: int = 0) -> tuple[float, float, float] | None:
    """rare-WER(b) - rare-WER(a) in points with a 95% bootstrap interval over utterances (paired: the
    same utterances are resampled for both), so that a gap of one or two rare words is not read as a win."""
    import numpy as np

    from tarq.metrics import score

    ha, hb = a["eval"][data]["hypotheses"], b["eval"][data]["hypotheses"]
    refs = references(data)
    names = [n for n in ha if n in hb]
    per = []
    for n in names:
        sa, sb = score([refs[n]], [ha[n]]), score([refs[n]], [hb[n]])
        per.append((sa.rare_words, sa.rare_errors, sb.rare_errors))
    arr = np.array(per, dtype=float)
    if arr[:, 0].sum() == 0:
        return None
    point = 100 * (arr[:, 2].sum() - arr[:, 1].sum()) / arr[:, 0].sum()
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(arr), size=(n_boot, len(arr)))
    w, ea, eb = arr[idx, 0].sum(1), arr[idx, 1].sum(1), arr[idx, 2].sum(1)
    ok = w > 0
    deltas = 100 * (eb[ok] - ea[ok]) / w[ok]
    return point, float(np.percentile(deltas, 2.5)), float(np.percentile(deltas, 97.5))


def fmt(v) -> str:
    return "-" if v is None else f"{v:.2f}"


def write_report(rows: list[dict], args) -> None:
    sets = ["commonvoice-en-100", "ljspeech-holdout"]
    lines = ["# Quality: WER / rare-WER / common-WER (%), W4G128", "",
             f"Command: `python bench/quality.py {' '.join(sys.argv[1:])}`".rstrip(), "",
             (f"Calibration: {args.calib_n} LJSpeech clips (seed {args.seed}); evaluation never on calibration clips. "
             "Greedy English decoding, Whisper's English normalizer, rare = wordfreq Zipf < 3."), ""]
    head = "| model | variant | quantize s | " + " | ".join(f"{s} WER | {s} rare-WER | {s} common-WER" for s in sets) + " |"
    lines += [head, "|" + "---|" * (3 + 3 * len(sets))]
    for r in rows:
        cells = [r["model"], r["variant"], str(r.get("quantize_seconds", "-"))]
        for s in sets:
            e = r["eval"].get(s, {})
            cells += [fmt(e.get("wer")), fmt(e.get("rare_wer")), fmt(e.get("common_wer"))]
        lines.append("| " + " | ".join(cells) + " |")
    if rows:
        e0 = rows[0]["eval"]
        lines += ["", "Words scored: " + ", ".join(f"{s}: {e0[s]['utterances']} utterances, {e0[s]['words']} words, "
                                                   f"{e0[s]['rare_words']} rare" for s in sets if s in e0)]
    by = {(r["model"], r["variant"]): r for r in rows}
    pairs = [(m, a, b) for (m, b) in by for a in ("gptq", "fp") if b.startswith("tarq") and (m, a) in by]
    if pairs:
        lines += ["", ("Paired rare-WER difference, TARQ variant minus baseline, points (95% bootstrap interval "
                      "over utterances; an interval that holds 0 is no evidence either way):"), "",
                  "| model | variant | vs | " + " | ".join(sets) + " |", "|---|---|---|" + "---|" * len(sets)]
        for m, a, b in pairs:
            cells = []
            for s in sets:
                d = paired_delta(by[(m, a)], by[(m, b)], s) if s in by[(m, b)]["eval"] else None
                cells.append("-" if d is None else f"{d[0]:+.2f} [{d[1]:+.2f}, {d[2]:+.2f}]")
            lines.append(f"| {m} | {b} | {a} | " + " | ".join(cells) + " |")
    for r in rows:
        if r["variant"] == "tarq" and r.get("layers"):
            lams = [x["lambda"] for x in r["layers"] if ".decoder." in x["name"]]
            alphas = [x["alpha"] for x in r["layers"] if x.get("alpha") is not None]
            lines += ["", (f"{r['model']} TARQ per-layer report: decoder lambda {min(lams):.2f}..{max(lams):.2f}, "
                          f"alpha {min(alphas):.3f}..{max(alphas):.3f}; calibration {r['calibration']}")]
    (RESULTS / f"quality{suffix(args)}.md").write_text("\n".join(lines) + "\n")
    plot(rows, sets, RESULTS / f"quality{suffix(args)}.png")


def suffix(args) -> str:
    return f"-{args.tag}" if args.tag else ""


def result_path(model: str, variant: str, calib_n: int, seed: int, args) -> Path:
    """Where one (model, variant, calibration draw) result is cached; FP is shared across tags."""
    return RESULTS / "quality" / (
        f"{model}-{variant}-n{calib_n}-s{seed}-l{args.eval_limit or 'all'}-h{args.holdout_limit or 'all'}"
        f"{'-bf16' if args.cpu_bf16 else ''}{suffix(args) if variant != 'fp' else ''}.json")


def plot(rows: list[dict], sets: list[str], out: Path) -> None:
    """One panel per (model, data set); variants more than 3x FP's WER are left out (named in the title)
    so that one broken variant does not squash the rest."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(len(models), len(sets), figsize=(6 * len(sets), 4.5 * len(models)), squeeze=False)
    for i, model in enumerate(models):
        mine = [r for r in rows if r["model"] == model]
        for ax, s in zip(axes[i], sets):
            fp = next((r["eval"][s]["wer"] for r in mine if r["variant"] == "fp" and s in r["eval"]), None)
            left_out = []
            for r in mine:
                e = r["eval"].get(s)
                if not e or e.get("wer") is None or e.get("rare_wer") is None:
                    continue
                if fp and e["wer"] > 3 * fp:
                    left_out.append(r["variant"])
                    continue
                ax.scatter(e["wer"], e["rare_wer"])
                ax.annotate(r["variant"], (e["wer"], e["rare_wer"]), fontsize=8, xytext=(3, 3),
                            textcoords="offset points")
            ax.set_xlabel("WER %")
            ax.set_ylabel("rare-WER %")
            ax.set_title(f"{model} on {s}" + (f" (off scale: {', '.join(left_out)})" if left_out else ""),
                         fontsize=9)
            ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="whisper-tiny.en,whisper-base")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--calib-n", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--eval-limit", type=int, default=None, help="first N clips of each eval set (quick runs)")
    ap.add_argument("--holdout-limit", type=int, default=None,
                    help="first N held-out LJSpeech clips (sorted by name) instead of all")
    ap.add_argument("--report-only", action="store_true", help="only tabulate results already cached")
    ap.add_argument("--fresh", action="store_true", help="recompute cached results")
    ap.add_argument("--tag", default="", help="cache and report quantized variants apart under this name")
    ap.add_argument("--work", type=Path, default=ROOT / ".cache" / "bench")
    ap.add_argument("--cpu-bf16", action="store_true",
                    help="let int4 models run their dequantized (encoder) matmuls in bf16 where bf16 pays on "
                         "this CPU (TARQ_CPU_BF16=auto), as inference does; off by default so every host scores the "
                         "quantization alone, in fp32 like the FP baseline")
    args = ap.parse_args()

    from tarq.hub import pull
    from tarq.qlinear import QuantLinear

    if not args.cpu_bf16:
        QuantLinear.cpu_dense_dtype = None

    cache = RESULTS / "quality"
    cache.mkdir(parents=True, exist_ok=True)
    calib, audio_only, holdout = split_ljspeech(args.calib_n, args.seed, args.work)
    rows = []
    for model in args.models.split(","):
        model_dir = None if args.report_only else pull(model)
        for variant in args.variants.split(","):
            if variant not in VARIANTS:
                raise SystemExit(f"unknown variant {variant!r}; known: {', '.join(VARIANTS)}")
            key = result_path(model, variant, args.calib_n, args.seed, args)
            if key.exists() and not args.fresh:
                rows.append(json.loads(key.read_text()))
                print(f"  {model} {variant}: cached", flush=True)
                continue
            if args.report_only:
                continue
            t = time.perf_counter()
            row = run_variant(model, model_dir, variant, calib, audio_only, holdout, args.work,
                              args.batch_size, args.eval_limit, args.holdout_limit)
            row["wall_seconds"] = round(time.perf_counter() - t, 1)
            key.write_text(json.dumps(row, indent=1))
            rows.append(row)
            write_report(rows, args)
    if not rows:
        raise SystemExit(f"no results for these settings in {cache} (they are cached per calibration size, "
                         "seed, eval and hold-out limits, e.g. --holdout-limit 100 for the README's runs)")
    write_report(rows, args)
    print((RESULTS / f"quality{suffix(args)}.md").read_text())


if __name__ == "__main__":
    main()
