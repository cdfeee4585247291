"""The Celery app of the workers, configured from the same settings as the API.

Queues: `quantize` (long jobs: run one per GPU with -c 1) and `transcribe` (short; each process keeps
an LRU cache of loaded models). Late acks + reject on worker loss + prefetch 1: a message leaves the
broker only once its task finished, and a worker never hoards jobs it cannot start.

    celery -A worker.celery_app worker -Q quantize -c 1      # or: tarq worker -Q quantize
"""
from __future__ import annotations

from celery import Celery
from kombu import Queue

from app.settings import QUEUES, Settings, get_settings


def make_celery(settings: Settings | None = None) -> Celery:
    settings = settings or get_settings()
    settings.ensure_dirs()
    celery = Celery("tarq", include=["worker.tasks"])
    celery.conf.update(settings.celery_config())
    celery.conf.update(
        task_queues=[Queue(name) for name in QUEUES],
        worker_send_task_events=False,
        # a lost broker connection must not leave a late-acked task running twice
        worker_cancel_long_running_tasks_on_connection_loss=True,
        worker_hijack_root_logger=False,
    )
    return celery


app = make_celery()
