"""What temperature fallback (openai/whisper's; off in tarq unless asked for) does on real speech: which
windows it decodes again, the words it changes, and what it costs.

    python bench/fallback.py                                   # whisper-tiny.en, whisper-base, tiny.en RTN int4
    python bench/fallback.py --models whisper-base --clips 20  # quicker

Every request goes through tarq.transcribe.transcribe three ways (as the service and `tarq transcribe` run
it: timestamps, English, float32): greedy (tarq's default), and with the fallback
(`temperature_increment=0.2`) keeping, where every attempt fails, the last attempt (openai/whisper's
choice and tarq's) or the likeliest that does not loop (faster-whisper's). A window is decoded again at 0.2, 0.4, ... 1.0 when its text
compresses by more than 2.4 (a loop) or its tokens average a log-probability below -1.0, unless it is
silent. Requests: the first --clips of commonvoice-en-100 and of ljspeech-385, the first --noisy LJSpeech
clips with white noise as loud as the speech (SNR 0 dB, seed 0: where Whisper is unsure), and --joined
long-form requests of 8 consecutive LJSpeech clips each (one reading, ~1 min: timestamp-driven windows).
Scored WER / rare-WER; writes bench/results/fallback.md and .json.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from quality import SPEECH, fmt
from silence import model_options, model_sources, save
from speed import RESULTS, environment, table

SETS = ("commonvoice-en-100", "ljspeech-385")
WAYS = ("greedy", "last", "best")


def requests(clips: int, noisy: int, joined: int) -> dict[str, tuple[dict, dict]]:
    """{set: ({request: audio}, {request: reference})}."""
    import numpy as np

    from tarq.audio import load_audio
    from tarq.evaluate import references

    out = {}
    for name in SETS:
        refs = references(SPEECH / name, limit=clips)
        out[name] = ({f: load_audio(SPEECH / name / f) for f in refs}, refs)
    if noisy:
        rng = np.random.default_rng(0)
        refs = references(SPEECH / SETS[1], limit=noisy)
        audios = {}
        for f in refs:
            clean = load_audio(SPEECH / SETS[1] / f)
            audios[f] = (clean + rng.standard_normal(clean.size) * np.sqrt(np.mean(clean ** 2))).astype(np.float32)
        out["ljspeech + white noise, SNR 0 dB"] = (audios, refs)
    if joined:
        refs = references(SPEECH / SETS[1], limit=8 * joined)
        names = sorted(refs)
        audios, texts = {}, {}
        for i in range(joined):
            group = names[8 * i: 8 * i + 8]
            key = f"{group[0]}..{group[-1]}"
            audios[key] = np.concatenate([load_audio(SPEECH / SETS[1] / f) for f in group])
            texts[key] = " ".join(refs[f] for f in group)
        out["ljspeech, 8 clips joined"] = (audios, texts)
    return out


def measure(label: str, source: str, sets: dict) -> dict:
    from tarq import fallback
    from tarq.evaluate import score_hypotheses
    from tarq.transcribe import load, transcribe

    rules: list = []  # every Rule one way ran, for its windows and attempts

    def keeping(keep: str):
        class Counted(fallback.Rule):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **{**kwargs, "keep": keep})
                rules.append(self)
        return mock.patch.object(fallback, "Rule", Counted)

    model, processor = load(source, dtype="float32")
    transcribe(model, processor, next(iter(next(iter(sets.values()))[0].values())))  # warm-up, untimed
    out: dict = {"model": label, "sets": {}}
    for name, (audios, refs) in sets.items():
        row: dict = {"requests": len(audios)}
        texts: dict[str, dict[str, str]] = {}
        for way in WAYS:
            rules.clear()
            start = time.perf_counter()
            with keeping("best" if way == "best" else "last"):
                texts[way] = {f: transcribe(model, processor, a, language="en",
                                            temperature_increment=None if way == "greedy" else 0.2).text
                              for f, a in audios.items()}
            row[f"{way}_seconds"] = time.perf_counter() - start
            s = score_hypotheses(refs, texts[way])
            row[f"{way}_wer"], row[f"{way}_rare_wer"] = s.wer, s.rare_wer
            if way != "greedy":
                attempts = [n for r in rules for n in r.attempts.values()]
                row[f"{way}_windows"], row[f"{way}_retried"] = len(attempts), sum(n > 1 for n in attempts)
                row[f"{way}_attempts"] = sum(attempts)
                row[f"{way}_changed"] = [f for f in audios if texts[way][f] != texts["greedy"][f]]
                row[f"{way}_kept_hot"] = sum(t > 0 for r in rules for t in r.used.values())
        row["examples"] = [{"request": f, "reference": refs[f], **{w: texts[w][f] for w in WAYS}}
                           for f in row["last_changed"][:4]]
        out["sets"][name] = row
        print(f"  {label} {name}: WER greedy {row['greedy_wer']:.2f} last {row['last_wer']:.2f} best "
              f"{row['best_wer']:.2f}; retried {row['last_retried']} of {row['last_windows']} windows", flush=True)
    return out


def report(results: list[dict], command: str) -> str:
    lines = ["# Temperature fallback (openai/whisper's rule) on real speech", "", f"Command: `{command}`", "",
             environment("cpu"), "",
             "Each request transcribed greedy (tarq's default), and with the fallback keeping, where every "
             "attempt fails, the last attempt (openai/whisper's choice and tarq's) or the likeliest that does not "
             "loop (faster-whisper's); float32, English, timestamps. "
             "WER / rare-WER in percent; retried: windows decoded more than once, of all windows; changed: "
             "requests whose text differs from greedy; time: seconds for all requests of the row, greedy -> "
             "with the fallback.", ""]
    rows = []
    for r in results:
        for name, s in r["sets"].items():
            rows.append([r["model"], name, str(s["requests"]),
                         *(f"{fmt(s[f'{w}_wer'])} / {fmt(s[f'{w}_rare_wer'])}" for w in WAYS),
                         f"{s['last_retried']} of {s['last_windows']}", str(len(s["last_changed"])),
                         f"{s['last_attempts'] - s['last_windows']}",
                         f"{s['greedy_seconds']:.0f} -> {s['last_seconds']:.0f} s"])
    lines += table(["model", "set", "requests", "greedy", "fallback (last kept)", "fallback (likeliest kept)",
                    "retried", "changed", "extra decodes", "time"], rows)
    lines += ["", "Requests whose text the fallback changed (first four per row): reference, greedy, last kept, "
              "likeliest kept.", ""]
    for r in results:
        for name, s in r["sets"].items():
            for e in s["examples"]:
                lines.append(f"- {r['model']}, {name}, `{e['request']}`: {e['reference']!r} | greedy "
                             f"{e['greedy']!r} | last {e['last']!r} | likeliest {e['best']!r}")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    model_options(ap)
    ap.add_argument("--clips", type=int, default=100)
    ap.add_argument("--noisy", type=int, default=50, help="LJSpeech clips with white noise as loud as the speech")
    ap.add_argument("--joined", type=int, default=6, help="long-form requests of 8 LJSpeech clips each")
    ap.add_argument("--out", type=Path, default=RESULTS / "fallback.md")
    args = ap.parse_args()
    if not (SPEECH / SETS[0]).is_dir():
        sys.exit(f"no speech at {SPEECH} (TARQ_SPEECH_DIR)")
    from tarq.cli_transcribe import _quiet_transformers

    _quiet_transformers()
    sets = requests(args.clips, args.noisy, args.joined)
    results = [measure(label, source, sets) for label, source in model_sources(args.models, args.work)]
    save(args.out, report(results, " ".join(["python bench/fallback.py", *sys.argv[1:]])), results)


if __name__ == "__main__":
    main()
