"""/v1/quantizations: submit, read, list, cancel, follow (SSE)."""
from __future__ import annotations

import asyncio
import json
import logging
import shutil
from typing import Annotated

from anyio import to_thread
from fastapi import APIRouter, File, Form, Header, Query, UploadFile
from fastapi.responses import JSONResponse
from sse_starlette import EventSourceResponse

from app import jobs
from app.deps import CeleryDep, EngineDep, KeyDep, SettingsDep, StorageDep
from app.schemas import ERROR_RESPONSES, ApiError, ErrorResponse, QuantizationList, QuantizationPublic
from app.uploads import Budget, check_model_source, stage_set

log = logging.getLogger("tarq.api")
router = APIRouter(prefix="/v1/quantizations", tags=["quantizations"], responses=ERROR_RESPONSES)


PUBLISH_RETRY = {"max_retries": 2, "interval_start": 0, "interval_step": 0.5, "interval_max": 1}


def send_quantize(celery, job_id: str, countdown: float | None = None) -> None:
    # The SQL record is the job's result: nothing to wait for in the result backend, and a fast failure
    # (503) when the broker is down rather than minutes of reconnecting.
    celery.send_task("tarq.quantize", args=[job_id], queue="quantize", ignore_result=True,
                     retry_policy=PUBLISH_RETRY, countdown=countdown)


def uploaded_model(engine, model: str) -> str | None:
    """The id when `model` names a model uploaded to this server (POST /v1/models); None when it names no
    model here. A model this server quantized is refused: its weights are already on the 4-bit grid."""
    try:
        found = jobs.get_model(engine, model.strip())
    except jobs.ModelNotFound:
        return None
    if found["method"] != jobs.UPLOADED:
        raise ApiError(422, f"model {found['id']!r} is already quantized ({found['method']}, {found['bits']} bits); "
                            f"quantize its base model {found['base_model']!r} instead", param="model",
                       code="already_quantized")
    return found["id"]


@router.post("", status_code=202, response_model=QuantizationPublic,
             responses={200: {"model": QuantizationPublic, "description": "same Idempotency-Key: the earlier job"},
                        429: {"model": ErrorResponse, "description": "submission rate limit per API key reached; "
                                                                      "see the Retry-After header"}})
def create_quantization(
    settings: SettingsDep,
    engine: EngineDep,
    storage: StorageDep,
    celery: CeleryDep,
    owner: KeyDep,
    model: Annotated[str, Form(description="Hub id, a folder under TARQ_MODEL_ROOTS, or the id of a model "
                                           "uploaded with POST /v1/models")],
    method: Annotated[str, Form()] = "tarq",
    bits: Annotated[int, Form()] = 4,
    group_size: Annotated[int, Form()] = 128,
    sym: Annotated[bool, Form()] = False,
    num_samples: Annotated[int | None, Form(ge=1, le=100000)] = None,
    forward_dtype: Annotated[str | None, Form(
        description="what the calibration forward passes compute in: float32 (default), bfloat16, float16, or "
                    "auto (the worker's fast dtype); Hessians and solves stay float32")] = None,
    sequential: Annotated[str | None, Form(
        description="block (default): every group of a block solved on inputs captured before any of it is "
                    "quantized; layer: each group after the ones before it (GPTQ's true sequential: one pass "
                    "per block and stream, faster, more memory)")] = None,
    files: Annotated[list[UploadFile] | None, File(description="calibration clips")] = None,
    archive: Annotated[UploadFile | None, File(description="calibration clips as zip / tar.gz")] = None,
    transcripts: Annotated[UploadFile | None, File(description="file<TAB>text")] = None,
    eval_files: Annotated[list[UploadFile] | None, File()] = None,
    eval_archive: Annotated[UploadFile | None, File()] = None,
    eval_transcripts: Annotated[UploadFile | None, File()] = None,
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
):
    """Validate everything, store the uploads, record the job, queue it. 202 with the job."""
    from tarq.config import QuantConfig

    if idempotency_key:
        existing = jobs.find_by_idempotency_key(engine, owner, idempotency_key)
        if existing:
            return JSONResponse(jobs.public_job(existing), status_code=200)
    overrides = {"method": method, "bits": bits, "group_size": group_size, "sym": sym}
    if num_samples is not None:
        overrides["num_samples"] = num_samples
    if forward_dtype is not None:
        overrides["forward_dtype"] = forward_dtype
    if sequential is not None:
        overrides["sequential"] = sequential
    try:
        config = QuantConfig(**overrides)
    except (ValueError, TypeError) as err:
        raise ApiError(422, f"invalid quantization settings: {err}", code="bad_config") from None
    source = uploaded_model(engine, model) or check_model_source(model, settings)
    files, eval_files = files or [], eval_files or []
    if config.method != "rtn" and not files and archive is None:
        raise ApiError(422, f"method {config.method} needs calibration audio: send repeated 'files' or one "
                            "'archive'", param="files", code="no_audio")

    job_id = jobs.new_id()
    staging = settings.data_dir / "staging" / job_id
    budget = Budget(settings)
    summary: dict = {}
    try:
        if files or archive is not None:
            calib = stage_set(staging / "calibration", budget, files=files, archive=archive, transcripts=transcripts)
            summary["calibration"] = calib.summary()
        if eval_files or eval_archive is not None:
            ev = stage_set(staging / "eval", budget, files=eval_files, archive=eval_archive,
                           transcripts=eval_transcripts, files_field="eval_files", archive_field="eval_archive",
                           transcripts_field="eval_transcripts")
            if not ev.transcripts:
                raise ApiError(422, "evaluation clips need reference transcripts ('eval_transcripts')",
                               param="eval_transcripts", code="bad_transcripts")
            summary["eval"] = ev.summary()
        for part in ("calibration", "eval"):
            if part in summary:
                storage.put_dir(staging / part, f"uploads/{job_id}/{part}", move=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)

    try:
        job, created = jobs.create_job(engine, owner=owner, source_model=source, config=config.to_dict(),
                                       files=summary, idempotency_key=idempotency_key, job_id=job_id)
    except Exception:
        storage.delete(f"uploads/{job_id}")
        raise
    if not created:  # a concurrent request with the same key won
        storage.delete(f"uploads/{job_id}")
        return JSONResponse(jobs.public_job(job), status_code=200)
    try:
        send_quantize(celery, job_id)
    except Exception as err:
        log.exception("could not queue job %s", job_id)
        jobs.transition(engine, job_id, jobs.FAILED, error=f"could not queue the job: {err}")
        storage.delete(f"uploads/{job_id}")
        raise ApiError(503, f"the job queue (broker) is unavailable: {type(err).__name__}", type="server_error",
                       code="broker_unavailable") from None
    from app.routes.health import JOBS_SUBMITTED

    JOBS_SUBMITTED.inc()
    log.info("job %s queued: %s %s", job_id, config.method, source)
    return JSONResponse(jobs.public_job(job), status_code=202)


@router.get("", response_model=QuantizationList)
def list_quantizations(
    engine: EngineDep,
    _: KeyDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: Annotated[str | None, Query(max_length=64, description="last id of the previous page")] = None,
    status: Annotated[str | None, Query(pattern="^(queued|running|succeeded|failed|cancelled)$")] = None,
):
    rows = jobs.list_jobs(engine, limit=limit + 1, after=after, status=status)
    page = rows[:limit]
    return {"object": "list", "data": [jobs.public_job(j) for j in page], "has_more": len(rows) > limit,
            "last_id": page[-1]["id"] if page else None}


@router.get("/{job_id}", response_model=QuantizationPublic)
def get_quantization(job_id: str, engine: EngineDep, _: KeyDep):
    return jobs.public_job(jobs.get_job(engine, job_id))


@router.delete("/{job_id}", response_model=QuantizationPublic, status_code=202)
def cancel_quantization(job_id: str, engine: EngineDep, storage: StorageDep, _: KeyDep):
    """Cancel: a queued job ends at once; a running one stops at its next layer (the worker marks it
    cancelled); a finished one answers 409."""
    job = jobs.request_cancel(engine, job_id)
    if job["status"] == jobs.CANCELLED:
        storage.delete(f"uploads/{job_id}")
    return JSONResponse(jobs.public_job(job), status_code=202)


@router.get("/{job_id}/events", response_class=EventSourceResponse,
            responses={200: {"content": {"text/event-stream": {}}, "description": "progress events"}})
async def quantization_events(job_id: str, engine: EngineDep, _: KeyDep,
                              interval: Annotated[float, Query(ge=0.1, le=30)] = 0.5):
    """Server-sent events: `progress` with the job whenever it changes, then one `end` event with the
    job in its final state."""
    job = await to_thread.run_sync(jobs.get_job, engine, job_id)  # 404 before the stream starts

    async def stream():
        nonlocal job
        last = None
        while True:
            public = jobs.public_job(job)
            marker = (public["status"], public["progress"], public["cancel_requested"])
            if job["status"] in jobs.TERMINAL:
                yield {"event": "end", "data": json.dumps(public)}
                return
            if marker != last:
                yield {"event": "progress", "data": json.dumps(public)}
                last = marker
            await asyncio.sleep(interval)
            job = await to_thread.run_sync(jobs.get_job, engine, job_id)

    return EventSourceResponse(stream(), ping=15)
