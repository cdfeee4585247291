"""What /v1/quantizations and /v1/evaluations share: both are job records (app.jobs) of one kind each,
listed a page at a time, cancelled and followed as server-sent events the same way."""
from __future__ import annotations

import asyncio
import json
import logging

from anyio import to_thread
from fastapi.responses import JSONResponse
from sse_starlette import EventSourceResponse

from app import jobs
from app.schemas import ApiError

log = logging.getLogger("tarq.api")

PUBLISH_RETRY = {"max_retries": 2, "interval_start": 0, "interval_step": 0.5, "interval_max": 1}
STATUS_PATTERN = "^(queued|running|succeeded|failed|cancelled)$"
MODEL_FILTER = "only those of this model, as their records name it"
EVENTS_ANSWER = {200: {"content": {"text/event-stream": {}}, "description": "progress events"}}


def send_job(celery, job_id: str, countdown: float | None = None) -> None:
    """Send the task that runs a job record of either kind. It is named for the first kind there was, and
    keeps that name so that messages already queued by an older version still run; the `quantize` queue
    is the one for long jobs, one per GPU."""
    # The SQL record is the job's result: nothing to wait for in the result backend, and a fast failure
    # (503) when the broker is down rather than minutes of reconnecting.
    celery.send_task("tarq.quantize", args=[job_id], queue="quantize", ignore_result=True,
                     retry_policy=PUBLISH_RETRY, countdown=countdown)


def replayed(engine, owner: str, idempotency_key: str | None, kind: str) -> JSONResponse | None:
    """The answer to a submission whose Idempotency-Key this owner sent before: 200 with that job, or 409
    when the key went with a job of the other kind; None for a new key."""
    earlier = jobs.find_by_idempotency_key(engine, owner, idempotency_key) if idempotency_key else None
    if earlier is None:
        return None
    if earlier["kind"] != kind:
        raise ApiError(409, f"Idempotency-Key {idempotency_key!r} was sent with {jobs.KINDS[earlier['kind']]} "
                            f"{earlier['id']}; use a new key for this {jobs.KINDS[kind]}", param="idempotency-key",
                       code="idempotency_key_reused")
    return JSONResponse(jobs.public_job(earlier), status_code=200)


CALLBACK_FIELD = ("an http(s) URL the job's final state is POSTed to, signed (X-Tarq-Signature: HMAC-SHA256 "
                  "keyed with the hex sha256 of your API key)")


def submit(engine, storage, celery, *, kind: str, job_id: str, owner: str, source: str, config: dict, files: dict,
           idempotency_key: str | None, what: str, callback_url: str | None = None) -> JSONResponse:
    """Record a job whose uploads are stored under uploads/<job_id> and send it: 202 with the job. A
    concurrent submission with the same key that won answers instead (200, these uploads dropped); a
    broker that cannot take the message leaves the job failed with the reason and answers 503."""
    try:
        job, created = jobs.create_job(engine, owner=owner, source_model=source, config=config, files=files,
                                       idempotency_key=idempotency_key, job_id=job_id, kind=kind,
                                       callback_url=callback_url)
    except Exception:
        storage.delete(f"uploads/{job_id}")
        raise
    if not created:
        storage.delete(f"uploads/{job_id}")
        return replayed(engine, owner, idempotency_key, kind)
    try:
        send_job(celery, job_id)
    except Exception as err:
        log.exception("could not queue job %s", job_id)
        jobs.transition(engine, job_id, jobs.FAILED, error=f"could not queue the job: {err}")
        storage.delete(f"uploads/{job_id}")
        raise ApiError(503, f"the job queue (broker) is unavailable: {type(err).__name__}", type="server_error",
                       code="broker_unavailable") from None
    from app.routes.health import JOBS_SUBMITTED

    JOBS_SUBMITTED.labels(kind).inc()
    log.info("job %s queued: %s", job_id, what)
    return JSONResponse(jobs.public_job(job), status_code=202)


def page(engine, kind: str, limit: int, after: str | None, status: str | None, model: str | None) -> dict:
    rows = jobs.list_jobs(engine, limit=limit + 1, after=after, status=status, kind=kind, source_model=model)
    shown = rows[:limit]
    return {"object": "list", "data": [jobs.public_job(j) for j in shown], "has_more": len(rows) > limit,
            "last_id": shown[-1]["id"] if shown else None}


def cancel(engine, storage, job_id: str, kind: str) -> JSONResponse:
    """A queued job ends at once; a running one stops at its next step (its worker marks it cancelled);
    a finished one answers 409."""
    jobs.get_job(engine, job_id, kind)  # 404 for an id of the other kind
    job = jobs.request_cancel(engine, job_id)
    if job["status"] == jobs.CANCELLED:
        storage.delete(f"uploads/{job_id}")
    return JSONResponse(jobs.public_job(job), status_code=202)


async def events(engine, job_id: str, kind: str, interval: float) -> EventSourceResponse:
    """`progress` with the job whenever it changes, then one `end` event with the job in its final state."""
    job = await to_thread.run_sync(jobs.get_job, engine, job_id, kind)  # 404 before the stream starts

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
