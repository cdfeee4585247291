"""One transcription request as the service runs it (tarq.transcribe.transcribe: segments, language,
no-speech probability), with the clip's encoder pass shared or not.

    python bench/request.py                                   # whisper-base and tiny.en, 12 clips each
    python bench/request.py --models whisper-base --clips 24 --dtype float32

For each model and clip, times `transcribe(..., share_encoder=False)` (transformers' language detection,
`generate` and the no-speech step each run the encoder) and `share_encoder=True` (one pass, read by all
three), in alternating order, counts the encoder passes of each, and checks that both give the same
transcript. Writes bench/results/request.md and .json.
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
from speed import RESULTS, SPEECH, environment, table


def measure(name: str, clips: list[Path], dtype: str) -> dict:
    from tarq.audio import load_audio
    from tarq.hub import pull
    from tarq.transcribe import load, transcribe

    model, processor = load(name if Path(name).is_dir() else str(pull(name)), dtype=dtype)
    passes = [0]
    model.get_encoder().register_forward_hook(lambda *_: passes.__setitem__(0, passes[0] + 1))
    audios = [load_audio(c) for c in clips]
    transcribe(model, processor, audios[0])  # warm-up: kernel layouts, allocator
    rows = []
    for i, (clip, audio) in enumerate(zip(clips, audios)):
        row = {"clip": clip.name, "seconds_audio": len(audio) / 16000}
        order = (False, True) if i % 2 == 0 else (True, False)
        for share in order:
            passes[0] = 0
            start = time.perf_counter()
            out = transcribe(model, processor, audio, share_encoder=share)
            key = "shared" if share else "separate"
            row[key] = {"seconds": time.perf_counter() - start, "encoder_passes": passes[0],
                        "transcript": out.to_dict()}
        row["same"] = row["shared"]["transcript"] == row["separate"]["transcript"]
        rows.append(row)
    return {"model": Path(name).name, "multilingual": bool(getattr(model.generation_config, "lang_to_id", None)),
            "dtype": str(next(model.parameters()).dtype).replace("torch.", ""), "clips": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="whisper-base,whisper-tiny.en", help="comma list: cached names or folders")
    ap.add_argument("--audio", type=Path, default=SPEECH / "commonvoice-en-100")
    ap.add_argument("--clips", type=int, default=12)
    ap.add_argument("--dtype", default="float32", help="as `tarq transcribe --dtype` (float32: the service default)")
    ap.add_argument("--out", type=Path, default=RESULTS / "request.md")
    args = ap.parse_args()

    clips = sorted(p for p in args.audio.iterdir() if p.suffix in (".flac", ".wav", ".mp3"))[:args.clips]
    results = [measure(m, clips, args.dtype) for m in args.models.split(",")]

    out = []
    for r in results:
        sep = [c["separate"]["seconds"] for c in r["clips"]]
        shr = [c["shared"]["seconds"] for c in r["clips"]]
        audio = sum(c["seconds_audio"] for c in r["clips"])
        passes = lambda key: "/".join(sorted({str(c[key]["encoder_passes"]) for c in r["clips"]}))  # noqa: E731
        out.append([r["model"], r["dtype"], "yes" if r["multilingual"] else "no", f"{len(r['clips'])} / {audio:.0f} s",
                    passes("separate"), passes("shared"), f"{statistics.mean(sep):.2f}", f"{statistics.mean(shr):.2f}",
                    f"{sum(sep) / sum(shr):.2f}x", f"{sum(c['same'] for c in r['clips'])} / {len(r['clips'])}"])
    lines = ["# One transcription request: the encoder pass shared or not", "",
             f"Command: `python bench/request.py {' '.join(sys.argv[1:])}`", "",
             f"Run: {environment('cpu')}.", "",
             f"Clips: the first {args.clips} of {args.audio.name}, one request each (tarq.transcribe.transcribe, "
             "as the worker and `tarq transcribe` call it: timestamps, language detection on multilingual "
             "models, no-speech probability); both settings per clip in alternating order after one warm-up.",
             ""]
    lines += table(["model", "dtype", "multilingual", "clips / audio", "encoder passes, separate",
                    "encoder passes, shared", "s / request, separate", "s / request, shared", "speed-up",
                    "same transcript"], out)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    args.out.with_suffix(".json").write_text(json.dumps({"args": vars(args), "results": results}, indent=1,
                                                        default=str))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
