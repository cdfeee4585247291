"""bench/speed.py's measuring functions on the tiny random Whisper: they run, and their numbers are sane.
No timing is asserted (the benchmark reports, it never judges)."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tarq.qlinear import QuantLinear

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def speed():
    spec = importlib.util.spec_from_file_location("bench_speed", ROOT / "bench" / "speed.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


TINY_SHAPE = dict(d_model=128, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                  decoder_attention_heads=2, encoder_ffn_dim=256, decoder_ffn_dim=256, vocab_size=51864,
                  num_mel_bins=80, max_source_positions=1500, max_target_positions=448)


def test_meter_sees_an_allocation():
    """In a fresh process, as the benchmarks measure their jobs: inside a long test session the 64 MiB can
    come from pages the allocator already holds, and RSS does not move."""
    code = ("import json, sys, torch; sys.path.insert(0, 'bench'); import speed\n"
            "with speed.Meter() as m:\n"
            "    x = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched\n"
            "    x += 1\n"
            "print(json.dumps([m.seconds, m.rss_start, m.peak_rss]))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         check=False)
    assert out.returncode == 0, out.stderr
    seconds, rss_start, peak_rss = json.loads(out.stdout.strip().splitlines()[-1])
    assert seconds >= 0 and peak_rss >= rss_start + 32


def test_solver_job_in_its_own_process(speed):
    """The isolated path: a child process runs the job and hands back one JSON line."""
    res = speed.run_job("solver", isolate=True, timeout=300, reps=1, positions=512,
                        shapes={"small [64x256]": [64, 256]})
    assert "error" not in res, res
    row = res["shapes"][0]
    assert row["max_abs_diff"] < 1e-5 and row["textbook_s"] > 0 and row["tarq_s"] > 0
    assert "GPTQ solve" in "\n".join(speed.report_solver(res))


def test_kernels_job_times_every_cpu_path(speed):
    saved = QuantLinear.cpu_kernel_max_rows, QuantLinear.dense_dtype()
    res = speed.job_kernels(rows=(1, 200), reps=1)
    assert (QuantLinear.cpu_kernel_max_rows, QuantLinear.cpu_dense_dtype) == saved  # knobs restored
    assert len(res["layers"]) == 2 * len(speed.KERNEL_SHAPES_BASE)
    for row in res["layers"]:
        taken = {p: v["kernel"] for p, v in row["paths"].items()}
        assert taken["kernel"] == "int4pack-cpu" and taken["dequant"] == "dequant"
        assert taken["dequant-bf16"] == "dequant-bf16"
        assert taken["default"] == ("int4pack-cpu" if row["rows"] == 1 else
                                    "dequant-bf16" if saved[1] is not None else "dequant")
        assert row["float_s"] > 0 and row["dequantize_s"] > 0 and all(v["seconds"] > 0 for v in row["paths"].values())
    assert "One quantized layer per path" in "\n".join(speed.report_kernels(res))


def test_quantize_and_transcribe_jobs(speed, tiny_whisper_dir, calib_dir, tmp_path):
    quant = [speed.job_quantize(str(tiny_whisper_dir), method, str(calib_dir), str(tmp_path / method), calib_n=2,
                                batch_size=2) for method in ("rtn", "gptq")]
    for r in quant:
        assert r["seconds"] > 0 and r["peak_rss_mb"] > 0 and r["peak_cuda_mb"] is None
        assert {"load", "quantize", "save"} <= set(r["stages"])
    assert quant[1]["stages"]["calibrate"] > 0 and quant[1]["calib_n"] == 2

    files = speed.clips(str(calib_dir), 2)
    fp = speed.job_transcribe(str(tiny_whisper_dir), "fp32", files, batch_sizes=(1, 2), max_new_tokens=4)
    q = speed.job_transcribe(quant[1]["artifact"], "int4", files, batch_sizes=(1, 2), max_new_tokens=4)
    for r in (fp, q):
        assert set(r["runs"]) == {"1", "2"} and all(run["rtf"] > 0 for run in r["runs"].values())
        assert len(r["texts"]) == 2
        # every part was timed, and the parts do not overlap: what is left of the wall time is >= 0
        split = r["time_split"]
        assert all(split[k] > 0 for k in ("encoder", "decoder layers", "proj_out")) and split["rest"] >= 0
        assert split["wall"] == pytest.approx(sum(split[k] for k in ("encoder", "decoder layers", "proj_out", "rest")))
    assert all(run["kernels"] == {} for run in fp["runs"].values())
    # decoding rows (one token at a time) take the CPU int4 kernel, the 1500-frame encoder a dequant path
    # (in bf16 where the CPU has bf16 matmuls)
    dense = "dequant-bf16" if QuantLinear.dense_dtype() else "dequant"
    for run in q["runs"].values():
        assert run["kernels"].get("int4pack-cpu", 0) > 0 and run["kernels"].get(dense, 0) > 0
    # W4G128 asymmetric: 4 bits + (32-bit scale + 4-bit zero) / 128 per weight, against 32 bits
    assert 0.12 < q["int4_linear_bytes"] / q["fp_linear_bytes"] < 0.15
    assert q["kernel_cache_bytes"] > 0 and q["model_bytes"] < fp["model_bytes"]

    for r in (fp, q):
        r["base_model"] = "tiny"
    results = {"command": "python bench/speed.py --test", "environment": speed.environment("cpu"),
               "quantize": quant, "transcribe": [fp, q, {"error": "boom", "source": "x", "variant": "int4-dequant"}]}
    out = tmp_path / "speed.md"
    speed.write_report(results, out)
    text = out.read_text()
    assert "| tiny | int4 | 1 |" in text and "failed: boom" in text and "vs GPTQ" in text
    assert "Where batch-1 transcription spends its time" in text
    assert "texts" not in json.loads(out.with_suffix(".json").read_text())["transcribe"][0]


def test_random_large_job_on_a_small_shape(speed):
    r = speed.job_random_large(device="cpu", tokens=3, batch_sizes=(1, 2), reps=1, shape=TINY_SHAPE)
    assert r["random_weights"] and r["shape"]["d_model"] == 128
    for name in ("fp", "int4"):
        for run in r["models"][name]["runs"].values():
            assert run["generate_s"] > 0 and run["encoder_s"] > 0
    assert r["models"]["int4"]["kernels"] and not r["models"]["fp"]["kernels"]
    assert r["int4_bytes"] < r["fp_bytes"]
    assert "RANDOM weights" in "\n".join(speed.report_large([r, {"error": "no GPU", "variant": "compiled"}]))


def test_random_large_compiled_path_traces(speed):
    """The static-cache + torch.compile variant on a small shape, traced by dynamo without codegen."""
    r = speed.job_random_large(device="cpu", variant="compiled", tokens=3, batch_sizes=(1,), reps=1,
                               shape=TINY_SHAPE, compile_backend="eager")
    for name in ("fp", "int4"):
        assert "error" not in r["models"][name], r["models"][name]
        assert r["models"][name]["runs"]["1"]["sequence_length"] >= 3
        assert r["models"][name]["compiled"]
    assert any("(last, per layer)" in k for k in r["models"]["int4"]["kernels"])


def test_main_writes_the_report(speed, tmp_path):
    out = tmp_path / "speed.md"
    speed.main(["--device", "cpu", "--parts", "large", "--no-isolate", "--tokens", "2", "--batch-sizes", "1",
                "--large-shape", json.dumps(TINY_SHAPE), "--out", str(out)])
    text = out.read_text()
    assert "RANDOM weights" in text and "| eager | int4 | 1 |" in text
    res = json.loads(out.with_suffix(".json").read_text())
    assert set(res["large"][0]["models"]) == {"fp", "int4"}


def test_main_quantizes_with_the_passes_and_order_each_method_names(speed, tiny_whisper_dir, calib_dir, tmp_path):
    """--methods gptq,gptq:bfloat16,gptq:layer: float32 passes in block order (the defaults), bf16 passes,
    layer order; every row against the first."""
    out = tmp_path / "speed.md"
    speed.main(["--parts", "quantize", "--models", str(tiny_whisper_dir), "--methods", "gptq,gptq:bfloat16,gptq:layer",
                "--calib", str(calib_dir), "--calib-n", "2", "--no-isolate", "--work", str(tmp_path / "work"),
                "--out", str(out)])
    rows = json.loads(out.with_suffix(".json").read_text())["quantize"]
    assert [(r["method"], r["forward_dtype"], r["sequential"]) for r in rows] == [
        ("gptq", "float32", "block"), ("gptq", "bfloat16", "block"), ("gptq", "float32", "layer")]
    assert len({r["artifact"] for r in rows}) == 3
    text = out.read_text()
    for passes, order in (("float32", "block"), ("bfloat16", "block"), ("float32", "layer")):
        assert f"| tiny-whisper | gptq | {passes} | {order} | 2 |" in text
    base = next(line for line in text.splitlines() if line.startswith("| tiny-whisper | gptq | float32 | block | 2 |"))
    assert base.count("| 1.00x |") == 2  # the baseline: the default run's wall time and memory
    with pytest.raises(SystemExit, match="'fast' is neither a forward dtype"):
        speed.parse_method("gptq:fast")


def test_large_quantize_job_runs_the_driver_on_random_data(speed):
    """GPTQ and TARQ over every Linear of a small random Whisper, from synthetic calibration clips."""
    from tarq.models import whisper

    rows = [speed.job_large_quantize(device="cpu", method=m, clips=3, tokens=10, batch_size=2, shape=TINY_SHAPE)
            for m in ("gptq", "tarq")]
    n_linears = len(whisper.quantizable_names(speed.random_whisper("cpu", torch.float32, TINY_SHAPE)))
    for r in rows:
        assert r["random_weights"] and r["layers"] == n_linears and r["clips"] == 3
        assert 3 * 5 <= r["tokens"] <= 3 * 10 and r["tail_tokens"] <= r["tokens"]
        assert r["seconds"] > 0 and {"forward", "statistics", "solve"} <= set(r["stages"])
    text = "\n".join(speed.report_large_quantize(rows + [{"error": "out of memory", "method": "tarq"}]))
    assert "RANDOM weights" in text and "| gptq | float32 | block | 3 (" in text and "| 1.00x |" in text
    assert "failed: out of memory" in text


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_random_large_job_on_cuda_takes_tinygemm(speed):
    r = speed.job_random_large(device="cuda", tokens=3, batch_sizes=(1, 2), reps=1, shape=TINY_SHAPE)
    assert r["dtype"] == "float16"
    assert set(r["models"]["int4"]["kernels"]) == {"tinygemm-cuda"}
    assert all(run["peak_cuda_mb"] > 0 for run in r["models"]["fp"]["runs"].values())
    res = speed.job_solver(device="cuda", reps=1, positions=512, shapes={"small [64x256]": [64, 256]})
    assert res["shapes"][0]["max_abs_diff"] < 1e-5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("sequential", ["block", "layer"])
def test_large_quantize_job_on_cuda(speed, sequential):
    """The driver in float16 on the GPU, both streams on the device; in layer order through paused
    forwards."""
    from tarq.models import whisper

    r = speed.job_large_quantize(device="cuda", method="tarq", clips=3, tokens=10, batch_size=2, shape=TINY_SHAPE,
                                 sequential=sequential)
    assert r["dtype"] == "float16" and r["peak_cuda_mb"] > 0 and r["encoder_batch_size"] == 2
    assert r["sequential"] == sequential
    assert r["layers"] == len(whisper.quantizable_names(speed.random_whisper("cpu", torch.float32, TINY_SHAPE)))
