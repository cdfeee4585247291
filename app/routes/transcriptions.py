"""POST /v1/audio/transcriptions and /v1/audio/translations, shaped like OpenAI's so the official client
works unmodified.

The API checks the upload, stores it, sends `tarq.transcribe` by name to the `transcribe` queue and
waits for the worker's Transcript, which it renders with tarq.formats (torch-free). For a quantized
model the `X-Tarq-Kernels` header says which kernel paths its int4 layers ran, with their call counts
(tarq.qlinear), e.g. `dequant=60, int4pack-cpu=912`: an int4 model on the dequantize fallback
everywhere is slower than the float one, and this is where an operator sees it. `X-Tarq-Compute-Dtype`
says what the model computed in (TARQ_DTYPE=auto resolves per worker: bfloat16, float16 or float32), and
`Server-Timing` where the time went (`model;dur=0.1, audio;dur=9.8, transcribe;dur=2461.5, queue;dur=540.2`)."""
from __future__ import annotations

import logging
import shutil
import time
from typing import Annotated

from fastapi import APIRouter, File, Form, UploadFile
from fastapi.responses import JSONResponse, PlainTextResponse

from app import jobs, task_wait
from app.deps import CeleryDep, EngineDep, KeyDep, SettingsDep, StorageDep
from app.ratelimit import InFlight
from app.routes.job_routes import PUBLISH_RETRY
from app.schemas import ERROR_RESPONSES, ApiError
from app.settings import Settings
from app.storage import StorageUnavailable
from app.uploads import Budget, check_audio, check_model_source, copy_limited, safe_name

log = logging.getLogger("tarq.api")
router = APIRouter(prefix="/v1/audio", tags=["audio"], responses=ERROR_RESPONSES)
WHISPER_1 = "whisper-1"
KERNELS_HEADER = "X-Tarq-Kernels"
DTYPE_HEADER = "X-Tarq-Compute-Dtype"


def resolve_model(model: str, settings: Settings, engine) -> dict:
    """{"artifact": id} for a model made here, {"source": hub id or folder} for a base model."""
    model = (model or "").strip()
    if model == WHISPER_1 and settings.default_model:
        model = settings.default_model
    try:
        jobs.get_model(engine, model)
        return {"artifact": model}
    except jobs.ModelNotFound:
        pass
    try:
        return {"source": check_model_source(model, settings)}
    except ApiError as err:
        raise ApiError(404, f"model {model!r} is neither a model of this server (GET /v1/models) nor an allowed "
                            f"base model: {err.message}", param="model", code="model_not_found") from None


def server_timing(worker: dict, waited: float) -> str:
    """W3C Server-Timing (milliseconds): the worker's own steps (model: the model cache, a load on a
    miss; audio: fetching and decoding the upload; transcribe) and queue: the rest of the time this API
    waited for the answer (the broker, the result backend, the task's dispatch)."""
    parts = {k: float(worker[k]) for k in ("model", "audio", "transcribe") if isinstance(worker.get(k), (int, float))}
    parts["queue"] = max(0.0, waited - sum(parts.values()))
    return ", ".join(f"{k};dur={1000 * v:.1f}" for k, v in parts.items())


def worker_error(err: dict, task: str) -> Exception:
    """What the API raises for the error a worker answered with: the user's mistakes are 422 naming the
    field, a store the worker could not reach is the same 503 as the API's own (its address only logged)."""
    kind, message = err.get("type"), err.get("message") or f"{task} failed"
    if kind == "StorageUnavailable":
        return StorageUnavailable(f"in the worker: {message}")
    if kind in ("AudioError", "ModelError", "CalibrationError"):
        return ApiError(422, message, param="model" if kind == "ModelError" else "file", code=kind)
    return ApiError(500, message, code=kind)


ANSWERS = {200: {"content": {"application/json": {}, "text/plain": {}}}}


@router.post("/transcriptions", responses=ANSWERS)
def create_transcription(
    settings: SettingsDep,
    engine: EngineDep,
    storage: StorageDep,
    celery: CeleryDep,
    owner: KeyDep,
    file: Annotated[UploadFile, File()],
    model: Annotated[str, Form()],
    language: Annotated[str | None, Form(max_length=16)] = None,
    prompt: Annotated[str | None, Form(max_length=4000)] = None,
    temperature: Annotated[float, Form(ge=0.0, le=1.0)] = 0.0,
    response_format: Annotated[str, Form()] = "json",
    timestamp_granularities: Annotated[list[str] | None, Form(alias="timestamp_granularities[]")] = None,
):
    return respond(settings, engine, storage, celery, owner, file=file, model=model, language=language, prompt=prompt,
                  temperature=temperature, response_format=response_format,
                  timestamp_granularities=timestamp_granularities, task="transcribe")


@router.post("/translations", responses=ANSWERS)
def create_translation(
    settings: SettingsDep,
    engine: EngineDep,
    storage: StorageDep,
    celery: CeleryDep,
    owner: KeyDep,
    file: Annotated[UploadFile, File()],
    model: Annotated[str, Form()],
    prompt: Annotated[str | None, Form(max_length=4000, description="in English")] = None,
    temperature: Annotated[float, Form(ge=0.0, le=1.0)] = 0.0,
    response_format: Annotated[str, Form()] = "json",
):
    """OpenAI's translations: the speech of the clip, in any language Whisper knows, as English text
    (a multilingual model's translate task; an English-only model answers 422)."""
    return respond(settings, engine, storage, celery, owner, file=file, model=model, language=None, prompt=prompt,
                  temperature=temperature, response_format=response_format, timestamp_granularities=None,
                  task="translate")


IN_FLIGHT = InFlight()  # this process's transcriptions under way, per key


def respond(settings: Settings, engine, storage, celery, owner: str, *, file: UploadFile, model: str,
           language: str | None, prompt: str | None, temperature: float, response_format: str,
           timestamp_granularities: list[str] | None, task: str):
    """Check the request, send it to a worker, wait, and render what comes back; at most
    TARQ_MAX_TRANSCRIPTIONS_PER_KEY of one key's at once."""
    with IN_FLIGHT.hold(owner, settings.max_transcriptions_per_key):
        from tarq.formats import LANGUAGES, Transcript, check_format, check_granularities, render

        try:
            check_format(response_format)
            granularities = check_granularities(timestamp_granularities or ["segment"])
        except ValueError as err:
            raise ApiError(422, str(err), param="response_format") from None
        if timestamp_granularities and response_format != "verbose_json":
            raise ApiError(422, "timestamp_granularities[] needs response_format verbose_json",
                           param="timestamp_granularities[]")
        if language is not None and language not in LANGUAGES:
            raise ApiError(422, f"language {language!r} is not an ISO-639-1 code Whisper knows", param="language")
        source = resolve_model(model, settings, engine)

        request_id = jobs.new_id()
        name = safe_name(file.filename or "audio", "file")
        staging = settings.data_dir / "staging" / request_id
        staging.mkdir(parents=True, exist_ok=True)
        key = f"tmp/{request_id}/{name}"
        try:
            copy_limited(file.file, staging / name, name, Budget(settings))
            check_audio(staging / name, name, settings, "file")
            storage.put_file(staging / name, key, move=True)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

        payload = {"model": source, "audio_key": key, "name": name, "language": language, "prompt": prompt,
                   "temperature": temperature, "word_timestamps": "word" in granularities, "task": task}
        started = time.perf_counter()
        send = lambda task_id=None: celery.send_task("tarq.transcribe", args=[payload], queue="transcribe",  # noqa: E731
                                                     retry_policy=PUBLISH_RETRY, task_id=task_id)
        try:
            try:
                result = send()
            except Exception as err:
                raise ApiError(503, f"the job queue (broker) is unavailable: {type(err).__name__}", type="server_error",
                               code="broker_unavailable") from None
            try:
                answer = task_wait.wait(result, settings.transcribe_wait_seconds, settings, resend=lambda: send(result.id))
            except Exception as err:
                from celery.exceptions import TimeoutError as CeleryTimeout

                if isinstance(err, CeleryTimeout):
                    raise ApiError(504, f"no worker answered within {settings.transcribe_wait_seconds:g} s",
                                   type="server_error", code="timeout") from None
                log.exception("transcription %s failed in the worker", request_id)
                raise ApiError(500, f"transcription failed in the worker: {type(err).__name__}: {err}",
                               type="server_error") from None
            finally:
                try:
                    result.forget()
                except Exception:  # some backends cannot forget; the result expires anyway
                    pass
        finally:
            storage.delete(f"tmp/{request_id}")
        from app.routes.health import KERNEL_CALLS, TRANSCRIBE_SECONDS

        waited = time.perf_counter() - started
        TRANSCRIBE_SECONDS.observe(waited)
        kernels = {str(k): int(n) for k, n in (answer.get("kernels") or {}).items()}
        for kernel, calls in kernels.items():
            KERNEL_CALLS.labels(kernel=kernel).inc(calls)
        if "error" in answer:
            raise worker_error(answer["error"], task)
        body, media = render(Transcript.from_dict(answer["transcript"]), response_format, granularities=granularities)
        headers = {}
        if kernels:  # an RFC 8941 dictionary: the paths are lower-case tokens
            headers[KERNELS_HEADER] = ", ".join(f"{k}={n}" for k, n in sorted(kernels.items()))
        if answer.get("dtype"):
            headers[DTYPE_HEADER] = str(answer["dtype"])
        if isinstance(answer.get("seconds"), dict):
            headers["Server-Timing"] = server_timing(answer["seconds"], waited)
        if isinstance(body, dict):
            return JSONResponse(body, headers=headers)
        return PlainTextResponse(body, media_type=media, headers=headers)
