"""app.task_wait on real brokers and result backends (the embedded filesystem transport with SQLite, and
Redis): the API's wait for a transcription sends it again when the worker that took it died before
starting it, or when the process running it stopped beating; it leaves alone a task waiting in its queue
or one whose beat goes on. worker.tasks.beating, the worker's side, against the same backend."""
from __future__ import annotations

import logging
import threading
from types import SimpleNamespace

import pytest
from celery.exceptions import TimeoutError as CeleryTimeout

from app.deps import celery_client
from app.embedded_broker import queue_folder, waiting_task_ids
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


def _take(settings) -> None:
    """What a worker taking the message leaves in the queue: nothing (Redis keeps it aside, unacknowledged,
    and gives it back after its visibility timeout; the filesystem transport keeps no copy)."""
    if settings.embedded_broker:
        for message in queue_folder(settings).glob("*.transcribe.msg"):
            message.unlink()
    else:
        import redis

        assert redis.Redis.from_url(settings.broker).delete("transcribe") == 1


def _task(celery, task_id: str):
    """The part of a bound Celery task that worker.tasks.beating uses, on the real result backend."""
    return SimpleNamespace(request=SimpleNamespace(id=task_id, hostname="celery@test-host"),
                           update_state=lambda state, meta: celery.backend.store_result(task_id, meta, state))


def _resender(celery, send, result, sent: list):
    def resend():  # a live worker takes the copy and answers
        sent.append(send(result.id))
        celery.backend.store_result(result.id, {"text": "again"}, "SUCCESS")
    return resend


def test_sends_again_a_transcription_taken_and_never_started_on_the_embedded_broker(make_settings, tmp_path,
                                                                                      caplog):
    settings = make_settings(database_url=f"sqlite:///{tmp_path / 'j.sqlite'}")
    settings.ensure_dirs()
    celery, send, result = _send(settings)
    assert waiting_task_ids(queue_folder(settings), "transcribe") == {result.id}
    _take(settings)
    sent = []

    def resend():  # the message is back in the folder
        _resender(celery, send, result, sent)()
        assert waiting_task_ids(queue_folder(settings), "transcribe") == {result.id}

    with caplog.at_level(logging.WARNING, "tarq.api"):
        assert wait(result, 30, settings, resend, grace=1.0) == {"text": "again"}
    assert len(sent) == 1 and sent[0].id == result.id
    assert "was taken by a worker that never started it (it died): sent again" in caplog.text


@pytest.mark.parametrize("beats", ["some", "none"])
def test_sends_again_a_transcription_whose_process_stopped_beating(broker_settings, caplog, beats):
    """It beat a while and its process died; or its process died between Celery's STARTED and the
    task's first beat."""
    from worker.tasks import beating

    celery, send, result = _send(broker_settings)
    _take(broker_settings)
    if beats == "some":
        with beating(_task(celery, result.id), every=0.2):
            threading.Event().wait(0.5)
        assert result.state == "STARTED" and result.info["beat"] >= 2, result.info
    else:
        celery.backend.store_result(result.id, {"pid": 1, "hostname": "celery@test-host"}, "STARTED")
    sent = []
    with caplog.at_level(logging.WARNING, "tarq.api"):
        assert wait(result, 30, broker_settings, _resender(celery, send, result, sent), grace=1.0) == {"text": "again"}
    assert len(sent) == 1 and sent[0].id == result.id
    assert "stopped beating while running in process" in caplog.text and "celery@test-host" in caplog.text


@pytest.mark.parametrize("state", ["waiting", "beating", "taken from redis"])
def test_leaves_alone_a_transcription_a_worker_may_still_answer(broker_settings, state):
    """Waiting in its queue; running and beating; taken from Redis, which gives a message back itself."""
    from worker.tasks import beating

    if state == "taken from redis" and broker_settings.embedded_broker:
        pytest.skip("the embedded broker's case is the test above")
    celery, _, result = _send(broker_settings)
    if state != "waiting":
        _take(broker_settings)
    never = lambda: pytest.fail("sent again")
    if state == "beating":
        with beating(_task(celery, result.id), every=0.2), pytest.raises(CeleryTimeout):
            wait(result, 4.5, broker_settings, never, grace=1.0)
        assert result.info["beat"] >= 15
    else:
        with pytest.raises(CeleryTimeout):
            wait(result, 4.5, broker_settings, never, grace=1.0)


def test_beating_stops_before_the_block_returns(make_settings, tmp_path):
    """No beat lands after the block: the task's result, stored right after it, is never overwritten."""
    from worker.tasks import beating

    settings = make_settings(database_url=f"sqlite:///{tmp_path / 'j.sqlite'}")
    settings.ensure_dirs()
    celery, _, result = _send(settings)
    with beating(_task(celery, result.id), every=0.05):
        threading.Event().wait(0.3)
    celery.backend.store_result(result.id, {"text": "done"}, "SUCCESS")
    threading.Event().wait(0.3)
    assert celery.backend.get_task_meta(result.id)["status"] == "SUCCESS"
    assert [t for t in threading.enumerate() if t.name.startswith("beat-")] == []


def test_lost_after_must_span_two_beats(make_settings):
    with pytest.raises(ValueError, match="TARQ_TRANSCRIBE_LOST_AFTER_SECONDS .* at least twice TARQ_HEARTBEAT"):
        make_settings(heartbeat_seconds=10, transcribe_lost_after_seconds=15)
    assert make_settings(heartbeat_seconds=10, transcribe_lost_after_seconds=20).transcribe_lost_after_seconds == 20

