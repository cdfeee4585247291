"""app.embedded_broker on the real filesystem transport and SQLite result backend: which queued jobs still
have their message, sending again those that lost it (what a worker does when it starts on the embedded
broker). The API's wait for a transcription is tests/service/test_task_wait.py."""
from __future__ import annotations

from pathlib import Path

from app import jobs
from app.deps import celery_client
from app.embedded_broker import resend_lost_jobs, waiting_job_ids
from app.routes.job_routes import send_job


def _queue(settings) -> Path:
    return Path(settings.celery_config()["broker_transport_options"]["data_folder_in"])


def _job(engine) -> str:
    job, _ = jobs.create_job(engine, owner="k", source_model="m", config={}, files={})
    return job["id"]


def test_finds_the_jobs_whose_messages_wait(settings, engine):
    settings.ensure_dirs()
    celery = celery_client(settings)
    a, b = _job(engine), _job(engine)
    send_job(celery, a)
    send_job(celery, b)
    celery.send_task("tarq.transcribe", args=[{"model": {}}], queue="transcribe")  # another queue: not a job
    (_queue(settings) / "0_x.quantize.msg").write_text("{not json")  # a file being written, say
    assert waiting_job_ids(_queue(settings)) == {a, b}


def test_sends_again_only_the_queued_jobs_without_a_message(settings, engine):
    settings.ensure_dirs()
    celery = celery_client(settings)
    kept, lost, running = _job(engine), _job(engine), _job(engine)
    send_job(celery, kept)
    jobs.claim(engine, running, "w", 60)  # running: the reaper's business, not this
    assert jobs.get_job(engine, running)["status"] == jobs.RUNNING
    assert resend_lost_jobs(settings, celery) == [lost]
    assert waiting_job_ids(_queue(settings)) == {kept, lost}
    assert len(list(_queue(settings).glob("*.quantize.msg"))) == 2  # nothing sent twice
    assert resend_lost_jobs(settings, celery) == []  # its message is there now


def test_another_broker_has_nothing_to_resend(make_settings, tmp_path):
    settings = make_settings(database_url=f"sqlite:///{tmp_path / 'j.sqlite'}", broker_url="redis://127.0.0.1:6379/15")
    assert resend_lost_jobs(settings, None) == []
