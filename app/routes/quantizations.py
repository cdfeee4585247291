"""/v1/quantizations: submit, read, list, cancel, follow (SSE)."""
from __future__ import annotations

import logging
import shutil
from typing import Annotated

from fastapi import APIRouter, File, Form, Header, Query, UploadFile
from sse_starlette import EventSourceResponse

from app import callbacks, jobs
from app.deps import CeleryDep, EngineDep, KeyDep, SettingsDep, StorageDep
from app.routes import job_routes
from app.schemas import ERROR_RESPONSES, ApiError, ErrorResponse, QuantizationList, QuantizationPublic
from app.uploads import Budget, check_model_source, stage_set

log = logging.getLogger("tarq.api")
router = APIRouter(prefix="/v1/quantizations", tags=["quantizations"], responses=ERROR_RESPONSES)


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
    zipf_threshold: Annotated[float | None, Form(
        description="TARQ: a word is rare (tail) below this wordfreq Zipf frequency; default 3 (under one use per "
                    "million words). Raise it to protect more of a domain's vocabulary")] = None,
    lambda_cost: Annotated[float | None, Form(description="TARQ: c in lambda = c tr(Hc) / tr(Ht); default 1")] = None,
    lambda_positions: Annotated[str | None, Form(
        description="TARQ: the common positions lambda's tr(Hc) counts: all (default) or text (not the "
                    "prompt's special tokens; an experiment)")] = None,
    digits_are_tail: Annotated[bool | None, Form(
        description="TARQ: every word with a digit is rare (default true); false looks digits up like words")] = None,
    rarebal: Annotated[bool | None, Form(description="TARQ: RAREBAL on (default) or off")] = None,
    residual: Annotated[bool | None, Form(description="TARQ: the residual correction on (default) or off")] = None,
    residual_step: Annotated[str | None, Form(description="TARQ: paper (default) or full (alpha = 1)")] = None,
    encoder_tagging: Annotated[str | None, Form(
        description="TARQ: common (default: encoder frames are all common) or frames (rare words' frames)")] = None,
    act_order: Annotated[bool | None, Form(description="GPTQ: columns in order of decreasing H diagonal")] = None,
    damp: Annotated[float | None, Form(description="GPTQ: damping, a fraction of mean(diag H); default 0.01")] = None,
    seed: Annotated[int | None, Form(description="which calibration clips num_samples draws")] = None,
    files: Annotated[list[UploadFile] | None, File(description="calibration clips")] = None,
    archive: Annotated[UploadFile | None, File(description="calibration clips as zip / tar.gz")] = None,
    transcripts: Annotated[UploadFile | None, File(description="file<TAB>text")] = None,
    eval_files: Annotated[list[UploadFile] | None, File()] = None,
    eval_archive: Annotated[UploadFile | None, File()] = None,
    eval_transcripts: Annotated[UploadFile | None, File()] = None,
    callback_url: Annotated[str | None, Form(max_length=2000, description=job_routes.CALLBACK_FIELD)] = None,
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
):
    """Validate everything, store the uploads, record the job, queue it. 202 with the job."""
    from tarq.config import QuantConfig

    if earlier := job_routes.replayed(engine, owner, idempotency_key, jobs.QUANTIZE):
        return earlier
    callback_url = callbacks.checked(callback_url, settings)
    overrides = {"method": method, "bits": bits, "group_size": group_size, "sym": sym}
    optional = {"num_samples": num_samples, "forward_dtype": forward_dtype, "sequential": sequential,
                "zipf_threshold": zipf_threshold, "lambda_cost": lambda_cost, "lambda_positions": lambda_positions,
                "digits_are_tail": digits_are_tail,
                "rarebal": rarebal, "residual": residual, "residual_step": residual_step,
                "encoder_tagging": encoder_tagging, "act_order": act_order, "damp": damp, "seed": seed}
    overrides.update({k: v for k, v in optional.items() if v is not None})
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

    return job_routes.submit(engine, storage, celery, kind=jobs.QUANTIZE, job_id=job_id, owner=owner, source=source,
                             config=config.to_dict(), files=summary, idempotency_key=idempotency_key,
                             what=f"{config.method} {source}", callback_url=callback_url)


@router.get("", response_model=QuantizationList)
def list_quantizations(
    engine: EngineDep,
    _: KeyDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: Annotated[str | None, Query(max_length=64, description="last id of the previous page")] = None,
    status: Annotated[str | None, Query(pattern=job_routes.STATUS_PATTERN)] = None,
    source_model: Annotated[str | None, Query(max_length=1000, description=job_routes.MODEL_FILTER)] = None,
):
    return job_routes.page(engine, jobs.QUANTIZE, limit, after, status, source_model)


@router.get("/{job_id}", response_model=QuantizationPublic)
def get_quantization(job_id: str, engine: EngineDep, _: KeyDep):
    return jobs.public_job(jobs.get_job(engine, job_id, jobs.QUANTIZE))


@router.delete("/{job_id}", response_model=QuantizationPublic, status_code=202)
def cancel_quantization(job_id: str, engine: EngineDep, storage: StorageDep, _: KeyDep):
    """Cancel: a queued job ends at once; a running one stops at its next layer (the worker marks it
    cancelled); a finished one answers 409."""
    return job_routes.cancel(engine, storage, job_id, jobs.QUANTIZE)


@router.get("/{job_id}/events", response_class=EventSourceResponse, responses=job_routes.EVENTS_ANSWER)
async def quantization_events(job_id: str, engine: EngineDep, _: KeyDep,
                              interval: Annotated[float, Query(ge=0.1, le=30)] = 0.5):
    """Server-sent events: `progress` with the job whenever it changes, then one `end` event with the
    job in its final state."""
    return await job_routes.events(engine, job_id, jobs.QUANTIZE, interval)
