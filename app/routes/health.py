"""/healthz (liveness), /readyz (broker, database, storage), /metrics (Prometheus)."""
from __future__ import annotations

import logging
import os
from pathlib import Path

from anyio import to_thread
from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest
from sqlalchemy import text

from app import jobs
from app.db import get_engine
from app.deps import KeyDep, SettingsDep, celery_client, storage_dep
from app.settings import Settings

log = logging.getLogger("tarq.api")
router = APIRouter(tags=["health"])

# Module-level: prometheus_client's registry is process-wide, so these are created once per process.
REQUESTS = Counter("tarq_http_requests_total", "HTTP requests", ["method", "route", "status"])
JOBS_SUBMITTED = Counter("tarq_jobs_submitted_total", "Jobs accepted, by kind (quantize, evaluate)", ["kind"])
TRANSCRIBE_SECONDS = Histogram("tarq_transcription_seconds", "Transcription latency seen by the API",
                               buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300))
JOBS = Gauge("tarq_jobs", "Jobs by kind (quantize, evaluate) and status", ["kind", "status"])
KERNEL_CALLS = Counter("tarq_quantlinear_calls_total",
                       "Quantized Linear forwards in the transcriptions this API answered, by kernel path", ["kernel"])


def check_database(settings: Settings) -> None:
    with get_engine(settings.database).connect() as conn:
        conn.execute(text("SELECT 1"))


def check_broker(settings: Settings) -> None:
    if settings.embedded_broker:
        folder = Path(settings.celery_config()["broker_transport_options"]["data_folder_in"])
        if not (folder.is_dir() and os.access(folder, os.W_OK)):
            raise OSError(f"broker folder {folder} is missing or not writable")
        return
    with celery_client(settings).connection_for_write() as conn:
        conn.ensure_connection(max_retries=1, timeout=3)


def check_storage(settings: Settings) -> None:
    storage_dep(settings).check()


@router.get("/healthz")
def healthz():
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "a dependency is down"}})
async def readyz(settings: SettingsDep):
    checks = {}
    for name, check in (("database", check_database), ("broker", check_broker), ("storage", check_storage)):
        try:
            with_timeout = to_thread.run_sync(check, settings)
            await with_timeout
            checks[name] = "ok"
        except Exception as err:  # readiness reports any failure; it must never raise itself
            checks[name] = f"error: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    ready = all(v == "ok" for v in checks.values())
    return JSONResponse({"status": "ready" if ready else "unavailable", "checks": checks},
                        status_code=200 if ready else 503)


@router.get("/metrics", response_class=Response)
def metrics(settings: SettingsDep, _: KeyDep):
    try:
        counts = jobs.count_by_status(get_engine(settings.database))
        for kind in jobs.KINDS:
            for status in jobs.TRANSITIONS:
                JOBS.labels(kind, status).set(counts.get((kind, status), 0))
    except Exception as err:  # metrics stay scrapeable while the database is down
        log.warning("job counts unavailable: %s", err)
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
