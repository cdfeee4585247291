"""The Celery app of the workers, configured from the same settings as the API.

Queues: `quantize` (long jobs: run one per GPU with -c 1) and `transcribe` (short; each process keeps
an LRU cache of loaded models). Late acks + reject on worker loss + prefetch 1: a message leaves the
broker only once its task finished, and a worker never hoards jobs it cannot start.

    celery -A worker.celery_app worker -Q quantize -c 1      # or: tarq worker -Q quantize
"""
from __future__ import annotations

import logging
import os
import resource
import threading

from celery import Celery
from celery.signals import worker_init, worker_process_init
from kombu import Queue

from app.settings import QUEUES, Settings, get_settings

log = logging.getLogger("tarq.worker")
# A worker's log is read, not watched: transformers' "Loading weights" bar (read once, at its import) wrote
# two WARNING lines per model load there.
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


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


def _address_space_mb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) // 1024
    return 0


def apply_memory_limit(settings: Settings) -> int | None:
    """TARQ_WORKER_MEMORY_LIMIT_MB: cap this process's address space at what it holds once the
    libraries every task needs are loaded, plus that many MB. Allocations beyond it fail (MemoryError,
    or torch's "can't allocate memory"), the task ends its job `failed` with that reason, and the
    process goes on with the next one. Returns the cap in bytes, or None when there is none."""
    if settings.worker_memory_limit_mb <= 0:
        return None
    # Loaded first so that the cap counts what tasks allocate, not the size of torch's libraries.
    import torch  # noqa: F401
    import transformers.models.whisper.modeling_whisper  # noqa: F401

    import tarq.pipeline
    import tarq.transcribe  # noqa: F401

    limit = (_address_space_mb() + settings.worker_memory_limit_mb) << 20
    _soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    log.info("worker process memory cap: %d MB of address space (TARQ_WORKER_MEMORY_LIMIT_MB=%d on top of "
             "the loaded libraries)", limit >> 20, settings.worker_memory_limit_mb)
    return limit


def share_cpu_threads(settings: Settings, pool_processes: int | None) -> int:
    """Set torch's CPU threads for this pool process: TARQ_TORCH_THREADS, or else (unless OMP_NUM_THREADS
    is set) the cores this process may run on divided among `pool_processes`. torch otherwise takes a
    thread per core in every process, and two jobs at once then spin twice as many threads as cores at
    each parallel region (`python bench/threads.py`). Returns the count torch uses."""
    import torch

    cores = len(os.sched_getaffinity(0))
    if settings.torch_threads:
        why = "TARQ_TORCH_THREADS"
        torch.set_num_threads(settings.torch_threads)
    elif "OMP_NUM_THREADS" in os.environ:
        why = "OMP_NUM_THREADS"
    elif pool_processes:
        why = f"{cores} cores / {pool_processes} pool processes"
        torch.set_num_threads(max(1, cores // pool_processes))
    else:
        why = "torch's default"
    threads = torch.get_num_threads()
    log.info("worker process: torch uses %d CPU threads (%s)", threads, why)
    return threads


_pool_processes: int | None = None  # set in the parent before the pool forks
_serves_transcriptions = True  # likewise: whether this worker takes the transcribe queue (-Q)


def _consumes(sender, queue: str) -> bool:
    """Whether the worker `sender` takes `queue` (-Q); True when it cannot tell."""
    consumed = getattr(getattr(getattr(sender, "app", None), "amqp", None), "queues", None)
    return consumed is None or queue in consumed.consume_from


@worker_init.connect
def _remember_pool_and_queues(sender=None, **_kw) -> None:
    global _pool_processes, _serves_transcriptions
    _serves_transcriptions = _consumes(sender, "transcribe")
    pool = str(getattr(sender, "pool_cls", ""))
    concurrency = getattr(sender, "concurrency", None)
    if "prefork" not in pool:  # solo and thread pools run in one process: its threads are all there is
        _pool_processes = None
    elif concurrency == "auto":  # resolved after this signal, to one process per available core
        _pool_processes = len(os.sched_getaffinity(0))
    else:
        _pool_processes = int(concurrency) if concurrency else None


@worker_init.connect
def _resend_lost_jobs(sender=None, **_kw) -> None:
    # before this worker consumes anything: see app.embedded_broker
    settings = get_settings()
    if not settings.embedded_broker or not _consumes(sender, "quantize"):
        return
    from app.embedded_broker import resend_lost_jobs

    try:
        resend_lost_jobs(settings, sender.app)
    except Exception as err:  # noqa: BLE001 -- the worker still serves what is in the queue
        log.error("could not look for lost jobs: %s", err)


@worker_process_init.connect
def _init_pool_process(**_kw) -> None:
    # Pool processes only: the parent, which replaces a pool process that dies, is never capped.
    settings = get_settings()
    share_cpu_threads(settings, _pool_processes)
    apply_memory_limit(settings)
    if settings.preload and _serves_transcriptions:  # a quantize-only worker would hold them for nothing
        # in the background: Celery gives a new pool process a few seconds to report ready, and a request
        # that arrives meanwhile waits on the model cache's lock for the same load
        from worker import tasks

        threading.Thread(target=tasks.preload, args=(settings.preload,), name="tarq-preload", daemon=True).start()


app = make_celery()
