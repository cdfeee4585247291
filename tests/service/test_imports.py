"""Import rules: the API never loads torch/transformers; the library never loads the service stack."""
from __future__ import annotations

import subprocess
import sys

from tests.service.conftest import ROOT


def loaded_after(imports: str, watch: list[str]) -> list[str]:
    code = f"import sys; {imports}; print(','.join(m for m in {watch!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return [m for m in out.stdout.strip().split(",") if m]


def test_app_imports_no_torch():
    assert loaded_after("import app.main; app.main.create_app(); import app.routes.transcriptions",
                        ["torch", "transformers"]) == []


def test_library_imports_no_service_stack():
    assert loaded_after("import tarq, tarq.cli, tarq.audio, tarq.config, tarq.formats, tarq.errors",
                        ["fastapi", "celery", "redis", "sqlalchemy", "uvicorn", "kombu", "app", "worker"]) == []
