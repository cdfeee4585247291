"""bench/dtype.py on the tiny random Whisper: its TARQ artifact is made once, both dtypes run on every set
and the table compares them. No accuracy or timing is asserted (the benchmark reports, it never judges)."""
import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_dtype_bench_evaluates_both_dtypes(short_whisper_dir, tmp_path, tone_wav):
    spec = importlib.util.spec_from_file_location("bench_dtype", ROOT / "bench" / "dtype.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    for i, seconds in enumerate((1.5, 3.0)):
        tone_wav(tmp_path / f"tone{i}.wav", seconds, hz=220.0 * (i + 1))
    (tmp_path / "transcripts.tsv").write_text("tone0.wav\thello Zebulon\ntone1.wav\thello Zebulon\n")
    sets = {"all": (tmp_path, None), "one": (tmp_path, ["tone1.wav"])}
    artifact = bench.quantized(str(short_whisper_dir), tmp_path, tmp_path / "artifacts", batch_size=2)
    assert artifact == tmp_path / "artifacts" / "tiny-whisper-tarq"
    report = json.loads((artifact / "tarq_report.json").read_text())
    assert report["config"]["method"] == "tarq" and report["calibration"]["clips"] == 2
    made = (artifact / "tarq_report.json").stat().st_mtime_ns
    assert bench.quantized(str(short_whisper_dir), tmp_path, tmp_path / "artifacts", batch_size=2) == artifact
    assert (artifact / "tarq_report.json").stat().st_mtime_ns == made  # reused, not quantized again
    result = bench.measure(str(artifact), sets, batch_size=2)
    assert result["model"] == "tiny-whisper-tarq"
    for label, clips in (("all", 2), ("one", 1)):
        for dtype in ("float32", "bfloat16"):
            got = result["sets"][label][dtype]
            assert got["utterances"] == clips and len(got["hypotheses"]) == clips
            assert got["rare_words"] == clips  # "Zebulon", once per clip
            assert got["seconds"] > 0
    rows = bench.rows(result)
    assert [r[1] for r in rows] == ["all", "one"]
    assert rows[1][2] == "1" and rows[1][-1].endswith("/ 1")
