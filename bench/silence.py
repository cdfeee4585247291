"""What leaving out silent windows (openai/whisper's no-speech rule, tarq.transcribe's default) does: the
text Whisper makes up on audio without speech, and what it costs on real speech.

    python bench/silence.py                                   # whisper-tiny.en, whisper-base, tiny.en RTN int4
    python bench/silence.py --models whisper-base --clips 20  # quicker

Every clip is transcribed twice through tarq.transcribe.transcribe (as the service and `tarq transcribe`
run it: timestamps, English, greedy, float32), with the rule (no-speech probability > 0.6 and mean token
log-probability < -1.0: the window's text is left out) and without it (`no_speech_threshold=None`).
Real speech: the first --clips of commonvoice-en-100 and of ljspeech-385, scored (WER / rare-WER) both
ways. Without speech: digital silence, low and loud white noise (8 s each, seed 0) and 70 s of silence
(three windows, long-form): the words each produces both ways. Writes bench/results/silence.md and .json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from quality import SPEECH
from speed import RESULTS, environment, table

SETS = ("commonvoice-en-100", "ljspeech-385")


def non_speech() -> dict:
    import numpy as np

    rng = np.random.default_rng(0)
    sr = 16000
    return {"silence 8 s": np.zeros(8 * sr, np.float32),
            "white noise 8 s, rms 0.01": (rng.standard_normal(8 * sr) * 0.01).astype(np.float32),
            "white noise 8 s, rms 0.2": (rng.standard_normal(8 * sr) * 0.2).astype(np.float32),
            "silence 70 s": np.zeros(70 * sr, np.float32)}


def rtn_model(name: str, work: Path) -> Path:
    from tarq.config import QuantConfig
    from tarq.hub import pull
    from tarq.pipeline import quantize_model

    out = work / f"{name}-rtn"
    if not (out / "tarq_report.json").is_file():
        quantize_model(pull(name), None, out, QuantConfig(method="rtn"))
    return out


def model_options(ap: argparse.ArgumentParser) -> None:
    """--models and --work, as model_sources() reads them (bench/fallback.py takes the same)."""
    ap.add_argument("--models", default="whisper-tiny.en,whisper-base,whisper-tiny.en:rtn",
                    help="cached short names or folders; NAME:rtn quantizes NAME with RTN first")
    ap.add_argument("--work", type=Path, default=ROOT / ".cache" / "bench-silence", help="where NAME:rtn is kept")


def save(out: Path, text: str, results: list[dict]) -> None:
    """The report at `out`, its results beside it as .json, and the report on stdout."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    print(text)


def model_sources(models: str, work: Path) -> list[tuple[str, str]]:
    """(label, source) per comma-separated spec: a cached short name or a folder; NAME:rtn is NAME quantized
    with RTN first (under `work`)."""
    from tarq.hub import pull

    out = []
    for spec in models.split(","):
        name, _, how = spec.partition(":")
        source = str(rtn_model(name, work)) if how == "rtn" else name if Path(name).is_dir() else str(pull(name))
        out.append((f"{Path(name).name}{' RTN int4' if how == 'rtn' else ''}", source))
    return out


def measure(label: str, source: str, clips: int, sets: dict[str, Path] | None = None) -> dict:
    """Both ways on the first `clips` of each set ({name: folder with transcripts.tsv}; default SETS under
    the speech folder) and on `non_speech()`."""
    from tarq.audio import load_audio
    from tarq.evaluate import references, score_hypotheses
    from tarq.transcribe import load, transcribe

    model, processor = load(source, dtype="float32")
    out: dict = {"model": label, "sets": {}, "non_speech": {}}
    for name, folder in (sets or {name: SPEECH / name for name in SETS}).items():
        refs = references(folder, limit=clips)
        hyps: dict[str, dict[str, str]] = {"off": {}, "on": {}}
        start = time.perf_counter()
        for f in refs:
            audio = load_audio(folder / f)
            hyps["off"][f] = transcribe(model, processor, audio, language="en", no_speech_threshold=None).text
            hyps["on"][f] = transcribe(model, processor, audio, language="en").text
        scores = {k: score_hypotheses(refs, h) for k, h in hyps.items()}
        out["sets"][name] = {
            "clips": len(refs), "seconds": time.perf_counter() - start,
            **{f"{k}_{m}": getattr(s, m) for k, s in scores.items() for m in ("wer", "rare_wer")},
            "changed": [f for f in refs if hyps["off"][f] != hyps["on"][f]],
            "emptied": [f for f in refs if hyps["off"][f].strip() and not hyps["on"][f].strip()],
        }
        print(f"  {label} {name}: WER {scores['off'].wer:.2f} -> {scores['on'].wer:.2f}, "
              f"{len(out['sets'][name]['changed'])} changed", flush=True)
    for name, audio in non_speech().items():
        texts = {k: transcribe(model, processor, audio, language="en",
                               **({} if k == "on" else {"no_speech_threshold": None})).text for k in ("off", "on")}
        out["non_speech"][name] = texts
        print(f"  {label} {name}: {texts['off']!r} -> {texts['on']!r}", flush=True)
    return out


def report(results: list[dict], command: str) -> str:
    lines = ["# Silent windows left out (openai/whisper's no-speech rule)", "", f"Command: `{command}`", "",
             environment("cpu"), "",
             "Real speech, each clip transcribed without the rule and with it (float32, greedy, English, "
             "timestamps): WER / rare-WER in percent; changed: clips whose text differs; emptied: clips left "
             "with no text.", ""]
    rows = []
    for r in results:
        for name, s in r["sets"].items():
            rows.append([r["model"], name, str(s["clips"]), f"{s['off_wer']:.2f} / {s['off_rare_wer']:.2f}",
                         f"{s['on_wer']:.2f} / {s['on_rare_wer']:.2f}", str(len(s["changed"])),
                         str(len(s["emptied"]))])
    lines += table(["model", "set", "clips", "without the rule", "with it", "changed", "emptied"], rows)
    lines += ["", "Audio without speech: the text each model makes of it without the rule -> with it.", ""]
    rows = []
    for r in results:
        for name, t in r["non_speech"].items():
            rows.append([r["model"], name, repr(t["off"]), repr(t["on"])])
    lines += table(["model", "audio", "without the rule", "with it"], rows)
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    model_options(ap)
    ap.add_argument("--clips", type=int, default=100)
    ap.add_argument("--out", type=Path, default=RESULTS / "silence.md")
    args = ap.parse_args()
    if not (SPEECH / SETS[0]).is_dir():
        sys.exit(f"no speech at {SPEECH} (TARQ_SPEECH_DIR)")
    from tarq.cli_transcribe import _quiet_transformers

    _quiet_transformers()
    results = [measure(label, source, args.clips) for label, source in model_sources(args.models, args.work)]
    save(args.out, report(results, " ".join(["python bench/silence.py", *sys.argv[1:]])), results)


if __name__ == "__main__":
    main()
