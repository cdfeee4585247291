"""Job state machine, stale-job reaper and storage, on real SQLite/PostgreSQL and a real S3 server."""
from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import update

from app import jobs
from app.db import get_engine


@pytest.fixture
def engine(database_url):
    return get_engine(database_url)


def new_job(engine, **kw):
    job, created = jobs.create_job(engine, owner="o", source_model="m", config={}, files={}, **kw)
    assert created
    return job


def test_guarded_transitions(engine):
    job = new_job(engine)
    with pytest.raises(jobs.IllegalTransition):
        jobs.transition(engine, job["id"], jobs.SUCCEEDED)  # queued cannot succeed without running
    assert jobs.claim(engine, job["id"], "w", 60)["status"] == jobs.RUNNING
    assert jobs.claim(engine, job["id"], "w2", 60) is None  # alive elsewhere: a duplicate message does nothing
    done = jobs.transition(engine, job["id"], jobs.SUCCEEDED, model_id="x")
    assert done["finished_at"] is not None and done["model_id"] == "x"
    for target in (jobs.RUNNING, jobs.FAILED, jobs.CANCELLED, jobs.QUEUED):
        with pytest.raises(jobs.IllegalTransition):
            jobs.transition(engine, job["id"], target)
    with pytest.raises(jobs.IllegalTransition):
        jobs.request_cancel(engine, job["id"])
    with pytest.raises(jobs.JobNotFound):
        jobs.transition(engine, "nope", jobs.FAILED)


def test_idempotency_key_is_unique_per_owner(engine):
    a = new_job(engine, idempotency_key="k")
    again, created = jobs.create_job(engine, owner="o", source_model="m", config={}, files={}, idempotency_key="k")
    assert not created and again["id"] == a["id"]
    _, created = jobs.create_job(engine, owner="other", source_model="m", config={}, files={}, idempotency_key="k")
    assert created


def age_heartbeat(engine, job_id, seconds):
    with engine.begin() as conn:
        conn.execute(update(jobs.jobs).where(jobs.jobs.c.id == job_id)
                     .values(heartbeat_at=jobs.now() - timedelta(seconds=seconds)))


def test_reaper_requeues_then_fails_lost_jobs(engine):
    job = new_job(engine)
    jobs.claim(engine, job["id"], "w1", 60)
    assert jobs.reap_stale(engine, stale_after=60, max_attempts=2) == []  # fresh heartbeat: alive
    age_heartbeat(engine, job["id"], 120)
    assert jobs.reap_stale(engine, stale_after=60, max_attempts=2) == [(job["id"], jobs.QUEUED)]
    assert jobs.claim(engine, job["id"], "w2", 60)["attempts"] == 2
    age_heartbeat(engine, job["id"], 120)
    assert jobs.reap_stale(engine, stale_after=60, max_attempts=2) == [(job["id"], jobs.FAILED)]
    failed = jobs.get_job(engine, job["id"])
    assert failed["status"] == jobs.FAILED and "worker lost" in failed["error"]


def test_a_store_outage_requeues_with_a_growing_wait_then_fails(engine, make_settings):
    """worker.tasks.storage_retry on a claimed job: queued again (no worker, the reason and the wait in its
    error) while attempts remain, failed after; the wait doubles, capped at half the stale window."""
    from worker.tasks import storage_retry, storage_retry_delay

    settings = make_settings(max_attempts=3, storage_retry_seconds=30.0, stale_after_seconds=100.0)
    assert [storage_retry_delay(n, settings) for n in (1, 2, 3, 4)] == [30.0, 50.0, 50.0, 50.0]
    job = new_job(engine)
    for attempt in (1, 2):
        claimed = jobs.claim(engine, job["id"], f"w{attempt}", 60)
        status, fields = storage_retry(claimed, settings)
        assert status == jobs.QUEUED and fields["worker"] is None
        assert f"(attempt {attempt} of 3)" in fields["error"]
        jobs.transition(engine, job["id"], status, **fields)
    assert "trying again in 50 s" in jobs.get_job(engine, job["id"])["error"]
    status, fields = storage_retry(jobs.claim(engine, job["id"], "w3", 60), settings)
    assert status == jobs.FAILED and "in all 3 attempts" in fields["error"]


def test_redelivered_message_takes_over_a_stale_job(engine):
    job = new_job(engine)
    jobs.claim(engine, job["id"], "dead", 60)
    age_heartbeat(engine, job["id"], 120)
    taken = jobs.claim(engine, job["id"], "alive", 60)
    assert taken["worker"] == "alive" and taken["attempts"] == 2
    assert jobs.heartbeat(engine, job["id"], "dead") is True  # the old worker learns it lost the job


def test_progress_is_recorded(engine):
    job = new_job(engine)
    jobs.claim(engine, job["id"], "w", 60)
    jobs.set_progress(engine, job["id"], {"stage": "encoder", "layer": 1, "layers_total": 4, "fraction": 0.25,
                                          "loss": 0.01})
    public = jobs.public_job(jobs.get_job(engine, job["id"]))
    assert public["progress"] == {"stage": "encoder", "layer": 1, "layers_total": 4, "fraction": 0.25, "loss": 0.01}


def check_storage(storage, tmp_path):
    storage.put_bytes("uploads/j/calibration/a.flac", b"abc")
    (tmp_path / "art" / "sub").mkdir(parents=True)
    (tmp_path / "art" / "config.json").write_text("{}")
    (tmp_path / "art" / "sub" / "w.safetensors").write_bytes(b"w" * 10)
    storage.put_dir(tmp_path / "art", "artifacts/m1")
    assert storage.get_bytes("uploads/j/calibration/a.flac") == b"abc"
    assert storage.size("artifacts/m1") == 12
    got = storage.get_dir("artifacts/m1", tmp_path / "copy")
    assert sorted(p.relative_to(got).as_posix() for p in got.rglob("*") if p.is_file()) == [
        "config.json", "sub/w.safetensors"]
    local = storage.local_dir("artifacts/m1")
    assert (local / "sub" / "w.safetensors").read_bytes() == b"w" * 10
    storage.check()
    storage.delete("artifacts/m1")
    assert not storage.exists("artifacts/m1")
    # a folder given up (move=True): stored all the same; a local store took the files themselves
    (tmp_path / "given" / "sub").mkdir(parents=True)
    (tmp_path / "given" / "sub" / "w.safetensors").write_bytes(b"v" * 7)
    inode = (tmp_path / "given" / "sub" / "w.safetensors").stat().st_ino
    storage.put_dir(tmp_path / "given", "artifacts/m2", move=True)
    assert storage.get_bytes("artifacts/m2/sub/w.safetensors") == b"v" * 7
    if storage.local:
        assert not (tmp_path / "given" / "sub" / "w.safetensors").exists()
        assert (storage.local_dir("artifacts/m2") / "sub" / "w.safetensors").stat().st_ino == inode  # no copy
    with pytest.raises(ValueError):
        storage.path("../etc/passwd")


def test_local_storage(tmp_path):
    from app.storage import Storage

    check_storage(Storage(str(tmp_path / "store")), tmp_path)


def test_s3_storage(tmp_path, s3_server):
    from app.settings import Settings
    from app.storage import storage_from_settings

    endpoint, bucket = s3_server
    settings = Settings(data_dir=tmp_path / "data", storage_url=f"s3://{bucket}/tarq", s3_endpoint_url=endpoint,
                        s3_access_key_id="testing", s3_secret_access_key="testing", s3_region="us-east-1")
    check_storage(storage_from_settings(settings), tmp_path)


def test_cached_copies_of_folders_deleted_elsewhere_are_dropped(tmp_path, s3_server):
    """A worker copies S3 artifacts to its disk; a model deleted through another host's API leaves the copy
    behind until the worker's next copy, which drops it (and keeps the live ones and copies in progress)."""
    from app.settings import Settings
    from app.storage import storage_from_settings

    endpoint, bucket = s3_server
    settings = Settings(data_dir=tmp_path / "data", storage_url=f"s3://{bucket}/tarq", s3_endpoint_url=endpoint,
                        s3_access_key_id="testing", s3_secret_access_key="testing", s3_region="us-east-1")
    worker, elsewhere = storage_from_settings(settings), storage_from_settings(
        settings.model_copy(update={"data_dir": tmp_path / "api"}))
    for name in ("m1", "m2", "m3"):
        worker.put_bytes(f"artifacts/{name}/config.json", b"{}")
    kept, dropped = worker.local_dir("artifacts/m1"), worker.local_dir("artifacts/m2")
    in_progress = worker.cache_dir / "artifacts" / "m9.partial-1"
    in_progress.mkdir()
    elsewhere.delete("artifacts/m2")
    assert dropped.is_dir()  # nothing tells the worker yet
    assert (worker.local_dir("artifacts/m3") / "config.json").read_bytes() == b"{}"
    assert not dropped.exists() and (kept / "config.json").is_file() and in_progress.is_dir()
