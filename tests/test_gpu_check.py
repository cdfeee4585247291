"""bench/gpu_check.sh, dry: every step on this CPU with small shapes, so that the script a lent GPU runs once
has already run end to end here. No number it prints is asserted (nor is any of them a GPU number)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_dry_run_completes_every_step(tmp_path):
    env = {**os.environ, "GPU_CHECK_DRY": "1", "OUT": str(tmp_path), "GPU_CHECK_BUDGET_S": "900",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    p = subprocess.run(["bash", "bench/gpu_check.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=1200, check=False)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = json.loads((tmp_path / "gpu_check.json").read_text())
    status = {s["step"]: s["status"] for s in res["steps"]}
    assert status.pop("large-v3 compiled") == "skipped: dry run"
    status.pop("real models")  # runs only when model folders were carried
    assert status and all(v == "ok" for v in status.values()), status
    assert [r["method"] for r in res["large-quantize-tarq"]["large_quantize"]] == ["tarq"]
    assert "error" not in res["large-quantize-tarq"]["large_quantize"][0]
    assert "error" not in res["large-quantize-gptq"]["large_quantize"][0]
    assert set(res["large-eager"]["large"][0]["models"]) == {"fp", "int4"}
    assert "error" not in res["solver"]["solver"]
    table = p.stdout[p.stdout.index("env "):]
    assert "large-v3 tarq quantize, 4 clips" in table and "x GPTQ" in table and "RANDOM weights" in table
    assert (tmp_path / "gpu_check.md").read_text().count("# Speed and memory") == 4
