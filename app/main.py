"""The FastAPI application: create_app() wires routers, error handlers, auth and the stale-job reaper.

Run it with `tarq serve`, or `uvicorn --factory app.main:create_app`. Nothing heavy happens at import:
settings, the database and the queue are touched in the lifespan and in dependencies.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging

from anyio import to_thread
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import SQLAlchemyError
from starlette.exceptions import HTTPException as StarletteHTTPException

from app import jobs, logs, redis_broker
from app.auth import check_key
from app.ratelimit import RateLimiter, retry_after
from app.schemas import ApiError, error_body
from app.settings import Settings, get_settings
from app.storage import StorageUnavailable

log = logging.getLogger("tarq.api")
OPEN_PATHS = ("/healthz", "/readyz", "/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect")
RATE_LIMITED = ("/v1/quantizations", "/v1/evaluations", "/v1/models")  # POSTs: work queued or stored per call
CALLBACK_SWEEP_SECONDS = 2.0  # how often each API process looks for job callbacks that are due
MULTIPART_SLACK = 1 << 20  # form fields and part headers on top of the files themselves


def body_limit(path: str, settings) -> tuple[int, str]:
    """The most a request body to `path` may hold, and the setting that says so."""
    if path.startswith("/v1/audio"):
        return settings.max_file_bytes, "TARQ_MAX_FILE_BYTES"
    if path.rstrip("/") == "/v1/models":
        return settings.max_model_bytes, "TARQ_MAX_MODEL_BYTES"
    return settings.max_total_bytes, "TARQ_MAX_TOTAL_BYTES"


def error_response(status: int, message: str, **kw) -> JSONResponse:
    headers = kw.pop("headers", None)
    return JSONResponse(error_body(status, message, **kw), status_code=status, headers=headers)


def _settings_for(app: FastAPI) -> Settings:
    # honour a test's dependency override in the middleware and the lifespan too
    return app.dependency_overrides.get(get_settings, get_settings)()


def _limiter_for(app: FastAPI, settings: Settings) -> RateLimiter:
    """The app's submission limiter, rebuilt if the settings' rate changed (tests override settings)."""
    wanted = (settings.rate_limit_per_minute, settings.rate_limit_burst)
    current = getattr(app.state, "limiter", None)
    if current is None or current[0] != wanted:
        current = (wanted, RateLimiter(*wanted))
        app.state.limiter = current
    return current[1]


def reap_once(settings: Settings) -> list[tuple[str, str]]:
    """Hand lost running jobs back to the queue (or fail them), see jobs.reap_stale; on Redis also send
    again the queued jobs whose message a worker took and never started, or that have none, see
    app.redis_broker.lost_quantizations. Returns [(job_id, new status)] of both. Several API processes may
    reap at once: a job sent twice is claimed once (jobs.claim)."""
    from app.db import get_engine
    from app.deps import celery_client
    from app.routes.job_routes import send_job

    engine = get_engine(settings.database)
    celery = celery_client(settings)
    done = jobs.reap_stale(engine, settings.stale_after_seconds, settings.max_attempts)
    for job_id, status in done:
        log.warning("job %s lost its worker; now %s", job_id, status)
    lost = [job_id for job_id, status in done if status == jobs.QUEUED]
    if settings.redis_broker:
        try:
            if done:  # the dead worker's copies: Redis would give them back after the visibility timeout
                redis_broker.drop_held_jobs(celery, {job_id for job_id, _ in done})
            queued = {k: v for k, v in jobs.queued_since(engine).items() if k not in lost}
            taken = redis_broker.lost_quantizations(celery, queued, settings.stale_after_seconds)
        except Exception as err:  # noqa: BLE001 -- the reaped jobs above are still sent
            log.error("could not read the messages workers hold: %s", err)
            taken = {}
        for job_id, why in sorted(taken.items()):
            log.warning("job %s %s: sent again", job_id, why)
            done.append((job_id, jobs.QUEUED))
            lost.append(job_id)
    for job_id in lost:
        try:
            send_job(celery, job_id)
        except Exception as err:
            log.error("could not requeue job %s: %s", job_id, err)
    return done


def send_callbacks(settings: Settings) -> dict[str, str]:
    """The job callbacks that are due (app.callbacks): jobs this API ended, retries, orphaned claims."""
    from app import callbacks
    from app.db import get_engine

    return callbacks.deliver_due(get_engine(settings.database), settings)


def create_app() -> FastAPI:
    logs.setup()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        settings = _settings_for(app)
        settings.ensure_dirs()
        if not settings.key_hashes():
            log.warning("no API key configured: every request will be refused (set TARQ_API_KEYS)")
        try:
            from app.db import get_engine

            await to_thread.run_sync(get_engine, settings.database)  # creates the tables
        except Exception as err:  # the API still starts; /readyz reports the database down
            log.error("database unavailable at startup: %s", err)

        async def every(interval: float, work, name: str):
            while True:
                await asyncio.sleep(interval)
                try:
                    await to_thread.run_sync(work, settings)
                except Exception as err:
                    log.warning("%s: %s", name, err)

        # callbacks in a loop of their own: a receiver that times out must not hold up the reaper
        tasks = [asyncio.create_task(every(max(1.0, min(30.0, settings.stale_after_seconds / 4)), reap_once, "reaper")),
                 asyncio.create_task(every(CALLBACK_SWEEP_SECONDS, send_callbacks, "callbacks"))]
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()

    app = FastAPI(
        title="tarq",
        version=_version(),
        summary="Tail-aware quantization of Whisper models, as a job API, plus OpenAI-compatible transcription.",
        lifespan=lifespan,
    )

    @app.middleware("http")
    async def guard(request: Request, call_next):
        """Refuse unauthenticated or oversize requests before their body is read."""
        from app.routes.health import REQUESTS

        path = request.url.path
        if path not in OPEN_PATHS:
            settings = _settings_for(app)
            try:
                key_hash = check_key(request.headers.get("authorization"), settings, request.method, path)
            except ApiError as err:
                return error_response(err.status, err.message, type=err.type, code=err.code, headers=err.headers)
            if request.method == "POST" and path.rstrip("/") in RATE_LIMITED:
                wait = _limiter_for(app, settings).take(key_hash) if settings.rate_limit_per_minute > 0 else 0.0
                if wait > 0:
                    return error_response(
                        429, f"rate limit of {settings.rate_limit_per_minute:g} submissions a minute per API key "
                             f"reached; retry in {retry_after(wait)} s (TARQ_RATE_LIMIT_PER_MINUTE)",
                        code="rate_limit_exceeded", headers={"Retry-After": retry_after(wait)})
            length = request.headers.get("content-length")
            if length and length.isdigit() and request.method in ("POST", "PUT", "PATCH"):
                limit, name = body_limit(path, settings)
                if int(length) > limit + MULTIPART_SLACK:
                    return error_response(413, f"request body of {length} bytes is over the limit of {limit} "
                                               f"bytes ({name})", code="upload_too_large")
        response = await call_next(request)
        route = request.scope.get("route")
        REQUESTS.labels(request.method, getattr(route, "path", "unmatched"), str(response.status_code)).inc()
        return response

    @app.middleware("http")
    async def identify(request: Request, call_next):
        """Name the request (X-Request-ID, in the response and the API's log lines); outermost, so that
        the guard's refusals carry the id too."""
        rid = logs.request_id(request.headers.get(logs.HEADER))
        token = logs.REQUEST_ID.set(rid)
        try:
            response = await call_next(request)
        finally:
            logs.REQUEST_ID.reset(token)
        response.headers[logs.HEADER] = rid
        return response

    @app.exception_handler(ApiError)
    async def api_error(_request: Request, err: ApiError):
        return error_response(err.status, err.message, type=err.type, param=err.param, code=err.code,
                              headers=err.headers)

    @app.exception_handler(jobs.JobNotFound)
    @app.exception_handler(jobs.ModelNotFound)
    async def not_found(_request: Request, err: LookupError):
        return error_response(404, str(err), code="not_found")

    @app.exception_handler(jobs.IllegalTransition)
    async def conflict(_request: Request, err: jobs.IllegalTransition):
        return error_response(409, str(err), code="illegal_state_change")

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, err: RequestValidationError):
        first = err.errors()[0] if err.errors() else {}
        where = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path", "header")]
        field = ".".join(where) or None
        message = f"field {field!r}: {first.get('msg', 'invalid')}" if field else first.get("msg", "invalid request")
        return error_response(422, message, param=field, code="invalid_field")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, err: StarletteHTTPException):
        message = err.detail if isinstance(err.detail, str) else "request refused"
        return error_response(err.status_code, message, headers=getattr(err, "headers", None))

    @app.exception_handler(SQLAlchemyError)
    async def database_down(_request: Request, err: SQLAlchemyError):
        log.error("database error: %s", err)
        return error_response(503, "the job database is unavailable; try again shortly", type="server_error",
                              code="database_unavailable")

    @app.exception_handler(StorageUnavailable)
    async def storage_down(_request: Request, err: StorageUnavailable):
        log.error("%s", err)
        return error_response(503, "the artifact store is unavailable; try again shortly", type="server_error",
                              code="storage_unavailable")

    @app.exception_handler(Exception)
    async def internal(_request: Request, err: Exception):
        log.exception("unhandled error")
        return error_response(500, f"internal error: {type(err).__name__}", type="server_error")

    from app.routes import evaluations, health, models, quantizations, transcriptions

    for module in (health, quantizations, evaluations, models, transcriptions):
        app.include_router(module.router)
    return app


def _version() -> str:
    try:
        from tarq import __version__

        return __version__
    except ImportError:
        return "0"
