"""The API's reaper on a real Redis and database: a quantization message a worker took and died holding,
before it claimed the job, is dropped and sent again once it has been held TARQ_STALE_AFTER_SECONDS (Redis
itself would give it back only after its visibility timeout, hours); a job whose worker is alive is left
alone; a job the reaper hands back after its worker died mid-run leaves no held copy behind, and is sent
once; a job queued that long with no message anywhere is sent. The taking worker is a process that takes
the message through kombu and is SIGKILLed."""
from __future__ import annotations

import json
import threading
from datetime import timedelta

import pytest
from sqlalchemy import update

from app import jobs, redis_broker
from app.db import get_engine
from app.deps import celery_client
from app.main import reap_once
from app.routes.job_routes import send_job
from tests.service.conftest import take_and_die

REDIS_DB = 13
HELD_FOR = 3.0  # TARQ_STALE_AFTER_SECONDS here


@pytest.fixture
def redis_settings(make_settings, tmp_path):
    import redis

    url = f"redis://127.0.0.1:6379/{REDIS_DB}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield make_settings(database_url=f"sqlite:///{tmp_path / 'j.sqlite'}", broker_url=url,
                        stale_after_seconds=HELD_FOR)
    client.flushdb()


def _job(settings, celery, engine, taken: bool = True) -> str:
    job, _ = jobs.create_job(engine, owner="o", source_model="m", config={}, files={})
    send_job(celery, job["id"])
    if taken:
        take_and_die(settings, celery, "quantize")
    return job["id"]


def _waiting(settings) -> list[str]:
    """The job ids of the quantization messages waiting in Redis's queue."""
    import redis

    from app import broker_messages

    raw = redis.Redis.from_url(settings.broker).lrange("quantize", 0, -1)
    return sorted(str(broker_messages.parts(json.loads(m))[1][0]) for m in raw)


def _held_jobs(celery) -> list[str]:
    return sorted(str(h.args[0]) for h in redis_broker.held(celery) if h.task == "tarq.quantize")


def test_reaper_sends_again_a_job_taken_by_a_worker_that_died_before_claiming_it(redis_settings, caplog):
    settings = redis_settings
    celery, engine = celery_client(settings), get_engine(settings.database)
    lost = _job(settings, celery, engine)
    alive = _job(settings, celery, engine)
    assert jobs.claim(engine, alive, "w1", HELD_FOR)  # its worker claimed it and heartbeats
    assert _held_jobs(celery) == sorted([lost, alive]) and _waiting(settings) == []

    assert reap_once(settings) == []  # held for less than TARQ_STALE_AFTER_SECONDS: may still start
    assert _waiting(settings) == []
    threading.Event().wait(HELD_FOR + 0.5)
    jobs.heartbeat(engine, alive, "w1")
    with caplog.at_level("WARNING", "tarq.api"):
        assert reap_once(settings) == [(lost, jobs.QUEUED)]
    assert f"job {lost} was taken by a worker that never started it (it died): sent again" in caplog.text
    assert "had no message" not in caplog.text
    assert _held_jobs(celery) == [alive] and _waiting(settings) == [lost]
    assert jobs.get_job(engine, lost)["status"] == jobs.QUEUED and jobs.get_job(engine, lost)["attempts"] == 0
    assert reap_once(settings) == [] and _waiting(settings) == [lost]  # sent once


def test_reaper_drops_the_held_copy_of_a_job_whose_worker_died_mid_run(redis_settings):
    settings = redis_settings
    celery, engine = celery_client(settings), get_engine(settings.database)
    job_id = _job(settings, celery, engine)
    assert jobs.claim(engine, job_id, "w1", HELD_FOR)
    with engine.begin() as conn:  # its heartbeat stopped a minute ago
        conn.execute(update(jobs.jobs).where(jobs.jobs.c.id == job_id)
                     .values(heartbeat_at=jobs.now() - timedelta(seconds=60)))
    assert reap_once(settings) == [(job_id, jobs.QUEUED)]
    assert _held_jobs(celery) == [] and _waiting(settings) == [job_id]  # one copy, not a second one later


def test_a_message_waiting_in_the_queue_is_not_taken_for_lost(redis_settings):
    settings = redis_settings
    celery, engine = celery_client(settings), get_engine(settings.database)
    job_id = _job(settings, celery, engine, taken=False)
    threading.Event().wait(HELD_FOR + 0.5)
    assert reap_once(settings) == [] and _waiting(settings) == [job_id] and _held_jobs(celery) == []


def test_reaper_sends_a_job_queued_with_no_message(redis_settings, caplog):
    """The API died between the job's database write and its send, or the reaper's send failed."""
    settings = redis_settings
    celery, engine = celery_client(settings), get_engine(settings.database)
    old, _ = jobs.create_job(engine, owner="o", source_model="m", config={}, files={})
    new, _ = jobs.create_job(engine, owner="o", source_model="m", config={}, files={})  # being sent now
    with engine.begin() as conn:
        conn.execute(update(jobs.jobs).where(jobs.jobs.c.id == old["id"])
                     .values(updated_at=jobs.now() - timedelta(seconds=HELD_FOR + 1)))
    with caplog.at_level("WARNING", "tarq.api"):
        assert reap_once(settings) == [(old["id"], jobs.QUEUED)]
    assert f"job {old['id']} had no message: sent again" in caplog.text
    assert _waiting(settings) == [old["id"]]
    assert reap_once(settings) == []  # it waits in the queue now
