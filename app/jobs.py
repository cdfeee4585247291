"""Job records and their state machine: queued -> running -> succeeded | failed | cancelled.

Every change is one guarded UPDATE (`... WHERE status IN (allowed sources)`), so two processes racing
on a job (API cancelling, worker finishing, the reaper) cannot both win; the loser sees
IllegalTransition and the API answers 409. Used by the API and by the worker.
"""
from __future__ import annotations

import secrets
from datetime import datetime, timedelta, timezone

from sqlalchemy import Engine, and_, delete, func, insert, or_, select, update
from sqlalchemy.exc import IntegrityError

from app.db import jobs, models

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "queued", "running", "succeeded", "failed", "cancelled"
QUANTIZE, EVALUATE = "quantize", "evaluate"  # a job's kind: it makes a model, or scores one
KINDS = {QUANTIZE: "quantization", EVALUATE: "evaluation"}  # kind -> what the API calls it
UPLOADED = "none"  # the `method` of a model uploaded as it is (POST /v1/models): a base model to quantize
TERMINAL = frozenset({SUCCEEDED, FAILED, CANCELLED})
# running -> queued is the reaper handing a lost job to the next worker.
TRANSITIONS: dict[str, frozenset[str]] = {
    QUEUED: frozenset({RUNNING, FAILED, CANCELLED}),
    RUNNING: frozenset({SUCCEEDED, FAILED, CANCELLED, QUEUED}),
    SUCCEEDED: frozenset(),
    FAILED: frozenset(),
    CANCELLED: frozenset(),
}


class JobNotFound(LookupError):
    def __init__(self, job_id: str, kind: str = QUANTIZE):
        super().__init__(f"no {KINDS.get(kind, 'job')} job with id {job_id!r}")
        self.job_id = job_id


class IllegalTransition(RuntimeError):
    def __init__(self, job_id: str, current: str, wanted: str):
        super().__init__(f"job {job_id} is {current}; it cannot become {wanted}")
        self.job_id, self.current, self.wanted = job_id, current, wanted


def now() -> datetime:
    return datetime.now(timezone.utc)


def new_id() -> str:
    return secrets.token_hex(16)  # 128 random bits: unguessable


def new_model_id(base_model: str, method: str, bits: int, group_size: int) -> str:
    return f"{model_stem(base_model)}-{method}-w{bits}g{group_size}-{secrets.token_hex(8)}"


def new_upload_id(name: str) -> str:
    return f"{model_stem(name)}-{secrets.token_hex(8)}"


def model_stem(name: str) -> str:
    """The last part of a Hub id or path, in characters safe for an id."""
    stem = name.rstrip("/").replace("\\", "/").split("/")[-1] or "model"
    return "".join(c if c.isalnum() or c in "-." else "-" for c in stem)[:40].strip("-.") or "model"


def _aware(value: datetime | None) -> datetime | None:
    # SQLite hands back naive datetimes; everything stored is UTC.
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    return value


def _row(row) -> dict:
    data = dict(row._mapping)
    for key in ("created_at", "updated_at", "started_at", "finished_at", "heartbeat_at", "callback_at"):
        if key in data:
            data[key] = _aware(data[key])
    return data


# jobs ----------------------------------------------------------------------------------------------------
def create_job(
    engine: Engine,
    *,
    owner: str,
    source_model: str,
    config: dict,
    files: dict,
    idempotency_key: str | None = None,
    job_id: str | None = None,
    kind: str = QUANTIZE,
    callback_url: str | None = None,
) -> tuple[dict, bool]:
    """Insert a queued job; with an idempotency key already used by this owner, return that job instead
    (of whatever kind: the route tells a client who used a key for another kind). Returns (job, created)."""
    if idempotency_key:
        existing = find_by_idempotency_key(engine, owner, idempotency_key)
        if existing:
            return existing, False
    stamp = now()
    values = dict(
        id=job_id or new_id(), status=QUEUED, owner=owner, idempotency_key=idempotency_key or None,
        source_model=source_model, config=config, files=files, fraction=0.0, cancel_requested=False,
        attempts=0, created_at=stamp, updated_at=stamp, kind=kind, callback_url=callback_url,
    )
    try:
        with engine.begin() as conn:
            conn.execute(insert(jobs).values(**values))
    except IntegrityError:
        if idempotency_key:  # a concurrent request with the same key won the insert
            existing = find_by_idempotency_key(engine, owner, idempotency_key)
            if existing:
                return existing, False
        raise
    return get_job(engine, values["id"]), True


def find_by_idempotency_key(engine: Engine, owner: str, key: str, table=jobs) -> dict | None:
    """The job this owner submitted with this key (with table=models: the model it uploaded)."""
    with engine.connect() as conn:
        row = conn.execute(select(table).where(table.c.owner == owner, table.c.idempotency_key == key)).first()
    return _row(row) if row else None


def find_upload_by_idempotency_key(engine: Engine, owner: str, key: str) -> dict | None:
    return find_by_idempotency_key(engine, owner, key, table=models)


def get_job(engine: Engine, job_id: str, kind: str | None = None) -> dict:
    """The job; with `kind`, only a job of that kind (an evaluation's id is no quantization's)."""
    query = select(jobs).where(jobs.c.id == job_id)
    if kind is not None:
        query = query.where(jobs.c.kind == kind)
    with engine.connect() as conn:
        row = conn.execute(query).first()
    if row is None:
        raise JobNotFound(job_id, kind or QUANTIZE)
    return _row(row)


def list_jobs(engine: Engine, *, limit: int = 20, after: str | None = None, status: str | None = None,
              kind: str = QUANTIZE, source_model: str | None = None) -> list[dict]:
    """Newest first; `after` is the id of the last job of the previous page (cursor pagination)."""
    query = select(jobs).where(jobs.c.kind == kind)
    if status:
        query = query.where(jobs.c.status == status)
    if source_model:
        query = query.where(jobs.c.source_model == source_model)
    if after:
        cursor = get_job(engine, after, kind)
        query = query.where(
            or_(jobs.c.created_at < cursor["created_at"],
                and_(jobs.c.created_at == cursor["created_at"], jobs.c.id < cursor["id"]))
        )
    query = query.order_by(jobs.c.created_at.desc(), jobs.c.id.desc()).limit(limit)
    with engine.connect() as conn:
        return [_row(r) for r in conn.execute(query)]


def queued_ids(engine: Engine) -> list[str]:
    with engine.connect() as conn:
        return list(conn.scalars(select(jobs.c.id).where(jobs.c.status == QUEUED).order_by(jobs.c.created_at)))


def active_jobs_from(engine: Engine, source_model: str) -> list[str]:
    """Ids of the queued or running jobs that quantize or evaluate `source_model`."""
    with engine.connect() as conn:
        rows = conn.execute(select(jobs.c.id).where(jobs.c.source_model == source_model,
                                                    jobs.c.status.in_((QUEUED, RUNNING))).order_by(jobs.c.id))
        return [r.id for r in rows]


def queued_since(engine: Engine) -> dict[str, datetime]:
    """Each queued job and when it became queued (submitted, or handed back by the reaper)."""
    with engine.connect() as conn:
        rows = conn.execute(select(jobs.c.id, jobs.c.updated_at).where(jobs.c.status == QUEUED)).all()
    return {job_id: _aware(stamp) for job_id, stamp in rows}


def count_by_status(engine: Engine) -> dict[tuple[str, str], int]:
    """{(kind, status): jobs}"""
    with engine.connect() as conn:
        rows = conn.execute(select(jobs.c.kind, jobs.c.status, func.count()).group_by(jobs.c.kind, jobs.c.status))
        return {(kind, status): n for kind, status, n in rows}


def transition(engine: Engine, job_id: str, to: str, *, extra_where=None, **fields) -> dict:
    """Move a job to `to` if its current status allows it; raise IllegalTransition otherwise."""
    sources = [s for s, targets in TRANSITIONS.items() if to in targets]
    stamp = now()
    values = {"status": to, "updated_at": stamp, **fields}
    if to in TERMINAL:
        values.setdefault("finished_at", stamp)
    query = update(jobs).where(jobs.c.id == job_id, jobs.c.status.in_(sources))
    if extra_where is not None:
        query = query.where(extra_where)
    with engine.begin() as conn:
        changed = conn.execute(query.values(**values)).rowcount
    if not changed:
        current = get_job(engine, job_id)["status"]  # raises JobNotFound
        raise IllegalTransition(job_id, current, to)
    return get_job(engine, job_id)


def request_cancel(engine: Engine, job_id: str) -> dict:
    """A queued job is cancelled at once; a running one is flagged and its worker stops at the next
    layer boundary; a finished one cannot be cancelled (IllegalTransition -> 409)."""
    job = get_job(engine, job_id)
    if job["status"] == QUEUED:
        try:
            return transition(engine, job_id, CANCELLED, error="cancelled before it started")
        except IllegalTransition:
            job = get_job(engine, job_id)  # a worker claimed it meanwhile: fall through to running
    if job["status"] == RUNNING:
        with engine.begin() as conn:
            changed = conn.execute(
                update(jobs).where(jobs.c.id == job_id, jobs.c.status == RUNNING)
                .values(cancel_requested=True, updated_at=now())
            ).rowcount
        if changed:
            return get_job(engine, job_id)
        job = get_job(engine, job_id)
    raise IllegalTransition(job_id, job["status"], CANCELLED)


def claim(engine: Engine, job_id: str, worker: str, stale_after: float) -> dict | None:
    """Mark a job running for this worker. Also takes over a running job whose heartbeat went stale
    (its worker died and the broker redelivered). None when the job is finished, cancelled, or alive
    elsewhere: the task then has nothing to do."""
    stamp = now()
    stale = stamp - timedelta(seconds=stale_after)
    query = (
        update(jobs)
        .where(jobs.c.id == job_id,
               or_(jobs.c.status == QUEUED,
                   and_(jobs.c.status == RUNNING, or_(jobs.c.heartbeat_at.is_(None), jobs.c.heartbeat_at < stale))))
        .values(status=RUNNING, worker=worker, started_at=stamp, heartbeat_at=stamp, updated_at=stamp,
                attempts=jobs.c.attempts + 1, error=None)
    )
    with engine.begin() as conn:
        if not conn.execute(query).rowcount:
            return None
    return get_job(engine, job_id)


def heartbeat(engine: Engine, job_id: str, worker: str) -> bool:
    """Refresh the heartbeat; returns whether a cancel was requested (or the job was taken from us)."""
    with engine.begin() as conn:
        conn.execute(update(jobs).where(jobs.c.id == job_id, jobs.c.status == RUNNING, jobs.c.worker == worker)
                     .values(heartbeat_at=now()))
        row = conn.execute(select(jobs.c.status, jobs.c.cancel_requested, jobs.c.worker)
                           .where(jobs.c.id == job_id)).first()
    return row is None or bool(row.cancel_requested) or row.status != RUNNING or row.worker != worker


def set_progress(engine: Engine, job_id: str, progress: dict) -> None:
    values = {k: progress.get(k) for k in ("stage", "layer", "layers_total", "loss")}
    values["fraction"] = float(progress.get("fraction") or 0.0)
    stamp = now()
    with engine.begin() as conn:
        conn.execute(update(jobs).where(jobs.c.id == job_id, jobs.c.status == RUNNING)
                     .values(**values, updated_at=stamp, heartbeat_at=stamp))


def reap_stale(engine: Engine, stale_after: float, max_attempts: int) -> list[tuple[str, str]]:
    """Running jobs whose worker stopped heartbeating: back to queued (to be sent again) while attempts
    remain, else failed with the reason. Returns [(job_id, new_status)]."""
    stale = now() - timedelta(seconds=stale_after)
    with engine.connect() as conn:
        rows = conn.execute(select(jobs.c.id, jobs.c.attempts).where(
            jobs.c.status == RUNNING, or_(jobs.c.heartbeat_at.is_(None), jobs.c.heartbeat_at < stale))).all()
    done = []
    guard = or_(jobs.c.heartbeat_at.is_(None), jobs.c.heartbeat_at < stale)
    for job_id, attempts in rows:
        try:
            if attempts < max_attempts:
                transition(engine, job_id, QUEUED, extra_where=guard, worker=None, cancel_requested=False)
                done.append((job_id, QUEUED))
            else:
                transition(engine, job_id, FAILED, extra_where=guard,
                           error=f"worker lost: no heartbeat for {stale_after:.0f} s, {attempts} attempts made")
                done.append((job_id, FAILED))
        except IllegalTransition:
            pass  # it finished or heartbeated meanwhile
    return done


def public_job(job: dict) -> dict:
    """The JSON a client sees: a quantization's (its source and the model it made) or an evaluation's (the
    model it scored and the result)."""
    if job.get("kind") == EVALUATE:
        own = {"object": "evaluation", "model": job["source_model"], "result": job["result"]}
    else:
        own = {"object": "quantization", "source_model": job["source_model"], "model": job["model_id"]}
    stamps = ("created_at", "started_at", "finished_at", "heartbeat_at")
    return {
        "id": job["id"],
        **own,
        "status": job["status"],
        "config": job["config"],
        "files": job["files"],
        "progress": {
            "stage": job["stage"],
            "layer": job["layer"],
            "layers_total": job["layers_total"],
            "fraction": job["fraction"] or 0.0,
            "loss": job["loss"],
        },
        "error": job["error"],
        "cancel_requested": bool(job["cancel_requested"]),
        "attempts": job["attempts"],
        "idempotency_key": job["idempotency_key"],
        "callback": {"url": job["callback_url"], "status": job["callback_status"] or "waiting",
                     "attempts": job["callback_attempts"] or 0, "error": job["callback_error"]}
        if job.get("callback_url") else None,
        **{k: job[k].isoformat() if job[k] else None for k in stamps},
    }


# models --------------------------------------------------------------------------------------------------
class ModelNotFound(LookupError):
    def __init__(self, model_id: str):
        super().__init__(f"no model with id {model_id!r}")
        self.model_id = model_id


def add_model(engine: Engine, **values) -> dict:
    values.setdefault("created_at", now())
    with engine.begin() as conn:
        conn.execute(insert(models).values(**values))
    return get_model(engine, values["id"])


def get_model(engine: Engine, model_id: str) -> dict:
    with engine.connect() as conn:
        row = conn.execute(select(models).where(models.c.id == model_id)).first()
    if row is None:
        raise ModelNotFound(model_id)
    return _row(row)


def list_models(engine: Engine) -> list[dict]:
    with engine.connect() as conn:
        return [_row(r) for r in conn.execute(select(models).order_by(models.c.created_at.desc()))]


def delete_model(engine: Engine, model_id: str) -> None:
    with engine.begin() as conn:
        if not conn.execute(delete(models).where(models.c.id == model_id)).rowcount:
            raise ModelNotFound(model_id)


def public_model(model: dict) -> dict:
    """OpenAI's model object plus what a platform wants to know about a quantized model."""
    info = model["info"] or {}
    return {
        "id": model["id"],
        "object": "model",
        "created": int(model["created_at"].timestamp()),
        "owned_by": "tarq",
        "base_model": model["base_model"],
        "method": model["method"],
        "bits": model["bits"],
        "group_size": model["group_size"],
        "size_bytes": model["size_bytes"],
        "job_id": model["job_id"],
        "metrics": info.get("metrics"),
        "info": info,
    }
