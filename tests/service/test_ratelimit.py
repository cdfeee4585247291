"""Per-key limits (a token bucket on submissions, a cap on transcriptions waiting; 429 + Retry-After) and
keys kept out of the logs."""
from __future__ import annotations

import logging
import subprocess

import httpx
import pytest

from app.ratelimit import RateLimiter, retry_after
from tests.service.conftest import free_port, stop, tarq_command, upload, wait_http


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_bucket_allows_a_burst_then_refills_at_the_rate():
    clock = Clock()
    limiter = RateLimiter(per_minute=6, burst=2, clock=clock)  # one token every 10 s
    assert limiter.take("a") == 0 and limiter.take("a") == 0
    assert limiter.take("a") == pytest.approx(10.0)
    assert limiter.take("b") == 0  # another key has its own bucket
    clock.now += 4
    assert limiter.take("a") == pytest.approx(6.0)  # a refused attempt takes nothing
    clock.now += 6
    assert limiter.take("a") == 0
    clock.now += 3600  # a long pause refills to the burst size, not beyond
    assert [limiter.take("a") == 0 for _ in range(3)] == [True, True, False]
    assert retry_after(0.01) == "1" and retry_after(6.0) == "6" and retry_after(6.2) == "7"
    with pytest.raises(ValueError, match="rate limit"):
        RateLimiter(per_minute=0)


def _submit(client, clips, **headers):
    return client.post("/v1/quantizations", data={"model": "tiny-whisper", "method": "rtn"},
                       files=upload(clips[:1]), headers=headers)


def test_submissions_over_the_limit_get_429_with_retry_after(make_client, make_settings, tmp_path, clips):
    # (conftest's API_KEY is not importable: pytest loads conftest as a module of its own, another key)
    key, other = "rate-limit-key-1", "rate-limit-key-2"
    settings = make_settings(database_url=f"sqlite:///{tmp_path / 'jobs.sqlite'}", rate_limit_per_minute=2,
                             api_keys=f"{key},{other}")
    client = make_client(settings, key=key)
    first = _submit(client, clips)
    assert first.status_code == 202, first.text
    assert _submit(client, clips).status_code == 202
    refused = _submit(client, clips)
    assert refused.status_code == 429, refused.text
    error = refused.json()["error"]
    assert error["type"] == "rate_limit_error" and error["code"] == "rate_limit_exceeded"
    assert "2 submissions a minute" in error["message"] and "TARQ_RATE_LIMIT_PER_MINUTE" in error["message"]
    assert 1 <= int(refused.headers["Retry-After"]) <= 30
    # nothing was recorded for the refused submission
    assert len(client.get("/v1/quantizations").json()["data"]) == 2
    # the limit is per key, and only on submissions
    assert _submit(client, clips, Authorization=f"Bearer {other}").status_code == 202
    assert client.get("/v1/quantizations").status_code == 200
    # an unauthenticated caller gets 401, not 429, and does not use up anyone's bucket
    assert _submit(client, clips, Authorization="Bearer wrong").status_code == 401
    # a model upload is a submission too: the same bucket, refused before its body is read
    upload = client.post("/v1/models", files={"archive": ("m.tar", b"x" * 10, "application/x-tar")})
    assert upload.status_code == 429 and "TARQ_RATE_LIMIT_PER_MINUTE" in upload.json()["error"]["message"]


def test_limit_zero_turns_it_off(make_client, make_settings, tmp_path, clips):
    settings = make_settings(database_url=f"sqlite:///{tmp_path / 'jobs.sqlite'}", rate_limit_per_minute=0,
                             api_keys="no-limit-key")
    client = make_client(settings, key="no-limit-key")
    assert {_submit(client, clips).status_code for _ in range(4)} == {202}


def test_the_limit_is_in_the_openapi_schema(client):
    responses = client.get("/openapi.json").json()["paths"]["/v1/quantizations"]["post"]["responses"]
    assert "429" in responses


def _exercise(client, clips, key: str, wrong: str) -> None:
    """Authenticated successes and failures of every kind, and a wrong key."""
    auth = {"Authorization": f"Bearer {key}"}
    job = client.post("/v1/quantizations", data={"model": "tiny-whisper", "method": "rtn"},
                      files=upload(clips[:1]), headers=auth)
    assert job.status_code == 202, job.text
    codes = [
        client.get(f"/v1/quantizations/{job.json()['id']}", headers=auth).status_code,
        client.get("/v1/quantizations", headers=auth).status_code,
        client.get("/v1/models", headers=auth).status_code,
        client.get("/metrics", headers=auth).status_code,
        client.get("/v1/quantizations/nope", headers=auth).status_code,
        client.post("/v1/quantizations", data={"model": "../../etc"}, headers=auth).status_code,
        client.post("/v1/quantizations", data={"model": "tiny-whisper", "method": "rtn"},
                    files=[("files", ("x.wav", b"RIFF0000garbage", "audio/wav"))], headers=auth).status_code,
        client.get("/v1/models", headers={"Authorization": f"Bearer {wrong}"}).status_code,
        client.post("/v1/quantizations", data={"model": "tiny-whisper"},
                    headers={"Authorization": f"Bearer {wrong}"}).status_code,
        client.get("/v1/models", headers={"Authorization": key}).status_code,  # no "Bearer"
    ]
    assert codes == [200, 200, 200, 200, 404, 422, 422, 401, 401, 401], codes
    limited = [client.post("/v1/quantizations", data={"model": "tiny-whisper", "method": "rtn"},
                           files=upload(clips[:1]), headers=auth).status_code for _ in range(3)]
    assert 429 in limited, limited


def test_keys_never_appear_in_the_api_logs(make_client, make_settings, tmp_path, clips, caplog):
    key, wrong = "log-secret-key-3f9a1c7e", "log-wrong-key-b42d90aa"
    settings = make_settings(database_url=f"sqlite:///{tmp_path / 'jobs.sqlite'}", api_keys=key,
                             rate_limit_per_minute=3)
    client = make_client(settings, key=None)
    with caplog.at_level(logging.DEBUG):
        _exercise(client, clips, key, wrong)
    assert caplog.records, "nothing was logged: the capture is not working"
    text = caplog.text + "".join(str(r.args) for r in caplog.records)
    assert key not in text and wrong not in text


@pytest.mark.slow
def test_keys_never_appear_in_a_served_processs_output(tmp_path, subprocess_env, clips):
    """The real `tarq serve --no-worker` at uvicorn's most verbose level (trace: ASGI messages too)."""
    key, wrong = "log-secret-key-77d0e2f1", "log-wrong-key-5c3b8e19"
    env = dict(subprocess_env, TARQ_API_KEYS=key, TARQ_RATE_LIMIT_PER_MINUTE="3")
    port = free_port()
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(tarq_command("serve", "--no-worker", "--port", str(port), "--log-level", "trace"),
                                env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_http(f"http://127.0.0.1:{port}/healthz", proc)
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
                _exercise(client, clips, key, wrong)
        finally:
            stop(proc)
    output = log_path.read_text(errors="replace")
    assert "POST /v1/quantizations" in output  # the access log was on
    assert key not in output and wrong not in output


def test_a_key_has_at_most_its_cap_of_transcriptions_waiting(make_client, make_settings, database_url, tone_wav,
                                                             tmp_path):
    """TARQ_MAX_TRANSCRIPTIONS_PER_KEY=1 and no worker: a key's first transcription waits (then 504); a
    second from the same key meanwhile is 429 with Retry-After at once; another key's goes
    ahead; once the first has answered, the key may send again."""
    import concurrent.futures
    import time

    settings = make_settings(database_url=database_url, api_keys="key-a,key-b", max_transcriptions_per_key=1,
                             transcribe_wait_seconds=3)
    a, b = make_client(settings, key="key-a"), make_client(settings, key="key-b")
    clip = tone_wav(tmp_path / "tone.wav", 1.0)
    send = lambda client: client.post("/v1/audio/transcriptions", data={"model": "tiny-whisper"},  # noqa: E731
                                      files={"file": (clip.name, clip.read_bytes(), "audio/wav")})
    tmp_uploads = settings.data_dir / "storage" / "tmp"
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        first = pool.submit(send, a)
        deadline = time.monotonic() + 10
        while not (tmp_uploads.is_dir() and any(tmp_uploads.iterdir())):  # the first is stored and waiting
            assert time.monotonic() < deadline
            time.sleep(0.05)
        other_key = pool.submit(send, b)
        refused = send(a)
        assert refused.status_code == 429 and refused.headers["retry-after"] == "1", refused.text
        assert refused.json()["error"]["code"] == "too_many_in_flight"
        assert first.result().status_code == 504 and other_key.result().status_code == 504
    assert send(a).status_code == 504  # its slot came back
