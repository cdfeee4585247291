"""bench/preload.py on the tests' tiny Whisper: a cold `tarq serve` loads the model inside its first request,
a preloading one before any request; both answer the same text. No timing is asserted (the benchmark
reports, it never judges)."""
from __future__ import annotations

import importlib.util

import pytest

from tests.service.conftest import ROOT

pytestmark = pytest.mark.slow


def _bench(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_preload_bench_loads_before_the_first_request(tmp_path, tone_wav):
    bench = _bench("preload")
    clip = tone_wav(tmp_path / "tone.wav", 2.0)
    model = _bench("load").build_model(tmp_path / "models")  # the tiny Whisper cut to 16 decoded tokens
    runs = [bench.measure(model.parent, model.name, clip, requests=3, preload=preload, timeout=180,
                          idle_seconds=1)
            for preload in (False, True)]
    cold, warm = runs
    assert cold["mode"] == "cold" and cold["preloaded_seconds"] is None and cold["loads_at_start"] == 0
    assert cold["loaded_by_request"][0]  # a cold server loads the model in the first request
    assert warm["mode"] == "preload" and warm["preloaded_seconds"] >= warm["ready_seconds"]
    assert warm["loads_at_start"] == warm["processes"] == 2  # one per pool process
    assert warm["loaded_by_request"] == [False] * 3
    for run in runs:
        assert len(run["latencies"]) == 3 and run["dtype"] in ("float32", "bfloat16")
        assert [list(t) for t in run["server_timing"]] == [["model", "audio", "transcribe", "queue"]] * 3
        assert 0 <= run["idle_worker_cpu"] < 2  # a share of one core, and the process has one thread polling
    assert warm["texts"] == cold["texts"] and len(set(cold["texts"])) == 1
    rows = bench.rows(runs)
    assert [r[0] for r in rows] == ["cold", "", "", "preload", "", ""]
    assert rows[0][7] == "yes" and [r[7] for r in rows[3:]] == ["no"] * 3
