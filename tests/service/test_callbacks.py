"""Job callbacks (app.callbacks) to a real HTTP receiver on loopback: the final state is POSTed once,
signed with the owner's key, tried again after a failure, given up after TARQ_CALLBACK_ATTEMPTS, and
refused at submission when the URL cannot be a callback."""
from __future__ import annotations

import concurrent.futures
import hashlib
import hmac
import http.server
import json
import re
import threading
import time

import pytest

from app import callbacks, jobs
from tests.service.test_api import error_of


class Receiver:
    """Records each POST (headers, body) and answers the next of `codes` (then 200)."""

    def __init__(self, codes=()):
        self.calls: list[tuple[dict, bytes]] = []
        self.codes = list(codes)
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.calls.append((dict(self.headers), body))
                self.send_response(receiver.codes.pop(0) if receiver.codes else 200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def receiver():
    made = []

    def make(codes=()):
        made.append(Receiver(codes))
        return made[-1]

    yield make
    for r in made:
        r.server.shutdown()


@pytest.fixture
def hooked(make_client, make_settings, database_url):
    settings = make_settings(database_url=database_url, callback_private_ok=True, callback_retry_seconds=0.2,
                             callback_attempts=3)
    return make_client(settings), settings


def end(engine, job_id: str, status: str = jobs.SUCCEEDED) -> None:
    """What a worker does to a job, without one."""
    jobs.claim(engine, job_id, "w", 60)
    jobs.transition(engine, job_id, status, model_id="m-1" if status == jobs.SUCCEEDED else None)


def test_a_finished_job_is_posted_once_signed_with_the_owners_key(hooked, engine, receiver):
    client, settings = hooked
    r = receiver()
    job = client.post("/v1/quantizations", data={"model": "tiny-whisper", "method": "rtn", "callback_url": r.url})
    assert job.status_code == 202, job.text
    job = job.json()
    assert job["callback"] == {"url": r.url, "status": "waiting", "attempts": 0, "error": None}
    assert callbacks.deliver_due(engine, settings) == {}  # still queued: nothing to say yet
    end(engine, job["id"])
    assert callbacks.deliver_due(engine, settings) == {job["id"]: "delivered"}
    assert callbacks.deliver_due(engine, settings) == {}  # once
    [(headers, body)] = r.calls
    sent = json.loads(body)
    assert sent["id"] == job["id"] and sent["status"] == "succeeded" and sent["model"] == "m-1"
    api_key = client.headers["Authorization"].removeprefix("Bearer ")
    key = hashlib.sha256(api_key.encode()).hexdigest().encode()
    assert headers["X-Tarq-Signature"] == "sha256=" + hmac.new(key, body, hashlib.sha256).hexdigest()
    assert headers["X-Tarq-Delivery"] == f"{job['id']}/1"
    assert client.get(f"/v1/quantizations/{job['id']}").json()["callback"]["status"] == "delivered"


def test_a_failed_try_is_repeated_later_then_given_up(hooked, engine, receiver, clips):
    client, settings = hooked
    flaky, dead = receiver([500]), receiver([503, 503, 503])
    made = []
    for r in (flaky, dead):
        files = [("files", (clips[0].name, clips[0].read_bytes(), "audio/flac"))]
        made.append(client.post("/v1/evaluations", data={"model": "tiny-whisper", "callback_url": r.url},
                                files=files + [("transcripts", ("t.tsv", f"{clips[0].name}\tx\n".encode(), "text/plain"))]
                                ).json()["id"])
        end(engine, made[-1], jobs.FAILED)
    assert callbacks.deliver_due(engine, settings) == {made[0]: "pending", made[1]: "pending"}
    assert callbacks.deliver_due(engine, settings) == {}  # the retry waits callback_retry_seconds
    shown = client.get(f"/v1/evaluations/{made[0]}").json()["callback"]
    assert shown["attempts"] == 1 and shown["error"] == "the receiver answered 500"
    deadline = time.monotonic() + 10
    states = {}
    while time.monotonic() < deadline and set(states.values()) != {"delivered", "failed"}:
        time.sleep(0.1)
        states.update(callbacks.deliver_due(engine, settings))
    assert states == {made[0]: "delivered", made[1]: "failed"}
    assert len(flaky.calls) == 2 and len(dead.calls) == 3  # callback_attempts
    assert [h["X-Tarq-Delivery"] for h, _ in dead.calls] == [f"{made[1]}/{n}" for n in (1, 2, 3)]
    assert client.get(f"/v1/evaluations/{made[1]}").json()["callback"]["status"] == "failed"


def test_a_cancelled_queued_job_is_reported_and_two_senders_send_once(hooked, engine, receiver):
    client, settings = hooked
    r = receiver()
    job = client.post("/v1/quantizations", data={"model": "tiny-whisper", "method": "rtn", "callback_url": r.url}
                      ).json()
    assert client.delete(f"/v1/quantizations/{job['id']}").json()["status"] == "cancelled"
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: callbacks.deliver(engine, settings, job["id"]), range(4)))
    assert sorted(results, key=str) == [None, None, None, "delivered"]
    assert len(r.calls) == 1 and json.loads(r.calls[0][1])["status"] == "cancelled"


@pytest.mark.parametrize("url,words", [
    ("ftp://example.com/x", "not an http(s) URL"),
    ("http://127.0.0.1:9/hook", "private, loopback or link-local"),
    ("http://169.254.169.254/latest/meta-data", "private, loopback or link-local"),
    ("http://tarq-no-such-host.invalid/hook", "does not resolve"),
])
def test_a_url_that_cannot_be_a_callback_is_refused(client, settings, url, words):
    err = error_of(client.post("/v1/quantizations", data={"model": "tiny-whisper", "method": "rtn",
                                                          "callback_url": url}), 422)
    assert err["param"] == "callback_url" and words in err["message"], err
    assert client.get("/v1/quantizations").json()["data"] == []


@pytest.mark.slow
def test_tarq_serve_calls_back_from_the_worker_and_again_from_the_api(subprocess_env, tmp_path, receiver):
    """A real `tarq serve`: the worker that ends the job tries the callback at once; the receiver answers
    500, and the API's sweep tries again after TARQ_CALLBACK_RETRY_SECONDS, which it takes."""
    import httpx

    from tests.service.conftest import free_port, stop, tarq_command, wait_http
    from tests.service.test_e2e import run_logged, tail

    r = receiver([500])
    env = dict(subprocess_env, TARQ_API_KEYS="cb-key", TARQ_CALLBACK_PRIVATE_OK="1", TARQ_CALLBACK_RETRY_SECONDS="1")
    port = free_port()
    proc, log = run_logged(tarq_command("serve", "--port", str(port)), env, tmp_path / "serve.log")
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", proc)
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": "Bearer cb-key"})
        job = client.post("/v1/quantizations", data={"model": "tiny-whisper", "method": "rtn", "callback_url": r.url})
        assert job.status_code == 202, job.text
        deadline = time.monotonic() + 180
        while len(r.calls) < 2:
            assert time.monotonic() < deadline, tail(tmp_path / "serve.log")
            time.sleep(0.2)
        bodies = [json.loads(body) for _, body in r.calls]
        assert [b["status"] for b in bodies] == ["succeeded", "succeeded"] and bodies[0]["model"]
        assert [h["X-Tarq-Delivery"] for h, _ in r.calls] == [f"{job.json()['id']}/1", f"{job.json()['id']}/2"]
        shown = client.get(f"/v1/quantizations/{job.json()['id']}").json()["callback"]
        assert shown["status"] == "delivered" and shown["attempts"] == 2
    finally:
        stop(proc)
        log.close()
    logged = (tmp_path / "serve.log").read_text()
    job_id = job.json()["id"]
    assert re.search(rf"ForkPoolWorker-\d+\] callback of job {job_id}: pending \(the receiver answered 500\)", logged)
    assert re.search(rf"INFO tarq.api \[-\] callback of job {job_id}: delivered", logged)
