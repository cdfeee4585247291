"""app.embedded_broker on the real filesystem transport and SQLite result backend: which queued jobs still
have their message, sending again those that lost it (what a worker does when it starts on the embedded
broker), and the API's wait for a transcription, which sends it again when a worker took it and died."""
from __future__ import annotations

from pathlib import Path

import pytest

from app import jobs
from app.deps import celery_client
from app.embedded_broker import resend_lost_jobs, wait, waiting_job_ids, waiting_task_ids
from app.routes.quantizations import send_quantize


def _queue(settings) -> Path:
    return Path(settings.celery_config()["broker_transport_options"]["data_folder_in"])


def _job(engine) -> str:
    job, _ = jobs.create_job(engine, owner="k", source_model="m", config={}, files={})
    return job["id"]


def test_finds_the_jobs_whose_messages_wait(settings, engine):
    settings.ensure_dirs()
    celery = celery_client(settings)
    a, b = _job(engine), _job(engine)
    send_quantize(celery, a)
    send_quantize(celery, b)
    celery.send_task("tarq.transcribe", args=[{"model": {}}], queue="transcribe")  # another queue: not a job
    (_queue(settings) / "0_x.quantize.msg").write_text("{not json")  # a file being written, say
    assert waiting_job_ids(_queue(settings)) == {a, b}


def test_sends_again_only_the_queued_jobs_without_a_message(settings, engine):
    settings.ensure_dirs()
    celery = celery_client(settings)
    kept, lost, running = _job(engine), _job(engine), _job(engine)
    send_quantize(celery, kept)
    jobs.claim(engine, running, "w", 60)  # running: the reaper's business, not this
    assert jobs.get_job(engine, running)["status"] == jobs.RUNNING
    assert resend_lost_jobs(settings, celery) == [lost]
    assert waiting_job_ids(_queue(settings)) == {kept, lost}
    assert len(list(_queue(settings).glob("*.quantize.msg"))) == 2  # nothing sent twice
    assert resend_lost_jobs(settings, celery) == []  # its message is there now


def test_another_broker_has_nothing_to_resend(make_settings, tmp_path):
    settings = make_settings(database_url=f"sqlite:///{tmp_path / 'j.sqlite'}", broker_url="redis://127.0.0.1:6379/15")
    assert resend_lost_jobs(settings, None) == []


def _transcription(settings):
    celery = celery_client(settings)
    send = lambda task_id=None: celery.send_task("tarq.transcribe", args=[{}], queue="transcribe",  # noqa: E731
                                                 task_id=task_id)
    return celery, send, send()


def test_wait_sends_again_a_transcription_taken_and_never_started(make_settings, tmp_path):
    settings = make_settings(database_url=f"sqlite:///{tmp_path / 'j.sqlite'}")
    settings.ensure_dirs()
    celery, send, result = _transcription(settings)
    assert waiting_task_ids(_queue(settings), "transcribe") == {result.id}
    for message in _queue(settings).glob("*.transcribe.msg"):
        message.unlink()  # taken by a worker that then died
    sent = []

    def resend():  # the message comes back; a worker runs it and stores its answer
        sent.append(send(result.id))
        assert waiting_task_ids(_queue(settings), "transcribe") == {result.id}
        celery.backend.store_result(result.id, {"text": "hello"}, "SUCCESS")

    assert wait(result, 30, settings, resend, grace=1.0) == {"text": "hello"}
    assert len(sent) == 1 and sent[0].id == result.id


@pytest.mark.parametrize("state", ["waiting", "started"])
def test_wait_leaves_alone_a_transcription_waiting_or_started(make_settings, tmp_path, state):
    from celery.exceptions import TimeoutError as CeleryTimeout

    settings = make_settings(database_url=f"sqlite:///{tmp_path / 'j.sqlite'}")
    settings.ensure_dirs()
    celery, _, result = _transcription(settings)
    if state == "started":  # a live worker took it and runs it
        for message in _queue(settings).glob("*.transcribe.msg"):
            message.unlink()
        celery.backend.store_result(result.id, None, "STARTED")
    with pytest.raises(CeleryTimeout):
        wait(result, 4.5, settings, resend=lambda: pytest.fail("sent again"), grace=1.0)
