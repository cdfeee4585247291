"""bench/silence.py on the tiny random Whisper: every clip and every non-speech sound is transcribed both
ways and the report has a row for each. No outcome is asserted beyond what the rule can do (the benchmark
reports, it never judges)."""
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_silence_bench_transcribes_everything_both_ways(short_whisper_dir, tmp_path, tone_wav):
    spec = importlib.util.spec_from_file_location("bench_silence", ROOT / "bench" / "silence.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    for i, seconds in enumerate((1.5, 3.0, 2.0)):
        tone_wav(tmp_path / f"tone{i}.wav", seconds, hz=220.0 * (i + 1))
    (tmp_path / "transcripts.tsv").write_text("".join(f"tone{i}.wav\thello Zebulon\n" for i in range(3)))
    result = bench.measure("tiny", str(short_whisper_dir), clips=2, sets={"tones": tmp_path})
    got = result["sets"]["tones"]
    assert got["clips"] == 2 and got["seconds"] > 0
    assert set(got["emptied"]) <= set(got["changed"]) <= {"tone0.wav", "tone1.wav"}
    assert got["on_wer"] is not None and got["off_wer"] is not None
    assert set(result["non_speech"]) == set(bench.non_speech())
    for texts in result["non_speech"].values():
        assert set(texts) == {"off", "on"}
        # leaving windows out only ever removes words
        assert set(texts["on"].split()) <= set(texts["off"].split())
    report = bench.report([result], "python bench/silence.py --models tiny")
    assert "| tiny | tones | 2 |" in report
    assert sum(line.startswith("| tiny |") for line in report.splitlines()) == 1 + len(bench.non_speech())
