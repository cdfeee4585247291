"""The small version of bench/load.py: 10 concurrent transcriptions and 5 concurrent submissions against
one API and two workers (private Redis, PostgreSQL or SQLite): zero errors, every job accounted for."""
from __future__ import annotations

import importlib.util
import shutil

import pytest

from tests.service.conftest import ROOT

pytestmark = pytest.mark.slow


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_load", ROOT / "bench" / "load.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")
def test_small_load_has_no_errors_and_loses_no_job(speech_dir):
    bench = _load_bench()
    result = bench.run_load(transcriptions=10, submissions=5, workers=2, timeout=600)
    assert result["errors"] == []
    assert result["jobs_succeeded"] == 5
    assert result["latency"]["transcription"]["n"] == 10 and result["latency"]["submission"]["n"] == 5
    text = bench.render(result)
    assert "**Errors: 0.**" in text and "p95" in text


def test_percentile_is_nearest_rank():
    bench = _load_bench()
    values = [float(v) for v in range(1, 21)]  # 1..20
    assert bench.percentile(values, 50) == 10 and bench.percentile(values, 95) == 19
    assert bench.percentile(values, 100) == 20 and bench.percentile([3.0], 95) == 3.0
