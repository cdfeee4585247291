"""One transcription request as the service runs it (tarq.transcribe.transcribe: segments, language,
no-speech probability), with the encoder's output shared or not.

    python bench/request.py                                   # whisper-base and tiny.en, 12 clips each
    python bench/request.py --models whisper-base --clips 24 --long-seconds 120

For each model and clip, times `transcribe(..., share_encoder=False)` (transformers' language detection,
`generate` and the no-speech step each run the encoder) and `share_encoder=True` (one pass per window,
read by all three; generate reuses the first decoder step's cross-attention keys and values), in
alternating order, counts the windows each encoded and those whose cross-attention keys and values the
decoder computed, and checks that both give the same transcript. Then the same for one long-form
request: the clips joined into `--long-seconds` of audio. Writes bench/results/request.md and .json.
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


def same_transcript(a: dict, b: dict, tol: float = 1e-4) -> bool:
    """Equal text, segments, words and language; no-speech probabilities within `tol` (long-form computes
    them a window at a time when shared, all windows in one batch otherwise: float32 sums differ in the
    last digits)."""
    def strip(t: dict) -> dict:
        return {**t, "segments": [{**s, "no_speech_prob": None} for s in t["segments"]]}

    close = all(abs(x["no_speech_prob"] - y["no_speech_prob"]) <= tol for x, y in zip(a["segments"], b["segments"]))
    return close and strip(a) == strip(b)


def measure(name: str, clips: list[Path], dtype: str, long_seconds: float = 0.0) -> dict:
    """Both settings on each clip and, if `long_seconds`, on the clips joined into one request."""
    import numpy as np

    from tarq.audio import load_audio
    from tarq.hub import pull
    from tarq.transcribe import dtype_name, load, transcribe

    model, processor = load(name if Path(name).is_dir() else str(pull(name)), dtype=dtype)
    # clip windows through the encoder, and windows whose cross-attention keys and values the decoder
    # computed (every decoder layer projects all 1500 frames; layer 0 counts), a batched call counting each
    encoded, cross = [0], [0]
    # (the encoder's first layer, which an encoding handed back to generate does not run)
    model.get_encoder().conv1.register_forward_hook(lambda _m, args, _o: encoded.__setitem__(0, encoded[0] + len(args[0])))
    model.get_decoder().layers[0].encoder_attn.k_proj.register_forward_hook(
        lambda _m, args, _o: cross.__setitem__(0, cross[0] + len(args[0])))
    audios = [load_audio(c) for c in clips]
    requests = [(c.name, a) for c, a in zip(clips, audios)]
    if long_seconds:
        joined, n = [], 0
        while sum(len(a) for a in joined) < long_seconds * 16000:
            joined.append(audios[n % len(audios)])
            n += 1
        requests.append((f"{n} clips joined", np.concatenate(joined)))
    transcribe(model, processor, audios[0])  # warm-up: kernel layouts, allocator
    rows = []
    for i, (label, audio) in enumerate(requests):
        row = {"clip": label, "seconds_audio": len(audio) / 16000, "long_form": len(audio) > 30 * 16000}
        for share in ((False, True) if i % 2 == 0 else (True, False)):
            encoded[0] = cross[0] = 0
            start = time.perf_counter()
            out = transcribe(model, processor, audio, share_encoder=share)
            row["shared" if share else "separate"] = {"seconds": time.perf_counter() - start,
                                                      "windows_encoded": encoded[0], "cross_kv": cross[0],
                                                      "transcript": out.to_dict()}
        row["same"] = same_transcript(row["shared"]["transcript"], row["separate"]["transcript"])
        for key in ("shared", "separate"):  # the .json keeps the text; tokens and timings were compared above
            row[key]["transcript"] = {"text": row[key]["transcript"]["text"],
                                      "segments": len(row[key]["transcript"]["segments"])}
        rows.append(row)
    return {"model": Path(name).name, "multilingual": bool(getattr(model.generation_config, "lang_to_id", None)),
            "dtype": dtype_name(model.dtype), "clips": rows}


def summary(model: dict, rows: list[dict], what: str) -> list[str]:
    sep = [c["separate"]["seconds"] for c in rows]
    shr = [c["shared"]["seconds"] for c in rows]
    audio = sum(c["seconds_audio"] for c in rows)
    counts = lambda key, what: "/".join(sorted({str(c[key][what]) for c in rows}))
    return [model["model"], model["dtype"], "yes" if model["multilingual"] else "no",
            f"{what}: {len(rows)} / {audio:.0f} s", counts("separate", "windows_encoded"),
            counts("shared", "windows_encoded"), counts("separate", "cross_kv"), counts("shared", "cross_kv"),
            f"{statistics.mean(sep):.2f}", f"{statistics.mean(shr):.2f}", f"{sum(sep) / sum(shr):.2f}x",
            f"{sum(c['same'] for c in rows)} / {len(rows)}"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="whisper-base,whisper-tiny.en", help="comma list: cached names or folders")
    ap.add_argument("--audio", type=Path, default=SPEECH / "commonvoice-en-100")
    ap.add_argument("--clips", type=int, default=12)
    ap.add_argument("--long-seconds", type=float, default=120.0, help="one long-form request this long (0: none)")
    ap.add_argument("--dtype", default="float32",
                    help="as `tarq transcribe --dtype` (float32 computes alike on every host; the service runs auto)")
    ap.add_argument("--out", type=Path, default=RESULTS / "request.md")
    args = ap.parse_args()

    clips = sorted(p for p in args.audio.iterdir() if p.suffix in (".flac", ".wav", ".mp3"))[:args.clips]
    results = [measure(m, clips, args.dtype, args.long_seconds) for m in args.models.split(",")]

    out = []
    for r in results:
        short = [c for c in r["clips"] if not c["long_form"]]
        long = [c for c in r["clips"] if c["long_form"]]
        out.append(summary(r, short, "clips"))
        if long:
            out.append(summary(r, long, "long-form"))
    lines = ["# One transcription request: the encoder's output shared or not", "",
             f"Command: `python bench/request.py {' '.join(sys.argv[1:])}`", "",
             f"Run: {environment('cpu')}.", "",
             (f"Requests: the first {args.clips} clips of {args.audio.name}, one request each, then those clips "
             f"joined into one request of at least {args.long_seconds:g} s (long-form decoding), through "
             "tarq.transcribe.transcribe as the worker and `tarq transcribe` call it: timestamps, language "
             "detection on multilingual models, no-speech probability. Both settings per request in "
             "alternating order after one warm-up. Windows encoded: 30 s windows through the encoder per "
             "request (each clip of a batched call counts). Cross k/v: windows whose cross-attention keys and "
             "values the decoder computed (each layer projects the window's 1500 encoder frames)."), ""]
    lines += table(["model", "dtype", "multilingual", "requests / audio", "windows encoded, separate",
                    "windows encoded, shared", "cross k/v, separate", "cross k/v, shared", "s / request, separate",
                    "s / request, shared", "speed-up", "same transcript"], out)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    args.out.with_suffix(".json").write_text(json.dumps({"args": vars(args), "results": results}, indent=1,
                                                        default=str))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
