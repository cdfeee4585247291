"""/v1/evaluations: WER, rare-WER and common-WER of a model on the caller's own speech. A job like a
quantization (queued, run by a worker on the `quantize` queue, followed, cancelled), whose outcome is a
result: the scores (tarq.evaluate, the same scoring as `tarq eval` and the quality benchmark) and each
clip's hypothesis. Evaluating a base model and its quantized versions on the same clips shows what the
quantization cost on that speech."""
from __future__ import annotations

import shutil
from typing import Annotated

from fastapi import APIRouter, File, Form, Header, Query, UploadFile
from sse_starlette import EventSourceResponse

from app import callbacks, jobs
from app.deps import CeleryDep, EngineDep, KeyDep, SettingsDep, StorageDep
from app.routes import job_routes
from app.routes.transcriptions import resolve_model
from app.schemas import ERROR_RESPONSES, ApiError, ErrorResponse, EvaluationList, EvaluationPublic
from app.uploads import Budget, stage_set

router = APIRouter(prefix="/v1/evaluations", tags=["evaluations"], responses=ERROR_RESPONSES)
BATCH_SIZE = 8  # clips per decoding call, as in `tarq eval`


@router.post("", status_code=202, response_model=EvaluationPublic,
             responses={200: {"model": EvaluationPublic, "description": "same Idempotency-Key: the earlier one"},
                        429: {"model": ErrorResponse, "description": "submission rate limit per API key reached; "
                                                                      "see the Retry-After header"}})
def create_evaluation(
    settings: SettingsDep,
    engine: EngineDep,
    storage: StorageDep,
    celery: CeleryDep,
    owner: KeyDep,
    model: Annotated[str, Form(description="a model of this server (GET /v1/models) or an allowed base model")],
    files: Annotated[list[UploadFile] | None, File(description="the clips")] = None,
    archive: Annotated[UploadFile | None, File(description="the clips as zip / tar.gz")] = None,
    transcripts: Annotated[UploadFile | None, File(description="file<TAB>reference text, one line per clip")] = None,
    zipf_threshold: Annotated[float, Form(ge=1.0, le=7.0, description="a word is rare below this wordfreq "
                                                                       "Zipf frequency")] = 3.0,
    callback_url: Annotated[str | None, Form(max_length=2000, description=job_routes.CALLBACK_FIELD)] = None,
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
):
    """Score `model` on the clips against their reference transcripts: 202 with the evaluation, whose
    `result` holds the scores once it succeeded."""
    if earlier := job_routes.replayed(engine, owner, idempotency_key, jobs.EVALUATE):
        return earlier
    callback_url = callbacks.checked(callback_url, settings)
    resolved = resolve_model(model, settings, engine)
    job_id = jobs.new_id()
    staging = settings.data_dir / "staging" / job_id
    try:
        clips = stage_set(staging / "eval", Budget(settings), files=files or [], archive=archive,
                          transcripts=transcripts)
        if not clips.transcripts:
            raise ApiError(422, "an evaluation needs reference transcripts: send 'transcripts' (file<TAB>text) "
                                "or a .tsv in the archive", param="transcripts", code="bad_transcripts")
        storage.put_dir(staging / "eval", f"uploads/{job_id}/eval", move=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    source = resolved.get("artifact") or resolved["source"]
    return job_routes.submit(engine, storage, celery, kind=jobs.EVALUATE, job_id=job_id, owner=owner, source=source,
                             config={"model": resolved, "zipf_threshold": zipf_threshold, "batch_size": BATCH_SIZE},
                             files={"eval": clips.summary()}, idempotency_key=idempotency_key,
                             what=f"evaluate {source}", callback_url=callback_url)


@router.get("", response_model=EvaluationList)
def list_evaluations(
    engine: EngineDep,
    _: KeyDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: Annotated[str | None, Query(max_length=64, description="last id of the previous page")] = None,
    status: Annotated[str | None, Query(pattern=job_routes.STATUS_PATTERN)] = None,
    model: Annotated[str | None, Query(max_length=1000, description=job_routes.MODEL_FILTER)] = None,
):
    return job_routes.page(engine, jobs.EVALUATE, limit, after, status, model)


@router.get("/{job_id}", response_model=EvaluationPublic)
def get_evaluation(job_id: str, engine: EngineDep, _: KeyDep):
    return jobs.public_job(jobs.get_job(engine, job_id, jobs.EVALUATE))


@router.delete("/{job_id}", response_model=EvaluationPublic, status_code=202)
def cancel_evaluation(job_id: str, engine: EngineDep, storage: StorageDep, _: KeyDep):
    """Cancel: a queued evaluation ends at once; a running one stops after its current batch of clips."""
    return job_routes.cancel(engine, storage, job_id, jobs.EVALUATE)


@router.get("/{job_id}/events", response_class=EventSourceResponse, responses=job_routes.EVENTS_ANSWER)
async def evaluation_events(job_id: str, engine: EngineDep, _: KeyDep,
                            interval: Annotated[float, Query(ge=0.1, le=30)] = 0.5):
    """Server-sent events: `progress` (clips decoded of all) whenever it changes, then `end` with the
    evaluation in its final state."""
    return await job_routes.events(engine, job_id, jobs.EVALUATE, interval)
