"""What the embedded broker (Celery over kombu's filesystem transport) cannot do by itself: give back a
message whose worker died, a quantization's (resend_lost_jobs here) or a transcription's (app.task_wait,
which reads the queue folder through waiting_task_ids).

Redis keeps a late-acked message aside while a worker holds it (app.redis_broker covers its worker's
death). The filesystem transport moves a message out of the queue folder when a worker takes it, so a worker killed after taking a quantization but
before starting it (a running one has a heartbeat, which the API's reaper watches) leaves the job
`queued` with no message anywhere. A worker that starts on this broker therefore sends again every
queued job whose message is not in the folder. A job can be sent twice that way (a message another live
worker holds, a submission between the database write and its message); that costs nothing: the first
delivery claims the job and the second finds nothing to do (jobs.claim).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from app import broker_messages, jobs
from app.settings import Settings

log = logging.getLogger("tarq.worker")  # resend_lost_jobs runs in a starting worker


def _messages(queue_folder: Path, queue: str):
    """(headers, args) of each message waiting in `queue`. A file that cannot be read as one (being
    written, or not ours) is skipped: at worst its job or task is sent again."""
    for path in queue_folder.glob(f"*.{queue}.msg"):
        try:
            yield broker_messages.parts(json.loads(path.read_bytes()))
        except (OSError, ValueError, KeyError, IndexError, TypeError):
            continue


def waiting_job_ids(queue_folder: Path) -> set[str]:
    """The jobs that quantization messages in the folder are for."""
    return {str(args[0]) for headers, args in _messages(queue_folder, "quantize")
            if headers.get("task") == "tarq.quantize" and args}


def waiting_task_ids(queue_folder: Path, queue: str) -> set[str]:
    return {str(headers.get("id")) for headers, _ in _messages(queue_folder, queue)}


def queue_folder(settings: Settings) -> Path:
    return Path(settings.celery_config()["broker_transport_options"]["data_folder_in"])


def resend_lost_jobs(settings: Settings, celery) -> list[str]:
    """Send again each queued job whose message is not in the embedded broker's queue folder; returns
    their ids. Nothing to do on another broker."""
    if not settings.embedded_broker:
        return []
    from app.db import get_engine
    from app.routes.job_routes import send_job

    queued = jobs.queued_ids(get_engine(settings.database))
    waiting = waiting_job_ids(queue_folder(settings))
    lost = [job_id for job_id in queued if job_id not in waiting]
    for job_id in lost:
        send_job(celery, job_id)
        log.warning("job %s was queued with no message (its worker died holding it): sent again", job_id)
    return lost
