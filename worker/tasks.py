"""Celery tasks, thin: load inputs -> call tarq -> store the result -> record it in SQL.

tarq.quantize(job_id): runs a job record of either kind; the record is the source of truth. The task
claims it (queued -> running, or a running job whose heartbeat went stale), heartbeats from a side
thread that also notices a cancel request, and runs it with progress written to SQL: a quantization
(tarq.pipeline.quantize_model, its artifact stored and recorded as a model) or an evaluation
(tarq.evaluate, its scores recorded as the job's result). It ends the job succeeded | failed |
cancelled, or queued again when the artifact store was out of reach. A redelivered or duplicate
message finds nothing to claim and returns.

tarq.transcribe(payload): a model cache per process; returns {"transcript": Transcript.to_dict(), "kernels":
{path: QuantLinear calls}, "dtype": the compute dtype} or {"error": {"type", "message"}} for a user error,
so the API can answer 422 with the message.
"""
from __future__ import annotations

import gc
import logging
import os
import shutil
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from celery.exceptions import SoftTimeLimitExceeded

from app import callbacks, jobs
from app.db import get_engine
from app.settings import get_settings
from app.storage import StorageUnavailable, storage_from_settings
from worker.celery_app import app

log = logging.getLogger("tarq.worker")
_settings = get_settings()
_cache = None
_cache_made = threading.Lock()  # the preload thread and the first task may ask at once
_storage = None


def storage():
    global _storage
    if _storage is None:
        _storage = storage_from_settings(get_settings())
    return _storage


def device() -> str:
    wanted = get_settings().device
    if wanted != "auto":
        return wanted
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _free_memory() -> None:
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:
        pass


class Heartbeat(threading.Thread):
    """Refreshes the job's heartbeat every few seconds and turns a cancel request into a flag the
    pipeline's should_stop reads without touching the database."""

    def __init__(self, engine, job_id: str, worker: str, every: float):
        super().__init__(daemon=True, name=f"heartbeat-{job_id}")
        self.engine, self.job_id, self.worker, self.every = engine, job_id, worker, every
        self.stop_requested = threading.Event()
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(self.every):
            try:
                if jobs.heartbeat(self.engine, self.job_id, self.worker):
                    self.stop_requested.set()
            except Exception as err:  # a database blip must not kill the run; the next beat retries
                log.warning("heartbeat for %s failed: %s", self.job_id, err)


@app.task(name="tarq.quantize", bind=True, acks_late=True, reject_on_worker_lost=True,
          soft_time_limit=_settings.quantize_time_limit, time_limit=_settings.quantize_time_limit + 120)
def quantize(self, job_id: str) -> dict:
    """Run the job record `job_id`, of either kind (the task keeps its first name, see
    app.routes.job_routes.send_job)."""
    from tarq.errors import Cancelled, TarqError

    settings = get_settings()
    engine = get_engine(settings.database)
    worker = f"{socket.gethostname()}:{os.getpid()}:{self.request.id}"
    job = jobs.claim(engine, job_id, worker, settings.stale_after_seconds)
    if job is None:
        log.info("job %s: nothing to do (finished, cancelled or running elsewhere)", job_id)
        return {"job": job_id, "skipped": True}

    beat = Heartbeat(engine, job_id, worker, settings.heartbeat_seconds)
    beat.start()
    scratch = settings.data_dir / "work" / f"{job_id}-{os.getpid()}"
    shutil.rmtree(scratch, ignore_errors=True)
    last = {"key": None, "at": 0.0}

    def on_progress(progress) -> None:
        data = progress.to_dict()
        key = (data.get("stage"), data.get("layer"))
        now = time.monotonic()
        # every new stage or layer is written; repeats of the same one at most once a second
        if key != last["key"] or now - last["at"] >= 1.0:
            jobs.set_progress(engine, job_id, data)
            last.update(key=key, at=now)

    def should_stop() -> bool:
        return beat.stop_requested.is_set()

    status, fields = jobs.FAILED, {}
    made: dict[str, str] = {}  # what the run put in the store, to take back when the store fails it
    evaluation = job["kind"] == jobs.EVALUATE
    doing = "evaluating" if evaluation else "quantizing"
    try:
        run = _evaluate if evaluation else _quantize
        status, fields = run(engine, job, scratch, on_progress, should_stop, made)
    except Cancelled as err:
        status, fields = jobs.CANCELLED, {"error": str(err) or "cancelled by request"}
    except StorageUnavailable as err:
        log.warning("job %s: %s", job_id, err)  # the store's address stays in the log
        if "artifact" in made:
            _forget_partial(made["artifact"])
        if should_stop():
            status, fields = jobs.CANCELLED, {"error": "cancelled by request"}
        else:
            status, fields = storage_retry(job, settings)
    except TarqError as err:
        status, fields = jobs.FAILED, {"error": _out_of_memory(err, doing) or str(err)}
    except SoftTimeLimitExceeded:
        status, fields = jobs.FAILED, {"error": f"time limit of {settings.quantize_time_limit} s exceeded "
                                                "(TARQ_QUANTIZE_TIME_LIMIT)"}
    except MemoryError:
        status, fields = jobs.FAILED, {"error": f"out of memory (host RAM) while {doing}"}
    except Exception as err:
        if type(err).__name__ == "OutOfMemoryError":  # torch.cuda.OutOfMemoryError, without importing torch here
            status, fields = jobs.FAILED, {"error": f"out of GPU memory while {doing}: {str(err).splitlines()[0]}"}
        elif _out_of_memory(err, doing):
            status, fields = jobs.FAILED, {"error": _out_of_memory(err, doing)}
        else:
            log.exception("job %s failed", job_id)
            status, fields = jobs.FAILED, {"error": f"internal error: {type(err).__name__}: {err}"}
    finally:
        beat.done.set()
        beat.join(timeout=5)
        shutil.rmtree(scratch, ignore_errors=True)
        _free_memory()
    try:
        # only the worker that holds the job may end it (a stale one that lost it to another must not)
        jobs.transition(engine, job_id, status, extra_where=jobs.jobs.c.worker == worker, **fields)
    except jobs.IllegalTransition as err:
        log.warning("job %s: %s", job_id, err)  # the reaper or a cancel got there first
        return {"job": job_id, "status": jobs.get_job(engine, job_id)["status"]}
    if status == jobs.QUEUED:
        _send_again(job_id, storage_retry_delay(job["attempts"], settings))
        return {"job": job_id, "status": status}
    _forget_partial(f"uploads/{job_id}")  # a finished job needs its uploads no more
    log.info("job %s %s", job_id, status)
    if job["callback_url"]:
        try:  # at once; the API's sweep sends it later if this try does not happen or fails
            callbacks.deliver(engine, settings, job_id)
        except Exception as err:  # noqa: BLE001 -- the job has ended either way
            log.warning("job %s: callback not sent: %s", job_id, err)
    return {"job": job_id, "status": status}


def _quantize(engine, job: dict, scratch: Path, on_progress, should_stop, made: dict) -> tuple[str, dict]:
    from tarq.config import QuantConfig
    from tarq.errors import Cancelled
    from tarq.pipeline import quantize_model

    job_id, config, files = job["id"], QuantConfig.from_dict(job["config"]), job["files"] or {}
    calib = storage().get_dir(f"uploads/{job_id}/calibration", scratch / "calibration") \
        if "calibration" in files else None
    eval_dir = storage().get_dir(f"uploads/{job_id}/eval", scratch / "eval") if "eval" in files else None
    source, name = source_files(engine, job["source_model"])
    model_id = jobs.new_model_id(name, config.method, config.bits, config.group_size)
    out = quantize_model(source, calib, scratch / "artifact", config, device=device(), progress=on_progress,
                         should_stop=should_stop, eval_dir=eval_dir, base_model=name)
    if should_stop():
        raise Cancelled("cancelled by request")
    info = _artifact_info(Path(out))
    info.pop("path", None)  # the scratch folder, gone after this task
    made["artifact"] = f"artifacts/{model_id}"
    storage().put_dir(Path(out), made["artifact"], move=True)
    jobs.add_model(engine, id=model_id, job_id=job_id, owner=job["owner"], base_model=job["source_model"],
                   method=config.method, bits=config.bits, group_size=config.group_size,
                   size_bytes=storage().size(made["artifact"]), info=_jsonable(info))
    return jobs.SUCCEEDED, {"model_id": model_id, "fraction": 1.0, "stage": "done"}


def _evaluate(engine, job: dict, scratch: Path, on_progress, should_stop, made: dict) -> tuple[str, dict]:
    """Score the model on the job's clips (tarq.evaluate) as this worker would serve it: the same files,
    device and TARQ_DTYPE. Loaded for the job and dropped with it, not kept in the transcription cache: a
    worker that only quantizes would otherwise hold it between jobs."""
    from tarq.errors import Cancelled
    from tarq.evaluate import evaluate
    from tarq.progress import Progress
    from tarq.qlinear import counting_kernels
    from tarq.transcribe import dtype_name, load

    config = job["config"]
    clips = storage().get_dir(f"uploads/{job['id']}/eval", scratch / "eval")
    source = model_files(config["model"])
    on_progress(Progress("load"))
    loaded = load(source, device=device(), dtype=get_settings().dtype)

    def progress(done: int, total: int) -> None:
        if should_stop():
            raise Cancelled("cancelled by request")
        on_progress(Progress("evaluate", done, total))

    # which int4 paths ran, as a transcription's X-Tarq-Kernels says: "dequant-bf16" is the encoder's int4
    # layers in bf16 (TARQ_CPU_BF16), which can move a fragile clip's greedy decoding
    with counting_kernels(loaded[0]) as kernels:
        result = evaluate(source, clips, batch_size=int(config["batch_size"]),
                          zipf_threshold=float(config["zipf_threshold"]), device=device(), loaded=loaded,
                          progress=progress)
    scores = result.summary() | {"model": job["source_model"], "dtype": dtype_name(loaded[0].dtype),
                                 "kernels": kernels, "hypotheses": result.hypotheses}
    scores.pop("data")  # the scratch folder
    return jobs.SUCCEEDED, {"result": _jsonable(scores), "fraction": 1.0, "stage": "done"}


def storage_retry_delay(attempts: int, settings) -> float:
    """Seconds before the next attempt of a job whose worker could not reach the artifact store, after
    `attempts` attempts: TARQ_STORAGE_RETRY_SECONDS doubled each time, at most half of
    TARQ_STALE_AFTER_SECONDS (a job queued longer with its message held looks lost to the reaper)."""
    return min(settings.storage_retry_seconds * 2 ** max(attempts - 1, 0), settings.stale_after_seconds / 2)


def storage_retry(job: dict, settings) -> tuple[str, dict]:
    """What a job becomes when the artifact store could not be reached: queued again while attempts
    remain (an outage is not the job's fault), else failed with the reason."""
    attempts = job["attempts"]
    if attempts >= settings.max_attempts:
        return jobs.FAILED, {"error": f"the artifact store was unavailable in all {attempts} attempts "
                                      "(TARQ_MAX_ATTEMPTS); the worker's log has the details"}
    delay = storage_retry_delay(attempts, settings)
    return jobs.QUEUED, {"worker": None, "error": f"the artifact store was unavailable (attempt {attempts} of "
                                                  f"{settings.max_attempts}); trying again in {delay:g} s"}


def _send_again(job_id: str, delay: float) -> None:
    from app.routes.job_routes import send_job

    try:
        send_job(app, job_id, countdown=delay)
        log.warning("job %s: artifact store unavailable; sent again to start in %g s", job_id, delay)
    except Exception as err:  # noqa: BLE001 -- queued with no message: the reaper or a starting worker sends it
        log.error("job %s: could not send it again: %s", job_id, err)


def _forget_partial(key: str) -> None:
    """Delete what a job left in the store; a store still down leaves it (logged), the job's state is
    already recorded."""
    try:
        storage().delete(key)
    except StorageUnavailable as err:
        log.warning("could not delete %s: %s", key, err)


def _out_of_memory(err: BaseException, doing: str = "quantizing") -> str | None:
    """Host RAM ran out without a MemoryError: torch's CPU allocator raises RuntimeError, and a failed
    mmap of the weights surfaces as the loader's ModelError. Both carry ENOMEM's text."""
    text = str(err)
    if "can't allocate memory" in text or "Cannot allocate memory" in text:
        return f"out of memory (host RAM) while {doing}: {text.splitlines()[0][:300]}"
    return None


def _artifact_info(path: Path) -> dict:
    try:
        from tarq.artifact_info import artifact_info
    except ImportError:  # the contract also places it in tarq.artifact
        from tarq.artifact import artifact_info
    return artifact_info(path)


def _jsonable(value):
    import json

    return json.loads(json.dumps(value, default=str))


def model_cache():
    """This process's loaded models (tarq.transcribe.ModelCache), made on first use."""
    global _cache
    with _cache_made:
        if _cache is None:
            from tarq.transcribe import ModelCache

            _cache = ModelCache(max_models=get_settings().model_cache_size)
    return _cache


def source_files(engine, source: str) -> tuple[Path | str, str]:
    """A job's model and what its model card calls it: the folder of a model uploaded to the server
    (copied from remote storage once) and the name it was uploaded under, else the Hub id or server
    folder the API checked, twice."""
    try:
        uploaded = jobs.get_model(engine, source)
    except jobs.ModelNotFound:
        return source, source
    return storage().local_dir(f"artifacts/{source}"), uploaded["base_model"]


def model_files(model: dict) -> Path | str:
    """Where a model the API resolved ({"artifact": id} or {"source": ...}) is read from."""
    if "artifact" in model:
        return storage().local_dir(f"artifacts/{model['artifact']}")
    return model["source"]


def preload(names: list[str]) -> None:
    """Load `names` (as a transcription's `model` field names them) into this process's model cache and run
    each encoder once, so that the first request for them pays neither the load nor the first call's
    setup (kernel weight packing, oneDNN primitives). A name that does not resolve or load is logged and
    skipped: the worker serves the others."""
    import torch

    from app.routes.transcriptions import resolve_model
    from tarq.models.whisper import encode
    from tarq.transcribe import dtype_name

    def warm_up(model) -> None:  # under the cache's lock: a request waits for it, never runs beside it
        with torch.inference_mode():
            encode(model, torch.zeros(1, model.config.num_mel_bins, 3000, dtype=model.dtype, device=model.device))

    settings = get_settings()
    engine = get_engine(settings.database)
    for name in names:
        start = time.perf_counter()
        try:
            source = model_files(resolve_model(name, settings, engine))
            model, _ = model_cache().get(str(source), device(), settings.dtype, prepare=warm_up)
        except Exception as err:  # noqa: BLE001 -- any failure is this one model's: report it, go on
            log.error("cannot preload model %r: %s", name, getattr(err, "message", None) or err)
            continue
        log.info("preloaded model %r (%s) in %.1f s", name, dtype_name(model.dtype), time.perf_counter() - start)


@contextmanager
def beating(task, every: float):
    """While the block runs, rewrite the task's STARTED state (Celery's pid and node name) every `every`
    seconds with a counter that goes up: the API's wait sends the task again once the counter stops
    (app.task_wait), which is how it learns that the process running it died. Stopped and joined before
    the block's result is stored, so that no beat lands after it."""
    # read here: Celery's task.request is thread-local, and empty in the beat's thread
    task_id, meta = task.request.id, {"pid": os.getpid(), "hostname": task.request.hostname}
    done = threading.Event()

    def run() -> None:
        n = 0
        while True:
            try:
                task.update_state(task_id=task_id, state="STARTED", meta={**meta, "beat": n})
            except Exception as err:  # a backend blip must not fail the request; the next beat retries
                log.warning("beat of task %s failed: %s", task_id, err)
            if done.wait(every):
                return
            n += 1

    thread = threading.Thread(target=run, daemon=True, name=f"beat-{task_id}")
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


@contextmanager
def _timed(seconds: dict, step: str):
    """seconds[step]: how long the block took (left out when it raised)."""
    start = time.perf_counter()
    yield
    seconds[step] = time.perf_counter() - start


@app.task(name="tarq.transcribe", bind=True, acks_late=True, reject_on_worker_lost=True,
          soft_time_limit=_settings.transcribe_time_limit, time_limit=_settings.transcribe_time_limit + 30)
def transcribe(self, payload: dict) -> dict:
    settings = get_settings()
    with beating(self, settings.heartbeat_seconds):
        return _transcribe(payload, settings)


def _transcribe(payload: dict, settings) -> dict:
    from tarq.audio import load_audio
    from tarq.errors import TarqError
    from tarq.qlinear import counting_kernels
    from tarq.transcribe import dtype_name
    from tarq.transcribe import transcribe as run

    seconds = {}  # where the worker's time went, for the API's Server-Timing header
    try:
        with _timed(seconds, "model"):
            loaded, processor = model_cache().get(str(model_files(payload["model"])), device(), settings.dtype)
        with _timed(seconds, "audio"):
            audio = load_audio(storage().get_bytes(payload["audio_key"]), name=payload.get("name"),
                               max_seconds=settings.max_audio_seconds)
        # a pool process runs one task at a time: the calls counted are this request's
        with _timed(seconds, "transcribe"), counting_kernels(loaded) as kernels:
            transcript = run(loaded, processor, audio, language=payload.get("language"),
                             prompt=payload.get("prompt"), temperature=float(payload.get("temperature") or 0.0),
                             word_timestamps=bool(payload.get("word_timestamps")),
                             task=payload.get("task") or "transcribe",
                             no_speech_threshold=settings.no_speech_threshold,
                             logprob_threshold=settings.logprob_threshold,
                             temperature_increment=settings.temperature_increment_on_fallback,
                             compression_ratio_threshold=settings.compression_ratio_threshold)
        return {"transcript": transcript.to_dict(), "kernels": kernels, "dtype": dtype_name(loaded.dtype),
                "seconds": seconds}
    except TarqError as err:
        return {"error": {"type": type(err).__name__, "message": str(err)}}
    except StorageUnavailable as err:  # the API answers 503, as when it cannot reach the store itself
        return {"error": {"type": "StorageUnavailable", "message": str(err)}}
    except FileNotFoundError as err:
        return {"error": {"type": "ModelError", "message": f"model files not found: {err}"}}
