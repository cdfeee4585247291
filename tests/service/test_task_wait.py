"""app.task_wait on real brokers and result backends (the embedded filesystem transport with SQLite, and
Redis): the API's wait for a transcription sends it again when the worker that took it died before
starting it, or when the process running it stopped beating, and drops the copy Redis holds for the dead
worker; it leaves alone a task waiting in its queue or one whose beat goes on. worker.tasks.beating, the
worker's side, against the same backend. The taking worker is a process that takes the message through
kombu as a Celery worker does and is SIGKILLed holding it (conftest.take_and_die)."""
from __future__ import annotations

import logging
import threading
from contextlib import contextmanager

import pytest
from celery.exceptions import TimeoutError as CeleryTimeout

from app import redis_broker
from app.deps import celery_client
from app.embedded_broker import queue_folder, waiting_task_ids
from tests.service.conftest import take_and_die
from app.task_wait import wait

REDIS_DB = 14


@pytest.fixture(params=["embedded", "redis"])
def broker_settings(request, make_settings, tmp_path):
    if request.param == "embedded":
        settings = make_settings(database_url=f"sqlite:///{tmp_path / 'j.sqlite'}")
    else:
        import redis

        url = f"redis://127.0.0.1:6379/{REDIS_DB}"
        client = redis.Redis.from_url(url)
        client.flushdb()
        request.addfinalizer(client.flushdb)
        settings = make_settings(database_url=f"sqlite:///{tmp_path / 'j.sqlite'}", broker_url=url)
    settings.ensure_dirs()
    return settings


def _send(settings):
    celery = celery_client(settings)
    send = lambda task_id=None: celery.send_task("tarq.transcribe", args=[{}], queue="transcribe",
                                                 task_id=task_id)
    return celery, send, send()


def _take(settings, celery) -> str:
    """Take the one message waiting in the transcribe queue in a process that is then killed; returns its
    task id."""
    task_id = take_and_die(settings, celery, "transcribe")
    if settings.embedded_broker:  # the filesystem transport kept no copy
        assert waiting_task_ids(queue_folder(settings), "transcribe") == set()
    else:  # Redis holds it aside until its visibility timeout
        assert _redis(settings).llen("transcribe") == 0
        assert len(redis_broker.held_tags(celery, task_id)) == 1
    return task_id


def _redis(settings):
    import redis

    return redis.Redis.from_url(settings.broker)


def _in_queue_again(settings, celery, task_id: str) -> None:
    """The task's one copy waits in the queue: the one sent again, none still held for the dead worker."""
    if settings.embedded_broker:
        assert waiting_task_ids(queue_folder(settings), "transcribe") == {task_id}
    else:
        assert _redis(settings).llen("transcribe") == 1
        assert redis_broker.held_tags(celery, task_id) == []


@contextmanager
def _running(celery, task_id: str, hostname: str = "celery@test-host"):
    """A real bound Celery task with the request of a run of `task_id` pushed, as a worker's pool process
    has it while it runs that task (in its own thread only: Celery keeps requests per thread)."""

    @celery.task(name="tarq.test-beat", bind=True, shared=False)
    def beat_test(self):
        pass

    task = celery.tasks[beat_test.name]
    task.push_request(id=task_id, hostname=hostname)
    try:
        yield task
    finally:
        task.pop_request()


def _resender(celery, send, result, sent: list):
    def resend():  # a live worker takes the copy and answers
        sent.append(send(result.id))
        celery.backend.store_result(result.id, {"text": "again"}, "SUCCESS")
    return resend


def test_sends_again_a_transcription_taken_and_never_started(broker_settings, caplog):
    celery, send, result = _send(broker_settings)
    assert _take(broker_settings, celery) == result.id
    sent = []

    def resend():  # before the copy is answered: it waits in the queue, and Redis holds none for the dead worker
        _resender(celery, send, result, sent)()
        _in_queue_again(broker_settings, celery, result.id)

    with caplog.at_level(logging.INFO, "tarq.api"):
        assert wait(result, 30, broker_settings, resend, grace=1.0) == {"text": "again"}
    assert len(sent) == 1 and sent[0].id == result.id
    assert "was taken by a worker that never started it (it died): sent again" in caplog.text
    assert ("dropped the copy a dead worker held" in caplog.text) == (not broker_settings.embedded_broker)


@pytest.mark.parametrize("beats", ["some", "none"])
def test_sends_again_a_transcription_whose_process_stopped_beating(broker_settings, caplog, beats):
    """It beat a while and its process died; or its process died between Celery's STARTED and the
    task's first beat."""
    from worker.tasks import beating

    celery, send, result = _send(broker_settings)
    _take(broker_settings, celery)
    if beats == "some":
        with _running(celery, result.id) as task, beating(task, every=0.2):
            threading.Event().wait(0.5)
        assert result.state == "STARTED" and result.info["beat"] >= 2, result.info
    else:
        celery.backend.store_result(result.id, {"pid": 1, "hostname": "celery@test-host"}, "STARTED")
    sent = []
    resender = _resender(celery, send, result, sent)

    def resend():
        resender()
        _in_queue_again(broker_settings, celery, result.id)

    with caplog.at_level(logging.WARNING, "tarq.api"):
        assert wait(result, 30, broker_settings, resend, grace=1.0) == {"text": "again"}
    assert len(sent) == 1 and sent[0].id == result.id
    assert "stopped beating while running in process" in caplog.text and "celery@test-host" in caplog.text


@pytest.mark.parametrize("state", ["waiting", "beating"])
def test_leaves_alone_a_transcription_a_worker_may_still_answer(broker_settings, state):
    """Waiting in its queue; taken, running and beating (on Redis its held copy stays held)."""
    from worker.tasks import beating

    celery, _, result = _send(broker_settings)
    never = lambda: pytest.fail("sent again")
    if state == "beating":
        _take(broker_settings, celery)
        with _running(celery, result.id) as task, beating(task, every=0.2), pytest.raises(CeleryTimeout):
            wait(result, 4.5, broker_settings, never, grace=1.0)
        assert result.info["beat"] >= 15
        if not broker_settings.embedded_broker:
            assert len(redis_broker.held_tags(celery, result.id)) == 1
    else:
        with pytest.raises(CeleryTimeout):
            wait(result, 4.5, broker_settings, never, grace=1.0)


@pytest.mark.parametrize("broker_settings", ["redis"], indirect=True)
def test_held_copies_are_found_and_dropped_by_task_id(broker_settings):
    """Only the task's own held messages: another task's stays held for its worker."""
    celery, send, first = _send(broker_settings)
    _take(broker_settings, celery)
    second = send()
    _take(broker_settings, celery)
    assert redis_broker.drop_held(celery, first.id) and redis_broker.held_tags(celery, first.id) == []
    assert len(redis_broker.held_tags(celery, second.id)) == 1
    assert redis_broker.drop_held(celery, first.id) == []


def test_beats_are_stored_for_the_task_that_runs_them(broker_settings):
    """On a real Celery task: its request (id, hostname) is thread-local and empty in the beat's thread, so
    the beat must write under the id of the task that entered the block."""
    from worker.tasks import beating

    celery = celery_client(broker_settings)
    with _running(celery, "beat-task-id", "celery@beat-host") as task, beating(task, every=0.1):
        threading.Event().wait(0.5)
    meta = celery.backend.get_task_meta("beat-task-id")
    assert meta["status"] == "STARTED" and meta["result"]["beat"] >= 3, meta
    assert meta["result"]["hostname"] == "celery@beat-host"


def test_beating_stops_before_the_block_returns(make_settings, tmp_path):
    """No beat lands after the block: the task's result, stored right after it, is never overwritten."""
    from worker.tasks import beating

    settings = make_settings(database_url=f"sqlite:///{tmp_path / 'j.sqlite'}")
    settings.ensure_dirs()
    celery, _, result = _send(settings)
    with _running(celery, result.id) as task, beating(task, every=0.05):
        threading.Event().wait(0.3)
    celery.backend.store_result(result.id, {"text": "done"}, "SUCCESS")
    threading.Event().wait(0.3)
    assert celery.backend.get_task_meta(result.id)["status"] == "SUCCESS"
    assert [t for t in threading.enumerate() if t.name.startswith("beat-")] == []


def test_lost_after_must_span_two_beats(make_settings):
    with pytest.raises(ValueError, match="TARQ_TRANSCRIBE_LOST_AFTER_SECONDS .* at least twice TARQ_HEARTBEAT"):
        make_settings(heartbeat_seconds=10, transcribe_lost_after_seconds=15)
    assert make_settings(heartbeat_seconds=10, transcribe_lost_after_seconds=20).transcribe_lost_after_seconds == 20

