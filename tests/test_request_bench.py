"""bench/request.py on the tiny random Whisper: both settings run, are compared and counted. No timing is
asserted (the benchmark reports, it never judges)."""
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_request_bench_runs_both_settings(short_whisper_dir, tmp_path, tone_wav):
    spec = importlib.util.spec_from_file_location("bench_request", ROOT / "bench" / "request.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    clips = [tone_wav(tmp_path / f"tone{i}.wav", seconds) for i, seconds in enumerate((2.0, 5.0))]
    result = bench.measure(str(short_whisper_dir), clips, "float32", long_seconds=33)
    assert result["model"] == "tiny-whisper" and not result["multilingual"] and result["dtype"] == "float32"
    assert [c["clip"] for c in result["clips"]] == ["tone0.wav", "tone1.wav", "10 clips joined"]
    assert [c["long_form"] for c in result["clips"]] == [False, False, True]
    assert [c["seconds_audio"] for c in result["clips"]] == [2.0, 5.0, 35.0]
    for c in result["clips"]:
        assert c["same"], c
        assert c["shared"]["windows_encoded"] >= 1 and c["separate"]["windows_encoded"] >= 1
        assert c["shared"]["cross_kv"] >= c["shared"]["windows_encoded"]  # each window decoded at least once
        assert c["shared"]["seconds"] > 0
    assert "long-form: 1 / 35 s" in bench.summary(result, result["clips"][2:], "long-form")
