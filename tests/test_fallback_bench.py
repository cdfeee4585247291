"""bench/fallback.py on the tiny random Whisper, where every attempt fails: each request is transcribed the
three ways, every window climbs the whole ladder, and the report has its row. The benchmark reports; what
it measures on real speech is in bench/results/fallback.md."""
import importlib.util
from pathlib import Path

import numpy as np

from tarq.audio import load_audio

ROOT = Path(__file__).resolve().parents[1]


def test_fallback_bench_counts_every_windows_attempts(short_whisper_dir, tmp_path, tone_wav):
    spec = importlib.util.spec_from_file_location("bench_fallback", ROOT / "bench" / "fallback.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    audios = {f"tone{i}.wav": load_audio(tone_wav(tmp_path / f"tone{i}.wav", 1.5 + i, hz=220.0 * (i + 1)))
              for i in range(2)}
    refs = dict.fromkeys(audios, "hello Zebulon")
    result = bench.measure("tiny", str(short_whisper_dir), {"tones": (audios, refs)})
    got = result["sets"]["tones"]
    assert got["requests"] == 2 and all(got[f"{w}_seconds"] > 0 for w in bench.WAYS)
    for way in ("best", "last"):
        windows = got[f"{way}_windows"]
        assert windows >= 2 and got[f"{way}_retried"] == windows and got[f"{way}_attempts"] == 6 * windows
        assert set(got[f"{way}_changed"]) <= set(audios)
    assert all(e["request"] in audios and set(bench.WAYS) <= set(e) for e in got["examples"])
    report = bench.report([result], "python bench/fallback.py --models tiny")
    assert "| tiny | tones | 2 |" in report
    assert np.isfinite(got["greedy_wer"])
